"""A quantduo-quantized FLUX transformer under diffusers' own context parallelism (``enable_parallelism`` with
``ContextParallelConfig(ulysses_degree=2)``: the sequence split over ranks, heads exchanged all-to-all) gives the
single-process output, in the reference execution and through the kernels (Triton interpreter): 2 gloo processes on
the CPU. quantduo adds nothing for this: its layers work per token, so a sequence shard computes its own rows.

diffusers places each rank on an accelerator (``rank % torch.accelerator.device_count()``); the workers report one
CPU "device" so that it resolves to the CPU. Ring attention needs an attention backend returning the log-sum-exp,
which diffusers' native (SDPA) backend does not do on the CPU, so the CPU test covers Ulysses only.
"""
from __future__ import annotations

import copy
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")

from diffusers import ContextParallelConfig  # noqa: E402

from tests.integrations.diffusers.tiny_models import FAST, flux_inputs, samples_from, tiny_flux  # noqa: E402
from quantduo.engine.linear import cpu_kernels  # noqa: E402
from quantduo.integrations.diffusers import quantization_config, quantize_transformer  # noqa: E402
from quantduo.svdquant import set_execution  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

WORLD = 2
EXECUTIONS = ("reference", "exact", "a16", "fp8")


def _run(model, execution: str) -> torch.Tensor:
    """The transformer's output on fixed inputs (16 image + 8 text tokens), float16 through the kernels."""
    set_execution(model, execution)
    inputs = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in flux_inputs(model, 7).items()}
    with torch.no_grad():
        if execution == "reference":
            return model(**inputs)[0]
        with cpu_kernels():
            return model(**inputs)[0]


def _worker(rank: int, model_file: str, init: str) -> None:
    torch.accelerator.device_count = lambda: 1  # diffusers' device = rank % count: the CPU here
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    try:
        model = torch.load(model_file, weights_only=False)
        model.set_attention_backend("native")
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        # diffusers gathers the output with a functional collective: an op on it yields a plain tensor
        outputs = {execution: _run(model, execution).float() for execution in EXECUTIONS}
        if rank == 0:
            torch.save(outputs, model_file + ".parallel")
    finally:
        dist.destroy_process_group()


def test_quantized_flux_under_ulysses_context_parallelism_gives_the_single_process_output(tmp_path):
    fp = tiny_flux(seed=3)
    model = copy.deepcopy(fp)
    quantize_transformer(model, samples_from(lambda s: flux_inputs(fp, s), 2), quantization_config(model, **FAST),
                         progress=False)
    model = model.half()
    single = {execution: _run(model, execution) for execution in EXECUTIONS}
    model_file = str(tmp_path / "model.pt")
    torch.save(model, model_file)
    mp.spawn(_worker, args=(model_file, f"file://{tmp_path / 'rendezvous'}"), nprocs=WORLD, join=True)
    parallel = torch.load(model_file + ".parallel")
    for execution in EXECUTIONS:
        assert parallel[execution].shape == single[execution].shape
        assert type(parallel[execution]) is torch.Tensor
        assert relative_error(parallel[execution], single[execution].float()) < 1e-4, execution  # measured: 0 (same bits)
