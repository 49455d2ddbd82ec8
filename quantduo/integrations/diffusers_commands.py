"""``quantduo quantize`` and ``quantduo generate``: SVDQuant a local diffusers pipeline, then sample from it.

    quantduo quantize --model PIPELINE_DIR --format int4 --rank 32 --out OUT_DIR [--prompts FILE]
    quantduo generate --model OUT_DIR --prompt "a cat" --out cat.png [--seed 0 --steps 20 --height 512 --width 512]

``OUT_DIR`` holds ``quantduo_pipeline.json`` (base pipeline folder, denoiser attribute, format) and the quantized
denoiser under ``OUT_DIR/<transformer|unet>/``; ``generate`` also accepts a plain diffusers folder (full precision).
Formats: ``int4`` / ``nvfp4`` (W4A4), ``w4a16`` (weight-only baseline), ``svdq-w4a16`` (16-bit activations, INT4
weights with SVDQuant's smoothing and rank-r low-rank branch) and the Hopper formats ``w4a8`` /
``w4a8fp8``:
stored as INT4 SVDQuant and converted at load time (4-bit weights with int8- / fp8-exact group scales, int8 / fp8
activations; ``w4a8fp8`` runs the low-rank branch inside one fp8 GEMM, see ``svdquant.hopper_formats``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quantduo.utils import atomic_write

from .cuda_graph import enable_cuda_graph
from .diffusers import denoiser_of

PIPELINE_META = "quantduo_pipeline.json"
CLI_FORMATS = ("int4", "nvfp4", "w4a16", "svdq-w4a16", "w4a8", "w4a8fp8")
HOPPER_ACT_FORMATS = {"w4a8": "int8", "w4a8fp8": "fp8"}  # CLI format -> SVDQuantW4A8Linear act_format
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a wooden table", "a red double-decker bus driving down a city street",
    "a bowl of fruit with apples and bananas", "a man riding a surfboard on a large wave",
    "a snowy mountain landscape at sunrise", "two dogs playing with a frisbee in a park",
    "a plate of pasta with tomato sauce and basil", "an old lighthouse on a rocky coast at night",
)


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _load_pipeline(model_dir: str | Path, dtype: torch.dtype, device: str, **components):
    from diffusers import DiffusionPipeline

    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise SystemExit(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, **components)
    return pipe.to(device)


def _pipe_kwargs(args) -> dict:
    kwargs = dict(height=args.height, width=args.width)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.max_sequence_length is not None:
        kwargs["max_sequence_length"] = args.max_sequence_length
    return kwargs


def cmd_quantize(args) -> int:
    from .diffusers import (
        capture_calibration_inputs, denoiser_of, quantization_config, quantize_transformer, save_quantized_transformer,
    )

    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else list(args.prompt or DEFAULT_PROMPTS)
    prompts = [p for p in prompts if p.strip()]
    pipe = _load_pipeline(args.model, _dtype(args.dtype), args.device)
    attr, denoiser = denoiser_of(pipe)
    samples = capture_calibration_inputs(
        pipe, prompts, num_samples=args.calib_samples, num_inference_steps=args.calib_steps, seed=args.seed,
        **_pipe_kwargs(args),
    )
    storage_format = "int4" if args.format in HOPPER_ACT_FORMATS else args.format
    config = quantization_config(denoiser, storage_format, rank=args.rank, search_tokens=args.search_tokens,
                                 dtype=args.dtype if args.dtype != "float32" else "bfloat16")
    report = quantize_transformer(denoiser, samples, config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_quantized_transformer(denoiser, out / attr, config, report)
    meta = dict(base_model=str(Path(args.model).resolve()), component=attr, format=args.format)
    atomic_write(out / PIPELINE_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    print(report.summary())
    print(f"quantized {len(report.quantized())} layers, kept {len(report.skipped())} in full precision -> {out}")
    return 0


EXECUTIONS = ("native", "a16", "fp8")


def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                  execution: str = "native"):
    """A pipeline from a ``quantduo quantize`` output folder (quantized denoiser) or a plain diffusers folder.

    execution (same stored weights): ``"native"`` (the checkpoint's format), ``"a16"`` (W4A4 layers with
    16-bit activations, :func:`.diffusers.convert_to_w4a16`) or ``"fp8"`` (INT4 layers with per-token fp8
    activations on fp8 tensor cores, :func:`.diffusers.convert_to_fp8`)."""
    from .diffusers import cast_denoiser, convert_to_fp8, convert_to_w4a8, convert_to_w4a16, load_into_pipeline

    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")

    meta_path = Path(model_dir) / PIPELINE_META
    if not meta_path.is_file():
        return _load_pipeline(model_dir, dtype, device)
    meta = json.loads(meta_path.read_text())
    pipe = _load_pipeline(meta["base_model"], dtype, device, **{meta["component"]: None})
    denoiser = load_into_pipeline(pipe, Path(model_dir) / meta["component"])
    cast_denoiser(denoiser, dtype).to(device)  # the checkpoint may hold another compute dtype than the pipeline
    if execution == "a16":
        convert_to_w4a16(denoiser)
    elif execution == "fp8":
        convert_to_fp8(denoiser)
    elif meta["format"] in HOPPER_ACT_FORMATS:
        convert_to_w4a8(denoiser, HOPPER_ACT_FORMATS[meta["format"]])
    return pipe


def cmd_generate(args) -> int:
    pipe = load_pipeline(args.model, _dtype(args.dtype), args.device, execution=args.execution)
    _, denoiser = denoiser_of(pipe)
    if args.cuda_graph:
        enable_cuda_graph(denoiser, compile=args.compile)
    elif args.compile:
        denoiser.compile()
    image = pipe(
        args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
        **_pipe_kwargs(args),
    ).images[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: image.save(tmp, format="PNG"))
    print(f"wrote {out}")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local pipeline folder")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (pipeline default if omitted)")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (FLUX/SD3 T5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def register(subparsers) -> None:
    """Add the ``quantize`` and ``generate`` sub-commands."""
    q = subparsers.add_parser("quantize", help="SVDQuant the denoiser of a local diffusers pipeline")
    _common(q)
    q.add_argument("--format", choices=CLI_FORMATS, default="int4")
    q.add_argument("--rank", type=int, default=32)
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--prompts", help="text file, one calibration prompt per line")
    q.add_argument("--prompt", action="append", help="calibration prompt (repeatable; default: built-in captions)")
    q.add_argument("--calib-samples", type=int, default=128, help="(prompt, step) denoiser calls kept")
    q.add_argument("--calib-steps", type=int, default=20, help="denoising steps per calibration prompt")
    q.add_argument("--search-tokens", type=int, default=512, help="calibration rows per layer for the search")
    q.set_defaults(func=cmd_quantize)
    g = subparsers.add_parser("generate", help="generate an image with a (quantized) local pipeline")
    _common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output PNG")
    g.add_argument("--steps", type=int, default=20)
    execution = g.add_mutually_exclusive_group()
    execution.add_argument("--a16", dest="execution", action="store_const", const="a16", default="native",
                           help="run the W4A4 layers with 16-bit activations (same weights; faster and more "
                           "accurate on GPUs without 4-bit tensor cores, e.g. Hopper)")
    execution.add_argument("--fp8", dest="execution", action="store_const", const="fp8",
                           help="run the INT4 layers with per-token fp8 activations on fp8 tensor cores (same "
                           "weights; Hopper / Ada)")
    g.add_argument("--compile", action="store_true", help="torch.compile the denoiser (fuses the glue ops and, "
                   "with --fp8, the activation quantization)")
    g.add_argument("--cuda-graph", action="store_true", help="replay each denoising step from a CUDA graph (CUDA)")
    g.set_defaults(func=cmd_generate)
