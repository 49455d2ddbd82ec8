"""apply_duo_distributed on CPU: greedy ``generate()`` in 2 gloo processes (torch.multiprocessing.spawn) on a tiny
Llama with a fixed 50 % streaming pattern equals the single-process apply_duo ``generate`` with the same prefill
chunks (tokens on every rank; logits of the prefill and of every decode step) and the reference rules of
tests/duo/reference_impl.py (independent of quantduo's code); each rank's cache holds only its KV heads; the
unsupported combinations raise. One spawn runs every check (one process start)."""
import copy
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantduo.duo.compat import cache_kwargs
from quantduo.duo.deploy import apply_duo
from quantduo.duo.distributed_model import ShardedDuoCache, apply_duo_distributed, distribute_duo
from tests.duo.reference_impl import reference_logits
from tests.duo.test_deploy import tiny_model

WORLD, SINK, RECENT, PROMPT, NEW = 2, 3, 8, 61, 12  # chunks of 31 and 30 (+1 padding) tokens
CHUNK = -(-PROMPT // WORLD)
# 6 of 12 KV heads streaming; odd retrieval counts per layer, so the ranks' layers differ
RETRIEVAL = np.array([[True, True, False, True], [False, False, True, False], [True, False, False, True]])
# float32 logits (max |logit| 0.66): measured max difference 9e-8 vs the single-process generate, 1.2e-7 vs the
# reference rules, 1.9e-7 for the uncached prefill; the chunked streaming rule moves them by 0.68 from full attention
TOL = 1e-5
HEAD_DIM, N_KV, BATCH = 8, 4, 2


def _generate(model, prompt, **kw):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, 1)  # [B, PROMPT + NEW], [B, NEW, vocab]


def expected_layer_bytes(rank: int) -> list[int]:
    """Bytes of each layer of ``rank``'s cache (float32, max_cache_len PROMPT + NEW - 1), from the rule only: every
    rank holds N_KV / WORLD heads of each layer; the retrieval heads of all layers, counted layer by layer, go to
    ranks 0, 1, 0, 1, ...; a retrieval head stores every slot, a streaming head sink + recent + 1."""
    slots, ring, out, seen = PROMPT + NEW - 1, SINK + RECENT + 1, [], 0
    for row in RETRIEVAL:
        n_full = sum((seen + j) % WORLD == rank for j in range(int(row.sum())))
        seen += int(row.sum())
        out.append(2 * BATCH * HEAD_DIM * 4 * (n_full * slots + (N_KV // WORLD - n_full) * ring))
    return out


def _check_generate(rank: int, model, prompt) -> None:
    single = apply_duo(copy.deepcopy(model), RETRIEVAL, SINK, RECENT)
    ids, logits = _generate(single, prompt, prefill_chunk_size=CHUNK)
    seq = ids[:, :-1]  # the reference: the same tokens fed as the prefill chunks, then one by one
    ref = reference_logits(model, RETRIEVAL, SINK, RECENT, seq, [CHUNK, PROMPT - CHUNK] + [1] * (NEW - 1))
    assert (ref[:, PROMPT - 1:] - logits).abs().max() < TOL
    for exchange in ("all_gather", "ring"):
        duo = apply_duo_distributed(copy.deepcopy(model), RETRIEVAL, SINK, RECENT, exchange=exchange)
        cache = ShardedDuoCache.from_model(duo, max_cache_len=PROMPT + NEW - 1)
        d_ids, d_logits = _generate(duo, prompt, **cache_kwargs(duo, cache))
        assert torch.equal(d_ids, ids), f"{exchange}: rank {rank} generated other tokens"
        err = (d_logits - logits).abs().max().item()
        assert err < TOL, f"{exchange}: logits differ by {err}"
        assert (d_logits - ref[:, PROMPT - 1:]).abs().max() < TOL
        held = [layer.memory_bytes() for layer in cache.layers]
        assert held == expected_layer_bytes(rank), f"rank {rank}: {held} bytes"
        with torch.no_grad():  # a forward without a cache: every position's logits, prompt split over the ranks
            prefill = duo(input_ids=prompt).logits
        assert (prefill - ref[:, :PROMPT]).abs().max() < TOL


def _check_refusals(model, prompt) -> None:
    duo = apply_duo_distributed(copy.deepcopy(model), RETRIEVAL, SINK, RECENT)
    padded = torch.ones_like(prompt)
    padded[0, :3] = 0
    cases = [({"num_beams": 2}, "beam search"), ({"cache_implementation": "static"}, "static"),
             ({"attention_mask": padded}, "padded"), ({"prefill_chunk_size": 8}, "prefill_chunk_size")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            duo.generate(prompt, **{"attention_mask": torch.ones_like(prompt), **kwargs}, max_new_tokens=2,
                         do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="chunks of 5 tokens"):
        duo.generate(prompt[:, :9], max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="window"):
        distribute_duo(apply_duo(copy.deepcopy(model), RETRIEVAL, SINK, RECENT, window="token"))


def _worker(rank: int, init: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        model = tiny_model("llama", seed=7)
        prompt = torch.randint(0, 64, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
        _check_generate(rank, model, prompt)
        _check_refusals(model, prompt)
    finally:
        dist.destroy_process_group()


def test_distributed_generate_matches_single_process(tmp_path):
    """Workers raise on a mismatch, which spawn re-raises here."""
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}",), nprocs=WORLD, join=True)


def test_expected_bytes_are_balanced_and_smaller_than_single_process():
    """The expectation itself: the ranks' layers differ (so a wrong assignment shows), together they hold the
    single-process DuoCache's bytes, and each rank about half of them."""
    ring = SINK + RECENT + 1
    single = 2 * BATCH * HEAD_DIM * 4 * (RETRIEVAL.sum() * (PROMPT + NEW - 1) + (~RETRIEVAL).sum() * ring)
    per_rank = [expected_layer_bytes(r) for r in range(WORLD)]
    assert per_rank[0] != per_rank[1]
    assert sum(map(sum, per_rank)) == single
    assert max(map(sum, per_rank)) < 0.6 * single
