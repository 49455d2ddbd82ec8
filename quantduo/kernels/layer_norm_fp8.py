"""A DiT block's adaLN in one pass, straight to the per-token fp8 codes of the layers that read it:

    y[b, s] = layer_norm(x[b, s]) * (1 + scale[b]) + shift[b]          (no affine weight, ``eps``)
    codes[b, s], qscale[b, s] = quantize_fp8_per_token(y[b, s])

with ``x`` the rows of ``cat([x0, x1], dim=1)`` (FLUX's single blocks normalize text + image tokens together; its
double blocks one stream at a time) and the roundings of the eager modules in the inputs' dtype: the normalized row
rounded (PyTorch's ``layer_norm``), then ``1 + scale``, the product and the sum each rounded, as diffusers'
``AdaLayerNormZero`` / ``AdaLayerNormZeroSingle`` and the FLUX block's ``norm2`` + modulation compute them.
Reference: :func:`quantduo.formats.fp8.layer_norm_modulate_fp8_ref`.

:func:`gated_residual_layer_norm_fp8` adds a gated residual in front, as the FLUX double block's ``norm2`` reads
the stream after its attention update (``x = x + gate[b] * r``, product and sum each rounded): the kernel writes
the updated stream, which the block's next residual reads, and normalizes it from its registers, so the update is
not read back.

Compiled, the same chain is one Inductor reduction that reads each row once per statistic and once more to
quantize; here a program holds its row in registers (two power-of-two segments, :func:`.common.row_segments`) from
the load to the store of its codes. Under ``torch.compile`` the kernel is a ``triton_op``
(:func:`.common.kernel_op`).
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import (kernel_op, load_row_segment, mul_rounded, per_token_scale, round_to, row_segments, row_warps,
                     store_e4m3_segment)


@triton.jit
def _centered(x, start, K, mean, B: tl.constexpr):
    """``x - mean`` for the segment ``x`` (columns ``start + [0, B)`` of a row of length K), zero past K."""
    cols = start + tl.arange(0, B)
    return tl.where(cols < K, x - mean, 0.0)


@triton.jit
def _modulated(centered, rstd, SHIFT, SCALE, start, K, amax, B: tl.constexpr, dt: tl.constexpr,
               NATIVE: tl.constexpr):
    """``layer_norm * (1 + scale) + shift`` on columns ``start + [0, B)``, each step rounded to ``dt`` as the
    eager modules round it; ``amax`` raised to the result's absmax."""
    cols = start + tl.arange(0, B)
    shift = tl.load(SHIFT + cols, mask=cols < K, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + cols, mask=cols < K, other=0.0).to(tl.float32)
    normalized = round_to(centered * rstd, dt, NATIVE)
    y = round_to(mul_rounded(normalized, round_to(1.0 + scale, dt, NATIVE), NATIVE), dt, NATIVE)  # then + shift
    y = round_to(y + shift, dt, NATIVE)
    return y, tl.maximum(amax, tl.max(tl.abs(y), axis=0))


