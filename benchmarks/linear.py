"""Check and time the executions of the 4-bit linear layer at FLUX.1 shapes against bf16 ``F.linear`` (one GPU call).

    PYTHONPATH=. python benchmarks/linear.py [--tokens M ...] [--small | --small-sweep | --mid | --fp8exec |
                                                           --gelu-quant | --decode]
                                             [--sweep] [--quality] [--no-table] [--smoke] [--out DIR]

Layers: ``SVDQuantLinear`` INT4-g64, rank 32, bf16, random buffers; one stored W4A4 layer run by each execution of
:mod:`quantduo.formats.registry` (dispatch: :mod:`quantduo.engine.linear`):

* ``exact`` — W4A4: up to 64 tokens kernel 1 (4-bit codes) + the skinny split-K GEMM; more tokens kernel 1's
  dequantized activations + the dequantized residual + cuBLAS + a rank-r update;
* ``a16`` — 16-bit activations: one token the GEMV, up to 64 the skinny GEMM, more the weight reconstructed into a
  scratch buffer + cuBLAS;
* ``fp8`` — above 64 tokens per-token fp8 activations x the weight expanded into fp8 + one row-wise scaled
  ``torch._scaled_mm`` (fast accumulation; ``fp8_precise``: float32 promotion), ``a16`` below;
* ``w4a16`` — the weight-only baseline (``act_format="none"``, no low-rank branch, exact = a16);
* ``scaled_mm`` — the fp8 GEMM alone on ready fp8 operands (above 64 tokens);
* ``tinygemm`` / ``tinygemm_lr`` — PyTorch's int4 tinygemm on the same codes (up to 64 tokens): rank 0 alone, and
  the rank-32 layer around it in PyTorch ops (smoothing, low-rank branch, bias).

Default run: correctness of every execution against its PyTorch reference (M = 201 with leading dims, and the
few-token paths at M = 1, 16, 64, repeated: split-K workspaces), then the table at ``--tokens`` (default 1 4 16 64
4608). ``--small``: only the checks and the table at M = 1, 4, 16, 64. ``--small-sweep``: tiles of the skinny GEMM
and kernel 1 at M = 16. ``--mid``: 16 to 1024 tokens (``--tokens`` overrides), the fp8 execution's module as
dispatched (``a16`` up to 64 tokens) beside its expansion path (row quantization, expansion, ``_scaled_mm``) at
every token count, the expansion path checked against the fp8 reference first. ``--fp8exec`` (only) / ``--sweep``
(after the table): the fp8 execution's stages above 64 tokens (row quantization, the fp8 expansion with a tile
sweep, ``_scaled_mm``, the module). ``--gelu-quant``: the fp8 row quantization with its GELU at FLUX widths
(``--tokens``). ``--decode``: one token at Llama-3-8B shapes or (``--decode-shapes flux``) FLUX.1's modulation
layers (bf16, the ``a16`` module = smoothing + GEMV, the GEMV alone, PyTorch's int4 tinygemm, GEMV tiles).
``--quality``: output error vs the bf16 layer of each execution on SVDQuant-quantized synthetic FLUX-shaped layers
with outlier channels. ``--smoke``: the checks and the quality harness at tiny shapes, no timings (runs on the
CPU through Triton's interpreter, float16). Times: CUDA-graph replays over enough copies of the weights and inputs
to defeat the 50 MB L2, median of repeats. Writes ``linear_log.txt`` and ``linear_results.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import math
import os
import statistics
import time

import torch

if not torch.cuda.is_available():  # --smoke on the CPU: the Triton kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from quantduo.engine import linear as engine  # noqa: E402
from quantduo.engine.linear import (FP8_A16_MAX_TOKENS, SKINNY_MAX_TOKENS, a16_reference_forward,  # noqa: E402
                                    cpu_kernels, fp8_reference_forward, reference_forward)
from quantduo.formats import quantizers as qz  # noqa: E402
from quantduo.formats import reference as ref  # noqa: E402
from quantduo.formats.fp8 import quantize_fp8_per_token_ref, quantize_fp8_weight  # noqa: E402
from quantduo.kernels.act_quant import act_quant  # noqa: E402
from quantduo.kernels.dequant_w4 import dequant_w4  # noqa: E402
from quantduo.kernels.fp8_linear import expand_w4_fp8, quantize_fp8_per_token  # noqa: E402
from quantduo.kernels.gemm_w4_skinny import _pick as skinny_pick  # noqa: E402
from quantduo.kernels.gemm_w4_skinny import w4_skinny_gemm  # noqa: E402
from quantduo.kernels.gemv_w4 import w4_gemv  # noqa: E402
from quantduo.svdquant import SVDQuantLinear  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)]  # (N, K)
SMOKE_SHAPES = [(96, 128), (40, 192)]
LLAMA_SHAPES = {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
                "down_proj": (4096, 14336)}  # (N, K) of Llama-3-8B
# (N, K) of FLUX.1's modulation layers: all read silu(temb), one token per image (W4A16, the GEMV)
FLUX_MODULATION_SHAPES = {"double norm1(_context).linear": (18432, 3072), "single norm.linear": (9216, 3072),
                          "norm_out.linear": (6144, 3072)}
DECODE_SHAPES = {"llama": LLAMA_SHAPES, "flux": FLUX_MODULATION_SHAPES}
GEMV_SWEEP = [dict(BN=bn, BKW=bkw, num_warps=w, num_stages=s) for bn in (4, 8, 16, 32) for bkw in (64, 128, 256)
              for w in (4, 8) for s in (3,) if 512 <= bn * bkw <= 4096]
SMALL_TOKENS = [1, 4, 16, 64]
MID_TOKENS = [16, 32, 64, 128, 256, 512, 1024]
TOKENS = SMALL_TOKENS + [4608]
KINDS = ["w4a16", "exact", "a16", "fp8", "fp8_precise"]
RANK = 32
DEV = "cuda"
DTYPE = torch.bfloat16
L2_DEFEAT_BYTES = 200e6


def time_graph(make_call, bytes_per_call: float, reps: int = 15, max_copies: int = 32) -> float:
    """Median microseconds per call: a CUDA graph replays the call on C independent buffer sets."""
    copies = max(1, min(max_copies, math.ceil(L2_DEFEAT_BYTES / max(bytes_per_call, 1.0))))
    calls = [make_call() for _ in range(copies)]
    for c in calls:
        c()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up on the capture stream
            c()
        with torch.cuda.graph(graph, stream=stream):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / copies)
    del graph, calls
    return statistics.median(times)


def time_on_fresh_inputs(path, make_inputs, bytes_per_call: float) -> float:
    """:func:`time_graph` of ``path(inputs)``, each buffer set with its own ``make_inputs()`` (buffers past L2)."""
    def make_call():
        inputs = make_inputs()
        return lambda: path(inputs)
    return time_graph(make_call, bytes_per_call)


def random_module(n, k, act_format="int4", rank=RANK, execution="exact", fast_accum=None):
    """SVDQuantLinear with random (non-degenerate) buffers, run by ``execution``."""
    m = SVDQuantLinear(k, n, rank=rank, act_format=act_format, dtype=DTYPE, device=DEV)
    with torch.no_grad():
        m.qweight.copy_(qz.pack_int4(torch.randint(-7, 8, (n, k), device=DEV)))
        m.wscales.copy_(torch.rand(n, k // 64, device=DEV) * 0.02 + 0.001)
        m.smooth_factor.copy_(torch.rand(k, device=DEV) + 0.5)
        if act_format == "uint4":
            m.act_shift.fill_(0.17)
        if rank:
            m.proj_down.copy_(torch.randn(k, rank, device=DEV) * 0.05)
            m.proj_up.copy_(torch.randn(n, rank, device=DEV) * 0.05)
        m.bias.copy_(torch.randn(n, device=DEV) * 0.1)
    return m.set_execution(execution, fast_accum)


def kind_module(n, k, kind):
    """The layer of a table column (see the module docstring)."""
    if kind == "w4a16":
        return random_module(n, k, "none", rank=0)
    if kind == "fp8_precise":
        return random_module(n, k, execution="fp8", fast_accum=False)
    return random_module(n, k, execution=kind)


def expected_of(m, x):
    """The reference of ``m``'s execution for input ``x`` (fp8 up to FP8_A16_MAX_TOKENS tokens: a16)."""
    tokens = x.numel() // x.shape[-1]
    if m.execution in ("exact", "reference"):
        return reference_forward(m, x)
    if m.execution == "a16" or tokens <= FP8_A16_MAX_TOKENS:
        return a16_reference_forward(m, x)
    return fp8_reference_forward(m, x).reshape(*x.shape[:-1], m.out_features)


