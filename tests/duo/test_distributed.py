"""quantduo.duo.distributed on CPU: 2 and 3 gloo processes (torch.multiprocessing.spawn) against the reference
rules of tests/duo/reference_impl.py (chunked prefill with one chunk per rank, retrieval heads exchanged by
all-gather and by ring; a decode step), plus the balance
property of the head assignment. Each spawn runs every case in its workers (one process start per world size)."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantduo.duo.distributed import (EXCHANGES, balanced_head_assignment, decode_shard, head_sharded_decode,
                                      query_heads, sequence_parallel_prefill)
from tests.duo.reference_impl import visible

# (dtype, chunk per rank, sink, recent, retrieval row over 6 KV heads): clustered, all full, all streaming, mixed;
# recent > sink window overlap with the sinks on rank 1 (chunk 5, sink 3, recent 4)
CASES = [(torch.float64, 8, 2, 3, [True, True, True, False, False, False]),
         (torch.float64, 5, 3, 4, [False, True, False, False, True, True]),
         (torch.float32, 6, 1, 6, [True] * 6),
         (torch.float64, 4, 0, 2, [False] * 6)]
HKV, REP, D, B = 6, 2, 8, 2


def reference_attention(q, k, v, retrieval, sink: int, recent: int, starts: list[int]) -> torch.Tensor:
    """Float64 attention of q [B, Hq, T, D] over k/v [B, Hkv, T, D] under the reference rules (chunks starting at
    ``starts``, positions 0..T-1)."""
    t, rep = q.shape[2], q.shape[1] // k.shape[1]
    chunk_start = [max(s for s in starts if s <= p) for p in range(t)]
    mask = torch.tensor([[[visible(p, kp, chunk_start[p], not retrieval[h // rep], sink, recent) for kp in range(t)]
                          for p in range(t)] for h in range(q.shape[1])])
    scores = q.double() @ k.repeat_interleave(rep, 1).double().transpose(-1, -2) * D ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.repeat_interleave(rep, 1).double()


def _tensors(seed: int, t: int, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, HKV * REP, t, D, generator=g, dtype=dtype),
            torch.randn(B, HKV, t, D, generator=g, dtype=dtype), torch.randn(B, HKV, t, D, generator=g, dtype=dtype))


def _check_prefill(rank: int, world: int, seed: int, dtype, c: int, sink: int, recent: int, row: list[bool]):
    q, k, v = _tensors(seed, world * c, dtype)
    mine = slice(rank * c, (rank + 1) * c)
    ref = reference_attention(q, k, v, row, sink, recent, list(range(0, world * c, c)))[:, :, mine]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for exchange in EXCHANGES:
        out = sequence_parallel_prefill(q[:, :, mine], k[:, :, mine], v[:, :, mine], torch.tensor(row), sink, recent,
                                        D ** -0.5, exchange=exchange)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol, msg=lambda m: f"{exchange}: {m}")


def _check_decode(rank: int, world: int, seed: int, dtype, t: int, sink: int, recent: int, row: list[bool]):
    q, k, v = _tensors(seed, t, dtype)
    q = q[:, :, -1:]
    layer = balanced_head_assignment(torch.tensor([row]), world)[0]
    heads = layer[rank]
    shard = decode_shard(k, v, heads, sum(row[h] for h in heads), sink, recent)
    out = head_sharded_decode(q.index_select(1, query_heads(heads, REP)), shard, layer, D ** -0.5)
    ref = _reference_decode(q, k, v, row, sink, recent)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)  # the decode reference's softmax is float32


def _reference_decode(q, k, v, row, sink: int, recent: int) -> torch.Tensor:
    """Float64 reference of one decode step: q [B, Hq, 1, D] at position T - 1 over k/v [B, Hkv, T, D]."""
    t = k.shape[2]
    qq = torch.cat([torch.zeros(B, q.shape[1], t - 1, D, dtype=q.dtype), q], 2)
    return reference_attention(qq, k, v, row, sink, recent, [0, t - 1])[:, :, -1:]


def _worker(rank: int, world: int, init: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for seed, (dtype, c, sink, recent, row) in enumerate(CASES):
            _check_prefill(rank, world, seed, dtype, c, sink, recent, row)
            _check_decode(rank, world, seed, dtype, world * c, sink, recent, row)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_reference(tmp_path, world):
    """Sequence-parallel prefill (full and streaming heads, one chunk per rank) and head-sharded decode equal the
    single-process reference rules; workers raise on a mismatch, which spawn re-raises here."""
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'rendezvous'}"), nprocs=world, join=True)


def _retrieval_counts(assignment, retrieval) -> torch.Tensor:
    """int [layers, world]: retrieval heads per rank per layer."""
    return torch.tensor([[int(retrieval[layer, heads].sum()) for heads in ranks]
                         for layer, ranks in enumerate(assignment)])


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_balanced_head_assignment(world):
    """Every head once, equal heads per rank, retrieval counts per layer and summed over layers within one,
    on clustered (first heads, last heads), all / no retrieval and random layers; retrieval heads first."""
    g = torch.Generator().manual_seed(world)
    heads = 8
    clustered = [[h < n for h in range(heads)] for n in range(heads + 1)]
    retrieval = torch.tensor(clustered + [row[::-1] for row in clustered]
                             + (torch.rand(20, heads, generator=g) < 0.3).tolist())
    assignment = balanced_head_assignment(retrieval, world)
    for layer, ranks in enumerate(assignment):
        assert sorted(h for r in ranks for h in r) == list(range(heads))
        assert all(len(r) == heads // world for r in ranks)
        for r in ranks:
            flags = retrieval[layer, r].tolist()
            assert flags == sorted(flags, reverse=True)
    counts = _retrieval_counts(assignment, retrieval)
    assert (counts.max(1).values - counts.min(1).values).max() <= 1
    total = counts.sum(0)
    assert total.max() - total.min() <= 1


def test_contiguous_sharding_is_unbalanced():
    """The layout question: contiguous KV-head shards of a layer whose retrieval heads cluster (as after
    reorder_heads) put all of them on one rank; the balanced assignment splits them evenly."""
    retrieval = torch.tensor([[True] * 4 + [False] * 4])
    contiguous = [[list(range(0, 4)), list(range(4, 8))]]
    assert _retrieval_counts(contiguous, retrieval).tolist() == [[4, 0]]
    assert _retrieval_counts(balanced_head_assignment(retrieval, 2), retrieval).tolist() == [[2, 2]]


def test_uneven_split_refused():
    with pytest.raises(ValueError, match="evenly"):
        balanced_head_assignment(torch.ones(2, 6, dtype=torch.bool), 4)
