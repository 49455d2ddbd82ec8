"""FP8 attention quality on the tiny digits DiT (CPU or GPU): PSNR of the sampled digits with each FP8 attention
backend's semantics vs the same model with 16/32-bit attention.

    PYTHONPATH=. python benchmarks/attention_quality.py [--steps 20 --digits 20 --dtype float32 bfloat16]

The tiny DiT is a ``FluxTransformer2DModel`` (head dim 64), so both backends serve its attention: ``triton`` (one
scale per block of 64 query / 128 key tokens: one block per head at its 20 tokens), ``fa3`` (one scale per head,
Q / K quantized by their RMSNorm bounds, :func:`quantduo.integrations.fp8_attention.norm_bounds`) and ``fa3
absmax`` (the same with every scale from the absmax). On a CPU each runs its pure-PyTorch reference (the GPU
kernels match those to ~3e-2 relative, BENCHMARKS.md); on a GPU the kernels themselves where installed.
"""
from __future__ import annotations

import argparse
import sys

import torch

from quantduo.demo import psnr
from quantduo.integrations.fp8_attention import disable_fp8_attention, enable_fp8_attention
from quantduo.models.tiny_dit import load_tiny_dit, sample_digits

VARIANTS = ("triton", "fa3", "fa3 absmax")


def sample_with(model, variant: str | None, labels: torch.Tensor, steps: int) -> torch.Tensor:
    """Digits sampled by ``model`` with ``variant``'s FP8 attention (None: without)."""
    if variant is not None:
        enable_fp8_attention(model.transformer, backend=variant.split()[0])
        if variant.endswith("absmax"):
            for module in model.transformer.modules():
                if hasattr(getattr(module, "processor", None), "bounds"):
                    module.processor.bounds = None
    try:
        with torch.no_grad():
            return sample_digits(model, labels, steps=steps, seed=0)
    finally:
        disable_fp8_attention(model.transformer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--digits", type=int, default=20, help="digits sampled (a multiple of 10)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    labels = torch.arange(10).repeat_interleave(args.digits // 10)
    print(f"| weights | {' | '.join(VARIANTS)} |\n|---|{'---|' * len(VARIANTS)}")
    for dtype in args.dtype:
        model = load_tiny_dit(device=args.device, dtype=getattr(torch, dtype))
        reference = sample_with(model, None, labels, args.steps)
        scores = [psnr(sample_with(model, v, labels, args.steps), reference) for v in VARIANTS]
        print(f"| {dtype} | " + " | ".join(f"{s:.1f} dB" for s in scores) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
