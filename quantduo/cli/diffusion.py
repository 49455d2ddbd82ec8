"""``quantduo quantize``, ``quantduo generate`` and ``quantduo example-pipeline``: SVDQuant a local diffusers
pipeline, sample from it, and write a tiny pipeline to try both on.

    quantduo example-pipeline PIPELINE_DIR
    quantduo quantize --model PIPELINE_DIR --format int4 --out OUT_DIR [--rank R] [--prompts FILE]
    quantduo generate --model OUT_DIR --prompt "a cat" --out cat.png
    quantduo generate --model svdq-int4_r32-flux.1-dev.safetensors --base FLUX.1-dev/ --prompt "a cat" --out cat.png [--execution auto|reference|exact|a16|fp8]

``OUT_DIR`` is a complete diffusers pipeline folder (every component saved; the denoiser's ``config.json`` carries
quantduo's ``quantization_config``; ``quantduo_manifest.json`` the SHA-256 of every file and the command that made
it), so it loads with ``DiffusionPipeline.from_pretrained`` once quantduo is imported and does not refer to
``PIPELINE_DIR``. Formats and executions: :mod:`quantduo.formats.registry`. Every argument is checked against the
pipeline's configs before anything is loaded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import diffusers
import torch

from quantduo.cli.validate import (MAX_SEED, bad, device, float_in, int_in, output_file, output_folder,
                                   pipeline_folder, read_text_file)
from quantduo.formats.registry import EXECUTIONS, executions_for, format_names
from quantduo.kernels.attention_fa3 import FA3_AVAILABLE
from quantduo.integrations.cuda_graph import enable_cuda_graph
from quantduo.integrations.diffusers import (capture_calibration_inputs, denoiser_of, denoiser_offloaded,
                                             denoiser_safetensors, denoiser_skeleton, load_pipeline,
                                             load_pipeline_lazily, mark_quantized, quantduo_config_for,
                                             quantization_config,
                                             quantize_transformer, quantize_transformer_blockwise, save_pipeline)
from quantduo.integrations.fp8_attention import BACKENDS as FP8_ATTENTION_BACKENDS
from quantduo.integrations.fp8_attention import enable_fp8_attention
from quantduo.integrations.published import (CALIBRATION_FOR_LAYOUT, EXPORT_LAYOUTS, FLUX_CLASS, is_published,
                                             load_published_pipeline)
from quantduo.models.tiny_flux import tiny_flux_pipeline
from quantduo.svdquant import max_rank, set_execution
from quantduo.svdquant.blockwise import ACTIVATIONS
from quantduo.utils import DTYPES, atomic_write

DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a wooden table", "a red double-decker bus driving down a city street",
    "a bowl of fruit with apples and bananas", "a man riding a surfboard on a large wave",
    "a snowy mountain landscape at sunrise", "two dogs playing with a frisbee in a park",
    "a plate of pasta with tomato sauce and basil", "an old lighthouse on a rocky coast at night",
)
DEFAULT_RANK = 32
MAX_SIDE = 4096


def _pipe_kwargs(args) -> dict:
    """The pipeline-call options the user gave (the pipeline's own defaults otherwise)."""
    names = {"height": "height", "width": "width", "guidance": "guidance_scale",
             "max_sequence_length": "max_sequence_length"}
    return {key: getattr(args, name) for name, key in names.items() if getattr(args, name) is not None}


def _check_pipeline_args(args) -> tuple[str, dict]:
    """Checks shared by quantize and generate against the pipeline folder's configs; returns (denoiser component,
    its config)."""
    attr, config = pipeline_folder(args.model)
    model = Path(args.model)
    vae = _json_or_empty(model / "vae" / "config.json")
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    factor *= max(config.get("patch_size") or 1, 2 if config.get("_class_name", "").startswith("Flux") else 1)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value % factor or not factor <= value <= MAX_SIDE):
            raise bad(f"--{name}", f"{value} is not valid for this pipeline (valid: a multiple of {factor} from "
                                   f"{factor} to {MAX_SIDE}: the VAE and the denoiser's patches divide it by {factor})")
    if args.max_sequence_length is not None:
        limit = _json_or_empty(model / "tokenizer_2" / "tokenizer_config.json").get("model_max_length")
        if not isinstance(limit, int):
            raise bad("--max-sequence-length", "applies only to pipelines with a second (T5) text encoder")
        if args.max_sequence_length > min(limit, 512):
            raise bad("--max-sequence-length", f"{args.max_sequence_length} is out of range (valid: 1 to "
                                               f"{min(limit, 512)}, the T5 tokenizer's limit)")
    return attr, config


