"""diffusers' FLUX attention (``FluxAttnProcessor``) with FlashAttention-3's fp8 kernel, Q and K prepared in one pass.

The FP8-attention wrapper (:mod:`quantduo.integrations.fp8_attention`) runs a processor unchanged and quantizes what
reaches SDPA. For FLUX with the ``"fa3"`` backend that leaves the per-head RMSNorms, the text + image
concatenation, the rotary embedding and the quantization of Q and K to the compiler, which makes two to three
passes over them. :func:`flux_fa3_attention` computes the same as ``FluxAttnProcessor`` (diffusers 0.42: projections
by diffusers' own helper, the same norms, concatenation order, rotary embedding, attention and output projections),
with Q / K quantized by their static bounds straight from the projections
(:func:`quantduo.kernels.qk_norm_rope.rms_norm_rope_e4m3`; reference
:func:`quantduo.formats.attention_fp8.rms_norm_rope_e4m3_ref` off the kernels) and V by its per-head absmax, both
streams read in place (:func:`quantduo.kernels.head_quant_fp8.quantize_token_heads_e4m3`; reference
:func:`quantduo.formats.attention_fp8.quantize_token_heads_e4m3_ref`).

:func:`serves` says which calls it takes: the plain ``FluxAttnProcessor`` (no attention backend or context
parallelism set on it, no mask), head dims FlashAttention-3 has that are powers of two (64, 128, 256), bounds known,
per-head norms of one kind (PyTorch's ``torch.nn.RMSNorm``, what diffusers' FLUX uses, or diffusers' ``RMSNorm``:
the kernel keeps each one's roundings) with weights in the activations' dtype and one ``eps`` for a call.
"""
from __future__ import annotations

import torch
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm
from diffusers.models.transformers import transformer_flux

from quantduo.engine.linear import kernels_for
from quantduo.formats.attention_fp8 import E4M3_MAX, quantize_token_heads_e4m3_ref, rms_norm_rope_e4m3_ref
from quantduo.kernels.attention_fa3 import FA3_HEAD_DIMS, fa3_attention_on_codes, fa3_unavailable_reason
from quantduo.kernels.head_quant_fp8 import quantize_token_heads_e4m3
from quantduo.kernels.qk_norm_rope import rms_norm_rope_e4m3

__all__ = ["flux_fa3_attention", "serves"]

FLUX_PROCESSOR = getattr(transformer_flux, "FluxAttnProcessor", None)  # diffusers >= 0.35
# the per-head norms the Q / K kernel reproduces: PyTorch's (FLUX's attention since diffusers 0.35) and diffusers' own
# (older FLUX attention, other models), whose roundings differ (quantduo.kernels.qk_norm_rope)
RMS_NORMS = (torch.nn.RMSNorm, DiffusersRMSNorm)


def _norms(attn, joint: bool, which: str) -> list:
    """``[norm_added_<which>, norm_<which>]`` for a joint call (text rows first), ``[norm_<which>]`` otherwise."""
    return [getattr(attn, f"norm_added_{which}"), getattr(attn, f"norm_{which}")] if joint else \
        [getattr(attn, f"norm_{which}")]


def serves(processor, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
           attention_mask: torch.Tensor | None, bounds: tuple[float, float] | None) -> bool:
    """Whether :func:`flux_fa3_attention` computes this call of ``processor`` (see the module docstring)."""
    if FLUX_PROCESSOR is None or type(processor) is not FLUX_PROCESSOR or bounds is None or attention_mask is not None:
        return False
    if processor._attention_backend is not None or processor._parallel_config is not None:
        return False
    head_dim = attn.head_dim
    if head_dim not in FA3_HEAD_DIMS or head_dim & (head_dim - 1):  # the Q / K kernel takes powers of two
        return False
    if hidden_states.is_cuda and fa3_unavailable_reason(hidden_states, head_dim):
        return False
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    norms = _norms(attn, joint, "q") + _norms(attn, joint, "k")
    if len({type(n) for n in norms}) != 1 or type(norms[0]) not in RMS_NORMS:
        return False
    return (all(getattr(n, "weight", None) is not None and n.weight.dtype == hidden_states.dtype for n in norms)
            and len({n.eps for n in norms}) == 1 and norms[0].eps is not None)


def _qk_codes(parts: list[torch.Tensor], norms: list, bound: float, rotary) -> torch.Tensor:
    """E4M3 codes ``[B, S, H, D]`` of the normalized, concatenated, rotated ``parts`` (kernel or reference)."""
    cos, sin = (None, None) if rotary is None else rotary
    kwargs = dict(cos=cos, sin=sin)
    if len(parts) == 2:
        kwargs.update(x1=parts[1], w1=norms[1].weight)
    prepare = rms_norm_rope_e4m3 if kernels_for(parts[0]) else rms_norm_rope_e4m3_ref
    return prepare(parts[0], norms[0].weight, norms[0].eps, bound,
                   round_before_weight=isinstance(norms[0], DiffusersRMSNorm), **kwargs)


def flux_fa3_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                       image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None, bounds: tuple[float, float]):
    """``FluxAttnProcessor()(attn, hidden_states, encoder_hidden_states, image_rotary_emb=...)`` with FP8 attention
    by FlashAttention-3 (its reference off CUDA): ``hidden_states`` ``[B, S, C]`` (and the text stream's), returns
    what the processor returns (``(hidden_states, encoder_hidden_states)`` for a joint call)."""
    query, key, value, enc_query, enc_key, enc_value = transformer_flux._get_qkv_projections(
        attn, hidden_states, encoder_hidden_states)
    heads = lambda t: t.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  [B, S, H, D]
    joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
    q_parts, k_parts = ([heads(enc_query), heads(query)], [heads(enc_key), heads(key)]) if joint else \
        ([heads(query)], [heads(key)])
    v_parts = [heads(enc_value), heads(value)] if joint else [heads(value)]
    q8 = _qk_codes(q_parts, _norms(attn, joint, "q"), bounds[0], image_rotary_emb)
    k8 = _qk_codes(k_parts, _norms(attn, joint, "k"), bounds[1], image_rotary_emb)
    quantize_v = quantize_token_heads_e4m3 if kernels_for(v_parts[0]) else quantize_token_heads_e4m3_ref
    v8, v_scale = quantize_v(*v_parts)
    batch, heads_n = q8.shape[0], q8.shape[2]
    scale = lambda bound: torch.full((batch, heads_n), bound / E4M3_MAX, device=q8.device)  # noqa: E731
    operands = ((q8, scale(bounds[0])), (k8, scale(bounds[1])), (v8, v_scale))
    out = fa3_attention_on_codes(operands, attn.head_dim ** -0.5).transpose(1, 2)  # [B, S, H, D]
    out = out.flatten(2, 3).to(hidden_states.dtype)
    if encoder_hidden_states is None:
        return out
    encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                             out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(encoder_out.contiguous())
