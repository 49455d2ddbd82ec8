"""The few-token register-operand GEMM (``quantduo.kernels.gemm_w4_mma``, Gluon) on a CUDA GPU: correctness against the
skinny Triton GEMM, then timings at FLUX shapes against bf16 ``F.linear`` and the skinny GEMM (the GEMM alone with its
rank-32 + bias epilogue, and the layer = kernel 1 (smoothing + low-rank down-projection) + GEMM), CUDA-graph replays
over rotating buffers (us).

    PYTHONPATH=. python3 benchmarks/gemm_w4_mma.py [--sweep] [--out DIR]

``--sweep`` adds a tile sweep (ROW_TILES x SPLIT_K) at 16 tokens. Writes ``gemm_w4_mma.json`` to DIR.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear as L  # noqa: E402  (benchmarks/linear.py: layers, bf16 / skinny variants, time_graph)

from quantduo.kernels import gemm_w4_mma as G  # noqa: E402
from quantduo.kernels.act_quant import act_quant  # noqa: E402
from quantduo.kernels.gemm_w4_skinny import w4_skinny_gemm  # noqa: E402
from quantduo.utils import atomic_write, relative_error  # noqa: E402

GEMMS = {
    "mma": lambda m, a, lxp, **kw: G.w4a16_mma_gemm(a, m.qweight, m.wscales, lxp, m.proj_up, m.bias, a.dtype, **kw),
    "skinny": lambda m, a, lxp, **kw: w4_skinny_gemm(a, None, m.qweight, m.wscales, lxp, m.proj_up, m.bias, "none",
                                                     a.dtype, **kw),
}


def log(*a):
    print(*a, flush=True)


def operands(M, N, K):
    """A random rank-32 INT4 layer, bf16 ``x [M, K]`` and kernel 1's smoothed activations and low-rank partials."""
    m = L.random_module(N, K, "none", rank=L.RANK, execution="a16")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a, _, lxp = act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")
    return m, x, a, lxp


def check_correctness() -> int:
    """The Gluon GEMM against the skinny GEMM (same epilogue) at FLUX shapes and two odd ones; returns failures."""
    bad = 0
    for (N, K) in L.SHAPES + [(96, 128), (200, 192)]:
        for M in (1, 5, 16):
            for gelu in (False, True):
                m, _, a, lxp = operands(M, N, K)
                expected = GEMMS["skinny"](m, a, lxp, gelu=gelu)
                try:
                    got = GEMMS["mma"](m, a, lxp, gelu=gelu)
                    err = relative_error(got, expected)
                    repeat = (got - GEMMS["mma"](m, a, lxp, gelu=gelu)).abs().max().item()
                except Exception:  # noqa: BLE001 - a failing case is reported, the others still run
                    err, repeat = float("nan"), None
                    log("FAIL", N, K, M, gelu, traceback.format_exc()[-1500:])
                ok = err < 5e-3
                bad += not ok
                log(f"check N={N} K={K} M={M} gelu={gelu}: rel err vs skinny {err:.2e} repeat diff {repeat} "
                    f"{'ok' if ok else 'BAD'}")
    return bad


def v_gemm(M, N, K, gemm, with_kernel1=False, config=None):
    """time_graph variant: the GEMM alone on ready operands, or the layer (kernel 1 + GEMM) on bf16 x."""
    kw = {} if config is None else dict(config=config)

    def make():
        m, x, a, lxp = operands(M, N, K)
        if not with_kernel1:
            return lambda: GEMMS[gemm](m, a, lxp, **kw)

        def layer():
            xs, _, partials = act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")
            return GEMMS[gemm](m, xs, partials, **kw)
        return layer
    return make, N * K * 0.53 + 2 * M * K + 2 * M * N


def sweep(M, N, K) -> dict:
    """Gluon tiles: 2 or 4 row tiles per warp, every SPLIT_K dividing the groups with 128-800 programs."""
    timings = {}
    groups = K // 64
    for row_tiles in (2, 4):
        tiles = triton.cdiv(N, 16 * G.WARPS * row_tiles)
        for split in (d for d in range(1, groups + 1) if groups % d == 0 and 128 <= tiles * d <= 800):
            cfg = dict(ROW_TILES=row_tiles, SPLIT_K=split)
            try:
                timings[json.dumps(cfg)] = L.time_graph(*v_gemm(M, N, K, "mma", config=cfg), max_copies=128)
            except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported
                log("cfg fail", cfg, str(ex)[:200])
    return timings


def time_shape(M, N, K, with_sweep: bool) -> dict:
    t = dict(bf16=L.time_graph(*L.v_bf16(M, N, K), max_copies=128))
    for gemm in GEMMS:
        t[gemm] = L.time_graph(*v_gemm(M, N, K, gemm), max_copies=128)
        t["layer_" + gemm] = L.time_graph(*v_gemm(M, N, K, gemm, with_kernel1=True), max_copies=128)
    t["sweep"] = sweep(M, N, K) if with_sweep else {}
    ratio = lambda us: f"{us:.2f} ({t['bf16'] / us:.2f}x)"  # noqa: E731
    best = min(t["sweep"], key=t["sweep"].get) if t["sweep"] else None
    log(f"M={M} {N}x{K}: bf16 {t['bf16']:.2f} us | skinny {ratio(t['skinny'])} | mma default {G.pick_config(N, K)} "
        f"{ratio(t['mma'])}" + (f" best {best} {ratio(t['sweep'][best])}" if best else "")
        + f" | layer: kernel1+skinny {ratio(t['layer_skinny'])}, kernel1+mma {ratio(t['layer_mma'])}")
    if best:
        log("   sweep " + " ".join(f"{k}={v:.2f}" for k, v in sorted(t["sweep"].items(), key=lambda kv: kv[1])[:12]))
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep the Gluon tiles at 16 tokens")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemm_w4_mma.py needs a CUDA GPU")
    t0 = time.time()
    bad = check_correctness()
    log(f"correctness done in {time.time() - t0:.1f} s, bad={bad}")
    results = {f"{M}_{N}x{K}": time_shape(M, N, K, args.sweep and M == 16)
               for M in (16, 8, 4) for (N, K) in L.SHAPES}
    atomic_write(os.path.join(args.out, "gemm_w4_mma.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    main()
