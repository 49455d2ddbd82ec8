"""The fp8 concatenation path of the Hopper W4A8 fp8 format: the low-rank branch as extra K columns of one
row-wise-scaled fp8 GEMM (layout and semantics: :mod:`quantduo.svdquant.hopper_formats`).

* :func:`fp8_row_stats` — pass 1 over the activations: per-slice absmax of ``x * inv_smooth`` and the
  low-rank down-projection partials (one 16-bit dot per tile).
* :func:`fp8_concat_quant` — pass 2: per-token scale (absmax of the row and of its low-rank term), FP8 codes of
  ``x * inv_smooth / scale`` and the hi / lo / hi low-rank tail, written into one ``[M, K + T]`` operand.
* :func:`fp8_rowwise_gemm` — ``torch._scaled_mm`` with row-wise scales and the bias (CUDA); on other
  devices the same arithmetic in float32 (CI, interpreter).

Both passes multiply (no division per element: they are ALU-bound otherwise). On CUDA the float32 -> e4m3
conversion is the hardware's round-to-nearest-even; the interpreter rounds in float32 arithmetic
(``common.round_e4m3``: its own cast is wrong for some values).
References: ``hopper_formats.fp8_lowrank_down`` / ``fp8_concat_activations`` / ``fp8_concat_weights``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantduo.svdquant.hopper_formats import fp8_tail_width

from .common import k_splits, rank_pad, round_e4m3, to_e4m3


@triton.jit
def _fp8_row_stats_kernel(
    X, INV_SMOOTH, LD, AMAXP, LXP, M, K, K_SPLIT, R, stride_xm,
    HAS_LR: tl.constexpr, RP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """Program (pid_m, pid_s): rows [pid_m*BM, +BM), channels [pid_s*K_SPLIT, +K_SPLIT).

    X 16-bit ``[M, K]``; INV_SMOOTH float32 ``[K]``; LD ``[K, R]`` (16-bit). Writes AMAXP float32 ``[S, M]``
    (absmax of ``x * inv_smooth`` over the slice) and LXP float32 ``[S, M, R]``
    (``(x * inv_smooth)`` rounded to LD's dtype ``@ LD`` over the slice).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    mmask = rm < M
    xrow = X + rm[:, None].to(tl.int64) * stride_xm
    amax = tl.zeros((BM,), dtype=tl.float32)
    if HAS_LR:
        rr = tl.arange(0, RP)
        lx = tl.zeros((BM, RP), dtype=tl.float32)
    k0 = pid_s * K_SPLIT
    for k in range(k0, k0 + K_SPLIT, BK):
        xs = tl.load(xrow + (k + rk)[None, :], mask=mmask[:, None], other=0.0).to(tl.float32) \
            * tl.load(INV_SMOOTH + k + rk)[None, :]
        amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
        if HAS_LR:
            ld = tl.load(LD + (k + rk)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
            lx = tl.dot(xs.to(ld.dtype), ld, lx, input_precision=PREC)
    tl.store(AMAXP + pid_s * M + rm, amax, mask=mmask)
    if HAS_LR:
        tl.store(LXP + pid_s * M * R + rm[:, None] * R + rr[None, :], lx, mask=mmask[:, None] & (rr[None, :] < R))


@triton.jit
def _fp8_concat_quant_kernel(
    X, INV_SMOOTH, AMAXP, LXP, A, A_SCALE,
    M, K, K_SPLIT, S, R, T, stride_xm, stride_am,
    HAS_LR: tl.constexpr, RP: tl.constexpr, TP: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
    NATIVE: tl.constexpr,
):
    """Program (pid_m, pid_s): rows [pid_m*BM, +BM), channels [pid_s*K_SPLIT, +K_SPLIT) of A.

    AMAXP float32 ``[S, M]``, LXP float32 ``[S, M, R]`` (pass 1). A float8_e4m3fn ``[M, stride_am >= K + T]``;
    A_SCALE float32 ``[M]``. Slice 0 also writes the scale and the tail ``[hi | lo | hi | 0...]`` (T columns).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    mmask = rm < M
    rm64 = rm[:, None].to(tl.int64)
    amax = tl.zeros((BM,), dtype=tl.float32)
    for s in range(S):
        amax = tl.maximum(amax, tl.load(AMAXP + s * M + rm, mask=mmask, other=0.0))
    if HAS_LR:
        rr = tl.arange(0, RP)
        lx = tl.zeros((BM, RP), dtype=tl.float32)
        for s in range(S):
            lx += tl.load(LXP + s * M * R + rm[:, None] * R + rr[None, :], mask=mmask[:, None] & (rr[None, :] < R),
                          other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(lx), axis=1))
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    inv_scale = tl.math.div_rn(1.0, scale)
    rk = tl.arange(0, BK)
    k0 = pid_s * K_SPLIT
    for k in range(k0, k0 + K_SPLIT, BK):
        xs = tl.load(X + rm64 * stride_xm + (k + rk)[None, :], mask=mmask[:, None], other=0.0).to(tl.float32) \
            * tl.load(INV_SMOOTH + k + rk)[None, :]
        y = tl.minimum(tl.maximum(xs * inv_scale[:, None], -448.0), 448.0)
        tl.store(A + rm64 * stride_am + (k + rk)[None, :], to_e4m3(y, NATIVE), mask=mmask[:, None])
    if pid_s == 0:
        tl.store(A_SCALE + rm, scale, mask=mmask)
        if HAS_LR:
            _store_tail(A + rm64 * stride_am + K, lx, inv_scale, mmask, R, T, RP, TP, NATIVE)


@triton.jit
def _store_tail(TAIL, lx, inv_scale, mmask, R, T, RP: tl.constexpr, TP: tl.constexpr, NATIVE: tl.constexpr):
    """Row tails (pointers ``[BM, 1]``): ``[hi | lo | hi]`` of ``lx [BM, RP] * inv_scale`` then zeros to T."""
    rr = tl.arange(0, RP)
    lmask = mmask[:, None] & (rr[None, :] < R)
    t = lx * inv_scale[:, None]
    hi = round_e4m3(tl.minimum(tl.maximum(t, -448.0), 448.0))  # exact fp8 values: the cast below is exact
    lo = to_e4m3(t - hi, NATIVE)
    tl.store(TAIL + rr[None, :], hi.to(tl.float8e4nv), mask=lmask)
    tl.store(TAIL + R + rr[None, :], lo, mask=lmask)
    tl.store(TAIL + 2 * R + rr[None, :], hi.to(tl.float8e4nv), mask=lmask)
    rz = tl.arange(0, TP)
    tl.store(TAIL + 3 * R + rz[None, :], tl.zeros((lx.shape[0], TP), dtype=tl.float8e4nv),
             mask=mmask[:, None] & (rz[None, :] < T - 3 * R))


def fp8_row_stats(x: torch.Tensor, inv_smooth: torch.Tensor, lora_down: torch.Tensor | None,
                  config: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pass 1: (absmax partials float32 ``[S, M]``, low-rank partials float32 ``[S, M, r]`` or None).

    x 16-bit ``[M, K]`` (unit column stride, K a multiple of 64), inv_smooth float32 ``[K]``, lora_down
    ``[K, r]`` (the scaled factor of ``hopper_formats.fp8_lowrank_operands``). config: (BM, BK, splits, warps).
    """
    M, K = x.shape
    _check_rows(x)
    r = 0 if lora_down is None else lora_down.shape[1]
    bm, bk = (64, 64) if config is None else config[:2]
    splits, warps = (k_splits(M, K, bm, bk, 512), 4) if config is None else config[2:]
    amaxp = torch.empty(splits, M, dtype=torch.float32, device=x.device)
    lxp = torch.empty(splits, M, r, dtype=torch.float32, device=x.device) if r else None
    _fp8_row_stats_kernel[(triton.cdiv(M, bm), splits)](
        x, inv_smooth, lora_down if r else x, amaxp, lxp if r else amaxp, M, K, K // splits, r, x.stride(0),
        HAS_LR=r > 0, RP=rank_pad(r), BM=bm, BK=bk, PREC="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=warps,
    )
    return amaxp, lxp


def fp8_concat_quant(x: torch.Tensor, inv_smooth: torch.Tensor, amax_partials: torch.Tensor,
                     lx_partials: torch.Tensor | None, config: tuple[int, ...] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: the A operand of the fp8 concatenation and its per-token scale.

    Args: x 16-bit ``[M, K]``; inv_smooth float32 ``[K]``; the partials of :func:`fp8_row_stats`;
    config (BM, BK, splits, num_warps).
    Returns (float8_e4m3fn ``[M, K + T]``, float32 ``[M]``) with ``T = hopper_formats.fp8_tail_width(r)``,
    as ``hopper_formats.fp8_concat_activations``.
    """
    M, K = x.shape
    _check_rows(x)
    r = 0 if lx_partials is None else lx_partials.shape[2]
    tw = fp8_tail_width(r)
    bm, bk = (32, 256 if K % 256 == 0 else 64) if config is None else config[:2]
    splits, warps = (min(2, k_splits(M, K, bm, bk, 1024)), 8) if config is None else config[2:]
    if K % (splits * bk):
        raise ValueError(f"K={K} must be a multiple of splits*BK={splits}*{bk}")
    a = torch.empty(M, K + tw, dtype=torch.float8_e4m3fn, device=x.device)
    a_scale = torch.empty(M, dtype=torch.float32, device=x.device)
    _fp8_concat_quant_kernel[(triton.cdiv(M, bm), splits)](
        x, inv_smooth, amax_partials, lx_partials if r else amax_partials, a, a_scale,
        M, K, K // splits, amax_partials.shape[0], r, tw, x.stride(0), a.stride(0),
        HAS_LR=r > 0, RP=rank_pad(r), TP=rank_pad(tw - 3 * r), BM=bm, BK=bk,
        NATIVE=x.is_cuda, num_warps=warps,
    )
    return a, a_scale


def _check_rows(x: torch.Tensor) -> None:
    if x.stride(1) != 1 or x.shape[1] % 64:
        raise ValueError(f"the fp8 concatenation needs K % 64 == 0 and unit column stride, got {tuple(x.shape)}")


def fp8_rowwise_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(a @ b^T) * a_scale[m] * b_scale[n] + bias`` for float8_e4m3fn a ``[M, K']``, b ``[N, K']``
    (K' a multiple of 16), float32 scales ``[M]`` / ``[N]``; ``[M, N]`` in out_dtype. CUDA:
    ``torch._scaled_mm`` (row-wise scaling; fast_accum: Hopper's fp8 accumulators are not promoted to float32
    along K, 1.2-1.3x faster at FLUX shapes for a relative error of ~1e-3 instead of ~2e-4, BENCHMARKS.md);
    elsewhere float32 emulation."""
    if a.shape[1] % 16:
        raise ValueError(f"fp8 GEMM needs K' % 16 == 0, got {a.shape[1]}")
    if a.is_cuda:
        return torch._scaled_mm(a, b.t(), scale_a=a_scale[:, None], scale_b=b_scale[None, :],
                                bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    y = (a.float() @ b.float().T) * a_scale[:, None] * b_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
