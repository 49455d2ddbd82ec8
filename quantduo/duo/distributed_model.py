"""DuoAttention over torch.distributed for a whole transformers model: ``model.generate()`` under ``torchrun``.

:func:`apply_duo_distributed` (or :func:`distribute_duo` of a model already prepared by
:func:`~quantduo.duo.deploy.apply_duo`) prepares a model (weights replicated on every rank) so that every rank runs
the same ``generate`` call on the same input ids:

* Prefill: the prompt of T tokens is split by sequence into chunks of C = ceil(T / world) tokens, rank r holding
  positions r * C .. (the last chunk padded after the prompt's last token, which no real query sees). Each rank
  runs every layer on its chunk; attention is :func:`~quantduo.duo.distributed.sequence_parallel_prefill`, so the
  result equals the single-process model's prefill in chunks of C tokens (``generate(...,
  prefill_chunk_size=C)``): rank 0's chunk is the dense first chunk, later chunks give streaming heads the sinks +
  the last ``recent`` tokens before the chunk + the chunk. The final hidden states of the positions the caller
  keeps (``logits_to_keep``: the last one in ``generate``) are summed over ranks (each rank contributes its
  positions), so every rank computes the same logits.
* Cache: each layer's K/V go from sequence-sharded to head-sharded as soon as the layer has run
  (:func:`~quantduo.duo.distributed.shard_prefilled_kv`): a rank keeps only its KV heads of
  :func:`~quantduo.duo.distributed.balanced_head_assignment` (retrieval heads balanced over ranks), the retrieval
  heads with every token, the streaming heads with sink + recent (a :class:`ShardedDuoCache`).
* Decode: every rank computes the q/k/v projections of every head (replicated weights), appends its heads' K/V to
  its cache and attends with them (:func:`~quantduo.duo.distributed.head_sharded_decode`); the attention outputs
  are all-gathered so that o_proj sees every head. A step's attention time and KV memory are thus split over
  ranks; the projections and MLPs are not (no tensor parallelism of the weights).

Refused with ValueError: padded batches (rows of different lengths), beam search, static caches / CUDA graphs /
``cache_implementation``, chunked prefill inside ``generate``, multi-token steps after the prefill (assisted
decoding), sliding-window or soft-capped layers, ``apply_duo(..., window="token")`` or
``apply_duo(..., respect_sliding_window=True)`` on a sliding-window model, and prompts whose chunks are shorter
than ``sink`` or ``recent``. A model's sliding window is otherwise ignored, as the reference does
(:mod:`quantduo.duo.layout`).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from quantduo.duo.cache import DuoCache, DuoKV, DuoLayer
from quantduo.duo.compat import cache_argument
from quantduo.duo.deploy import apply_duo, register_attention
from quantduo.duo.distributed import (EXCHANGES, balanced_head_assignment, head_sharded_decode, query_heads,
                                      sequence_parallel_prefill, shard_prefilled_kv)
from quantduo.duo.layout import attention_modules, duo_layers, duo_layout


@dataclass
class LayerSharding:
    """How one layer's KV heads are spread over the ranks of ``group`` (None: the default group).

    assignment: KV heads per rank (:func:`balanced_head_assignment`, retrieval heads first); retrieval: bool [Hkv]
    (the model's head order after :func:`apply_duo`: retrieval heads first); exchange: the prefill's retrieval
    K/V exchange (:data:`~quantduo.duo.distributed.EXCHANGES`)."""

    group: object
    rank: int
    assignment: list[list[int]]
    retrieval: torch.Tensor
    exchange: str

    @property
    def heads(self) -> list[int]:
        """This rank's KV heads."""
        return self.assignment[self.rank]


class ShardedDuoLayer(DuoLayer):
    """One layer's cache on one rank: a :class:`DuoLayer` of this rank's KV heads only (module docstring)."""

    def __init__(self, sharding: LayerSharding, sink: int, recent: int, max_cache_len: int | None = None,
                 kv_bits: int | None = None, kv_group: int = 128):
        n_full = int(sharding.retrieval[sharding.heads].sum())
        super().__init__(n_full, len(sharding.heads) - n_full, sink, recent, max_cache_len, False, kv_bits, kv_group)
        self.sharding, self.prompt_length = sharding, None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill (empty layer): key/value [B, Hkv, C, D], this rank's chunk of every head; keeps this rank's heads
        (:func:`shard_prefilled_kv`, a collective) and returns the chunk's key/value for the prefill attention.
        Decode: key/value [B, Hkv, 1, D]; appends this rank's heads and returns their (DuoKV, DuoKV)."""
        s = self.sharding
        if not self.length:
            if self.prompt_length is None:
                raise ValueError("a ShardedDuoCache is filled by the forward of a model prepared by "
                                 "apply_duo_distributed")
            self.load(*shard_prefilled_kv(key_states, value_states, s.assignment, s.retrieval, self.prompt_length,
                                          self.sink, self.recent, s.group))
            return key_states, value_states
        if key_states.shape[2] != 1:
            raise ValueError("after its prefill a ShardedDuoCache takes single-token decode steps only")
        idx = torch.tensor(s.heads, device=key_states.device)
        return super().update(key_states.index_select(1, idx), value_states.index_select(1, idx))


class ShardedDuoCache(DuoCache):
    """This rank's cache of a model prepared by :func:`apply_duo_distributed` (one :class:`ShardedDuoLayer` per
    layer). ``generate`` builds one (sized to its ``max_length``); pass one built with :meth:`from_model` as
    ``cache`` to reuse it. Options as :class:`DuoCache`'s (``max_cache_len``, ``kv_bits``, ``kv_group``)."""

    def __init__(self, shardings: list[LayerSharding], sink: int, recent: int, max_cache_len: int | None = None,
                 kv_bits: int | None = None, kv_group: int = 128):
        super(DuoCache, self).__init__(layers=[ShardedDuoLayer(s, sink, recent, max_cache_len, kv_bits, kv_group)
                                               for s in shardings])

    @classmethod
    def from_model(cls, model, max_cache_len: int | None = None, **options) -> "ShardedDuoCache":
        _, _, sink, recent = duo_layout(model)
        return cls([m.duo_sharding for m in attention_modules(model)], sink, recent, max_cache_len, **options)

    def begin_prefill(self, length: int) -> None:
        """Announce the sequence-parallel prefill of a prompt of ``length`` tokens (every rank the same)."""
        for layer in self.layers:
            layer.prompt_length = length


def distributed_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                                  **kwargs):
    """transformers attention function "duo_dist". Prefill: query [B, Hq, C, D] and key/value [B, Hkv, C, D] of
    this rank's chunk (:func:`sequence_parallel_prefill`). Decode: query [B, Hq, 1, D] of every head, key a
    :class:`DuoKV` of this rank's heads (:func:`head_sharded_decode`). Returns ([B, T, Hq, D], None)."""
    s = module.duo_sharding
    scaling = module.scaling if scaling is None else scaling
    if isinstance(key, DuoKV):
        q = query.index_select(1, query_heads(s.heads, module.num_key_value_groups, query.device))
        out = head_sharded_decode(q, key, s.assignment, scaling, s.group)
    elif key.shape[2] == query.shape[2]:
        out = sequence_parallel_prefill(query, key, value, s.retrieval, module.duo_sink, module.duo_recent, scaling,
                                        s.group, s.exchange)
    else:
        raise ValueError("a model prepared by apply_duo_distributed needs a ShardedDuoCache (generate() builds one) "
                         "or no cache")
    return out.transpose(1, 2), None


