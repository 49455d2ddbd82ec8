"""Triton helpers shared by the kernels: rounding, 4-bit group quantization of a tile, the GEMM epilogue, and the
operator registration of kernels for compiled graphs.

Reference semantics: :mod:`quantduo.formats.reference` (``epilogue_ref``, ``act_quant_ref``).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch.library import custom_op, triton_op

_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (y + c) - c rounds float32 |y| < 2**22 half-to-even


@triton.jit
def round_half_even(y):
    """Round float32 ``y`` (|y| < 2**22) to the nearest integer, ties to even (as ``torch.round``)."""
    return (y + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def round_to(y, dtype: tl.constexpr, NATIVE: tl.constexpr):
    """float32 ``y`` rounded to ``dtype`` (16/32-bit float, nearest even) and back to float32; the identity for
    float32. NATIVE: the hardware conversion; otherwise bfloat16 is rounded in integer arithmetic on the float32
    bits (the interpreter's float32 -> bfloat16 cast truncates, and its nearest-even mode rounds ties up and drops
    the carry into the exponent).

    On the GPU the compiler may compute a rounded sum or product of 16-bit values in 16-bit arithmetic (the same
    result), and with FMA contraction on (Triton's default) it fuses such a product with a following sum, which
    drops the product's rounding: round a product that a sum reads through :func:`mul_rounded`."""
    if dtype == tl.float32:
        return y
    if not NATIVE:
        if dtype == tl.bfloat16:
            bits = y.to(tl.int32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536  # keep the top 16 bits, ties to even
            return bits.to(tl.float32, bitcast=True)
    return y.to(dtype).to(tl.float32)


@triton.jit
def mul_rounded(a, b, NATIVE: tl.constexpr):
    """float32 ``a * b`` rounded on its own, never fused with a following sum into an FMA (on the GPU ``mul.rn``;
    the plain product under the interpreter, which does not fuse)."""
    if NATIVE:
        return libdevice.mul_rn(a, b)
    return a * b


@triton.jit
def round_e4m3(y):
    """Round float32 ``y`` (|y| <= 448) to the nearest float8_e4m3fn value, ties to even, as float32.

    The result is exactly representable, so ``.to(tl.float8e4nv)`` of it is exact on every backend (the
    Triton CPU interpreter's own float32 -> fp8 cast rounds some values wrongly). Values that round to zero keep
    their sign (``-0.0`` for small negatives, as PyTorch's cast and the hardware's give).
    """
    e = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -6)  # exponent, subnormals at -6
    inv_ulp = ((130 - e) << 23).to(tl.float32, bitcast=True)  # 2 ** (3 - e)
    ulp = ((124 + e) << 23).to(tl.float32, bitcast=True)  # 2 ** (e - 3)
    rounded = round_half_even(y * inv_ulp) * ulp
    return tl.where(rounded == 0, y * 0.0, rounded)


@triton.jit
def to_e4m3(y, NATIVE: tl.constexpr):
    """float32 ``y`` (|y| <= 448) -> float8_e4m3fn, round to nearest even (NATIVE: the hardware conversion;
    otherwise :func:`round_e4m3` first, for the interpreter)."""
    if NATIVE:
        return y.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return round_e4m3(y).to(tl.float8e4nv)


@triton.jit
def to_e4m3_saturated(y, NATIVE: tl.constexpr):
    """float32 ``y`` -> float8_e4m3fn, saturating at +-448, round to nearest even (:func:`to_e4m3`). NATIVE: the
    hardware conversion saturates by itself (``cvt.rn.satfinite``: +-inf -> +-448, NaN stays NaN, as a clamp
    followed by PyTorch's cast); otherwise ``y`` is clamped first."""
    if NATIVE:
        return to_e4m3(y, NATIVE)
    return to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), NATIVE)


@triton.jit
def load_row_segment(P, start, K, B: tl.constexpr):
    """Columns ``start + [0, B)`` of the row at P (length K) as float32, zero past K."""
    cols = start + tl.arange(0, B)
    return tl.load(P + cols, mask=cols < K, other=0.0).to(tl.float32)


