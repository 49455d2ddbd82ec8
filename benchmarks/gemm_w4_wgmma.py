"""The Hopper W4A16 GEMM (``quantduo.kernels.gemm_w4_wgmma``, Gluon, sm_90) on a CUDA GPU: correctness against the
exact-weight reference, then timings at FLUX shapes, 64 to 4608 tokens, against bf16 ``F.linear``: the GEMM alone
with its rank-32 + bias epilogue, the layer through it (kernel 1: smoothing + low-rank down-projection, then the
GEMM), and the engine's layers as they run without it (``a16``: the weight reconstructed into a scratch buffer +
cuBLAS; ``fp8``: the weight expanded into fp8 + ``torch._scaled_mm``); CUDA-graph replays over rotating buffers (us).

    PYTHONPATH=. python3 benchmarks/gemm_w4_wgmma.py [--sweep] [--tokens 64 128 256] [--shapes 3072x3072 ...]
                                                  [--skip-check] [--out DIR]

``--sweep`` adds a configuration sweep (token block x warps x stages x program count). Writes ``gemm_w4_wgmma.json``
to DIR.
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
import linear as L  # noqa: E402  (benchmarks/linear.py: layers, bf16 variant, time_graph)

from quantduo.formats import reference as ref  # noqa: E402
from quantduo.kernels import gemm_w4_wgmma as W  # noqa: E402
from quantduo.kernels.act_quant import act_quant  # noqa: E402
from quantduo.kernels.dequant_w4 import dequant_w4  # noqa: E402
from quantduo.utils import atomic_write, relative_error  # noqa: E402


def log(*a):
    print(*a, flush=True)


def operands(M, N, K, dtype=torch.bfloat16):
    """A random rank-32 INT4 layer, ``x [M, K]`` and kernel 1's smoothed activations and low-rank partials."""
    m = L.random_module(N, K, "none", rank=L.RANK, execution="a16")
    if dtype != torch.bfloat16:
        m = m.to(dtype)
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    a, _, lxp = act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")
    return m, x, a, lxp


def gemm(m, a, lxp, **kw):
    return W.w4a16_wgmma_gemm(a, m.qweight, m.wscales, lxp, m.proj_up, m.bias, a.dtype, **kw)


def layer(m, x, **kw):
    """What the engine's a16 path would run with this kernel: kernel 1, then the GEMM."""
    a, _, lxp = act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")
    return gemm(m, a, lxp, **kw)


CHECK_CONFIGS = [None, dict(TOKENS_BLOCK=64), dict(TOKENS_BLOCK=256, SPLIT_K=1), dict(WARPS=8, STAGES=4),
                 dict(TOKENS_BLOCK=128, STAGES=2, SPLIT_K=2)]


def check_correctness() -> int:
    """The GEMM against ``w4_gemv_ref`` (exact float32 weights) at FLUX and odd shapes, 65-600 tokens, every
    CHECK_CONFIGS entry, bf16 and fp16, with and without GELU; returns the number of failures."""
    bad = 0
    cases = [(N, K, M, gelu, cfg, dtype) for (N, K) in [(3072, 3072), (200, 192), (12288, 3072)]
             for M in (1, 65, 130, 256, 600) for gelu in (False, True) for cfg in CHECK_CONFIGS
             for dtype in (torch.bfloat16, torch.float16) if dtype == torch.bfloat16 or cfg is None]
    for N, K, M, gelu, cfg, dtype in cases:
        m, _, a, lxp = operands(M, N, K, dtype)
        expected = ref.w4_gemv_ref(a, m.qweight, m.wscales, lxp.sum(0), m.proj_up, m.bias, dtype)
        if gelu:
            expected = F.gelu(expected.float(), approximate="tanh").to(dtype)
        try:
            got = gemm(m, a, lxp, gelu=gelu, config=cfg)
            err = relative_error(got, expected)
            repeat = (got.float() - gemm(m, a, lxp, gelu=gelu, config=cfg).float()).abs().max().item()
        except Exception:  # noqa: BLE001 - a failing case is reported, the others still run
            err, repeat = float("nan"), None
            log("FAIL", N, K, M, gelu, cfg, traceback.format_exc()[-1500:])
        ok = err < 5e-3
        bad += not ok
        if not ok or M in (130, 600):
            log(f"check N={N} K={K} M={M} gelu={gelu} cfg={cfg} {dtype}: rel err vs exact {err:.2e} "
                f"repeat diff {repeat} {'ok' if ok else 'BAD'}")
    return bad


def v_gemm(M, N, K, config=None):
    """time_graph variant: the GEMM alone on ready operands."""
    def make():
        m, _, a, lxp = operands(M, N, K)
        return lambda: gemm(m, a, lxp, config=config)
    return make, N * K * 0.53 + 2 * M * K + 2 * M * N


def v_layer(M, N, K):
    def make():
        m, x, _, _ = operands(M, N, K)
        return lambda: layer(m, x)
    return make, N * K * 0.53 + 2 * M * K + 2 * M * N


