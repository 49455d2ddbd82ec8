"""One-token GEMV over packed INT4 weights (W4A16 decoding): ``y[m] = x[m] @ dequant(W)^T`` + low-rank
up-projection + bias, for the few tokens of a decode step (inputs already smoothed, by a separate op).

At one token a linear layer only streams its weights, so the kernel does CUDA-core FMAs on whole weight rows
and no tensor-core dot (a tensor-core dot would pad the one token to 16 rows). Program (row block, token) reads ``BN`` weight rows as int32
words of 8 nibbles. A nibble becomes a float32 without an integer-to-float conversion (a quarter-rate
instruction on Hopper): masked into mantissa bits 16..19 under the exponent of 1.0 it reads as ``1 + u / 128``.
With ``u = nibble ^ 8`` the signed code is ``q = u - 8`` (two's complement nibbles, :mod:`quantduo.formats.quantizers`),
so a group of 64 inputs contributes ``scale * (128 * sum(f * x) - 136 * sum(x))``.

Reference: :func:`quantduo.formats.reference.w4_gemv_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import lowrank_partials_sum, rank_pad

GROUP = 64
FLIP_SIGN_BITS = tl.constexpr(-0x77777778)  # 0x88888888 as int32: XOR turns each two's complement nibble into q + 8
ONE_F32 = tl.constexpr(0x3F800000)


@triton.jit
def _nibble_as_float(v, i: tl.constexpr):
    """``1 + u / 128`` as float32 for nibble ``i`` (bits 4i..4i+3) of int32 ``v``: the nibble is shifted to bits
    16..19 and masked under the exponent of 1.0."""
    if i < 4:
        t = v << (16 - 4 * i)
    elif i > 4:
        t = v >> (4 * i - 16)
    else:
        t = v
    return ((t & 0x000F0000) | ONE_F32).to(tl.float32, bitcast=True)


@triton.jit
def _w4_gemv_kernel(
    X, W, WS, LXP, LU, BIAS, OUT, M, N, KW, S, R, stride_xm,
    HAS_LR: tl.constexpr, RP: tl.constexpr, HAS_BIAS: tl.constexpr, BN: tl.constexpr, BKW: tl.constexpr,
):
    """Program (row block, token m): OUT[m, rows] for X 16-bit ``[M, 8 * KW]`` (row stride ``stride_xm``),
    W int32 ``[N, KW]`` (8 packed nibbles per word, element ``8w + i`` in bits ``4i..4i+3``), WS ``[N, KW / 8]``
    group scales, LXP float32 ``[S, M, R]`` low-rank partials, LU ``[N, R]``, BIAS ``[N]``, OUT ``[M, N]``."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    GPI: tl.constexpr = BKW // 8  # groups of 64 inputs per K step
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rn_l = tl.minimum(rn, N - 1).to(tl.int64)
    rw = tl.arange(0, BKW)
    rg = tl.arange(0, GPI)
    x_row = X + m * stride_xm
    acc = tl.zeros([BN, GPI], tl.float32)
    for w0 in range(0, KW, BKW):
        word = w0 + rw
        wmask = word < KW
        v = tl.load(W + rn_l[:, None] * KW + word[None, :], mask=wmask[None, :], other=0) ^ FLIP_SIGN_BITS
        fx = tl.zeros([BN, BKW], tl.float32)
        x_sum = tl.zeros([BKW], tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_row + 8 * word + i, mask=wmask, other=0.0).to(tl.float32)
            x_sum += xi
            fx += _nibble_as_float(v, i) * xi[None, :]
        group_fx = tl.sum(tl.reshape(fx, (BN, GPI, 8)), axis=2)
        group_x = tl.sum(tl.reshape(x_sum, (GPI, 8)), axis=1)
        grp = w0 // 8 + rg
        scale = tl.load(WS + rn_l[:, None] * (KW // 8) + grp[None, :], mask=(grp < KW // 8)[None, :], other=0.0)
        acc += scale.to(tl.float32) * (128.0 * group_fx - 136.0 * group_x[None, :])
    y = tl.sum(acc, axis=1)
    if HAS_LR:  # as epilogue_ref: partials summed and rounded to the lora dtype, product rounded too
        rr = tl.arange(0, RP)
        lx = tl.reshape(lowrank_partials_sum(LXP, S, M, R, m + tl.zeros([1], tl.int32), RP, 16), (RP,))
        lu = tl.load(LU + rn_l[:, None] * R + rr[None, :], mask=(rr < R)[None, :], other=0.0)
        lx = lx.to(lu.dtype).to(tl.float32)
        y += tl.sum(lu.to(tl.float32) * lx[None, :], axis=1).to(lu.dtype).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + rn_l).to(tl.float32)
    tl.store(OUT + m * N + rn, y.to(OUT.dtype.element_ty), mask=nmask)


def _pick(M: int, N: int, KW: int) -> dict:
    """K steps of the largest power of two of words up to 256 (2048 inputs) that divides KW, so that no step is
    partly masked (a masked half step still costs its instructions). At 256 words: 16 rows per program (8 below 256
    programs), 8 warps unless there are many programs (sweep at Llama-3-8B shapes on an H100); at fewer words
    (FLUX's 3072 inputs: 128): 8 rows, 4 warps (sweep at FLUX's modulation shapes, where 8 warps took 2-6x as long:
    BENCHMARKS.md, twenty-third session)."""
    bkw = min(256, KW & -KW)
    if bkw < 256:
        return dict(BN=8, BKW=bkw, num_warps=4, num_stages=3)
    bn = 16 if triton.cdiv(N, 16) * M >= 256 else 8
    warps = 4 if triton.cdiv(N, bn) * M > 512 else 8
    return dict(BN=bn, BKW=bkw, num_warps=warps, num_stages=3)


def check_gemv_inputs(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor) -> None:
    """Shape / layout checks of :func:`w4_gemv` (clear errors instead of a wrong answer)."""
    M, K = x.shape
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape != (N, K // 2) or K % GROUP:
        raise ValueError(f"qweight must be uint8 [N, K/2] for x [M, K] with K a multiple of {GROUP}; got x "
                         f"{tuple(x.shape)}, qweight {qweight.dtype} {tuple(qweight.shape)}")
    if wscales.shape != (N, K // GROUP):
        raise ValueError(f"wscales must be [N, K/{GROUP}] = [{N}, {K // GROUP}], got {tuple(wscales.shape)}")
    if not (qweight.is_contiguous() and wscales.is_contiguous()) or qweight.data_ptr() % 4 or x.stride(1) != 1:
        raise ValueError("qweight (4-byte aligned) and wscales must be contiguous, x needs unit column stride")


def w4_gemv(x, qweight, wscales, lxp, lora_up, bias, out_dtype: torch.dtype, config: dict | None = None):
    """``[M, N]`` output for a few tokens (decode) of a W4A16 layer with INT4 group-64 weights.

    Args:
        x: 16-bit ``[M, K]`` (unit column stride; smoothed inputs).
        qweight: packed int4 uint8 ``[N, K // 2]`` (contiguous); wscales ``[N, K // 64]``.
        lxp: float32 low-rank partials ``[S, M, r]`` (kernel 1, :func:`.act_quant.act_quant` mode "none") or
            None; lora_up ``[N, r]``; bias ``[N]`` or None.
        config: dict(BN, BKW, num_warps, num_stages); BN rows per program, BKW int32 words per K step.
    """
    check_gemv_inputs(x, qweight, wscales)
    M, K = x.shape
    N = qweight.shape[0]
    KW = K // 8
    cfg = dict(config or _pick(M, N, KW))
    if cfg["BKW"] % 8:
        raise ValueError(f"BKW must be a multiple of 8 words (one 64-input group), got {cfg['BKW']}")
    r = 0 if lxp is None else lxp.shape[2]
    out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    dummy = qweight
    _w4_gemv_kernel[(triton.cdiv(N, cfg["BN"]), M)](
        x, qweight.view(torch.int32), wscales, lxp if r else dummy,
        lora_up if r else dummy, bias if bias is not None else dummy, out, M, N, KW,
        0 if lxp is None else lxp.shape[0], r, x.stride(0),
        HAS_LR=r > 0, RP=rank_pad(r), HAS_BIAS=bias is not None, **cfg,
    )
    return out
