"""SKELETON, NOT YET RUN ON GPUs: DuoAttention across GPUs, one attention layer at Llama-3-8B shapes.

    torchrun --nproc-per-node N benchmarks/multi_gpu.py [--context 1048576] [--decode-context 1048576]

Times, with NCCL on N GPUs (one process per GPU), the two operations of :mod:`quantduo.duo.distributed`:
sequence-parallel prefill of one layer (each rank holds context / N tokens; retrieval heads all-gather K/V,
streaming heads only sinks + recent edges) and one head-sharded decode step (KV heads assigned by
balanced_head_assignment, each rank holding its heads' caches). Shapes: 32 query heads, 8 KV heads, head_dim
128, bf16, random post-RoPE q/k/v, a random retrieval pattern of --retrieval-fraction. Timings: CUDA events after
warm-up, median over --iters, the slowest rank's. Whole-model numbers, FLUX under diffusers' context parallelism
and the capacity at 8 x 80 GB (issue 22) are not here. Rank 0 prints one line per operation.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantduo.duo.distributed import (balanced_head_assignment, decode_shard, head_sharded_decode,  # noqa: E402
                                      query_heads, sequence_parallel_prefill)

HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1 << 20, help="prefill tokens over all ranks")
    p.add_argument("--decode-context", type=int, default=1 << 20, help="tokens in the cache for the decode step")
    p.add_argument("--retrieval-fraction", type=float, default=0.5, help="share of retrieval KV heads")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--recent", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    return p.parse_args(argv)


def timed(fn, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after one warm-up, the slowest rank's."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    ms = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def retrieval_row(fraction: float) -> torch.Tensor:
    """bool [HKV]: a fixed random pattern (same on every rank) with round(fraction * HKV) retrieval heads."""
    perm = torch.randperm(HKV, generator=torch.Generator().manual_seed(0))
    return torch.zeros(HKV, dtype=torch.bool).index_fill_(0, perm[:round(fraction * HKV)], True)


def bench_prefill(args, row: torch.Tensor, world: int) -> float:
    """One layer's sequence-parallel prefill of this rank's context / world tokens (bf16, batch 1); ms."""
    c = args.context // world
    q = torch.randn(1, HQ, c, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, HKV, c, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return timed(lambda: sequence_parallel_prefill(q, k, v, row, args.sink, args.recent, D ** -0.5), args.iters)


def bench_decode(args, row: torch.Tensor, world: int, rank: int) -> float:
    """One layer's head-sharded decode step over --decode-context cached tokens (bf16, batch 1); ms."""
    layer = balanced_head_assignment(row[None], world)[0]
    heads = layer[rank]
    k, v = (torch.randn(1, HKV, args.decode_context, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    shard = decode_shard(k, v, heads, int(row[heads].sum()), args.sink, args.recent)
    del k, v
    q = torch.randn(1, len(query_heads(heads, HQ // HKV)), 1, D, device="cuda", dtype=torch.bfloat16)
    return timed(lambda: head_sharded_decode(q, shard, layer, D ** -0.5), args.iters)


def main(argv=None) -> None:
    args = parse_args(argv)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    row = retrieval_row(args.retrieval_fraction)
    prefill = bench_prefill(args, row, world)
    decode = bench_decode(args, row, world, rank)
    if rank == 0:
        print(f"gpus={world} prefill_layer context={args.context} ms={prefill:.3f}")
        print(f"gpus={world} decode_layer context={args.decode_context} ms={decode:.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