# ------------------------------------------------------------------------------------------------
# variants: each returns a factory of zero-argument calls over fresh buffers, plus bytes per call
# ------------------------------------------------------------------------------------------------
def v_bf16(M, N, K):
    def make():
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=DEV, dtype=torch.bfloat16) * 0.02
        b = torch.randn(N, device=DEV, dtype=torch.bfloat16)
        return lambda: F.linear(x, w, b)
    return make, 2 * (M * K + N * K + M * N)


def v_scaled_mm(M, N, K, fast_accum=True):
    """The fp8 GEMM alone: ready fp8 operands, row-wise scales, bias."""
    def make():
        x = torch.randn(M, K, device=DEV).to(torch.float8_e4m3fn)
        w = torch.randn(N, K, device=DEV).to(torch.float8_e4m3fn)
        sx = torch.rand(M, 1, device=DEV) + 0.5
        sw = torch.rand(1, N, device=DEV) + 0.5
        b = torch.randn(N, device=DEV, dtype=torch.bfloat16)
        return lambda: torch._scaled_mm(x, w.T, scale_a=sx, scale_b=sw, bias=b, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast_accum)
    return make, M * K + N * K + 2 * M * N


def v_module(M, N, K, kind):
    """The layer of a table column, called on bf16 ``x [M, K]``."""
    def make():
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        m = kind_module(N, K, kind)
        return lambda: m(x)
    return make, 2 * M * K + N * K * 0.53 + 2 * M * N


def v_decode(N, K, kind, config=None):
    """One token, INT4-g64 weights without low-rank; kind: gemv (the a16 module: smoothing op + GEMV) |
    gemv_nosmooth (the GEMV alone) | tinygemm."""
    def make():
        m = random_module(N, K, "none", rank=0, execution="a16")
        x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
        if kind == "tinygemm":
            packed, scales_zeros = tinygemm_operands(m)
            return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 64, scales_zeros)
        if kind == "gemv":
            return lambda: m(x)
        return lambda: w4_gemv(x, m.qweight, m.wscales, None, None, m.bias, x.dtype, config=config)
    return make, N * K * 0.5 + N * K // 64 * 2


