"""Deploy DuoAttention on transformers Llama / Mistral / Qwen2 / Qwen3 models.

:func:`apply_duo` reorders every layer's heads so that retrieval KV heads (and their query
groups) come first, records the split, and switches the model to the "duo" attention function
registered here, which computes the reference implementation's semantics (:mod:`quantduo.duo.cache`): the first
chunk dense for every head; later chunks and decode steps give streaming heads the sinks, the last ``recent``
tokens before the chunk and the chunk itself. ``model.generate`` builds a :class:`DuoCache` when given no cache;
a forward without a cache is one dense first chunk; a transformers cache holding every token (e.g. DynamicCache)
gives the same results without the memory saving.
"""
from __future__ import annotations

import types

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from quantduo.duo import attention as A
from quantduo.duo.cache import DuoCache, DuoKV, window_positions
from quantduo.duo.layout import attention_modules
from quantduo.duo.patterns import DuoPattern


def _permute_rows(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> None:
    linear.weight.data = linear.weight.data.index_select(dim, index.to(linear.weight.device))
    if dim == 0 and linear.bias is not None:
        linear.bias.data = linear.bias.data.index_select(0, index.to(linear.bias.device))


def reorder_heads(attn: torch.nn.Module, kv_order: torch.Tensor) -> None:
    """Permute KV heads of one attention module in place (new head i = old head kv_order[i]).

    Rows of k_proj/v_proj move by KV head, rows of q_proj and columns of o_proj by the query
    groups of those KV heads, so the module computes exactly the same function.
    """
    d = attn.head_dim
    rep = attn.num_key_value_groups
    kv_rows = (kv_order[:, None] * d + torch.arange(d)).reshape(-1)
    q_heads = (kv_order[:, None] * rep + torch.arange(rep)).reshape(-1)
    q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
    _permute_rows(attn.k_proj, kv_rows, 0)
    _permute_rows(attn.v_proj, kv_rows, 0)
    _permute_rows(attn.q_proj, q_rows, 0)
    _permute_rows(attn.o_proj, q_rows, 1)


def apply_duo(model, retrieval: np.ndarray, sink: int, recent: int):
    """Prepare ``model`` (in place) for DuoAttention.

    retrieval: bool [layers, kv_heads], True = retrieval (full attention) head, e.g. from
    :meth:`DuoPattern.binarize`. Returns the model. Can be applied once per model.
    """
    mods = attention_modules(model)
    retrieval = np.asarray(retrieval)
    n_kv = model.config.num_key_value_heads
    if retrieval.shape != (len(mods), n_kv) or retrieval.dtype != bool:
        raise ValueError(f"retrieval mask must be bool of shape {(len(mods), n_kv)}, "
                         f"got {retrieval.dtype} {retrieval.shape}")
    if any(hasattr(m, "duo_n_full") for m in mods):
        raise ValueError("apply_duo was already applied to this model")
    for attn, row in zip(mods, retrieval):
        reorder_heads(attn, torch.as_tensor(np.argsort(~row, kind="stable")))
        attn.duo_n_full, attn.duo_sink, attn.duo_recent = int(row.sum()), sink, recent
    model.config._attn_implementation = "duo"
    model._prepare_cache_for_generation = types.MethodType(_prepare_duo_cache, model)
    return model


def _prepare_duo_cache(model, generation_config, model_kwargs: dict, *args, **kwargs):
    """``generate``'s cache preparation for a DuoAttention model: a :class:`DuoCache` unless the caller passed a
    cache (or ``use_cache=False`` / a ``cache_implementation``), then transformers' own preparation."""
    wants_default = (model_kwargs.get("cache") is None and generation_config.use_cache is not False
                     and generation_config.cache_implementation is None)
    if wants_default:
        model_kwargs["cache"] = DuoCache.from_model(model)
    return type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)


