"""DuoAttention across GPUs (torch.distributed, one process per GPU): one attention layer and the whole model at
Llama-3-8B shapes (random weights). NOT YET RUN ON GPUs: only the CPU smoke run (--small, gloo, tiny shapes, every
mode) has run; no GPU number exists yet.

    torchrun --nproc-per-node N benchmarks/multi_gpu.py [--modes layer model capacity] [--context 1048576]
        [--exchange all_gather|ring] [--baseline-ms MS]
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --small      # CPU smoke test (gloo, tiny shapes)

Modes (NCCL on GPUs; gloo on the CPU with --small):
  layer: the two operations of :mod:`quantduo.duo.distributed` on one layer (32 query / 8 KV heads, head_dim 128,
      bf16, random post-RoPE q/k/v): sequence-parallel prefill (each rank holds context / N tokens; retrieval
      heads exchange K/V by --exchange, streaming heads only sinks + recent edges) and one head-sharded decode
      step over --decode-context cached tokens.
  model: the whole model (:func:`~quantduo.duo.distributed_model.apply_duo_distributed`, bf16 weights replicated
      on every rank, 50 % retrieval heads): prefill of --context tokens split by sequence over the ranks (one
      pass per rank, cache moved to head-sharded) and eager decode ms/token after it; KV bytes of the fullest rank.
      Prefill scaling = time(1 GPU) / (N x time(N GPUs)): give the 1-GPU run's prefill ms (same --context, run with
      --nproc-per-node 1) as --baseline-ms. One pass over a 1M-token context does not fit one 80 GB GPU (the MLP
      activations of 1M tokens alone take ~90 GB), so the 1-GPU baseline needs a --context that fits.
  capacity: W4A16 weights (quantized before distribution, identically on every rank) + INT4 KV + DuoAttention:
      the largest of --capacity (total tokens) whose per-rank sharded cache (synthetic contents, as
      benchmarks/duo.py's capacity mode) + eager decode steps run on every rank; ranks agree on out-of-memory
      after allocating the cache (an OOM inside a later decode step would hang the other ranks).
Timings: wall clock around each call after one warm-up (device synchronized, ranks barrier-aligned), median over
--iters, the slowest rank's. Rank 0 prints one line per result. FLUX under diffusers' context parallelism is not
here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.duo import fill_synthetic, llama3_8b_config  # noqa: E402
from quantduo.duo.compat import cache_kwargs  # noqa: E402
from quantduo.duo.deploy import apply_duo  # noqa: E402
from quantduo.duo.distributed import (EXCHANGES, balanced_head_assignment, decode_shard,  # noqa: E402
                                      head_sharded_decode, query_heads, sequence_parallel_prefill)
from quantduo.duo.distributed_model import ShardedDuoCache, distribute_duo  # noqa: E402
from quantduo.integrations.transformers import quantize_causal_lm, weight_bytes  # noqa: E402

MODES = ("layer", "model", "capacity")
GB = 1e9
SLACK = 64  # cache slots beyond the context for the decode steps
FULL = dict(context=1 << 20, decode_context=1 << 20, sink=64, recent=256,
            capacity=[2_000_000, 4_000_000, 8_000_000, 12_000_000, 16_000_000, 20_000_000, 24_000_000])
SMALL = dict(context=512, decode_context=512, sink=4, recent=16, capacity=[256, 1024])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--small", action="store_true", help="CPU smoke run: gloo, tiny shapes and contexts")
    p.add_argument("--context", type=int, help="prefill tokens over all ranks (default 1M; --small 512)")
    p.add_argument("--decode-context", type=int, help="layer mode: tokens in the cache for the decode step")
    p.add_argument("--capacity", type=int, nargs="*", help="capacity mode: total contexts tried, increasing")
    p.add_argument("--exchange", choices=EXCHANGES, default="all_gather", help="retrieval heads' K/V in the prefill")
    p.add_argument("--baseline-ms", type=float, help="model mode: the 1-GPU prefill ms at the same --context")
    p.add_argument("--retrieval-fraction", type=float, default=0.5, help="share of retrieval KV heads")
    p.add_argument("--sink", type=int)
    p.add_argument("--recent", type=int)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=10)
    args = p.parse_args(argv)
    for name, value in (SMALL if args.small else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def small_config(max_pos: int) -> LlamaConfig:
    """Tiny Llama for the CPU smoke run (head_dim 128 as the synthetic cache fill expects; 2 KV heads)."""
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=128, max_position_embeddings=max_pos,
                       attn_implementation="sdpa", tie_word_embeddings=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after one warm-up, the slowest rank's."""
    fn()
    times = []
    for _ in range(iters):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    ms = torch.tensor([statistics.median(times)], device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def retrieval_mask(layers: int, heads: int, fraction: float, seed: int = 0) -> np.ndarray:
    """bool [layers, heads]: a fixed random pattern (same on every rank), round(fraction * heads) retrieval heads
    per layer."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(np.arange(heads) < round(fraction * heads)) for _ in range(layers)])


def bench_layer(args, cfg, device, world: int, rank: int) -> dict:
    """One layer's sequence-parallel prefill (this rank's context / world tokens) and head-sharded decode step over
    --decode-context tokens (batch 1, bf16); ms."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    row = torch.from_numpy(retrieval_mask(1, hkv, args.retrieval_fraction)[0])
    c = args.context // world
    q = torch.randn(1, hq, c, d, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, hkv, c, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    prefill = timed(lambda: sequence_parallel_prefill(q, k, v, row, args.sink, args.recent, d ** -0.5,
                                                      exchange=args.exchange), args.iters, device)
    del q, k, v
    layer = balanced_head_assignment(row[None], world)[0]
    heads = layer[rank]
    k, v = (torch.randn(1, hkv, args.decode_context, d, device=device, dtype=torch.bfloat16) for _ in range(2))
    shard = decode_shard(k, v, heads, int(row[heads].sum()), args.sink, args.recent)
    del k, v
    q = torch.randn(1, len(query_heads(heads, hq // hkv)), 1, d, device=device, dtype=torch.bfloat16)
    return dict(prefill=prefill, decode=timed(lambda: head_sharded_decode(q, shard, layer, d ** -0.5), args.iters,
                                              device))


def build_duo_model(cfg, args, device):
    """Random bf16 model (same weights on every rank: seeded) with DuoAttention applied (not yet distributed)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    mask = retrieval_mask(cfg.num_hidden_layers, cfg.num_key_value_heads, args.retrieval_fraction)
    return apply_duo(model, mask, args.sink, args.recent)


def max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


@torch.no_grad()
def bench_model(model, args, device) -> dict:
    """Whole-model prefill of --context tokens (split over the ranks, batch 1) into a fresh ShardedDuoCache, then
    eager decode steps after it: ms, ms/token, KV bytes of the fullest rank."""
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    cache = ShardedDuoCache.from_model(model, max_cache_len=args.context + args.decode_steps + SLACK)

    def prefill():
        cache.reset()
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))

    ms = timed(prefill, args.iters, device)
    tok = ids[:, -1:]
    decode = timed(lambda: model(input_ids=tok, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)),
                   args.decode_steps, device)
    return dict(prefill=ms, decode=decode, kv=max_over_ranks(cache.memory_bytes(), device))


@torch.no_grad()
def decode_at(model, n: int, args, device) -> dict | None:
    """Per-rank INT4 sharded cache of n tokens (synthetic contents) + eager decode ms/token; None when any rank
    ran out of memory allocating it (agreed over ranks)."""
    cache, failed = None, 0.0
    try:
        cache = ShardedDuoCache.from_model(model, max_cache_len=n + args.decode_steps + SLACK, kv_bits=4)
        fill_synthetic(model, cache, n)
    except torch.OutOfMemoryError:
        cache, failed = None, 1.0
    if max_over_ranks(failed, device):
        return None
    tok = torch.ones(1, 1, dtype=torch.long, device=device)
    ms = timed(lambda: model(input_ids=tok, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)),
               args.decode_steps, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return dict(decode=ms, kv=max_over_ranks(cache.memory_bytes(), device), peak=max_over_ranks(peak, device))


def capacity_search(model, args, device, say) -> None:
    """Quantize to W4A16 (calibration on the undistributed model: the same weights on every rank), distribute,
    then the largest of --capacity that runs (module docstring)."""
    calibration = torch.randint(0, model.config.vocab_size, (1, 256), device=device,
                                generator=torch.Generator(device).manual_seed(1))
    quantize_causal_lm(model, calibration, "w4a16", progress=False)
    distribute_duo(model, exchange=args.exchange)
    say(f"capacity: W4A16 weights {weight_bytes(model) / GB:.2f} GB per rank, INT4 KV, DuoAttention")
    for n in sorted(args.capacity):
        res = decode_at(model, n, args, device)
        say(f"capacity N={n}: {res if res is not None else 'OOM'}")
        if res is None:
            break
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("gloo" if args.small else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.small:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    top = max([args.context, args.decode_context] + args.capacity) + 4096
    cfg = small_config(top) if args.small else llama3_8b_config(top)
    tag = f"{'cpu-small' if args.small else torch.cuda.get_device_name(device)} ranks={world}"
    if "layer" in args.modes:
        res = bench_layer(args, cfg, device, world, rank)
        say(f"{tag} layer prefill context={args.context} exchange={args.exchange} ms={res['prefill']:.3f}")
        say(f"{tag} layer decode context={args.decode_context} ms={res['decode']:.4f}")
    if "model" in args.modes:
        model = distribute_duo(build_duo_model(cfg, args, device), exchange=args.exchange)
        res = bench_model(model, args, device)
        scaling = "" if args.baseline_ms is None else f" scaling={args.baseline_ms / (world * res['prefill']):.3f}"
        say(f"{tag} model prefill context={args.context} exchange={args.exchange} ms={res['prefill']:.1f}{scaling}")
        say(f"{tag} model decode context={args.context} ms/token={res['decode']:.2f} kv_bytes_per_rank={res['kv']:.0f}")
        del model
    if "capacity" in args.modes:  # last: quantizes its model in place
        capacity_search(build_duo_model(cfg, args, device), args, device, say)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
