"""Training-free retrieval-head identification: score each KV head by how much replacing it with streaming
attention changes its layer's output on synthetic retrieval data.

One forward of the frozen model per batch: in every layer the attention function computes full attention (which
the model goes on with, so later layers see the full model's states) and streaming attention (the
identification window of :mod:`quantduo.duo.attention`) for all heads at once; the score of KV head h is the
squared norm of ``o_proj`` applied to (streaming - full) of h's query heads, summed over the target tokens (the
question / answer section), divided by the squared norm of the layer's full attention output there, so layers
are comparable. The scores, divided by their maximum, are a :class:`DuoPattern` (1 = most retrieval-like) that
:func:`~quantduo.duo.patterns.binarize` cuts like trained gates.
"""
from __future__ import annotations

from typing import Iterable

import torch

from quantduo.duo.attention import gated_attention, streaming_attention
from quantduo.duo.deploy import register_attention
from quantduo.duo.identify import Batch, attn_implementation
from quantduo.duo.layout import attention_modules, duo_layers, layer_window, mark_windows
from quantduo.duo.patterns import DuoPattern


def _head_deltas(module, full: torch.Tensor, stream: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per KV head squared output change float32 [Hkv], relative to the layer output's squared norm.
    full/stream [B, Hq, T, D]; target bool [B, T]."""
    hkv = module.config.num_key_value_heads
    b, hq, t, d = full.shape
    w = module.o_proj.weight.float().view(-1, hkv, hq // hkv * d)  # [hidden, Hkv, rep * D]
    delta = (stream - full).float().transpose(1, 2)[target].view(-1, hkv, hq // hkv * d)  # [N, Hkv, rep * D]
    change = torch.einsum("nhc,ohc->nho", delta, w).square().sum((0, 2))
    ref = module.o_proj(full.transpose(1, 2)[target].reshape(-1, hq * d)).float().square().sum()
    return change / ref.clamp_min(1e-30)


def scoring_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                              sliding_window=None, softcap=None, **kwargs):
    """transformers attention function "duo_score" (no cache, no padding): returns full causal attention
    [B, T, Hq, D] and, on DuoAttention layers, adds the per-KV-head streaming deltas of this batch to
    ``module.duo_scores`` [Hkv]. The layer's sliding window applies where :func:`~quantduo.duo.layout.layer_window`
    keeps it."""
    if attention_mask is not None:
        raise ValueError("head scoring takes batches without padding or custom attention masks")
    scaling = module.scaling if scaling is None else scaling
    sliding_window = layer_window(module, sliding_window)
    args = (module.duo_sink, module.duo_recent, scaling, module.duo_chunk, False, module.duo_block, sliding_window,
            softcap)
    full = gated_attention(query, key, value, None, *args)
    if hasattr(module, "duo_scores"):
        stream = (streaming_attention(query, key, value, module.duo_sink, module.duo_recent, scaling, module.duo_chunk,
                                      module.duo_block, sliding_window) if softcap is None
                  else gated_attention(query, key, value, query.new_zeros(key.shape[1]), *args))
        module.duo_scores += _head_deltas(module, full, stream, module.duo_target)
    return full.transpose(1, 2).contiguous(), None


register_attention("duo_score", scoring_attention_forward)


@torch.no_grad()
def score_heads(model, batches: Iterable[Batch], sink: int, recent: int, chunk: int = 1024,
                block: int | None = None, respect_sliding_window: bool = False) -> DuoPattern:
    """Training-free gates [DuoAttention layers, kv_heads] in [0, 1] from (input_ids [B, T], target_mask [B, T] bool) batches
    on the model's device (module docstring); ``respect_sliding_window``: apply the model's sliding window on
    DuoAttention layers (default: ignored, as the reference; :mod:`quantduo.duo.layout`)."""
    mods, layers = attention_modules(model), duo_layers(model.config)
    for i in layers:
        mods[i].duo_scores = torch.zeros(model.config.num_key_value_heads, device=model.device)
    for m in mods:
        m.duo_sink, m.duo_recent, m.duo_chunk, m.duo_block = sink, recent, chunk, block
    mark_windows(model, respect_sliding_window)
    try:
        with attn_implementation(model, "duo_score"):
            for ids, target in batches:
                for m in mods:
                    m.duo_target = target
                model.model(input_ids=ids, use_cache=False)
        scores = torch.stack([mods[i].duo_scores for i in layers]).cpu().numpy()
    finally:
        for m in mods:
            for name in ("duo_scores", "duo_chunk", "duo_block", "duo_target"):
                if hasattr(m, name):
                    delattr(m, name)
            if not hasattr(m, "duo_n_full"):
                del m.duo_sink, m.duo_recent, m.duo_keep_window
    return DuoPattern(scores / max(scores.max(), 1e-30), sink, recent,
                      {"identification": "streaming-delta score", "streaming_attn_implementation":
                       "sdpa" if block is None else f"blocksparse{block}"})
