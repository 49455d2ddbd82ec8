"""W4A16 weight reconstruction for large token counts: the whole layer as one 16-bit weight, then one cuBLAS GEMM.

Above a few dozen tokens a W4A16 layer is compute-bound, and Hopper's 16-bit tensor cores run cuBLAS faster than
the dequantize-in-the-loop kernels of this package (BENCHMARKS.md). Since W4A16 keeps the activations in 16 bits,
the smoothing and the low-rank branch are linear maps that fold into the weight:

    y = (x / smooth) @ (q * scale)^T + (x / smooth) @ lora_down @ lora_up^T + bias
      = x @ W^T + bias,   W = (q * scale + lora_up @ lora_down^T) / smooth       (per input channel k)

:func:`dequant_w4` writes ``W`` tile by tile (the low-rank term is a rank-r dot per tile on the tensor cores) into
a scratch buffer shared by every layer, and the layer is then ``F.linear(x, W, bias)``: no pass over the
activations, no separate low-rank matmuls. ``W`` is rounded once to the activations' dtype (relative 2^-9 in
bfloat16, like a bfloat16 weight). W4A4 layers above 64 tokens use it without the low-rank and smoothing terms
(their activations are dequantized by kernel 1). Reference: :func:`quantduo.formats.reference.w4_dequant_ref`.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from .common import dot_precision, rank_pad, scratch_buffer, to_e4m3, unpack_int4_f32


@triton.jit
def w4_weight_tile(W, WS, LD, SMOOTH, up, row_scale, rn, k, N, K, R, stride_wsn, stride_wsg,
                   HAS_LR: tl.constexpr, HAS_SMOOTH: tl.constexpr, SMOOTH_RECIP: tl.constexpr, FP8: tl.constexpr,
                   NATIVE: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr,
                   PREC: tl.constexpr):
    """The weight tile ``[BN, BK]`` of rows ``rn`` and inputs ``[k, k + BK)``: ``(q * scale + up @ LD^T) / SMOOTH``
    in float32, or (FP8) times ``row_scale`` and rounded to float8_e4m3fn (saturated to +-448, nearest even).

    W packed int4 uint8 ``[N, K/2]`` (low nibble = even input); WS float group scales ``[N, K/G]`` (strides given);
    LD ``[K, R]`` and ``up`` the loaded ``[BN, RP]`` tile of the up-projection (HAS_LR); SMOOTH ``[K]``
    (HAS_SMOOTH; SMOOTH_RECIP: it holds float32 ``1 / smooth`` and the tile is multiplied by it); ``row_scale``
    float32 ``[BN]`` (FP8: the inverse of each row's fp8 scale). Rows ``rn >= N`` read as zeros. BK is a multiple
    of G. The packed tile is loaded as ``[BN, BK/G, G/2]`` so that each group's scale is one broadcast value (no
    per-element scale gather).
    """
    nmask = rn[:, None] < N
    rn64 = rn.to(tl.int64)
    g = tl.arange(0, BK // G)
    c = tl.arange(0, G // 2)
    packed = tl.load(W + rn64[:, None, None] * (K // 2) + (k // 2 + g * (G // 2))[None, :, None] + c[None, None, :],
                     mask=nmask[:, :, None], other=0)
    s = tl.load(WS + rn64[:, None] * stride_wsn + (k // G + g)[None, :] * stride_wsg, mask=nmask, other=0.0)
    s = s.to(tl.float32)[:, :, None]
    lo, hi = unpack_int4_f32(packed)
    w = tl.reshape(tl.join(tl.reshape(lo * s, (BN, BK // 2)), tl.reshape(hi * s, (BN, BK // 2))), (BN, BK))
    rk = k + tl.arange(0, BK)
    if HAS_LR:
        rr = tl.arange(0, RP)
        down = tl.load(LD + rk[:, None].to(tl.int64) * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
        w = tl.dot(up, tl.trans(down), w, input_precision=PREC)
    if HAS_SMOOTH:
        if SMOOTH_RECIP:
            w = w * tl.load(SMOOTH + rk)[None, :]
        else:
            w = w / tl.load(SMOOTH + rk).to(tl.float32)[None, :]
    if FP8:
        w = w * row_scale[:, None]
        if not NATIVE:  # the hardware conversion saturates (satfinite); the interpreter's does not
            w = tl.minimum(tl.maximum(w, -448.0), 448.0)
        w = to_e4m3(w, NATIVE)
    return w


@triton.jit
def low_rank_up_tile(LU, rn, N, R, RP: tl.constexpr):
    """Rows ``rn`` of the up-projection LU ``[N, R]`` as a ``[BN, RP]`` tile (zeros past N and R)."""
    rr = tl.arange(0, RP)
    return tl.load(LU + rn.to(tl.int64)[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R),
                   other=0.0)


@triton.jit
def _dequant_w4_kernel(W, WS, LD, LU, SMOOTH, ROW_SCALE, OUT, N, K, R, stride_wsn, stride_wsg,
                       HAS_LR: tl.constexpr, HAS_SMOOTH: tl.constexpr, SMOOTH_RECIP: tl.constexpr,
                       FP8: tl.constexpr, NATIVE: tl.constexpr,
                       RP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, PREC: tl.constexpr):
    """Program (pid_n, pid_k): OUT ``[N, K]`` tile ``[BN, BK]`` = :func:`w4_weight_tile` (LU ``[N, R]``; FP8: OUT
    is float8_e4m3fn and ROW_SCALE ``[N]`` float32)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.program_id(1) * BK
    up = low_rank_up_tile(LU, rn, N, R, RP) if HAS_LR else 0.0
    row_scale = tl.load(ROW_SCALE + rn, mask=rn < N, other=0.0) if FP8 else 0.0
    w = w4_weight_tile(W, WS, LD, SMOOTH, up, row_scale, rn, k, N, K, R, stride_wsn, stride_wsg, HAS_LR, HAS_SMOOTH,
                       SMOOTH_RECIP, FP8, NATIVE, RP, BN, BK, G, PREC)
    rk = k + tl.arange(0, BK)
    tl.store(OUT + rn.to(tl.int64)[:, None] * K + rk[None, :], w.to(OUT.dtype.element_ty), mask=rn[:, None] < N)


