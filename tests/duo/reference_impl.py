"""A plain re-statement of the reference DuoAttention deployment rules (mit-han-lab/duo-attention), written from
the documented rules only (shared/notes/duo-upstream-semantics.md), independent of quantduo.duo's code:

* a chunk of queries at positions s..s+T-1 (a one-shot prefill: s = 0; a decode step: T = 1);
* retrieval head: query p sees every key kp <= p;
* streaming head: query p sees kp <= p with s == 0 (first chunk dense), or kp < sink, or kp >= s - recent;
* the per-token window option: a streaming query p sees kp <= p with kp < sink or p - kp < recent, in every chunk;
* a layer with a sliding window W (transformers' rule) shows only p - kp < W to every head, where that layer is
  told to apply it (the reference itself never applies a model's sliding window on its DuoAttention layers:
  its patches call flash attention causal without a window); a soft-capped layer (Gemma 2) soft-caps the scores
  first.

The model keeps its original head order; the streaming heads are given by a bool mask [layers, kv_heads]. The
chunks go through a transformers DynamicCache, so keys of every past token are at hand and the rule is a mask.
"""
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from quantduo.duo.compat import cache_kwargs


def visible(p: int, kp: int, s: int, streaming: bool, sink: int, recent: int, window: int | None = None,
            per_token: bool = False) -> bool:
    """Whether query position p of a chunk starting at s sees key position kp."""
    if kp > p or (window is not None and p - kp >= window):
        return False
    if per_token:
        return not streaming or kp < sink or p - kp < recent
    return not streaming or s == 0 or kp < sink or kp >= s - recent


def _reference_attention(module, query, key, value, attention_mask=None, scaling=None, sliding_window=None,
                         softcap=None, **kwargs):
    tq, tk = query.shape[2], key.shape[2]
    s = tk - tq
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1).double(), value.repeat_interleave(rep, 1).double()
    scores = (query.double() @ k.transpose(-1, -2)) * (module.scaling if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    window = sliding_window if module.ref_windowed else None
    mask = torch.tensor([[[visible(s + i, j, s, bool(module.ref_streaming[h // rep]), module.ref_sink,
                                   module.ref_recent, window, module.ref_per_token) for j in range(tk)] for i in range(tq)]
                         for h in range(query.shape[1])])
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("duo_reference_test", _reference_attention)
AttentionMaskInterface.register("duo_reference_test", lambda *a, **k: None)


@torch.no_grad()
def reference_logits(model, retrieval, sink: int, recent: int, ids: torch.Tensor, chunks: list[int],
                     per_token: bool = False, windowed: list[bool] | None = None) -> torch.Tensor:
    """Logits [B, T, vocab] of ``model`` (original head order; retrieval bool [L, H_kv], every layer) on ``ids``
    [B, T] fed as consecutive chunks of the given sizes (sum = T; size-1 chunks are decode steps). The cache holds
    every token of every layer (no sliding-window cache layers). ``windowed``: per layer, whether it applies its
    sliding window (None: every layer, transformers' rule)."""
    assert sum(chunks) == ids.shape[1]
    windowed = [True] * len(retrieval) if windowed is None else windowed
    for attn, row, win in zip((layer.self_attn for layer in model.model.layers), retrieval, windowed):
        attn.ref_streaming, attn.ref_sink, attn.ref_recent = [not r for r in row], sink, recent
        attn.ref_per_token, attn.ref_windowed = per_token, win
    old = model.config._attn_implementation
    model.config._attn_implementation = "duo_reference_test"
    try:
        cache, outs, start = DynamicCache(), [], 0
        for n in chunks:
            outs.append(model(ids[:, start:start + n], use_cache=True, **cache_kwargs(model, cache)).logits)
            start += n
    finally:
        model.config._attn_implementation = old
    return torch.cat(outs, 1)