def v_dequant(M, N, K):
    """The a16 execution's path above 64 tokens without this kernel: the weight reconstructed (residual + low-rank,
    smoothing folded) into a bf16 scratch buffer, then cuBLAS."""
    def make():
        m, x, _, _ = operands(M, N, K)
        return lambda: F.linear(x, dequant_w4(m.qweight, m.wscales, x.dtype, 64, m.proj_down, m.proj_up,
                                              m.smooth_factor), m.bias)
    return make, N * K * 4.53 + 2 * M * K + 2 * M * N


def sweep_configs(M, N, K):
    """Token blocks (64 / 128 / 256, those <= 2 M) x warps (4, 8) x stages (2-4; 6 for 64 tokens), SPLIT_K for ~264
    programs; the
    default with ~132 and ~528 programs."""
    configs = []
    for tok in W.TOKENS_BLOCKS:
        if tok > 2 * max(M, 64):
            continue
        for warps in (4, 8):
            if tok == 256 and warps == 8:
                continue
            for stages in (2, 3, 4, 6) if tok == 64 else (2, 3, 4):
                split = W.split_k(W.tile_count(M, N, warps, tok), K, 264)
                configs.append(dict(WARPS=warps, SPLIT_K=split, TOKENS_BLOCK=tok, STAGES=stages))
    for programs in (132, 528):
        configs.append(W.pick_config(M, N, K, programs))
    return configs


def sweep(M, N, K) -> dict:
    timings = {}
    for cfg in sweep_configs(M, N, K):
        key = json.dumps(cfg)
        if key in timings:
            continue
        try:
            timings[key] = L.time_graph(*v_gemm(M, N, K, config=cfg), max_copies=64)
        except Exception as ex:  # noqa: BLE001 - a config that does not compile or fit is reported
            log("cfg fail", cfg, str(ex)[:200])
    return timings


def time_shape(M, N, K, with_sweep: bool) -> dict:
    t = dict(bf16=L.time_graph(*L.v_bf16(M, N, K), max_copies=64))
    t["gemm"] = L.time_graph(*v_gemm(M, N, K), max_copies=64)
    t["layer"] = L.time_graph(*v_layer(M, N, K), max_copies=64)
    t["dequant"] = L.time_graph(*v_dequant(M, N, K), max_copies=64)
    t["expanded"] = L.time_graph(*L.v_fp8_path(M, N, K, "expanded"), max_copies=64)
    t["engine_fp8"] = L.time_graph(*L.v_module(M, N, K, "fp8"), max_copies=64)
    t["sweep"] = sweep(M, N, K) if with_sweep else {}
    ratio = lambda us: f"{us:.2f} ({t['bf16'] / us:.2f}x)"  # noqa: E731
    best = min(t["sweep"], key=t["sweep"].get) if t["sweep"] else None
    log(f"M={M} {N}x{K}: bf16 {t['bf16']:.2f} us | wgmma GEMM {W.pick_config(M, N, K)} {ratio(t['gemm'])}"
        + (f" best {best} {ratio(t['sweep'][best])}" if best else "")
        + f" | layer (kernel 1 + GEMM) {ratio(t['layer'])} | dequant + cuBLAS {ratio(t['dequant'])}"
        f" | fp8 expansion + _scaled_mm {ratio(t['expanded'])} | fp8 execution as dispatched "
        f"{ratio(t['engine_fp8'])}")
    if best:
        log("   sweep " + " ".join(f"{k}={v:.2f}" for k, v in sorted(t["sweep"].items(), key=lambda kv: kv[1])))
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep the configurations")
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 96, 128, 192, 256, 384, 512, 1024, 4608])
    ap.add_argument("--skip-check", action="store_true", help="timings only (the GPU tests check the numerics)")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in L.SHAPES],
                    help="N x K of the timed layers (default: the FLUX shapes)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        raise SystemExit("benchmarks/gemm_w4_wgmma.py needs an sm_90 GPU (H100 / H200)")
    results = dict(device=torch.cuda.get_device_name(), rows={})
    if not args.skip_check:
        t0 = time.time()
        results["check_failures"] = check_correctness()
        log(f"correctness: {results['check_failures']} failures ({time.time() - t0:.0f} s)")
    for shape in args.shapes:
        N, K = map(int, shape.split("x"))
        for M in args.tokens:
            try:
                results["rows"][f"{M}x{N}x{K}"] = time_shape(M, N, K, args.sweep)
            except Exception:  # noqa: BLE001 - keep the other shapes
                log("FAIL timing", M, N, K, traceback.format_exc()[-1500:])
    log("\n| M | N x K | GEMM | layer (kernel 1 + GEMM) | dequant + cuBLAS | fp8 expansion | fp8 as dispatched | "
        "bf16 us |\n|---|---|---|---|---|---|---|---|")
    for key, t in results["rows"].items():
        M, N, K = key.split("x")
        x = lambda name: f"{t['bf16'] / t[name]:.2f}x"  # noqa: E731
        log(f"| {M} | {N}x{K} | {x('gemm')} | {x('layer')} | {x('dequant')} | {x('expanded')} | {x('engine_fp8')} "
            f"| {t['bf16']:.1f} |")
    atomic_write(os.path.join(args.out, "gemm_w4_wgmma.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    main()
