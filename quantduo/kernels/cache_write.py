"""KV-cache writes of a decode step, one launch each (positions on the device: graph-capturable).

* :func:`kv_quant_write`: program (b, h, t) quantizes the K and the V vector of one new token (per-token
  groups, asymmetric) and stores its codes, fp16 scale and fp16 zero at cache position ``pos[t]``. Replaces the
  dozen PyTorch ops per tensor of the reference, which dominated the per-layer cost of a quantized-cache
  decode step. Reference: :func:`quantduo.formats.kv.quantize_unchecked` (codes and scales bit-exact),
  stored with ``index_copy_`` along the sequence axis.
* :func:`ring_write`: the new token of each streaming head into its sink + recent ring slot (and the slot's
  position; per row, so left-padded rows keep their own sinks), instead of the slot arithmetic and three ``index_copy_`` of the reference
  (:meth:`quantduo.duo.cache.DuoLayer._slot`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import round_half_even


@triton.jit
def _quant_store_row(x_ptr, c_ptr, s_ptr, z_ptr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                     RECIP: tl.constexpr):
    """Quantize the D elements at ``x_ptr`` (groups of G); store codes at ``c_ptr``, scale / zero at
    ``s_ptr`` / ``z_ptr`` (fp16, one per group)."""
    QMAX: tl.constexpr = 2 ** BITS - 1
    NG: tl.constexpr = D // G
    g = tl.reshape(tl.load(x_ptr + tl.arange(0, D)).to(tl.float32), (NG, G))
    lo = tl.min(g, 1)
    spread = tl.max(g, 1) - lo
    if RECIP:  # PyTorch divides a CUDA tensor by a Python scalar as a product with its float32 reciprocal
        scale = spread * (1.0 / QMAX)
    else:
        scale = tl.math.div_rn(spread, QMAX * 1.0)
    scale = tl.maximum(scale, 1e-8)
    q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(g - lo[:, None], scale[:, None])), 0.0), QMAX * 1.0)
    q = tl.reshape(q.to(tl.int32), (D,))
    if BITS == 4:
        even, odd = tl.split(tl.reshape(q, (D // 2, 2)))
        tl.store(c_ptr + tl.arange(0, D // 2), (even | (odd << 4)).to(tl.uint8))
    else:
        tl.store(c_ptr + tl.arange(0, D), q.to(tl.uint8))
    tl.store(s_ptr + tl.arange(0, NG), scale.to(tl.float16))
    tl.store(z_ptr + tl.arange(0, NG), lo.to(tl.float16))


@triton.jit
def _kv_quant_write_kernel(K, V, POS, KC, KS, KZ, VC, VS, VZ, H, T, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                           sc_b, sc_h, sc_t, ss_b, ss_h, ss_t, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                           RECIP: tl.constexpr):
    """Program (b * H + h) * T + t: K / V ``[B, H, T, D]`` row -> codes ``[B, H, cap, D * BITS / 8]``,
    scale / zero ``[B, H, cap, D / G]`` at position POS[t] (int64 ``[T]``)."""
    pid = tl.program_id(0)
    t = pid % T
    h = (pid // T) % H
    b = pid // (T * H)
    p = tl.load(POS + t)
    c_off = b * sc_b + h * sc_h + p * sc_t
    s_off = b * ss_b + h * ss_h + p * ss_t
    _quant_store_row(K + b * sk_b + h * sk_h + t * sk_t, KC + c_off, KS + s_off, KZ + s_off, D, G, BITS, RECIP)
    _quant_store_row(V + b * sv_b + h * sv_h + t * sv_t, VC + c_off, VS + s_off, VZ + s_off, D, G, BITS, RECIP)


def kv_quant_write(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, bufs: dict, bits: int, group: int) -> None:
    """Quantize k / v ``[B, H, T, D]`` (16-bit, unit last stride) and store them at cache
    positions ``pos`` (int64 ``[T]``, on the device) of ``bufs`` = {"kcodes", "kscale", "kzero", "vcodes",
    "vscale", "vzero"}: uint8 ``[B, H, cap, D * bits / 8]`` and float16 ``[B, H, cap, D / group]`` (K and V
    buffers with equal strides; positions unchecked, as ``index_copy_`` on CUDA)."""
    b, h, t, d = k.shape
    if bits not in (4, 8) or d % group or group % 2 or d & (d - 1) or v.shape != k.shape:
        raise ValueError(f"kv_quant_write: bits {bits}, group {group}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or pos.shape != (t,):
        raise ValueError("kv_quant_write needs k / v with a unit last stride and pos [T]")
    kc, ks = bufs["kcodes"], bufs["kscale"]
    _kv_quant_write_kernel[(b * h * t,)](
        k, v, pos, kc, ks, bufs["kzero"], bufs["vcodes"], bufs["vscale"], bufs["vzero"], h, t,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        kc.stride(0), kc.stride(1), kc.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        D=d, G=group, BITS=bits, RECIP=k.is_cuda, num_warps=1)


@triton.jit
def _ring_write_kernel(K, V, POS, PAD, KR, VR, RPOS, H, SINK, RECENT, sk_b, sk_h, sv_b, sv_h, sr_b, sr_h, sr_t,
                       D: tl.constexpr, HAS_PAD: tl.constexpr):
    """Program b * H + h: K / V ``[B, H, 1, D]`` row -> ring buffers ``[B, H, SINK + RECENT, D]`` at the slot of
    row b's position POS[0] - PAD[b] (PAD int64 ``[B]``: left-padding slots, 0 without HAS_PAD); program h = 0 also
    stores POS[0] into RPOS ``[B, SINK + RECENT]``. Rows whose position is still padding write nothing."""
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    p = tl.load(POS)
    r = p
    if HAS_PAD:
        r = p - tl.load(PAD + b)
    if r >= 0:
        slot = tl.where(r < SINK, r, SINK + (r - SINK) % RECENT)
        d = tl.arange(0, D)
        dst = b * sr_b + h * sr_h + slot * sr_t + d
        tl.store(KR + dst, tl.load(K + b * sk_b + h * sk_h + d))
        tl.store(VR + dst, tl.load(V + b * sv_b + h * sv_h + d))
        if h == 0:
            tl.store(RPOS + b * (SINK + RECENT) + slot, p)


def ring_write(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
               ring_pos: torch.Tensor, sink: int, recent: int, pad: torch.Tensor | None = None) -> None:
    """Store the new token k / v ``[B, H, 1, D]`` (unit last stride) of absolute position ``pos`` (int64 ``[1]``,
    on the device) at its ring slot of ``ring_k`` / ``ring_v`` ``[B, H, sink + recent, D]`` (equal strides) and
    the position at ``ring_pos[b, slot]`` (int64 ``[B, sink + recent]``, contiguous). Row b's slot follows its
    real position ``pos - pad[b]`` (``pad`` int64 ``[B]``: its left-padding slots; None: 0): sinks stay, the rest
    cycles through ``recent`` slots."""
    b, h, t, d = k.shape
    if t != 1 or v.shape != k.shape or ring_k.shape != (b, h, sink + recent, d) or ring_v.stride() != ring_k.stride():
        raise ValueError(f"ring_write: k {tuple(k.shape)}, v {tuple(v.shape)}, ring {tuple(ring_k.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or d & (d - 1) or recent < 1:
        raise ValueError("ring_write needs unit last strides, a power-of-two head_dim and recent >= 1")
    if ring_pos.shape != (b, sink + recent) or not ring_pos.is_contiguous() or (pad is not None and pad.shape != (b,)):
        raise ValueError(f"ring_write: ring_pos {tuple(ring_pos.shape)} must be [B, sink + recent], pad [B]")
    _ring_write_kernel[(b * h,)](k, v, pos, pad if pad is not None else pos, ring_k, ring_v, ring_pos, h, sink,
                                 recent, k.stride(0), k.stride(1), v.stride(0), v.stride(1), ring_k.stride(0),
                                 ring_k.stride(1), ring_k.stride(2), D=d, HAS_PAD=pad is not None, num_warps=1)
