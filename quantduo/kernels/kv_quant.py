"""Quantize new K/V rows into an INT8 / INT4 KV cache in one launch (per-token groups, asymmetric).

Program (b, h, t) quantizes the K and the V vector of one new token and stores its codes, fp16 scale and fp16
zero at cache position ``pos[t]`` (a device tensor: graph-capturable decode steps). Replaces the dozen PyTorch
ops per tensor of the reference, which dominated the per-layer cost of a quantized-cache decode step.

Reference: :func:`quantduo.duo.kvquant.quantize_unchecked` (codes and scales bit-exact), stored with
``index_copy_`` along the sequence axis.
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
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2), D=d, G=group, BITS=bits, RECIP=k.is_cuda, num_warps=1)
