"""The web UI's models: the ONLY module of :mod:`quantduo.ui` that calls into the rest of quantduo.

Engines (each used by one job at a time, see :mod:`quantduo.ui.jobs`):

* :class:`TinyDitEngine`: the bundled tiny digits DiT (``quantduo/assets/tiny_dit``) in bf16 and as SVDQuant
  W4A4, quantized on the fly with the library's SVDQuant and cached on disk (a few seconds, once);
* :class:`PipelineEngine`: a local diffusers folder or a ``quantduo quantize`` output folder (GPU);
* :class:`RandomFluxEngine`: a full-size FLUX.1-dev transformer with random weights (timing on a GPU: no text
  encoder or VAE, the conditioning is drawn from the prompt's hash and the picture shows latent channels);
* :class:`LongContextEngine`: a causal LM (the bundled tiny LM by default) with a DuoAttention head pattern,
  answering a question about a document with DuoAttention and with full attention.

Every engine reports progress and honours cancellation through a :class:`Job`; bad input raises
:class:`UserError`, whose message the page shows as it is.
"""
from __future__ import annotations

import copy
import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from quantduo.duo.cache import DuoCache
from quantduo.duo.data import PasskeyFormat
from quantduo.duo.decode import GraphedDecoder
from quantduo.duo.deploy import apply_pattern, chunked_prefill
from quantduo.duo.patterns import load_pattern
from quantduo.formats.registry import EXECUTIONS
from quantduo.integrations.diffusers import is_quantized_pipeline, load_pipeline, quantization_config
from quantduo.integrations.lora import LoraFormatError, attach_lora, remove_lora, set_lora_strength
from quantduo.integrations.published import is_published, load_published_pipeline
from quantduo.models import tiny_lm
from quantduo.models.tiny_dit import load_tiny_dit, sample_digits
from quantduo.svdquant import load_quantized, quantize_model, save_quantized, set_execution

TINY_DIT = "tiny-dit"
RANDOM_FLUX = "random-flux"
TINY_LM = "tiny-lm"
MAX_UPLOAD_BYTES = 50 * 2**20
DISPLAY_PIXELS = 256  # tiny DiT digits are upscaled (nearest) to about this many pixels a side
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# tiny DiT quantization (as ``quantduo demo``): SVDQuant INT4 W4A4, rank 32, calibrated on its own sampling
TINY_QUANT = dict(fmt="int4", rank=32, lowrank_iters=20, search_tokens=256, calib_steps=20, calib_seed=1234)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=[16, 56, 56])


class UserError(ValueError):
    """Bad input: the message is shown in the page as it is."""


class Cancelled(Exception):
    """The job was cancelled (cancel button, or the page went away)."""


