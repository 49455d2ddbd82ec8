"""The INT4 x fp8 group GEMM in CuTe DSL (``quantduo.kernels.w4a8_cute``: SVDQuant's groups of 64, the rank-32
up-projection and bias in its epilogue) at FLUX shapes, against what the fp8 execution runs today and cuBLAS alone.

Per shape and token count: the kernel's two modes (promoted and folded group scales, 64- and 128-token tiles), each
checked against its reference, cuBLAS's fp8 GEMM on
ready fp8 weights (fast accumulation: the bound of any mixed-input GEMM), the fp8 layer's expansion + cuBLAS
(the Gluon expansion, what graphed models run) and bf16 ``F.linear``. The kernel's inputs (x / smooth as E4M3 codes
with per-token scales, and ``lx``) are made outside the timed call, as the producer kernels would hand them over.

    PYTHONPATH=. python3 benchmarks/w4a8_cute.py [--tokens 4096 256 64] [--shapes 3072x3072 ...] [--out DIR]

Needs ``nvidia-cutlass-dsl`` (4.8.1) importable. Writes ``w4a8_cute.json`` to DIR (median us of CUDA-graph
replays over buffers past L2, relative errors).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear as L  # noqa: E402  (benchmarks/linear.py: random layers, time_graph, v_scaled_mm, v_bf16)
from expand_w4 import gluon_expansion  # noqa: E402
from w4a8_lut import table  # noqa: E402  (the markdown table printer)

from quantduo.formats import quantizers as qz  # noqa: E402
from quantduo.formats.reference import w4a8_folded_gemm_ref, w4a8_group_gemm_ref  # noqa: E402
from quantduo.kernels import w4a8_cute  # noqa: E402
from quantduo.utils import atomic_write  # noqa: E402

SHAPES = ("3072x3072", "9216x3072", "12288x3072", "3072x12288", "3072x15360")
RANK = 32
HEADER = ("M", "N x K", "promoted tile 128 / 64 us", "folded tile 128 / 64 us", "cuBLAS fp8 fast-accum us",
          "best / cuBLAS", "expansion + cuBLAS us", "best / (expansion + cuBLAS)", "bf16 us",
          "rel. err promoted / folded")
VARIANTS = {"promoted": (w4a8_cute.w4a8_group_gemm, w4a8_group_gemm_ref),
            "folded": (w4a8_cute.w4a8_folded_gemm, w4a8_folded_gemm_ref)}


def operands(M: int, N: int, K: int, folded: bool, seed: int = 0) -> list[torch.Tensor]:
    """Random kernel operands on the GPU (FLUX-like magnitudes): codes, scales (bf16 ``[G, N]``, or the folded
    float32 ones and the row scales), xq, xs, lx, up, bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    wscales = (torch.rand(N, K // 64, generator=g) * 0.01).to(torch.bfloat16)
    scales = list(qz.fp8_folded_scales(wscales)) if folded else [wscales.T.contiguous()]
    ops = [qz.pack_int4(q), *scales, (torch.randn(M, K, generator=g) * 64).to(torch.float8_e4m3fn),
           torch.rand(M, generator=g) / 64, torch.randn(M, RANK, generator=g).to(torch.bfloat16),
           (torch.randn(N, RANK, generator=g) * 0.1).to(torch.bfloat16), torch.randn(N, generator=g).to(torch.bfloat16)]
    return [o.cuda() for o in ops]


def measure(M: int, N: int, K: int) -> dict:
    row = dict(M=M, N=N, K=K)
    nbytes = M * K + N * K * 0.53 + 2 * M * N
    for name, (run, reference) in VARIANTS.items():
        ops = operands(M, N, K, name == "folded")
        expected = reference(*ops).float()
        row[f"{name}_rel_err"] = max(float((run(*ops, tokens_tile=tile).float() - expected).norm()
                                           / expected.norm()) for tile in (64, 128))
        for tile in (64, 128):
            def make(run=run, name=name, tile=tile):
                fresh = operands(M, N, K, name == "folded", seed=1)
                return lambda: run(*fresh, tokens_tile=tile)
            row[f"{name}{tile}_us"] = L.time_graph(make, nbytes)

    def expansion_then_gemm():
        m = L.random_module(N, K, execution="fp8")
        x = (torch.randn(M, K, device="cuda") * 64).to(torch.float8_e4m3fn)
        sx = torch.ones(M, 1, device="cuda")
        return lambda: torch._scaled_mm(x, gluon_expansion(m).T, scale_a=sx, scale_b=m.fp8_wscale[None, :].float(),
                                        out_dtype=torch.bfloat16, use_fast_accum=True)
    make_fast, fp8_bytes = L.v_scaled_mm(M, N, K, fast_accum=True)
    make_bf16, bf16_bytes = L.v_bf16(M, N, K)
    row.update(cublas_fast_us=L.time_graph(make_fast, fp8_bytes),
               expansion_cublas_us=L.time_graph(expansion_then_gemm, M * K + 2.5 * N * K + 2 * M * N),
               bf16_us=L.time_graph(make_bf16, bf16_bytes))
    return row


def line(r: dict) -> list[str]:
    best = min(r[f"{name}{tile}_us"] for name in VARIANTS for tile in (64, 128))
    return [f"{r['promoted128_us']:.1f} / {r['promoted64_us']:.1f}",
            f"{r['folded128_us']:.1f} / {r['folded64_us']:.1f}",
            f"{r['cublas_fast_us']:.1f}", f"{best / r['cublas_fast_us']:.3f}", f"{r['expansion_cublas_us']:.1f}",
            f"{best / r['expansion_cublas_us']:.3f}", f"{r['bf16_us']:.1f}",
            f"{r['promoted_rel_err']:.1e} / {r['folded_rel_err']:.1e}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK layers")
    parser.add_argument("--out", default=".", help="directory of w4a8_cute.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    rows = table(None, lambda _lib, M, N, K: measure(M, N, K), args.tokens, args.shapes, HEADER, line)
    atomic_write(os.path.join(args.out, "w4a8_cute.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
