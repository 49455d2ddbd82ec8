"""Weight-streaming GEMM: 4-bit weights dequantized to 16 bits once per K step, 16-bit dots.

Each K step: the activation tile ``[BM, BK]`` is split in registers into even / odd channels, which line
up with the low / high nibbles of the packed weights ``[BN, BK / 2]``; the nibbles times their group
factor (loaded per byte, L1-cached) become two 16-bit tiles: two dots, no interleaving.

Serves W4A16 (INT4-g64 weights, float group scales) and the small-M path of the Hopper W4A8 formats
(integer group multipliers + per-row scale; 8-bit per-token activations fake-quantized in-kernel, which
is exact: 8-bit codes and ``q * mult`` are exact in 16 bits, products accumulate in float32).
Split-K (small M, memory-bound): every K slice adds its float32 partial tile atomically into a
self-cleaning per-device workspace; the last slice of a tile (per-tile counter) applies the epilogue and
zeroes the workspace tile and counter for the next call.

Reference: :func:`quantduo.kernels.reference.w4_dequant_gemm_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (dot_precision, fake_quant_token, gelu_tanh, lowrank_bias_epilogue, rank_pad, scale_of,
                     smooth_tile, split_k_workspace, tile_ids, unpack_int4)

_ACT_QMAX = {"none": 0, "int8": 127, "fp8": 448}


@triton.jit
def _w4_dequant_gemm_kernel(
    X, SMOOTH, AMAXP, W, WF, WROW, LXP, LU, BIAS, OUT, ACC_WS, COUNTS,
    M, N, K, K_SPLIT, S_AMAX, S, R, stride_xm, stride_wfn, stride_wfg,
    SMOOTH_IN: tl.constexpr, QMAX: tl.constexpr, HAS_WROW: tl.constexpr, HAS_LR: tl.constexpr, RP: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, SPLIT_K: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr, RECIP: tl.constexpr,
):
    """Program (tile, pid_k): OUT ``[M, N]`` += X[:, slice] x dequant(W[:, slice])^T, then the epilogue.

    X 16-bit ``[M, K]`` (divided by SMOOTH ``[K]`` in-kernel when SMOOTH_IN). QMAX 127 / 448: fake-quantize
    X per token to int8 / fp8 with scale absmax / QMAX, absmax = max over AMAXP float32 ``[S_AMAX, M]``; the
    scale is applied in the epilogue. W packed int4 ``[N, K/2]``; WF ``[N, K/G]`` group factor (float
    scales or uint8 multipliers, strides given); WROW float32 ``[N]`` per-row scale (HAS_WROW).
    LXP float32 ``[S, M, R]``, LU ``[N, R]``, BIAS ``[N]``. SPLIT_K > 1: ACC_WS float32 ``[M, N]`` and
    COUNTS int32 ``[tiles]``, both zero on entry and on exit.
    """
    tile = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_ids(tile, M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rc = tl.arange(0, BK // 2)
    mmask = rm < M
    nmask = rn < N
    rm_l = tl.minimum(rm, M - 1).to(tl.int64)
    rn_l = tl.minimum(rn, N - 1).to(tl.int64)
    if QMAX > 0:
        amax = tl.zeros((BM,), dtype=tl.float32)
        for s in range(S_AMAX):
            amax = tl.maximum(amax, tl.load(AMAXP + s * M + rm_l))
        ascale = scale_of(amax, QMAX, RECIP)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k0 = pid_k * K_SPLIT
    for k in range(k0, k0 + K_SPLIT, BK):
        x = tl.load(X + rm_l[:, None] * stride_xm + (k + rk)[None, :])
        if SMOOTH_IN:
            x = smooth_tile(x, tl.load(SMOOTH + k + rk))
        if QMAX > 0:
            x = fake_quant_token(x, ascale, QMAX).to(x.dtype)
        x_even, x_odd = tl.split(tl.reshape(x, (BM, BK // 2, 2)))  # lines up with the low / high nibbles
        lo, hi = unpack_int4(tl.load(W + rn_l[:, None] * (K // 2) + (k // 2 + rc)[None, :]))
        f = tl.load(WF + rn_l[:, None] * stride_wfn + ((k + 2 * rc) // G)[None, :] * stride_wfg).to(tl.float32)
        acc = tl.dot(x_even, tl.trans((lo.to(tl.float32) * f).to(x.dtype)), acc, input_precision=PREC)
        acc = tl.dot(x_odd, tl.trans((hi.to(tl.float32) * f).to(x.dtype)), acc, input_precision=PREC)
    if QMAX > 0:
        acc *= ascale[:, None]
    if HAS_WROW:
        acc *= tl.load(WROW + rn_l)[None, :]
    if SPLIT_K > 1:
        ws = ACC_WS + rm_l[:, None] * N + rn_l[None, :]
        tl.atomic_add(ws, acc, mask=mmask[:, None] & nmask[None, :], sem="relaxed")
        tl.debug_barrier()  # all partial sums of this program are issued before its counter increment
        if tl.atomic_add(COUNTS + tile, 1) == SPLIT_K - 1:  # the last K slice of this tile finishes it
            acc = tl.load(ws, cache_modifier=".cg")
            tl.store(ws, tl.zeros((BM, BN), dtype=tl.float32), mask=mmask[:, None] & nmask[None, :])
            tl.store(COUNTS + tile, 0)
            _epilogue_store(acc, rm, rn, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU, PREC)
    else:
        _epilogue_store(acc, rm, rn, M, N, LXP, S, LU, R, BIAS, OUT, RP, HAS_LR, HAS_BIAS, GELU, PREC)


@triton.jit
def _epilogue_store(acc, rm, rn, M, N, LXP, S, LU, R, BIAS, OUT, RP: tl.constexpr, HAS_LR: tl.constexpr,
                    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, PREC: tl.constexpr):
    """Low-rank up-projection + bias (+ GELU) on the float32 tile, stored to OUT ``[M, N]``."""
    acc = lowrank_bias_epilogue(acc, rm, rn, M, N, LXP, S, LU, R, BIAS, RP, HAS_LR, HAS_BIAS, PREC)
    y = acc.to(OUT.dtype.element_ty)
    if GELU:
        y = gelu_tanh(y.to(tl.float32)).to(OUT.dtype.element_ty)
    tl.store(OUT + rm[:, None].to(tl.int64) * N + rn[None, :], y, mask=(rm[:, None] < M) & (rn[None, :] < N))


def _pick(M: int, N: int, K: int) -> dict:
    """Tiles (measured on H200, NOTES.md): small M streams the weights with split-K; large M uses big tiles."""
    if M <= 64:
        bm = 16 if M <= 16 else (32 if M <= 32 else 64)
        bk = 256 if K % 256 == 0 else (128 if K % 128 == 0 else 64)
        split = 1
        while triton.cdiv(N, 64) * split < 256 and K % (split * 2 * bk) == 0:
            split *= 2
        return dict(BM=bm, BN=64, BK=bk, SPLIT_K=split, GROUP_M=1, num_warps=4, num_stages=4)
    return dict(BM=128, BN=128, BK=64, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=3)


def w4_dequant_gemm(x, qweight, wfactor, lxp, lora_up, bias, out_dtype: torch.dtype, smooth=None, act: str = "none",
                    amax_partials=None, wrow=None, gelu: bool = False, config: dict | None = None):
    """``[M, N]`` output of the weight-streaming GEMM with the fused epilogue.

    Args:
        x: 16-bit ``[M, K]`` (unit column stride), divided by ``smooth [K]`` in-kernel when given.
        qweight: packed int4 uint8 ``[N, K // 2]``; wfactor ``[N, K // 64]`` group factor (any dtype/strides);
            wrow float32 ``[N]`` per-row scale or None.
        act: ``"none"`` (16-bit activations), ``"int8"`` / ``"fp8"`` (per-token fake quantization with the
            absmax from ``amax_partials`` float32 ``[S, M]``, e.g. kernel 1's ``"amax"`` mode).
        lxp: float32 low-rank partials ``[S, M, r]`` or None; lora_up ``[N, r]``; bias ``[N]`` or None.
        config: tile dict (BM, BN, BK, SPLIT_K, GROUP_M, num_warps, num_stages).
    """
    M, K = x.shape
    N = qweight.shape[0]
    cfg = dict(config or _pick(M, N, K))
    split = cfg.pop("SPLIT_K")
    if K % (split * cfg["BK"]) or x.stride(1) != 1:
        raise ValueError(f"K={K} must be a multiple of SPLIT_K*BK={split}*{cfg['BK']} (unit column stride)")
    if act != "none" and amax_partials is None:
        raise ValueError("8-bit activation fake quantization needs the absmax partials")
    if wfactor.shape != (N, K // 64):
        raise ValueError(f"the weight-streaming GEMM serves groups of 64: wfactor must be [N, K/64] = [{N}, {K // 64}],"
                         f" got {tuple(wfactor.shape)}")
    r = 0 if lxp is None else lxp.shape[2]
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    tiles = triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"])
    ws, counts = split_k_workspace("dequant", M * N, tiles, x.device) if split > 1 else (out, out)
    dummy = qweight
    _w4_dequant_gemm_kernel[(tiles, split)](
        x, smooth if smooth is not None else dummy, amax_partials if amax_partials is not None else dummy,
        qweight, wfactor, wrow if wrow is not None else dummy, lxp if r else dummy, lora_up if r else dummy,
        bias if bias is not None else dummy, out, ws, counts,
        M, N, K, K // split, 0 if amax_partials is None else amax_partials.shape[0], 0 if lxp is None else lxp.shape[0],
        r, x.stride(0), wfactor.stride(0), wfactor.stride(1),
        SMOOTH_IN=smooth is not None, QMAX=_ACT_QMAX[act], HAS_WROW=wrow is not None, HAS_LR=r > 0, RP=rank_pad(r),
        HAS_BIAS=bias is not None, GELU=gelu, SPLIT_K=split, G=64,
        PREC=dot_precision(torch.float32 if x.dtype == torch.float32 or (r and lora_up.dtype == torch.float32)
                           else torch.bfloat16), RECIP=x.is_cuda, **cfg,
    )
    return out