def _json_or_empty(path: Path) -> dict:
    """A component's JSON config, or {} where the pipeline has no such file (then no check depends on it)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _calibration_prompts(args) -> list[str]:
    """--prompts file lines, else --prompt values, else the built-in captions (empty files and prompts rejected)."""
    if args.prompts is not None and args.prompt:
        raise bad("--prompts", "give either --prompts or --prompt, not both")
    if args.prompts is not None:
        return [line for line in read_text_file(args.prompts, "--prompts").splitlines() if line.strip()]
    if any(not prompt.strip() for prompt in args.prompt or ()):
        raise bad("--prompt", "a calibration prompt is empty; give some text")
    return list(args.prompt or DEFAULT_PROMPTS)


def _rank(args, attr: str, config: dict) -> int:
    """--rank checked against the format and the denoiser's layer shapes (read from its config on the meta device);
    by default 32, or the smallest quantized layer's size where that is less, and 0 for formats without a low-rank
    branch."""
    skeleton = denoiser_skeleton(config, Path(args.model) / attr / "config.json")
    limit = max_rank(skeleton, quantization_config(skeleton, args.format))
    if args.rank is None:
        return min(DEFAULT_RANK, limit)
    if args.rank > limit:
        valid = "0" if limit == 0 else f"0 to {limit}, the smallest dimension of a layer that gets a low-rank branch"
        raise bad("--rank", f"{args.rank} is out of range for format {args.format} (valid: {valid})")
    return args.rank


def _calibration_samples(args, pipe, prompts: list[str]) -> list:
    """Capture the denoiser's calibration calls; with ``--blockwise`` they are kept in ``--work-dir`` (written
    atomically) and a ``--resume`` run reads them back instead of running the pipeline again."""
    path = Path(args.work_dir) / "samples.pt" if args.blockwise else None
    if path is not None and args.resume and path.is_file():
        return torch.load(path, weights_only=False)
    samples = capture_calibration_inputs(
        pipe, prompts, num_samples=args.calib_samples, num_inference_steps=args.calib_steps, seed=args.seed,
        **_pipe_kwargs(args),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(samples, tmp))
    return samples


def cmd_quantize(args) -> int:
    """Check every argument, load the pipeline, calibrate, quantize the denoiser, save the folder atomically."""
    attr, config = _check_pipeline_args(args)
    if "quantization_config" in config:
        raise bad("--model", f"{args.model} is already quantized (format "
                             f"{config['quantization_config'].get('format')!r}); give the full-precision pipeline")
    rank = _rank(args, attr, config)
    prompts = _calibration_prompts(args)
    out = output_folder(args.out, "--out", inputs=[args.model])
    # --blockwise: the pipeline stays on the CPU with its denoiser's weights on disk (safetensors; other formats are
    # loaded into host memory); the device holds the other models and one block at a time
    weights = None
    if args.blockwise and denoiser_safetensors(args.model):
        pipe, weights = load_pipeline_lazily(args.model, _dtype(args))
    else:
        pipe = load_pipeline(args.model, _dtype(args), "cpu" if args.blockwise else args.device)
    _, denoiser = denoiser_of(pipe)
    with denoiser_offloaded(pipe, args.device, weights) if args.blockwise else contextlib.nullcontext():
        samples = _calibration_samples(args, pipe, prompts)
    qconfig = quantization_config(denoiser, args.format, rank=rank, search_tokens=args.search_tokens,
                                  dtype=args.dtype if args.dtype not in (None, "float32") else "bfloat16",
                                  **CALIBRATION_FOR_LAYOUT[args.for_layout])
    if args.blockwise:
        report = quantize_transformer_blockwise(denoiser, samples, args.work_dir, qconfig, resume=args.resume,
                                                sequential=args.sequential, activations=args.activations,
                                                device=args.device, weights=weights)
    else:
        report = quantize_transformer(denoiser, samples, qconfig)
    mark_quantized(denoiser, quantduo_config_for(qconfig))
    save_pipeline(pipe, out, extra_files={"report.json": report.to_json()}, made_by={"command": args.command_line})
    print(report.summary())
    print(f"quantized {len(report.quantized())} layers, kept {len(report.skipped())} in full precision -> {out}")
    return 0


def _check_execution(args, config: dict) -> None:
    """--execution / --fp8 / --a16 must be able to run the checkpoint's layers; --cuda-graph needs a GPU."""
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise bad("--cuda-graph", "needs a CUDA device (valid with --device cuda); leave it out on the CPU")
    if args.execution == "auto":
        return
    layers = (config.get("quantization_config") or {}).get("layers") or {}
    if not layers:
        raise bad("--execution", f"{args.execution} applies to quantized pipelines only; {args.model} is not "
                                 f"quantized (valid: auto)")
    able = {e for spec in layers.values() if isinstance(spec, dict)
            for e in executions_for(spec.get("weight_format", "int4"), spec.get("act_format", "int4"))}
    if args.execution not in able:
        fmt = config["quantization_config"].get("format")
        raise bad("--execution", f"{args.execution} cannot run this checkpoint's format {fmt!r} (valid: "
                                 f"{', '.join(e for e in EXECUTIONS if e in able)})")