def tinygemm_layer(m):
    """The rank-32 layer ``m`` as PyTorch ops around PyTorch's int4 tinygemm: ``x [M, K]`` bf16 -> ``[M, N]``
    (smoothing, the tinygemm GEMM on the same codes, the low-rank branch and the bias)."""
    packed, scales_zeros = tinygemm_operands(m)
    down, up = m.proj_down.to(DTYPE), m.proj_up.to(DTYPE)
    inv_smooth = (1.0 / m.smooth_factor).to(DTYPE)

    def layer(x):
        xs = x * inv_smooth
        y = torch.ops.aten._weight_int4pack_mm(xs, packed, 64, scales_zeros)
        return torch.addmm(y + m.bias, xs @ down, up.T)
    return layer


def v_tinygemm(M, N, K, lowrank):
    """PyTorch's int4 tinygemm (``_weight_int4pack_mm``) on the module's INT4-g64 codes: the weight-only GEMM alone
    (``lowrank`` false, rank 0), or the whole rank-32 layer of :func:`tinygemm_layer`: the few-token candidate of
    issue 20."""
    def make():
        m = random_module(N, K, "none" if not lowrank else "int4", rank=RANK if lowrank else 0, execution="a16")
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        if lowrank:
            layer = tinygemm_layer(m)
            return lambda: layer(x)
        packed, scales_zeros = tinygemm_operands(m)
        return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 64, scales_zeros)
    return make, N * K * 0.53 + 2 * M * K + 2 * M * N


def check_tinygemm(log, M=16):
    """The tinygemm rank-32 layer of :func:`tinygemm_layer` against the a16 reference at each FLUX shape."""
    for (N, K) in SHAPES:
        m = random_module(N, K, "int4", rank=RANK, execution="a16")
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        err = relative_error(tinygemm_layer(m)(x), a16_reference_forward(m, x))
        log(f"  tinygemm_lr M={M} {N}x{K}: rel err vs a16 reference {err:.2e}")


def v_skinny(M, N, K, mode, config=None):
    """The skinny GEMM alone on ready activations: mode none (16-bit, smoothed) | int4 (kernel 1's codes)."""
    def make():
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        m = random_module(N, K)
        a, a_s, lxp = act_quant(x, m.smooth_factor, m.act_shift, m.proj_down, "smooth" if mode == "none" else mode)
        return lambda: w4_skinny_gemm(a, a_s, m.qweight, m.wscales, lxp, m.proj_up, m.bias, mode, x.dtype,
                                      config=config)
    return make, N * K * 0.53 + 2 * M * K + 2 * M * N


# ------------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------------
def _kernels_context():
    return contextlib.nullcontext() if DEV == "cuda" else cpu_kernels()


def check_kernels(log, shape=(3072, 3072), M=201):
    """Kernel-level checks: kernel 1's codes and scales and the fp8 row kernel bit-exact vs their references, the
    fp8 expansion at most one code apart."""
    torch.manual_seed(0)
    N, K = shape
    m = random_module(N, K, "int4", execution="fp8")
    x = torch.randn(M, K, device=DEV, dtype=DTYPE)
    failed = []
    with _kernels_context():
        for mode in ("int4", "uint4"):
            q, qs, lxp = act_quant(x, m.smooth_factor, m.act_shift, m.proj_down, mode)
            rq, rqs, rlx = ref.act_quant_ref(x, m.smooth_factor, m.act_shift, m.proj_down, mode)
            codes, scales = (q != rq).sum().item(), (qs != rqs).sum().item()
            lx_err = relative_error(lxp.sum(0), rlx)
            log(f"  kernel1 {mode}: code mismatches {codes} / {q.numel()}, scale mismatches {scales}, "
                f"lx rel err {lx_err:.1e}")
            if codes or scales or not lx_err < 1e-2:
                failed.append(f"kernel1 {mode}")
        q, s = quantize_fp8_per_token(x)
        rq, rs = quantize_fp8_per_token_ref(x)
        mismatches = (q.view(torch.uint8) != rq.view(torch.uint8)).sum().item()
        log(f"  fp8 row kernel: code mismatches {mismatches} / {q.numel()}, scale mismatches {(s != rs).sum().item()}")
        if mismatches or not torch.equal(s, rs):
            failed.append("fp8 row kernel")
        w8 = expand_w4_fp8(m.qweight, m.wscales, m.proj_down, m.proj_up, m.fp8_inv_smooth, m.fp8_inv_wscale, 64)
        expected = quantize_fp8_weight(
            ref.w4_dequant_ref(m.qweight, m.wscales, torch.float32, 64, m.proj_down, m.proj_up, m.smooth_factor),
            m.fp8_inv_wscale).to(torch.float8_e4m3fn)
        step = lambda t: torch.where(t.view(torch.uint8).int() >= 128, 128 - t.view(torch.uint8).int(),  # noqa: E731
                                     t.view(torch.uint8).int())
        apart = (step(w8) - step(expected)).abs()
        log(f"  fp8 expansion: codes apart max {apart.max().item()}, mean {apart.float().mean().item():.1e}")
        if apart.max() > 1 or apart.float().mean() > 1e-3:
            failed.append("fp8 expansion")
    return failed


