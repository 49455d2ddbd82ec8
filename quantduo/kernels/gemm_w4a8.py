"""Hopper W4A8 GEMM: 8-bit-exact 4-bit weights x 8-bit per-token activations, one long dot.

Weights are INT4 ``q`` with integer group multipliers ``mult`` (:mod:`quantduo.svdquant.hopper_formats`):
``q * mult`` is an exact int8 (``act_format="int8"``) or float8_e4m3fn (``"fp8"``, multipliers
``2**j`` / ``3 * 2**j``), so the K loop has no rescale and the float scales (per token, per output channel) are
applied once in the epilogue. Two ways to feed the tensor cores:

* ``packed`` (int8 only): expand ``q * mult`` from the packed nibbles in registers inside the GEMM (no
  extra traffic);
* ``expanded``: :func:`expand_w4` writes the 8-bit weights to a scratch buffer per call (1.5 bytes of
  traffic per weight, one cached buffer per device), then a plain int8 / fp8 GEMM runs (compute-bound,
  large M).

int8 activations and expanded int8 weights use the pair-split channel order (see :mod:`.reference`),
which lines up with the nibbles so nothing is interleaved; fp8 ones use the natural order (so
``torch._scaled_mm`` can consume them too). References: ``w4a8_gemm_ref``, ``w4_expand_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantduo.svdquant.hopper_formats import fp8_tail_width

from .common import dot_precision, gelu_tanh, lowrank_bias_epilogue, rank_pad, scratch_buffer, tile_ids, unpack_int4


@triton.jit
def _expand_w4_kernel(W, MULT, TAIL, OUT, N, K, R, stride_on, FP8: tl.constexpr, HAS_TAIL: tl.constexpr,
                      RP: tl.constexpr, TP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr):
    """OUT ``[N, stride_on]`` = nibbles of W uint8 ``[N, K/2]`` times MULT uint8 ``[N, K/G]``: FP8 -> float8_e4m3fn
    in natural order (the products are exact), else int8 in pair-split order. HAS_TAIL (fp8): the last column
    of programs copies TAIL float8_e4m3fn ``[N, 2R]`` (hi | lo) to OUT columns ``[K, K + 3R)`` as hi | hi | lo
    and zeroes the rest of the row (``stride_on - K - 3R < TP`` columns)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = rn[:, None] < N
    rn64 = rn[:, None].to(tl.int64)
    k = tl.program_id(1) * BK
    if HAS_TAIL and k == K:
        rr = tl.arange(0, RP)
        tmask = nmask & (rr[None, :] < R)
        t_hi = tl.load(TAIL + rn64 * (2 * R) + rr[None, :], mask=tmask)
        t_lo = tl.load(TAIL + rn64 * (2 * R) + R + rr[None, :], mask=tmask)
        dst = OUT + rn64 * stride_on + K + rr[None, :]
        tl.store(dst, t_hi, mask=tmask)
        tl.store(dst + R, t_hi, mask=tmask)
        tl.store(dst + 2 * R, t_lo, mask=tmask)
        rz = tl.arange(0, TP)
        tl.store(OUT + rn64 * stride_on + K + 3 * R + rz[None, :], tl.zeros((BN, TP), dtype=t_hi.dtype),
                 mask=nmask & (rz[None, :] < stride_on - K - 3 * R))
    else:
        c = tl.arange(0, BK // 2)
        lo, hi = unpack_int4(tl.load(W + rn64 * (K // 2) + (k // 2 + c)[None, :], mask=nmask, other=0))
        m = tl.load(MULT + rn64 * (K // G) + (k // G + c // (G // 2))[None, :], mask=nmask, other=0)
        if FP8:
            mf = m.to(tl.float32)
            vals = tl.reshape(tl.join(lo.to(tl.float32) * mf, hi.to(tl.float32) * mf), (BN, BK))
            tl.store(OUT + rn64 * stride_on + (k + tl.arange(0, BK))[None, :], vals.to(tl.float8e4nv), mask=nmask)
        else:
            pos = k + (c // (G // 2)) * G + c % (G // 2)
            tl.store(OUT + rn64 * stride_on + pos[None, :], lo * m.to(tl.int8), mask=nmask)
            tl.store(OUT + rn64 * stride_on + (pos + G // 2)[None, :], hi * m.to(tl.int8), mask=nmask)


def expand_w4(qweight: torch.Tensor, wmult: torch.Tensor, fp8: bool, group_size: int = 64,
              scratch: bool = True, config: tuple[int, int, int] | None = None,
              tail: torch.Tensor | None = None) -> torch.Tensor:
    """8-bit ``[N, K]`` weights ``q * mult`` from qweight uint8 ``[N, K // 2]`` and wmult uint8 ``[N, K // G]``:
    float8_e4m3fn natural order (fp8) or int8 pair-split order. scratch: write into the shared per-device
    buffer (overwritten by the next expansion) instead of a new tensor. config: (BN, BK, num_warps).
    tail (fp8 only): float8_e4m3fn ``[N, 2r]`` low-rank hi | lo (``hopper_formats.fp8_lowrank_operands``);
    the result is then the fp8 concatenation's B operand ``[N, K + T]`` (``hopper_formats.fp8_concat_weights``).
    """
    N, K = qweight.shape[0], qweight.shape[1] * 2
    r = 0 if tail is None else tail.shape[1] // 2
    if r and not fp8:
        raise ValueError("the low-rank tail exists only in the fp8 format")
    dtype = torch.float8_e4m3fn if fp8 else torch.int8
    kc = K + fp8_tail_width(r)
    out = (scratch_buffer(N * kc, dtype, qweight.device) if scratch else torch.empty(N * kc, dtype=dtype,
                                                                              device=qweight.device)).view(N, kc)
    bn, bk, warps = config or ((16, 512, 4) if K % 512 == 0 else (32, 128 if K % 128 == 0 else 64, 4))
    grid = (triton.cdiv(N, bn), K // bk + (1 if r else 0))
    _expand_w4_kernel[grid](qweight, wmult, tail if r else wmult, out, N, K, r, kc, FP8=fp8, HAS_TAIL=r > 0,
                            RP=rank_pad(r), TP=rank_pad(kc - K - 3 * r), BN=bn,
                            BK=bk, G=group_size, num_warps=warps)
    return out


@triton.jit
def _w4a8_gemm_kernel(
    A, A_SCALE, W, MULT, WROW, LXP, LU, BIAS, OUT,
    M, N, K, S, R,
    PACKED: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    PREC: tl.constexpr, ACC: tl.constexpr,
):
    """OUT ``[M, N]`` = (A ``[M, K]`` x Wq^T) * A_SCALE[m] * WROW[n] + low-rank + bias (+ GELU).

    PACKED: A int8 pair-split, W uint8 ``[N, K/2]`` with MULT uint8 ``[N, K/G]``. Else A and W ``[N, K]``
    share one dtype and channel order: int8 (int32 accumulator) or float8_e4m3fn / 16-bit (float32
    accumulator); ACC: the accumulator dtype.
    """
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm_l = tl.minimum(rm, M - 1).to(tl.int64)
    rn_l = tl.minimum(rn, N - 1).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=ACC)
    if PACKED:
        c = tl.arange(0, BK // 2)
        pos = (c // (G // 2)) * G + c % (G // 2)
        for k in range(0, K, BK):
            a_lo = tl.load(A + rm_l[:, None] * K + (k + pos)[None, :])
            a_hi = tl.load(A + rm_l[:, None] * K + (k + pos + G // 2)[None, :])
            w_lo, w_hi = unpack_int4(tl.load(W + rn_l[:, None] * (K // 2) + (k // 2 + c)[None, :]))
            m = tl.load(MULT + rn_l[:, None] * (K // G) + (k // G + c // (G // 2))[None, :]).to(tl.int8)
            acc = tl.dot(a_lo, tl.trans(w_lo * m), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, tl.trans(w_hi * m), acc, out_dtype=tl.int32)
    else:
        rk = tl.arange(0, BK)
        for k in range(0, K, BK):
            a = tl.load(A + rm_l[:, None] * K + (k + rk)[None, :])
            w = tl.load(W + rn_l[:, None] * K + (k + rk)[None, :])
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=ACC)
    sa = tl.load(A_SCALE + rm_l)
    sw = tl.load(WROW + rn_l)
    y = acc.to(tl.float32) * sa[:, None] * sw[None, :]
    y = lowrank_bias_epilogue(y, rm, rn, M, N, LXP, S, LU, R, BIAS, RP, HAS_LR, HAS_BIAS, PREC)
    out = y.to(OUT.dtype.element_ty)
    if GELU:
        out = gelu_tanh(out.to(tl.float32)).to(OUT.dtype.element_ty)
    tl.store(OUT + rm[:, None].to(tl.int64) * N + rn[None, :], out, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _pick(M: int, N: int, packed: bool, fp8: bool) -> dict:
    if M <= 16:
        return dict(BM=16, BN=32, BK=256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BM=64, BN=64, BK=128, GROUP_M=8, num_warps=4, num_stages=4)
    if fp8:
        return dict(BM=128, BN=128, BK=128, GROUP_M=8, num_warps=8, num_stages=4)
    return dict(BM=128, BN=128, BK=256, GROUP_M=8, num_warps=8, num_stages=3)


def w4a8_gemm(a, a_scales, weight, wmult, wrow, lxp, lora_up, bias, out_dtype: torch.dtype, gelu: bool = False,
              config: dict | None = None):
    """W4A8 GEMM with the fused epilogue.

    Args:
        a: int8 ``[M, K]`` pair-split or float8_e4m3fn ``[M, K]`` (or 16-bit, for tests); a_scales float32 ``[M]``.
        weight: packed uint8 ``[N, K // 2]`` (int8 activations; then wmult uint8 ``[N, K // 64]`` is used
            in-kernel) or the expanded ``[N, K]`` from :func:`expand_w4` in a's dtype; wrow float32 ``[N]``.
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]``; bias ``[N]`` or None.
        config: tile dict.
    Returns ``[M, N]`` in out_dtype.
    """
    packed = weight.dtype == torch.uint8
    M, K = a.shape
    N = weight.shape[0]
    cfg = config or _pick(M, N, packed, a.dtype == torch.float8_e4m3fn)
    if K % cfg["BK"]:
        raise ValueError(f"K={K} must be a multiple of BK={cfg['BK']}")
    r = 0 if lxp is None else lxp.shape[2]
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _w4a8_gemm_kernel[grid](
        a, a_scales, weight, wmult, wrow, lxp if r else wrow, lora_up if r else wrow,
        bias if bias is not None else wrow, out, M, N, K, lxp.shape[0] if r else 0, r,
        PACKED=packed, ACC=tl.int32 if a.dtype == torch.int8 else tl.float32, HAS_LR=r > 0, RP=rank_pad(r), HAS_BIAS=bias is not None, GELU=gelu, G=64,
        PREC=dot_precision(lora_up.dtype if r else torch.bfloat16), **cfg,
    )
    return out
