"""Check and time SVDQuant linear kernels at FLUX.1 shapes against BF16 / FP8 / W4A16 baselines (one GPU call).

    PYTHONPATH=. python benchmarks/linear.py [--sweep] [--quality] [--out DIR]

Variants (rank 32): bf16 F.linear; fp8 torch._scaled_mm with row-wise scales (GEMM only, inputs already
fp8); W4A16 (Triton, INT4-g64 weights); W4A4 INT4-g64 unfused (kernel 1 + GEMM + low-rank as separate
matmuls), W4A4 fused, W4A4 without low-rank (overhead reference); W4A8 Hopper format fused (packed /
expanded weights) and without low-rank. Times: CUDA-graph replays over enough copies of the weights and
inputs to defeat the 50 MB L2, median of repeats. ``--quality`` quantizes synthetic FLUX-shaped layers with
the SVDQuant pipeline and reports output error vs BF16 for each format. Writes JSON + log under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from quantduo import kernels as qk
from quantduo.kernels.act_quant import act_quant
from quantduo.kernels.gemm_w4a4 import w4_gemm
from quantduo.kernels.gemm_w4a8 import expand_w4_int8, w4a8_gemm
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant import hopper_formats as hf
from quantduo.svdquant import quantizers as qz

SHAPES = [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)]  # (N, K)
TOKENS = [4608, 256, 16]
RANK = 32
DEV = "cuda"
L2_DEFEAT_BYTES = 200e6


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def time_graph(make_call, bytes_per_call: float, reps: int = 15) -> float:
    """Median microseconds per call: a CUDA graph replays the call on C independent buffer sets."""
    copies = max(1, min(32, math.ceil(L2_DEFEAT_BYTES / max(bytes_per_call, 1.0))))
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


def random_module(n, k, act_format="int4", rank=RANK):
    """SVDQuantLinear with random (non-degenerate) buffers."""
    m = SVDQuantLinear(k, n, rank=rank, act_format=act_format, device=DEV)
    with torch.no_grad():
        m.qweight.copy_(qz.pack_int4(torch.randint(-7, 8, (n, k), device=DEV)))
        m.wscales.copy_(torch.rand(n, k // 64, device=DEV) * 0.02 + 0.001)
        m.smooth_factor.copy_(torch.rand(k, device=DEV) + 0.5)
        if act_format == "uint4":
            m.act_shift.fill_(0.17)
        if rank:
            m.lora_down.copy_(torch.randn(k, rank, device=DEV) * 0.05)
            m.lora_up.copy_(torch.randn(n, rank, device=DEV) * 0.05)
        m.bias.copy_(torch.randn(n, device=DEV) * 0.1)
    return m


def random_w4a8(n, k, rank=RANK):
    m = hf.SVDQuantW4A8Linear(k, n, rank=rank, device=DEV)
    with torch.no_grad():
        m.qweight.copy_(qz.pack_int4(torch.randint(-7, 8, (n, k), device=DEV)))
        m.wmult.copy_(torch.randint(1, hf.MULT_MAX + 1, (n, k // 64), device=DEV, dtype=torch.uint8))
        m.wscale_row.copy_(torch.rand(n, device=DEV) * 1e-3 + 1e-4)
        m.smooth_factor.copy_(torch.rand(k, device=DEV) + 0.5)
        m.lora_down.copy_(torch.randn(k, rank, device=DEV) * 0.05)
        m.lora_up.copy_(torch.randn(n, rank, device=DEV) * 0.05)
        m.bias.copy_(torch.randn(n, device=DEV) * 0.1)
    return m


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


def v_fp8(M, N, K):
    def make():
        x = torch.randn(M, K, device=DEV).to(torch.float8_e4m3fn)
        w = torch.randn(N, K, device=DEV).to(torch.float8_e4m3fn)
        sx = torch.rand(M, 1, device=DEV) + 0.5
        sw = torch.rand(1, N, device=DEV) + 0.5
        b = torch.randn(N, device=DEV, dtype=torch.bfloat16)
        return lambda: torch._scaled_mm(x, w.T, scale_a=sx, scale_b=sw, bias=b, out_dtype=torch.bfloat16)
    return make, M * K + N * K + 2 * M * N


def v_module(M, N, K, kind, **kw):
    """kind: w4a16 | w4a4_fused | w4a4_nolr | w4a4_unfused | w4a8 | w4a8_nolr (kw: expand, config)."""
    def make():
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        if kind == "w4a16":
            m = random_module(N, K, "none", rank=0)
            return lambda: qk.svdquant_linear_forward(m, x)
        if kind.startswith("w4a4"):
            m = random_module(N, K, "int4", rank=0 if kind == "w4a4_nolr" else RANK)
            if kind == "w4a4_unfused":
                def call():
                    q, qs, _ = act_quant(x, m.smooth_factor, m.act_shift, None, "int4")
                    y = w4_gemm(q, qs, m.qweight, m.wscales, None, None, m.bias, "int4", x.dtype, config=kw.get("config"))
                    xs = x / m.smooth_factor
                    return y + (xs @ m.lora_down) @ m.lora_up.T
                return call
            def call():
                q, qs, lxp = act_quant(x, m.smooth_factor, m.act_shift, m.lora_down if m.rank else None, "int4")
                return w4_gemm(q, qs, m.qweight, m.wscales, lxp, m.lora_up if m.rank else None, m.bias, "int4",
                               x.dtype, config=kw.get("config"))
            return call
        m = random_w4a8(N, K, rank=0 if kind == "w4a8_nolr" else RANK)
        expand = kw.get("expand")
        def call():
            q, qs, lxp = act_quant(x, m.smooth_factor, None, m.lora_down if m.rank else None, "int8")
            ex = M >= qk.W4A8_EXPAND_MIN_TOKENS if expand is None else expand
            w = expand_w4_int8(m.qweight, m.wmult) if ex else m.qweight
            return w4a8_gemm(q, qs, w, m.wmult, m.wscale_row, lxp, m.lora_up if m.rank else None, m.bias, x.dtype,
                             config=kw.get("config"))
        return call
    return make, 2 * M * K + N * K * 0.56 + 2 * M * N


# ------------------------------------------------------------------------------------------------
def check_kernels(log):
    """Kernel-level checks on GPU (bf16): kernel 1 codes/scales bit-exact, GEMMs on identical inputs."""
    from quantduo.kernels import reference as ref

    torch.manual_seed(0)
    M, N, K = 201, 3072, 3072
    m = random_module(N, K, "int4")
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    for mode in ("int4", "uint4", "int8"):
        q, qs, lxp = act_quant(x, m.smooth_factor, m.act_shift, m.lora_down, mode)
        rq, rqs, rlx = ref.act_quant_ref(x, m.smooth_factor, m.act_shift, m.lora_down, mode)
        log(f"  kernel1 {mode}: code mismatches {(q != rq).sum().item()} / {q.numel()}, scale mismatches "
            f"{(qs != rqs).sum().item()}, lx rel err {rel(lxp.sum(0), rlx):.1e}")
        if mode != "int8":
            y = w4_gemm(q, qs, m.qweight, m.wscales, lxp, m.lora_up, m.bias, mode, x.dtype)
            y_ref = ref.w4_gemm_ref(q, qs, m.qweight, m.wscales, lxp.sum(0), m.lora_up, m.bias, mode, x.dtype)
            log(f"  gemm {mode} on kernel-1 codes: rel err {rel(y, y_ref):.1e}")


def check_correctness(log):
    """Every kernel path vs its PyTorch reference on GPU at real K / N (M = 200, bf16)."""
    check_kernels(log)
    torch.manual_seed(0)
    worst = {}
    for (N, K) in SHAPES:
        x = torch.randn(3, 67, K, device=DEV, dtype=torch.bfloat16)  # leading dims, M = 201
        for fmt in ("int4", "uint4", "none"):
            m = random_module(N, K, fmt, rank=0 if fmt == "none" else RANK)
            worst[f"{fmt} {N}x{K}"] = rel(qk.svdquant_linear_forward(m, x), m.forward_reference(x))
        m8 = random_w4a8(N, K)
        for ex in (False, True):
            worst[f"w4a8 expand={ex} {N}x{K}"] = rel(qk.w4a8_linear_forward(m8, x, expand=ex), m8.forward_reference(x))
    fc1, fc2 = random_module(12288, 3072, "int4"), random_module(3072, 12288, "uint4")
    for M in (16, 300):
        x = torch.randn(M, 3072, device=DEV, dtype=torch.bfloat16)
        ref = fc2.forward_reference(F.gelu(fc1.forward_reference(x), approximate="tanh"))
        worst[f"mlp fused M={M}"] = rel(qk.svdquant_mlp_forward(fc1, fc2, x), ref)
    nv = SVDQuantLinear(3072, 3072, rank=RANK, weight_format="nvfp4", act_format="nvfp4", device=DEV)
    with torch.no_grad():
        codes, sc, gs = qz.quantize_nvfp4(torch.randn(3072, 3072, device=DEV))
        nv.qweight.copy_(qz.pack_nibbles(codes)); nv.wscales.copy_(sc); nv.wscale_global.copy_(gs)
        nv.lora_down.normal_(0, 0.05); nv.lora_up.normal_(0, 0.05)
    x = torch.randn(201, 3072, device=DEV, dtype=torch.bfloat16)
    worst["nvfp4 3072x3072"] = rel(qk.svdquant_linear_forward(nv, x), nv.forward_reference(x))
    for k, v in worst.items():
        log(f"  correctness {k:32s} rel err {v:.2e}")
    bad = {k: v for k, v in worst.items() if not v < 2e-2 or (not k.startswith("mlp") and not v < 5e-3)}
    if bad:
        log(f"CORRECTNESS FAILED: {bad}")
    return dict(errors=worst, failed=sorted(bad))


GEMM_SWEEP_W4A4 = [dict(BM=bm, BN=bn, GROUP_M=8, num_warps=w, num_stages=s)
                   for bm, bn, w, s in [(128, 128, 8, 3), (128, 128, 4, 4), (128, 256, 8, 3), (64, 128, 4, 4),
                                        (64, 64, 4, 4), (16, 32, 4, 4), (16, 64, 4, 4), (16, 16, 4, 6)]]
GEMM_SWEEP_W4A8 = [dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=w, num_stages=s)
                   for bm, bn, bk, w, s in [(128, 256, 128, 8, 3), (128, 128, 128, 8, 4), (128, 128, 128, 4, 4),
                                            (256, 128, 128, 8, 3), (64, 128, 128, 4, 4), (64, 64, 256, 4, 4),
                                            (16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 16, 512, 4, 4)]]


def breakdown(log, results):
    """Per-kernel times (kernel 1, weight expansion, each GEMM alone) and compiled register/spill counts."""
    import sys

    aq_mod, g4_mod, g8_mod = (sys.modules[f"quantduo.kernels.{n}"] for n in ("act_quant", "gemm_w4a4", "gemm_w4a8"))

    for M in (16, 4608):
        N, K = 3072, 3072
        m, m8 = random_module(N, K, "int4"), random_w4a8(N, K)
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        q4, qs4, lxp = act_quant(x, m.smooth_factor, m.act_shift, m.lora_down, "int4")
        q8, qs8, _ = act_quant(x, m.smooth_factor, None, m.lora_down, "int8")
        ex = expand_w4_int8(m8.qweight, m8.wmult)
        calls = {
            "act_quant int4+lr": lambda: act_quant(x, m.smooth_factor, m.act_shift, m.lora_down, "int4"),
            "act_quant int4": lambda: act_quant(x, m.smooth_factor, m.act_shift, None, "int4"),
            "act_quant int8+lr": lambda: act_quant(x, m.smooth_factor, None, m.lora_down, "int8"),
            "expand": lambda: expand_w4_int8(m8.qweight, m8.wmult),
            "w4_gemm int4": lambda: w4_gemm(q4, qs4, m.qweight, m.wscales, lxp, m.lora_up, m.bias, "int4", x.dtype),
            "w4a8 packed": lambda: w4a8_gemm(q8, qs8, m8.qweight, m8.wmult, m8.wscale_row, lxp, m8.lora_up, m8.bias,
                                             x.dtype),
            "w4a8 expanded": lambda: w4a8_gemm(q8, qs8, ex, m8.wmult, m8.wscale_row, lxp, m8.lora_up, m8.bias,
                                               x.dtype),
            "bf16": v_bf16(M, N, K)[0](),
        }
        for cfg in [(16, 64, 1, 4), (32, 64, 1, 4), (64, 64, 1, 4), (64, 64, 1, 8), (32, 128, 1, 4), (16, 64, 4, 4),
                    (16, 64, 8, 4), (16, 64, 16, 4), (16, 256, 4, 4)]:
            s = max(1, min(cfg[2], 3072 // (cfg[1] * 2)))
            cfg = (cfg[0], cfg[1], s, cfg[3])
            calls[f"aq int4+lr {cfg}"] = (lambda cfg=cfg: act_quant(x, m.smooth_factor, m.act_shift, m.lora_down, "int4",
                                                                  config=cfg))
        for cfg in [dict(BM=128, BN=256, BK=128, GROUP_M=8, num_warps=8, num_stages=3),
                    dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4),
                    dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=4, num_stages=4),
                    dict(BM=128, BN=128, BK=256, GROUP_M=8, num_warps=8, num_stages=3),
                    dict(BM=256, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=3),
                    dict(BM=64, BN=256, BK=128, GROUP_M=8, num_warps=4, num_stages=4),
                    dict(BM=16, BN=32, BK=256, GROUP_M=1, num_warps=4, num_stages=4),
                    dict(BM=16, BN=64, BK=512, GROUP_M=1, num_warps=4, num_stages=3),
                    dict(BM=16, BN=16, BK=512, GROUP_M=1, num_warps=2, num_stages=4)]:
            if (M <= 16) != (cfg["BM"] == 16):
                continue
            for wname, w in (("packed", m8.qweight), ("expanded", ex)):
                calls[f"w4a8 {wname} {list(cfg.values())}"] = (
                    lambda cfg=cfg, w=w: w4a8_gemm(q8, qs8, w, m8.wmult, m8.wscale_row, lxp, m8.lora_up, m8.bias,
                                                   x.dtype, config=cfg))
            if cfg["BK"] == 128 or M <= 16:
                c4 = {k: v for k, v in cfg.items() if k != "BK"}
                calls[f"w4_gemm {list(c4.values())}"] = (
                    lambda c4=c4: w4_gemm(q4, qs4, m.qweight, m.wscales, lxp, m.lora_up, m.bias, "int4", x.dtype,
                                          config=c4))
        for name, c in calls.items():
            try:
                t = time_graph(lambda c=c: c, 0.0 if M > 16 else 1e6)
            except Exception as ex_:  # noqa: BLE001 - a config that does not compile is reported and skipped
                log(f"  breakdown {name} failed: {str(ex_)[:100]}")
                continue
            log(f"  breakdown M={M} {N}x{K} {name:20s} {t:8.1f} us")
            results.setdefault("breakdown", []).append(dict(M=M, name=name, us=t))
    for fn in (aq_mod._act_quant_kernel, g4_mod._w4_gemm_kernel, g8_mod._w4a8_gemm_kernel, g8_mod._expand_w4_int8_kernel):
        try:
            for cache in fn.device_caches.values():
                for ck in cache[0].values():
                    log(f"  compiled {fn.__name__}: regs={ck.n_regs} spills={ck.n_spills} shared={ck.metadata.shared}")
        except Exception as ex:  # noqa: BLE001 - introspection is best effort across Triton versions
            log(f"  (no compile metadata for {fn.__name__}: {ex})")


def sweep(log, results):
    """Config sweeps of the GEMMs (fused low-rank) per shape and token count."""
    for M in TOKENS:
        for (N, K) in SHAPES:
            tb = time_graph(*v_bf16(M, N, K))
            line = f"  sweep M={M} {N}x{K} bf16 {tb:.1f}us"
            for name, cfgs, kw in (("w4a4", GEMM_SWEEP_W4A4, {}), ("w4a8p", GEMM_SWEEP_W4A8, {"expand": False}),
                                   ("w4a8e", GEMM_SWEEP_W4A8, {"expand": True})):
                best = None
                for cfg in cfgs:
                    if (M <= 16) != (cfg["BM"] == 16):
                        continue
                    try:
                        kind = "w4a4_fused" if name == "w4a4" else "w4a8"
                        t = time_graph(*v_module(M, N, K, kind, config=cfg, **kw))
                    except Exception as ex:  # noqa: BLE001 - a config that does not compile is skipped
                        log(f"    {name} {cfg} failed: {str(ex)[:120]}")
                        continue
                    results.setdefault("sweep", []).append(dict(M=M, N=N, K=K, variant=name, cfg=cfg, us=t))
                    if best is None or t < best[0]:
                        best = (t, cfg)
                if best:
                    line += f" | {name} {best[0]:.1f}us x{tb / best[0]:.2f} {list(best[1].values())}"
            log(line)


def table(log, results):
    rows = []
    for M in TOKENS:
        for (N, K) in SHAPES:
            t = {"bf16": time_graph(*v_bf16(M, N, K)), "fp8_scaled_mm": time_graph(*v_fp8(M, N, K))}
            for kind in ("w4a16", "w4a4_unfused", "w4a4_nolr", "w4a4_fused", "w4a8_nolr", "w4a8"):
                t[kind] = time_graph(*v_module(M, N, K, kind))
            rows.append(dict(M=M, N=N, K=K, us=t))
            log(f"  M={M:5d} {N:5d}x{K:5d} " + " ".join(f"{k}={v:.1f}" for k, v in t.items()))
    results["table"] = rows
    names = list(rows[0]["us"])
    log("\n| M | N x K | " + " | ".join(names[1:]) + " | bf16 us |")
    log("| --- | --- | " + " | ".join("---" for _ in names[1:]) + " | --- |")
    for r in rows:
        tb = r["us"]["bf16"]
        log(f"| {r['M']} | {r['N']}x{r['K']} | " + " | ".join(f"{tb / r['us'][n]:.2f}x" for n in names[1:])
            + f" | {tb:.1f} |")
    for r in rows:
        lr = r["us"]["w4a4_fused"] / r["us"]["w4a4_nolr"] - 1, r["us"]["w4a8"] / r["us"]["w4a8_nolr"] - 1
        log(f"  low-rank overhead M={r['M']} {r['N']}x{r['K']}: w4a4 {lr[0] * 100:+.1f}%  w4a8 {lr[1] * 100:+.1f}%")


def quality(log, results):
    """Output error vs the BF16 layer of each format on SVDQuant-quantized synthetic FLUX-shaped layers."""
    from quantduo.svdquant import SVDQuantConfig, quantize_model

    torch.manual_seed(0)
    out = []
    for (N, K, post_gelu) in [(3072, 3072, False), (12288, 3072, False), (3072, 12288, True)]:
        lin = torch.nn.Linear(K, N, device=DEV)
        with torch.no_grad():
            lin.weight.normal_(0, K ** -0.5)
            lin.weight.add_(torch.randn(N, 64, device=DEV) @ torch.randn(64, K, device=DEV) * (0.3 * K ** -0.5 / 8))
        ch = torch.exp(torch.randn(K, device=DEV) * 0.8)  # per-channel magnitudes with outliers
        ch[torch.randperm(K, device=DEV)[:16]] *= 20

        def sample(n):
            x = torch.randn(n, K, device=DEV) * ch
            return F.gelu(x, approximate="tanh") if post_gelu else x
        calib, test = sample(1024), sample(1024)
        model = torch.nn.Sequential(lin)
        ref_lin = torch.nn.Linear(K, N, device=DEV)
        ref_lin.load_state_dict(lin.state_dict())
        cfg = SVDQuantConfig(lowrank_iters=20, search_tokens=512)
        quantize_model(model, lambda mdl: mdl(calib), cfg, progress=False)
        m = model[0]
        y_bf16 = ref_lin.to(torch.bfloat16)(test.to(torch.bfloat16)).float()
        y_fp32 = test @ lin.weight.float().T + lin.bias.float()
        xb = test.to(torch.bfloat16)
        y_w4a4 = qk.svdquant_linear_forward(m, xb).float()
        m8 = hf.to_w4a8(m, weight=ref_lin.weight.float())
        y_w4a8 = qk.w4a8_linear_forward(m8, xb).float()
        m8r = hf.to_w4a8(m)
        y_w4a8r = qk.w4a8_linear_forward(m8r, xb).float()
        row = dict(N=N, K=K, act=m.act_format, bits_w4a4=m.storage_bits_per_weight(),
                   bits_w4a8=m8.storage_bits_per_weight(),
                   err_w4a4_vs_bf16=rel(y_w4a4, y_bf16), err_w4a8_vs_bf16=rel(y_w4a8, y_bf16),
                   err_w4a8_from_w4a4_vs_bf16=rel(y_w4a8r, y_bf16), err_w4a8_vs_w4a4=rel(y_w4a8, y_w4a4),
                   err_bf16_vs_fp32=rel(y_bf16, y_fp32))
        out.append(row)
        log("  quality " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    results["quality"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    logf = open(os.path.join(args.out, "linear_log.txt"), "w")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")

    props = torch.cuda.get_device_properties(0)
    log(f"device {props.name} sms={props.multi_processor_count} torch {torch.__version__}")
    results = {"device": props.name}
    t0 = time.time()
    results["correctness"] = check_correctness(log)
    log(f"  [correctness {time.time() - t0:.0f}s]")
    if args.breakdown:
        breakdown(log, results)
        log(f"  [breakdown {time.time() - t0:.0f}s]")
    if args.sweep:
        sweep(log, results)
        log(f"  [sweep {time.time() - t0:.0f}s]")
    if args.quality:
        quality(log, results)
        log(f"  [quality {time.time() - t0:.0f}s]")
    if not args.no_table:
        table(log, results)
    log(f"  [total {time.time() - t0:.0f}s]")
    with open(os.path.join(args.out, "linear_results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