@triton.jit
def _gated_sum(x, r_row, gate_row, x_out_row, start, K, B: tl.constexpr, dt: tl.constexpr, NATIVE: tl.constexpr):
    """``x + gate * r`` on columns ``start + [0, B)`` < K (product and sum each rounded to ``dt``), stored to the
    row at ``x_out_row`` and returned (float32, zero past K)."""
    cols = start + tl.arange(0, B)
    r = tl.load(r_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    gate = tl.load(gate_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    x = round_to(x + round_to(mul_rounded(gate, r, NATIVE), dt, NATIVE), dt, NATIVE)
    tl.store(x_out_row + cols, x.to(dt), mask=cols < K)
    return x


@triton.jit
def _layer_norm_fp8_kernel(X0, X1, SHIFT, SCALE, Q, QSCALE, R, GATE, X_OUT, B, S0, S1, K, x0_b, x0_s, x1_b, x1_s,
                           shift_b, scale_b, r_b, r_s, gate_b, eps, B0: tl.constexpr, B1: tl.constexpr,
                           RESIDUAL: tl.constexpr, NATIVE: tl.constexpr):
    """Program (r, stream): row r of one stream's ``[B, S_i, K]`` -> its row of Q float8_e4m3fn ``[B * (S0 + S1),
    K]`` (contiguous, batch-major, stream 0's S0 tokens first) and of QSCALE float32 ``[B * (S0 + S1)]``. X0 / X1
    (strides x*_b, x*_s, unit column stride), SHIFT / SCALE ``[B, K]`` (batch strides shift_b / scale_b, unit
    column stride), all of one 16/32-bit dtype. The row as two segments of B0 + B1 >= K columns (B1 may be 0). eps
    float32 or float64 (Inductor types Python floats float64), used in float32. Row indices 32-bit.

    RESIDUAL (one stream): the row normalized is ``X0 + GATE[b] * R`` (R ``[B, S0, K]``, strides r_b, r_s; GATE
    ``[B, K]``, batch stride gate_b), also written to its row of X_OUT ``[B * S0, K]`` (contiguous)."""
    eps = tl.cast(eps, tl.float32)
    if tl.program_id(1) == 0:
        X, stride_b, stride_s, S_i, first_token = X0, x0_b, x0_s, S0, 0
    else:
        X, stride_b, stride_s, S_i, first_token = X1, x1_b, x1_s, S1, S0
    r = tl.program_id(0)
    if r >= B * S_i:  # the shorter stream's programs past its rows
        return
    b = r // S_i
    s = r % S_i
    x_row = X + b.to(tl.int64) * stride_b + s.to(tl.int64) * stride_s
    out_row = (b * (S0 + S1) + first_token + s).to(tl.int64)
    dt = X0.dtype.element_ty

    x0 = load_row_segment(x_row, 0, K, B0)
    if B1 > 0:
        x1 = load_row_segment(x_row, B0, K, B1)
    if RESIDUAL:
        r_row = R + b.to(tl.int64) * r_b + s.to(tl.int64) * r_s
        gate_row, x_out_row = GATE + b.to(tl.int64) * gate_b, X_OUT + out_row * K
        x0 = _gated_sum(x0, r_row, gate_row, x_out_row, 0, K, B0, dt, NATIVE)
        if B1 > 0:
            x1 = _gated_sum(x1, r_row, gate_row, x_out_row, B0, K, B1, dt, NATIVE)
    total = tl.sum(x0, axis=0)
    if B1 > 0:
        total += tl.sum(x1, axis=0)
    mean = total / K
    c0 = _centered(x0, 0, K, mean, B0)
    var = tl.sum(c0 * c0, axis=0)
    if B1 > 0:
        c1 = _centered(x1, B0, K, mean, B1)
        var += tl.sum(c1 * c1, axis=0)
    rstd = 1.0 / tl.sqrt(var / K + eps)

    shift_row, scale_row = SHIFT + b.to(tl.int64) * shift_b, SCALE + b.to(tl.int64) * scale_b
    y0, amax = _modulated(c0, rstd, shift_row, scale_row, 0, K, 0.0, B0, dt, NATIVE)
    if B1 > 0:
        y1, amax = _modulated(c1, rstd, shift_row, scale_row, B0, K, amax, B1, dt, NATIVE)
    qscale, inv_scale = per_token_scale(amax)
    q_row = Q + out_row * K
    store_e4m3_segment(q_row, 0, K, y0, inv_scale, B0, NATIVE)
    if B1 > 0:
        store_e4m3_segment(q_row, B0, K, y1, inv_scale, B1, NATIVE)
    tl.store(QSCALE + out_row, qscale)


def _check(x0, x1, shift, scale, residual=None, gate=None):
    parts = [x0] if x1 is None else [x0, x1]
    B, K = x0.shape[0], x0.shape[-1]
    for x in parts:
        if x.dim() != 3 or x.stride(-1) != 1 or x.shape[0] != B or x.shape[-1] != K or x.dtype != x0.dtype:
            raise ValueError(f"x0 / x1 must be [B, S_i, K] of one dtype with unit last stride and equal B, K; got "
                             f"{[(tuple(p.shape), p.stride(), p.dtype) for p in parts]}")
    vectors = (("shift", shift), ("scale", scale)) + ((("gate", gate),) if residual is not None else ())
    for name, t in vectors:
        if t.shape != (B, K) or t.stride(-1) != 1 or t.dtype != x0.dtype:
            raise ValueError(f"{name} must be [{B}, {K}] in {x0.dtype} with unit last stride, got "
                             f"{tuple(t.shape)} strides {t.stride()} {t.dtype}")
    if residual is not None and (residual.shape != x0.shape or residual.stride(-1) != 1 or
                                 residual.dtype != x0.dtype):
        raise ValueError(f"residual must be {list(x0.shape)} in {x0.dtype} with unit last stride, got "
                         f"{tuple(residual.shape)} strides {residual.stride()} {residual.dtype}")
    rows = B * sum(p.shape[1] for p in parts)
    if rows >= 2 ** 31:
        raise ValueError(f"at most 2**31 - 1 rows (B * S), got {rows}")
    if K == 0:
        raise ValueError("rows of 0 channels")


def _launch(x0, x1, shift, scale, eps, residual=None, gate=None, wrap: Callable | None = None,
            warps: int | None = None) -> tuple[torch.Tensor, ...]:
    """The kernel over validated inputs: (codes, scales), and the updated stream after them where ``residual`` is
    given (one stream); wrap: ``wrap_triton`` inside a ``triton_op`` body; warps: :func:`.common.row_warps` of the
    row where None."""
    B, S0, K = x0.shape
    second = x0 if x1 is None else x1
    S1 = 0 if x1 is None else x1.shape[1]
    q = torch.empty(B * (S0 + S1), K, dtype=torch.float8_e4m3fn, device=x0.device)
    qscale = torch.empty(B * (S0 + S1), dtype=torch.float32, device=x0.device)
    has_residual = residual is not None
    x_out = torch.empty(B, S0, K, dtype=x0.dtype, device=x0.device) if has_residual else q
    residual, gate = (residual, gate) if has_residual else (x0, shift)
    b0, b1 = row_segments(K)
    kernel = _layer_norm_fp8_kernel if wrap is None else wrap(_layer_norm_fp8_kernel)
    kernel[(B * max(S0, S1), 1 if x1 is None else 2)](
        x0, second, shift, scale, q, qscale, residual, gate, x_out, B, S0, S1, K, x0.stride(0), x0.stride(1),
        second.stride(0), second.stride(1), shift.stride(0), scale.stride(0), residual.stride(0), residual.stride(1),
        gate.stride(0), eps, B0=b0, B1=b1, RESIDUAL=has_residual, NATIVE=x0.is_cuda,
        num_warps=warps or row_warps(b0 + b1))
    return (q, qscale, x_out) if has_residual else (q, qscale)


def _fake(x0, x1, shift, scale, eps):
    rows = x0.shape[0] * (x0.shape[1] + (0 if x1 is None else x1.shape[1]))
    return (x0.new_empty(rows, x0.shape[2], dtype=torch.float8_e4m3fn), x0.new_empty(rows, dtype=torch.float32))


def _fake_gated(x, residual, gate, shift, scale, eps):
    return (*_fake(x, None, shift, scale, eps), torch.empty_like(x, memory_format=torch.contiguous_format))


@kernel_op("quantduo::layer_norm_modulate_fp8", _fake)
def _layer_norm_modulate_fp8_op(x0: torch.Tensor, x1: torch.Tensor | None, shift: torch.Tensor, scale: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x0, x1, shift, scale, eps, wrap=wrap_triton)


@kernel_op("quantduo::gated_residual_layer_norm_fp8", _fake_gated)
def _gated_residual_layer_norm_fp8_op(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor,
                                      shift: torch.Tensor, scale: torch.Tensor, eps: float
                                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch(x, None, shift, scale, eps, residual, gate, wrap=wrap_triton)


def layer_norm_modulate_fp8(x0: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                            x1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 codes of ``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` for x the rows of
    ``cat([x0, x1], dim=1)`` (x0 ``[B, S0, K]``, x1 ``[B, S1, K]`` or None; shift, scale ``[B, K]``; one 16/32-bit
    dtype, unit last strides, any other strides): (codes float8_e4m3fn ``[B * (S0 + S1), K]``, scale float32
    ``[B * (S0 + S1)]``), rows batch-major (see the module docstring). ValueError for inputs that break these
    rules."""
    _check(x0, x1, shift, scale)
    if torch.compiler.is_compiling():
        return _layer_norm_modulate_fp8_op(x0, x1, shift, scale, eps)
    return _launch(x0, x1, shift, scale, eps)


def gated_residual_layer_norm_fp8(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                  scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`layer_norm_modulate_fp8` of ``u = x + gate[:, None] * residual`` (x, residual ``[B, S, K]``; gate,
    shift, scale ``[B, K]``; one 16/32-bit dtype, unit last strides), the product and the sum each rounded to it:
    (codes float8_e4m3fn ``[B * S, K]``, scale float32 ``[B * S]``, u ``[B, S, K]`` contiguous). ValueError for
    inputs that break these rules."""
    _check(x, None, shift, scale, residual, gate)
    if torch.compiler.is_compiling():
        return _gated_residual_layer_norm_fp8_op(x, residual, gate, shift, scale, eps)
    return _launch(x, None, shift, scale, eps, residual, gate)
