"""INT8 / INT4 KV-cache quantization with per-token groups (pure-PyTorch reference).

Each token's head vector (last axis, D elements) is split into groups of ``group`` elements
quantized asymmetrically: q = round((x - min) / scale), scale = (max - min) / (2^bits - 1),
stored with an fp16 scale and fp16 zero point (min) per group. INT4 codes are packed two per byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedKV:
    """codes: uint8 [..., D] (INT8) or [..., D // 2] (INT4, packed); scale/zero: fp16 [..., D // group]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))


def quantize_kv(x: torch.Tensor, bits: int = 4, group: int = 128) -> QuantizedKV:
    """Quantize x [..., D] (float) with per-token groups along the last axis (validates its input)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    d = x.shape[-1]
    if d % group or (bits == 4 and group % 2):
        raise ValueError(f"last dim {d} must be a multiple of group {group} (even for INT4)")
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize NaN/inf KV values")
    return quantize_unchecked(x, bits, group)


def quantize_unchecked(x: torch.Tensor, bits: int, group: int) -> QuantizedKV:
    """:func:`quantize_kv` without input checks: no host-device synchronisation (CUDA-graph safe)."""
    d = x.shape[-1]
    g = x.float().reshape(*x.shape[:-1], d // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    qmax = 2 ** bits - 1
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    codes = ((g - lo) / scale).round().clamp(0, qmax).to(torch.uint8).reshape(*x.shape)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return QuantizedKV(codes, scale.squeeze(-1).half(), lo.squeeze(-1).half(), bits, group)


def dequantize_kv(q: QuantizedKV, dtype=torch.float16, compute=torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`: returns [..., D] in ``dtype``, arithmetic in ``compute``
    (float16 halves the temporaries; codes < 256 are exact in it)."""
    codes = q.codes
    if q.bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
    g = codes.to(compute).reshape(*codes.shape[:-1], codes.shape[-1] // q.group, q.group)
    x = torch.addcmul(q.zero.to(compute).unsqueeze(-1), g, q.scale.to(compute).unsqueeze(-1))
    return x.reshape(codes.shape).to(dtype)


def bytes_per_element(bits: int, group: int = 128) -> float:
    """Storage per KV element including the fp16 scale and zero of each group."""
    return bits / 8 + 4 / group
