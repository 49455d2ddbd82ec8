"""DuoCache: a transformers ``Cache`` with a full KV cache for retrieval heads and a
sink + recent cache for streaming heads (per layer, after head reordering: retrieval KV heads
first, see :mod:`quantduo.duo.deploy`).

``update`` returns a :class:`DuoKV` view (for keys and values alike) that the "duo" attention
function of :mod:`quantduo.duo.deploy` consumes; the memory held is exactly
B * D * (n_full * capacity + n_stream * (sink + recent)) * 2 (K and V) elements per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class DuoKV:
    """What the new queries of one layer may attend to.

    full_k/full_v: [B, n_full, q_start + Tq, D] every key of the retrieval heads.
    stream_k/stream_v: [B, n_stream, S, D] keys of the streaming heads: the cached window before
        this step followed by the Tq new ones (prefill), or the updated window (decode, Tq == 1).
    stream_pos: [S] int64 absolute positions of stream_k (None when every key is visible).
    q_start: absolute position of the first new query.
    """

    full_k: torch.Tensor
    full_v: torch.Tensor
    stream_k: torch.Tensor
    stream_v: torch.Tensor
    stream_pos: torch.Tensor | None
    q_start: int


class DuoLayer(CacheLayerMixin):
    """One layer's cache: n_full retrieval KV heads (full), n_stream streaming KV heads (sink + recent)."""

    def __init__(self, n_full: int, n_stream: int, sink: int, recent: int, max_cache_len: int | None = None):
        super().__init__()
        if n_full < 0 or n_stream < 0 or n_full + n_stream == 0:
            raise ValueError(f"bad head split n_full={n_full}, n_stream={n_stream}")
        self.n_full, self.n_stream, self.sink, self.recent = n_full, n_stream, sink, recent
        self.max_cache_len = max_cache_len
        self.length = 0  # tokens seen
        self.window = 0  # filled streaming slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, t, d = key_states.shape
        kw = dict(dtype=key_states.dtype, device=key_states.device)
        cap = self.max_cache_len or max(t, 256)
        self.keys = torch.zeros(b, self.n_full, cap, d, **kw)
        self.values = torch.zeros_like(self.keys)
        self.stream_keys = torch.zeros(b, self.n_stream, self.sink + self.recent, d, **kw)
        self.stream_values = torch.zeros_like(self.stream_keys)
        self.stream_pos = torch.zeros(self.sink + self.recent, dtype=torch.long, device=key_states.device)
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def _ensure_capacity(self, need: int) -> None:
        cap = self.keys.shape[2]
        if need <= cap:
            return
        if self.max_cache_len is not None:
            raise ValueError(f"DuoCache is full: {need} tokens > max_cache_len={self.max_cache_len}")
        new_cap = max(need, 2 * cap)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def _write_stream(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Keep sink positions and the last ``recent`` positions of the chunk k/v [B, Hs, T, D].

        Index arithmetic uses Python ints only (no host-device synchronisation while decoding).
        """
        t, end = k.shape[2], start + k.shape[2]
        keep = list(range(start, min(end, self.sink))) + list(range(max(start, self.sink, end - self.recent), end))
        if len(keep) == 1:  # decoding: plain slice writes, no index tensors
            p = keep[0]
            slot = p if p < self.sink else self.sink + (p - self.sink) % self.recent
            self.stream_keys[:, :, slot] = k[:, :, p - start]
            self.stream_values[:, :, slot] = v[:, :, p - start]
            self.stream_pos[slot] = p
        elif keep:
            self._write_stream_many(k, v, start, keep)
        self.window = min(self.sink + self.recent, self.window + t)

    def _write_stream_many(self, k: torch.Tensor, v: torch.Tensor, start: int, keep: list[int]) -> None:
        pos = torch.tensor(keep, device=k.device)
        idx = pos - start
        slots = torch.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.recent)
        self.stream_keys.index_copy_(2, slots, k.index_select(2, idx))
        self.stream_values.index_copy_(2, slots, v.index_select(2, idx))
        self.stream_pos.index_copy_(0, slots, pos)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append key/value states [B, n_full + n_stream, T, D]; returns (DuoKV, DuoKV)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t, start = key_states.shape[2], self.length
        nf = self.n_full
        self._ensure_capacity(start + t)
        self.keys[:, :, start:start + t] = key_states[:, :nf]
        self.values[:, :, start:start + t] = value_states[:, :nf]
        ks, vs = key_states[:, nf:], value_states[:, nf:]
        if t == 1:
            self._write_stream(ks, vs, start)
            sk, sv, spos = self.stream_keys[:, :, :self.window], self.stream_values[:, :, :self.window], None
        else:
            w = self.window
            sk = torch.cat([self.stream_keys[:, :, :w], ks], dim=2)
            sv = torch.cat([self.stream_values[:, :, :w], vs], dim=2)
            spos = torch.cat([self.stream_pos[:w], torch.arange(start, start + t, device=ks.device)])
            self._write_stream(ks, vs, start)
        self.length = start + t
        kv = DuoKV(self.keys[:, :, :self.length], self.values[:, :, :self.length], sk, sv, spos, start)
        return kv, kv

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else query_length.shape[-1]
        return self.length + q, 0

    def get_max_length(self) -> int:
        return self.max_cache_len or -1

    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        self.length = self.window = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("DuoCache does not support beam search")

    def memory_bytes(self) -> int:
        """Bytes held by this layer's K/V buffers (full + streaming)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.stream_keys, self.stream_values))


class DuoCache(Cache):
    """Cache for a model prepared by :func:`quantduo.duo.deploy.apply_duo`.

    Build it with :meth:`from_model`; pass it as ``past_key_values`` to ``model(...)`` or
    ``model.generate(...)``. ``max_cache_len`` preallocates the full-head buffers (recommended
    on GPU); without it they grow by doubling.
    """

    def __init__(self, n_full: list[int], n_kv_heads: int, sink: int, recent: int, max_cache_len: int | None = None):
        super().__init__(layers=[DuoLayer(n, n_kv_heads - n, sink, recent, max_cache_len) for n in n_full])

    @classmethod
    def from_model(cls, model, max_cache_len: int | None = None) -> "DuoCache":
        from quantduo.duo.deploy import duo_layout

        n_full, n_kv, sink, recent = duo_layout(model)
        return cls(n_full, n_kv, sink, recent, max_cache_len)

    def memory_bytes(self) -> int:
        """Total bytes of every layer's K/V buffers."""
        return sum(layer.memory_bytes() for layer in self.layers)