def _check_fp8_attention(args) -> None:
    """--fp8-attention fa3 on a GPU needs FlashAttention-3 installed."""
    if args.fp8_attention == "fa3" and args.device.startswith("cuda") and not FA3_AVAILABLE:
        raise bad("--fp8-attention", "fa3 needs FlashAttention-3 (flash_attn_3), which is not importable: build it "
                                     "with scripts/build_fa3.sh (docs/fa3.md), or use --fp8-attention triton")


def _dtype(args) -> torch.dtype:
    """--dtype, bfloat16 where not given (a published checkpoint's own default is the loader's: --dtype passed as
    given)."""
    return DTYPES[args.dtype or "bfloat16"]


def _check_published_args(args) -> None:
    """generate from a published SVDQuant checkpoint: --base must be a pipeline folder, --cuda-graph needs a GPU."""
    if args.base is None:
        raise bad("--base", f"{args.model} is a published SVDQuant checkpoint: give the base model's local diffusers "
                            f"pipeline folder for its text encoders, VAE and scheduler")
    pipeline_folder(args.base, "--base")
    if args.cuda_graph and not args.device.startswith("cuda"):
        raise bad("--cuda-graph", "needs a CUDA device (valid with --device cuda); leave it out on the CPU")


def _published_pipeline(args):
    """The base pipeline with the published checkpoint's transformer, run by ``--execution``."""
    pipe, report = load_published_pipeline(args.model, args.base, DTYPES.get(args.dtype), args.device)
    print(report.summary())
    if args.execution != "auto":
        set_execution(pipe.transformer, args.execution)
    return pipe


def _check_compile(args, denoiser_class: str) -> None:
    """``--compile blocks`` needs a denoiser class that names its repeated blocks (diffusers' ``_repeated_blocks``),
    checked from its config's class name before anything loads."""
    if args.compile == "blocks" and not getattr(getattr(diffusers, denoiser_class, None), "_repeated_blocks", None):
        raise bad("--compile", f"blocks: {denoiser_class} names no repeated blocks (diffusers' _repeated_blocks); "
                  "use --compile whole")


def _compile_blocks(denoiser: torch.nn.Module) -> None:
    """``--compile blocks``: diffusers' regional compilation of the denoiser's repeated blocks."""
    denoiser.compile_repeated_blocks()


def cmd_generate(args) -> int:
    """Check every argument, load the pipeline (a quantduo / diffusers folder, or a published SVDQuant checkpoint
    with ``--base``), sample one image, write it atomically."""
    published = is_published(args.model)
    if published:
        _check_published_args(args)
        denoiser_class = FLUX_CLASS  # what published checkpoints load into
    else:
        _, config = _check_pipeline_args(args)
        _check_execution(args, config)
        denoiser_class = config.get("_class_name", "")
    _check_compile(args, denoiser_class)
    _check_fp8_attention(args)
    if not args.prompt.strip():
        raise bad("--prompt", "the prompt is empty; give some text")
    out = output_file(args.out, "--out", ".png")
    pipe = (_published_pipeline(args) if published
            else load_pipeline(args.model, _dtype(args), args.device, execution=args.execution))
    _, denoiser = denoiser_of(pipe)
    if args.fp8_attention:
        enable_fp8_attention(denoiser, backend=args.fp8_attention)
    if args.compile == "blocks":
        _compile_blocks(denoiser)
    if args.cuda_graph:
        enable_cuda_graph(denoiser, compile=args.compile == "whole")
    elif args.compile == "whole":
        denoiser.compile()
    image = pipe(
        prompt=args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
        **_pipe_kwargs(args),
    ).images[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))
    print(f"wrote {out}")
    return 0


def cmd_example_pipeline(args) -> int:
    """Write the tiny FLUX pipeline (random weights, built in-process) as a pipeline folder."""
    out = output_folder(args.out, "DIR")
    save_pipeline(tiny_flux_pipeline(args.seed), out, made_by={"command": args.command_line})
    print(f"wrote a tiny FluxPipeline to {out} (try: quantduo quantize --model {args.out} --out ...)")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local pipeline folder")
    parser.add_argument("--height", type=int_in(1), help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int_in(1), help="image width (default: the pipeline's)")
    parser.add_argument("--guidance", type=float_in(0.0), help="guidance scale (default: the pipeline's)")
    parser.add_argument("--max-sequence-length", type=int_in(1), help="text tokens (FLUX/SD3 T5)")
    parser.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="compute dtype (default: bfloat16; a published nunchaku_lite folder: its compute_dtype)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")