@triton.jit
def store_e4m3_segment(Q, start, K, v, inv_scale, B: tl.constexpr, NATIVE: tl.constexpr):
    """E4M3 codes of ``v * inv_scale`` (float32 ``[B]``, a segment of :func:`load_row_segment`) to columns
    ``start + [0, B)`` < K of the row at Q."""
    cols = start + tl.arange(0, B)
    tl.store(Q + cols, to_e4m3_saturated(v * inv_scale, NATIVE), mask=cols < K)


@triton.jit
def per_token_scale(amax):
    """(scale, 1 / scale) float32 of a row whose absmax is ``amax``: ``amax * (1 / 448)``, 1.0 for an all-zero row
    (:func:`quantduo.formats.fp8.quantize_fp8_per_token_ref`)."""
    scale = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)
    return scale, tl.math.div_rn(1.0, scale)


@triton.jit
def fp8_operand(x, NATIVE: tl.constexpr):
    """fp8 codes as a ``tl.dot`` operand: themselves on the GPU, widened to float32 under the interpreter (the same
    values: every E4M3 value and every product of two is exact in float32)."""
    if not NATIVE:
        x = x.to(tl.float32)
    return x


@triton.jit
def cast_rounded(y, dtype: tl.constexpr, NATIVE: tl.constexpr):
    """float32 ``y`` cast to ``dtype`` (16/32-bit float), round to nearest even. NATIVE: the hardware conversion;
    otherwise :func:`round_to` first, whose result the cast keeps exactly (the interpreter's bfloat16 cast
    truncates)."""
    if NATIVE:
        return y.to(dtype)
    return round_to(y, dtype, NATIVE).to(dtype)


@triton.jit
def smooth_tile(x, s, NATIVE: tl.constexpr):
    """``x / s`` computed in float32 with IEEE division, rounded to ``x``'s dtype (NATIVE: :func:`cast_rounded`)."""
    return cast_rounded(tl.math.div_rn(x.to(tl.float32), s.to(tl.float32)), x.dtype, NATIVE)


@triton.jit
def shift_smooth_tile(x, shift, s, NATIVE: tl.constexpr):
    """``(x + shift) / s`` for a tile ``x [BM, BK]`` and channel vectors ``shift``, ``s`` ``[BK]``: ``shift``
    rounded to ``x``'s dtype, the sum rounded to it, then :func:`smooth_tile` (Nunchaku's order for shifted unsigned
    activations; ``x / s`` for a zero shift)."""
    shift = round_to(shift.to(tl.float32), x.dtype, NATIVE)
    return smooth_tile(cast_rounded(x.to(tl.float32) + shift[None, :], x.dtype, NATIVE), s, NATIVE)


@triton.jit
def reciprocal(s, NATIVE: tl.constexpr):
    """float32 ``1 / s``: ``rcp.approx.ftz.f32`` on the GPU (NATIVE, Nunchaku's ``cuda_frcp``), the correctly rounded
    quotient in the interpreter."""
    if NATIVE:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [s], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


