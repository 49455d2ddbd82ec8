"""The Hopper W4A16 GEMM on ``wgmma`` (``quantduo.kernels.gemm_w4_wgmma``, Gluon) on an H100 / H200: correctness against
the exact-weight reference, then timings at FLUX shapes, 32 to 256 tokens, against bf16 ``F.linear`` and the paths the
engine takes today at those token counts: the register-operand GEMM (up to 64 tokens), the ``a16`` layer (kernel 1
+ that GEMM up to 64 tokens, the weight reconstructed for cuBLAS above) and the ``fp8`` layer (the weight expanded
into fp8 for ``_scaled_mm`` above 64 tokens); the new GEMM alone (rank-32 + bias epilogue) and as a layer (kernel 1
+ the GEMM). CUDA-graph replays over rotating buffers (us).

    PYTHONPATH=. python3 benchmarks/gemm_w4_wgmma.py [--sweep] [--tokens 64 128 256] [--shapes 3072x3072 ...]
                                                  [--sweep-tokens 128] [--skip-check] [--out DIR]

``--sweep`` adds a configuration sweep (warpgroups x token block x ring slots, and the program count) at ``--sweep-tokens``
(default 64, 128 and 256). Writes ``gemm_w4_wgmma.json`` to DIR.
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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm_w4_mma as B  # noqa: E402  (operands, layer_shape, the register-operand GEMM)
import linear as L  # noqa: E402  (layers, bf16 variant, time_graph)

from quantduo.formats import reference as ref  # noqa: E402
from quantduo.kernels import gemm_w4_wgmma as S  # noqa: E402
from quantduo.kernels.act_quant import act_quant  # noqa: E402
from quantduo.utils import atomic_write, relative_error  # noqa: E402

TOKENS = (32, 48, 64, 96, 128, 192, 256)
SWEEP_TOKENS = (64, 128, 256)
B.GEMMS["wgmma"] = lambda m, a, lxp, **kw: S.w4a16_wgmma_gemm(a, m.qweight, m.wscales, lxp, m.proj_up, m.bias,
                                                                a.dtype, **kw)
# configurations swept beside the default: (WARPS, TOKENS_BLOCK, STAGES)
SWEEP = [(8, 64, 4), (8, 128, 3), (8, 128, 4), (8, 128, 5), (4, 64, 4), (4, 128, 3), (4, 128, 4), (4, 128, 5)]


def log(*a):
    print(*a, flush=True)


def check_correctness() -> int:
    """The GEMM against ``w4_gemv_ref`` (exact float32 weights) at the FLUX shapes and an odd one, 33-256 tokens,
    with GELU and every SWEEP configuration at 3072 x 3072; returns the number of failures."""
    bad = 0
    cases = [(N, K, M, gelu, None) for (N, K) in L.SHAPES + [(200, 960)] for M in (33, 65, 128, 256)
             for gelu in (False, True)]
    cases += [(3072, 3072, M, False, dict(zip(("WARPS", "TOKENS_BLOCK", "STAGES"), c))) for M in (100, 256)
              for c in SWEEP]
    for N, K, M, gelu, cfg in cases:
        m, _, a, lxp = B.operands(M, N, K)
        expected = ref.w4_gemv_ref(a, m.qweight, m.wscales, lxp.sum(0), m.proj_up, m.bias, a.dtype)
        if gelu:
            expected = F.gelu(expected.float(), approximate="tanh").to(a.dtype)
        try:
            got = B.GEMMS["wgmma"](m, a, lxp, gelu=gelu, config=cfg)
            err = relative_error(got, expected)
        except Exception:  # noqa: BLE001 - a failing case is reported, the others still run
            err = float("nan")
            log("FAIL", N, K, M, gelu, cfg, traceback.format_exc()[-1500:])
        ok = err < 4e-3  # q * s rounded once to bfloat16
        bad += not ok
        if not ok or M == 128:
            log(f"check N={N} K={K} M={M} gelu={gelu} cfg={cfg}: rel err vs exact weights {err:.2e} "
                f"{'ok' if ok else 'BAD'}")
    return bad


def v_layer_wgmma(M, N, K):
    """time_graph variant: kernel 1 (smoothing + rank-32 down-projection) + the wgmma GEMM on bf16 ``x``."""
    def make():
        m, x, _, _ = B.operands(M, N, K)

        def call():
            a, _, lxp = act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")
            return B.GEMMS["wgmma"](m, a, lxp)
        return call
    return make, N * K * 0.53 + 4 * M * K + 2 * M * N


def sweep(M, N, K) -> dict:
    """us of the wgmma GEMM per SWEEP configuration (SPLIT_K for ~1 program per SM with 8 warps, ~2 with 4) and of
    the default with ~66 / ~264 programs and without split (JSON keys)."""
    configs = [dict(WARPS=warps, TOKENS_BLOCK=block, STAGES=stages,
                    SPLIT_K=B.G.split_k(S.tile_count(M, N, block, warps), K, 132 * 8 // warps))
               for warps, block, stages in SWEEP]
    configs += [S.pick_config(M, N, K, programs) for programs in (66, 264)] + [dict(SPLIT_K=1)]
    timings = {}
    for cfg in configs:
        key = json.dumps(cfg)
        if key in timings:
            continue
        try:
            timings[key] = L.time_graph(*B.v_gemm(M, N, K, "wgmma", config=cfg), max_copies=128)
        except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported
            log("cfg fail", cfg, str(ex)[:300])
    return timings


def time_shape(M, N, K, with_sweep: bool) -> dict:
    t = dict(bf16=L.time_graph(*L.v_bf16(M, N, K), max_copies=128),
             wgmma=L.time_graph(*B.v_gemm(M, N, K, "wgmma"), max_copies=128),
             layer_wgmma=L.time_graph(*v_layer_wgmma(M, N, K), max_copies=128),
             layer_a16=L.time_graph(*L.v_module(M, N, K, "a16"), max_copies=128),
             layer_fp8=L.time_graph(*L.v_module(M, N, K, "fp8"), max_copies=128))
    if M <= B.G.MAX_TOKENS:
        t["mma"] = L.time_graph(*B.v_gemm(M, N, K, "mma"), max_copies=128)
    t["sweep"] = sweep(M, N, K) if with_sweep else {}
    ratio = lambda us: f"{us:.2f} ({t['bf16'] / us:.2f}x)"  # noqa: E731
    best = min(t["sweep"], key=t["sweep"].get) if t["sweep"] else None
    log(f"M={M} {N}x{K}: bf16 {t['bf16']:.2f} us | wgmma {S.pick_config(M, N, K)} {ratio(t['wgmma'])}"
        + (f" | mma {ratio(t['mma'])}" if "mma" in t else "")
        + (f" | best {best} {ratio(t['sweep'][best])}" if best else "")
        + f" | layers: kernel 1 + wgmma {ratio(t['layer_wgmma'])}, a16 module {ratio(t['layer_a16'])}, "
          f"fp8 module {ratio(t['layer_fp8'])}")
    if best:
        log("   sweep " + " ".join(f"{k}={v:.2f}" for k, v in sorted(t["sweep"].items(), key=lambda kv: kv[1])))
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep the configurations (at --sweep-tokens)")
    ap.add_argument("--sweep-tokens", type=int, nargs="+", default=list(SWEEP_TOKENS))
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    ap.add_argument("--skip-check", action="store_true", help="timings only (the GPU tests check the numerics)")
    ap.add_argument("--shapes", nargs="+", type=B.layer_shape, default=list(L.SHAPES),
                    help="N x K of the timed layers (default: the FLUX shapes)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if any(not 1 <= M <= S.MAX_TOKENS for M in args.tokens):
        ap.error(f"--tokens must lie in 1..{S.MAX_TOKENS}")
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemm_w4_wgmma.py needs a CUDA GPU")
    if not args.skip_check:
        t0 = time.time()
        bad = check_correctness()
        log(f"correctness done in {time.time() - t0:.1f} s, bad={bad}")
    results = {f"{M}_{N}x{K}": time_shape(M, N, K, args.sweep and M in args.sweep_tokens)
               for M in args.tokens for (N, K) in args.shapes}
    log("\n| M | N x K | wgmma GEMM | best swept | kernel 1 + wgmma | mma GEMM | a16 layer | fp8 layer | bf16 us |\n"
        "|---|---|---|---|---|---|---|---|---|")
    for key, t in results.items():
        M, shape = key.split("_")
        x = lambda us: f"{t['bf16'] / us:.2f}x"  # noqa: E731
        best = x(min(t["sweep"].values())) if t["sweep"] else "-"
        log(f"| {M} | {shape} | {x(t['wgmma'])} | {best} | {x(t['layer_wgmma'])} | "
            f"{x(t['mma']) if 'mma' in t else '-'} | {x(t['layer_a16'])} | {x(t['layer_fp8'])} | {t['bf16']:.1f} |")
    atomic_write(os.path.join(args.out, "gemm_w4_wgmma.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    main()
