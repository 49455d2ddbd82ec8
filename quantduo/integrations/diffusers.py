"""SVDQuant for diffusers pipelines: per-model rules, calibration capture, quantize / save / load.

Supported denoisers (class name -> rules in :data:`MODEL_RULES`): ``FluxTransformer2DModel``,
``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` and SDXL's ``UNet2DConditionModel``. Rules follow the
SVDQuant reference: embedders and the final norm / projection stay in 16 bits, adaLN modulation linears
(and the UNet's ``time_emb_proj``) are W4A16, everything else is W4A4 with a 16-bit low-rank branch. Layers
called on the same input (q/k/v, FLUX single-block q/k/v + ``proj_mlp``) share smoothing and the low-rank
down-projection: :func:`quantduo.svdquant.quantize_model` detects them during calibration.

Typical use::

    samples = capture_calibration_inputs(pipe, prompts, num_samples=64, num_inference_steps=20)
    report = quantize_transformer(pipe.transformer, samples, quantization_config(pipe.transformer))
    save_quantized_transformer(pipe.transformer, "out/flux-int4", config)
    ...
    load_into_pipeline(pipe, "out/flux-int4")
"""
from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from quantduo.kernels import is_w4a4
from quantduo.svdquant import CheckpointError, QuantizationReport, SVDQuantConfig, load_quantized, quantize_model
from quantduo.svdquant import SVDQuantLinear, save_quantized
from quantduo.svdquant.fp8_execution import SVDQuantFP8Linear, to_fp8_execution
from quantduo.svdquant.linear import LowRankQuantLinear
from quantduo.svdquant.serialization import read_checkpoint_meta, replace_linears
from quantduo.utils import atomic_write

DENOISER_ATTRS = ("transformer", "unet")


@dataclass(frozen=True)
class ModelRules:
    """Glob rules (over module names of the denoiser) handed to :class:`SVDQuantConfig`."""

    skip: list[str]
    weight_only: list[str]
    unsigned_act: list[str] = field(default_factory=lambda: ["auto"])


_DIT_SKIP = ["x_embedder", "context_embedder", "pos_embed.*", "time_text_embed.*", "norm_out.*", "proj_out"]
_DIT_MODULATION = ["*.norm1.linear", "*.norm1_context.linear", "*.norm.linear"]
_GELU_DOWN = ["auto", "*.ff.net.2", "*.ff_context.net.2"]

MODEL_RULES: dict[str, ModelRules] = {
    "FluxTransformer2DModel": ModelRules(_DIT_SKIP, _DIT_MODULATION, _GELU_DOWN),
    "SD3Transformer2DModel": ModelRules(_DIT_SKIP, _DIT_MODULATION, _GELU_DOWN),
    "PixArtTransformer2DModel": ModelRules(
        ["pos_embed.*", "adaln_single.emb.*", "caption_projection.*", "proj_out"], ["adaln_single.linear"],
        ["auto", "*.ff.net.2"],
    ),
    # SDXL feed-forwards are GEGLU (signed inputs to ff.net.2): leave unsigned detection to calibration
    "UNet2DConditionModel": ModelRules(["time_embedding.*", "add_embedding.*"], ["*.time_emb_proj"]),
}

# CLI / API format names -> SVDQuantConfig fields. Hopper has no 4-bit tensor cores: above 64 tokens "int4" runs
# its dequantized operands through cuBLAS, "w4a16" (16-bit activations: the weight-only baseline) and
# "svdq-w4a16" (the same with SVDQuant's smoothing and low-rank branch) their reconstructed weight
# (quantduo/kernels/__init__.py).
FORMATS: dict[str, dict[str, Any]] = {
    "int4": dict(weight_format="int4", act_format="int4"),
    "nvfp4": dict(weight_format="nvfp4", act_format="nvfp4"),
    "w4a16": dict(weight_format="int4", act_format="none"),
    "svdq-w4a16": dict(weight_format="int4", act_format="none", w4a16_svdquant=True),
}


