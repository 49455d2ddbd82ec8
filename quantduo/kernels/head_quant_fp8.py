"""FlashAttention-3's V operand from the projection outputs: E4M3 codes with one absmax scale per (batch, head)
over the whole sequence, for one stream or two (text rows first), in two passes:

1. every program takes ``TOKENS`` consecutive tokens of one (batch, head, stream) and writes their absmax to a
   partial buffer ``[B, H, P]`` (``P`` the token blocks of both streams);
2. (the same kernel and grid) every program reduces its head's ``P`` partials to the head's absmax,
   ``scale = absmax / 448`` (1.0 for an all-zero head), and writes ``e4m3(clamp(x * (1 / scale), +-448))`` for its
   tokens into ``[B, S0 + S1, H, D]``; the first block of each head also writes ``scale`` ``[B, H]``.

Both passes read the inputs in place (any row strides: views of a fused QKV output), so the two streams are never
concatenated. Compiled as one graph, the same chain (concatenation, absmax, quantization, FlashAttention-3's layout)
cost Inductor several kernels over V. Under ``torch.compile`` the two launches are one ``triton_op``
(:func:`.common.kernel_op`) that Inductor launches itself.

Reference: :func:`quantduo.formats.attention_fp8.quantize_token_heads_e4m3_ref`.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .common import kernel_op, per_token_scale, to_e4m3_saturated

TOKENS = 64  # tokens per program: a [64, 128] tile of one head at FLUX's head dim, 64 elements per thread
WARPS = 4


@triton.jit
def _head_quant_kernel(X0, X1, PART, OUT, SCALE, S, S0, H, P, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h,
                       QUANTIZE: tl.constexpr, TOKENS: tl.constexpr, D: tl.constexpr, PP: tl.constexpr,
                       NATIVE: tl.constexpr):
    """Program (token block, b * H + h, stream) over the ``[TOKENS, D]`` tile of head h of its tokens in X0 (stream
    0, ``[B, S0, H, D]``) or X1 (stream 1, ``[B, S - S0, H, D]``; unit last strides, row strides s*_b / s*_s / s*_h).

    Pass 1 (not QUANTIZE): ``PART[b, h, first_block + block]`` (float32 ``[B, H, P]``) = the tile's absmax, with
    ``first_block`` 0 for X0 and ``cdiv(S0, TOKENS)`` for X1. Pass 2 (QUANTIZE): the head's absmax from its ``P``
    partials (``PP`` the next power of two), the tile's codes -> OUT float8_e4m3fn ``[B, S, H, D]`` (contiguous, X0's
    tokens first); the first block of stream 0 writes ``SCALE[b, h]`` (float32 ``[B, H]``)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    stream = tl.program_id(2)  # 0: X0, 1: X1
    S_i = S0 + stream * (S - 2 * S0)  # the stream's length
    if tl.program_id(0) * TOKENS >= S_i:  # the shorter stream's programs past its tokens
        return
    # the input chosen here, in the kernel (passed to a called function, the kernel's arguments look written to
    # Inductor's analysis: tests/kernels/test_compiled_ops.py), the indices by arithmetic
    if stream == 0:
        X, stride_b, stride_s, stride_h = X0, s0_b, s0_s, s0_h
    else:
        X, stride_b, stride_s, stride_h = X1, s1_b, s1_s, s1_h
    s = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    valid = s < S_i
    rows = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + s.to(tl.int64) * stride_s
    x = tl.load(rows[:, None] + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    head_partials = PART + (b * H + h) * P
    if not QUANTIZE:
        block = stream * tl.cdiv(S0, TOKENS) + tl.program_id(0)
        tl.store(head_partials + block, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
    else:
        partials = tl.arange(0, PP)
        absmax = tl.max(tl.load(head_partials + partials, mask=partials < P, other=0.0), axis=0)
        scale, inv_scale = per_token_scale(absmax)  # the same rule per head as per token
        out_rows = ((b.to(tl.int64) * S + stream * S0 + s) * H + h) * D
        tl.store(OUT + out_rows[:, None] + tl.arange(0, D)[None, :], to_e4m3_saturated(x * inv_scale, NATIVE),
                 mask=valid[:, None])
        if (tl.program_id(0) == 0) & (stream == 0):
            tl.store(SCALE + b * H + h, scale)


def _check(x0: torch.Tensor, x1: torch.Tensor | None) -> None:
    parts = [x0] if x1 is None else [x0, x1]
    for x in parts:
        if x.dim() != 4 or x.stride(-1) != 1 or x.shape[0] != x0.shape[0] or x.shape[2:] != x0.shape[2:]:
            raise ValueError(f"x0 / x1 must be [B, S_i, H, D] with unit last stride and equal B, H, D; got "
                             f"{[tuple(p.shape) for p in parts]} strides {[p.stride() for p in parts]}")
        if x.dtype != x0.dtype or not x.is_floating_point():
            raise ValueError(f"x0 and x1 need one floating dtype, got {[p.dtype for p in parts]}")
    D = x0.shape[-1]
    if D < 1 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two, got {D}")
    if x0.shape[0] * x0.shape[2] >= 2 ** 16:
        raise ValueError(f"at most 65535 (batch, head) pairs, got {x0.shape[0] * x0.shape[2]}")


def _launch(x0: torch.Tensor, x1: torch.Tensor | None, wrap: Callable | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both passes over validated inputs; wrap: ``wrap_triton`` inside a ``triton_op`` body."""
    B, S0, H, D = x0.shape
    second = x0 if x1 is None else x1
    S1 = 0 if x1 is None else x1.shape[1]
    P = triton.cdiv(S0, TOKENS) + triton.cdiv(S1, TOKENS)
    codes = torch.empty(B, S0 + S1, H, D, dtype=torch.float8_e4m3fn, device=x0.device)
    scale = torch.empty(B, H, dtype=torch.float32, device=x0.device)
    if P == 0:  # no tokens: the all-zero heads' scale
        return codes, scale.fill_(1.0)
    partials = torch.empty(B, H, P, dtype=torch.float32, device=x0.device)
    grid = (triton.cdiv(max(S0, S1), TOKENS), B * H, 1 if x1 is None else 2)
    args = (x0, second, partials, codes, scale, S0 + S1, S0, H, P, *x0.stride()[:3], *second.stride()[:3])
    kernel = _head_quant_kernel if wrap is None else wrap(_head_quant_kernel)
    for quantize in (False, True):
        kernel[grid](*args, QUANTIZE=quantize, TOKENS=TOKENS, D=D, PP=triton.next_power_of_2(P), NATIVE=x0.is_cuda,
                     num_warps=WARPS)
    return codes, scale


def _fake(x0, x1):
    S = x0.shape[1] + (0 if x1 is None else x1.shape[1])
    B, _, H, D = x0.shape
    return (x0.new_empty(B, S, H, D, dtype=torch.float8_e4m3fn), x0.new_empty(B, H, dtype=torch.float32))


@kernel_op("quantduo::quantize_token_heads_e4m3", _fake)
def _quantize_token_heads_op(x0: torch.Tensor, x1: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x0, x1, wrap_triton)


def quantize_token_heads_e4m3(x0: torch.Tensor, x1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes with one absmax scale per (batch, head) of ``cat([x0, x1], dim=1)`` (x0 ``[B, S0, H, D]``, x1
    ``[B, S1, H, D]`` or None; 16/32-bit, unit last stride, any other strides, ``D`` a power of two): (codes
    float8_e4m3fn ``[B, S0 + S1, H, D]`` contiguous, scales float32 ``[B, H]``), see the module docstring.
    ValueError for inputs that break these rules."""
    _check(x0, x1)
    if torch.compiler.is_compiling():
        return _quantize_token_heads_op(x0, x1)
    return _launch(x0, x1)
