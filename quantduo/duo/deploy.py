"""Deploy DuoAttention on transformers decoders (:mod:`quantduo.duo.layout`: Llama, Mistral, Qwen2/3, Gemma 2/3,
Phi-3).

:func:`apply_duo` reorders every layer's heads so that retrieval KV heads (and their query
groups) come first, records the split, and switches the model to the "duo" attention function
registered here, which computes the reference implementation's semantics (:mod:`quantduo.duo.cache`): the first
chunk dense for every head; later chunks and decode steps give streaming heads the sinks, the last ``recent``
tokens before the chunk and the chunk itself. ``model.generate`` builds a :class:`DuoCache` when given no cache;
a forward without a cache is one dense first chunk; a transformers cache holding every token (e.g. DynamicCache)
gives the same results without the memory saving. The model's sliding window is ignored on DuoAttention layers,
as the reference does, unless ``respect_sliding_window`` (:mod:`quantduo.duo.layout`). Left-padded batches, applied
sliding windows and soft-capping run the masked path (:func:`quantduo.duo.attention.visible_mask`); other paths are
unchanged.
"""
from __future__ import annotations

import types
from functools import partial

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface

from quantduo.duo import attention as A
from quantduo.duo.cache import DuoCache, DuoKV, window_positions
from quantduo.duo.compat import cache_argument, cache_kwargs
from quantduo.duo.layout import attention_modules, duo_layers, keeps_window, layer_window, mark_windows
from quantduo.duo.masks import duo_mask_function, padding_of
from quantduo.duo.patterns import DuoPattern
from quantduo.formats.kv import QuantizedKV, dequantize_kv


def _permute_rows(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> None:
    linear.weight.data = linear.weight.data.index_select(dim, index.to(linear.weight.device))
    if dim == 0 and linear.bias is not None:
        linear.bias.data = linear.bias.data.index_select(0, index.to(linear.bias.device))


def reorder_heads(attn: torch.nn.Module, kv_order: torch.Tensor) -> None:
    """Permute KV heads of one attention module in place (new head i = old head kv_order[i]).

    Rows of k_proj/v_proj move by KV head, rows of q_proj and columns of o_proj by the query groups of those KV
    heads, so the module computes exactly the same function. A fused ``qkv_proj`` (Phi-3: rows [q | k | v]) has
    each of its three row blocks permuted the same way.
    """
    d = attn.head_dim
    rep = attn.num_key_value_groups
    kv_rows = (kv_order[:, None] * d + torch.arange(d)).reshape(-1)
    q_heads = (kv_order[:, None] * rep + torch.arange(rep)).reshape(-1)
    q_rows = (q_heads[:, None] * d + torch.arange(d)).reshape(-1)
    if hasattr(attn, "qkv_proj"):
        nq, nkv = len(q_rows), len(kv_rows)
        _permute_rows(attn.qkv_proj, torch.cat([q_rows, nq + kv_rows, nq + nkv + kv_rows]), 0)
    else:
        _permute_rows(attn.k_proj, kv_rows, 0)
        _permute_rows(attn.v_proj, kv_rows, 0)
        _permute_rows(attn.q_proj, q_rows, 0)
    _permute_rows(attn.o_proj, q_rows, 1)


WINDOWS = ("chunk", "token")


def apply_duo(model, retrieval: np.ndarray, sink: int, recent: int, window: str = "chunk",
              respect_sliding_window: bool = False):
    """Prepare ``model`` (in place) for DuoAttention.

    retrieval: bool [duo layers, kv_heads], True = retrieval (full attention) head, e.g. from
    :meth:`DuoPattern.binarize`; one row per layer of :func:`~quantduo.duo.layout.duo_layers` (the global layers
    of a model mixing sliding-window layers; their sliding layers keep every head full). ``window``: the streaming
    heads' rule: ``"chunk"`` (the reference implementation's, the default: module docstring) or ``"token"`` (every
    query sees the sinks and the last ``recent`` tokens up to itself, the identification window; an evaluation
    option computed by the masked path with dynamic caches only). ``respect_sliding_window``: apply the model's
    sliding window on DuoAttention layers (default: ignored, as the reference; :mod:`quantduo.duo.layout`).
    Returns the model. Can be applied once per model.
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    mods = attention_modules(model)
    layers = duo_layers(model.config)
    retrieval = np.asarray(retrieval)
    n_kv = model.config.num_key_value_heads
    if retrieval.shape != (len(layers), n_kv) or retrieval.dtype != bool:
        raise ValueError(f"retrieval mask must be bool of shape {(len(layers), n_kv)} (DuoAttention layers, KV "
                         f"heads), got {retrieval.dtype} {retrieval.shape}")
    if any(hasattr(m, "duo_n_full") for m in mods):
        raise ValueError("apply_duo was already applied to this model")
    every = np.ones((len(mods), n_kv), bool)
    every[layers] = retrieval
    for attn, row in zip(mods, every):
        reorder_heads(attn, torch.as_tensor(np.argsort(~row, kind="stable")))
        attn.duo_n_full, attn.duo_sink, attn.duo_recent, attn.duo_window = int(row.sum()), sink, recent, window
    mark_windows(model, respect_sliding_window)
    model.config._attn_implementation = "duo"
    model._prepare_cache_for_generation = types.MethodType(_prepare_duo_cache, model)
    applied = any(keeps_window(model.config, respect_sliding_window))
    window = getattr(model.config, "sliding_window", None) if applied else None
    model.model.register_forward_pre_hook(partial(_padding_hook, window), with_kwargs=True)
    return model


def _padding_hook(window: int | None, module, args, kwargs) -> None:
    """Forward pre-hook of the base model: tell a DuoCache the left padding of ``attention_mask`` before any layer
    writes to it (:meth:`DuoCache.set_padding`; ``window``: the model's sliding window where some layer applies
    it, else None); refuse a transformers cache that does not hold every token of every layer (sliding-window or
    static layers), which the "duo" attention would misread."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if isinstance(cache, Cache) and not isinstance(cache, DuoCache):
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            raise ValueError("a DuoAttention model needs a DuoCache (generate() builds one) or a DynamicCache of "
                             f"full layers, not {type(cache).__name__} with {type(cache.layers[0]).__name__}")
        return
    if not isinstance(cache, DuoCache) or kwargs.get("attention_mask") is None:
        return  # no mask: the padding recorded so far holds
    new = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    q_len = new.shape[1] if new is not None else 0
    cache.set_padding(padding_of(kwargs.get("attention_mask"), q_len, window))


def _prepare_duo_cache(model, generation_config, model_kwargs: dict, *args, **kwargs):
    """``generate``'s cache preparation for a DuoAttention model: a :class:`DuoCache` unless the caller passed a
    cache (or ``use_cache=False`` / a ``cache_implementation``), then transformers' own preparation."""
    name = cache_argument(type(model))
    wants_default = (model_kwargs.get(name) is None and generation_config.use_cache is not False
                     and generation_config.cache_implementation is None)
    if wants_default:
        model_kwargs[name] = DuoCache.from_model(model)
    return type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)