def rules_for(model: nn.Module) -> ModelRules:
    """The :class:`ModelRules` of ``model``'s class; ``ValueError`` for an unsupported class."""
    name = type(model).__name__
    if name not in MODEL_RULES:
        raise ValueError(f"unsupported model class {name!r}; SVDQuant rules exist for {sorted(MODEL_RULES)}")
    return MODEL_RULES[name]


def quantization_config(model: nn.Module, fmt: str = "int4", **overrides: Any) -> SVDQuantConfig:
    """An :class:`SVDQuantConfig` with ``model``'s skip / W4A16 / unsigned rules and format ``fmt``.

    ``overrides``: any other :class:`SVDQuantConfig` field (``rank``, ``search_tokens``, ``dtype``, ...).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    rules = rules_for(model)
    fields = dict(skip=list(rules.skip), weight_only=list(rules.weight_only), unsigned_act=list(rules.unsigned_act))
    fields.update(FORMATS[fmt])
    fields.update(overrides)
    return SVDQuantConfig(**fields)


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """``("transformer", pipe.transformer)`` or ``("unet", pipe.unet)``."""
    for attr in DENOISER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return attr, module
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet component to quantize")


# ---------------------------------------------------------------------------------------------
# calibration capture
# ---------------------------------------------------------------------------------------------
def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples / lists / dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class CalibrationSample:
    """One captured denoiser call: positional and keyword arguments (tensors detached, on the CPU)."""

    args: tuple
    kwargs: dict
    prompt_index: int
    step: int

    def to(self, device: torch.device) -> tuple[tuple, dict]:
        move = lambda t: t.to(device)  # noqa: E731
        return _map_tensors(self.args, move), _map_tensors(self.kwargs, move)


class _StepSampler:
    """Forward pre-hook that keeps a uniform random subset (bottom-k priorities) of all denoiser calls."""

    def __init__(self, num_samples: int, generator: torch.Generator):
        self.num_samples, self.generator = num_samples, generator
        self.heap: list[tuple[float, int, CalibrationSample]] = []  # max-heap on priority via negation
        self.prompt_index, self.step, self.calls = 0, 0, 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        priority = float(torch.rand((), generator=self.generator))
        self.calls += 1
        step = self.step
        self.step += 1
        if len(self.heap) >= self.num_samples and priority >= -self.heap[0][0]:
            return
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        sample = CalibrationSample(_map_tensors(args, cpu), _map_tensors(kwargs, cpu), self.prompt_index, step)
        heapq.heappush(self.heap, (-priority, self.calls, sample))
        if len(self.heap) > self.num_samples:
            heapq.heappop(self.heap)

    def samples(self) -> list[CalibrationSample]:
        return sorted((s for _, _, s in self.heap), key=lambda s: (s.prompt_index, s.step))


def capture_calibration_inputs(
    pipe: Any,
    prompts: Iterable[str],
    num_samples: int = 128,
    num_inference_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> list[CalibrationSample]:
    """Run ``pipe`` over ``prompts`` and capture the denoiser's inputs at every denoising step.

    A uniform random subset of ``num_samples`` (prompt, step) calls is kept (seeded), stored on the CPU.
    ``pipe_kwargs`` go to the pipeline call (``height``, ``width``, ``guidance_scale``, ...); the output is
    requested as latents so the VAE never runs.
    """
    prompts = list(prompts)
    if not prompts or num_samples <= 0:
        raise ValueError("calibration needs at least one prompt and num_samples > 0")
    _, denoiser = denoiser_of(pipe)
    sampler = _StepSampler(num_samples, torch.Generator().manual_seed(seed))
    handle = denoiser.register_forward_pre_hook(sampler, with_kwargs=True)
    try:
        for i, prompt in enumerate(tqdm(prompts, desc="calibration prompts", disable=not progress)):
            sampler.prompt_index, sampler.step = i, 0
            pipe(
                prompt, num_inference_steps=num_inference_steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed + i), **pipe_kwargs,
            )
    finally:
        handle.remove()
    if sampler.calls == 0:
        raise RuntimeError(f"the pipeline never called its denoiser {type(denoiser).__name__}")
    return sampler.samples()


def replay_fn(samples: list[CalibrationSample], progress: bool = True):
    """A ``calib_fn(model)`` for :func:`quantize_model` that re-runs the captured calls on ``model``."""

    def calib_fn(model: nn.Module) -> None:
        device = next(model.parameters()).device
        for sample in tqdm(samples, desc="calibration replay", disable=not progress):
            args, kwargs = sample.to(device)
            model(*args, **kwargs)

    return calib_fn


def quantize_transformer(
    model: nn.Module,
    samples: list[CalibrationSample],
    config: SVDQuantConfig | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """SVDQuant ``model`` (a supported diffusers denoiser) in place on captured calibration ``samples``.

    ``config`` defaults to :func:`quantization_config` (INT4, rank 32) of the model's class.
    """
    if not samples:
        raise ValueError("no calibration samples: run capture_calibration_inputs first")
    config = config or quantization_config(model)
    rules_for(model)  # clear error for unsupported classes even with an explicit config
    return quantize_model(model, replay_fn(samples, progress), config, progress=progress)


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def save_quantized_transformer(
    model: nn.Module, directory: str | Path, config: SVDQuantConfig, report: QuantizationReport | None = None
) -> Path:
    """Save a quantized denoiser: ``model.safetensors`` + ``quantduo_config.json`` (with the diffusers class and
    its config, so :func:`load_quantized_transformer` can rebuild it) and, if given, ``report.json``."""
    rules_for(model)
    extra = dict(model_class=type(model).__name__, model_config=json.loads(json.dumps(dict(model.config), default=list)))
    directory = save_quantized(model, directory, config, extra=extra)
    if report is not None:
        atomic_write(directory / "report.json", lambda tmp: Path(tmp).write_text(report.to_json()))
    return directory


def _empty_skeleton(model_class: str, model_config: dict) -> nn.Module:
    """Instantiate a diffusers model class with parameters on the meta device (buffers stay real)."""
    import diffusers
    from accelerate import init_empty_weights

    if model_class not in MODEL_RULES or not hasattr(diffusers, model_class):
        raise CheckpointError(f"checkpoint names unsupported model class {model_class!r}")
    cls = getattr(diffusers, model_class)
    with init_empty_weights():
        return cls.from_config(model_config)


def _materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give every meta parameter / buffer real (uninitialised) storage on ``device``; the checkpoint fills them."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module.register_parameter(name, nn.Parameter(torch.empty_like(param, device=device), requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                module.register_buffer(name, torch.empty_like(buf, device=device))


def load_quantized_transformer(directory: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a quantized denoiser saved by :func:`save_quantized_transformer` without materialising its
    full-precision weights first. Raises :class:`CheckpointError` for missing / corrupt / foreign checkpoints."""
    meta = read_checkpoint_meta(directory)
    extra = meta.get("extra", {})
    if "model_class" not in extra or "model_config" not in extra:
        raise CheckpointError(f"{directory} holds no diffusers model class/config (not saved by save_quantized_transformer)")
    model = _empty_skeleton(extra["model_class"], extra["model_config"])
    replace_linears(model, meta["layers"], SVDQuantConfig.from_dict(meta["config"]).torch_dtype)
    _materialize(model, device)
    load_quantized(model, directory)
    return model.eval().requires_grad_(False)


