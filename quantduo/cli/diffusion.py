"""``quantduo quantize`` and ``quantduo generate``: SVDQuant a local diffusers pipeline, then sample from it.

    quantduo quantize --model PIPELINE_DIR --format int4 --rank 32 --out OUT_DIR [--prompts FILE]
    quantduo generate --model OUT_DIR --prompt "a cat" --out cat.png [--execution auto|reference|exact|a16|fp8]

``OUT_DIR`` is a complete diffusers pipeline folder (every component saved; the denoiser's ``config.json`` carries
quantduo's ``quantization_config``), so it loads with ``DiffusionPipeline.from_pretrained`` once quantduo is
imported and does not refer to ``PIPELINE_DIR``. Formats and executions: :mod:`quantduo.formats.registry`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quantduo.formats.registry import EXECUTIONS, format_names
from quantduo.integrations.cuda_graph import enable_cuda_graph
from quantduo.integrations.diffusers import (capture_calibration_inputs, denoiser_of, load_pipeline,
                                             quantization_config, quantize_transformer, mark_quantized,
                                             quantduo_config_for, quantize_transformer_blockwise, save_pipeline)
from quantduo.utils import atomic_write

DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a wooden table", "a red double-decker bus driving down a city street",
    "a bowl of fruit with apples and bananas", "a man riding a surfboard on a large wave",
    "a snowy mountain landscape at sunrise", "two dogs playing with a frisbee in a park",
    "a plate of pasta with tomato sauce and basil", "an old lighthouse on a rocky coast at night",
)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _pipe_kwargs(args) -> dict:
    kwargs = dict(height=args.height, width=args.width)
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    if args.max_sequence_length is not None:
        kwargs["max_sequence_length"] = args.max_sequence_length
    return kwargs


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
    prompts = Path(args.prompts).read_text().splitlines() if args.prompts else list(args.prompt or DEFAULT_PROMPTS)
    prompts = [p for p in prompts if p.strip()]
    pipe = load_pipeline(args.model, DTYPES[args.dtype], args.device)
    _, denoiser = denoiser_of(pipe)
    samples = _calibration_samples(args, pipe, prompts)
    config = quantization_config(denoiser, args.format, rank=args.rank, search_tokens=args.search_tokens,
                                 dtype=args.dtype if args.dtype != "float32" else "bfloat16")
    if args.blockwise:
        report = quantize_transformer_blockwise(denoiser, samples, args.work_dir, config, resume=args.resume,
                                                sequential=args.sequential, spill=args.spill)
    else:
        report = quantize_transformer(denoiser, samples, config)
    mark_quantized(denoiser, quantduo_config_for(config))
    out = Path(args.out)
    save_pipeline(pipe, out)
    atomic_write(out / "report.json", lambda tmp: Path(tmp).write_text(report.to_json()))
    print(report.summary())
    print(f"quantized {len(report.quantized())} layers, kept {len(report.skipped())} in full precision -> {out}")
    return 0


def cmd_generate(args) -> int:
    pipe = load_pipeline(args.model, DTYPES[args.dtype], args.device, execution=args.execution)
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
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def register(subparsers) -> None:
    """Add the ``quantize`` and ``generate`` sub-commands."""
    q = subparsers.add_parser("quantize", help="SVDQuant the denoiser of a local diffusers pipeline")
    _common(q)
    q.add_argument("--format", choices=format_names(), default="int4")
    q.add_argument("--rank", type=int, default=32)
    q.add_argument("--out", required=True, help="output pipeline folder")
    q.add_argument("--prompts", help="text file, one calibration prompt per line")
    q.add_argument("--prompt", action="append", help="calibration prompt (repeatable; default: built-in captions)")
    q.add_argument("--calib-samples", type=int, default=128, help="(prompt, step) denoiser calls kept")
    q.add_argument("--calib-steps", type=int, default=20, help="denoising steps per calibration prompt")
    q.add_argument("--search-tokens", type=int, default=512, help="calibration rows per layer for the search")
    q.add_argument("--blockwise", action="store_true", help="quantize one block at a time (GPU memory: one block + "
                   "its samples); kill-safe, finished blocks go to --work-dir")
    q.add_argument("--work-dir", default="quantduo-work", help="--blockwise state: samples, finished blocks")
    q.add_argument("--resume", action="store_true", help="continue the --blockwise run in --work-dir")
    q.add_argument("--sequential", action="store_true", help="--blockwise: calibrate each block on the outputs of "
                   "the already-quantized blocks (default: full-precision outputs)")
    q.add_argument("--spill", action="store_true", help="--blockwise: keep calibration activations on disk")
    q.set_defaults(func=cmd_quantize)
    g = subparsers.add_parser("generate", help="generate an image with a (quantized) local pipeline")
    _common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output PNG")
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--execution", choices=EXECUTIONS, default="auto",
                   help="how the quantized layers run (auto: fp8 on GPUs with fp8 tensor cores, the 4-bit kernels "
                   "on other GPUs, the PyTorch reference on CPU)")
    g.add_argument("--fp8", dest="execution", action="store_const", const="fp8", help="same as --execution fp8")
    g.add_argument("--a16", dest="execution", action="store_const", const="a16", help="same as --execution a16")
    g.add_argument("--compile", action="store_true", help="torch.compile the denoiser (fuses the glue ops and, "
                   "in fp8 execution, the activation quantization)")
    g.add_argument("--cuda-graph", action="store_true", help="replay each denoising step from a CUDA graph (CUDA)")
    g.set_defaults(func=cmd_generate)
