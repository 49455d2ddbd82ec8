"""Skinny GEMM for few tokens (M <= 64): INT4-g64 weights as the large operand, split-K. Serves 16-bit
activations (already smoothed) and W4A4 (packed 4-bit activation codes with group scales) at small M, where a layer only streams its weights.

The problem is computed transposed, ``out^T [N, M] = W [N, K] x a^T [K, M]``, so the weights fill the wide side
of the tensor-core dot and the tokens the narrow one. One K step is one group of 64 inputs:

* The packed words become 16-bit ``1 + u / 16`` by bit placement, two values per 32-bit operation (``u`` is the
  nibble XOR 8, i.e. the signed code plus 8; no integer-to-float conversion), joined into natural input order.
* ``d = dot(those - 1.5, a^T) = sum(q * a) / 16``, the offset as a second dot with a constant operand chained
  into the same accumulator (tensor cores, no per-element ALU work); exact for 4-bit activation codes,
  float32-accumulated for 16-bit ones. The group scale then multiplies a ``[BN, BM]`` tile, not every weight, and
  the group scales are loaded one group ahead (2-byte gathers are not pipelined by the compiler).
* K is split over ``SPLIT_K`` programs per output tile (enough programs to stream the weights); each adds its
  float32 partial tile atomically into a zeroed workspace, and the last one to finish (per-tile counter) reads the
  sum, zeroes the workspace tile and the counter, and adds the low-rank up-projection and the bias. (Summing
  stored partials in slice order would be deterministic, but holding them cost registers, i.e. occupancy.)

References: :func:`quantduo.formats.reference.w4_gemv_ref` (16-bit activations, exact float32 weights) and
:func:`quantduo.formats.reference.w4_gemm_ref` (4-bit activations).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import gelu_tanh, lowrank_bias_apply, lowrank_partials_sum, rank_pad, split_k_workspace
from .gemv_w4 import FLIP_SIGN_BITS

GROUP = 64
MAX_TOKENS = 64
_A_MODES = {"none": 0, "int4": 1, "uint4": 2}



@triton.jit
def _nibble_pair(v, j: tl.constexpr, DT: tl.constexpr):
    """Nibbles ``j`` and ``j + 4`` of int32 words ``v`` (already XOR 0x88888888) as 16-bit ``1 + u / 16`` of
    dtype DT (bfloat16 or float16): one shift, mask and OR places both in the mantissas of a pair of 1.0s."""
    if DT == tl.bfloat16:
        one2 = 0x3F803F80
        t = ((v >> (4 * j)) & 0x000F000F) << 3
    else:
        one2 = 0x3C003C00
        t = ((v >> (4 * j)) & 0x000F000F) << 6
    t = t | one2
    return t.to(tl.int16).to(DT, bitcast=True), (t >> 16).to(tl.int16).to(DT, bitcast=True)


@triton.jit
def _group_codes(v, BN: tl.constexpr, G: tl.constexpr, DT: tl.constexpr):
    """int32 words ``[BN, G / 8]`` (8 nibbles each) -> ``[BN, G]`` 16-bit ``1 + u / 16`` in natural element order
    (element ``8w + i`` is nibble ``i`` of word ``w``)."""
    e0, e4 = _nibble_pair(v, 0, DT)
    e1, e5 = _nibble_pair(v, 1, DT)
    e2, e6 = _nibble_pair(v, 2, DT)
    e3, e7 = _nibble_pair(v, 3, DT)
    # joins from the highest index bit down, so the flattened last three dims read i = 4 * i2 + 2 * i1 + i0
    even = tl.join(tl.join(e0, e4), tl.join(e2, e6))
    odd = tl.join(tl.join(e1, e5), tl.join(e3, e7))
    return tl.reshape(tl.join(even, odd), (BN, G))


@triton.jit
def _act_group(A, rm_l, g, K, stride_am, A_MODE: tl.constexpr, BM: tl.constexpr, G: tl.constexpr,
               DT: tl.constexpr):
    """Activations of group ``g``: ``[BM, 64]`` in DT (16-bit values, or the exact 4-bit codes)."""
    if A_MODE == 0:
        a = tl.load(A + rm_l[:, None] * stride_am + (g * G + tl.arange(0, G))[None, :])
    else:
        b = tl.load(A + rm_l[:, None] * (K // 2) + (g * (G // 2) + tl.arange(0, G // 2))[None, :])
        b = b.to(tl.int32)
        if A_MODE == 1:
            lo, hi = ((b & 15) ^ 8) - 8, ((b >> 4) ^ 8) - 8
        else:
            lo, hi = b & 15, b >> 4
        a = tl.reshape(tl.join(lo, hi), (BM, G)).to(tl.float32).to(DT)
    return a


@triton.jit
def _group(acc, A, W, rm_l, rn_l, g, K, stride_am, w_scale, a_scale, A_MODE: tl.constexpr, BM: tl.constexpr,
           BN: tl.constexpr, G: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``acc [BN, BM]`` + group ``g``'s contribution: ``w_scale [BN] * sum(q * a) (* a_scale [BM])``."""
    v = tl.load(W + rn_l[:, None] * (K // 8) + (g * 8 + tl.arange(0, 8))[None, :]) ^ FLIP_SIGN_BITS
    a_t = tl.trans(_act_group(A, rm_l, g, K, stride_am, A_MODE, BM, G, DT))
    offset = tl.full((BN, G), -1.5, DT)  # (1 + u / 16) - 1.5 = q / 16, on the tensor cores
    d = tl.dot(_group_codes(v, BN, G, DT), a_t, tl.dot(offset, a_t, input_precision=PREC), input_precision=PREC)
    if A_MODE > 0:
        d *= a_scale[None, :]
    return acc + (16.0 * w_scale.to(tl.float32))[:, None] * d  # d = sum(q * a) / 16


@triton.jit
def _w4_skinny_kernel(
    A, A_SCALE, W, WS, LXP, LU, BIAS, OUT, PART, COUNTS,
    M, N, K, GROUPS_PER_SPLIT, S, R, stride_am, stride_wsn, stride_wsg,
    A_MODE: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr, SPLIT_K: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program (tile, pid_k): rows ``[BN]`` of OUT ``[M, N]`` for tokens ``[BM]``, groups of slice pid_k.

    A: 16-bit ``[M, K]`` (A_MODE 0, row stride stride_am) or packed uint8 ``[M, K/2]`` with A_SCALE float32
    ``[K/64, M]`` (A_MODE 1 int4 / 2 uint4). W int32 view ``[N, K/8]`` of the packed int4 weights; WS
    ``[N, K/64]`` group scales (strides given). LXP float32 ``[S, M, R]``, LU ``[N, R]``, BIAS ``[N]``.
    SPLIT_K > 1: PART float32 ``[M, N]`` and COUNTS int32 ``[tiles]`` (zero on entry and exit).
    GELU: tanh GELU on the rounded output (as ``epilogue_ref``).
    """
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_tiles_n = tl.cdiv(N, BN)
    pid_m = tile // n_tiles_n
    pid_n = tile % n_tiles_n
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm_l = tl.minimum(rm, M - 1).to(tl.int64)  # clamped rows / columns: loads need no masks
    rn_l = tl.minimum(rn, N - 1).to(tl.int64)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    g0 = pid_k * GROUPS_PER_SPLIT
    ws_row = WS + rn_l * stride_wsn
    # group scales are 2-byte gathers that the compiler does not pipeline: each is loaded one group ahead
    # (a longer prefetch distance, carried in more registers, made the compiler drop the pipelining of the tiles)
    a_scale_ptrs = A_SCALE + rm_l
    w_scale = tl.load(ws_row + g0 * stride_wsg)
    if A_MODE > 0:
        a_scale = tl.load(a_scale_ptrs + g0 * M)
    else:  # unused placeholder
        a_scale = tl.full((BM,), 1.0, tl.float32)
    for g in range(g0, g0 + GROUPS_PER_SPLIT):
        g_next = tl.minimum(g + 1, g0 + GROUPS_PER_SPLIT - 1)
        w_scale_next = tl.load(ws_row + g_next * stride_wsg)
        if A_MODE > 0:
            a_scale_next = tl.load(a_scale_ptrs + g_next * M)
        else:
            a_scale_next = a_scale
        acc = _group(acc, A, W, rm_l, rn_l, g, K, stride_am, w_scale, a_scale, A_MODE, BM, BN, G, DT, PREC)
        w_scale = w_scale_next
        a_scale = a_scale_next
    mmask = rm < M
    nmask = rn < N
    if SPLIT_K > 1:
        ws = PART + rm_l[None, :] * N + rn_l[:, None]
        tl.atomic_add(ws, acc, mask=mmask[None, :] & nmask[:, None], sem="relaxed")
        tl.debug_barrier()  # every thread's partial sum is issued before the counter increment (release)
        if tl.atomic_add(COUNTS + tile, 1) == SPLIT_K - 1:  # the last slice of this tile finishes it
            out_mask = mmask[:, None] & nmask[None, :]
            tile_ptrs = PART + rm_l[:, None] * N + rn_l[None, :]
            total = tl.load(tile_ptrs, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(tile_ptrs, tl.zeros((BM, BN), dtype=tl.float32), mask=out_mask)
            tl.store(COUNTS + tile, 0)
            _epilogue(total, rm, rn, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU,
                      PREC)
    else:
        _epilogue(tl.trans(acc), rm, rn, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU,
                  PREC)


@triton.jit
def _epilogue(acc, rm, rn, M, N, LXP, S, LU, R, BIAS, OUT, RP: tl.constexpr,
              HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr):
    """Per-row scale, low-rank up-projection + bias (+ GELU) on the float32 tile ``acc [BM, BN]``, stored to OUT
    ``[M, N]``. The low-rank partials are summed 4 at a time (fewer dependent round trips in this tail, few
    registers)."""
    lx = None
    if HAS_LR:
        lx = lowrank_partials_sum(LXP, S, M, R, rm, RP, 4)
    acc = lowrank_bias_apply(acc, lx, rn, N, LU, R, BIAS, RP, HAS_LR, HAS_BIAS, PREC)
    y = acc.to(OUT.dtype.element_ty)
    if GELU:
        y = gelu_tanh(y.to(tl.float32), False).to(OUT.dtype.element_ty)
    tl.store(OUT + rm[:, None].to(tl.int64) * N + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _pick(M: int, N: int, K: int) -> dict:
    """64 output rows per program, the tokens padded to 16 / 32 / 64, and K split (whole groups, a power of two)
    until about 3 programs per SM of an H100 stream the weights (near the best of a sweep at M = 16, FLUX shapes;
    BENCHMARKS.md)."""
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    bn = 64
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    while tiles * split < 384 and (K // GROUP) % (split * 2) == 0:
        split *= 2
    return dict(BM=bm, BN=bn, SPLIT_K=split, num_warps=4, num_stages=3)


def check_skinny_inputs(a, a_scales, qweight, wscales, mode: str) -> None:
    """Shape / dtype / layout checks of :func:`w4_skinny_gemm` (clear errors instead of a wrong answer)."""
    if mode not in _A_MODES:
        raise ValueError(f"mode must be one of {tuple(_A_MODES)}, got {mode!r}")
    N, half_k = qweight.shape
    K = 2 * half_k
    M = a.shape[0]
    if qweight.dtype != torch.uint8 or K % GROUP or not qweight.is_contiguous() or qweight.data_ptr() % 4:
        raise ValueError(f"qweight must be contiguous 4-byte aligned uint8 [N, K/2] with K a multiple of {GROUP}, "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if wscales.shape != (N, K // GROUP):
        raise ValueError(f"wscales must be [N, K/{GROUP}] = [{N}, {K // GROUP}], got {tuple(wscales.shape)}")
    if M > MAX_TOKENS:
        raise ValueError(f"the skinny GEMM serves at most {MAX_TOKENS} tokens, got {M}")
    if mode == "none":
        if a.dtype not in (torch.float16, torch.bfloat16) or a.shape != (M, K) or a.stride(1) != 1:
            raise ValueError(f"16-bit activations must be float16/bfloat16 [M, {K}] with unit column stride, "
                             f"got {a.dtype} {tuple(a.shape)}")
    elif a.dtype != torch.uint8 or a.shape != (M, K // 2) or not a.is_contiguous() or a_scales is None \
            or a_scales.shape != (K // GROUP, M) or a_scales.dtype != torch.float32 or not a_scales.is_contiguous():
        raise ValueError(f"4-bit activations must be packed uint8 [M, {K // 2}] with float32 scales "
                         f"[{K // GROUP}, M] (contiguous)")


def w4_skinny_gemm(a, a_scales, qweight, wscales, lxp, lora_up, bias, mode: str, out_dtype: torch.dtype,
                   gelu: bool = False, config: dict | None = None) -> torch.Tensor:
    """``[M, N]`` output (M <= 64 tokens) of an INT4-g64 layer with the fused low-rank and bias epilogue.

    Args:
        a: mode ``"none"``: 16-bit ``[M, K]`` smoothed activations (unit column stride); ``"int4"`` /
            ``"uint4"``: packed uint8 ``[M, K // 2]`` from kernel 1, with a_scales float32 ``[K // 64, M]``.
        qweight: packed int4 uint8 ``[N, K // 2]`` (contiguous); wscales ``[N, K // 64]`` group scales (any
            strides).
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]``; bias ``[N]`` or None.
        gelu: apply the tanh GELU to the output (MLP fc1).
        config: dict(BM, BN, SPLIT_K, num_warps, num_stages); SPLIT_K must divide K / 64.
    """
    check_skinny_inputs(a, a_scales, qweight, wscales, mode)
    M = a.shape[0]
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    cfg = dict(config or _pick(M, N, K))
    split = cfg.pop("SPLIT_K")
    if (K // GROUP) % split:
        raise ValueError(f"SPLIT_K={split} must divide the {K // GROUP} groups of 64 inputs")
    dt = a.dtype if mode == "none" else torch.float16  # 4-bit codes and 1 + u / 16 are exact in float16
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    part, counts = split_k_workspace("skinny", M * N, tiles, a.device) if split > 1 else (out, out)
    r = 0 if lxp is None else lxp.shape[2]
    dummy = qweight
    _w4_skinny_kernel[(tiles, split)](
        a, a_scales if a_scales is not None else dummy, qweight.view(torch.int32), wscales,
        lxp if r else dummy, lora_up if r else dummy,
        bias if bias is not None else dummy, out, part, counts,
        M, N, K, K // GROUP // split, 0 if lxp is None else lxp.shape[0], r, a.stride(0),
        wscales.stride(0), wscales.stride(1),
        A_MODE=_A_MODES[mode], HAS_LR=r > 0, RP=rank_pad(r),
        HAS_BIAS=bias is not None, GELU=gelu, SPLIT_K=split, G=GROUP,
        DT=tl.bfloat16 if dt == torch.bfloat16 else tl.float16,
        PREC="ieee" if r and lora_up.dtype == torch.float32 else "tf32", **cfg,
    )
    return out
