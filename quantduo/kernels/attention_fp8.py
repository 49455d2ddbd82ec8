"""FP8 flash attention (forward) for DiT attention on Hopper: Q/K/V in FP8 E4M3 per (head, block of tokens).

Semantics (and the pure-PyTorch reference): :mod:`quantduo.formats.attention_fp8`. Two launches (under
``torch.compile`` the first is :func:`graph_operands`, PyTorch operations fused into the producers of q, k, v):

* :func:`_block_quant_kernel` — one program per (block of tokens, batch x head): float32 scale
  ``absmax * (1 / 448)`` of the block, E4M3 codes into a zero-padded buffer ``[B, H, S_pad, D]``; V's codes are
  written token-contiguous (``[B, H, D, S_pad]`` in memory), the K-major operand layout fp8 ``wgmma`` needs for
  the PV product.
* :func:`_attention_fp8_kernel` — one program per (query block, batch x head): ``S = q8 @ k8^T`` on the fp8
  tensor cores, rescaled by ``s_q * s_k * sm_scale * log2(e)`` in float32; online softmax with float32 row max
  and row sum; ``P`` quantized to E4M3 as ``e4m3(p * 256)`` (FlashAttention-3's choice) for ``p8 @ v8`` on the
  fp8 tensor cores, rescaled by ``s_v / 256``; output ``acc / l`` in the input dtype.

Under the Triton CPU interpreter (``NATIVE`` false) the fp8 codes are widened to float32 before each ``tl.dot``:
the same values (every E4M3 value and every product of two is exact in float32), the same tiling and order, so
the interpreter checks the kernel's arithmetic; the native fp8 dots run only on the GPU.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from quantduo.formats.attention_fp8 import (DEFAULT_KV_BLOCK, DEFAULT_Q_BLOCK, LOG2E, P_SCALE,
                                           check_attention_inputs, quantize_blocks_e4m3)

from .common import fp8_operand, to_e4m3, to_e4m3_saturated

__all__ = ["attention_on_codes", "default_warps", "fp8_attention", "graph_operands", "quantize_blocks_e4m3_kernel",
           "quantize_operands"]

# The tiles are the format's quantization blocks (block_m = DEFAULT_Q_BLOCK, block_n = DEFAULT_KV_BLOCK); with 4
# warps and 3 stages, the fastest of benchmarks/attention_fp8.py's tiles on an H100 (BENCHMARKS.md).
DEFAULT_STAGES = 3


def default_warps(block_m: int) -> int:
    """Warps per program of the attention launch: one per 16 query rows (4 at 64 rows, 8 at 128)."""
    return max(4, min(8, block_m // 16))


@triton.jit
def _block_quant_kernel(X, Q, SCALE, S, stride_xb, stride_xh, stride_xs, stride_xd, stride_qb, stride_qh,
                        stride_qs, stride_qd, H, n_blocks, BLOCK: tl.constexpr, D: tl.constexpr,
                        NATIVE: tl.constexpr):
    """Program (j, bh): tokens ``[j * BLOCK, (j + 1) * BLOCK)`` of head ``bh`` of X ``[B, H, S, D]`` (any strides)
    -> E4M3 codes in Q (rows past S written as zeros), float32 scale ``SCALE[bh, j]``."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = j * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    x_ptr = X + b.to(tl.int64) * stride_xb + h * stride_xh + rows[:, None] * stride_xs + cols[None, :] * stride_xd
    x = tl.load(x_ptr, mask=rows[:, None] < S, other=0.0).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)
    q_ptr = Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qs + cols[None, :] * stride_qd
    tl.store(q_ptr, to_e4m3_saturated(x * tl.math.div_rn(1.0, scale), NATIVE))
    tl.store(SCALE + bh * n_blocks + j, scale)