def register(subparsers) -> None:
    """Add the ``quantize``, ``generate`` and ``example-pipeline`` sub-commands."""
    q = subparsers.add_parser("quantize", help="SVDQuant the denoiser of a local diffusers pipeline")
    _common(q)
    q.add_argument("--format", choices=format_names(), default="int4")
    q.add_argument("--rank", type=int_in(0), help=f"low-rank branch (default: {DEFAULT_RANK}, or the smallest "
                                                  "quantized layer's size if less; 0 for formats without one)")
    q.add_argument("--out", required=True, help="output pipeline folder (new, empty, or written by quantduo)")
    q.add_argument("--prompts", help="text file, one calibration prompt per line")
    q.add_argument("--prompt", action="append", help="calibration prompt (repeatable; default: built-in captions)")
    q.add_argument("--calib-samples", type=int_in(1), default=128, help="(prompt, step) denoiser calls kept")
    q.add_argument("--calib-steps", type=int_in(1), default=20, help="denoising steps per calibration prompt")
    q.add_argument("--search-tokens", type=int_in(1), default=512, help="calibration rows per layer for the search")
    q.add_argument("--for-layout", choices=EXPORT_LAYOUTS, default="nunchaku",
                   help="calibrate so that `quantduo export --layout` can write this layout: nunchaku (deepcompressor's "
                   "calibration: post-GELU inputs shifted UINT4, a FLUX single block's proj_out in two halves) or "
                   "nunchaku-lite (signed activations everywhere, one proj_out)")
    q.add_argument("--blockwise", action="store_true", help="quantize one block at a time; the pipeline stays on the "
                   "CPU and the denoiser's blocks are read from its safetensors files onto --device one at a time, "
                   "in calibration capture too (GPU memory: text encoders during capture, then one block + its "
                   "samples; host memory: one block of the denoiser); kill-safe, finished blocks go to --work-dir")
    q.add_argument("--work-dir", default="quantduo-work", help="--blockwise state: samples, finished blocks")
    q.add_argument("--resume", action="store_true", help="continue the --blockwise run in --work-dir")
    q.add_argument("--sequential", action="store_true", help="--blockwise: calibrate each block on the outputs of "
                   "the already-quantized blocks (default: full-precision outputs)")
    q.add_argument("--activations", choices=ACTIVATIONS, default="auto",
                   help="--blockwise: where calibration activations live between blocks (auto: on the GPU if they "
                        "fit, else host memory; disk: one call in memory at a time)")
    q.set_defaults(func=cmd_quantize)
    g = subparsers.add_parser("generate", help="generate an image with a (quantized) local pipeline")
    _common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output PNG")
    g.add_argument("--base", help="base model's local diffusers pipeline folder (text encoders, VAE, scheduler, "
                   "and transformer tensors the checkpoint lacks) when --model is a published SVDQuant checkpoint "
                   "(Nunchaku .safetensors file or nunchaku_lite folder)")
    g.add_argument("--steps", type=int_in(1), default=20)
    g.add_argument("--execution", choices=EXECUTIONS, default="auto",
                   help="how the quantized layers run (auto: fp8 on GPUs with fp8 tensor cores, the 4-bit kernels "
                   "on other GPUs, the PyTorch reference on CPU)")
    g.add_argument("--fp8", dest="execution", action="store_const", const="fp8", help="same as --execution fp8")
    g.add_argument("--a16", dest="execution", action="store_const", const="a16", help="same as --execution a16")
    g.add_argument("--compile", nargs="?", const="blocks", choices=["blocks", "whole"],
                   help="torch.compile the denoiser (fuses the glue ops and, in fp8 execution, the activation "
                   "quantization): blocks (the default): diffusers' regional compilation, one graph per repeated "
                   "block class (seconds to compile, no slower on the FLUX step); whole: the model as one graph "
                   "(minutes to compile, for denoisers without repeated blocks)")
    g.add_argument("--cuda-graph", action="store_true", help="replay each denoising step from a CUDA graph (CUDA)")
    g.add_argument("--fp8-attention", choices=FP8_ATTENTION_BACKENDS, help="run the denoiser's attention in fp8: "
                   "triton (quantduo's kernel, one scale per token block) or fa3 (FlashAttention-3 on Hopper, one "
                   "scale per head; build it with scripts/build_fa3.sh); the PyTorch reference of either on the CPU")
    g.set_defaults(func=cmd_generate)
    e = subparsers.add_parser("example-pipeline", help="write a tiny FLUX pipeline (random weights) to try "
                              "quantize / generate on a CPU")
    e.add_argument("out", metavar="DIR", help="output pipeline folder (new, empty, or written by quantduo)")
    e.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the random weights")
    e.set_defaults(func=cmd_example_pipeline)