def apply_pattern(model, pattern: DuoPattern, sparsity: float, sink: int | None = None,
                  recent: int | None = None):
    """:func:`apply_duo` from a gate pattern binarized at ``sparsity`` (fraction of streaming heads)."""
    pattern.validate_for(model.config)
    return apply_duo(model, pattern.binarize(sparsity), sink if sink is not None else pattern.sink_size,
                     recent if recent is not None else pattern.recent_size)


def _plain_kv(module, key: torch.Tensor, value: torch.Tensor, tq: int) -> DuoKV:
    """DuoKV of plain key/value [B, Hkv, Tk, D] holding every token (no cache: Tk == tq, or a transformers cache):
    the streaming heads' window keys are selected by position."""
    nf, start = module.duo_n_full, key.shape[2] - tq
    idx = torch.tensor(window_positions(start, module.duo_sink, module.duo_recent) + list(range(start, key.shape[2])),
                       device=key.device)
    ks, vs = key[:, nf:].index_select(2, idx), value[:, nf:].index_select(2, idx)
    return DuoKV(key[:, :nf], value[:, :nf], ks, vs, None, start)


def duo_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function "duo"; query [B, Hq, T, D]; key/value a DuoKV (from DuoCache)
    or plain [B, Hkv, Tk, D] tensors holding every token. The head split comes from the DuoKV (a DuoCache
    may hold every head in full). Returns ([B, T, Hq, D], None). Attention masks are refused: the mask function
    registered with "duo" builds none, so a mask reaching here is a caller's custom (e.g. 4-D) mask."""
    if attention_mask is not None:
        raise ValueError("DuoAttention does not take custom attention masks (it builds its own causal windows)")
    kv = key if isinstance(key, DuoKV) else _plain_kv(module, key, value, query.shape[2])
    scaling = module.scaling if scaling is None else scaling
    nq_full = kv.n_full * module.num_key_value_groups
    qf, qs = query[:, :nq_full], query[:, nq_full:]
    b, hq, t, d = query.shape
    out = query.new_empty(b, t, hq, d)  # each head group writes its slice (one copy, no cat)
    if qf.shape[1]:
        of = (A.decode(qf, kv.full_k, kv.full_v, scaling, kv.length) if kv.decoding
              else A.full_prefill(qf, kv.full_k, kv.full_v, kv.q_start, scaling))
        out[:, :, :nq_full] = of.transpose(1, 2)
    if qs.shape[1]:
        os_ = (A.decode(qs, kv.stream_k, kv.stream_v, scaling, kv.length, kv.stream_pos) if kv.decoding
               else A.full_prefill(qs, kv.stream_k, kv.stream_v, kv.stream_start, scaling))
        out[:, :, nq_full:] = os_.transpose(1, 2)
    return out, None


def _no_mask(*args, attention_mask=None, **kwargs) -> None:
    """Mask function of the DuoAttention implementations: they build their own causal windows.
    Padding is not supported: a 2-D padding mask with any 0 raises ValueError."""
    if torch.is_tensor(attention_mask) and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise ValueError("DuoAttention does not support padded batches (attention_mask has zeros)")
    return None


def register_attention(name: str, fn) -> None:
    """Register a transformers attention function ``name`` that needs no materialized mask."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _no_mask)


register_attention("duo", duo_attention_forward)


@torch.no_grad()
def chunked_prefill(model, input_ids: torch.Tensor, cache, chunk_size: int) -> torch.Tensor:
    """Prefill ``input_ids`` [B, T] into ``cache`` (a DuoCache) ``chunk_size`` tokens at a time, so
    activations stay O(chunk) and streaming heads see sink + recent + the current chunk only (the first chunk
    is dense).
    Returns the logits of the last token [B, vocab]."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, input_ids.shape[1], chunk_size):
        out = model.model(input_ids=input_ids[:, start:start + chunk_size], cache=cache, use_cache=True)
    return model.lm_head(out.last_hidden_state[:, -1])
