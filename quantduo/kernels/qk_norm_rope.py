"""FLUX's query / key preparation for FlashAttention-3's fp8 kernel in one pass: per-head RMSNorm, the
concatenation of the text and image streams, the rotary embedding and the E4M3 quantization by a static bound.

    codes[b, s, h] = e4m3(clamp(rope(rms_norm(x[b, s, h], w), cos[s], sin[s]) * 448 / bound, +-448))

with ``x`` the rows of ``cat([x0, x1], dim=1)`` (``w0`` for rows of ``x0``, ``w1`` for those of ``x1``) and the
roundings of the eager modules for a weight of the inputs' dtype (other weights are cast to it). The RMSNorm is
PyTorch's ``torch.nn.RMSNorm`` (what diffusers' FLUX attention uses): float32 statistics, the weight applied in
float32, one rounding to the inputs' dtype; with ``round_before_weight`` it is diffusers' own ``RMSNorm``: the
normalized row rounded to that dtype, the product with the weight in it. ``apply_rotary_emb`` (real form, pairs
``(2i, 2i + 1)``) rounds its float32 result to it. Reference:
:func:`quantduo.formats.attention_fp8.rms_norm_rope_e4m3_ref`.

Compiled as one graph, the same chain cost Inductor two to three passes over Q and K with gathered loads for the
rotary pairs; here each program reads ``ROWS`` head rows once and writes their codes once, in FlashAttention-3's
``[B, S, H, D]`` layout. Under ``torch.compile`` the kernel is a ``triton_op`` (:func:`.common.kernel_op`) that
Inductor launches itself.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from quantduo.formats.attention_fp8 import E4M3_MAX

from .common import kernel_op, round_to, to_e4m3_saturated


@triton.jit
def _norm_rope_e4m3_kernel(X0, X1, W0, W1, COS, SIN, OUT, B, S, S0, H, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h,
                           eps, inv_scale, D: tl.constexpr, ROWS: tl.constexpr, ROPE: tl.constexpr,
                           ROUND_BEFORE_WEIGHT: tl.constexpr, NATIVE: tl.constexpr):
    """Program (p, stream): head rows ``p * ROWS ...`` of one stream's ``[B, S_i, H]`` -> their rows of OUT
    float8_e4m3fn ``[B, S, H, D]`` (contiguous). Stream 0 is X0 (strides s0_*, tokens ``[0, S0)`` of OUT), stream 1
    X1 (strides s1_*, tokens ``[S0, S)``); W0 / W1 ``[D]`` in the inputs' dtype; COS / SIN float32 ``[S, D]`` (unit
    column stride, row stride D) where ROPE. eps and inv_scale float32 or float64 (Inductor types Python floats
    float64), used in float32. ROUND_BEFORE_WEIGHT: diffusers' RMSNorm rounding (normalized row rounded before the
    weight), else PyTorch's (one rounding). Row indices are 32-bit (``B * S * H < 2**31``): no 64-bit divisions."""
    eps, inv_scale = tl.cast(eps, tl.float32), tl.cast(inv_scale, tl.float32)
    if tl.program_id(1) == 0:
        X, W, stride_b, stride_s, stride_h, S_i, first_token = X0, W0, s0_b, s0_s, s0_h, S0, 0
    else:
        X, W, stride_b, stride_s, stride_h, S_i, first_token = X1, W1, s1_b, s1_s, s1_h, S - S0, S0
    if tl.program_id(0) * ROWS >= B * S_i * H:  # the shorter stream's programs past its rows
        return
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < B * S_i * H
    h = rows % H
    token = rows // H
    s = token % S_i
    b = (token // S_i).to(tl.int64)
    cols = tl.arange(0, D)
    mask = valid[:, None]
    offset = b * stride_b + s.to(tl.int64) * stride_s + h.to(tl.int64) * stride_h
    x = tl.load(X + offset[:, None] + cols[None, :], mask=mask, other=0.0)
    dt = x.dtype
    w = tl.load(W + cols).to(tl.float32)[None, :]
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)
    normalized = xf * inv_rms[:, None]
    if ROUND_BEFORE_WEIGHT:
        normalized = round_to(normalized, dt, NATIVE)
    y = round_to(normalized * w, dt, NATIVE)
    s = s + first_token  # the token in cat([x0, x1], dim=1)
    if ROPE:
        ye, yo = tl.split(tl.reshape(y, (ROWS, D // 2, 2)))
        trig = s[:, None] * D + cols[None, :]
        ce, co = tl.split(tl.reshape(tl.load(COS + trig, mask=mask, other=0.0), (ROWS, D // 2, 2)))
        se, so = tl.split(tl.reshape(tl.load(SIN + trig, mask=mask, other=0.0), (ROWS, D // 2, 2)))
        y = round_to(tl.reshape(tl.join(ye * ce - yo * se, yo * co + ye * so), (ROWS, D)), dt, NATIVE)
    out_rows = ((b * S + s) * H + h)[:, None] * D
    tl.store(OUT + out_rows + cols[None, :], to_e4m3_saturated(y * inv_scale, NATIVE), mask=mask)


def _check(x0, w0, x1, w1, cos, sin, bound):
    D = x0.shape[-1]
    parts = [x0] if x1 is None else [x0, x1]
    for x in parts:
        if x.dim() != 4 or x.stride(-1) != 1 or x.shape[-1] != D or x.shape[0] != x0.shape[0] or \
                x.shape[2] != x0.shape[2]:
            raise ValueError(f"x0 / x1 must be [B, S_i, H, D] with unit last stride and equal B, H, D; got "
                             f"{[tuple(p.shape) for p in parts]} strides {[p.stride() for p in parts]}")
        if x.dtype != x0.dtype:
            raise ValueError(f"x0 and x1 need one dtype, got {x0.dtype} and {x.dtype}")
    if D < 2 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two, got {D}")
    for w in [w0] if x1 is None else [w0, w1]:
        if w is None or w.shape != (D,):
            raise ValueError(f"RMSNorm weights must be [{D}], got {None if w is None else tuple(w.shape)}")
    S = sum(p.shape[1] for p in parts)
    if x0.shape[0] * S * x0.shape[2] >= 2 ** 31:
        raise ValueError(f"at most 2**31 - 1 head rows (B * S * H), got {x0.shape[0] * S * x0.shape[2]}")
    if (cos is None) != (sin is None):
        raise ValueError("give both cos and sin, or neither")
    if cos is not None and (cos.shape != (S, D) or sin.shape != (S, D)):
        raise ValueError(f"cos / sin must be [{S}, {D}], got {tuple(cos.shape)} / {tuple(sin.shape)}")
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")


def default_tile(D: int) -> tuple[int, int]:
    """(head rows per program, warps): 32 rows of 128 at 4 warps, two rows per thread, 80 registers, no spills
    (sm_90a): six programs per SM."""
    return max(1, min(64, 4096 // D)), 4


def _launch(x0, w0, x1, w1, cos, sin, eps, bound, round_before_weight, wrap: Callable | None = None,
            tile: tuple[int, int] | None = None) -> torch.Tensor:
    """The kernel over validated inputs; wrap: ``wrap_triton`` inside a ``triton_op`` body; tile: (rows, warps),
    :func:`default_tile` where None."""
    B, S0, H, D = x0.shape
    second = x0 if x1 is None else x1
    S = S0 + (0 if x1 is None else x1.shape[1])
    out = torch.empty(B, S, H, D, dtype=torch.float8_e4m3fn, device=x0.device)
    rope = cos is not None
    trig = [t.float().contiguous() if rope else x0 for t in (cos, sin)]
    rows, warps = tile or default_tile(D)
    kernel = _norm_rope_e4m3_kernel if wrap is None else wrap(_norm_rope_e4m3_kernel)
    streams = 1 if x1 is None else 2
    kernel[(triton.cdiv(B * max(S0, S - S0) * H, rows), streams)](
        x0, second, w0.to(x0.dtype), (w0 if w1 is None else w1).to(x0.dtype), trig[0], trig[1], out, B, S, S0,
        H, *x0.stride()[:3], *second.stride()[:3], eps, E4M3_MAX / bound, D=D, ROWS=rows, ROPE=rope,
        ROUND_BEFORE_WEIGHT=round_before_weight, NATIVE=x0.is_cuda, num_warps=warps)
    return out


def _fake(x0, w0, x1, w1, cos, sin, eps, bound, round_before_weight):
    S = x0.shape[1] + (0 if x1 is None else x1.shape[1])
    return x0.new_empty(x0.shape[0], S, x0.shape[2], x0.shape[3], dtype=torch.float8_e4m3fn)


@kernel_op("quantduo::rms_norm_rope_e4m3", _fake)
def _rms_norm_rope_e4m3_op(x0: torch.Tensor, w0: torch.Tensor, x1: torch.Tensor | None, w1: torch.Tensor | None,
                           cos: torch.Tensor | None, sin: torch.Tensor | None, eps: float, bound: float,
                           round_before_weight: bool) -> torch.Tensor:
    return _launch(x0, w0, x1, w1, cos, sin, eps, bound, round_before_weight, wrap_triton)


def rms_norm_rope_e4m3(x0: torch.Tensor, w0: torch.Tensor, eps: float, bound: float, x1: torch.Tensor | None = None,
                       w1: torch.Tensor | None = None, cos: torch.Tensor | None = None,
                       sin: torch.Tensor | None = None, round_before_weight: bool = False) -> torch.Tensor:
    """E4M3 codes float8_e4m3fn ``[B, S0 + S1, H, D]`` (contiguous) of the head rows of ``cat([x0, x1], dim=1)``
    (x0 ``[B, S0, H, D]``, x1 ``[B, S1, H, D]`` or None; 16/32-bit, unit last stride, any other strides) after an
    RMSNorm (``eps``; weight w0 ``[D]`` for x0's rows, w1 for x1's; PyTorch's rounding, or diffusers' with
    ``round_before_weight``) and, where given, the rotary embedding ``cos`` / ``sin`` ``[S0 + S1, D]``, scaled by
    ``448 / bound`` (see the module docstring). ``D`` a power of two. ValueError for inputs that break these
    rules."""
    _check(x0, w0, x1, w1, cos, sin, bound)
    if torch.compiler.is_compiling():
        return _rms_norm_rope_e4m3_op(x0, w0, x1, w1, cos, sin, eps, bound, round_before_weight)
    return _launch(x0, w0, x1, w1, cos, sin, eps, bound, round_before_weight)
