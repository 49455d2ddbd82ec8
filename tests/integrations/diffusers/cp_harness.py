"""Harness of the context-parallel tests: a job of :class:`Case` s run once in one process (the expectation) and once
under diffusers' own context parallelism (``model.enable_parallelism(config=ContextParallelConfig(...))``) in
``WORLD`` processes: gloo on the CPU, NCCL with one GPU per rank.

What differs on the CPU from a GPU run (test-only shims, installed in the CPU workers only, nothing of diffusers
patched):

* diffusers places rank ``r`` on accelerator ``r % torch.accelerator.device_count()``, which is 0 on a CPU-only
  machine (``ZeroDivisionError``): :func:`cpu_as_the_accelerator` reports one "device", so the rank runs on the
  CPU (diffusers then builds a ``"cpu"`` device mesh over the gloo group).
* Ring attention merges per-KV-shard results by their log-sum-exp, so it needs a backend that returns it: diffusers'
  native (SDPA) backend does not; those that do all call CUDA kernels (flash-attn, cuDNN, aten's flash op).
  :func:`flash_attention_on_cpu` gives ``aten::_scaled_dot_product_flash_attention`` (what diffusers'
  ``"_native_flash"`` backend calls) a CPU kernel: PyTorch's own CPU flash attention. On GPUs that backend runs
  the CUDA flash kernel. Ulysses runs diffusers' ``"native"`` backend (SDPA) on either.
"""
from __future__ import annotations

import copy
import contextlib
import socket
import time
from dataclasses import dataclass, replace
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import ContextParallelConfig

from quantduo.engine.linear import cpu_kernels
from quantduo.integrations.cuda_graph import enable_cuda_graph
from quantduo.integrations.first_block_cache import enable_first_block_cache, first_block_cache_of
from quantduo.integrations.fp8_attention import enable_fp8_attention
from quantduo.svdquant import set_execution

WORLD = 2
TIMEOUT_S = 180
MODES = {"ulysses": (dict(ulysses_degree=WORLD), "native"), "ring": (dict(ring_degree=WORLD), "_native_flash")}
_KEEP = []  # the torch.library registration of flash_attention_on_cpu (dropped registrations are undone)


@dataclass(frozen=True)
class Case:
    """One run: ``model`` and ``calls`` name entries of the job; ``mode``: ``"ring"`` / ``"ulysses"`` (None: one
    process); ``execution`` of the quantized layers (None for an unquantized model; kernels through the Triton
    interpreter on the CPU unless ``"reference"``); ``fp8_attention``: quantduo's FP8 attention on;
    ``cache_threshold``: quantduo's first-block cache on; ``cuda_graph`` (CUDA): ``"eager"`` / ``"compiled"``, the
    forward replayed from CUDA graphs of the eager / ``torch.compile`` d forward; ``shard_only`` (a control that must differ): the attention
    processors lose their parallel config, so each rank attends within its own shard."""

    model: str
    calls: str
    mode: str | None = None
    execution: str | None = "reference"
    fp8_attention: bool = False
    cache_threshold: float | None = None
    cuda_graph: str | None = None
    shard_only: bool = False

    def single(self) -> "Case":
        return replace(self, mode=None, shard_only=False)


def cpu_as_the_accelerator() -> None:
    """Test-only shim (see the module docstring): diffusers' rank placement resolves to the CPU."""
    torch.accelerator.device_count = lambda: 1


def _flash_on_cpu(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """``aten::_scaled_dot_product_flash_attention`` of ``[B, H, S, D]`` CPU tensors: (out ``[B, H, S, D]``,
    logsumexp float32 ``[B, H, S]``) of PyTorch's CPU flash attention; empty tensors for the outputs only the
    backward reads."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal,
                                                                          scale=scale)
    unused = query.new_empty(0)
    return out, lse, unused, unused, query.shape[2], key.shape[2], unused, unused, unused


def flash_attention_on_cpu() -> None:
    """Test-only shim (see the module docstring): the flash attention op diffusers' ring backend calls runs on
    CPU tensors."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_scaled_dot_product_flash_attention", _flash_on_cpu, "CPU")
    _KEEP.append(lib)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepared(job: dict, case: Case) -> torch.nn.Module:
    """A copy of the job's model with the case's options; under ``case.mode``, context-parallel."""
    model = copy.deepcopy(job["models"][case.model])
    if case.fp8_attention:
        enable_fp8_attention(model)
    if case.cache_threshold is not None:
        enable_first_block_cache(model, case.cache_threshold)
    if case.mode is not None:
        degrees, backend = MODES[case.mode]
        model.set_attention_backend(backend)
        model.enable_parallelism(config=ContextParallelConfig(**degrees))
    if case.cuda_graph is not None:
        enable_cuda_graph(model, compile=case.cuda_graph == "compiled")
    if case.shard_only:
        for module in model.modules():
            if hasattr(module, "processor"):
                module.processor._parallel_config = None
    return model


def run_case(job: dict, case: Case) -> dict:
    """``{"out": float32 [calls, *output shape], "skipped": int64 [] (first-block cache skips; -1 without)}``."""
    model = _prepared(job, case)
    if case.execution is not None:
        set_execution(model, case.execution)
    kernels = cpu_kernels() if case.execution not in (None, "reference") and not torch.cuda.is_available() \
        else contextlib.nullcontext()
    with torch.no_grad(), kernels:
        out = torch.stack([model(**call)[0].float() for call in job["calls"][case.calls]])
    cache = first_block_cache_of(model)
    return {"out": out.cpu(), "skipped": torch.tensor(-1 if cache is None else cache.stats.skipped)}


def _worker(rank: int, job_file: str, port: int, backend: str) -> None:
    if backend == "gloo":
        cpu_as_the_accelerator()
        flash_attention_on_cpu()
    else:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        job = on_device(torch.load(job_file, weights_only=False), "cuda" if backend == "nccl" else "cpu")
        results = {name: run_case(job, case) for name, case in job["cases"].items()}
        if rank == 0:
            torch.save(results, job_file + ".out")
    finally:
        dist.destroy_process_group()


def on_device(job: dict, device: str) -> dict:
    """``job`` with its models and call arguments on ``device``."""
    calls = {k: [{n: v.to(device) if torch.is_tensor(v) else v for n, v in call.items()} for call in calls]
             for k, calls in job["calls"].items()}
    return dict(job, models={k: m.to(device) for k, m in job["models"].items()}, calls=calls)


def run_parallel(job: dict, tmp_path, backend: str = "gloo") -> dict:
    """Rank 0's :func:`run_case` of every case of ``job`` (``{"models", "calls", "cases": {name: Case}}``) under
    ``WORLD`` processes; fails the test when they take longer than ``TIMEOUT_S`` (a rank left out of a
    collective hangs)."""
    job_file = str(tmp_path / "job.pt")
    torch.save(job, job_file)
    context = mp.spawn(_worker, args=(job_file, free_port(), backend), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} context-parallel processes did not finish in {TIMEOUT_S} s")
    return torch.load(job_file + ".out")


def run_single(job: dict) -> dict:
    """The one-process result of every case of ``job`` (cases differing only by mode share it)."""
    singles: dict[Case, dict] = {}
    for case in job["cases"].values():
        if case.single() not in singles:
            singles[case.single()] = run_case(job, case.single())
    return {name: singles[case.single()] for name, case in job["cases"].items()}


def max_errors(parallel: torch.Tensor, single: torch.Tensor) -> tuple[float, float]:
    """(max |parallel - single|, that over max |single|) in float32."""
    diff = float((parallel.float() - single.float()).abs().max())
    return diff, diff / float(single.float().abs().max())