def apply_pattern(model, pattern: DuoPattern, sparsity: float, sink: int | None = None,
                  recent: int | None = None, respect_sliding_window: bool = False):
    """:func:`apply_duo` from a gate pattern binarized at ``sparsity`` (fraction of streaming heads)."""
    pattern.validate_for(model.config)
    return apply_duo(model, pattern.binarize(sparsity), sink if sink is not None else pattern.sink_size,
                     recent if recent is not None else pattern.recent_size,
                     respect_sliding_window=respect_sliding_window)


def _plain_kv(module, key: torch.Tensor, value: torch.Tensor, tq: int, masked: bool) -> DuoKV:
    """DuoKV of plain key/value [B, Hkv, Tk, D] holding every token (no cache: Tk == tq, or a transformers cache).
    Fast path: the streaming heads' window keys selected by position; ``masked``: every key, with its position."""
    nf, start, tk = module.duo_n_full, key.shape[2] - tq, key.shape[2]
    if masked:
        pos = torch.arange(tk, device=key.device)[None]
        return DuoKV(key[:, :nf], value[:, :nf], key[:, nf:], value[:, nf:], pos, start)
    idx = torch.tensor(window_positions(start, module.duo_sink, module.duo_recent) + list(range(start, tk)),
                       device=key.device)
    ks, vs = key[:, nf:].index_select(2, idx), value[:, nf:].index_select(2, idx)
    return DuoKV(key[:, :nf], value[:, :nf], ks, vs, None, start)


def _row_padding(attention_mask, key, tq: int, window: int | None) -> torch.Tensor | None:
    """Left padding int64 [B] of this forward (the DuoCache's, else the mask's), or None."""
    pad = padding_of(attention_mask, tq, window)
    if isinstance(key, DuoKV):
        if pad is not None and key.pad is None:
            raise ValueError("the DuoCache was not told the padding: call the model (not its layers) with "
                             "attention_mask")
        return key.pad
    return pad


def _fast_group(q, kv: DuoKV, full: bool, scaling: float) -> torch.Tensor:
    """Unpadded, unwindowed attention of one head group (full: retrieval heads); q [B, Hq', Tq, D]."""
    if full:
        return (A.decode(q, kv.full_k, kv.full_v, scaling, kv.length) if kv.decoding
                else A.full_prefill(q, kv.full_k, kv.full_v, kv.q_start, scaling))
    if kv.decoding:
        return A.decode(q, kv.stream_k, kv.stream_v, scaling, kv.length,
                        kv.stream_pos if kv.length is not None else None)
    return A.full_prefill(q, kv.stream_k, kv.stream_v, kv.stream_start, scaling)


def _dense(x) -> torch.Tensor:
    return dequantize_kv(x, torch.float16) if isinstance(x, QuantizedKV) else x


