"""DuoAttention across processes with torch.distributed: sequence-parallel prefill and head-sharded decode of one
layer, and the move of a prefilled layer's K/V from sequence-sharded to head-sharded (:func:`shard_prefilled_kv`).
The model-level wiring, ``generate()`` under ``torchrun``, is :mod:`quantduo.duo.distributed_model`.

Head order is the model's original one (a bool ``retrieval`` row [Hkv] per layer says which KV heads are
retrieval heads); q has Hq = rep * Hkv heads, query head i belonging to KV head i // rep (GQA).

Prefill (:func:`sequence_parallel_prefill`): the sequence is split into equal contiguous chunks of C tokens, rank
r holding positions r * C .. (r + 1) * C - 1. Under the reference's chunk-level rule (:mod:`quantduo.duo.cache`)
rank 0's chunk is the first chunk (dense causal for every head) and rank r > 0's is a later chunk: its streaming
heads see the sinks (positions < sink, held by rank 0), the last ``recent`` positions before r * C (held by rank
r - 1) and the chunk itself, causally; its retrieval heads see every earlier position. Streaming heads all-gather
only each rank's first ``sink`` and last ``recent`` keys (O(world * (sink + recent)), independent of T).
Retrieval heads exchange their K/V (O(T) per rank) in one of two ways (``exchange``): ``"all_gather"`` (every
chunk to every rank at once: the most memory, (rank + 1) * C keys per rank) or ``"ring"`` (each rank passes K/V
blocks to the next rank with point-to-point sends, world - 1 steps; a rank keeps one block in flight besides its
own and merges each block's attention into a running output by log-sum-exp, the online softmax; the transfer of
the next block overlaps the attention over the current one). Causality: rank r needs the blocks of ranks < r
only, so the ring does not wrap and the last rank does the most work in both modes.

Decode: the layout question. A decode step's cost (time and KV memory) is dominated by the retrieval heads, whose
caches hold every token, while a streaming head holds ``sink + recent + 1`` tokens. Sharding KV heads
contiguously (the usual tensor-parallel split) puts clustered retrieval heads on one rank, and after
:func:`quantduo.duo.deploy.reorder_heads` (retrieval heads first) it puts them all on the first ranks: that rank
holds the long caches and sets the step time. :func:`balanced_head_assignment` instead gives every rank the same
number of KV heads (equal-shape collectives, equal q/k/v/o projection shards) and, per layer and summed over
layers, retrieval-head counts that differ by at most one. :func:`head_sharded_decode` computes one rank's heads
and all-gathers the outputs.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from quantduo.duo import attention as A
from quantduo.duo.cache import DuoKV, kept_positions, window_positions


def balanced_head_assignment(retrieval: torch.Tensor, world_size: int) -> list[list[list[int]]]:
    """KV heads of each rank, per layer: ``out[layer][rank]`` = that rank's KV head indices, retrieval heads first
    (ascending), then streaming heads (ascending).

    retrieval: bool [layers, Hkv] (True: retrieval head); Hkv must be a multiple of ``world_size``.
    Rule: every rank gets Hkv / world_size heads. The retrieval heads of all layers, taken layer by layer in head
    order, are dealt round-robin over the ranks as one continuous sequence (layer l starts at the rank after the
    one that got layer l - 1's last retrieval head); each rank then fills up with the layer's streaming heads in
    head order. Hence per layer each rank holds floor(R / W) or ceil(R / W) of the layer's R retrieval heads, and
    over all layers the ranks' totals also differ by at most one (both optimal).
    """
    layers, heads = retrieval.shape
    if world_size < 1 or heads % world_size:
        raise ValueError(f"{heads} KV heads cannot be split evenly over {world_size} ranks")
    per_rank, offset, out = heads // world_size, 0, []
    for row in retrieval.tolist():
        ranks = [[] for _ in range(world_size)]
        full = [h for h in range(heads) if row[h]]
        for j, h in enumerate(full):
            ranks[(offset + j) % world_size].append(h)
        offset = (offset + len(full)) % world_size
        stream = iter(h for h in range(heads) if not row[h])
        for r in ranks:
            r.extend([next(stream) for _ in range(per_rank - len(r))])
        out.append(ranks)
    return out


def query_heads(kv_heads: list[int] | torch.Tensor, rep: int, device=None) -> torch.Tensor:
    """int64 [len(kv_heads) * rep]: the query heads of the given KV heads, in their order (GQA, rep per KV head)."""
    kv = torch.as_tensor(kv_heads, dtype=torch.long, device=device)
    return (kv[:, None] * rep + torch.arange(rep, device=device)).reshape(-1)


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape on all ranks), in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _full_heads_prefill(q, k, v, rank: int, scaling: float, group) -> torch.Tensor:
    """Retrieval heads: q [B, Hq', C, D], k/v [B, Hkv', C, D] of this rank's chunk; all-gathers K/V and attends
    causally over positions 0 .. (rank + 1) * C - 1. Returns [B, Hq', C, D]."""
    kv = _all_gather(torch.stack([k, v]), group)[:rank + 1]
    keys = torch.cat(kv, dim=3)  # [2, B, Hkv', (rank + 1) * C, D]
    return A.full_prefill(q, keys[0], keys[1], rank * q.shape[2], scaling)


def _ring_steps(rank: int, world: int) -> range:
    """Ring steps s = 1.. that ``rank`` takes part in: at step s rank r receives the block of rank r - s from
    rank r - 1 (if s <= r) and sends rank r - s + 1's block to rank r + 1 (if r + 1 < world and s <= r + 1)."""
    return range(1, min(rank + 1, world - 1) + 1)


def _ring_full_heads_prefill(q, k, v, rank: int, scaling: float, group) -> torch.Tensor:
    """Retrieval heads by ring exchange (module docstring): q [B, Hq', C, D], k/v [B, Hkv', C, D] of this rank's
    chunk; attends causally over positions 0 .. (rank + 1) * C - 1 (own block causal, earlier ranks' blocks whole,
    merged by log-sum-exp in :func:`~quantduo.duo.attention.accumulation_dtype`). Returns [B, Hq', C, D]."""
    world = dist.get_world_size(group)
    out, lse = A.attention_lse(q, k, v, True, scaling)
    current, received = torch.stack([k, v]), False  # [2, B, Hkv', C, D]: the block to pass on / attend to next
    for step in _ring_steps(rank, world):
        incoming = torch.empty_like(current) if step <= rank else None
        ops = ([dist.P2POp(dist.isend, current, group=group, group_peer=rank + 1)] if rank + 1 < world else []) + (
            [dist.P2POp(dist.irecv, incoming, group=group, group_peer=rank - 1)] if incoming is not None else [])
        requests = dist.batch_isend_irecv(ops)
        if received:  # overlaps the transfer: the block received at the previous step
            out, lse = A.merge_attention_lse(out, lse, *A.attention_lse(q, current[0], current[1], False, scaling))
        for request in requests:
            request.wait()
        current, received = (incoming, True) if incoming is not None else (current, False)
    if received:
        out, lse = A.merge_attention_lse(out, lse, *A.attention_lse(q, current[0], current[1], False, scaling))
    return out.to(q.dtype)


def _stream_heads_prefill(q, k, v, rank: int, sink: int, recent: int, scaling: float, group) -> torch.Tensor:
    """Streaming heads: q [B, Hq', C, D], k/v [B, Hkv', C, D] of this rank's chunk (start s = rank * C, needs
    sink <= C and recent <= C); all-gathers each rank's first ``sink`` and last ``recent`` keys, attends causally
    over :func:`~quantduo.duo.cache.window_positions` (s) then the chunk (s = 0: the chunk only).
    Returns [B, Hq', C, D]."""
    c = k.shape[2]
    edges = _all_gather(torch.stack([torch.cat([k[:, :, :sink], k[:, :, c - recent:]], 2),
                                     torch.cat([v[:, :, :sink], v[:, :, c - recent:]], 2)]), group)
    start = rank * c
    if rank:  # positions of the received keys: rank 0's first sink, then start - recent .. start - 1
        have = list(range(sink)) + list(range(start - recent, start))
        pick = torch.tensor([have.index(p) for p in window_positions(start, sink, recent)], device=k.device)
        window = torch.cat([edges[0][..., :sink, :], edges[rank - 1][..., sink:, :]], 3).index_select(3, pick)
        k, v = torch.cat([window[0], k], 2), torch.cat([window[1], v], 2)
    return A.full_prefill(q, k, v, k.shape[2] - c, scaling)


EXCHANGES = ("all_gather", "ring")


def sequence_parallel_prefill(q, k, v, retrieval: torch.Tensor, sink: int, recent: int, scaling: float,
                              group=None, exchange: str = "all_gather") -> torch.Tensor:
    """One layer's prefill attention of this rank's chunk (module docstring: rank r holds positions r * C ..).

    q [B, Hq, C, D], k/v [B, Hkv, C, D] (same C, dtype and device on every rank; post-RoPE), retrieval bool [Hkv]
    (same on every rank), sink <= C, 1 <= recent <= C; ``exchange``: how retrieval heads get the earlier chunks'
    K/V, one of :data:`EXCHANGES` (module docstring). Every rank must call it (collectives of ``group``).
    Returns [B, Hq, C, D] in q's dtype, equal to the reference's chunked prefill with chunks of C tokens.
    """
    c, rep = q.shape[2], q.shape[1] // k.shape[1]
    if sink > c or not 1 <= recent <= c:
        raise ValueError(f"need sink <= chunk and 1 <= recent <= chunk, got sink={sink}, recent={recent}, chunk={c}")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    full_heads = _full_heads_prefill if exchange == "all_gather" else _ring_full_heads_prefill
    rank = dist.get_rank(group)
    out = torch.empty_like(q)
    for is_full in (True, False):
        kv_idx = torch.nonzero(retrieval.to(q.device) == is_full).reshape(-1)
        if not len(kv_idx):  # every rank has the same row, so every rank skips the same collective
            continue
        q_idx = query_heads(kv_idx, rep, q.device)
        qs, ks, vs = q.index_select(1, q_idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx)
        o = (full_heads(qs, ks, vs, rank, scaling, group) if is_full
             else _stream_heads_prefill(qs, ks, vs, rank, sink, recent, scaling, group))
        out.index_copy_(1, q_idx, o)
    return out


def _split_heads(heads: list[int], retrieval: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(retrieval, streaming) KV head indices int64 of ``heads`` (retrieval heads first, as assigned)."""
    n_full = int(retrieval[heads].sum())
    return (torch.tensor(heads[:n_full], dtype=torch.long, device=device),
            torch.tensor(heads[n_full:], dtype=torch.long, device=device))


def _chunk_positions(r: int, c: int, length: int, sink: int, recent: int, device) -> tuple[torch.Tensor, ...]:
    """Indices int64 into rank r's chunk (positions r * c ..): its real positions (< length) and those of them the
    streaming ring keeps (:func:`~quantduo.duo.cache.kept_positions` (0, length))."""
    kept = [p - r * c for p in kept_positions(0, length, sink, recent) if r * c <= p < (r + 1) * c]
    return (torch.arange(max(0, min(c, length - r * c)), device=device),
            torch.tensor(kept, dtype=torch.long, device=device))


def shard_prefilled_kv(k, v, assignment: list[list[int]], retrieval: torch.Tensor, length: int, sink: int,
                       recent: int, group=None) -> tuple[torch.Tensor, ...]:
    """One layer's K/V after :func:`sequence_parallel_prefill`, from sequence-sharded to head-sharded.

    k/v [B, Hkv, C, D]: this rank's chunk (positions rank * C ..; positions >= ``length`` are padding, dropped);
    assignment: the layer's KV heads per rank (:func:`balanced_head_assignment`, retrieval heads first);
    retrieval bool [Hkv]; length: real tokens over all ranks. Every rank sends every other rank the part of its
    chunk that rank keeps (point-to-point, one batch): its retrieval heads at every real position, its streaming
    heads only at the positions the ring keeps (sinks, last ``recent + 1``). Every rank must call it.
    Returns this rank's (full_k, full_v [B, n_full, length, D], stream_k, stream_v [B, n_stream, n, D] at
    :func:`~quantduo.duo.cache.kept_positions` (0, length)): what :meth:`~quantduo.duo.cache.DuoLayer.load` takes.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    kv, (b, _, c, d) = torch.stack([k, v]), k.shape  # [2, B, Hkv, C, D]
    pos = [_chunk_positions(r, c, length, sink, recent, k.device) for r in range(world)]
    mine = _split_heads(assignment[rank], retrieval, k.device)
    sends = [torch.cat([kv.index_select(2, h).index_select(3, p).reshape(-1)
                        for h, p in zip(_split_heads(assignment[j], retrieval, k.device), pos[rank])])
             for j in range(world)]
    shapes = [[(2, b, len(h), len(p), d) for h, p in zip(mine, pos[r])] for r in range(world)]
    recvs = [sends[r] if r == rank else kv.new_empty(sum(math.prod(s) for s in shapes[r])) for r in range(world)]
    ops = [dist.P2POp(dist.isend, sends[j], group=group, group_peer=j) for j in range(world)
           if j != rank and sends[j].numel()]
    ops += [dist.P2POp(dist.irecv, recvs[r], group=group, group_peer=r) for r in range(world)
            if r != rank and recvs[r].numel()]
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    parts = [buf.split([math.prod(s) for s in shape]) for buf, shape in zip(recvs, shapes)]
    full, stream = (torch.cat([part[i].view(shape[i]) for part, shape in zip(parts, shapes)], 3) for i in range(2))
    return full[0], full[1], stream[0], stream[1]


def decode_shard(k, v, heads: list[int], n_full: int, sink: int, recent: int) -> DuoKV:
    """One rank's decode view of a layer from full-length k/v [B, Hkv, T, D] (positions 0..T-1, the new token at
    T - 1): its ``heads`` (as :func:`balanced_head_assignment` orders them, the first ``n_full`` retrieval), the
    retrieval heads with all T keys, the streaming heads with the sinks, the last ``recent`` keys before the new
    token, and the new one. Returns a decoding :class:`~quantduo.duo.cache.DuoKV` (what a DuoCache built for
    those heads hands a decode step)."""
    t = k.shape[2]
    idx = torch.as_tensor(heads, dtype=torch.long, device=k.device)
    full, stream = idx[:n_full], idx[n_full:]
    pos = torch.tensor(window_positions(t - 1, sink, recent) + [t - 1], device=k.device)
    return DuoKV(k.index_select(1, full), v.index_select(1, full),
                 k.index_select(1, stream).index_select(2, pos), v.index_select(1, stream).index_select(2, pos),
                 None, t - 1, decoding=True)


def head_sharded_decode(q, kv: DuoKV, assignment: list[list[int]], scaling: float, group=None) -> torch.Tensor:
    """One layer's decode step with KV heads sharded over ranks.

    q [B, n * rep, 1, D]: this rank's query heads (:func:`query_heads` of ``assignment[rank]``, in that order);
    kv: this rank's caches (:func:`decode_shard`: n_full retrieval heads, then streaming heads); assignment: the
    layer's KV heads per rank (:func:`balanced_head_assignment`; the same head count on every rank).
    Every rank must call it. Returns [B, Hq, 1, D] in q's dtype, every head of the layer in model order.
    """
    rep = q.shape[1] // len(assignment[dist.get_rank(group)])
    nq_full = kv.n_full * rep
    groups = ((q[:, :nq_full], kv.full_k, kv.full_v), (q[:, nq_full:], kv.stream_k, kv.stream_v))
    local = torch.cat([A.decode(qg, kg, vg, scaling) if qg.shape[1] else qg for qg, kg, vg in groups], 1)
    gathered = torch.cat(_all_gather(local, group), 1)
    order = query_heads([h for heads in assignment for h in heads], rep, q.device)
    return torch.empty_like(gathered).index_copy_(1, order, gathered)
