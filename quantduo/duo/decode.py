"""One-token decode steps captured in a CUDA graph (run eagerly elsewhere), for full attention and
DuoAttention alike, so per-token Python / kernel-launch overhead is out of the comparison.

The step is ``model.model`` + ``lm_head`` on static input buffers (token id, position id). The
cache must be static: a transformers ``StaticCache`` (SDPA path; the step then passes a 4-D
validity mask built on the device from the position) or a ``DuoCache(static=True)``.
"""
from __future__ import annotations

import torch
from transformers import StaticCache

from quantduo.duo.cache import DuoCache
from quantduo.duo.compat import cache_kwargs


def decode_state(cache) -> list[torch.Tensor]:
    """Tensors a decode step of ``cache`` overwrites in place (saved around graph warm-up steps)."""
    if isinstance(cache, DuoCache):
        return cache.decode_state()
    if isinstance(cache, StaticCache):
        return [layer.cumulative_length for layer in cache.layers]
    raise TypeError(f"graph decoding needs a StaticCache or a static DuoCache, got {type(cache).__name__}")


class GraphedDecoder:
    """Greedy-agnostic decode step: ``logits = decoder(token_ids)``, token_ids [B, 1] int64 -> [B, vocab] (B: the
    prefilled DuoCache's batch, else 1). Position ids are the batch's slots (left-padded rows of a DuoCache keep
    their own sinks and windows; RoPE only sees relative positions).

    ``position``: absolute position of the first token to decode (the cache holds ``position``
    tokens). ``use_graph`` (default: on CUDA) captures the step once, after ``warmup`` eager
    steps whose cache writes are undone; each call then is one graph replay. The returned logits
    tensor is overwritten by the next call. After graph replays the cache's Python-side length
    is stale: the decoder owns the cache.
    """

    def __init__(self, model, cache, position: int, use_graph: bool | None = None, warmup: int = 2):
        dev = model.device
        if isinstance(cache, DuoCache) and not all(layer.static for layer in cache.layers):
            raise ValueError("graph decoding needs DuoCache(static=True)")
        self.model, self.cache = model, cache
        batch = cache.layers[0].batch if isinstance(cache, DuoCache) and cache.layers[0].is_initialized else 1
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.full((1, 1), position, dtype=torch.long, device=dev)
        self.key_pos = (torch.arange(cache.layers[0].max_cache_len, device=dev)
                        if isinstance(cache, StaticCache) else None)
        self.graph = None
        if dev.type == "cuda" if use_graph is None else use_graph:
            self._capture(warmup)

    def _step(self) -> torch.Tensor:
        mask = None if self.key_pos is None else (self.key_pos <= self.pos[0, 0]).view(1, 1, 1, -1)
        out = self.model.model(input_ids=self.token, position_ids=self.pos, attention_mask=mask, use_cache=True,
                               **cache_kwargs(self.model.model, self.cache))
        self.pos.add_(1)
        return self.model.lm_head(out.last_hidden_state[:, -1])

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        saved = [t.clone() for t in [self.pos, *decode_state(self.cache)]]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()
        for t, s in zip([self.pos, *decode_state(self.cache)], saved):
            t.copy_(s)

    @torch.no_grad()
    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token_ids)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits
