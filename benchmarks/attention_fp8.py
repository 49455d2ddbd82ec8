"""FP8 attention (quantduo.kernels.attention_fp8) vs bf16 ``F.scaled_dot_product_attention`` at the FLUX shape.

    PYTHONPATH=. python benchmarks/attention_fp8.py [--heads 24 --tokens 4608 --dim 128]

Inputs bf16 ``[1, H, S, D]`` (random normal; keys with a shared per-channel offset as DiT keys have). Times: CUDA
events via ``triton.testing.do_bench`` (median), the fp8 row including its Q/K/V quantization launches; TFLOP/s
counts ``4 * S^2 * D * H``. Errors: relative L2 vs float64 attention of the same bf16 inputs. Tile variants of the
kernel are timed one by one; a variant that fails prints its error and the script goes on.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from quantduo.kernels.attention_fp8 import fp8_attention_launch
from quantduo.utils import relative_error

TILES = [(128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 2), (128, 64, 8, 2)]


def make_qkv(heads: int, tokens: int, dim: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, dim, device="cuda", generator=g) for _ in range(3))
    k = k + 2.0 * torch.randn(1, 1, 1, dim, device="cuda", generator=g)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)

    q, k, v = make_qkv(args.heads, args.tokens, args.dim)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    flops = 4 * args.tokens ** 2 * args.dim * args.heads
    sm_scale = args.dim ** -0.5
    rows = [("sdpa bf16", lambda: F.scaled_dot_product_attention(q, k, v))]
    rows += [(f"fp8 BM{bm} BN{bn} w{w} s{s}",
              lambda bm=bm, bn=bn, w=w, s=s: fp8_attention_launch(q, k, v, sm_scale, bm, bn, w, s))
             for bm, bn, w, s in TILES]
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; [1, {args.heads}, {args.tokens}, "
          f"{args.dim}] bf16")
    table = []
    for name, fn in rows:
        try:
            err = relative_error(fn(), exact)
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            table.append((name, ms, err))
            print(f"{name}: {ms * 1e3:.1f} us, rel. err {err:.4f}", flush=True)
        except Exception as error:  # noqa: BLE001 (a tile that does not compile must not stop the others)
            print(f"{name} failed: {type(error).__name__}: {str(error)[:300]}", flush=True)
    base = table[0][1] if table and table[0][0].startswith("sdpa") else None
    print("\n| variant | us | TFLOP/s | vs sdpa bf16 | rel. err vs float64 |\n|---|---|---|---|---|")
    for name, ms, err in table:
        speed = f"{base / ms:.2f}x" if base else "-"
        print(f"| {name} | {ms * 1e3:.1f} | {flops / ms / 1e9:.0f} | {speed} | {err:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