register_attention("duo_dist", distributed_attention_forward)


@dataclass
class _PromptSplit:
    """What the hooks of one model share: the group, the window sizes, the ``logits_to_keep`` of the current call
    and, during a prefill, (first position of this rank's chunk, prompt length)."""

    group: object
    sink: int
    recent: int
    keep: int = 0
    chunk: tuple[int, int] | None = None


def _record_keep(state: _PromptSplit, module, args, kwargs) -> None:
    """Forward pre-hook of the causal LM: remember ``logits_to_keep`` (an int > 0: the last ones; else all)."""
    keep = kwargs.get("logits_to_keep", 0)
    state.keep = keep if isinstance(keep, int) else 0


def _prompt_chunk(x: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """This rank's chunk of x [B, T, ...] (ids or embeddings) padded with zeros to C = ceil(T / world) positions
    after the prompt's end, and its first position."""
    c = -(-x.shape[1] // world)
    piece = x[:, rank * c:(rank + 1) * c]
    return torch.cat([piece, piece.new_zeros(piece.shape[0], c - piece.shape[1], *piece.shape[2:])], 1), rank * c


def _split_prompt(state: _PromptSplit, module, args, kwargs):
    """Forward pre-hook of the base model: a prefill (empty or no cache) runs on this rank's chunk of the prompt
    at its positions; a decode step (one token after the prefill) runs unchanged; anything else is refused."""
    if args:
        raise ValueError("call a model prepared by apply_duo_distributed with keyword arguments")
    name = "input_ids" if kwargs.get("input_ids") is not None else "inputs_embeds"
    x, cache, mask = kwargs[name], kwargs.get(cache_argument(type(module))), kwargs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("padded batches are not supported under apply_duo_distributed (every row of the batch must "
                         "have the same length)")
    if cache is not None and not isinstance(cache, ShardedDuoCache):
        raise ValueError(f"a model prepared by apply_duo_distributed needs a ShardedDuoCache, not "
                         f"{type(cache).__name__}")
    t = x.shape[1]
    state.chunk = None
    if cache is not None and cache.get_seq_length():
        if t != 1:
            raise ValueError("after the prefill, apply_duo_distributed takes single-token decode steps only (no "
                             "chunked prefill, no assisted decoding)")
        return None
    rank, world = dist.get_rank(state.group), dist.get_world_size(state.group)
    piece, start = _prompt_chunk(x, rank, world)
    c = piece.shape[1]
    if state.sink > c or state.recent > c:
        raise ValueError(f"a prompt of {t} tokens over {world} ranks gives chunks of {c} tokens; the sequence-parallel "
                         f"prefill needs chunks of at least sink={state.sink} and recent={state.recent} tokens")
    positions = torch.arange(t, device=x.device)
    if kwargs.get("position_ids") is not None and not bool((kwargs["position_ids"] == positions).all()):
        raise ValueError("apply_duo_distributed takes prompts at positions 0..T-1 only")
    if cache is not None:
        cache.begin_prefill(t)
    state.chunk = (start, t)
    return args, {**kwargs, name: piece, "attention_mask": None,
                  "position_ids": torch.arange(start, start + c, device=x.device)[None]}


def _gather_hidden(state: _PromptSplit, module, args, output):
    """Forward hook of the base model after a prefill: last_hidden_state [B, C, H] of this rank's chunk becomes
    [B, n, H], the last n = ``logits_to_keep`` prompt positions (all T if 0), summed over ranks (each rank
    contributes the positions it holds, zeros elsewhere: exact)."""
    if state.chunk is None:
        return None
    (start, t), h = state.chunk, output.last_hidden_state
    lo = max(0, t - state.keep) if state.keep else 0
    out = h.new_zeros(h.shape[0], t - lo, h.shape[2])
    a, b = max(lo, start), min(t, start + h.shape[1])
    if a < b:
        out[:, a - lo:b - lo] = h[:, a - start:b - start]
    dist.all_reduce(out, group=state.group)
    output.last_hidden_state, state.chunk = out, None
    return output


def _prepare_sharded_cache(model, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                           max_cache_length: int, *args, **kwargs):
    """``generate``'s cache preparation under apply_duo_distributed: refuses what the sharded path cannot do
    (module docstring) and builds a :class:`ShardedDuoCache` of ``max_cache_length`` tokens unless given one."""
    if generation_config.num_beams > 1:
        raise ValueError("beam search is not supported under apply_duo_distributed")
    if generation_config.cache_implementation is not None:
        raise ValueError(f"cache_implementation={generation_config.cache_implementation!r} (static caches, CUDA "
                         "graphs) is not supported under apply_duo_distributed")
    if generation_config.prefill_chunk_size is not None:
        raise ValueError("prefill_chunk_size is not supported under apply_duo_distributed (the prefill is split over "
                         "the ranks instead)")
    name = cache_argument(type(model))
    if model_kwargs.get(name) is None and generation_config.use_cache is not False:
        model_kwargs[name] = ShardedDuoCache.from_model(model, max_cache_len=max_cache_length)
    return type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, generation_mode,
                                                     batch_size, max_cache_length, *args, **kwargs)


def _check_supported(model) -> None:
    """ValueError for layers the sequence-parallel attention does not compute (module docstring)."""
    windows = {getattr(m, "sliding_window", None) for m in attention_modules(model)}
    mixed = len(duo_layers(model.config)) != model.config.num_hidden_layers
    if windows != {None} or mixed or getattr(model.config, "attn_logit_softcapping", None) is not None:
        raise ValueError("sliding-window and soft-capped attention are not supported under DuoAttention across "
                         "processes")


def distribute_duo(model, group=None, exchange: str = "all_gather"):
    """Spread a model already prepared by :func:`~quantduo.duo.deploy.apply_duo` (window "chunk"; e.g. then
    quantized) over the ranks of ``group`` (module docstring; torch.distributed initialized): the "duo_dist"
    attention, a :class:`ShardedDuoCache` in ``generate`` and the prompt split. ``exchange``: the prefill's
    retrieval K/V exchange, one of :data:`~quantduo.duo.distributed.EXCHANGES`. KV heads must be a multiple of
    the world size. Returns the model; its ``generate`` / forward must then be called on every rank with the
    same inputs."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if not dist.is_initialized():
        raise ValueError("DuoAttention across processes needs torch.distributed initialized (e.g. under torchrun)")
    _check_supported(model)
    mods = attention_modules(model)
    if {getattr(m, "duo_window", None) for m in mods} != {"chunk"}:
        raise ValueError("distribute_duo needs a model prepared by apply_duo with the reference's chunk-level window "
                         "(window='chunk'; the per-token window is not computed across processes)")
    if getattr(model.config, "sliding_window", None) is not None and any(m.duo_keep_window for m in mods):
        raise ValueError("distribute_duo does not apply sliding windows: prepare the model with apply_duo(..., "
                         "respect_sliding_window=False), the reference's rule")
    n_kv = model.config.num_key_value_heads
    rows = torch.tensor([[h < m.duo_n_full for h in range(n_kv)] for m in mods])
    assignment = balanced_head_assignment(rows, dist.get_world_size(group))
    for attn, row, layer in zip(mods, rows, assignment):
        attn.duo_sharding = LayerSharding(group, dist.get_rank(group), layer, row, exchange)
    model.config._attn_implementation = "duo_dist"
    model._prepare_cache_for_generation = types.MethodType(_prepare_sharded_cache, model)
    state = _PromptSplit(group, mods[0].duo_sink, mods[0].duo_recent)
    model.register_forward_pre_hook(partial(_record_keep, state), with_kwargs=True)
    model.model.register_forward_pre_hook(partial(_split_prompt, state), with_kwargs=True)
    model.model.register_forward_hook(partial(_gather_hidden, state))
    return model


def apply_duo_distributed(model, retrieval: np.ndarray, sink: int, recent: int, group=None,
                          exchange: str = "all_gather"):
    """:func:`~quantduo.duo.deploy.apply_duo` (retrieval: bool [layers, kv_heads], sink, recent; the same on every
    rank) then :func:`distribute_duo` (``group``, ``exchange``). Returns the model."""
    _check_supported(model)
    return distribute_duo(apply_duo(model, retrieval, sink, recent), group, exchange)