@triton.jit
def _attention_fp8_kernel(Q8, K8, V8, SQ, SK, SV, OUT, S_q, S_kv, H, n_q_blocks, n_kv_blocks, qk_scale,
                          stride_ob, stride_oh, stride_os, stride_od,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, EVEN_KV: tl.constexpr,
                          P_SCALE: tl.constexpr, NATIVE: tl.constexpr):
    """Program (i, bh): rows ``[i * BLOCK_M, ...)`` of head bh. Q8, K8 ``[B*H, S_pad, D]`` row-major, V8
    ``[B*H, D, S_kv_pad]`` (token-contiguous), scales float32 ``[B*H, n_blocks]``; OUT ``[B, H, S_q, D]`` strided."""
    i = tl.program_id(0)
    bh = tl.program_id(1)
    s_q_pad = n_q_blocks * BLOCK_M
    s_kv_pad = n_kv_blocks * BLOCK_N
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(Q8 + bh.to(tl.int64) * s_q_pad * D + rows[:, None] * D + d[None, :])
    q_scale = tl.load(SQ + bh * n_q_blocks + i) * qk_scale
    k_base = K8 + bh.to(tl.int64) * s_kv_pad * D
    v_base = V8 + bh.to(tl.int64) * s_kv_pad * D
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for j in range(0, n_kv_blocks):
        cols = j * BLOCK_N + n
        k = tl.load(k_base + cols[None, :] * D + d[:, None])  # [D, BLOCK_N], K-major
        s = tl.dot(fp8_operand(q, NATIVE), fp8_operand(k, NATIVE)) * (q_scale * tl.load(SK + bh * n_kv_blocks + j))
        if not EVEN_KV:
            s = tl.where(cols[None, :] < S_kv, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        p8 = to_e4m3(p * P_SCALE, NATIVE)
        v = tl.load(v_base + d[None, :] * s_kv_pad + cols[:, None])  # [BLOCK_N, D], token-contiguous in memory
        pv = tl.dot(fp8_operand(p8, NATIVE), fp8_operand(v, NATIVE))
        acc = acc * alpha[:, None] + pv * (tl.load(SV + bh * n_kv_blocks + j) * (1.0 / P_SCALE))
        m_i = m_new
    out = acc / l_i[:, None]
    b, h = bh // H, bh % H
    o_ptr = OUT + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_os + d[None, :] * stride_od
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=rows[:, None] < S_q)


