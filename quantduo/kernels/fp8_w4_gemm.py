"""Mixed-input fp8 GEMM for tens of tokens (17-64 in the fp8 execution): per-token fp8 activations times INT4 weights
expanded into fp8 tile by tile inside the GEMM (no fp8 copy of the weight in memory).

    y[m, n] = s_x[m] * s_w[n] * sum_k e4m3(x / s_x)[m, k] * e4m3(W[n, k] / s_w[n]) + bias[n]
    W = (q * scale + proj_up @ proj_down^T) / smooth

The same arithmetic as the fp8 execution's expansion + ``torch._scaled_mm`` (:mod:`.fp8_linear`), whose fp8 weight
tiles this kernel computes with the same function (:func:`.dequant_w4.w4_weight_tile`), so both give the fp8
operands of :func:`quantduo.engine.linear.fp8_reference_forward`. The expansion reads 0.5 and writes 1 byte per
weight before the GEMM reads that byte again; here the GEMM reads the 0.5 byte per weight once per token tile, which
is what few tokens, bound by weight bytes, need.

The problem is computed transposed, ``out^T [N, M] = W8 [N, K] x xq^T [K, M]``: the weight tile, produced in
registers, is the tensor cores' A operand and the tokens the narrow side. K is split over ``SPLIT_K`` programs per
output tile (enough programs to stream the weights), with float32 atomics into a self-cleaning workspace (as
:mod:`.gemm_w4_skinny`); the last slice adds the bias and writes the output.

Under the Triton interpreter the fp8 operands are widened to float32 (:func:`.common.fp8_operand`): exact products
in the same tile order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, fp8_operand, rank_pad, split_k_workspace
from .dequant_w4 import check_w4_weight, low_rank_up_tile, w4_weight_tile


@triton.jit
def _fp8_w4_gemm_kernel(
    XQ, XS, W, WS, LD, LU, INV_SMOOTH, INV_WSCALE, WSCALE, BIAS, OUT, PART, COUNTS,
    M, N, K, R, STEPS_PER_SPLIT, stride_xm, stride_wsn, stride_wsg,
    HAS_LR: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    FAST_ACCUM: tl.constexpr, NATIVE: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BK: tl.constexpr, G: tl.constexpr, PREC: tl.constexpr,
):
    """Program (tile, pid_k): OUT ``[M, N]`` rows ``[BN]`` x tokens ``[BM]``, K steps of slice pid_k.

    XQ float8_e4m3fn ``[M, K]`` (row stride stride_xm), XS float32 ``[M]``; W packed int4 uint8 ``[N, K/2]``, WS
    ``[N, K/G]`` (strides given), LD ``[K, R]``, LU ``[N, R]`` (HAS_LR), INV_SMOOTH float32 ``[K]`` (HAS_SMOOTH),
    INV_WSCALE / WSCALE float32 ``[N]``, BIAS ``[N]`` (HAS_BIAS). SPLIT_K > 1: PART float32 ``[M, N]`` and COUNTS
    int32 ``[tiles]`` (zero on entry and exit).
    """
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BN)
    rm = (tile // n_tiles_n) * BM + tl.arange(0, BM)
    rn = (tile % n_tiles_n) * BN + tl.arange(0, BN)
    rm_l = tl.minimum(rm, M - 1).to(tl.int64)  # clamped tokens: activation loads need no masks
    up = low_rank_up_tile(LU, rn, N, R, RP) if HAS_LR else 0.0
    inv_wscale = tl.load(INV_WSCALE + rn, mask=rn < N, other=0.0)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for step in range(pid_k * STEPS_PER_SPLIT, (pid_k + 1) * STEPS_PER_SPLIT):
        k = step * BK
        w8 = w4_weight_tile(W, WS, LD, INV_SMOOTH, up, inv_wscale, rn, k, N, K, R, stride_wsn, stride_wsg, HAS_LR,
                            HAS_SMOOTH, True, True, NATIVE, RP, BN, BK, G, PREC)
        xq = tl.load(XQ + rm_l[:, None] * stride_xm + (k + tl.arange(0, BK))[None, :])
        a, b = fp8_operand(w8, NATIVE), tl.trans(fp8_operand(xq, NATIVE))
        # widened operands (interpreter): exact float32 products; native fp8 operands ignore the precision
        if FAST_ACCUM:  # Hopper's fp8 accumulators along the whole slice
            acc = tl.dot(a, b, acc, input_precision="tf32" if NATIVE else "ieee")
        else:  # promoted to float32 after every BK inputs
            acc = tl.dot(a, b, acc, input_precision="tf32" if NATIVE else "ieee", max_num_imprecise_acc=BK)
    wscale = tl.load(WSCALE + rn, mask=rn < N, other=0.0)
    acc = acc * wscale[:, None] * tl.load(XS + rm_l)[None, :]
    if SPLIT_K > 1:
        # written out here: the same steps in a shared helper function gave wrong sums on the H100 (Triton 3.6)
        part = PART + rm_l[None, :] * N + rn[:, None]
        part_mask = (rm < M)[None, :] & (rn < N)[:, None]
        tl.atomic_add(part, acc, mask=part_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sum is issued before the counter increment (release)
        if tl.atomic_add(COUNTS + tile, 1) == SPLIT_K - 1:  # the last slice of this tile finishes it
            acc = tl.load(part, mask=part_mask, other=0.0, cache_modifier=".cg")
            tl.store(part, tl.zeros((BN, BM), dtype=tl.float32), mask=part_mask)
            tl.store(COUNTS + tile, 0)
            _store(tl.trans(acc), rm, rn, M, N, BIAS, OUT, HAS_BIAS)
    else:
        _store(tl.trans(acc), rm, rn, M, N, BIAS, OUT, HAS_BIAS)


@triton.jit
def _store(acc, rm, rn, M, N, BIAS, OUT, HAS_BIAS: tl.constexpr):
    """``acc [BM, BN]`` float32 (+ BIAS ``[N]``) stored to OUT ``[M, N]`` in its dtype."""
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(OUT + rm.to(tl.int64)[:, None] * N + rn[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


def pick_config(M: int, N: int, K: int, group_size: int) -> dict:
    """(BM, BN, BK, SPLIT_K, num_warps, num_stages): tokens padded to 16..128 per tile, 64-row weight tiles 128 inputs
    deep up to 32 tokens and one group (64) deep above, K split (a power of two of whole BK steps) until about 2
    (BK 128) or 3 (BK 64) programs per SM of an H100 stream the weights: the best tiles of the H100 sweep at 32 and 64
    tokens, FLUX shapes (BENCHMARKS.md, ninth session)."""
    bm = min(128, max(16, triton.next_power_of_2(M)))
    bn, bk, programs = (64, 128, 256) if bm <= 32 else (64, 64, 384)
    while bk > group_size and (K % bk or bk % group_size):
        bk //= 2
    bk = max(bk, group_size)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    while tiles * split < programs and (K // bk) % (split * 2) == 0:
        split *= 2
    return dict(BM=bm, BN=bn, BK=bk, SPLIT_K=split, num_warps=4, num_stages=3)


def _check(xq, x_scale, qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, wscale, group_size):
    """Shapes and dtypes of :func:`fp8_w4_gemm`'s operands (a clear error instead of a wrong answer)."""
    N, K, _ = check_w4_weight(qweight, wscales, group_size, lora_down, lora_up)
    M = xq.shape[0]
    if xq.dtype != torch.float8_e4m3fn or xq.shape != (M, K) or xq.stride(1) != 1 or x_scale.shape != (M,) \
            or x_scale.dtype != torch.float32:
        raise ValueError(f"xq must be float8_e4m3fn [M, K] = [M, {K}] with unit column stride and x_scale float32 "
                         f"[M], got {xq.dtype} {tuple(xq.shape)} and {x_scale.dtype} {tuple(x_scale.shape)}")
    for name, t, n in (("inv_smooth", inv_smooth, K), ("inv_wscale", inv_wscale, N), ("wscale", wscale, N)):
        if t is not None and (t.shape != (n,) or t.dtype != torch.float32):
            raise ValueError(f"{name} must be float32 [{n}], got {t.dtype} {tuple(t.shape)}")