def load_into_pipeline(pipe: Any, directory: str | Path) -> nn.Module:
    """Put the quantized denoiser stored in ``directory`` into ``pipe`` (replacing ``transformer`` / ``unet``).

    If the pipeline already holds a denoiser it is checked against the checkpoint's class and config. Returns
    the new module (on the device of the old one, or the CPU).
    """
    meta = read_checkpoint_meta(directory)
    model_class = meta.get("extra", {}).get("model_class")
    attr = "unet" if model_class == "UNet2DConditionModel" else "transformer"
    current = getattr(pipe, attr, None)
    device = "cpu"
    if isinstance(current, nn.Module):
        if type(current).__name__ != model_class:
            raise CheckpointError(f"checkpoint holds a {model_class}, the pipeline's {attr} is a {type(current).__name__}")
        device = next(current.parameters()).device
    model = load_quantized_transformer(directory, device)
    pipe.register_modules(**{attr: model})
    return model


def cast_denoiser(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Set a (quantized) denoiser's compute dtype in place: floating-point parameters and buffers of its unquantized
    modules, and the compute-dtype buffers of its quantized layers
    (:meth:`~quantduo.svdquant.linear.LowRankQuantLinear.to_compute_dtype`: packed codes and fp8 / float32 scales
    keep theirs). Returns ``model``."""
    for module in model.modules():
        if isinstance(module, LowRankQuantLinear):  # a leaf
            module.to_compute_dtype(dtype)
        else:
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and buf.dtype.itemsize > 1:  # not fp8
                    module._buffers[name] = buf.to(dtype)
    return model


# ---------------------------------------------------------------------------------------------
# inference-time fusion
# ---------------------------------------------------------------------------------------------
class FusedGeluMLP(nn.Module):
    """A diffusers ``FeedForward`` (``net = [GELU(tanh) with proj, Dropout, Linear]``) with SVDQuant linears, the
    GELU fused: W4A4 on CUDA, fc1's GEMM epilogue applies it and quantizes for fc2
    (:func:`quantduo.kernels.svdquant_mlp_forward`); an fc2 in FP8 execution applies it inside its activation
    quantization (:meth:`~quantduo.svdquant.fp8_execution.SVDQuantFP8Linear.forward_gelu`). Keeps ``net`` so
    state-dict keys and LoRA targets are unchanged. Input / output ``[..., dim]``.
    """

    def __init__(self, feed_forward: nn.Module):
        super().__init__()
        self.net = feed_forward.net

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fc1, fc2 = self.net[0].proj, self.net[-1]
        if isinstance(fc2, SVDQuantFP8Linear):
            return fc2.forward_gelu(fc1(hidden_states))
        if hidden_states.is_cuda:
            from quantduo.kernels import svdquant_mlp_forward

            return svdquant_mlp_forward(fc1, fc2, hidden_states)
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


def _fusable_feed_forward(module: nn.Module) -> bool:
    net = getattr(module, "net", None)
    if type(module).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) != 3:
        return False
    act, fc2 = net[0], net[2]
    if getattr(act, "approximate", None) != "tanh" or not isinstance(getattr(act, "proj", None), SVDQuantLinear):
        return False
    return isinstance(fc2, SVDQuantFP8Linear) or (isinstance(fc2, SVDQuantLinear) and is_w4a4(act.proj)
                                                    and is_w4a4(fc2))


class FusedFluxSingleBlock(nn.Module):
    """A diffusers ``FluxSingleTransformerBlock`` whose ``proj_out`` runs FP8 execution: the MLP branch's GELU and
    its concatenation with the attention output happen inside proj_out's activation quantization
    (:meth:`~quantduo.svdquant.fp8_execution.SVDQuantFP8Linear.forward_gelu`), so the ``[tokens, 15360]`` 16-bit
    input is never written. Same submodules (state-dict keys, LoRA targets) and the same call as the block:
    ``(hidden_states [B, S_img, dim], encoder_hidden_states [B, S_txt, dim], temb [B, dim])`` ->
    ``(encoder_hidden_states, hidden_states)``.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.mlp_hidden_dim = block.mlp_hidden_dim
        for name, child in block.named_children():  # norm, proj_mlp, act_mlp, proj_out, attn, in the block's order
            self.add_module(name, child)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb=None, joint_attention_kwargs: dict | None = None):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        mlp_pre_activation = self.proj_mlp(norm_hidden_states)
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out.forward_gelu(mlp_pre_activation, attn_output)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _fusable_flux_single_block(module: nn.Module) -> bool:
    return (type(module).__name__ == "FluxSingleTransformerBlock"
            and getattr(getattr(module, "act_mlp", None), "approximate", None) == "tanh"
            and isinstance(getattr(module, "proj_out", None), SVDQuantFP8Linear))


