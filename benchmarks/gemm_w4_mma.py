"""The few-token register-operand GEMM (``quantduo.kernels.gemm_w4_mma``, Gluon) on a CUDA GPU: correctness against the
skinny Triton GEMM (every token-block size and both decodes), then timings at FLUX shapes, 1 to 64 tokens, against
bf16 ``F.linear``: the GEMM alone with its rank-32 + bias epilogue (and the skinny GEMM's) and the layer (the a16
execution, also the fp8 execution's up to 64 tokens: kernel 1 (smoothing + low-rank down-projection) + GEMM, one token
included); CUDA-graph replays over rotating buffers (us).

    PYTHONPATH=. python3 benchmarks/gemm_w4_mma.py [--sweep] [--tokens 16 32 64] [--shapes 4096x4096 ...]
                                                [--skip-check] [--out DIR]

``--sweep`` adds a configuration sweep (token block x row tiles x decode, groups in flight, and the program count) at
1, 16, 32, 48 and 64 tokens. Writes ``gemm_w4_mma.json`` to DIR.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear as L  # noqa: E402  (benchmarks/linear.py: layers, bf16 / skinny variants, time_graph)

from quantduo.kernels import gemm_w4_mma as G  # noqa: E402
from quantduo.kernels.act_quant import act_quant  # noqa: E402
from quantduo.kernels.gemm_w4_skinny import w4_skinny_gemm  # noqa: E402
from quantduo.utils import atomic_write, relative_error  # noqa: E402

SWEEP_TOKENS = (1, 16, 32, 48, 64)
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


# configurations checked beside the default at 17-64 tokens: every token block and both decodes
VARIANTS = [dict(TOKENS_BLOCK=16, SIGNED=False), dict(TOKENS_BLOCK=16, SIGNED=True), dict(TOKENS_BLOCK=32, SIGNED=False),
            dict(TOKENS_BLOCK=32, SIGNED=True), dict(TOKENS_BLOCK=32, ROW_TILES=1)]


def check_correctness() -> int:
    """The Gluon GEMM against the skinny GEMM (same epilogue) at FLUX shapes and two odd ones, 1-64 tokens, and every
    VARIANTS configuration at 40 and 64 tokens; returns the number of failures."""
    bad = 0
    cases = [(N, K, M, gelu, None) for (N, K) in L.SHAPES + [(96, 128), (200, 192)] for M in (1, 5, 16, 17, 40, 64)
             for gelu in (False, True)]
    cases += [(N, K, M, False, cfg) for (N, K) in ((3072, 3072), (200, 192)) for M in (40, 64) for cfg in VARIANTS]
    for N, K, M, gelu, cfg in cases:
        m, _, a, lxp = operands(M, N, K)
        expected = GEMMS["skinny"](m, a, lxp, gelu=gelu)
        try:
            got = GEMMS["mma"](m, a, lxp, gelu=gelu, config=cfg)
            err = relative_error(got, expected)
            repeat = (got - GEMMS["mma"](m, a, lxp, gelu=gelu, config=cfg)).abs().max().item()
        except Exception:  # noqa: BLE001 - a failing case is reported, the others still run
            err, repeat = float("nan"), None
            log("FAIL", N, K, M, gelu, cfg, traceback.format_exc()[-1500:])
        ok = err < 5e-3
        bad += not ok
        if not ok or cfg or M in (16, 64):
            log(f"check N={N} K={K} M={M} gelu={gelu} cfg={cfg}: rel err vs skinny {err:.2e} repeat diff {repeat} "
                f"{'ok' if ok else 'BAD'}")
    return bad


def v_gemm(M, N, K, gemm, config=None):
    """time_graph variant: the GEMM alone on ready operands."""
    kw = {} if config is None else dict(config=config)

    def make():
        m, _, a, lxp = operands(M, N, K)
        return lambda: GEMMS[gemm](m, a, lxp, **kw)
    return make, N * K * 0.53 + 2 * M * K + 2 * M * N


def sweep_configs(M, N, K):
    """Token block (16 / 32 above 16 tokens) x row tiles (1, 2) x decode, each with SPLIT_K for ~384 programs; the
    default with 1 / 2 / 3 groups in flight (``STAGES``; its own default: :data:`G.STAGES`) and with ~132 / ~256 /
    ~768 programs."""
    blocks = (16,) if M <= 16 else (16, 32)
    configs = []
    for block in blocks:
        for row_tiles in (1, 2):
            split = G.split_k(G.tile_count(M, N, row_tiles, block), K)
            for signed in (False, True):
                configs.append(dict(ROW_TILES=row_tiles, SPLIT_K=split, TOKENS_BLOCK=block, SIGNED=signed))
    for stages in (1, 2, 3):
        configs.append(dict(G.pick_config(M, N, K), STAGES=stages))
    for programs in (132, 256, 768):
        configs.append(G.pick_config(M, N, K, programs))
    return configs


def sweep(M, N, K) -> dict:
    """us of the Gluon GEMM per :func:`sweep_configs` configuration (JSON keys)."""
    timings = {}
    for cfg in sweep_configs(M, N, K):
        key = json.dumps(cfg)
        if key in timings:
            continue
        try:
            timings[key] = L.time_graph(*v_gemm(M, N, K, "mma", config=cfg), max_copies=128)
        except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported
            log("cfg fail", cfg, str(ex)[:200])
    return timings


def time_shape(M, N, K, with_sweep: bool) -> dict:
    t = dict(bf16=L.time_graph(*L.v_bf16(M, N, K), max_copies=128))
    for gemm in GEMMS:
        t[gemm] = L.time_graph(*v_gemm(M, N, K, gemm), max_copies=128)
    t["layer_a16"] = L.time_graph(*L.v_module(M, N, K, "a16"), max_copies=128)
    t["sweep"] = sweep(M, N, K) if with_sweep else {}
    ratio = lambda us: f"{us:.2f} ({t['bf16'] / us:.2f}x)"  # noqa: E731
    best = min(t["sweep"], key=t["sweep"].get) if t["sweep"] else None
    log(f"M={M} {N}x{K}: bf16 {t['bf16']:.2f} us | skinny {ratio(t['skinny'])} | mma default "
        f"{G.pick_config(M, N, K)} {ratio(t['mma'])}" + (f" best {best} {ratio(t['sweep'][best])}" if best else "")
        + f" | layer (a16 module: kernel 1 + GEMM) {ratio(t['layer_a16'])}")
    if best:
        log("   sweep " + " ".join(f"{k}={v:.2f}" for k, v in sorted(t["sweep"].items(), key=lambda kv: kv[1])))
    return t


def layer_shape(text: str) -> tuple[int, int]:
    """``"NxK"`` -> (N, K), K a multiple of 64 (argparse type: a bad shape stops before any GPU work)."""
    try:
        N, K = (int(v) for v in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not N x K (e.g. 3072x3072)") from None
    if N <= 0 or K <= 0 or K % 64:
        raise argparse.ArgumentTypeError(f"shape {text!r}: N and K must be positive and K a multiple of 64")
    return N, K


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep the configurations at 1, 16, 32, 48 and 64 tokens")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 24, 32, 48, 64, 8, 4])
    ap.add_argument("--skip-check", action="store_true", help="timings only (the GPU tests check the numerics)")
    ap.add_argument("--shapes", nargs="+", type=layer_shape, default=list(L.SHAPES),
                    help="N x K of the timed layers (default: the FLUX shapes)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gemm_w4_mma.py needs a CUDA GPU")
    if not args.skip_check:
        t0 = time.time()
        bad = check_correctness()
        log(f"correctness done in {time.time() - t0:.1f} s, bad={bad}")
    results = {f"{M}_{N}x{K}": time_shape(M, N, K, args.sweep and M in SWEEP_TOKENS)
               for M in args.tokens for (N, K) in args.shapes}
    log("\n| M | N x K | GEMM (mma) | skinny GEMM | layer a16 | bf16 us |\n|---|---|---|---|---|---|")
    for key, t in results.items():
        M, shape = key.split("_")
        x = lambda name: f"{t['bf16'] / t[name]:.2f}x"  # noqa: E731
        log(f"| {M} | {shape} | {x('mma')} | {x('skinny')} | {x('layer_a16')} | {t['bf16']:.1f} |")
    atomic_write(os.path.join(args.out, "gemm_w4_mma.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    main()