class Job:
    """Progress and cancellation of one unit of work; engines call :meth:`advance` between steps."""

    def __init__(self, label: str, session: str = ""):
        self.label, self.session = label, session
        self.cancel_event = threading.Event()
        self.done, self.total, self.stage = 0, 0, label

    def start_stage(self, stage: str, total: int) -> None:
        """Begin a stage of ``total`` steps (``total`` 0: unknown length)."""
        self.check()
        self.stage, self.done, self.total = stage, 0, total

    def advance(self, n: int = 1) -> None:
        """One more step done; raises :class:`Cancelled` once cancel was requested."""
        self.check()
        self.done += n

    def check(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled(f"{self.label}: cancelled")

    def cancel(self) -> None:
        self.cancel_event.set()

    def status(self) -> str:
        """One line for the page, e.g. ``sampling (SVDQuant W4A4): 7/20``."""
        return f"{self.stage}: {self.done}/{self.total}" if self.total else f"{self.stage}..."


class _StepHook:
    """Forward pre-hook calling ``job.advance()`` at each forward of a module (one sampling / decoding step)."""

    def __init__(self, module: torch.nn.Module, job: Job):
        self.handle = module.register_forward_pre_hook(lambda *_: job.advance())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (weight memory)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def digits_to_rgb(images: torch.Tensor, pixels: int = DISPLAY_PIXELS) -> np.ndarray:
    """``[1, 1, H, W]`` ink in [0, 1] -> uint8 ``[H*s, W*s, 3]`` dark ink on white, nearest upscale ``s``.

    Each model pixel becomes an ``s x s`` block of ``round(255 * (1 - ink))``."""
    ink = images[0, 0].float().clamp(0, 1).numpy()
    grey = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
    scale = max(1, pixels // max(grey.shape))
    big = np.kron(grey, np.ones((scale, scale), dtype=np.uint8))
    return np.repeat(big[:, :, None], 3, axis=2)


def unique_name(stem: str, taken) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... if taken."""
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}-{k}", k + 1
    return name


@dataclass
class ImageRequest:
    """One image to draw. ``digit`` (0-9, or None: read it from the prompt) is used by the tiny DiT only;
    ``loras`` maps attached LoRA names to strengths."""

    prompt: str = ""
    digit: int | None = None
    seed: int = 0
    steps: int = 20
    size: int = 8
    execution: str = "auto"
    compare: bool = False
    loras: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageResult:
    """uint8 RGB ``image`` (and ``reference``: the 16-bit model's image when asked), timings and memory."""

    image: np.ndarray
    execution: str
    step_ms: float
    weight_bytes: int
    reference: np.ndarray | None = None
    reference_execution: str = ""
    reference_step_ms: float = 0.0
    reference_weight_bytes: int = 0
    psnr_db: float | None = None
    note: str = ""


class ImageEngine:
    """Shared LoRA bookkeeping and request checks; subclasses implement :meth:`_models` and :meth:`_draw`."""

    name = "image model"
    executions: tuple[str, ...] = ("auto",)
    reference_execution = "bf16"
    patch = 1
    default_size = 8
    default_steps = 20
    max_steps = 100
    max_size = 4096
    prompt_hint = ""

    def __init__(self):
        self.loras: dict[str, float] = {}
        self.lora_files: dict[str, Path] = {}

    def _follow_loras(self, model: torch.nn.Module) -> None:
        """Attach the LoRAs already attached elsewhere to a newly loaded denoiser."""
        for name, strength in self.loras.items():
            attach_lora(model, str(self.lora_files[name]), name=name, strength=strength)

    # ---- LoRA -------------------------------------------------------------------------------------------
    def _lora_targets(self) -> list[torch.nn.Module]:
        """Every loaded denoiser the LoRAs go on (quantized and reference alike)."""
        raise NotImplementedError

    def attach_lora(self, path: str | Path, strength: float = 1.0) -> str:
        """Attach a LoRA file to every loaded denoiser; returns its name. Bad files raise :class:`UserError`."""
        path = Path(path)
        name = unique_name(path.stem or "lora", self.loras)
        done = []
        try:
            for model in self._lora_targets():
                attach_lora(model, str(path), name=name, strength=strength)
                done.append(model)
        except (LoraFormatError, ValueError, OSError, RuntimeError, SafetensorError) as err:
            for model in done:
                remove_lora(model, name)
            raise UserError(f"{path.name} is not a LoRA for {self.name}: {err}") from None
        self.loras[name], self.lora_files[name] = strength, path
        return name

    def detach_lora(self, name: str) -> None:
        if name not in self.loras:
            raise UserError(f"no LoRA named {name!r} is attached")
        for model in self._lora_targets():
            remove_lora(model, name)
        del self.loras[name], self.lora_files[name]

    def _apply_strengths(self, strengths: dict[str, float]) -> None:
        for name, value in strengths.items():
            if name in self.loras and self.loras[name] != float(value):
                for model in self._lora_targets():
                    set_lora_strength(model, name, float(value))
                self.loras[name] = float(value)

    # ---- checks -----------------------------------------------------------------------------------------
    def check(self, req: ImageRequest) -> None:
        """Raise :class:`UserError` for a request this model cannot draw."""
        if req.execution not in self.executions:
            raise UserError(f"execution must be one of {', '.join(self.executions)}, not {req.execution!r}")
        if not 1 <= int(req.steps) <= self.max_steps:
            raise UserError(f"steps must be between 1 and {self.max_steps}, got {req.steps}")
        size = int(req.size)
        if size <= 0 or size > self.max_size:
            raise UserError(f"size must be between {self.patch} and {self.max_size} pixels, got {size}")
        if size % self.patch:
            raise UserError(f"size {size} is not a multiple of {self.name}'s patch of {self.patch} pixels "
                            f"(try {max(self.patch, size // self.patch * self.patch)})")
        if not 0 <= int(req.seed) < 2**63:
            raise UserError(f"seed must be a non-negative integer, got {req.seed}")
        unknown = set(req.loras) - set(self.loras)
        if unknown:
            raise UserError(f"LoRAs {sorted(unknown)} are not attached")

    def generate(self, req: ImageRequest, job: Job) -> ImageResult:
        """Draw ``req`` (and its 16-bit reference when ``req.compare``)."""
        self.check(req)
        self._apply_strengths(req.loras)
        label = self.resolve_execution(req.execution)
        image, step_ms, weight = self._draw(req, label, job)
        result = ImageResult(image, label, step_ms, weight)
        if req.compare and label != self.reference_execution:
            ref, ref_ms, ref_weight = self._draw(req, self.reference_execution, job)
            result.reference, result.reference_step_ms, result.reference_weight_bytes = ref, ref_ms, ref_weight
            result.reference_execution, result.psnr_db = self.reference_execution, psnr(image, ref)
        elif req.compare:
            result.note = "the image already is the 16-bit model's: nothing to compare"
        return result

    def resolve_execution(self, execution: str) -> str:
        return execution

    def _draw(self, req: ImageRequest, execution: str, job: Job) -> tuple[np.ndarray, float, int]:
        """(uint8 RGB image, ms per step, weight bytes) of one execution."""
        raise NotImplementedError


def digit_from_prompt(prompt: str) -> int:
    """The digit a prompt asks for: ``"digit 7"``, ``"a 7"``, ``"seven"``; raises :class:`UserError`."""
    text = prompt.strip().lower()
    if not text:
        raise UserError("the prompt is empty: write e.g. 'digit 7', or pick a digit")
    found = re.findall(r"(?<![0-9])[0-9](?![0-9])", text)
    found += [str(DIGIT_WORDS.index(w)) for w in re.findall(r"[a-z]+", text) if w in DIGIT_WORDS]
    if len(set(found)) != 1:
        raise UserError(f"the tiny digits model draws one digit 0-9: write e.g. 'digit 7' "
                        f"(found {'no digit' if not found else 'digits ' + ', '.join(sorted(set(found)))} "
                        f"in {prompt.strip()!r})")
    return int(found[0])


def tiny_dit_checkpoint(cache_dir: Path, log=print) -> Path:
    """Folder of the SVDQuant W4A4 tiny DiT transformer, quantized with the library and saved on first use."""
    ckpt = Path(cache_dir) / "tiny_dit_svdquant_int4"
    if (ckpt / "quantduo_config.json").is_file():
        return ckpt
    log(f"quantizing the bundled tiny DiT with SVDQuant INT4 (once; cached in {ckpt})")
    model = load_tiny_dit(dtype=torch.bfloat16)
    q = TINY_QUANT
    config = quantization_config(model.transformer, q["fmt"], rank=q["rank"], lowrank_iters=q["lowrank_iters"],
                                 search_tokens=q["search_tokens"])
    calibrate = lambda _t: sample_digits(model, torch.arange(10), steps=q["calib_steps"], seed=q["calib_seed"])  # noqa: E731
    quantize_model(model.transformer, calibrate, config, progress=False)
    save_quantized(model.transformer, ckpt, config)
    return ckpt


def load_tiny_dit_int4(cache_dir: Path, log=print):
    """The bundled tiny DiT with its transformer replaced by the cached SVDQuant W4A4 one."""
    ckpt = tiny_dit_checkpoint(cache_dir, log)
    model = load_tiny_dit(dtype=torch.bfloat16)
    load_quantized(model.transformer, ckpt)
    return model.eval()


class TinyDitEngine(ImageEngine):
    """The bundled digits DiT: SVDQuant W4A4 (``int4``, what ``auto`` picks) and the bf16 model it came from."""

    name = "the bundled tiny digits DiT"
    executions = ("auto", "int4", "bf16")
    patch = 2
    default_size = 8
    max_size = 64
    max_steps = 200
    prompt_hint = "digit 7"

    def __init__(self, cache_dir: str | Path, log=print):
        super().__init__()
        self.models = {"int4": load_tiny_dit_int4(Path(cache_dir), log), "bf16": load_tiny_dit(dtype=torch.bfloat16)}

    def resolve_execution(self, execution: str) -> str:
        return "int4" if execution == "auto" else execution

    def _lora_targets(self):
        return [m.transformer for m in self.models.values()]

    def _draw(self, req, execution, job):
        model = self.models[execution]
        digit = req.digit if req.digit is not None else digit_from_prompt(req.prompt)
        job.start_stage(f"sampling digit {digit} ({execution})", int(req.steps))
        start = time.perf_counter()
        with _StepHook(model, job), _resized(model, int(req.size)):
            images = sample_digits(model, torch.tensor([digit]), steps=int(req.steps), seed=int(req.seed))
        step_ms = 1e3 * (time.perf_counter() - start) / int(req.steps)
        return digits_to_rgb(images), step_ms, module_bytes(model.transformer)


class _resized:
    """Temporarily make a tiny DiT draw ``size x size`` pictures (RoPE positions of the larger patch grid)."""

    def __init__(self, model, size: int):
        self.model, self.size = model, size

    def __enter__(self):
        m = self.model
        self.saved = (m.image_size, m.img_ids)
        if self.size != m.image_size:
            g = self.size // m.patch_size
            rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(g * g, 3).float()
            m.image_size, m.img_ids = self.size, ids.to(m.img_ids.device)
        return m

    def __exit__(self, *exc):
        self.model.image_size, self.model.img_ids = self.saved


class PipelineEngine(ImageEngine):
    """A diffusers pipeline folder (full precision) or a ``quantduo quantize`` output folder (quantized)."""

    executions = EXECUTIONS + ("bf16",)
    default_size = 512
    default_steps = 20
    prompt_hint = "a photo of a cat"

    def __init__(self, model_dir: str | Path, device: str | None = None):
        super().__init__()
        self.dir = Path(model_dir)
        self.name = self.dir.name
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.quantized = self._is_quantized()
        self.pipes: dict[str, object] = {}
        self._pipe(self.resolve_execution("auto"))
        pipe = next(iter(self.pipes.values()))
        self.patch = 2 * int(getattr(pipe, "vae_scale_factor", 8))

    def _is_quantized(self) -> bool:
        return is_quantized_pipeline(self.dir)

    def _load(self, execution: str):
        """The pipeline that runs ``execution`` (already resolved), on the engine's device."""
        return load_pipeline(self.dir, torch.bfloat16, self.device, execution="auto" if execution == "bf16" else execution)

    def resolve_execution(self, execution: str) -> str:
        if execution == "bf16" and self.quantized:
            raise UserError(f"{self.name} is a quantized folder without its full-precision weights: open the base "
                            f"pipeline folder for bf16 images")
        if execution == "auto":
            return "auto" if self.quantized else "bf16"
        if execution != "bf16" and not self.quantized:
            raise UserError(f"{self.name} is not quantized: only 'bf16' runs it (quantize it with `quantduo quantize`)")
        return execution

    def _pipe(self, execution: str):
        """The pipeline of one execution, loaded on first use (only one quantized execution is kept)."""
        if execution not in self.pipes:
            if execution != "bf16":
                for other in [e for e in self.pipes if e != "bf16"]:
                    del self.pipes[other]
            pipe = self._load(execution)
            pipe.set_progress_bar_config(disable=True)
            self._follow_loras(getattr(pipe, "transformer", None) or pipe.unet)
            self.pipes[execution] = pipe
        return self.pipes[execution]

    def _lora_targets(self):
        return [getattr(p, "transformer", None) or p.unet for p in self.pipes.values()]

    def check(self, req):
        super().check(req)
        if not req.prompt.strip():
            raise UserError("the prompt is empty")

    def _draw(self, req, execution, job):
        pipe = self._pipe(execution)
        steps = int(req.steps)
        job.start_stage(f"sampling ({execution})", steps)

        def on_step(p, i, t, kwargs):
            if job.cancel_event.is_set():
                p._interrupt = True
            job.advance()
            return kwargs

        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        out = pipe(prompt=req.prompt, height=int(req.size), width=int(req.size), num_inference_steps=steps,
                   generator=torch.Generator("cpu").manual_seed(int(req.seed)), callback_on_step_end=on_step,
                   output_type="np")
        sync()
        job.check()
        step_ms = 1e3 * (time.perf_counter() - start) / steps
        image = np.round(np.clip(out.images[0], 0, 1) * 255).astype(np.uint8)
        denoiser = getattr(pipe, "transformer", None) or pipe.unet
        return image, step_ms, module_bytes(denoiser)


class PublishedEngine(PipelineEngine):
    """A published SVDQuant checkpoint (Nunchaku single file, its V2 names, or a ``nunchaku_lite`` folder) on its
    base model's local pipeline folder (text encoders, VAE, scheduler): the quantized executions run the checkpoint's
    transformer, ``bf16`` the base pipeline's own (so images compare side by side)."""

    def __init__(self, checkpoint: str | Path, base: str | Path | None, device: str | None = None):
        if base is None:
            raise UserError(f"{Path(checkpoint).name} is a published SVDQuant checkpoint: start the server with "
                            f"--base, the base model's local diffusers pipeline folder")
        self.base = Path(base)
        super().__init__(checkpoint, device)

    def _is_quantized(self) -> bool:
        return True

    def resolve_execution(self, execution: str) -> str:
        return execution

    def _load(self, execution: str):
        if execution == "bf16":
            return load_pipeline(self.base, torch.bfloat16, self.device)
        pipe, _ = load_published_pipeline(self.dir, self.base, torch.bfloat16, self.device)
        if execution != "auto":
            set_execution(pipe.transformer, execution)
        return pipe


class RandomFluxEngine(ImageEngine):
    """Full-size FLUX.1-dev transformer (12 B parameters) with random bf16 weights: times real denoising steps.

    No text encoder and no VAE: the prompt's hash seeds random T5/CLIP-shaped conditioning, and the picture
    shows three latent channels. ``int4`` is SVDQuant W4A4 quantized on the fly, calibrated on one step."""

    name = "a random-weight full-size FLUX.1-dev transformer"
    executions = ("auto", "bf16", "int4")
    patch = 16
    default_size = 1024
    default_steps = 4
    prompt_hint = "anything (random weights)"

    def __init__(self, device: str | None = None, config: dict | None = None, text_tokens: int = 512):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.text_tokens = text_tokens
        torch.manual_seed(0)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built directly in bf16 (no 48 GB float32 copy first)
        try:
            with torch.device(self.device):
                model = FluxTransformer2DModel(**(config or FLUX_DEV))
        finally:
            torch.set_default_dtype(previous)
        self.models = {"bf16": model.eval().requires_grad_(False)}

    def resolve_execution(self, execution: str) -> str:
        return "bf16" if execution == "auto" else execution

    def _lora_targets(self):
        return list(self.models.values())

    def _inputs(self, req: ImageRequest) -> dict:
        model = self.models["bf16"]
        cfg = model.config
        g = torch.Generator().manual_seed(int(hashlib.sha256(req.prompt.encode()).hexdigest()[:12], 16))
        grid = int(req.size) // self.patch
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        bf = dict(device=self.device, dtype=torch.bfloat16)
        return dict(
            encoder_hidden_states=torch.randn(1, self.text_tokens, cfg.joint_attention_dim, generator=g).to(**bf),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(**bf),
            guidance=torch.full((1,), 3.5, **bf) if cfg.guidance_embeds else None,
            img_ids=img_ids.to(**bf), txt_ids=torch.zeros(self.text_tokens, 3, **bf),
        )

    def _quantized(self, job: Job):
        """The SVDQuant W4A4 copy, quantized with the library on first use (calibrated on one 256-token step)."""
        if "int4" not in self.models:
            job.start_stage("quantizing FLUX with SVDQuant (once)", 0)
            model = copy.deepcopy(self.models["bf16"])
            cond = self._inputs(ImageRequest(prompt="calibration", size=256))
            x = torch.randn(1, 256, model.config.in_channels, device=self.device, dtype=torch.bfloat16)
            t = torch.full((1,), 0.5, device=self.device, dtype=torch.bfloat16)
            calibrate = lambda m: m(hidden_states=x, timestep=t, **cond)  # noqa: E731
            config = quantization_config(model, "int4", rank=32, lowrank_iters=2, search_tokens=128)
            quantize_model(model, calibrate, config, progress=False)
            self._follow_loras(model)
            self.models["int4"] = model
        return self.models["int4"]

    def _draw(self, req, execution, job):
        model = self._quantized(job) if execution == "int4" else self.models["bf16"]
        cond = self._inputs(req)
        steps, grid = int(req.steps), int(req.size) // self.patch
        g = torch.Generator().manual_seed(int(req.seed))
        x = torch.randn(1, grid * grid, model.config.in_channels, generator=g).to(self.device, torch.bfloat16)
        job.start_stage(f"sampling ({execution})", steps)
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        ts = torch.linspace(1.0, 0.0, steps + 1)
        with torch.no_grad(), _StepHook(model, job):
            self._step(model, x, ts[0], cond)  # warm-up (not timed), as the first call allocates
            job.done = 0
            sync()
            start = time.perf_counter()
            for i in range(steps):
                v = self._step(model, x, ts[i], cond)
                x = x + float(ts[i + 1] - ts[i]) * v
            sync()
        step_ms = 1e3 * (time.perf_counter() - start) / steps
        return self._picture(x, grid), step_ms, module_bytes(model)

    @staticmethod
    def _step(model, x, t, cond):
        timestep = torch.full((1,), float(t), device=x.device, dtype=x.dtype)
        return model(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]

    @staticmethod
    def _picture(x: torch.Tensor, grid: int) -> np.ndarray:
        """Three latent channels of ``[1, grid*grid, C]`` as a ``grid x grid`` RGB picture, upscaled 16x."""
        rgb = x[0, :, :3].float().reshape(grid, grid, 3).cpu()
        rgb = (rgb - rgb.amin()) / (rgb.amax() - rgb.amin()).clamp(min=1e-6)
        img = np.round(rgb.numpy() * 255).astype(np.uint8)
        return np.kron(img, np.ones((16, 16, 1), dtype=np.uint8))


def engine_class(spec: str) -> type[ImageEngine]:
    """The engine class of a ``--model`` value (without loading it)."""
    named = {TINY_DIT: TinyDitEngine, RANDOM_FLUX: RandomFluxEngine}
    if spec in named:
        return named[spec]
    return PublishedEngine if Path(spec).exists() and is_published(spec) else PipelineEngine


def make_image_engine(spec: str, cache_dir: str | Path, log=print, base: str | Path | None = None) -> ImageEngine:
    """``tiny-dit`` | ``random-flux`` | a local pipeline folder | a published SVDQuant checkpoint (on the pipeline
    folder ``base``) -> its engine."""
    cls = engine_class(spec)
    if cls is TinyDitEngine:
        return TinyDitEngine(cache_dir, log)
    if cls is RandomFluxEngine:
        return RandomFluxEngine()
    if cls is PublishedEngine:
        return PublishedEngine(spec, base)
    if not Path(spec).is_dir():
        raise UserError(f"{spec} is not a folder (give a diffusers pipeline folder, a published SVDQuant checkpoint, "
                        f"'{TINY_DIT}' or '{RANDOM_FLUX}')")
    return PipelineEngine(spec)


# ---------------------------------------------------------------------------------------------------------------
# long context
# ---------------------------------------------------------------------------------------------------------------
def read_text_upload(path: str | Path, limit: int = MAX_UPLOAD_BYTES) -> str:
    """The text of an uploaded file; :class:`UserError` for files over ``limit`` bytes or that are not text."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise UserError(f"{path.name} is {size / 2**20:.1f} MB: the limit is {limit / 2**20:.0f} MB")
    data = path.read_bytes()
    if b"\x00" in data[:1 << 20]:
        raise UserError(f"{path.name} is not a text file (it holds binary data)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path.name} is not UTF-8 text (byte {err.start} cannot be decoded)") from None


@dataclass
class Codec:
    """Tokenizer of the LM: ``encode`` adds no special tokens; ``prompt`` joins document and question."""

    encode: object
    decode: object
    bos_id: int | None
    eos_id: int | None
    join: str = "\n\nQuestion: {question}\nAnswer:"


PASSKEY = PasskeyFormat()  # the passkey task the tiny LM was trained on


def tiny_lm_example(n_words: int = 420, seed: int = 0) -> tuple[str, str, str]:
    """(document, question, expected answer) for the tiny LM: Markov filler with one passkey sentence far back."""
    words = tiny_lm.haystack_text(n_words, seed).split()
    rng = np.random.default_rng(seed)
    value = " ".join(rng.choice(list(PASSKEY.value_words), size=PASSKEY.value_len))
    name = PASSKEY.names[int(rng.integers(len(PASSKEY.names)))]
    sentence = PASSKEY.insert.format(name=name, value=value).split()
    cut = n_words // 4
    text = " ".join(words[:cut] + sentence + words[cut:])
    return text, PASSKEY.question.format(name=name), PASSKEY.answer.format(value=value)


class LongContextEngine:
    """A causal LM with a DuoAttention pattern; :meth:`answer` runs DuoAttention and full attention."""

    def __init__(self, model_dir: str | None = None, pattern_dir: str | None = None, sparsity: float = 0.5,
                 device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.name = TINY_LM if model_dir is None else Path(model_dir).name
        self.model, self.codec = self._load(model_dir)
        self.pattern = load_pattern(pattern_dir or tiny_lm.ASSET_DIR / "duo_pattern")
        try:
            self.pattern.validate_for(self.model.config)
        except ValueError as err:
            raise UserError(f"the head pattern does not fit {self.name}: {err}") from None
        self.retrieval = self.pattern.binarize(sparsity)
        apply_pattern(self.model, self.pattern, sparsity)
        self.max_tokens = int(getattr(self.model.config, "max_position_embeddings", 1 << 20))
        self.chunk = 128 if self.name == TINY_LM else 4096
        self._warm_up()

    def _warm_up(self) -> None:
        """One short run of each mode, so that one-time set-up costs stay out of the first measured answer."""
        ids = [self.codec.bos_id or 0] * min(self.max_tokens // 2, 2 * self.chunk + 8)  # several chunks
        for full in (False, True):
            self._generate(ids, 2, full, Job("warm-up"))

    def _load(self, model_dir):
        if model_dir is None or Path(model_dir).resolve() == tiny_lm.ASSET_DIR.resolve():
            model = tiny_lm.load(self.device)
            return model, Codec(tiny_lm.encode, tiny_lm.decode, tiny_lm.BOS_ID, None, join=" {question}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a transformers model folder (no config.json)")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     attn_implementation="sdpa").to(self.device).eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return model, Codec(lambda s: tok(s, add_special_tokens=False)["input_ids"], tok.decode, tok.bos_token_id,
                            tok.eos_token_id)

    def prompt_ids(self, document: str, question: str) -> list[int]:
        """Token ids of document + question; :class:`UserError` when empty, unknown words or too long."""
        if not document.strip():
            raise UserError("the document is empty: paste text or upload a text file")
        if not question.strip():
            raise UserError("the question is empty")
        text = " ".join(document.split()) + self.codec.join.format(question=question.strip())
        try:
            ids = self.codec.encode(text)
        except KeyError as err:
            raise UserError(f"{err.args[0]} (the tiny LM reads only its synthetic words: use 'Example')") from None
        ids = ([] if self.codec.bos_id is None else [self.codec.bos_id]) + list(ids)
        if len(ids) > self.max_tokens - 64:
            raise UserError(f"the document is {len(ids):,} tokens: {self.name} reads at most {self.max_tokens - 64:,}")
        return ids

    def answer(self, document: str, question: str, max_new_tokens: int, job: Job) -> dict:
        """``{"duo"|"full": {answer, ttft_s, tokens_per_s, kv_bytes, new_tokens}, "prompt_tokens": N}``."""
        ids = self.prompt_ids(document, question)
        if not 1 <= int(max_new_tokens) <= 512:
            raise UserError(f"new tokens must be between 1 and 512, got {max_new_tokens}")
        result = {"prompt_tokens": len(ids)}
        for mode in ("duo", "full"):
            result[mode] = self._generate(ids, int(max_new_tokens), mode == "full", job)
        return result

    @torch.no_grad()
    def _generate(self, ids: list[int], max_new: int, full: bool, job: Job) -> dict:
        """Chunked prefill into a static DuoCache (every head full when ``full``), then greedy decoding."""
        name = "full attention" if full else "DuoAttention"
        cache = DuoCache.from_model(self.model, max_cache_len=len(ids) + max_new + 2, static=True, all_full=full)
        prompt = torch.tensor([ids], device=self.device)
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        job.start_stage(f"{name}: prefill of {len(ids):,} tokens (chunks)", -(-len(ids) // self.chunk))
        start = time.perf_counter()
        with _StepHook(self.model.model, job):
            logits = chunked_prefill(self.model, prompt, cache, self.chunk)
        token = int(logits.argmax(-1))
        sync()
        ttft = time.perf_counter() - start
        job.start_stage(f"{name}: decoding", max_new)
        step = GraphedDecoder(self.model, cache, len(ids))
        new, start = [token], time.perf_counter()
        job.advance()
        while len(new) < max_new and token != self.codec.eos_id:
            token = int(step(torch.tensor([[token]], device=self.device)).argmax(-1))
            new.append(token)
            job.advance()
        sync()
        decode_s = time.perf_counter() - start
        return {"answer": self.codec.decode(new), "ttft_s": ttft, "new_tokens": len(new),
                "tokens_per_s": (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else float("nan"),
                "kv_bytes": cache.memory_bytes()}
