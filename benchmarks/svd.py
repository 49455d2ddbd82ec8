"""Exact (float64 LAPACK) vs randomized (torch.svd_lowrank) SVD inside SVDQuant: time and final error.

Usage: python benchmarks/svd.py [--device cpu|cuda] [--sizes 3072x3072 ...] [--iters 10]
Prints, per weight shape, the time of one rank-32 factorisation, the relative output error of the full SVDQuant
solve (39-candidate smoothing search + refinement) with each SVD in the refinement, the refinement's time, and the
search's time with candidates solved one by one vs in memory-bounded batches (one batched randomized SVD each).
"""
from __future__ import annotations

import argparse
import time

import torch

from quantduo.svdquant import SVDQuantConfig, lowrank_factors, solve_group
from quantduo.svdquant.phases import PHASE_SECONDS, reset_phases


def synthetic_layer(n: int, k: int, tokens: int, device: str, seed: int = 0):
    """A weight with a power-law spectrum and activations with a few outlier channels."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = torch.ones(k)
    scale[torch.randperm(k, generator=g)[: max(1, k // 64)]] = 30.0
    x = torch.randn(tokens, k, generator=g) * scale
    spectrum = torch.arange(1, min(n, k) + 1).float().pow(-0.7)
    u = torch.linalg.qr(torch.randn(n, min(n, k), generator=g))[0]
    v = torch.linalg.qr(torch.randn(k, min(n, k), generator=g))[0]
    w = (u * spectrum) @ v.T + 0.01 * torch.randn(n, k, generator=g)
    return x.to(device), w.to(device)


def timed(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def solve(w, x, method: str, iters: int, tokens: int, batch_bytes: int) -> tuple[float, dict]:
    """(relative output error, seconds per phase) of one full SVDQuant solve."""
    cfg = SVDQuantConfig(svd=method, dtype="float32", lowrank_iters=iters, search_tokens=tokens,
                         search_batch_bytes=batch_bytes)
    reset_phases()
    sol = solve_group(w, x, x.abs().amax(0), cfg, act_format="int4", rank=32, smooth=True)
    return sol.rel_error, dict(PHASE_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["1536x384", "3072x3072"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10, help="refinement iterations")
    parser.add_argument("--batch-gb", type=float, default=2.0, help="working memory of the batched search")
    args = parser.parse_args()
    batch_bytes = int(args.batch_gb * (1 << 30))
    print("| shape (NxK) | exact SVD s | randomized s | speed-up | err exact | err randomized | refine s exact "
          "| refine s rand | search s one-by-one | search s batched |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        n, k = map(int, size.split("x"))
        x, w = synthetic_layer(n, k, args.tokens, args.device)
        t_exact = timed(lambda: lowrank_factors(w, 32, "exact"), 1)
        t_rand = timed(lambda: lowrank_factors(w, 32, "randomized"))
        err_exact, ph_exact = solve(w, x, "exact", args.iters, args.tokens, batch_bytes)
        err_rand, ph_rand = solve(w, x, "randomized", args.iters, args.tokens, batch_bytes)
        _, ph_single = solve(w, x, "randomized", 1, args.tokens, 1)
        print(f"| {size} | {t_exact:.3f} | {t_rand:.3f} | {t_exact / t_rand:.1f}x | {err_exact:.4e} | {err_rand:.4e} | "
              f"{ph_exact['svd']:.1f} | {ph_rand['svd']:.1f} | {ph_single['search']:.1f} | {ph_rand['search']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