@triton.jit
def quant4_codes(act, BM: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, UNSIGNED: tl.constexpr,
                 SCALE_DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """Group-quantize a float32 tile ``act [BM, BK]`` (groups of ``G`` along dim 1) to 4 bits by Nunchaku's rule
    (``quantizers.quantize_activations_4bit``): ``s = amax * float32(1 / qmax)``, codes ``round(act * (1 / s))``
    saturated (the product rounded on its own: :func:`mul_rounded`), the scale returned ``s`` rounded to SCALE_DTYPE
    (the activations' dtype).

    Returns (codes float32 ``[BM, BK // G, G]``, scales float32 ``[BM, BK // G]``).
    """
    g = tl.reshape(act, (BM, BK // G, G))
    amax = tl.max(tl.abs(g), axis=2)  # the largest magnitude for unsigned groups too (Nunchaku's __habs2)
    if UNSIGNED:
        qmin, qmax = 0.0, 15.0
    else:
        qmin, qmax = -7.0, 7.0
    s = tl.where(amax > 0, amax * (1.0 / qmax), 1.0)
    q = round_half_even(mul_rounded(g, reciprocal(s, NATIVE)[:, :, None], NATIVE))
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    return q, round_to(s, SCALE_DTYPE, NATIVE)


@triton.jit
def quant4_tile(act, BM: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, UNSIGNED: tl.constexpr,
                SCALE_DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    """:func:`quant4_codes`, packed: (uint8 ``[BM, BK // 2]`` in the nibble layout, scales ``[BM, BK // G]``)."""
    q, scale = quant4_codes(act, BM, BK, G, UNSIGNED, SCALE_DTYPE, NATIVE)
    lo, hi = tl.split(tl.reshape(q.to(tl.int32), (BM, BK // 2, 2)))
    packed = ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8)
    return packed, scale


@triton.jit
def unpack_int4(b):
    """Packed uint8 ``[R, C]`` -> (low nibbles, high nibbles) as signed int8 ``[R, C]`` (two's complement)."""
    bi = b.to(tl.int32)
    return (((bi & 15) ^ 8) - 8).to(tl.int8), (((bi >> 4) ^ 8) - 8).to(tl.int8)


@triton.jit
def unpack_int4_f32(b):
    """Packed uint8 ``[...]`` -> (low nibbles, high nibbles) as signed float32 values, without int -> float
    conversions (a quarter-rate instruction on the GPU): ``nibble ^ 8`` (= value + 8) is placed in the
    mantissa of 2**23 (bits 0x4B000000) and 2**23 + 8 is subtracted, both exact."""
    bi = b.to(tl.int32)
    lo = ((bi & 15) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    hi = ((bi >> 4) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
    return lo, hi


# gelu_tanh(y) = 0.5 y (1 + tanh(u)) = y * sigmoid(2 u) = y / (1 + 2 ** z), u = sqrt(2 / pi) (y + 0.044715 y**3),
# z = -2 log2(e) u = y * (_GELU_Z1 + _GELU_Z3 * y**2)
_GELU_Z1 = tl.constexpr(-2.0 * 1.4426950408889634 * 0.7978845608028654)
_GELU_Z3 = tl.constexpr(-2.0 * 1.4426950408889634 * 0.7978845608028654 * 0.044715)


@triton.jit
def gelu_tanh(y, NATIVE: tl.constexpr):
    """``F.gelu(y, approximate="tanh")`` of float32 ``y``, as ``y / (1 + 2**z)`` (the same function: ``0.5 (1 +
    tanh u) = sigmoid(2 u)``): one ``ex2`` and one division, a few float32 ulps from PyTorch's ``tanhf`` form.
    NATIVE: the hardware's fast division (``__fdividef``, 2 ulps; 0 where ``2**z`` passes 2**126, GELU's limit
    there), otherwise ``/`` (full-range division: exact in the interpreter, ``div.full`` on the GPU)."""
    z = y * (_GELU_Z1 + _GELU_Z3 * y * y)
    if NATIVE:
        return libdevice.fast_dividef(y, 1.0 + tl.math.exp2(z))
    return y / (1.0 + tl.math.exp2(z))


@triton.jit
def lowrank_partials_sum(LXP, S, M, R, rm, RP: tl.constexpr, SC: tl.constexpr):
    """``[BM, RP]`` float32 sum over the S low-rank partials LXP ``[S, M, R]`` of rows ``rm``, loaded SC at a time
    (one masked 3-D load per round: independent loads in flight instead of S dependent round trips)."""
    rr = tl.arange(0, RP)
    lmask = (rm[:, None] < M) & (rr[None, :] < R)
    lx = tl.zeros((rm.shape[0], RP), dtype=tl.float32)
    if SC == 1:  # 2-D loads (a size-1 reduction axis would cost a layout conversion per partial)
        for s in range(S):
            lx += tl.load(LXP + s * M * R + rm[:, None] * R + rr[None, :], mask=lmask, other=0.0)
    else:
        rs = tl.arange(0, SC)
        for s0 in range(0, S, SC):
            s = s0 + rs
            ptrs = LXP + s[:, None, None] * M * R + rm[None, :, None] * R + rr[None, None, :]
            lx += tl.sum(tl.load(ptrs, mask=(s < S)[:, None, None] & lmask[None, :, :], other=0.0), axis=0)
    return lx


@triton.jit
def lowrank_bias_apply(acc, lx, rn, N, LU, R, BIAS, RP: tl.constexpr, HAS_LR: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PREC: tl.constexpr):
    """``acc [BM, BN]`` float32 + ``lx [BM, RP]`` (summed low-rank partials, rounded here to the lora dtype) x
    LU ``[N, R]``^T (product rounded to the lora dtype, as the reference) + BIAS ``[N]``; float32 result."""
    if HAS_LR:
        rr = tl.arange(0, RP)
        lu = tl.load(LU + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        lr = tl.dot(lx.to(lu.dtype), tl.trans(lu), input_precision=PREC)
        acc += lr.to(lu.dtype).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return acc


# most warps of a row-per-program kernel (8 beat 4 and 16 on FLUX's rows on the H100: BENCHMARKS.md, twenty-first
# session)
ROW_MAX_WARPS = 8


def row_segments(k: int) -> tuple[int, int]:
    """Two powers of two (or 0) covering ``k`` columns: the largest one <= k, then the remainder's (k = 0: (0, 0)).
    A row read as these two segments has no padded lanes at widths like 3072 = 2048 + 1024."""
    if k == 0:
        return 0, 0
    head = 1 << (k.bit_length() - 1)
    return head, (triton.next_power_of_2(k - head) if k > head else 0)


def row_warps(lanes: int) -> int:
    """Warps of a row-per-program kernel for a row of ``lanes`` (its segments' total): one per 512, a power of two
    (Triton takes no other), at most :data:`ROW_MAX_WARPS`."""
    return min(ROW_MAX_WARPS, 1 << max(0, (lanes // 512).bit_length() - 1))


def k_splits(M: int, K: int, bm: int, bk: int, programs: int) -> int:
    """K slices (a power of two, whole BK steps) so that ``cdiv(M, bm) * slices`` reaches about ``programs``
    programs in flight (enough to cover the memory latency of a row pass)."""
    splits = 1
    while triton.cdiv(M, bm) * splits < programs and K % (splits * 2 * bk) == 0:
        splits *= 2
    return splits


_SPLIT_K_WORKSPACES: dict = {}


def split_k_workspace(kind: str, numel: int, tiles: int, device) -> tuple:
    """Zeroed split-K scratch of one kernel ``kind`` on ``device``: (float32 buffer of >= ``numel``, int32 tile
    counters of >= ``tiles``), grown on demand. The kernels leave the counters zero when they finish."""
    import torch

    key = (kind, torch.device(device))
    ws = _SPLIT_K_WORKSPACES.get(key)
    if ws is None or ws[0].numel() < numel or ws[1].numel() < tiles:
        ws = _SPLIT_K_WORKSPACES[key] = (torch.zeros(max(numel, 1 << 20), dtype=torch.float32, device=device),
                                         torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device))
    return ws


_SCRATCH: dict = {}


def scratch_buffer(numel: int, dtype, device):
    """A flat buffer of at least ``numel`` elements, one per (device, dtype), grown on demand and reused by
    every layer: expanded or dequantized weights live only until the GEMM that follows on the same stream."""
    key = (torch.device(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def rank_pad(r: int) -> int:
    """Rank rounded up to a power of two >= 16 (tl.dot and tl.arange constraints)."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def dot_precision(dtype) -> str:
    """``ieee`` for float32 operands (exact float32 products), tf32 otherwise (ignored for 16-bit)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def kernel_op(name: str, fake: Callable) -> Callable:
    """Decorator: ``fn`` (fresh outputs, no mutated inputs, its Triton launches written as
    ``torch.library.wrap_triton(kernel)[grid](...)``) as the operator ``name`` for compiled graphs, with ``fake``
    giving its outputs' shapes. A ``triton_op``: Inductor sees the kernels and launches them from its generated code
    (no Python call per use at run time). Under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests) kernels
    cannot be traced, so it is an opaque ``custom_op`` there."""
    def register(fn: Callable):
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        op = (custom_op if interpreted else triton_op)(name, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return register