FUSIONS = ((_fusable_feed_forward, FusedGeluMLP), (_fusable_flux_single_block, FusedFluxSingleBlock))


def enable_fusions(model: nn.Module) -> dict[str, nn.Module]:
    """Replace, in place, every GELU(tanh) ``FeedForward`` whose linears are W4A4 (or whose fc2 runs FP8 execution)
    by :class:`FusedGeluMLP`, and every FLUX single block whose ``proj_out`` runs FP8 execution by
    :class:`FusedFluxSingleBlock`.

    Returns ``{name: original module}`` so the change can be undone with ``model.set_submodule``.
    """
    originals = {}
    for name, module in list(model.named_modules()):
        if any(name.startswith(done + ".") for done in originals):
            continue
        fused = next((fused for fusable, fused in FUSIONS if fusable(module)), None)
        if fused is not None:
            originals[name] = module
            model.set_submodule(name, fused(module))
    return originals


def convert_to_w4a8(model: nn.Module, act_format: str = "int8") -> int:
    """Convert every W4A4 :class:`SVDQuantLinear` of ``model`` to a Hopper W4A8 format in place
    (:func:`quantduo.svdquant.hopper_formats.to_w4a8` with ``act_format`` ``"int8"`` or ``"fp8"``, re-quantizing
    the stored 4-bit residual); W4A16 layers stay. Returns the number of converted layers."""
    from quantduo.svdquant.hopper_formats import to_w4a8

    return _convert_w4a4_layers(model, lambda module: to_w4a8(module, act_format=act_format))