@torch.library.custom_op("quantduo::fp8_w4_gemm", mutates_args=())
def fp8_w4_gemm(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor,
                lora_down: torch.Tensor | None, lora_up: torch.Tensor | None, inv_smooth: torch.Tensor | None,
                inv_wscale: torch.Tensor, wscale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                group_size: int, fast_accum: bool = True, config: list[int] | None = None) -> torch.Tensor:
    """``[M, N]`` in out_dtype: ``x_scale[m] * wscale[n] * (xq @ e4m3(W * inv_wscale[n])^T) + bias``.

    Args:
        xq: float8_e4m3fn ``[M, K]`` per-token codes (unit column stride); x_scale: float32 ``[M]``.
        qweight: packed int4 uint8 ``[N, K // 2]`` (contiguous); wscales: ``[N, K // group_size]`` (any strides).
        lora_down ``[K, r]`` / lora_up ``[N, r]``: the low-rank branch (both or neither); inv_smooth: float32
            ``[K]`` = ``1 / smooth``, or None (no smoothing).
        inv_wscale / wscale: float32 ``[N]``, the fp8 weight scale and its inverse; bias ``[N]`` or None.
        fast_accum: Hopper's fp8 accumulation along each K slice (as ``torch._scaled_mm(use_fast_accum=True)``);
            False: promoted to float32 after every BK inputs.
        config: [BM, BN, BK, SPLIT_K, num_warps, num_stages] (default :func:`pick_config`).
    A ``torch.library`` custom op: compiled graphs call it as one opaque kernel.
    """
    _check(xq, x_scale, qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, wscale, group_size)
    M, K = xq.shape
    N = qweight.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    if M == 0:
        return out
    keys = ("BM", "BN", "BK", "SPLIT_K", "num_warps", "num_stages")
    cfg = dict(zip(keys, config)) if config else pick_config(M, N, K, group_size)
    split = cfg.pop("SPLIT_K")
    if cfg["BK"] % group_size or K % (cfg["BK"] * split):
        raise ValueError(f"BK={cfg['BK']} must be a multiple of the group size {group_size} and BK x SPLIT_K "
                         f"({split}) must divide K={K}")
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    part, counts = split_k_workspace("fp8_w4", M * N, tiles, xq.device) if split > 1 else (out, out)
    r = 0 if lora_down is None else lora_down.shape[1]
    dummy = qweight
    _fp8_w4_gemm_kernel[(tiles, split)](
        xq, x_scale, qweight, wscales, lora_down.contiguous() if r else dummy, lora_up.contiguous() if r else dummy,
        inv_smooth if inv_smooth is not None else dummy, inv_wscale, wscale, bias if bias is not None else dummy,
        out, part, counts, M, N, K, r, K // cfg["BK"] // split, xq.stride(0), wscales.stride(0), wscales.stride(1),
        HAS_LR=r > 0, HAS_SMOOTH=inv_smooth is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
        FAST_ACCUM=fast_accum, NATIVE=xq.is_cuda, RP=rank_pad(r), G=group_size,
        PREC=dot_precision(lora_up.dtype if r else wscales.dtype), **cfg)
    return out


@fp8_w4_gemm.register_fake
def _fp8_w4_gemm_shape(xq, x_scale, qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, wscale, bias,
                       out_dtype, group_size, fast_accum=True, config=None):
    return xq.new_empty(xq.shape[0], qweight.shape[0], dtype=out_dtype)