def check_w4_weight(qweight: torch.Tensor, wscales: torch.Tensor, group_size: int, lora_down: torch.Tensor | None,
                    lora_up: torch.Tensor | None) -> tuple[int, int, int]:
    """(N, K, rank) of an INT4 layer's stored weight, or a ValueError naming what does not fit: qweight contiguous
    uint8 ``[N, K // 2]`` with K a multiple of group_size, wscales ``[N, K // group_size]``, and lora_down
    ``[K, r]`` / lora_up ``[N, r]`` (both or neither)."""
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    if qweight.dtype != torch.uint8 or not qweight.is_contiguous() or K % group_size:
        raise ValueError(f"qweight must be contiguous uint8 [N, K/2] with K a multiple of {group_size}, got "
                         f"{qweight.dtype} {tuple(qweight.shape)}")
    if wscales.shape != (N, K // group_size):
        raise ValueError(f"wscales must be [N, K/{group_size}] = [{N}, {K // group_size}], got {tuple(wscales.shape)}")
    if (lora_down is None) != (lora_up is None):
        raise ValueError("lora_down and lora_up come together")
    r = 0 if lora_down is None else lora_down.shape[1]
    if r and (lora_down.shape != (K, r) or lora_up.shape != (N, r)):
        raise ValueError(f"low-rank factors must be [K, r] = [{K}, {r}] and [N, r] = [{N}, {r}], got "
                         f"{tuple(lora_down.shape)} and {tuple(lora_up.shape)}")
    return N, K, r


def _pick(K: int, group_size: int, low_rank: bool) -> tuple[int, int, int]:
    """(BN, BK, num_warps): best of a sweep at FLUX shapes on an H100 (BENCHMARKS.md, seventh FLUX round)."""
    bn, bk = (64, 128) if low_rank else (32, 256)
    while bk > group_size and (K % bk or bk % group_size):
        bk //= 2
    return bn, max(bk, group_size), 4


def dequant_w4(qweight: torch.Tensor, wscales: torch.Tensor, dtype: torch.dtype, group_size: int = 64,
               lora_down: torch.Tensor | None = None, lora_up: torch.Tensor | None = None,
               smooth: torch.Tensor | None = None, scratch: bool = True,
               config: tuple[int, int, int] | None = None, row_scale: torch.Tensor | None = None,
               inv_smooth: torch.Tensor | None = None, wrap: Callable | None = None) -> torch.Tensor:
    """The weight ``[N, K]`` of a W4A16 layer: ``(q * scale + lora_up @ lora_down^T) / smooth``.

    Args:
        qweight: packed int4 uint8 ``[N, K // 2]``; wscales: float ``[N, K // group_size]`` (any strides).
        dtype: float16, bfloat16 or float32 (the activations' dtype; the result is rounded to it), or
            float8_e4m3fn: each row times ``row_scale`` float32 ``[N]``, clamped to +-448, rounded to nearest even.
        lora_down ``[K, r]`` / lora_up ``[N, r]``: the low-rank branch (both or neither); smooth ``[K]`` or None;
            or inv_smooth float32 ``[K]`` = ``1 / smooth`` (multiplied: no per-element division).
        scratch: write into the shared per-device buffer (valid until the next expansion on the stream).
        config: (BN, BK, num_warps); BK a multiple of group_size dividing K.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op`` body (the launch visible to ``torch.compile``).
    """
    N, K, r = check_w4_weight(qweight, wscales, group_size, lora_down, lora_up)
    if smooth is not None and inv_smooth is not None:
        raise ValueError("give smooth or inv_smooth, not both")
    recip = inv_smooth is not None
    smooth = inv_smooth if recip else smooth
    if smooth is not None and (smooth.shape != (K,) or (recip and smooth.dtype != torch.float32)):
        raise ValueError(f"smooth / inv_smooth (float32) must be [K] = [{K}], got {tuple(smooth.shape)} {smooth.dtype}")
    fp8 = dtype == torch.float8_e4m3fn
    if fp8 != (row_scale is not None) or (fp8 and (row_scale.shape != (N,) or row_scale.dtype != torch.float32)):
        raise ValueError("row_scale (float32 [N]) is required for, and only for, float8_e4m3fn output")
    bn, bk, warps = config or _pick(K, group_size, r > 0)
    if bk % group_size or K % bk:
        raise ValueError(f"BK={bk} must be a multiple of the group size {group_size} and divide K={K}")
    out = (scratch_buffer(N * K, dtype, qweight.device) if scratch
           else torch.empty(N * K, dtype=dtype, device=qweight.device)).view(N, K)
    kernel = _dequant_w4_kernel if wrap is None else wrap(_dequant_w4_kernel)
    kernel[(triton.cdiv(N, bn), K // bk)](
        qweight, wscales, lora_down.contiguous() if r else qweight, lora_up.contiguous() if r else qweight,
        smooth if smooth is not None else qweight, row_scale.contiguous() if fp8 else qweight, out, N, K, r,
        wscales.stride(0), wscales.stride(1), HAS_LR=r > 0, HAS_SMOOTH=smooth is not None, SMOOTH_RECIP=recip, FP8=fp8,
        NATIVE=qweight.is_cuda, RP=rank_pad(r), BN=bn, BK=bk, G=group_size,
        PREC=dot_precision(lora_up.dtype if r else wscales.dtype), num_warps=warps,
    )
    return out