def check_correctness(log, shapes=None, small_only=False):
    """Every execution vs its PyTorch reference at real K / N (M = 201 with leading dims, and M = 1, 16, 64 with 5
    repeats for the split-K workspaces); a path that raises is reported as failed and the run goes on."""
    failed = check_kernels(log, (shapes or SHAPES)[0])
    torch.manual_seed(0)
    worst = {}

    def check(name, actual, expected):
        try:
            with _kernels_context():
                worst[name] = max(relative_error(actual(), expected) for _ in range(5 if "repeats" in name else 1))
        except Exception as ex:  # noqa: BLE001 - reported below
            log(f"  correctness {name}: raised {type(ex).__name__}: {str(ex)[:200]}")
            worst[name] = float("inf")

    for (N, K) in shapes or SHAPES:
        x = torch.randn(3, 67, K, device=DEV, dtype=DTYPE)  # leading dims, M = 201
        inputs = [(M, x[0, :M], M > 1) for M in (1, 16, 64)] + ([] if small_only else [(201, x, False)])
        for fmt in ("int4", "uint4", "none"):
            for execution in ("exact", "fp8") if fmt == "none" else ("exact", "a16", "fp8"):
                for rank in (RANK, 0) if fmt == "none" and execution == "exact" else (RANK,):
                    m = random_module(N, K, fmt, rank=rank, execution=execution)
                    for M, xm, repeats in inputs:
                        name = f"{fmt} r{rank} {execution} M={M} {N}x{K}" + (" repeats" if repeats else "")
                        check(name, lambda: m(xm), expected_of(m, xm))
            if fmt != "none" and not small_only:  # precise fp8 accumulation
                m = random_module(N, K, fmt, execution="fp8", fast_accum=False)
                check(f"{fmt} fp8_precise M=201 {N}x{K}", lambda: m(x), expected_of(m, x))
    N, K = (shapes or SHAPES)[0]
    nv = SVDQuantLinear(K, N, rank=RANK, weight_format="nvfp4", act_format="nvfp4", dtype=DTYPE, device=DEV)
    with torch.no_grad():
        codes, sc, gs = qz.quantize_nvfp4(torch.randn(N, K, device=DEV))
        nv.qweight.copy_(qz.pack_nibbles(codes)); nv.wscales.copy_(sc); nv.wscale_global.copy_(gs)
        nv.proj_down.normal_(0, 0.05); nv.proj_up.normal_(0, 0.05)
    nv.set_execution("exact")
    x = torch.randn(201, K, device=DEV, dtype=DTYPE)
    check(f"nvfp4 exact M=201 {N}x{K}", lambda: nv(x), nv.forward_reference(x))
    for k, v in worst.items():
        log(f"  correctness {k:40s} rel err {v:.2e}")
    # fp8 with fast accumulation (Hopper's fp8 accumulators not promoted along K): ~1e-3 more
    bad = failed + sorted(k for k, v in worst.items()
                          if not v < (8e-3 if " fp8 " in k and "M=201" in k else 5e-3))
    log(f"CORRECTNESS {'FAILED: ' + str(bad) if bad else 'passed'}")
    return dict(errors=worst, failed=bad)


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def table(log, results, tokens, key="table"):
    """Per execution, the module against bf16 F.linear at each M and FLUX shape; the fp8 GEMM alone above 64."""
    rows = []
    for M in tokens:
        for (N, K) in SHAPES:
            max_copies = 128 if M <= SKINNY_MAX_TOKENS else 32
            t = {"bf16": time_graph(*v_bf16(M, N, K), max_copies=max_copies)}
            for kind in KINDS:
                if kind == "fp8_precise" and M <= FP8_A16_MAX_TOKENS:
                    continue  # a16 there
                t[kind] = time_graph(*v_module(M, N, K, kind), max_copies=max_copies)
            if M > SKINNY_MAX_TOKENS:
                t["scaled_mm"] = time_graph(*v_scaled_mm(M, N, K))
            else:
                for name, lowrank in (("tinygemm", False), ("tinygemm_lr", True)):
                    try:
                        t[name] = time_graph(*v_tinygemm(M, N, K, lowrank), max_copies=max_copies)
                    except (RuntimeError, AttributeError) as ex:
                        log(f"  {name} unavailable: {str(ex)[:120]}")
            rows.append(dict(M=M, N=N, K=K, us=t))
            log(f"  M={M:5d} {N:5d}x{K:5d} " + " ".join(f"{k}={v:.1f}" for k, v in t.items()))
    names = KINDS + ["scaled_mm", "tinygemm", "tinygemm_lr"]
    log("\n| M | N x K | " + " | ".join(names) + " | bf16 us |")
    log("| --- | --- | " + " | ".join("---" for _ in names) + " | --- |")
    for r in rows:
        tb = r["us"]["bf16"]
        log(f"| {r['M']} | {r['N']}x{r['K']} | " + " | ".join(
            f"{tb / r['us'][n]:.2f}x" if n in r["us"] else "-" for n in names) + f" | {tb:.1f} |")
    for (N, K) in SHAPES:
        bits = {"w4a16": kind_module(N, K, "w4a16").storage_bits_per_weight(),
                "int4 (every execution)": kind_module(N, K, "exact").storage_bits_per_weight()}
        log(f"  bits/param {N}x{K} (rank {RANK}, incl. scales and low-rank): "
            + " ".join(f"{k}={v:.3f}" for k, v in bits.items()))
    results[key] = rows


SKINNY_SWEEP = [dict(BN=bn, split_mult=sm, num_warps=w, num_stages=st)
                for bn, w in ((64, 4), (128, 4), (128, 8)) for sm in (0.5, 1, 2) for st in (3, 4)]
ACT_SWEEP = [(16, bk, splits, 4) for bk in (32, 64) for splits in (4, 8, 16, 32, 64)]


