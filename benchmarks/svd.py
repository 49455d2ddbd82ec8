"""Exact (float64 LAPACK) vs randomized (torch.svd_lowrank) SVD inside SVDQuant: time and final error.

Usage: python benchmarks/svd.py [--device cpu|cuda] [--sizes 3072x3072 ...]
Prints, per weight shape, the time of one rank-32 factorisation and the relative output error of the
full SVDQuant solve (smoothing search + refinement) with each SVD.
"""
from __future__ import annotations

import argparse
import time

import torch

from quantduo.svdquant import SVDQuantConfig, lowrank_factors, solve_group


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="+", default=["1536x384", "3072x3072"])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    rows = []
    for size in args.sizes:
        n, k = map(int, size.split("x"))
        x, w = synthetic_layer(n, k, args.tokens, args.device)
        t_exact = timed(lambda: lowrank_factors(w, 32, "exact"), 1)
        t_rand = timed(lambda: lowrank_factors(w, 32, "randomized"))
        errors = {}
        for method in ("exact", "randomized"):
            cfg = SVDQuantConfig(svd=method, dtype="float32", lowrank_iters=10, search_tokens=args.tokens)
            start = time.perf_counter()
            sol = solve_group(w, x, x.abs().amax(0), cfg, act_format="int4", rank=32, smooth=True)
            errors[method] = (sol.rel_error, time.perf_counter() - start)
        rows.append((size, t_exact, t_rand, errors))
    print("| shape (NxK) | exact SVD s | randomized s | speed-up | err exact | err randomized | solve s exact | solve s rand |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size, t_exact, t_rand, errors in rows:
        print(
            f"| {size} | {t_exact:.3f} | {t_rand:.3f} | {t_exact / t_rand:.1f}x | {errors['exact'][0]:.3e} | "
            f"{errors['randomized'][0]:.3e} | {errors['exact'][1]:.1f} | {errors['randomized'][1]:.1f} |"
        )


if __name__ == "__main__":
    main()
