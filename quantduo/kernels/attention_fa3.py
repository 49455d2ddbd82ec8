"""FP8 attention by FlashAttention-3's Hopper kernel (``flash_attn_3``, an optional dependency built from source:
see docs/fa3.md), with the quantization semantics of :mod:`quantduo.formats.attention_fp8` at one scale per
(batch, head): ``q_block = kv_block = S``.

FlashAttention-3 takes E4M3 codes with one float32 descale per (batch, KV head) for each of Q, K and V
(:func:`quantduo.formats.attention_fp8.quantize_heads_e4m3`) and quantizes P in the kernel as the reference does
(``e4m3(p * 256)`` against the running row max), so its reference is
:func:`quantduo.formats.attention_fp8.fp8_attention_heads_reference` (up to its key block walk and float32 summation
order).

A static ``bound`` on a tensor's magnitude (e.g. Q and K right after an RMSNorm and a rotary embedding, see
:func:`quantduo.integrations.fp8_attention.norm_bounds`) replaces its per-head absmax: the scale is then
``bound / 448`` for every head, and the quantization is a pointwise operation that ``torch.compile`` fuses into the
producer of the tensor instead of a reduction over the whole sequence followed by a second pass. E4M3 is a floating
point format, so a looser scale costs no precision until values fall below its normal range (``bound / 2**15``).

Under ``torch.compile`` the quantization stays PyTorch operations and the attention is one opaque operator
(``quantduo::fa3_fp8_attention_on_codes``).
"""
from __future__ import annotations

import torch

from quantduo.formats.attention_fp8 import attention_on_head_codes, check_attention_inputs, quantize_heads_e4m3

from .head_quant_fp8 import quantize_token_heads_e4m3

try:
    from flash_attn_interface import flash_attn_func
except ImportError:  # FlashAttention-3 not installed: FA3_AVAILABLE is False
    flash_attn_func = None

__all__ = ["FA3_AVAILABLE", "FA3_HEAD_DIMS", "fa3_attention_on_codes", "fa3_fp8_attention", "fa3_operands",
           "fa3_unavailable_reason"]

FA3_AVAILABLE = flash_attn_func is not None
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)  # head dims FlashAttention-3's Hopper build instantiates
REFERENCE_KV_BLOCK = 128  # keys per block of the reference's walk (FlashAttention-3's key tile at head dim 128)


def fa3_unavailable_reason(q: torch.Tensor, head_dim: int | None = None) -> str | None:
    """Why FlashAttention-3's fp8 kernel cannot run on ``q`` ``[B, H, S, D]`` (None when it can); ``head_dim``:
    the head dim to check instead of ``D`` (for ``q`` on the right device but not yet split into heads)."""
    head_dim = q.shape[-1] if head_dim is None else head_dim
    if not FA3_AVAILABLE:
        return "flash_attn_3 (FlashAttention-3) is not importable: build it from source, see docs/fa3.md"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return f"FlashAttention-3's fp8 kernel runs on Hopper (sm_90) GPUs only, not on {q.device}"
    if head_dim not in FA3_HEAD_DIMS:
        return f"head dim {head_dim} is not one of FlashAttention-3's {FA3_HEAD_DIMS}"
    return None


def fa3_operands(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_bound: float | None = None,
                 k_bound: float | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """FlashAttention-3's fp8 operands of q, k, v ``[B, H, S, D]``: ``(codes, descale)`` per tensor, codes
    float8_e4m3fn ``[B, S, H, D]`` (a view with the last dim contiguous, as FlashAttention-3 reads it), descale
    float32 ``[B, H]`` (:func:`~quantduo.formats.attention_fp8.quantize_heads_e4m3`; V always by its absmax, on
    CUDA by :func:`.head_quant_fp8.quantize_token_heads_e4m3`)."""
    operands = (quantize_heads_e4m3(q, q_bound), quantize_heads_e4m3(k, k_bound))
    qk = tuple((codes.transpose(1, 2), scale.contiguous()) for codes, scale in operands)
    if v.is_cuda and v.stride(-1) == 1:
        return (*qk, quantize_token_heads_e4m3(v.transpose(1, 2)))
    v8, v_scale = quantize_heads_e4m3(v)
    return (*qk, (v8.transpose(1, 2), v_scale.contiguous()))


def fa3_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                      q_bound: float | None = None, k_bound: float | None = None) -> torch.Tensor:
    """FP8 attention of q ``[B, H, Sq, D]`` over k, v ``[B, H, Skv, D]`` (no mask, not causal) by FlashAttention-3:
    ``[B, H, Sq, D]`` in q's dtype (bf16 / fp16), a transposed view of a ``[B, Sq, H, D]`` buffer. ``q_bound`` /
    ``k_bound``: static magnitude bounds of q / k (see :func:`quantize_heads_e4m3`). ValueError where
    :func:`fa3_unavailable_reason` names a reason."""
    check_attention_inputs(q, k, v)
    reason = fa3_unavailable_reason(q)
    if reason is not None:
        raise ValueError(reason)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return fa3_attention_on_codes(fa3_operands(q, k, v, q_bound, k_bound), scale).to(q.dtype)


def fa3_attention_on_codes(operands: tuple[tuple[torch.Tensor, torch.Tensor], ...], sm_scale: float
                           ) -> torch.Tensor:
    """FlashAttention-3's fp8 forward on :func:`fa3_operands`' output: bf16 ``[B, H, Sq, D]``, a transposed view of
    a ``[B, Sq, H, D]`` buffer. Off CUDA its reference (:func:`attention_on_head_codes`, keys walked in blocks of
    128)."""
    (q8, dq), (k8, dk), (v8, dv) = operands
    if not q8.is_cuda:
        out = attention_on_head_codes(q8.transpose(1, 2), dq, k8.transpose(1, 2), dk, v8.transpose(1, 2), dv, sm_scale,
                                      REFERENCE_KV_BLOCK, torch.bfloat16)
        return out.transpose(1, 2).contiguous().transpose(1, 2)
    return _fa3_on_codes(q8, k8, v8, dq, dk, dv, sm_scale).transpose(1, 2)


@torch.library.custom_op("quantduo::fa3_fp8_attention_on_codes", mutates_args=())
def _fa3_on_codes(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                  dv: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """FlashAttention-3's fp8 forward on :func:`fa3_operands`' output: bf16 ``[B, Sq, H, D]``. One opaque operator
    for compiled graphs (Dynamo does not trace FlashAttention-3's Python wrapper)."""
    out = flash_attn_func(q8, k8, v8, softmax_scale=sm_scale, causal=False, q_descale=dq, k_descale=dk, v_descale=dv)
    return out[0] if isinstance(out, tuple) else out


@_fa3_on_codes.register_fake
def _fa3_on_codes_shape(q8, k8, v8, dq, dk, dv, sm_scale):
    return q8.new_empty(q8.shape, dtype=torch.bfloat16)
