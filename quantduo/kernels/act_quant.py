"""Kernel 1: one pass over the activations -> smoothing, quantization and the low-rank down-projection.

Reference: :func:`quantduo.kernels.reference.act_quant_ref` (layouts in that module's docstring).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_precision, quant4_tile, rank_pad, round_half_even, scale_of, smooth_tile

_MODES = {"int4": 0, "uint4": 1, "int8": 2, "none": 3}


@triton.jit
def _act_quant_kernel(
    X, SMOOTH, SHIFT, LD, Q, QS, LXP,
    M, K, K_SPLIT, R, stride_xm,
    MODE: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr, G: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, RECIP: tl.constexpr,
):
    """Program (pid_m, pid_s): rows [pid_m*BM, +BM), channels [pid_s*K_SPLIT, +K_SPLIT).

    X ``[M, K]``; SMOOTH/SHIFT ``[K]``; LD ``[K, R]``. MODE 0/1: 4-bit groups (Q uint8 ``[M, K/2]``,
    QS float32 ``[K/G, M]``); MODE 2: int8 per token over the whole row (Q int8 ``[M, K]`` pair-split,
    QS float32 ``[M]``, no shift); MODE 3: low-rank only. LXP float32 ``[S, M, R]``.
    RECIP: round scales like PyTorch on CUDA (see ``common.scale_of``).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    mmask = rm < M
    xrow = X + rm[:, None].to(tl.int64) * stride_xm
    if MODE == 2:
        amax = tl.zeros((BM,), dtype=tl.float32)
        for k in range(0, K, BK):
            x = tl.load(xrow + (k + rk)[None, :], mask=mmask[:, None], other=0.0)
            xs = smooth_tile(x, tl.load(SMOOTH + k + rk))
            amax = tl.maximum(amax, tl.max(tl.abs(xs.to(tl.float32)), axis=1))
        tscale = scale_of(amax, 127, RECIP)
        if pid_s == 0:
            tl.store(QS + rm, tscale, mask=mmask)
    if HAS_LR:
        rr = tl.arange(0, RP)
        lx = tl.zeros((BM, RP), dtype=tl.float32)
    k0 = pid_s * K_SPLIT
    for k in range(k0, k0 + K_SPLIT, BK):
        x = tl.load(xrow + (k + rk)[None, :], mask=mmask[:, None], other=0.0)
        xs = smooth_tile(x, tl.load(SMOOTH + k + rk))
        if HAS_LR:
            ld = tl.load(LD + (k + rk)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
            lx = tl.dot(xs.to(ld.dtype), ld, lx, input_precision=PREC)
        if MODE < 2:
            act = xs.to(tl.float32) + tl.load(SHIFT + k + rk).to(tl.float32)[None, :]
            packed, scale = quant4_tile(act, BM, BK, G, MODE == 1, RECIP)
            rh = tl.arange(0, BK // 2)
            tl.store(Q + rm[:, None].to(tl.int64) * (K // 2) + (k // 2 + rh)[None, :], packed, mask=mmask[:, None])
            rg = tl.arange(0, BK // G)
            tl.store(QS + (k // G + rg)[None, :] * M + rm[:, None], scale, mask=mmask[:, None])
        elif MODE == 2:
            q = round_half_even(tl.math.div_rn(xs.to(tl.float32), tscale[:, None]))
            q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)
            even, odd = tl.split(tl.reshape(q, (BM, BK // 2, 2)))
            c = tl.arange(0, BK // 2)
            pos = k + (c // (G // 2)) * G + c % (G // 2)
            qrow = Q + rm[:, None].to(tl.int64) * K
            tl.store(qrow + pos[None, :], even, mask=mmask[:, None])
            tl.store(qrow + (pos + G // 2)[None, :], odd, mask=mmask[:, None])
    if HAS_LR:
        tl.store(LXP + pid_s * M * R + rm[:, None] * R + rr[None, :], lx, mask=mmask[:, None] & (rr[None, :] < R))


def _pick(M: int, K: int, mode: str) -> tuple[int, int, int]:
    """(BM, BK, splits): 16-row tiles, K split until there are enough programs (measured on H200, NOTES.md).
    int8 mode re-reads the whole row per split for its per-token absmax, so it splits less."""
    bm, bk = 16, 64
    target = 264 if mode == "int8" else 2048
    n_m = triton.cdiv(M, bm)
    splits = 1
    while n_m * splits < target and K % (splits * 2 * bk) == 0:
        splits *= 2
    return bm, bk, splits


def act_quant(x: torch.Tensor, smooth: torch.Tensor, shift: torch.Tensor | None, lora_down: torch.Tensor | None,
              mode: str, group_size: int = 64, config: tuple[int, ...] | None = None):
    """Smooth, quantize and down-project ``x [M, K]`` (K a multiple of 64, contiguous rows) in one pass.

    mode: ``"int4"`` / ``"uint4"`` (per-token groups of ``group_size``, ``shift [K]`` added first),
    ``"int8"`` (per token, pair-split) or ``"none"`` (low-rank only); these two ignore ``shift``.
    config: (BM, BK, splits[, num_warps]). Returns (q, scales, lx_partials) in the layouts of
    :mod:`quantduo.kernels.reference`; lx_partials float32 ``[S, M, r]`` or None when there is no low-rank.
    """
    if group_size != 64:
        raise ValueError("the Triton kernels support group size 64")
    M, K = x.shape
    if K % group_size or x.stride(1) != 1:
        raise ValueError(f"act_quant needs K % {group_size} == 0 and unit column stride, got {tuple(x.shape)}")
    bm, bk, splits, *warps = config or _pick(M, K, mode)
    r = 0 if lora_down is None else lora_down.shape[1]
    dev = x.device
    if mode in ("int4", "uint4"):
        q = torch.empty(M, K // 2, dtype=torch.uint8, device=dev)
        qs = torch.empty(K // group_size, M, dtype=torch.float32, device=dev)
    elif mode == "int8":
        q = torch.empty(M, K, dtype=torch.int8, device=dev)
        qs = torch.empty(M, dtype=torch.float32, device=dev)
    elif mode == "none":
        q = qs = None
    else:
        raise ValueError(f"unknown activation mode {mode!r}")
    lxp = torch.empty(splits, M, r, dtype=torch.float32, device=dev) if r > 0 else None
    dummy = x
    if shift is None and mode in ("int4", "uint4"):
        raise ValueError("4-bit activation modes need the shift vector")
    grid = (triton.cdiv(M, bm), splits)
    _act_quant_kernel[grid](
        x, smooth, shift if shift is not None else dummy, lora_down if r > 0 else dummy, q if q is not None else dummy,
        qs if qs is not None else dummy, lxp if lxp is not None else dummy,
        M, K, K // splits, r, x.stride(0),
        MODE=_MODES[mode], HAS_LR=r > 0, RP=rank_pad(r), G=group_size, BM=bm, BK=bk,
        PREC=dot_precision(lora_down.dtype if r > 0 else x.dtype), RECIP=x.is_cuda, num_warps=(warps or [4])[0],
    )
    return q, qs, lxp
