"""DuoCache: a transformers ``Cache`` with a full KV cache for retrieval heads and a
sink + recent cache for streaming heads (per layer, after head reordering: retrieval KV heads
first, see :mod:`quantduo.duo.deploy`).

Window rule of the streaming heads (the reference implementation's, which the published patterns were
trained under): a prefill chunk starting at position ``s`` attends to the sink tokens, the last ``recent``
tokens before ``s`` and the chunk itself (causal); the first chunk (s = 0) is therefore dense. A decode step is
a chunk of one token: sink + the last ``recent`` tokens + the new one. The streaming store is a ring of
``sink + recent + 1`` slots (sinks stay, the rest cycles), so a step reads its keys in place and the write of
the next token prunes the window back.

Left-padded batches (:meth:`DuoCache.set_padding`, called by the model before each forward): row b's real
tokens start at slot ``pad[b]`` of the batch's sequence axis. The retrieval store keeps slots (pads included, as
transformers' caches do); the ring is per row, in real positions: row b's sinks are its first real tokens, pads
never enter it, and ``stream_pos [B, S]`` gives each ring slot's batch slot (-1: empty). Attention then runs the
masked path of :mod:`quantduo.duo.attention` on those positions.

``update`` returns a :class:`DuoKV` view (for keys and values alike) that the "duo" attention
function of :mod:`quantduo.duo.deploy` consumes. Memory: without ``max_cache_len`` the retrieval-head store grows
by at most :data:`GROWTH` x the tokens held, and never past the bytes a full cache of those tokens would take
(:meth:`DuoLayer.capacity_for`); the streaming ring grows with it up to its ``sink + recent + 1`` slots.

Options:
  static: (needs ``max_cache_len``) single-token decode steps take their position from a device
      counter and attend over the whole preallocated buffer with a validity mask, so a step has
      fixed shapes and no host-device synchronisation: it can be captured in a CUDA graph
      (:mod:`quantduo.duo.decode`). Prefill chunks still use Python-side lengths. Decode steps past
      ``max_cache_len`` are not checked.
  kv_bits: 8 or 4 stores the retrieval-head K/V as per-token-group codes (:mod:`quantduo.formats.kv`);
      decode attention reads the codes (dequantized in the kernel's registers), prefill attention reads
      them dequantized. The streaming ring stays 16-bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from quantduo.duo.layout import duo_layout
from quantduo.formats.kv import QuantizedKV, bytes_per_element, dequantize_kv, quantize_unchecked
from quantduo.kernels.cache_write import kv_quant_write, ring_write

GROWTH = 1.25  # capacity of a growing retrieval-head store: at most GROWTH x the tokens held


def window_positions(start: int, sink: int, recent: int) -> list[int]:
    """Positions before a chunk starting at ``start`` that its streaming queries see: the sinks and the last
    ``recent`` tokens (none for the first chunk, start = 0; its queries see the chunk itself, causally)."""
    return list(range(min(start, sink))) + list(range(max(sink, start - recent), start))


def kept_positions(start: int, end: int, sink: int, recent: int) -> list[int]:
    """Positions of a chunk start..end - 1 (the first ``end`` tokens seen) that the streaming ring keeps: the sinks
    and the last ``recent + 1`` tokens."""
    return list(range(start, min(end, sink))) + list(range(max(start, sink, end - recent - 1), end))


@dataclass
class DuoKV:
    """What the new queries of one layer may attend to.

    full_k/full_v: keys / values of the retrieval heads at positions 0..Tk-1, [B, n_full, Tk, D] 16-bit
        (prefill: Tk = q_start + Tq) or, when decoding, possibly a :class:`QuantizedKV` of the codes
        (static decode: the whole buffer, positions >= ``length`` masked).
    stream_k/stream_v: [B, n_stream, S, D] keys of the streaming heads. Prefill: the window keys the chunk
        may see (sinks and the last ``recent`` before it, in position order) followed by the Tq new ones, so
        the chunk attends causally, bottom-right aligned. Decode: the ring, the new token included.
    stream_pos: int64 [B, S] slot position of each key of stream_k (-1: empty): when decoding (the ring; an
        eager unpadded step's ring slots are all filled, so its attention may skip them) and for padded prefill
        (ring, then the chunk); None for unpadded prefill (the fast layout above).
    q_start: absolute position of the first new query (Python bookkeeping; unused when decoding; prefill: the
        new keys are the last Tk - q_start of full_k and of stream_k).
    decoding: one new query per sequence (Tq == 1): every visible key is attended.
    length: static decode: device int64 [1], tokens in the cache including the new one.
    full_pos: padded decode: int64 [B, Tk] slot position of each full key, -1 on padding slots (else None).
    pad: int64 [B] first real slot of each row (left padding), or None without padding.
    """

    full_k: torch.Tensor | QuantizedKV
    full_v: torch.Tensor | QuantizedKV
    stream_k: torch.Tensor
    stream_v: torch.Tensor
    stream_pos: torch.Tensor | None
    q_start: int
    decoding: bool = False
    length: torch.Tensor | None = None
    full_pos: torch.Tensor | None = None
    pad: torch.Tensor | None = None

    @property
    def n_full(self) -> int:
        """Retrieval KV heads."""
        k = self.full_k
        return (k.codes if isinstance(k, QuantizedKV) else k).shape[1]

    @property
    def stream_start(self) -> int:
        """Prefill: index in stream_k of the first new key (the window keys come before it)."""
        return self.stream_k.shape[2] - (self.full_k.shape[2] - self.q_start)


class FullStore:
    """Retrieval-head K/V over a sequence axis (axis 2): 16-bit [B, H, cap, D] buffers, or INT8/INT4
    codes [B, H, cap, D * bits / 8] uint8 with fp16 scale/zero [B, H, cap, D / group]."""

    def __init__(self, like: torch.Tensor, heads: int, cap: int, bits: int | None, group: int):
        b, _, _, d = like.shape
        self.bits, self.group, self.dtype = bits, min(group, d), like.dtype
        if bits is not None and (bits not in (4, 8) or d % self.group):
            raise ValueError(f"kv_bits must be 4 or 8 with head_dim {d} a multiple of the group, got {bits}")
        if bits is None:
            shapes = {"": (d, like.dtype)}
        else:
            shapes = {"codes": (d * bits // 8, torch.uint8), "scale": (d // self.group, torch.float16),
                      "zero": (d // self.group, torch.float16)}
        self.bufs = {f"{kv}{name}": torch.zeros(b, heads, cap, width, dtype=dt, device=like.device)
                     for kv in "kv" for name, (width, dt) in shapes.items()}

    @property
    def capacity(self) -> int:
        return self.bufs["k" if self.bits is None else "kcodes"].shape[2]

    def _parts(self, kv: str, x: torch.Tensor) -> dict:
        if self.bits is None:
            return {kv: x}
        q = quantize_unchecked(x, self.bits, self.group)
        return {f"{kv}codes": q.codes, f"{kv}scale": q.scale, f"{kv}zero": q.zero}

    def write(self, where: slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v [B, H, T, D] at sequence positions ``where`` (a slice, or an int64 index tensor [T]).
        Quantized stores on CUDA quantize and store in one Triton launch (:mod:`quantduo.kernels.cache_write`)."""
        if self.bits is not None and k.is_cuda and k.shape[1]:
            pos = where if torch.is_tensor(where) else torch.arange(where.start, where.stop, device=k.device)
            if k.stride(-1) != 1 or v.stride(-1) != 1:
                k, v = k.contiguous(), v.contiguous()
            kv_quant_write(k, v, pos, self.bufs, self.bits, self.group)
            return
        for name, x in {**self._parts("k", k), **self._parts("v", v)}.items():
            if torch.is_tensor(where):
                self.bufs[name].index_copy_(2, where, x)
            else:
                self.bufs[name][:, :, where] = x

    def view(self, n: int | None = None) -> tuple[torch.Tensor | QuantizedKV, torch.Tensor | QuantizedKV]:
        """K, V of the first ``n`` positions (None: the whole buffer) as stored: 16-bit [B, H, n, D]
        views, or :class:`QuantizedKV` views of the codes."""
        b = {name: t[:, :, :n] for name, t in self.bufs.items()}
        if self.bits is None:
            return b["k"], b["v"]
        return tuple(QuantizedKV(b[f"{kv}codes"], b[f"{kv}scale"], b[f"{kv}zero"], self.bits, self.group)
                     for kv in "kv")

    def read(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first ``n`` positions (None: the whole buffer) [B, H, n, D] in 16-bit."""
        k, v = self.view(n)
        if self.bits is None:
            return k, v
        return dequantize_kv(k, self.dtype, torch.float16), dequantize_kv(v, self.dtype, torch.float16)

    def grow(self, new_cap: int, length: int) -> None:
        """Reallocate every buffer to ``new_cap`` positions, keeping the first ``length``."""
        for name, old in self.bufs.items():
            new = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
            new[:, :, :length] = old[:, :, :length]
            self.bufs[name] = new

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.bufs.values())


class DuoLayer(CacheLayerMixin):
    """One layer's cache: n_full retrieval KV heads (full), n_stream streaming KV heads (sink + recent + 1 ring)."""

    def __init__(self, n_full: int, n_stream: int, sink: int, recent: int, max_cache_len: int | None = None,
                 static: bool = False, kv_bits: int | None = None, kv_group: int = 128):
        super().__init__()
        if n_full < 0 or n_stream < 0 or n_full + n_stream == 0:
            raise ValueError(f"bad head split n_full={n_full}, n_stream={n_stream}")
        if sink < 0 or recent < 1:
            raise ValueError(f"need sink >= 0 and recent >= 1, got {sink}, {recent}")
        if static and max_cache_len is None:
            raise ValueError("a static DuoCache needs max_cache_len")
        self.n_full, self.n_stream, self.sink, self.recent = n_full, n_stream, sink, recent
        self.slots = sink + recent + 1  # the ring: sinks, then recent + 1 cycling slots
        self.max_cache_len, self.static, self.kv_bits, self.kv_group = max_cache_len, static, kv_bits, kv_group
        self.length = 0  # tokens seen (Python side; static decode steps use self.position instead)
        self.pad = None  # int64 [B] first real slot per row (left padding), None without padding
        self._full_pos = None  # padded: int64 [B, capacity] slot positions of the full store, -1 on pads

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, t, d = key_states.shape
        dev = key_states.device
        self.device, self.dtype, self.batch, self.head_dim = dev, key_states.dtype, b, d
        cap = self.max_cache_len or self.capacity_for(t)
        self.full = FullStore(key_states, self.n_full, cap, self.kv_bits, self.kv_group)
        self.stream_keys = key_states.new_zeros(b, self.n_stream, min(self.slots, cap), d)
        self.stream_values = torch.zeros_like(self.stream_keys)
        self.stream_pos = torch.full((b, self.stream_keys.shape[2]), -1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # device copy of self.length
        self.is_initialized = True

    def _bytes(self, capacity: int) -> float:
        """Bytes of this layer's stores at ``capacity`` retrieval positions (ring: min(capacity, slots))."""
        group = min(self.kv_group, self.head_dim)
        full = 2 * self.batch * self.n_full * self.head_dim * capacity * (
            self.dtype.itemsize if self.kv_bits is None else bytes_per_element(self.kv_bits, group))
        return full + 2 * self.batch * self.n_stream * self.head_dim * min(capacity, self.slots) * self.dtype.itemsize

    def full_cache_bytes(self, tokens: int) -> int:
        """Bytes a full cache (the cache's dtype) of ``tokens`` tokens takes for this layer (every head)."""
        return 2 * self.batch * (self.n_full + self.n_stream) * self.head_dim * tokens * self.dtype.itemsize

    def capacity_for(self, need: int) -> int:
        """Capacity of a growing store that must hold ``need`` tokens: the largest c <= ceil(GROWTH * need)
        whose bytes stay within a full cache of ``need`` tokens (at least ``need``)."""
        budget = self.full_cache_bytes(need)
        hi = max(need, math.ceil(GROWTH * need))
        if self._bytes(hi) <= budget:
            return hi
        lo = need  # _bytes(need) <= budget: a stream slot never costs more than a full position
        while lo < hi:  # largest c in [lo, hi] within the budget (_bytes is increasing)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._bytes(mid) <= budget else (lo, mid - 1)
        return lo

    def _ensure_capacity(self, need: int) -> None:
        if self.max_cache_len is not None:
            if need > self.max_cache_len:
                raise ValueError(f"DuoCache is full: {need} tokens > max_cache_len={self.max_cache_len}")
            return
        if need <= self.full.capacity:
            return
        cap = self.capacity_for(need)
        self.full.grow(cap, self.length)
        ring = min(self.slots, cap)
        if ring > self.stream_keys.shape[2]:
            self.stream_keys, self.stream_values = (_grown(t, ring) for t in (self.stream_keys, self.stream_values))
            fill = self.stream_pos.new_full((self.batch, ring - self.stream_pos.shape[1]), -1)
            self.stream_pos = torch.cat([self.stream_pos, fill], dim=1)
        self._full_pos = None

    def _slot(self, p):
        """Ring slot of absolute position(s) p (int or int64 tensor): sinks stay, the rest cycles."""
        ring = self.recent + 1
        if torch.is_tensor(p):
            return torch.where(p < self.sink, p, self.sink + (p - self.sink) % ring)
        return p if p < self.sink else self.sink + (p - self.sink) % ring

    def _write_stream(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Keep the sink positions and the last ``recent + 1`` positions of the chunk k/v [B, Hs, T, D].

        Index arithmetic uses Python ints only (no host-device synchronisation while decoding).
        """
        keep = kept_positions(start, start + k.shape[2], self.sink, self.recent)
        if len(keep) == 1:  # decoding: plain slice writes, no index tensors
            p = keep[0]
            slot = self._slot(p)
            self.stream_keys[:, :, slot] = k[:, :, p - start]
            self.stream_values[:, :, slot] = v[:, :, p - start]
            self.stream_pos[:, slot] = p
        elif keep:
            pos = torch.tensor(keep, device=k.device)
            self._store_ring(k.index_select(2, pos - start), v.index_select(2, pos - start), pos)

    def _store_ring(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Write k/v [B, Hs, n, D] of absolute positions pos (int64 [n]) into their ring slots."""
        slots = self._slot(pos)
        self.stream_keys.index_copy_(2, slots, k)
        self.stream_values.index_copy_(2, slots, v)
        self.stream_pos.index_copy_(1, slots, pos.expand(self.batch, -1).contiguous())

    def load(self, full_k: torch.Tensor, full_v: torch.Tensor, stream_k: torch.Tensor, stream_v: torch.Tensor) -> None:
        """Fill an empty layer with T tokens prefilled elsewhere (e.g. on other ranks): full_k/full_v
        [B, n_full, T, D] the retrieval heads' K/V of positions 0..T-1, stream_k/stream_v [B, n_stream, n, D] the
        streaming heads' K/V of :func:`kept_positions` (0, T) (what the ring keeps). Afterwards the layer is as if
        the T tokens had been fed through :meth:`update` (next: a decode step at position T)."""
        t = full_k.shape[2]
        self.lazy_initialization(full_k, full_v)
        self._ensure_capacity(t)
        self.full.write(slice(0, t), full_k, full_v)
        self._store_ring(stream_k, stream_v, torch.tensor(kept_positions(0, t, self.sink, self.recent),
                                                          device=stream_k.device))
        self.length = t
        self.position.fill_(t)

    def _pad_or_zero(self) -> torch.Tensor:
        return self.pad if self.pad is not None else torch.zeros(self.batch, dtype=torch.long, device=self.device)

    def _write_stream_rows(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Per-row ring write of a chunk k/v [B, Hs, T, D] at slots start.. (left padding): row b keeps its real
        positions (slot - pad[b]) < sink and its last ``recent + 1``; padding slots are skipped."""
        t = k.shape[2]
        pad = self._pad_or_zero()[:, None]
        real = torch.arange(start, start + t, device=k.device)[None, :] - pad  # [B, T]
        keep = (real >= 0) & ((real < self.sink) | (real >= start + t - pad - self.recent - 1))
        rows, cols = keep.nonzero(as_tuple=True)
        slots = self._slot(real[rows, cols])
        self.stream_keys[rows, :, slots] = k[rows, :, cols]
        self.stream_values[rows, :, slots] = v[rows, :, cols]
        self.stream_pos[rows, slots] = start + cols

    def _write_token_rows(self, k: torch.Tensor, v: torch.Tensor, p: int | torch.Tensor) -> None:
        """Ring write of one token k/v [B, Hs, 1, D] at slot ``p`` (int, or device int64 [1]: no host
        synchronisation) into each row's slot of its real position p - pad[b] (rows still in padding keep theirs)."""
        rows = torch.arange(self.batch, device=k.device)
        real = p - self._pad_or_zero()
        slot = self._slot(real.clamp_min(0))
        ok = real >= 0
        for ring, new in ((self.stream_keys, k[:, :, 0]), (self.stream_values, v[:, :, 0])):
            ring[rows, :, slot] = torch.where(ok[:, None, None], new, ring[rows, :, slot])
        self.stream_pos[rows, slot] = torch.where(ok, real + self._pad_or_zero(), self.stream_pos[rows, slot])

    def full_positions(self) -> torch.Tensor:
        """Padded: int64 [B, capacity] slot position of each full-store slot, -1 on padding slots."""
        if self._full_pos is None or self._full_pos.shape[1] != self.full.capacity:
            j = torch.arange(self.full.capacity, device=self.device)
            self._full_pos = torch.where(j[None, :] >= self.pad[:, None], j[None, :], -1)
        return self._full_pos

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Record the left padding (int64 [B] first real slot per row, or None) checked by
        :meth:`DuoCache.set_padding`."""
        self.pad, self._full_pos = pad, None

    def _window(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring keys / values [B, Hs, W, D] a chunk starting at ``start`` sees, in position order."""
        slots = [self._slot(p) for p in window_positions(start, self.sink, self.recent)]
        if slots == list(range(len(slots))):
            return self.stream_keys[:, :, :len(slots)], self.stream_values[:, :, :len(slots)]
        idx = torch.tensor(slots, device=self.device)
        return self.stream_keys.index_select(2, idx), self.stream_values.index_select(2, idx)

    def _static_decode(self, kf, vf, ks, vs) -> DuoKV:
        """One token at the device position counter; fixed shapes, no host synchronisation."""
        p = self.position
        if self.n_full:
            self.full.write(p, kf, vf)
        if self.n_stream and ks.is_cuda and self.stream_keys.shape[2] == self.slots:
            ring_write(ks, vs, p, self.stream_keys, self.stream_values, self.stream_pos, self.sink, self.recent + 1,
                       self.pad)
        elif self.n_stream:
            self._write_token_rows(ks, vs, p)
        self.position.add_(1)
        k, v = self.full.view()
        return DuoKV(k, v, self.stream_keys, self.stream_values, self.stream_pos, self.length, decoding=True,
                     length=self.position, full_pos=None if self.pad is None else self.full_positions(),
                     pad=self.pad)

    def _padded_update(self, kf, vf, ks, vs, start: int) -> DuoKV:
        """Eager update of a left-padded batch (module docstring): per-row ring, keys with slot positions."""
        t = ks.shape[2]
        self._ensure_capacity(start + t)
        self.full.write(slice(start, start + t), kf, vf)
        end = start + t
        if t == 1:
            self._write_token_rows(ks, vs, start)
            k, v = self.full.view(end)
            return DuoKV(k, v, self.stream_keys, self.stream_values, self.stream_pos, start, decoding=True,
                         full_pos=self.full_positions()[:, :end], pad=self.pad)
        chunk_pos = torch.arange(start, end, device=ks.device).expand(self.batch, t)
        sk, sv = torch.cat([self.stream_keys, ks], dim=2), torch.cat([self.stream_values, vs], dim=2)
        spos = torch.cat([self.stream_pos, chunk_pos], dim=1)
        self._write_stream_rows(ks, vs, start)
        k, v = self.full.read(end)
        return DuoKV(k, v, sk, sv, spos, start, pad=self.pad)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append key/value states [B, n_full + n_stream, T, D]; returns (DuoKV, DuoKV)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t, start, nf = key_states.shape[2], self.length, self.n_full
        kf, vf, ks, vs = key_states[:, :nf], value_states[:, :nf], key_states[:, nf:], value_states[:, nf:]
        if self.static and t == 1:
            kv = self._static_decode(kf, vf, ks, vs)
            self.length = start + 1
            return kv, kv
        if self.pad is not None:
            kv = self._padded_update(kf, vf, ks, vs, start)
            self.length = start + t
            if self.static:
                self.position.fill_(self.length)
            return kv, kv
        self._ensure_capacity(start + t)
        self.full.write(slice(start, start + t), kf, vf)
        spos = None
        if t == 1:
            self._write_stream(ks, vs, start)
            filled = min(start + 1, self.stream_keys.shape[2])
            sk, sv = self.stream_keys[:, :, :filled], self.stream_values[:, :, :filled]
            spos = self.stream_pos[:, :filled]
        else:
            wk, wv = self._window(start)
            sk, sv = torch.cat([wk, ks], dim=2), torch.cat([wv, vs], dim=2)
            self._write_stream(ks, vs, start)
        self.length = start + t
        if self.static:
            self.position.fill_(self.length)
        k, v = self.full.view(self.length) if t == 1 else self.full.read(self.length)
        kv = DuoKV(k, v, sk, sv, spos, start, decoding=t == 1)
        return kv, kv

    def decode_state(self) -> list[torch.Tensor]:
        """Tensors a decode step overwrites in place besides future positions of the full buffer
        (what must be saved and restored around CUDA-graph warm-up steps)."""
        return [self.position, self.stream_keys, self.stream_values, self.stream_pos]

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.length

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else query_length.shape[-1]
        return self.length + q, 0

    def get_max_length(self) -> int:
        return self.max_cache_len or -1

    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        self.length = 0
        self.set_padding(None)
        if self.is_initialized:
            self.stream_pos.fill_(-1)
            self.position.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select / reorder the batch rows (beam search): row i becomes old row ``beam_idx[i]``."""
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        self.full.bufs = {name: t.index_select(0, idx) for name, t in self.full.bufs.items()}
        self.stream_keys, self.stream_values, self.stream_pos = (
            t.index_select(0, idx) for t in (self.stream_keys, self.stream_values, self.stream_pos))
        if self.pad is not None:
            self.set_padding(self.pad.index_select(0, idx))
        self.batch = len(idx)

    def memory_bytes(self) -> int:
        """Bytes held by this layer's K/V buffers (full, with codes/scales when quantized, + streaming)."""
        if not self.is_initialized:
            return 0
        return self.full.nbytes() + sum(t.numel() * t.element_size() for t in (self.stream_keys, self.stream_values))


def _grown(t: torch.Tensor, size: int) -> torch.Tensor:
    """t [B, H, S, D] zero-padded to ``size`` slots along axis 2."""
    new = t.new_zeros(*t.shape[:2], size, t.shape[3])
    new[:, :, :t.shape[2]] = t
    return new


class DuoCache(Cache):
    """Cache for a model prepared by :func:`quantduo.duo.deploy.apply_duo`.

    Build it with :meth:`from_model` and pass it as ``cache`` to ``model(...)`` / ``model.generate(...)``
    (``generate`` builds one itself when given none). ``max_cache_len`` preallocates the full-head buffers
    (recommended on GPU); without it they grow (module docstring). See the module docstring for ``static`` /
    ``kv_bits``. ``n_full`` may exceed a model's retrieval heads: n_full == n_kv_heads everywhere gives full
    attention on a reordered model (the fair baseline: same kernels, all heads full).
    """

    def __init__(self, n_full: list[int], n_kv_heads: int, sink: int, recent: int, max_cache_len: int | None = None,
                 static: bool = False, kv_bits: int | None = None, kv_group: int = 128):
        super().__init__(layers=[DuoLayer(n, n_kv_heads - n, sink, recent, max_cache_len, static, kv_bits, kv_group)
                                 for n in n_full])

    @classmethod
    def from_model(cls, model, max_cache_len: int | None = None, all_full: bool = False, **options) -> "DuoCache":
        """DuoCache for ``model``; ``all_full`` makes every head a retrieval head (full attention)."""
        n_full, n_kv, sink, recent = duo_layout(model)
        return cls([n_kv] * len(n_full) if all_full else n_full, n_kv, sink, recent, max_cache_len, **options)

    def decode_state(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.decode_state()]

    def set_padding(self, pad: torch.Tensor | None) -> None:
        """Left padding of the tokens seen so far plus the new ones: pad int64 [B] leading padding slots per row
        (None: no padding); see :func:`quantduo.duo.masks.padding_of`. A row's padding is fixed once it has a
        real token (ValueError when it changes); a row of padding only may grow it."""
        layer = self.layers[0]
        if pad is None and layer.pad is None:
            return
        seen = layer.length
        old = layer.pad if layer.pad is not None else torch.zeros_like(pad)
        new = pad if pad is not None else torch.zeros_like(old)
        if old.shape != new.shape or not bool(((new == old) | ((old == seen) & (new >= old))).all()):
            raise ValueError("the attention mask changed the left padding of tokens already in the DuoCache "
                             "(only left padding of the prompt is supported)")
        if (layer.pad is None and not bool(new.any())) or (layer.pad is not None and torch.equal(new, old)):
            return
        for layer in self.layers:
            layer.set_padding(new)

    def memory_bytes(self) -> int:
        """Total bytes of every layer's K/V buffers."""
        return sum(layer.memory_bytes() for layer in self.layers)

    def full_cache_bytes(self) -> int:
        """Bytes a full cache (same dtype) of the tokens held would take (every layer, every head)."""
        return sum(layer.full_cache_bytes(layer.length) for layer in self.layers if layer.is_initialized)
