"""NVFP4 weight dequantization (Hopper has no FP4 tensor cores: NVFP4 layers run as dequant + float GEMM).

Reference: :func:`quantduo.formats.reference.nvfp4_dequant_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fp4_value(code):
    """E2M1 code (int32, bit 3 sign, bits 0-2 grid index) -> float32 value of FP4_E2M1_GRID."""
    idx = code & 7
    mag = tl.where(idx < 4, idx.to(tl.float32) * 0.5, tl.where(idx < 6, (idx - 2).to(tl.float32), (idx - 5) * 2.0 + 2.0))
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _e4m3_value(b):
    """float8_e4m3fn bit pattern (int32 in [0, 255], NaN codes excluded) -> float32 value."""
    e = (b >> 3) & 15
    mant = (b & 7).to(tl.float32)
    mag = tl.where(e == 0, mant * 0.001953125, (8.0 + mant) * tl.exp2((e - 10).to(tl.float32)))
    return tl.where((b & 128) != 0, -mag, mag)


@triton.jit
def _nvfp4_dequant_kernel(W, SCALE, GSCALE, OUT, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """OUT float32 ``[N, K]`` = grid[code] * fp8 scale (per 16) * global scale; W uint8 ``[N, K/2]``,
    SCALE float8_e4m3fn ``[N, K/16]`` viewed as uint8, GSCALE float32 ``[]``."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.program_id(1) * BK
    c = tl.arange(0, BK // 2)
    nmask = rn[:, None] < N
    rn64 = rn[:, None].to(tl.int64)
    b = tl.load(W + rn64 * (K // 2) + (k // 2 + c)[None, :], mask=nmask, other=0).to(tl.int32)
    s = _e4m3_value(tl.load(SCALE + rn64 * (K // 16) + (k // 16 + c // 8)[None, :], mask=nmask, other=0).to(tl.int32))
    gs = tl.load(GSCALE)
    lo = (_fp4_value(b & 15) * s) * gs
    hi = (_fp4_value(b >> 4) * s) * gs
    vals = tl.reshape(tl.join(lo, hi), (BN, BK))
    tl.store(OUT + rn64 * K + (k + tl.arange(0, BK))[None, :], vals, mask=nmask)


def nvfp4_dequant(qweight: torch.Tensor, wscales: torch.Tensor, wscale_global: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, K]`` from NVFP4 qweight uint8 ``[N, K // 2]``, wscales e4m3 ``[N, K // 16]``, scalar scale."""
    N, K = qweight.shape[0], qweight.shape[1] * 2
    out = torch.empty(N, K, dtype=torch.float32, device=qweight.device)
    bk = 64 if K % 64 == 0 else (32 if K % 32 == 0 else 16)
    _nvfp4_dequant_kernel[(triton.cdiv(N, 32), K // bk)](qweight, wscales.view(torch.uint8), wscale_global, out, N, K, BN=32, BK=bk)
    return out
