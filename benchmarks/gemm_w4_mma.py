"""The few-token register-operand GEMM (``quantduo.kernels.gemm_w4_mma``, Gluon) on a CUDA GPU: correctness against the
skinny Triton GEMM, then timings at FLUX shapes against bf16 ``F.linear`` and the skinny GEMM (the GEMM alone with its
rank-32 + bias epilogue, and the layer = kernel 1 + GEMM), CUDA-graph replays over rotating buffers (us).

    PYTHONPATH=. python3 benchmarks/gemm_w4_mma.py [--sweep] [--out DIR]

``--sweep`` adds a tile sweep (ROW_TILES x SPLIT_K) at 16 tokens. Writes ``gemm_w4_mma.json`` to DIR.
"""
import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch

import linear as L  # benchmarks/linear.py
from quantduo.kernels.act_quant import act_quant
from quantduo.kernels.gemm_w4_skinny import w4_skinny_gemm
from quantduo.kernels import gemm_w4_mma as G
from quantduo.utils import relative_error

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--sweep", action="store_true")
ap.add_argument("--out", default=os.environ.get("OUT", "."))
ARGS = ap.parse_args()
res = {}


def log(*a):
    print(*a, flush=True)


def operands(M, N, K, dtype=torch.bfloat16, rank=32):
    m = L.random_module(N, K, "none", rank=rank, execution="a16")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a, _, lxp = act_quant(x, m.smooth_factor, None, m.proj_down if rank else None, "smooth")
    return m, x, a, lxp


# correctness
t0 = time.time()
bad = 0
for (N, K) in L.SHAPES + [(96, 128), (200, 192)]:
    for M in (1, 5, 16):
        for gelu in (False, True):
            m, x, a, lxp = operands(M, N, K)
            ref = w4_skinny_gemm(a, None, m.qweight, m.wscales, lxp, m.proj_up, m.bias, "none", x.dtype, gelu=gelu)
            try:
                got = G.w4a16_mma_gemm(a, m.qweight, m.wscales, lxp, m.proj_up, m.bias, x.dtype, gelu=gelu)
                got2 = G.w4a16_mma_gemm(a, m.qweight, m.wscales, lxp, m.proj_up, m.bias, x.dtype, gelu=gelu)
                err = relative_error(got, ref)
                rep = (got - got2).abs().max().item()
            except Exception:  # noqa: BLE001 - a failing case is reported, the others still run
                err, rep = float("nan"), None
                log("FAIL", N, K, M, gelu, traceback.format_exc()[-1500:])
            ok = err < 5e-3
            bad += not ok
            log(f"check N={N} K={K} M={M} gelu={gelu}: rel err vs skinny {err:.2e} repeat diff {rep} {'ok' if ok else 'BAD'}")
log(f"correctness done in {time.time() - t0:.1f} s, bad={bad}")

# timing
for M in (16, 8, 4):
    for (N, K) in L.SHAPES:
        tb = L.time_graph(*L.v_bf16(M, N, K), max_copies=128)
        ts = L.time_graph(*L.v_skinny(M, N, K, "none"), max_copies=128)
        def v_mma(cfg=None):
            def make():
                m, x, a, lxp = operands(M, N, K)
                return lambda: G.w4a16_mma_gemm(a, m.qweight, m.wscales, lxp, m.proj_up, m.bias, x.dtype, config=cfg)
            return make, N * K * 0.53 + 2 * M * K + 2 * M * N
        tm = L.time_graph(*v_mma(), max_copies=128)
        sweep = {}
        if M == 16 and ARGS.sweep:
            groups = K // 64
            for rt in (2, 4):
                for split in [d for d in range(1, groups + 1) if groups % d == 0 and groups // d >= 1]:
                    tiles = -(-N // (64 * rt))
                    if not (128 <= tiles * split <= 800):
                        continue
                    cfg = dict(ROW_TILES=rt, SPLIT_K=split)
                    try:
                        sweep[json.dumps(cfg)] = L.time_graph(*v_mma(cfg), max_copies=128)
                    except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported
                        log("cfg fail", cfg, str(ex)[:200])
        best = min(sweep, key=sweep.get) if sweep else None
        # module-level: kernel 1 + GEMM
        def v_layer(kind):
            def make():
                m, x, a, lxp = operands(M, N, K)
                return (lambda: _layer(m, x)) if kind == "mma" else (lambda: m(x))
            return make, N * K * 0.53 + 2 * M * K + 2 * M * N
        def _layer(m, x):
            a, _, lxp = act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")
            return G.w4a16_mma_gemm(a, m.qweight, m.wscales, lxp, m.proj_up, m.bias, x.dtype)
        tlm = L.time_graph(*v_layer("mma"), max_copies=128)
        tls = L.time_graph(*v_layer("module"), max_copies=128)
        log(f"M={M} {N}x{K}: bf16 {tb:.2f} us | skinny {ts:.2f} ({tb/ts:.2f}x) | mma default {G.pick_config(N, K)} {tm:.2f} ({tb/tm:.2f}x)"
            + (f" best {best} {sweep[best]:.2f} ({tb/sweep[best]:.2f}x)" if best else "")
            + f" | layer: kernel1+skinny (module) {tls:.2f} ({tb/tls:.2f}x), kernel1+mma {tlm:.2f} ({tb/tlm:.2f}x)")
        if sweep:
            log("   sweep " + " ".join(f"{k}={v:.2f}" for k, v in sorted(sweep.items(), key=lambda t: t[1])[:12]))
        res[f"{M}_{N}x{K}"] = dict(bf16=tb, skinny=ts, mma=tm, sweep=sweep, layer_skinny=tls, layer_mma=tlm)
json.dump(res, open(os.path.join(ARGS.out, "gemm_w4_mma.json"), "w"), indent=1)