def _group_keys(module, kv: DuoKV, full: bool, tq: int):
    """(keys, values, slot positions int64 [B | 1, Tk]) of one head group for the masked path."""
    if full:
        k, v = kv.full_k, kv.full_v
        tk = (k.codes if isinstance(k, QuantizedKV) else k).shape[2]
        pos = kv.full_pos if kv.full_pos is not None else torch.arange(tk, device=kv.stream_k.device)[None]
        return k, v, pos
    pos = kv.stream_pos
    if pos is None:  # unpadded prefill, fast layout: window keys then the chunk
        pos = torch.tensor(window_positions(kv.q_start, module.duo_sink, module.duo_recent)
                           + list(range(kv.q_start, kv.q_start + tq)), device=kv.stream_k.device)[None]
    return kv.stream_k, kv.stream_v, pos


def _masked_group(module, q, kv: DuoKV, full: bool, pad, scaling, window, softcap) -> torch.Tensor:
    """Attention of one head group on explicit slot positions (padding, sliding window, soft-capping)."""
    k, v, pos = _group_keys(module, kv, full, q.shape[2])
    token_window = not full and module.duo_window == "token"
    if kv.decoding:
        if kv.length is not None and (window is not None or softcap is not None or token_window):
            raise ValueError("a static DuoCache does not support sliding-window, soft-capped or per-token-window "
                             "attention")
        if window is not None:
            pos = torch.where(kv.q_start - pos < window, pos, -1)
        if token_window:
            sinks = pos < pad[:, None] + module.duo_sink
            pos = torch.where(sinks | (kv.q_start - pos < module.duo_recent), pos, -1)
        if softcap is None:
            return A.decode(q, k, v, scaling, kv.length, pos)
        return A.masked_attention(q, _dense(k).to(q.dtype), _dense(v).to(q.dtype), (pos >= 0)[:, None, None, :],
                                  scaling, softcap)
    q_pos = torch.arange(kv.q_start, kv.q_start + q.shape[2], device=q.device)
    stream = None if full else (module.duo_sink, module.duo_recent, kv.q_start, token_window)
    return A.masked_attention(q, k, v, A.visible_mask(q_pos, pos, pad, window, stream), scaling, softcap)


def duo_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          sliding_window=None, softcap=None, **kwargs):
    """transformers attention function "duo"; query [B, Hq, T, D]; key/value a DuoKV (from DuoCache)
    or plain [B, Hkv, Tk, D] tensors holding every token. The head split comes from the DuoKV (a DuoCache
    may hold every head in full). ``sliding_window``: the layer's, applied as transformers does where
    :func:`~quantduo.duo.layout.layer_window` keeps it; ``softcap``: the layer's (Gemma 2), honoured. Masks: see
    :mod:`quantduo.duo.masks` (left padding honoured, others refused). Returns ([B, T, Hq, D], None)."""
    tq = query.shape[2]
    sliding_window = layer_window(module, sliding_window)
    pad = _row_padding(attention_mask, key, tq, sliding_window)
    masked = pad is not None or sliding_window is not None or softcap is not None or module.duo_window == "token"
    kv = key if isinstance(key, DuoKV) else _plain_kv(module, key, value, tq, masked)
    if pad is None:
        pad = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    scaling = module.scaling if scaling is None else scaling
    nq_full = kv.n_full * module.num_key_value_groups
    b, hq, t, d = query.shape
    out = query.new_empty(b, t, hq, d)  # each head group writes its slice (one copy, no cat)
    for full, heads in ((True, slice(0, nq_full)), (False, slice(nq_full, hq))):
        q = query[:, heads]
        if q.shape[1]:
            o = (_masked_group(module, q, kv, full, pad, scaling, sliding_window, softcap) if masked
                 else _fast_group(q, kv, full, scaling))
            out[:, :, heads] = o.transpose(1, 2)
    return out, None


def register_attention(name: str, fn) -> None:
    """Register a transformers attention function ``name`` whose mask function hands over only the left padding
    (:func:`~quantduo.duo.masks.duo_mask_function`)."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, duo_mask_function)


register_attention("duo", duo_attention_forward)


@torch.no_grad()
def chunked_prefill(model, input_ids: torch.Tensor, cache, chunk_size: int,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ``input_ids`` [B, T] into ``cache`` (a DuoCache) ``chunk_size`` tokens at a time, so
    activations stay O(chunk) and streaming heads see sink + recent + the current chunk only (the first chunk
    is dense). ``attention_mask`` [B, T] (left padding): each chunk gets its prefix and real tokens their real
    positions (as ``generate``). Returns the logits of the last token [B, vocab]."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    pos = None if attention_mask is None else (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    for start in range(0, input_ids.shape[1], chunk_size):
        end = start + chunk_size
        kw = {} if attention_mask is None else {"attention_mask": attention_mask[:, :end],
                                                "position_ids": pos[:, start:end]}
        out = model.model(input_ids=input_ids[:, start:end], use_cache=True, **cache_kwargs(model.model, cache), **kw)
    return model.lm_head(out.last_hidden_state[:, -1])
