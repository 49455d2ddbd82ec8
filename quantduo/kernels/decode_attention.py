"""Split-KV decode attention (flash-decoding) over 16-bit or INT8 / INT4 KV caches, GQA-aware.

One new query token per sequence attends to a KV cache. Program (b, kv head, split) loads the R = Hq / Hkv
query heads of its KV head once and streams one contiguous slice of the keys: the key tiles are read (and,
for quantized caches, dequantized in registers) once for all R queries; the softmax runs online
(base-2 exponent); each program writes its unnormalized partial output with its running max and sum, and a
second kernel merges the splits. Splits that lie wholly past the valid length skip their loads, so a
preallocated (static) cache costs only what it holds.

Head vectors are processed as two halves of D / 2 elements ("A" and "B"): the first and second half of a
16-bit / INT8 vector, the low and high nibbles (even and odd elements) of a packed INT4 vector; so every
cache width is two dots of K = D / 2 and no nibble interleaving is needed. With one quantization group per
head vector (group == D, the default) the codes go into the dots as they are and the per-token scale and
zero are applied to the scores and the probabilities; smaller groups dequantize element by element.
On CUDA the dots need D >= 32 (:func:`kernel_supports`).

Validity (graph-capturable: the count lives on the device): key slot j < T of row b is visible when its
position (``key_pos[b, j]`` for per-row positions [B, T], ``key_pos[j]`` for shared ones [T], j itself without
``key_pos``) is >= 0 and, when ``length`` is given, < length. Per-row positions serve left-padded batches
(pad slots hold -1) and per-row ring buffers.

Reference: :func:`quantduo.formats.reference.decode_attention_ref`.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from quantduo.formats.kv import QuantizedKV

# (keys per tile, programs per SM (sets the split count), num_warps, num_stages) per cache width in bits;
# best of a sweep at 128K / 256K keys on an H100 (benchmarks/duo.py --only sweep, BENCHMARKS.md)
DEFAULT_CONFIG = {16: (128, 4, 4, 3), 8: (64, 4, 4, 3), 4: (64, 4, 4, 3)}


@triton.jit
def _dequant(c, grp, sbase, zbase, mask, DTYPE: tl.constexpr, PER_TOKEN: tl.constexpr):
    """Codes ``c [BN, DH]`` as DTYPE: raw (PER_TOKEN: the caller applies scale and zero; exact in 16 bits)
    or times the float16 scale plus zero at offsets ``grp [BN, DH]``."""
    if PER_TOKEN:
        return c.to(DTYPE)
    s = tl.load(sbase + grp, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(zbase + grp, mask=mask, other=0.0).to(tl.float32)
    return (c.to(tl.float32) * s + z).to(DTYPE)


@triton.jit
def _load_halves(base, sbase, zbase, tok, half, mask, stride_t, stride_st, D: tl.constexpr, BITS: tl.constexpr,
                 G: tl.constexpr, DTYPE: tl.constexpr, PER_TOKEN: tl.constexpr):
    """Halves A and B (module docstring) of the K or V vectors of tokens ``tok [BN]``, each ``DTYPE [BN, D / 2]``
    (0 where not ``mask``); ``half`` = arange(D / 2). BITS 16: ``base`` holds the vectors; 8 / 4: uint8 codes
    (INT4: one byte load gives both nibbles) with float16 scale / zero per group of G elements."""
    DH: tl.constexpr = D // 2
    m2 = mask[:, None]
    row = base + tok[:, None] * stride_t
    if BITS == 16:
        return (tl.load(row + half[None, :], mask=m2, other=0.0).to(DTYPE),
                tl.load(row + DH + half[None, :], mask=m2, other=0.0).to(DTYPE))
    grp = tok[:, None] * stride_st
    if BITS == 4:
        c = tl.load(row + half[None, :], mask=m2, other=0)
        return (_dequant(c & 15, grp + (2 * half // G)[None, :], sbase, zbase, m2, DTYPE, PER_TOKEN),
                _dequant(c >> 4, grp + ((2 * half + 1) // G)[None, :], sbase, zbase, m2, DTYPE, PER_TOKEN))
    return (_dequant(tl.load(row + half[None, :], mask=m2, other=0), grp + (half // G)[None, :], sbase, zbase,
                     m2, DTYPE, PER_TOKEN),
            _dequant(tl.load(row + DH + half[None, :], mask=m2, other=0), grp + ((half + DH) // G)[None, :], sbase,
                     zbase, m2, DTYPE, PER_TOKEN))


@triton.jit
def _decode_split_kernel(
    Q, K, V, KS, KZ, VS, VZ, LEN, KPOS, PO, PM, PL,
    H, T, KEYS_PER_SPLIT, S, sm_scale, skp_b,
    sq_b, sq_h, sq_r, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, ss_b, ss_h, ss_t,
    R: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, G: tl.constexpr,
    PER_TOKEN: tl.constexpr, HAS_LEN: tl.constexpr, HAS_KPOS: tl.constexpr, BN: tl.constexpr,
):
    """Program (b * H + h, split): Q ``[B, H, R, D]`` over keys [split * KEYS_PER_SPLIT, ...) of K / V
    ``[B, H, T, *]`` (scales / zeros ``[B, H, T, D / G]``, same strides for K and V). LEN int64 ``[1]``,
    KPOS int64 ``[B, T]`` (batch stride ``skp_b``; 0 for positions shared by the rows). Writes PO float32 ``[B * H, S, R, D]`` (unnormalized), PM / PL float32
    ``[B * H, S, R]`` (running max of the base-2 scores, sum of exponentials). PER_TOKEN (quantized, G == D):
    scores = scale * (q . codes) + zero * sum(q), and P @ V = (P * scale) @ codes + sum(P * zero)."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    DH: tl.constexpr = D // 2
    dtype = K.dtype.element_ty if BITS == 16 else Q.dtype.element_ty
    rr = tl.arange(0, RP)
    half = tl.arange(0, DH)
    if BITS == 4:
        elem_a, elem_b = 2 * half, 2 * half + 1
    else:
        elem_a, elem_b = half, half + DH
    q_base = Q + b * sq_b + h * sq_h + rr[:, None] * sq_r
    q_mask = (rr < R)[:, None]
    qa = (tl.load(q_base + elem_a[None, :], mask=q_mask, other=0.0).to(tl.float32) * sm_scale).to(dtype)
    qb = (tl.load(q_base + elem_b[None, :], mask=q_mask, other=0.0).to(tl.float32) * sm_scale).to(dtype)
    q_sum = tl.sum(qa.to(tl.float32), 1) + tl.sum(qb.to(tl.float32), 1)

    lo = split * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, T)
    if HAS_LEN:
        n_valid = tl.load(LEN)
        if not HAS_KPOS:  # slots are positions: nothing past the length is loaded
            hi = tl.minimum(hi, n_valid)
    k_base, v_base = K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h
    s_off = b * ss_b + h * ss_h
    m_i = tl.full([RP], float("-inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc_a = tl.zeros([RP, DH], tl.float32)
    acc_b = tl.zeros([RP, DH], tl.float32)
    for start in range(lo, hi, BN):
        tok = start + tl.arange(0, BN)
        inb = tok < hi
        valid = inb
        if HAS_KPOS:
            kp = tl.load(KPOS + b * skp_b + tok, mask=inb, other=-1)
            valid = valid & (kp >= 0)
            if HAS_LEN:
                valid = valid & (kp < n_valid)
        ka, kb = _load_halves(k_base, KS + s_off, KZ + s_off, tok, half, inb, sk_t, ss_t, D, BITS, G, dtype,
                              PER_TOKEN)
        scores = tl.dot(qa, tl.trans(ka)) + tl.dot(qb, tl.trans(kb))
        if PER_TOKEN:
            k_scale = tl.load(KS + s_off + tok * ss_t, mask=inb, other=0.0).to(tl.float32)
            k_zero = tl.load(KZ + s_off + tok * ss_t, mask=inb, other=0.0).to(tl.float32)
            scores = scores * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
        scores = scores * 1.4426950408889634
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay 0
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        va, vb = _load_halves(v_base, VS + s_off, VZ + s_off, tok, half, inb, sv_t, ss_t, D, BITS, G, dtype,
                              PER_TOKEN)
        acc_a = acc_a * alpha[:, None]
        acc_b = acc_b * alpha[:, None]
        if PER_TOKEN:
            v_scale = tl.load(VS + s_off + tok * ss_t, mask=inb, other=0.0).to(tl.float32)
            v_zero = tl.load(VZ + s_off + tok * ss_t, mask=inb, other=0.0).to(tl.float32)
            p_zero = tl.sum(p * v_zero[None, :], 1)[:, None]
            acc_a += p_zero
            acc_b += p_zero
            p = p * v_scale[None, :]
        pd = p.to(dtype)
        acc_a += tl.dot(pd, va)
        acc_b += tl.dot(pd, vb)
        m_i = m_new
    row = (pid_bh * S + split) * R + rr
    tl.store(PM + row, m_i, mask=rr < R)
    tl.store(PL + row, l_i, mask=rr < R)
    o_base = PO + row[:, None] * D
    tl.store(o_base + elem_a[None, :], acc_a, mask=q_mask)
    tl.store(o_base + elem_b[None, :], acc_b, mask=q_mask)


@triton.jit
def _decode_merge_kernel(PO, PM, PL, OUT, S, R: tl.constexpr, D: tl.constexpr, SP: tl.constexpr):
    """Program (b * H + h) * R + r: merge the S partials of one query head into OUT ``[B, H, R, D]``."""
    pid = tl.program_id(0)
    bh = pid // R
    r = pid % R
    ss = tl.arange(0, SP)
    dd = tl.arange(0, D)
    row = (bh * S + ss) * R + r
    m = tl.load(PM + row, mask=ss < S, other=float("-inf"))
    l_part = tl.load(PL + row, mask=ss < S, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    o = tl.load(PO + row[:, None] * D + dd[None, :], mask=(ss < S)[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(l_part * w, 0)
    tl.store(OUT + pid * D + dd, out.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(bh: int, t: int, device: torch.device, block_n: int, per_sm: int) -> tuple[int, int]:
    """(splits, keys per split): about ``per_sm`` programs per SM (8 programs in the interpreter), whole
    tiles per split."""
    target = per_sm * _sm_count(device.index or 0) if device.type == "cuda" else 8
    tiles = triton.cdiv(t, block_n)
    splits = max(1, min(tiles, triton.cdiv(target, bh)))
    per_split = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(t, per_split), per_split


def kernel_supports(q: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` can run for queries ``q`` (tensor-core dots need D / 2 >= 16 on GPU)."""
    return not q.is_cuda or q.shape[-1] >= 32


def _cache_operands(x: torch.Tensor | QuantizedKV):
    """(values or codes, scale, zero, bits, group) of one cache tensor."""
    if isinstance(x, QuantizedKV):
        return x.codes, x.scale, x.zero, x.bits, x.group
    return x, x, x, 16, 1


def check_decode_inputs(q: torch.Tensor, k, v, length, key_pos) -> None:
    """Raise ValueError for inconsistent decode-attention inputs (see :func:`decode_attention`)."""
    b, hq, tq, d = q.shape
    codes, scale, _, bits, group = _cache_operands(k)
    vcodes, _, _, vbits, vgroup = _cache_operands(v)
    bk, hkv, t, width = codes.shape
    if tq != 1 or d < 4 or d & (d - 1) or bk != b or hkv == 0 or hq % hkv:
        raise ValueError(f"decode attention needs q [B, Hq, 1, D] (D a power of two >= 4) and a cache "
                         f"[B, Hkv, T, .] with Hkv dividing Hq; got q {tuple(q.shape)}, cache {tuple(codes.shape)}")
    if (bits, group) != (vbits, vgroup) or vcodes.shape != codes.shape:
        raise ValueError("K and V caches must share layout and shape")
    if width != (d if bits == 16 else d * bits // 8):
        raise ValueError(f"cache width {width} does not match head_dim {d} at {bits} bits")
    if bits != 16:
        if d % group or group % 2 or scale.shape != (b, hkv, t, d // group):
            raise ValueError(f"bad quantized cache: group {group}, scale {tuple(scale.shape)} for head_dim {d}")
        if len({x.stride() for x in (k.scale, k.zero, v.scale, v.zero)}) != 1:
            raise ValueError("K/V scales and zeros must share strides")
    if key_pos is not None and (key_pos.shape not in ((t,), (b, t)) or key_pos.stride(-1) != 1):
        raise ValueError(f"key_pos must be [T={t}] or [B={b}, T] with a unit last stride, got {tuple(key_pos.shape)}")
    if length is not None and length.numel() != 1:
        raise ValueError("length must be a one-element device tensor")


def decode_attention(q: torch.Tensor, k: torch.Tensor | QuantizedKV, v: torch.Tensor | QuantizedKV,
                     scaling: float, length: torch.Tensor | None = None,
                     key_pos: torch.Tensor | None = None, config: tuple[int, ...] | None = None
                     ) -> torch.Tensor:
    """Attention of one query token per sequence over a KV cache (Triton, split-KV).

    q [B, Hq, 1, D] float16/bfloat16 (float32 in the interpreter); k, v: 16-bit [B, Hkv, T, D] in q's
    dtype, or :class:`~quantduo.formats.kv.QuantizedKV` (codes uint8 [B, Hkv, T, D * bits / 8], fp16
    scale / zero [B, Hkv, T, D / group]), any strides with a unit last-axis stride. length: int64 device
    tensor [1] or None; key_pos: int64 [T] or [B, T] (unit last stride) or None (see the module docstring).
    Softmax in float32.
    config: (keys per tile, programs per SM, num_warps, num_stages), default :data:`DEFAULT_CONFIG` [bits].
    Returns [B, Hq, 1, D] in q's dtype.
    """
    check_decode_inputs(q, k, v, length, key_pos)
    kc, ks, kz, bits, group = _cache_operands(k)
    vc, vs, vz, _, _ = _cache_operands(v)
    b, hq, _, d = q.shape
    hkv, t = kc.shape[1], kc.shape[2]
    r = hq // hkv
    q4 = q.reshape(b, hkv, r, d)
    block_n, per_sm, warps, stages = config or DEFAULT_CONFIG[bits]
    splits, per_split = _num_splits(b * hkv, t, q.device, block_n, per_sm)
    part_o = torch.empty(b * hkv, splits, r, d, dtype=torch.float32, device=q.device)
    part_m = torch.empty(b * hkv, splits, r, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    dummy = part_m  # never read when the matching constexpr flag is off
    _decode_split_kernel[(b * hkv, splits)](
        q4, kc, vc, ks, kz, vs, vz, length if length is not None else dummy,
        key_pos if key_pos is not None else dummy, part_o, part_m, part_l,
        hkv, t, per_split, splits, scaling, key_pos.stride(0) if key_pos is not None and key_pos.ndim == 2 else 0,
        q4.stride(0), q4.stride(1), q4.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        vc.stride(0), vc.stride(1), vc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        R=r, RP=max(16, triton.next_power_of_2(r)), D=d, BITS=bits, G=group, PER_TOKEN=bits != 16 and group == d,
        HAS_LEN=length is not None, HAS_KPOS=key_pos is not None, BN=block_n, num_warps=warps, num_stages=stages)
    out = torch.empty(b, hkv, r, d, dtype=q.dtype, device=q.device)
    _decode_merge_kernel[(b * hkv * r,)](part_o, part_m, part_l, out, splits, R=r, D=d,
                                         SP=triton.next_power_of_2(splits))
    return out.reshape(b, hq, 1, d)
