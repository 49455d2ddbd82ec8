"""NOT YET RUN ON GPUs: the full-size FLUX.1 transformer, one 1024x1024 step, under diffusers' context parallelism.

    torchrun --nproc-per-node N benchmarks/multi_gpu_flux.py [--variants bf16 svdq-auto] [--modes ring ulysses]
        [--warmup 3] [--reps 10] [--ring-backend _native_flash] [--ulysses-backend native]
    torchrun --nproc-per-node 1 benchmarks/multi_gpu_flux.py [--variants ...]      # the single-GPU rows
    torchrun --nproc-per-node 2 benchmarks/multi_gpu_flux.py --small              # CPU smoke run (gloo)

Model, inputs and variants are :mod:`benchmarks.flux`'s (FLUX.1-dev configuration, random BF16 weights, 4096 image +
512 text tokens, batch 1; the quantized variants built by its fast path ``fast_svdquant``; ``bf16`` and the
``svdq-*`` variants of ``flux.VARIANT_EXECUTIONS``). With N = WORLD_SIZE > 1 (NCCL, one GPU per rank) each variant
runs under ``model.enable_parallelism(config=ContextParallelConfig(ring_degree=N))`` and
``ContextParallelConfig(ulysses_degree=N)`` (Ulysses needs N to divide the 24 heads: 2, 3, 4, 6, 8); the sequence is
split over the ranks, quantduo adds nothing. Ring attention needs a backend returning the log-sum-exp
(``--ring-backend``: ``_native_flash``, ``_native_cudnn``, ``flash``). With N = 1 each variant runs once without
parallelism (mode ``single``): run it separately for the single-GPU timing.

Timing: CUDA events around one forward after ``--warmup`` forwards, median of ``--reps``, the slowest rank's. Rank 0
prints one JSON line per (variant, mode): ``median_ms`` and, with N > 1, ``max_rel_diff_vs_single`` (max |parallel -
single| / max |single|) and ``rel_err_vs_single`` (norm-wise) against the single-GPU output of the same model that
rank 0 computes in the same run before enabling parallelism.

``--small``: the 2-block configuration of :mod:`benchmarks.flux`, 64 + 16 tokens, on the CPU with gloo, with the two
test-only shims of ``tests/integrations/diffusers/cp_harness.py`` (diffusers' rank placement resolved to the CPU; a
CPU kernel for the flash attention op of the ring backend): proves the script path, times nothing meaningful.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import flux  # noqa: E402
from quantduo.integrations.diffusers import enable_fusions, resolved_rules  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402
from tests.integrations.diffusers.cp_harness import cpu_as_the_accelerator, flash_attention_on_cpu  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["bf16", "svdq-auto"],
                   choices=["bf16", *flux.VARIANT_EXECUTIONS])
    p.add_argument("--modes", nargs="+", default=["ring", "ulysses"], choices=["ring", "ulysses"])
    p.add_argument("--steps", type=int, default=1, help="transformer calls per timed step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ring-backend", default="_native_flash")
    p.add_argument("--ulysses-backend", default="native")
    p.add_argument("--small", action="store_true", help="2-block model, 64+16 tokens, CPU + gloo (smoke run)")
    return p.parse_args(argv)


def variant_model(config: dict, device: str, variant: str) -> tuple[nn.Module, dict]:
    """(the random BF16 FLUX with ``variant``'s modules swapped in, its inputs); every rank builds the same."""
    model = flux.build_model(config, device)
    inputs = flux.make_inputs(model, *((64, 16) if config is flux.SMALL else (4096, 512)), device)
    if variant != "bf16":
        rules = resolved_rules(model, **inputs)
        with torch.no_grad():
            for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
                module = flux.variant_module(name, linear, variant, rules)
                if module is not None:
                    model.set_submodule(name, module)
            enable_fusions(model)
    return model, inputs


def parallel_copy(model: nn.Module, mode: str, world: int, args) -> nn.Module:
    """A copy of ``model`` under diffusers' ``mode`` context parallelism over ``world`` ranks."""
    parallel = copy.deepcopy(model)
    parallel.set_attention_backend(args.ring_backend if mode == "ring" else args.ulysses_backend)
    parallel.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": world}))
    return parallel


def slowest_median_ms(model: nn.Module, inputs: dict, args) -> float:
    """Median ms of ``args.steps`` forwards (:func:`benchmarks.flux.time_forward`), the slowest rank's. Each output
    is cloned: diffusers gathers it with an asynchronous functional collective, which an op on it waits for (else
    the timing could end before the gather)."""
    def step(**kwargs):
        for _ in range(args.steps):
            out = model(**kwargs)[0].clone()
        return out
    ms = torch.tensor([statistics.median(flux.time_forward(step, inputs, args.warmup, args.reps))],
                      device=inputs["hidden_states"].device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def differences(out: torch.Tensor, single: torch.Tensor) -> dict:
    """max |out - single| / max |single| and the norm-wise relative error, float32."""
    out, single = out.float(), single.float()
    return dict(max_rel_diff_vs_single=float((out - single).abs().max() / single.abs().max()),
                rel_err_vs_single=relative_error(out, single))


def run_variant(variant: str, config: dict, device: str, args, rank: int, world: int) -> list[dict]:
    """The rows of ``variant``: ``single`` when ``world`` is 1, else one per mode."""
    model, inputs = variant_model(config, device, variant)
    base = dict(variant=variant, world=world, tokens=inputs["hidden_states"].shape[1] +
                inputs["encoder_hidden_states"].shape[1], device=str(device))
    with torch.no_grad():
        if world == 1:
            return [dict(base, mode="single", median_ms=slowest_median_ms(model, inputs, args))]
        single = model(**inputs)[0] if rank == 0 else None
        rows = []
        for mode in args.modes:
            parallel = parallel_copy(model, mode, world, args)
            out = parallel(**inputs)[0].clone()
            row = dict(base, mode=mode, median_ms=slowest_median_ms(parallel, inputs, args))
            rows.append(dict(row, **differences(out, single)) if rank == 0 else row)
            del parallel
        return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.small:
        cpu_as_the_accelerator()
        flash_attention_on_cpu()
        device, config = "cpu", flux.SMALL
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device, config = f"cuda:{torch.cuda.current_device()}", flux.FLUX_DEV
    dist.init_process_group("gloo" if args.small else "nccl")
    try:
        for variant in args.variants:
            for row in run_variant(variant, config, device, args, rank, world):
                if rank == 0:
                    print(json.dumps(row), flush=True)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
