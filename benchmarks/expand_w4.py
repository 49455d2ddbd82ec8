"""The INT4 -> fp8 weight expansion of the fp8 execution on a CUDA GPU, at FLUX shapes (rank-32 layers with
smoothing): the Triton kernel (``quantduo.kernels.dequant_w4``), the Gluon kernel (``quantduo.kernels.expand_w4_mma``,
default configuration and, with ``--sweep``, row steps x steps in flight) and a bandwidth floor (a Triton copy of the
same bytes, nibbles to bytes: 0.5 byte read and 1 written per weight). CUDA-graph replays over rotating layers
(weights from memory, not L2), median us; the Gluon codes are compared with the Triton ones first.

    PYTHONPATH=. python3 benchmarks/expand_w4.py [--sweep] [--shapes 3072x3072 ...] [--out DIR]

Writes ``expand_w4.json`` to DIR.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear as L  # noqa: E402  (benchmarks/linear.py: random layers, time_graph)

from quantduo.formats.fp8 import fp8_steps_apart  # noqa: E402
from quantduo.kernels import expand_w4_mma  # noqa: E402
from quantduo.kernels.dequant_w4 import dequant_w4  # noqa: E402
from quantduo.utils import atomic_write  # noqa: E402

SHAPES = ("3072x3072", "9216x3072", "12288x3072", "3072x12288", "3072x15360")
SWEEP = [dict(ROW_STEPS=r, STAGES=s) for r in (2, 4, 8, 16) for s in (1, 2, 3)]


@triton.jit
def _nibbles_to_bytes(C, O, n, BLOCK: tl.constexpr):
    """The floor: uint8 codes ``[n]`` -> their nibbles as bytes ``[2n]``."""
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.load(C + off, mask=off < n, other=0)
    v = tl.reshape(tl.join(c & 15, c >> 4), (2 * BLOCK,))
    out = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(O + out, v, mask=out < 2 * n)


def triton_expansion(m):
    return dequant_w4(m.qweight, m.wscales, torch.float8_e4m3fn, 64, m.proj_down, m.proj_up, scratch=False,
                      row_scale=m.fp8_inv_wscale, inv_smooth=m.fp8_inv_smooth)


def gluon_expansion(m, config=None):
    return expand_w4_mma.expand_w4_fp8_mma(m.qweight, m.wscales, m.proj_down, m.proj_up, m.fp8_inv_smooth,
                                           m.fp8_inv_wscale, config)


def measure(N: int, K: int, sweep: bool) -> dict:
    layers = [L.random_module(N, K, execution="fp8") for _ in range(min(8, math.ceil(L.L2_DEFEAT_BYTES / (N * K))))]
    apart = fp8_steps_apart(triton_expansion(layers[0]), gluon_expansion(layers[0]))

    def timed(fn):
        cycle = itertools.cycle(layers)
        return L.time_graph(lambda: (lambda m: lambda: fn(m))(next(cycle)), 1.5 * N * K)

    def floor():
        codes = torch.randint(0, 255, (N * K // 2,), device="cuda", dtype=torch.uint8)
        out = torch.empty(N * K, device="cuda", dtype=torch.uint8)
        return lambda: _nibbles_to_bytes[(triton.cdiv(N * K // 2, 4096),)](codes, out, N * K // 2, BLOCK=4096,
                                                                           num_warps=8)

    row = dict(N=N, K=K, codes_apart_max=int(apart.max()), codes_apart_mean=float(apart.float().mean()),
               triton_us=timed(triton_expansion), gluon_us=timed(gluon_expansion),
               gluon_config=expand_w4_mma.pick_config(N, K), floor_us=L.time_graph(floor, 1.5 * N * K))
    if sweep:
        row["sweep_us"] = {json.dumps(cfg): timed(lambda m, cfg=cfg: gluon_expansion(m, cfg)) for cfg in SWEEP}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK layers")
    parser.add_argument("--sweep", action="store_true", help="also time every SWEEP configuration of the Gluon kernel")
    parser.add_argument("--out", default=".", help="directory of expand_w4.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    rows = []
    print("| N x K | Triton us (TB/s) | Gluon us (TB/s), vs Triton | floor us (TB/s) | codes apart (max, mean) |")
    print("| --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        N, K = map(int, shape.split("x"))
        row = measure(N, K, args.sweep)
        rows.append(row)
        tb = lambda us: 1.5 * N * K / us / 1e6  # noqa: E731
        print(f"| {N}x{K} | {row['triton_us']:.1f} ({tb(row['triton_us']):.2f}) | {row['gluon_us']:.1f} "
              f"({tb(row['gluon_us']):.2f}), {row['triton_us'] / row['gluon_us']:.2f}x | {row['floor_us']:.1f} "
              f"({tb(row['floor_us']):.2f}) | {row['codes_apart_max']}, {row['codes_apart_mean']:.1e} |", flush=True)
        if args.sweep:
            print("   sweep: " + ", ".join(f"{k} {v:.1f}" for k, v in row["sweep_us"].items()), flush=True)
    atomic_write(os.path.join(args.out, "expand_w4.json"), lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