def small_sweep(log, results, M=16):
    """Skinny GEMM tiles (16-bit activations; its 3 best also for 4-bit codes) and kernel-1 tiles (smoothing +
    low-rank) at M tokens, each timed alone."""
    for (N, K) in SHAPES:
        tb = time_graph(*v_bf16(M, N, K), max_copies=128)
        auto = skinny_pick(M, N, K)
        timings = {}
        for c in SKINNY_SWEEP:
            split = max(1, int(auto["SPLIT_K"] * c["split_mult"] * 64 / c["BN"]))
            if (K // 64) % split:
                continue
            cfg = dict(BM=auto["BM"], BN=c["BN"], SPLIT_K=split, num_warps=c["num_warps"], num_stages=c["num_stages"])
            try:
                timings[json.dumps(cfg)] = time_graph(*v_skinny(M, N, K, "none", config=cfg), max_copies=128)
            except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported and skipped
                log(f"    skinny {cfg} failed: {str(ex)[:100]}")
        ranked = sorted(timings, key=timings.get)
        a4 = {c: time_graph(*v_skinny(M, N, K, "int4", config=json.loads(c)), max_copies=128) for c in ranked[:3]}
        default = time_graph(*v_skinny(M, N, K, "none"), max_copies=128)
        log(f"  sweep M={M} {N}x{K}: bf16 {tb:.1f} us, default {auto} {default:.1f} us; best 16-bit "
            + "; ".join(f"{c} {timings[c]:.1f} us ({tb / timings[c]:.2f}x)" for c in ranked[:4])
            + "; 4-bit codes on the best tiles " + "; ".join(f"{c} {v:.1f} us ({tb / v:.2f}x)" for c, v in a4.items()))
        log("    all: " + " ".join(f"{c}={v:.1f}" for c, v in timings.items()))
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        m = random_module(N, K, "none")
        act = {}
        for c in ACT_SWEEP + [(16, 32, K // 32, 4), (16, 64, K // 64, 4)]:
            if K % (c[1] * c[2]):
                continue
            act[c] = time_graph(lambda c=c: (lambda: act_quant(x, m.smooth_factor, None, m.proj_down, "smooth",
                                                               config=c)), 2 * M * K, max_copies=128)
        best = min(act, key=act.get)
        default = time_graph(lambda: (lambda: act_quant(x, m.smooth_factor, None, m.proj_down, "smooth")), 2 * M * K,
                             max_copies=128)
        log(f"  kernel 1 (smooth + low-rank) M={M} K={K}: default {default:.1f} us, best {best} {act[best]:.1f} us; "
            "all " + " ".join(f"{c}={v:.1f}" for c, v in act.items()))
        results.setdefault("small_sweep", []).append(dict(N=N, K=K, bf16=tb, timings=timings, int4=a4,
                                                          act={str(c): v for c, v in act.items()}))


FP8_EXPAND_SWEEP = [None, (16, 256, 4), (32, 256, 4), (64, 128, 4), (64, 64, 4), (128, 64, 4), (64, 256, 8),
                    (128, 128, 8)]


def fp8exec(log, results, tokens):
    """The fp8 execution above 64 tokens: its stages alone (row quantization kernel, weight expansion with a tile
    sweep, ``_scaled_mm`` with and without fast accumulation) and the module, against bf16 ``F.linear``."""
    for M in (m for m in tokens if m > FP8_A16_MAX_TOKENS):
        for (N, K) in SHAPES:
            tb = time_graph(*v_bf16(M, N, K))
            copies = math.ceil(L2_DEFEAT_BYTES / (N * K))
            layers = [random_module(N, K, execution="fp8") for _ in range(copies)]

            def quant():
                x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
                return lambda: quantize_fp8_per_token(x)
            tq = time_graph(quant, 3 * M * K)
            expand = {}
            for cfg in FP8_EXPAND_SWEEP:  # rotating over distinct layers: weights come from memory, not L2
                layer = itertools.cycle(layers)
                try:
                    expand[str(cfg)] = time_graph(lambda: (lambda m: lambda: dequant_w4(
                        m.qweight, m.wscales, torch.float8_e4m3fn, 64, m.proj_down, m.proj_up, scratch=False,
                        config=cfg, row_scale=m.fp8_inv_wscale, inv_smooth=m.fp8_inv_smooth))(next(layer)),
                        1.5 * N * K)
                except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported and skipped
                    log(f"    expand fp8 {cfg} failed: {str(ex)[:100]}")
                    continue
                log(f"    expand fp8 M={M} {N}x{K} {cfg or 'default'}: {expand[str(cfg)]:.1f}us")
            best = min(expand, key=expand.get)
            tmm = time_graph(*v_scaled_mm(M, N, K, fast_accum=False))
            tmm_fast = time_graph(*v_scaled_mm(M, N, K, fast_accum=True))
            layer = itertools.cycle(layers)

            def module():
                x, m8 = torch.randn(M, K, device=DEV, dtype=torch.bfloat16), next(layer)
                return lambda: m8(x)
            tm = time_graph(module, 2 * M * K + 0.6 * N * K + 2 * M * N)
            row = dict(M=M, N=N, K=K, bf16=tb, quant=tq, expand_default=expand.get("None"), expand_best=expand[best],
                       expand_best_cfg=best, expand_sweep=expand, scaled_mm=tmm, scaled_mm_fast_accum=tmm_fast,
                       module=tm)
            results.setdefault("fp8exec", []).append(row)
            log(f"  fp8exec M={M} {N}x{K}: bf16 {tb:.1f}us | quant {tq:.1f} | expand default "
                f"{expand.get('None', float('nan')):.1f}, best {expand[best]:.1f} {best} | scaled_mm {tmm:.1f} "
                f"({tb / tmm:.2f}x), fast accum {tmm_fast:.1f} ({tb / tmm_fast:.2f}x) | module {tm:.1f} "
                f"({tb / tm:.2f}x; without quant {tb / max(tm - tq, 1e-3):.2f}x)")


def expanded_call(m, x):
    """The fp8 execution's expansion path of layer ``m`` on ``x [M, K]`` whatever the token count: row quantization,
    the weight expanded into fp8, ``_scaled_mm``."""
    xq, xs = quantize_fp8_per_token(x)
    return engine._fp8_gemm(m, xq, xs, x.dtype)


FP8_PATHS = ("module", "expanded")  # the columns of the --mid table


def v_fp8_path(M, N, K, path):
    """path: module (the fp8 execution as dispatched) | expanded (:func:`expanded_call`)."""
    def make():
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        m = random_module(N, K, execution="fp8")
        return (lambda: m(x)) if path == "module" else (lambda: expanded_call(m, x))
    return make, 2 * M * K + N * K * 0.53 + 2 * M * N


def check_expanded(log, m, M):
    """The expansion path of layer ``m`` against the fp8 reference at ``M`` tokens, logged (cuBLAS has no fp8
    algorithm for some few-token shapes: reported, not failed)."""
    N, K = m.out_features, m.in_features
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    try:
        with _kernels_context():
            err = relative_error(expanded_call(m, x), fp8_reference_forward(m, x))
    except RuntimeError as ex:
        log(f"  expanded M={M} {N}x{K}: {str(ex)[:100]}")
        return
    log(f"  check M={M} {N}x{K}: expanded {err:.2e}")
    if not err < 8e-3:
        log(f"CORRECTNESS FAILED M={M} {N}x{K}")


def mid_table(log, results, tokens):
    """16 to 1024 tokens: the fp8 execution's module as dispatched and its expansion path against bf16 F.linear,
    after checking the expansion path against the fp8 reference."""
    for (N, K) in SHAPES:
        m = random_module(N, K, execution="fp8")
        for M in sorted({min(tokens), 128, max(tokens)}):
            check_expanded(log, m, M)
    rows = []
    for M in tokens:
        for (N, K) in SHAPES:
            copies = 128 if M <= 256 else 32
            t = {"bf16": time_graph(*v_bf16(M, N, K), max_copies=copies)}
            for path in FP8_PATHS:
                try:
                    t[path] = time_graph(*v_fp8_path(M, N, K, path), max_copies=copies)
                except RuntimeError as ex:  # see check_expanded
                    t[path] = float("nan")
                    log(f"    {path} M={M} {N}x{K} failed: {str(ex)[:100]}")
            rows.append(dict(M=M, N=N, K=K, us=t))
            log(f"  M={M:5d} {N:5d}x{K:5d} " + " ".join(f"{k}={v:.1f}" for k, v in t.items()))
    log("\n| M | N x K | " + " | ".join(FP8_PATHS) + " | bf16 us |")
    log("| --- | --- | " + " | ".join("---" for _ in FP8_PATHS) + " | --- |")
    for r in rows:
        tb = r["us"]["bf16"]
        log(f"| {r['M']} | {r['N']}x{r['K']} | " + " | ".join(f"{tb / r['us'][n]:.2f}x" for n in FP8_PATHS)
            + f" | {tb:.1f} |")
    results["mid"] = rows


GELU_QUANT_WIDTHS = [(3072, 12288), (0, 12288)]  # FLUX single block: cat(attention, GELU(mlp)); GELU MLP fc2


def gelu_quant(log, results, tokens):
    """The fp8 row quantization with the GELU formed inside it (``quantize_fp8_per_token(prefix, h)``) at FLUX
    widths: microseconds and the bandwidth of its one read of the 16-bit inputs and one write of the codes."""
    for M in tokens:
        for kx, kg in GELU_QUANT_WIDTHS:
            bytes_moved = 3 * M * (kx + kg)  # bf16 read + fp8 write

            def call():
                h = torch.randn(M, kg, device=DEV, dtype=torch.bfloat16)
                prefix = torch.randn(M, kx, device=DEV, dtype=torch.bfloat16) if kx else None
                return lambda: quantize_fp8_per_token(prefix, h)
            us = time_graph(call, bytes_moved)
            results.setdefault("gelu_quant", []).append(dict(M=M, prefix=kx, gelu=kg, us=us))
            log(f"  gelu quant M={M} {kx}+{kg}: {us:.1f} us ({bytes_moved / us / 1e3:.0f} GB/s)")


def tinygemm_operands(m):
    """The module's INT4-g64 weights in PyTorch's tinygemm layout: unsigned codes q + 8 (w = (u - 8) * s + 0),
    scales and zeros ``[K / 64, N, 2]``."""
    unsigned = (qz.unpack_int4(m.qweight).to(torch.int32) + 8)
    packed = torch.ops.aten._convert_weight_to_int4pack(
        (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8), 8)
    scales = m.wscales.T.contiguous()
    return packed, torch.stack([scales, torch.zeros_like(scales)], dim=2).contiguous()


def decode_table(log, results, shapes=LLAMA_SHAPES):
    """M = 1 at ``shapes`` (name -> (N, K); Llama-3-8B's by default): correctness of the a16 module (GEMV) and
    tinygemm vs the reference, then times, and the GEMV tile sweep."""
    rows = {}
    for name, (N, K) in shapes.items():
        m = random_module(N, K, "none", rank=0, execution="a16")
        x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
        ref_y = m.forward_reference(x)
        err = {"gemv": relative_error(m(x), ref_y)}
        try:
            packed, sz = tinygemm_operands(m)
            xs = x / m.smooth_factor
            err["tinygemm"] = relative_error(torch.ops.aten._weight_int4pack_mm(xs, packed, 64, sz) + m.bias, ref_y)
        except (RuntimeError, AttributeError) as e:
            err["tinygemm"] = f"unavailable: {str(e)[:80]}"
        us = {"bf16": time_graph(*v_bf16(1, N, K))}
        for kind in ("gemv", "gemv_nosmooth", "tinygemm"):
            try:
                us[kind] = time_graph(*v_decode(N, K, kind), max_copies=128)
            except (RuntimeError, AttributeError) as e:
                us[kind] = float("nan")
                log(f"  {kind} failed: {str(e)[:120]}")
        sweep_us = {json.dumps(c): time_graph(*v_decode(N, K, "gemv_nosmooth", config=c), max_copies=128)
                    for c in GEMV_SWEEP}
        best = min(sweep_us, key=sweep_us.get)
        rows[name] = dict(N=N, K=K, err=err, us=us, best_config=best, best_us=sweep_us[best], sweep=sweep_us)
        log(f"  {name} N={N} K={K} err {err} us {us} best gemv config {best} {sweep_us[best]:.2f} us")
    log("\n| layer (N x K) | bf16 us | a16 module (smoothing + GEMV) | GEMV | best GEMV tile | tinygemm | "
        "GEMV rel. err |\n|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        b = r["us"]["bf16"]
        cells = [f"{b / r['us'][k]:.2f}x ({r['us'][k]:.1f} us)" for k in ("gemv", "gemv_nosmooth")]
        cells.append(f"{b / r['best_us']:.2f}x {r['best_config']}")
        cells.append(f"{b / r['us']['tinygemm']:.2f}x ({r['us']['tinygemm']:.1f} us)")
        log(f"| {name} ({r['N']}x{r['K']}) | {b:.1f} | " + " | ".join(cells) + f" | {r['err']['gemv']:.1e} |")
    results["decode"] = rows


# ------------------------------------------------------------------------------------------------
def quality(log, results, shapes=None, tokens=1024):
    """Output error vs the bf16 layer of each execution on SVDQuant-quantized synthetic FLUX-shaped layers (a
    low-rank-plus-noise weight, activations with per-channel magnitudes and outlier channels; the third layer's
    inputs post-GELU, quantized as shifted UINT4)."""
    from quantduo.svdquant import SVDQuantConfig, quantize_model

    torch.manual_seed(0)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[DTYPE]
    out = []
    for (N, K, post_gelu) in shapes or [(3072, 3072, False), (12288, 3072, False), (3072, 12288, True)]:
        lin = torch.nn.Linear(K, N, device=DEV)
        with torch.no_grad():
            lin.weight.normal_(0, K ** -0.5)
            lin.weight.add_(torch.randn(N, 64, device=DEV) @ torch.randn(64, K, device=DEV) * (0.3 * K ** -0.5 / 8))
        ch = torch.exp(torch.randn(K, device=DEV) * 0.8)  # per-channel magnitudes with outliers
        ch[torch.randperm(K, device=DEV)[:16]] *= 20

        def sample(n):
            x = torch.randn(n, K, device=DEV) * ch
            return F.gelu(x, approximate="tanh") if post_gelu else x
        calib, test = sample(tokens), sample(tokens)
        ref_lin = copy.deepcopy(lin)
        model, model16 = torch.nn.Sequential(lin), torch.nn.Sequential(copy.deepcopy(lin))
        cfg = SVDQuantConfig(lowrank_iters=20, search_tokens=min(512, tokens), dtype=dtype_name)
        quantize_model(model, lambda mdl: mdl(calib), cfg, progress=False)
        cfg16 = dataclasses.replace(cfg, act_format="none", w4a16_svdquant=True)
        quantize_model(model16, lambda mdl: mdl(calib), cfg16, progress=False)
        m, m16 = model[0], model16[0]
        y_bf16 = ref_lin.to(DTYPE)(test.to(DTYPE)).float()
        y_fp32 = test @ lin.weight.float().T + lin.bias.float()
        xb = test.to(DTYPE)
        mw16 = SVDQuantLinear(K, N, rank=0, act_format="none", dtype=DTYPE, device=DEV, execution="exact")
        with torch.no_grad():
            wq, ws = qz.quantize_int4(ref_lin.weight.float(), 64, DTYPE)
            mw16.qweight.copy_(qz.pack_int4(wq)); mw16.wscales.copy_(ws); mw16.bias.copy_(ref_lin.bias)
        ys = {}
        with _kernels_context():
            for execution in ("exact", "a16", "fp8"):
                ys[f"int4_{execution}"] = m.set_execution(execution, fast_accum=True)(xb).float()
            ys["int4_fp8_precise_accum"] = m.set_execution("fp8", fast_accum=False)(xb).float()
            ys["int4_reference"] = m.forward_reference(xb).float()
            ys["svdq_w4a16_exact"] = m16.set_execution("exact")(xb).float()
            ys["svdq_w4a16_fp8"] = m16.set_execution("fp8", fast_accum=True)(xb).float()
            ys["w4a16_rtn_nolr"] = mw16(xb).float()
        row = dict(N=N, K=K, act=m.act_format, bits_int4=m.storage_bits_per_weight(),
                   bits_svdq_w4a16=m16.storage_bits_per_weight(), bits_w4a16=mw16.storage_bits_per_weight(),
                   **{f"err_{k}_vs_bf16": relative_error(v, y_bf16) for k, v in ys.items()},
                   err_int4_exact_vs_reference=relative_error(ys["int4_exact"], ys["int4_reference"]),
                   err_bf16_vs_fp32=relative_error(y_bf16, y_fp32))
        out.append(row)
        log("  quality " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    results["quality"] = out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS,
                    help=f"token counts M of the table (default: {' '.join(map(str, TOKENS))})")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--small", action="store_true", help=f"only the few-token checks and table (M = {SMALL_TOKENS})")
    mode.add_argument("--small-sweep", action="store_true", help="only the skinny GEMM / kernel 1 tile sweeps (M = 16)")
    mode.add_argument("--mid", action="store_true",
                      help=f"only the fp8 paths at 16-1024 tokens (default {' '.join(map(str, MID_TOKENS))})")
    mode.add_argument("--fp8exec", action="store_true",
                      help="only the fp8 execution's stages and the fp8 expansion tile sweep (M > 64 of --tokens)")
    mode.add_argument("--gelu-quant", action="store_true",
                      help="only the fp8 row quantization with GELU at FLUX widths (M of --tokens)")
    mode.add_argument("--decode", action="store_true", help="only the one-token table (--decode-shapes)")
    ap.add_argument("--decode-shapes", choices=sorted(DECODE_SHAPES), default="llama",
                    help="--decode at Llama-3-8B's layers or FLUX.1's modulation layers")
    mode.add_argument("--smoke", action="store_true",
                      help="checks and quality harness at tiny shapes, no timings (CPU: Triton interpreter)")
    ap.add_argument("--sweep", action="store_true", help="after the table: the fp8 stages and expansion tile sweep")
    ap.add_argument("--quality", action="store_true", help="errors vs bf16 of each execution (outlier harness)")
    ap.add_argument("--no-table", action="store_true", help="skip the timing table")
    ap.add_argument("--out", default=os.environ.get("OUT", "."),
                    help="directory of linear_log.txt and linear_results.json")
    return ap.parse_args(argv)


def main(argv=None):
    global DEV, DTYPE, SHAPES
    args = parse_args(argv)
    if args.smoke and not torch.cuda.is_available():
        DEV, DTYPE = "cpu", torch.float16  # the interpreter's bf16 dot is wrong
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/linear.py times CUDA kernels: run it on a GPU (or --smoke on the CPU)")
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "linear_log.txt"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()  # a run stopped at its time limit keeps what it measured

    name = torch.cuda.get_device_properties(0).name if DEV == "cuda" else "cpu (Triton interpreter)"
    extra = f" sms={torch.cuda.get_device_properties(0).multi_processor_count}" if DEV == "cuda" else ""
    log(f"device {name}{extra} torch {torch.__version__}")
    results = {"device": name}
    t0 = time.time()
    if args.smoke:
        SHAPES = SMOKE_SHAPES
        results["correctness"] = check_correctness(log, SMOKE_SHAPES)
        log(f"  [correctness {time.time() - t0:.0f}s]")
        quality(log, results, shapes=[(96, 128, False), (64, 192, True)], tokens=96)
        log(f"  [quality {time.time() - t0:.0f}s]")
        args.quality = False
        args.no_table = True
    elif args.mid:
        mid_table(log, results, MID_TOKENS if args.tokens == TOKENS else args.tokens)
        log(f"  [mid {time.time() - t0:.0f}s]")
        args.no_table = True
    elif args.fp8exec:
        fp8exec(log, results, args.tokens)
        args.no_table = True
    elif args.gelu_quant:
        gelu_quant(log, results, args.tokens)
        args.no_table = True
    elif args.decode:
        decode_table(log, results, DECODE_SHAPES[args.decode_shapes])
        log(f"  [decode {time.time() - t0:.0f}s]")
        args.no_table = True
    elif args.small_sweep:
        small_sweep(log, results)
        log(f"  [small sweep {time.time() - t0:.0f}s]")
        args.no_table = True
    elif args.small:
        results["small_checks"] = check_correctness(log, small_only=True)
        try:
            check_tinygemm(log)
        except (RuntimeError, AttributeError) as ex:
            log(f"  tinygemm check failed: {str(ex)[:200]}")
        table(log, results, SMALL_TOKENS, key="small")
        log(f"  [small {time.time() - t0:.0f}s]")
        args.no_table = True
    else:
        results["correctness"] = check_correctness(log)
        log(f"  [correctness {time.time() - t0:.0f}s]")
    if args.quality:
        quality(log, results)
        log(f"  [quality {time.time() - t0:.0f}s]")
    if not args.no_table:
        table(log, results, args.tokens)
        log(f"  [table {time.time() - t0:.0f}s]")
    if args.sweep:
        fp8exec(log, results, args.tokens)
        log(f"  [sweep {time.time() - t0:.0f}s]")
    log(f"  [total {time.time() - t0:.0f}s]")
    with open(os.path.join(args.out, "linear_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    logf.close()
    return results


if __name__ == "__main__":
    with torch.no_grad():
        main()