def convert_to_w4a16(model: nn.Module) -> int:
    """Run every W4A4 :class:`SVDQuantLinear` of ``model`` with 16-bit activations, in place
    (:func:`quantduo.svdquant.hopper_formats.to_w4a16`: same stored weights, no activation quantizer). On Hopper
    (no 4-bit tensor cores) this makes an INT4 checkpoint faster and more accurate. Returns the number of
    converted layers."""
    from quantduo.svdquant.hopper_formats import to_w4a16

    return _convert_w4a4_layers(model, to_w4a16)


def convert_to_fp8(model: nn.Module, fuse: bool = True, fast_accum: bool = True) -> int:
    """Run every INT4 :class:`SVDQuantLinear` of ``model`` (W4A4, W4A16, ``svdq-w4a16``) by FP8 execution, in place
    (:func:`quantduo.svdquant.fp8_execution.to_fp8_execution`: the same stored weights, per-token fp8 activations
    and the layer weight reconstructed into fp8 per call; Hopper's fp8 tensor cores; ``fast_accum`` as there);
    ``fuse``: then :func:`enable_fusions` (GELU and concatenation inside the activation quantization). Returns
    the number of converted layers."""
    converted = _convert_layers(model, lambda m: to_fp8_execution(m, fast_accum),
                                lambda m: m.weight_format == "int4" and not isinstance(m, SVDQuantFP8Linear))
    if fuse:
        enable_fusions(model)
    return converted


def _convert_w4a4_layers(model: nn.Module, convert) -> int:
    """Replace every W4A4 :class:`SVDQuantLinear` of ``model`` by ``convert(module)``; the number replaced."""
    return _convert_layers(model, convert, lambda m: m.act_format != "none")


def _convert_layers(model: nn.Module, convert, select) -> int:
    """Replace every :class:`SVDQuantLinear` ``m`` of ``model`` with ``select(m)`` by ``convert(m)``; the number
    replaced."""
    names = [n for n, m in model.named_modules() if isinstance(m, SVDQuantLinear) and select(m)]
    for name in names:
        model.set_submodule(name, convert(model.get_submodule(name)))
    return len(names)
