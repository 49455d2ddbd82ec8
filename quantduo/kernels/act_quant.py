"""Kernel 1: one pass over the activations -> smoothing, quantization and the low-rank down-projection.

Reference: :func:`quantduo.formats.reference.act_quant_ref` (layouts in that module's docstring).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (cast_rounded, dot_precision, k_splits, quant4_codes, quant4_tile, rank_pad, shift_smooth_tile,
                     smooth_tile)

_MODES = {"int4": 0, "uint4": 1, "none": 4, "smooth": 5, "int4_deq": 7, "uint4_deq": 8}
FOUR_BIT_MODES = ("int4", "uint4", "int4_deq", "uint4_deq")
# Above this many K slices, the slices add their low-rank partial sums atomically into one ``[1, M, r]`` buffer
# (consumers then read one partial instead of a long dependent chain of them).
MAX_LX_PARTIALS = 16
# Token counts up to which kernel 1 gives every program one 32-wide K step (it is latency-bound there).
FEW_TOKENS = 64


@triton.jit
def _act_quant_kernel(
    X, SMOOTH, SHIFT, LD, Q, QS, LXP,
    M, K, K_SPLIT, R, stride_xm,
    MODE: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr, LR_FULL: tl.constexpr, ATOMIC_LX: tl.constexpr,
    G: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr,
):
    """Program (pid_m, pid_s): rows [pid_m*BM, +BM), channels [pid_s*K_SPLIT, +K_SPLIT).

    X ``[M, K]`` (float16 / bfloat16 / float32); SMOOTH / SHIFT ``[K]``; LD ``[K, R]``; LXP float32 ``[S, M, R]``
    (ATOMIC_LX: ``[1, M, R]``, zero on entry, every slice adds into it). The low-rank branch and the signed 4-bit
    modes read X / SMOOTH, the unsigned ones quantize (X + SHIFT) / SMOOTH (``common.shift_smooth_tile``), each
    step rounded to X's dtype.
    MODE 0/1 int4/uint4: 4-bit groups by Nunchaku's rule (``common.quant4_codes``), Q uint8 ``[M, K/2]``, QS
    float32 ``[K/G, M]`` (values of X's dtype).
    MODE 4 none: low-rank only; 5 smooth: Q = X / SMOOTH ``[M, K]`` (X dtype); 7/8 int4_deq/uint4_deq: the
    4-bit groups of modes 0/1 dequantized, ``q * scale`` rounded to X's dtype, Q ``[M, K]``.
    NATIVE: hardware casts (``common.cast_rounded``) and Nunchaku's approximate reciprocal (``common.reciprocal``).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    mmask = rm < M
    xrow = X + rm[:, None].to(tl.int64) * stride_xm
    qrow = Q + rm[:, None].to(tl.int64) * K
    if HAS_LR:
        rr = tl.arange(0, RP)
        lx = tl.zeros((BM, RP), dtype=tl.float32)
    k0 = pid_s * K_SPLIT
    for k in range(k0, k0 + K_SPLIT, BK):
        x = tl.load(xrow + (k + rk)[None, :], mask=mmask[:, None], other=0.0)
        smooth = tl.load(SMOOTH + k + rk)
        xs = smooth_tile(x, smooth, NATIVE)
        if HAS_LR:
            if LR_FULL:  # R == RP: unmasked vector loads, which the compiler pipelines
                ld = tl.load(LD + (k + rk)[:, None] * RP + rr[None, :])
            else:
                ld = tl.load(LD + (k + rk)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0)
            lx = tl.dot(xs.to(ld.dtype), ld, lx, input_precision=PREC)
        if MODE < 2 or MODE >= 7:
            if MODE == 1 or MODE == 8:  # unsigned: the shift is added before smoothing
                act = shift_smooth_tile(x, tl.load(SHIFT + k + rk), smooth, NATIVE).to(tl.float32)
            else:
                act = xs.to(tl.float32)
            if MODE < 2:
                packed, scale = quant4_tile(act, BM, BK, G, MODE == 1, X.dtype.element_ty, NATIVE)
                rh = tl.arange(0, BK // 2)
                tl.store(Q + rm[:, None].to(tl.int64) * (K // 2) + (k // 2 + rh)[None, :], packed,
                         mask=mmask[:, None])
                rg = tl.arange(0, BK // G)
                tl.store(QS + (k // G + rg)[None, :] * M + rm[:, None], scale, mask=mmask[:, None])
            else:
                codes, scale = quant4_codes(act, BM, BK, G, MODE == 8, X.dtype.element_ty, NATIVE)
                deq = tl.reshape(codes * scale[:, :, None], (BM, BK))
                tl.store(qrow + (k + rk)[None, :], cast_rounded(deq, Q.dtype.element_ty, NATIVE), mask=mmask[:, None])
        elif MODE == 5:
            tl.store(qrow + (k + rk)[None, :], xs, mask=mmask[:, None])
    if HAS_LR:
        lmask = mmask[:, None] & (rr[None, :] < R)
        if ATOMIC_LX:
            tl.atomic_add(LXP + rm[:, None] * R + rr[None, :], lx, mask=lmask, sem="relaxed")
        else:
            tl.store(LXP + pid_s * M * R + rm[:, None] * R + rr[None, :], lx, mask=lmask)


def _pick(M: int, K: int, mode: str) -> tuple[int, int, int]:
    """(BM, BK, splits): 16-row tiles; K split until there are enough programs in flight to cover the
    memory latency (docs/kernel-notes.md). Up to FEW_TOKENS tokens every program does one 32-wide step: a slice's
    steps are a dependent chain there."""
    if M <= FEW_TOKENS:
        bk = 64 if mode in FOUR_BIT_MODES else 32  # 4-bit modes quantize whole groups of 64 per step
        return 16, bk, K // bk
    return 16, 64, k_splits(M, K, 16, 64, 2048)


def act_quant(x: torch.Tensor, smooth: torch.Tensor, shift: torch.Tensor | None, lora_down: torch.Tensor | None,
              mode: str, group_size: int = 64, config: tuple[int, ...] | None = None):
    """Smooth, quantize and down-project ``x [M, K]`` (K a multiple of 64, contiguous rows) in one pass.

    x: float16 / bfloat16 / float32; smooth, shift ``[K]``; lora_down ``[K, r]`` or None.
    mode: ``"int4"`` / ``"uint4"`` (per-token groups of ``group_size`` of ``x / smooth``, signed, or of ``(x +
    shift) / smooth``, unsigned, the sum and the quotient each rounded to x's dtype: Nunchaku's order; with
    ``_deq``: the dequantized values ``[M, K]`` in x's dtype instead of codes and scales), ``"none"`` (low-rank
    only), ``"smooth"`` (``x / smooth`` in x's dtype); only the unsigned modes read ``shift`` (signed layers have
    none). The low-rank branch always reads ``x / smooth`` (unshifted).
    config: (BM, BK, splits[, num_warps]).
    Returns (q, scales, lx_partials) in the layouts of :mod:`quantduo.formats.reference` (q is None for
    ``"none"``, scales None for ``"none"``/``"smooth"``/``"*_deq"``); lx_partials float32 ``[S, M, r]`` (``S = 1`` above MAX_LX_PARTIALS slices: atomic
    sums) or None when there is no low-rank.
    """
    if group_size != 64:
        raise ValueError("the Triton kernels support group size 64")
    M, K = x.shape
    if K % group_size or x.stride(1) != 1:
        raise ValueError(f"act_quant needs K % {group_size} == 0 and unit column stride, got {tuple(x.shape)}")
    bm, bk, splits, *warps = config or _pick(M, K, mode)
    if K % (splits * bk):
        raise ValueError(f"act_quant config: K={K} must be a multiple of splits * BK = {splits} * {bk}")
    r = 0 if lora_down is None else lora_down.shape[1]
    dev = x.device
    q = qs = None
    if mode.startswith("uint4") and shift is None:
        raise ValueError("unsigned 4-bit activation modes need the shift vector")
    if mode in ("int4", "uint4"):
        q = torch.empty(M, K // 2, dtype=torch.uint8, device=dev)
        qs = torch.empty(K // group_size, M, dtype=torch.float32, device=dev)
    elif mode in ("int4_deq", "uint4_deq"):
        q = torch.empty(M, K, dtype=x.dtype, device=dev)
    elif mode == "smooth":
        q = torch.empty(M, K, dtype=x.dtype, device=dev)
    elif mode != "none":
        raise ValueError(f"unknown activation mode {mode!r}")
    atomic_lx = splits > MAX_LX_PARTIALS
    lxp = None if r == 0 else (torch.zeros(1, M, r, dtype=torch.float32, device=dev) if atomic_lx
                               else torch.empty(splits, M, r, dtype=torch.float32, device=dev))
    dummy = x
    grid = (triton.cdiv(M, bm), splits)
    _act_quant_kernel[grid](
        x, smooth, shift if shift is not None else dummy, lora_down if r > 0 else dummy, q if q is not None else dummy,
        qs if qs is not None else dummy, lxp if r > 0 else dummy,
        M, K, K // splits, r, x.stride(0),
        MODE=_MODES[mode], HAS_LR=r > 0, RP=rank_pad(r), LR_FULL=r == rank_pad(r),
        ATOMIC_LX=atomic_lx, G=group_size, BM=bm, BK=bk,
        PREC=dot_precision(lora_down.dtype if r > 0 else x.dtype), NATIVE=x.is_cuda,
        num_warps=(warps or [4])[0],
    )
    return q, qs, lxp
