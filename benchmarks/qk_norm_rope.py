"""FLUX's Q / K preparation for FlashAttention-3 at the FLUX.1 shape: the one-kernel path against what the compiler
makes of the eager chain.

    PYTHONPATH=. python3 benchmarks/qk_norm_rope.py [--sweep] [--out DIR]

Inputs as FLUX.1 at 1024x1024 hands them to its attention: 512 text + 4096 image tokens, 24 heads of 128, bf16, each
stream a view of its fused QKV projection output (row stride 3 x 3072), ``torch.nn.RMSNorm`` weights (diffusers'
FLUX attention), FLUX's rotary tables, the static bound ``sqrt(128) * max|w|``. Times: CUDA-graph replays
(``benchmarks.linear.time_on_fresh_inputs``), us per call of one of Q / K, and GB/s of one read of the rows and one
write of the codes (the cos / sin tables not counted). Rows: :func:`quantduo.kernels.qk_norm_rope.rms_norm_rope_e4m3` at its
default tile (with ``--sweep`` also other (rows per program, warps) tiles), and the eager chain (the norms, text
rows first, diffusers' ``apply_rotary_emb``, the static-bound quantization) under ``torch.compile``, which is what
the SDPA-hook path runs. Each row's codes are compared with the reference
(:func:`quantduo.formats.attention_fp8.rms_norm_rope_e4m3_ref`). Writes ``qk_norm_rope.json`` to DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.linear import time_on_fresh_inputs  # noqa: E402
from quantduo.formats.attention_fp8 import quantize_heads_e4m3, rms_norm_rope_e4m3_ref  # noqa: E402
from quantduo.formats.fp8 import fp8_steps_apart  # noqa: E402
from quantduo.kernels import qk_norm_rope  # noqa: E402
from quantduo.utils import atomic_write  # noqa: E402

EPS = 1e-6
SWEEP = [(32, 4), (64, 4), (64, 8), (128, 8), (128, 16), (256, 16)]


def flux_qk_inputs(device: str, text: int = 512, side: int = 64, heads: int = 24, dim: int = 128, seed: int = 0
                   ) -> dict:
    """One of FLUX's Q / K as its attention receives it: ``txt [1, text, H, D]`` and ``image [1, side**2, H, D]``
    (bf16 views of ``[1, S, 3 H D]`` projection outputs), the two ``torch.nn.RMSNorm`` modules, ``cos`` / ``sin``
    ``[text + side**2, D]`` float32 and the static bound."""
    g = torch.Generator().manual_seed(seed)
    streams = [(torch.randn(1, s, 3 * heads * dim, generator=g) * 3).to(device=device, dtype=torch.bfloat16)
               [..., : heads * dim].unflatten(-1, (heads, dim)) for s in (text, side * side)]
    norms = []
    for _ in range(2):
        norm = torch.nn.RMSNorm(dim, eps=EPS)
        norm.weight.data = torch.rand(dim, generator=g) * 1.5 + 0.25
        norms.append(norm.to(device=device, dtype=torch.bfloat16))
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.cat([torch.zeros(text, 3), torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3)])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[dim // 8, 7 * dim // 16, 7 * dim // 16])(ids.float())
    bound = math.sqrt(dim) * max(n.weight.float().abs().max().item() for n in norms)
    return dict(txt=streams[0], image=streams[1], norms=norms, cos=cos.to(device), sin=sin.to(device), bound=bound)


def eager_chain(inputs: dict) -> torch.Tensor:
    """The chain diffusers' FLUX processor runs, then the static-bound quantization: codes ``[1, S, H, D]``."""
    y = torch.cat([inputs["norms"][0](inputs["txt"]), inputs["norms"][1](inputs["image"])], dim=1)
    y = apply_rotary_emb(y, (inputs["cos"], inputs["sin"]), sequence_dim=1)
    return quantize_heads_e4m3(y, inputs["bound"])[0]


def kernel_call(inputs: dict, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """The one-kernel path (``tile``: (rows per program, warps), the kernel's default where None)."""
    (w0, w1), args = (n.weight for n in inputs["norms"]), (inputs["cos"], inputs["sin"], EPS, inputs["bound"])
    return qk_norm_rope._launch(inputs["txt"], w0, inputs["image"], w1, *args, round_before_weight=False, tile=tile)


def reference(inputs: dict) -> torch.Tensor:
    (w0, w1) = (n.weight for n in inputs["norms"])
    return rms_norm_rope_e4m3_ref(inputs["txt"], w0, EPS, inputs["bound"], inputs["image"], w1, inputs["cos"],
                                  inputs["sin"])


def agreement(codes: torch.Tensor, ref: torch.Tensor) -> dict:
    """Largest E4M3 step difference from the reference and the share of codes that differ."""
    apart = fp8_steps_apart(codes.contiguous(), ref)
    return dict(max_steps=int(apart.max()), differing=float(apart.gt(0).float().mean()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time the tiles of SWEEP (rows, warps)")
    parser.add_argument("--out", default=".", help="directory of qk_norm_rope.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    inputs = flux_qk_inputs("cuda")
    ref = reference(inputs)
    elements = inputs["txt"].numel() + inputs["image"].numel()
    nbytes = 3 * elements  # bf16 rows read, E4M3 codes written
    compiled = torch.compile(eager_chain)
    paths = {f"kernel {qk_norm_rope.default_tile(128)} (default)": lambda i: kernel_call(i)}
    if args.sweep:
        paths |= {f"kernel {tile}": lambda i, tile=tile: kernel_call(i, tile) for tile in SWEEP}
    paths["compiled eager chain"] = compiled
    rows = []
    for name, path in paths.items():
        with torch.no_grad():
            check = agreement(path(inputs), ref)
            us = time_on_fresh_inputs(path, lambda: flux_qk_inputs("cuda", seed=1), nbytes)
        rows.append(dict(path=name, us=us, gb_s=nbytes / us / 1e3, **check))
        print(f"{name}: {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s), codes vs reference: max {check['max_steps']} "
              f"steps, {check['differing']:.2e} differ", flush=True)
    atomic_write(os.path.join(args.out, "qk_norm_rope.json"), lambda tmp: Path(tmp).write_text(json.dumps(
        dict(device=torch.cuda.get_device_name(), elements=elements, rows=rows), indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
