"""Kernel 2: GEMM with INT4-g64 weights (the paper's format) and a fused epilogue.

One K step = one group of 64: two 32-deep dots over the low / high nibbles of both operands (the dot is
order-invariant, so nothing is interleaved), then ``acc += dot * a_scale[m] * w_scale[n]``.
Activations: packed INT4/UINT4 with group scales (W4A4). W4A16 runs in :mod:`.gemm_w4_dequant`.
Epilogue: + low-rank up-projection + bias, optional GELU, and (MLP fc1) optional quantization of the
output for the next layer, including that layer's low-rank down-projection (float32 atomics).

References: :func:`quantduo.kernels.reference.w4_gemm_ref` and ``quant_next_ref``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (dot_precision, gelu_tanh, lowrank_bias_epilogue, quant4_tile, rank_pad, smooth_tile,
                     tile_ids, unpack_int4, unpack_uint4)

_A_MODES = {"int4": 0, "uint4": 1}


@triton.jit
def _w4_gemm_kernel(
    A, A_SCALE, W, W_SCALE, LXP, LU, BIAS, OUT,
    Q2, QS2, SMOOTH2, SHIFT2, LD2, LX2,
    M, N, K, S, R, R2, stride_wsn, stride_wsg,
    A_MODE: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    QUANT_NEXT: tl.constexpr, NEXT_UNSIGNED: tl.constexpr, HAS_LR2: tl.constexpr, RP2: tl.constexpr,
    G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr,
    RECIP: tl.constexpr,
):
    """OUT ``[M, N]`` = A ``[M, K]`` x W ``[N, K]``^T with group scales, + epilogue.

    A: packed uint8 ``[M, K/2]`` + A_SCALE float32 ``[K/G, M]`` (A_MODE 0 int4 / 1 uint4).
    W: packed int4 ``[N, K/2]``; W_SCALE ``[N, K/G]`` (strides given). QUANT_NEXT: instead of OUT, write kernel 1's outputs for the next layer (Q2 uint8
    ``[M, N/2]``, QS2 float32 ``[N/G, M]``, LX2 float32 ``[M, R2]`` accumulated atomically).
    """
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rc = tl.arange(0, G // 2)
    mmask = rm < M
    nmask = rn < N
    rm_l = tl.minimum(rm, M - 1).to(tl.int64)  # clamped rows/cols: loads need no masks
    rn_l = tl.minimum(rn, N - 1).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, K // G):
        wb = tl.load(W + rn_l[:, None] * (K // 2) + (g * (G // 2) + rc)[None, :])
        w_lo, w_hi = unpack_int4(wb)
        sw = tl.load(W_SCALE + rn_l * stride_wsn + g * stride_wsg).to(tl.float32)
        ab = tl.load(A + rm_l[:, None] * (K // 2) + (g * (G // 2) + rc)[None, :])
        if A_MODE == 0:
            a_lo, a_hi = unpack_int4(ab)
        else:
            a_lo, a_hi = unpack_uint4(ab)
        d = tl.dot(a_lo, tl.trans(w_lo), out_dtype=tl.int32)
        d = tl.dot(a_hi, tl.trans(w_hi), d, out_dtype=tl.int32)
        sa = tl.load(A_SCALE + g * M + rm_l)
        acc += d.to(tl.float32) * (sa[:, None] * sw[None, :])
    acc = lowrank_bias_epilogue(acc, rm, rn, M, N, LXP, S, LU, R, BIAS, RP, HAS_LR, HAS_BIAS, PREC)
    y = acc.to(OUT.dtype.element_ty)
    if GELU:
        y = gelu_tanh(y.to(tl.float32)).to(OUT.dtype.element_ty)
    if QUANT_NEXT:
        xs = smooth_tile(y, tl.load(SMOOTH2 + rn))
        if HAS_LR2:
            rr = tl.arange(0, RP2)
            ld = tl.load(LD2 + rn[:, None] * R2 + rr[None, :], mask=rr[None, :] < R2, other=0.0)
            part = tl.dot(xs.to(ld.dtype), ld, input_precision=PREC)
            tl.atomic_add(LX2 + rm[:, None] * R2 + rr[None, :], part, mask=mmask[:, None] & (rr[None, :] < R2))
        act = xs.to(tl.float32) + tl.load(SHIFT2 + rn).to(tl.float32)[None, :]
        packed, scale = quant4_tile(act, BM, BN, G, NEXT_UNSIGNED, RECIP)
        rh = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        tl.store(Q2 + rm[:, None].to(tl.int64) * (N // 2) + rh[None, :], packed, mask=mmask[:, None])
        rg = pid_n * (BN // G) + tl.arange(0, BN // G)
        tl.store(QS2 + rg[None, :] * M + rm[:, None], scale, mask=mmask[:, None])
    else:
        tl.store(OUT + rm[:, None].to(tl.int64) * N + rn[None, :], y, mask=mmask[:, None] & nmask[None, :])


def _widest(*tensors) -> torch.dtype:
    """float32 if any given tensor is float32 (its dots then need IEEE precision), else bfloat16."""
    return torch.float32 if any(t is not None and t.dtype == torch.float32 for t in tensors) else torch.bfloat16


def _pick(M: int, N: int) -> dict:
    if M <= 16:
        return dict(BM=16, BN=32, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 256:
        return dict(BM=64, BN=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BM=128, BN=128, GROUP_M=8, num_warps=8, num_stages=3)


def w4_gemm(a, a_scales, qweight, wscales, lxp, lora_up, bias, mode: str, out_dtype: torch.dtype,
            gelu: bool = False, next_layer: dict | None = None, config: dict | None = None):
    """Group-scaled 4-bit-weight GEMM with the fused epilogue.

    Args:
        a: packed uint8 ``[M, K // 2]`` (mode int4/uint4), a_scales float32 ``[K // 64, M]``.
        qweight: uint8 ``[N, K // 2]``; wscales ``[N, K // 64]`` (any float dtype, any strides).
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]``; bias ``[N]`` or None.
        next_layer: MLP fusion (fc1 -> fc2): dict with smooth, shift ``[N]``, lora_down ``[N, r2]`` or None,
            mode ``"int4"``/``"uint4"``; the function then returns (q2, scales2, lx2 ``[1, M, r2]``)
            instead of the output ``[M, N]``.
    """
    M = a.shape[0]
    N, K = qweight.shape[0], qweight.shape[1] * 2
    cfg = dict(config or _pick(M, N))
    dev = a.device
    r = 0 if lxp is None else lxp.shape[2]
    dummy = qweight
    q2 = qs2 = lx2 = None
    r2 = 0
    if next_layer is None:
        out = torch.empty(M, N, dtype=out_dtype, device=dev)
    else:
        out = torch.empty(1, dtype=out_dtype, device=dev)  # only its dtype is used
        if N % cfg["BN"]:
            raise ValueError(f"fused next-layer quantization needs N % BN == 0 (N={N}, BN={cfg['BN']})")
        ld2 = next_layer.get("lora_down")
        r2 = 0 if ld2 is None else ld2.shape[1]
        q2 = torch.empty(M, N // 2, dtype=torch.uint8, device=dev)
        qs2 = torch.empty(N // 64, M, dtype=torch.float32, device=dev)
        lx2 = torch.zeros(1, M, r2, dtype=torch.float32, device=dev) if r2 else None
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    nl = next_layer or {}
    _w4_gemm_kernel[grid](
        a, a_scales, qweight, wscales, lxp if lxp is not None else dummy, lora_up if r else dummy,
        bias if bias is not None else dummy, out,
        q2 if q2 is not None else dummy, qs2 if qs2 is not None else dummy,
        nl.get("smooth", dummy), nl.get("shift", dummy), nl.get("lora_down") if r2 else dummy,
        lx2 if lx2 is not None else dummy,
        M, N, K, 0 if lxp is None else lxp.shape[0], r, r2, wscales.stride(0), wscales.stride(1),
        A_MODE=_A_MODES[mode], HAS_LR=r > 0, RP=rank_pad(r), HAS_BIAS=bias is not None, GELU=gelu,
        QUANT_NEXT=next_layer is not None, NEXT_UNSIGNED=nl.get("mode") == "uint4", HAS_LR2=r2 > 0,
        RP2=rank_pad(r2), G=64, PREC=dot_precision(_widest(lora_up, nl.get("lora_down"))), RECIP=a.is_cuda,
        **cfg,
    )
    if next_layer is not None:
        return q2, qs2, lx2
    return out