def quantize_blocks_e4m3_kernel(x: torch.Tensor, block: int, token_major: bool = False
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~quantduo.formats.attention_fp8.quantize_blocks_e4m3` of ``x [B, H, S, D]`` (any strides) by the
    Triton kernel, into a zero-padded buffer: (codes float8_e4m3fn ``[B, H, S_pad, D]`` with S_pad the next multiple
    of ``block``, scales float32 ``[B, H, S_pad / block]``). ``token_major``: the codes' memory is
    ``[B, H, D, S_pad]`` (the returned tensor is that buffer's transposed view)."""
    b, h, s, d = x.shape
    n_blocks = triton.cdiv(s, block)
    shape = (b, h, d, n_blocks * block) if token_major else (b, h, n_blocks * block, d)
    codes = torch.empty(shape, dtype=torch.float8_e4m3fn, device=x.device)
    codes = codes.transpose(2, 3) if token_major else codes
    scales = torch.empty(b, h, n_blocks, dtype=torch.float32, device=x.device)
    _block_quant_kernel[(n_blocks, b * h)](x, codes, scales, s, *x.stride(), *codes.stride(), h, n_blocks,
                                           BLOCK=block, D=d, NATIVE=x.is_cuda, num_warps=4)
    return codes, scales


def _check_kernel_inputs(q: torch.Tensor, block_m: int, block_n: int) -> None:
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim must be a power of two >= 16, got {d}")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")


def quantize_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int = DEFAULT_Q_BLOCK,
                      block_n: int = DEFAULT_KV_BLOCK) -> tuple[torch.Tensor, ...]:
    """The three quantization launches of :func:`fp8_attention_launch`: (q8, k8, v8 codes float8_e4m3fn, zero-padded
    ``[B, H, S_pad, D]``, v8 token-contiguous; their float32 scales ``[B, H, S_pad / block]``) as
    ``(q8, k8, v8, sq, sk, sv)``."""
    q8, sq = quantize_blocks_e4m3_kernel(q, block_m)
    k8, sk = quantize_blocks_e4m3_kernel(k, block_n)
    v8, sv = quantize_blocks_e4m3_kernel(v, block_n, token_major=True)
    return q8, k8, v8, sq, sk, sv


def graph_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int = DEFAULT_Q_BLOCK,
                   block_n: int = DEFAULT_KV_BLOCK) -> tuple[torch.Tensor, ...]:
    """:func:`quantize_operands`' output (same codes, scales and layouts) computed by PyTorch operations, which
    ``torch.compile`` fuses into the producers of q, k and v (the rotary embedding, the norms) instead of three
    launches that re-read them."""
    q8, sq = quantize_blocks_e4m3(q, block_m, padded=True)
    k8, sk = quantize_blocks_e4m3(k, block_n, padded=True)
    v8, sv = quantize_blocks_e4m3(v, block_n, padded=True)
    return q8, k8, v8.transpose(2, 3).contiguous().transpose(2, 3), sq, sk, sv


def attention_on_codes(operands: tuple[torch.Tensor, ...], s_q: int, s_kv: int, dtype: torch.dtype,
                       sm_scale: float, num_warps: int | None = None, num_stages: int = DEFAULT_STAGES
                       ) -> torch.Tensor:
    """The attention launch over :func:`quantize_operands`' output (blocks read from the codes' padding):
    ``[B, H, s_q, D]`` in ``dtype``, a transposed view of a ``[B, s_q, H, D]`` buffer. ``num_warps`` defaults to
    :func:`default_warps` of the query block."""
    q8, k8, v8, sq, sk, sv = operands
    b, h, s_q_pad, d = q8.shape
    n_q, n_kv = sq.shape[-1], sk.shape[-1]
    block_m, block_n = s_q_pad // n_q, k8.shape[2] // n_kv
    num_warps = default_warps(block_m) if num_warps is None else num_warps
    out = torch.empty(b, s_q, h, d, dtype=dtype, device=q8.device).transpose(1, 2)
    _attention_fp8_kernel[(n_q, b * h)](
        q8, k8, v8, sq, sk, sv, out, s_q, s_kv, h, n_q, n_kv, sm_scale * LOG2E, *out.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, D=d, EVEN_KV=s_kv % block_n == 0, P_SCALE=P_SCALE, NATIVE=q8.is_cuda,
        num_warps=num_warps, num_stages=num_stages)
    return out


def fp8_attention_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
                         block_m: int = DEFAULT_Q_BLOCK, block_n: int = DEFAULT_KV_BLOCK, num_warps: int | None = None,
                         num_stages: int = DEFAULT_STAGES) -> torch.Tensor:
    """The four launches over validated q ``[B, H, Sq, D]``, k, v ``[B, H, Skv, D]``: ``[B, H, Sq, D]`` in q's
    dtype (a transposed view of a ``[B, Sq, H, D]`` buffer, as diffusers' processors consume it)."""
    operands = quantize_operands(q, k, v, block_m, block_n)
    return attention_on_codes(operands, q.shape[2], k.shape[2], q.dtype, sm_scale, num_warps, num_stages)


@torch.library.custom_op("quantduo::fp8_attention_on_codes", mutates_args=())
def _attention_on_codes_op(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, sq: torch.Tensor, sk: torch.Tensor,
                           sv: torch.Tensor, s_q: int, s_kv: int, dtype: torch.dtype, sm_scale: float) -> torch.Tensor:
    """:func:`attention_on_codes` as one opaque op for compiled graphs."""
    return attention_on_codes((q8, k8, v8, sq, sk, sv), s_q, s_kv, dtype, sm_scale)


@_attention_on_codes_op.register_fake
def _attention_on_codes_shape(q8, k8, v8, sq, sk, sv, s_q, s_kv, dtype, sm_scale):
    b, h, _, d = q8.shape
    return q8.new_empty(b, s_q, h, d, dtype=dtype).transpose(1, 2)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                  block_m: int = DEFAULT_Q_BLOCK, block_n: int = DEFAULT_KV_BLOCK) -> torch.Tensor:
    """FP8 attention of q ``[B, H, Sq, D]`` over k, v ``[B, H, Skv, D]`` (16/32-bit, any strides; D a power of two
    >= 16): ``[B, H, Sq, D]`` in q's dtype. Semantics of
    :func:`~quantduo.formats.attention_fp8.fp8_attention_reference` with ``q_block = block_m``,
    ``kv_block = block_n``. Triton on CUDA (and under the interpreter); ``sm_scale`` defaults to ``1 / sqrt(D)``."""
    check_attention_inputs(q, k, v)
    _check_kernel_inputs(q, block_m, block_n)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if torch.compiler.is_compiling():  # the quantization as graph operations, fused into q / k / v's producers
        operands = graph_operands(q, k, v, block_m, block_n)
        return _attention_on_codes_op(*operands, q.shape[2], k.shape[2], q.dtype, sm_scale)
    return fp8_attention_launch(q, k, v, sm_scale, block_m, block_n)
