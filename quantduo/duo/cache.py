"""DuoCache: a transformers ``Cache`` with a full KV cache for retrieval heads and a
sink + recent cache for streaming heads (per layer, after head reordering: retrieval KV heads
first, see :mod:`quantduo.duo.deploy`).

``update`` returns a :class:`DuoKV` view (for keys and values alike) that the "duo" attention
function of :mod:`quantduo.duo.deploy` consumes; the memory held is exactly
B * D * (n_full * capacity * e + n_stream * (sink + recent) * 2) * 2 (K and V) bytes per layer for
16-bit states (e = 2; e = 1 + 4 / group for INT8 KV, 0.5 + 4 / group for INT4, see ``kv_bits``).

Options:
  static: (needs ``max_cache_len``) single-token decode steps take their position from a device
      counter and attend over the whole preallocated buffer with a validity mask, so a step has
      fixed shapes and no host-device synchronisation: it can be captured in a CUDA graph
      (:mod:`quantduo.duo.decode`). Prefill chunks still use Python-side lengths. Decode steps past
      ``max_cache_len`` are not checked.
  kv_bits: 8 or 4 stores the retrieval-head K/V as per-token-group codes (:mod:`quantduo.formats.kv`);
      decode attention reads the codes (dequantized in the kernel's registers), prefill attention reads
      them dequantized. The streaming window (sink + recent slots) stays 16-bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from quantduo.formats.kv import QuantizedKV, dequantize_kv, quantize_unchecked
from quantduo.kernels.cache_write import kv_quant_write, ring_write


@dataclass
class DuoKV:
    """What the new queries of one layer may attend to.

    full_k/full_v: keys / values of the retrieval heads at positions 0..Tk-1, [B, n_full, Tk, D] 16-bit
        (prefill: Tk = q_start + Tq) or, when decoding, possibly a :class:`QuantizedKV` of the codes
        (static decode: the whole buffer, positions >= ``length`` masked).
    stream_k/stream_v: [B, n_stream, S, D] keys of the streaming heads: the cached window before
        this step followed by the Tq new ones (prefill), or the updated window (decode).
    stream_pos: [S] int64 absolute positions of stream_k (-1: empty slot); None when decoding with
        every key visible.
    q_start: absolute position of the first new query (Python bookkeeping; unused when decoding).
    decoding: one new query per sequence (Tq == 1): every visible key is attended.
    length: static decode: device int64 [1], tokens in the cache including the new one.
    """

    full_k: torch.Tensor | QuantizedKV
    full_v: torch.Tensor | QuantizedKV
    stream_k: torch.Tensor
    stream_v: torch.Tensor
    stream_pos: torch.Tensor | None
    q_start: int
    decoding: bool = False
    length: torch.Tensor | None = None

    @property
    def n_full(self) -> int:
        """Retrieval KV heads."""
        k = self.full_k
        return (k.codes if isinstance(k, QuantizedKV) else k).shape[1]


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
    """One layer's cache: n_full retrieval KV heads (full), n_stream streaming KV heads (sink + recent)."""

    def __init__(self, n_full: int, n_stream: int, sink: int, recent: int, max_cache_len: int | None = None,
                 static: bool = False, kv_bits: int | None = None, kv_group: int = 128):
        super().__init__()
        if n_full < 0 or n_stream < 0 or n_full + n_stream == 0:
            raise ValueError(f"bad head split n_full={n_full}, n_stream={n_stream}")
        if static and max_cache_len is None:
            raise ValueError("a static DuoCache needs max_cache_len")
        self.n_full, self.n_stream, self.sink, self.recent = n_full, n_stream, sink, recent
        self.max_cache_len, self.static, self.kv_bits, self.kv_group = max_cache_len, static, kv_bits, kv_group
        self.length = 0  # tokens seen (Python side; static decode steps use self.position instead)
        self.window = 0  # filled streaming slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, _, t, d = key_states.shape
        dev = key_states.device
        cap = self.max_cache_len or max(t, 256)
        self.full = FullStore(key_states, self.n_full, cap, self.kv_bits, self.kv_group)
        self.stream_keys = torch.zeros(b, self.n_stream, self.sink + self.recent, d, dtype=key_states.dtype, device=dev)
        self.stream_values = torch.zeros_like(self.stream_keys)
        self.stream_pos = torch.full((self.sink + self.recent,), -1, dtype=torch.long, device=dev)
        self.position = torch.zeros(1, dtype=torch.long, device=dev)  # device copy of self.length
        self.device, self.dtype = dev, key_states.dtype
        self.is_initialized = True

    def _ensure_capacity(self, need: int) -> None:
        if self.max_cache_len is not None and need > self.max_cache_len:
            raise ValueError(f"DuoCache is full: {need} tokens > max_cache_len={self.max_cache_len}")
        if need > self.full.capacity:
            self.full.grow(max(need, 2 * self.full.capacity), self.length)

    def _slot(self, p):
        """Ring slot of absolute position(s) p (int or int64 tensor): sinks stay, the rest cycles."""
        if torch.is_tensor(p):
            return torch.where(p < self.sink, p, self.sink + (p - self.sink) % self.recent)
        return p if p < self.sink else self.sink + (p - self.sink) % self.recent

    def _write_stream(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Keep sink positions and the last ``recent`` positions of the chunk k/v [B, Hs, T, D].

        Index arithmetic uses Python ints only (no host-device synchronisation while decoding).
        """
        t, end = k.shape[2], start + k.shape[2]
        keep = list(range(start, min(end, self.sink))) + list(range(max(start, self.sink, end - self.recent), end))
        if len(keep) == 1:  # decoding: plain slice writes, no index tensors
            p = keep[0]
            slot = self._slot(p)
            self.stream_keys[:, :, slot] = k[:, :, p - start]
            self.stream_values[:, :, slot] = v[:, :, p - start]
            self.stream_pos[slot] = p
        elif keep:
            pos = torch.tensor(keep, device=k.device)
            slots = self._slot(pos)
            self.stream_keys.index_copy_(2, slots, k.index_select(2, pos - start))
            self.stream_values.index_copy_(2, slots, v.index_select(2, pos - start))
            self.stream_pos.index_copy_(0, slots, pos)
        self.window = min(self.sink + self.recent, self.window + t)

    def _static_decode(self, kf, vf, ks, vs) -> DuoKV:
        """One token at the device position counter; fixed shapes, no host synchronisation."""
        p = self.position
        if self.n_full:
            self.full.write(p, kf, vf)
        if self.n_stream and ks.is_cuda:
            ring_write(ks, vs, p, self.stream_keys, self.stream_values, self.stream_pos, self.sink, self.recent)
        elif self.n_stream:
            slot = self._slot(p)
            self.stream_keys.index_copy_(2, slot, ks)
            self.stream_values.index_copy_(2, slot, vs)
            self.stream_pos.index_copy_(0, slot, p)
        self.position.add_(1)
        k, v = self.full.view()
        return DuoKV(k, v, self.stream_keys, self.stream_values, self.stream_pos, self.length, decoding=True,
                     length=self.position)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append key/value states [B, n_full + n_stream, T, D]; returns (DuoKV, DuoKV)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t, start, nf = key_states.shape[2], self.length, self.n_full
        kf, vf, ks, vs = key_states[:, :nf], value_states[:, :nf], key_states[:, nf:], value_states[:, nf:]
        if self.static and t == 1:
            kv = self._static_decode(kf, vf, ks, vs)
            self.length, self.window = start + 1, min(self.sink + self.recent, self.window + 1)
            return kv, kv
        self._ensure_capacity(start + t)
        self.full.write(slice(start, start + t), kf, vf)
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
        self.length = self.window = 0
        if self.is_initialized:
            self.stream_pos.fill_(-1)
            self.position.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("DuoCache does not support beam search")

    def memory_bytes(self) -> int:
        """Bytes held by this layer's K/V buffers (full, with codes/scales when quantized, + streaming)."""
        if not self.is_initialized:
            return 0
        return self.full.nbytes() + sum(t.numel() * t.element_size() for t in (self.stream_keys, self.stream_values))


class DuoCache(Cache):
    """Cache for a model prepared by :func:`quantduo.duo.deploy.apply_duo`.

    Build it with :meth:`from_model`; pass it as ``past_key_values`` to ``model(...)`` or
    ``model.generate(...)``. ``max_cache_len`` preallocates the full-head buffers (recommended
    on GPU); without it they grow by doubling. See the module docstring for ``static`` / ``kv_bits``.
    ``n_full`` may exceed a model's retrieval heads: n_full == n_kv_heads everywhere gives full
    attention on a reordered model (the fair baseline: same kernels, all heads full).
    """

    def __init__(self, n_full: list[int], n_kv_heads: int, sink: int, recent: int, max_cache_len: int | None = None,
                 static: bool = False, kv_bits: int | None = None, kv_group: int = 128):
        super().__init__(layers=[DuoLayer(n, n_kv_heads - n, sink, recent, max_cache_len, static, kv_bits, kv_group)
                                 for n in n_full])

    @classmethod
    def from_model(cls, model, max_cache_len: int | None = None, all_full: bool = False, **options) -> "DuoCache":
        """DuoCache for ``model``; ``all_full`` makes every head a retrieval head (full attention)."""
        from quantduo.duo.deploy import duo_layout

        n_full, n_kv, sink, recent = duo_layout(model)
        return cls([n_kv] * len(n_full) if all_full else n_full, n_kv, sink, recent, max_cache_len, **options)

    def decode_state(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for t in layer.decode_state()]

    def memory_bytes(self) -> int:
        """Total bytes of every layer's K/V buffers."""
        return sum(layer.memory_bytes() for layer in self.layers)
