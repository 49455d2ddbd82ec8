"""FlashAttention-3's V operand from the projection outputs: E4M3 codes with one absmax scale per (batch, head)
over the whole sequence, for one stream or two (text rows first), in two passes:

1. every program takes ``TOKENS`` consecutive tokens of one (batch, head, stream) and writes their absmax to a
   partial buffer ``[B, H, P]`` (``P`` the token blocks of both streams);
2. every program reduces its head's ``P`` partials to the head's absmax, ``scale = absmax / 448`` (1.0 for an
   all-zero head), and writes ``e4m3(clamp(x * (1 / scale), +-448))`` for its tokens into ``[B, S0 + S1, H, D]``;
   the first block of each head also writes ``scale`` ``[B, H]``.

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
def _load_tile(X0, X1, S, S0, H, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h, TOKENS: tl.constexpr, D: tl.constexpr):
    """The program's tile: ``(x [TOKENS, D] float32 (zeros past its stream), tokens [TOKENS] (their index in the
    concatenation), valid [TOKENS], b, h, first_block)`` for program (token block, b * H + h, stream);
    ``first_block``: the stream's first block in the partials (0 for X0, ``cdiv(S0, TOKENS)`` for X1)."""
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    if tl.program_id(2) == 0:
        X, stride_b, stride_s, stride_h, S_i, first_token, first_block = X0, s0_b, s0_s, s0_h, S0, 0, 0
    else:
        X, stride_b, stride_s, stride_h, S_i, first_token, first_block = \
            X1, s1_b, s1_s, s1_h, S - S0, S0, tl.cdiv(S0, TOKENS)
    s = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    valid = s < S_i
    rows = X + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + s.to(tl.int64) * stride_s
    x = tl.load(rows[:, None] + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    return x, s + first_token, valid, b, h, first_block


@triton.jit
def _block_absmax_kernel(X0, X1, PART, S, S0, H, P, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h, TOKENS: tl.constexpr,
                         D: tl.constexpr):
    """Pass 1. Program (token block, b * H + h, stream): ``PART[b, h, first_block + block]`` (float32 ``[B, H, P]``)
    = absmax of the block's ``[TOKENS, D]`` tile of head h (X0 / X1 ``[B, S_i, H, D]``, unit last stride)."""
    S_i = S0 if tl.program_id(2) == 0 else S - S0
    if tl.program_id(0) * TOKENS >= S_i:  # the shorter stream's programs past its tokens
        return
    x, _, _, b, h, first_block = _load_tile(X0, X1, S, S0, H, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h, TOKENS, D)
    tl.store(PART + (b * H + h) * P + first_block + tl.program_id(0), tl.max(tl.max(tl.abs(x), axis=1), axis=0))


@triton.jit
def _quantize_kernel(X0, X1, PART, OUT, SCALE, S, S0, H, P, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h,
                     TOKENS: tl.constexpr, D: tl.constexpr, PP: tl.constexpr, NATIVE: tl.constexpr):
    """Pass 2. Program (token block, b * H + h, stream): the head's absmax from its ``P`` partials (``PP`` the next
    power of two), codes of the block's tokens -> OUT float8_e4m3fn ``[B, S, H, D]`` (contiguous); the first block of
    stream 0 writes ``SCALE[b, h]`` (float32 ``[B, H]``)."""
    S_i = S0 if tl.program_id(2) == 0 else S - S0
    if tl.program_id(0) * TOKENS >= S_i:
        return
    x, tokens, valid, b, h, _ = _load_tile(X0, X1, S, S0, H, s0_b, s0_s, s0_h, s1_b, s1_s, s1_h, TOKENS, D)
    partials = tl.arange(0, PP)
    absmax = tl.max(tl.load(PART + (b * H + h) * P + partials, mask=partials < P, other=0.0), axis=0)
    scale, inv_scale = per_token_scale(absmax)  # the same rule per head as per token
    out_rows = ((b.to(tl.int64) * S + tokens) * H + h) * D
    tl.store(OUT + out_rows[:, None] + tl.arange(0, D)[None, :], to_e4m3_saturated(x * inv_scale, NATIVE),
             mask=valid[:, None])
    if (tl.program_id(0) == 0) & (tl.program_id(2) == 0):
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
    partials = torch.empty(B, H, max(P, 1), dtype=torch.float32, device=x0.device)
    codes = torch.empty(B, S0 + S1, H, D, dtype=torch.float8_e4m3fn, device=x0.device)
    scale = torch.empty(B, H, dtype=torch.float32, device=x0.device)
    if P == 0:
        return codes, scale.fill_(1.0)
    grid = (triton.cdiv(max(S0, S1), TOKENS), B * H, 1 if x1 is None else 2)
    strides = (*x0.stride()[:3], *second.stride()[:3])
    absmax_kernel, quantize_kernel = (_block_absmax_kernel, _quantize_kernel) if wrap is None else \
        (wrap(_block_absmax_kernel), wrap(_quantize_kernel))
    absmax_kernel[grid](x0, second, partials, S0 + S1, S0, H, P, *strides, TOKENS=TOKENS, D=D, num_warps=WARPS)
    quantize_kernel[grid](x0, second, partials, codes, scale, S0 + S1, S0, H, P, *strides, TOKENS=TOKENS, D=D,
                          PP=triton.next_power_of_2(P), NATIVE=x0.is_cuda, num_warps=WARPS)
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
