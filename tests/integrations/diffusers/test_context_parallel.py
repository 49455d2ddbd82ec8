"""quantduo-quantized diffusers transformers under diffusers' own context parallelism (``enable_parallelism``;
Ulysses and ring, 2 gloo processes on the CPU, see :mod:`.cp_harness` for the two test-only shims) give the
single-process output: tiny FLUX (2 heads x 64, 1 double + 1 single block, 16 image + 8 text tokens split 12 / 12)
and tiny Wan 2.1 (32 video tokens), the 16-bit model as the baseline of the tolerance and the SVDQuant one in the
reference execution (the kernel executions: ``test_context_parallel_kernels.py``); quantduo's FP8 attention under
Ulysses (ring: a ValueError) and its first-block cache (one skip decision for all ranks).

Measured (float32 models, max |parallel - single| / max |single|): Ulysses 0 (Wan, the same bits) to 1.7e-7
(FLUX), ring 1.9e-7 to 2.3e-7, first-block cache 3.8e-7, FP8 attention under Ulysses 1.9e-7; the control — every
rank attending only within its own shard, the silent failure of a processor that lost diffusers' parallel config —
1.4e-2, so the 1e-5 tolerance fails a wrong split or a missing exchange by three orders of magnitude. (The float16
kernel executions, and why float16 under ring needs a wider tolerance: ``test_context_parallel_kernels.py``.)
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import ContextParallelConfig, ParallelConfig  # noqa: E402

from tests.integrations.diffusers.cp_harness import Case, max_errors, run_parallel, run_single  # noqa: E402
from tests.integrations.diffusers.tiny_models import FAST, flux_inputs, samples_from, tiny_flux  # noqa: E402
from tests.integrations.diffusers.tiny_zoo import tiny_wan  # noqa: E402
from quantduo.integrations.diffusers import quantization_config, quantize_transformer  # noqa: E402
from quantduo.integrations.fp8_attention import enable_fp8_attention  # noqa: E402

TOL = 1e-5
CACHE_THRESHOLD = 0.21
STEPS = (0.9, 0.899, 0.5)
DTYPE = torch.float32


def _cast(call: dict) -> dict:
    return {k: v.to(DTYPE) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in call.items()}


def _quantized(model: torch.nn.Module, inputs) -> torch.nn.Module:
    """A float16 SVDQuant copy of the float32 ``model``, calibrated on 2 calls of ``inputs(seed)``."""
    quantized = copy.deepcopy(model)
    quantize_transformer(quantized, samples_from(inputs, 2), quantization_config(quantized, **FAST), progress=False)
    return quantized.to(DTYPE)


def _cache_steps(model: torch.nn.Module) -> list[dict]:
    """Three FLUX calls at decreasing timesteps: the second changes only the last 8 image tokens (rank 1's shard)
    a little, the third changes every token a lot. Measured relative change of the first block's residual at the
    second call: 0.19 over the sequence (under CACHE_THRESHOLD: skip), 0.16 on rank 0's tokens, 0.23 on rank 1's
    (a per-shard decision would have rank 1 run the remaining blocks and their collectives alone)."""
    base = flux_inputs(model, 7)
    g = torch.Generator().manual_seed(8)
    second = base["hidden_states"].clone()
    second[:, 8:] += 0.1 * torch.randn(second[:, 8:].shape, generator=g)
    third = base["hidden_states"] + torch.randn(base["hidden_states"].shape, generator=g)
    return [_cast({**base, "hidden_states": h, "timestep": torch.tensor([t])})
            for h, t in zip((base["hidden_states"], second, third), STEPS)]


def _job() -> dict:
    flux = tiny_flux(seed=3)
    wan, wan_inputs = tiny_wan()
    models = {"flux-svdq": _quantized(flux, lambda s: flux_inputs(flux, s)), "flux": copy.deepcopy(flux).to(DTYPE),
              "wan-svdq": _quantized(wan, wan_inputs), "wan": copy.deepcopy(wan).to(DTYPE)}
    calls = {"flux": [_cast(flux_inputs(flux, 7))], "wan": [_cast(wan_inputs(7))], "flux-steps": _cache_steps(flux)}
    cases = {}
    for mode in ("ulysses", "ring"):
        for name in ("flux", "wan"):
            cases[f"{name}/{mode}"] = Case(name, name, mode, execution=None)
            cases[f"{name}-svdq/{mode}"] = Case(f"{name}-svdq", name, mode)
        cases[f"cache/{mode}"] = Case("flux-svdq", "flux-steps", mode, cache_threshold=CACHE_THRESHOLD)
    cases["fp8-attention/ulysses"] = Case("flux-svdq", "flux", "ulysses", fp8_attention=True)
    cases["shard-only/ulysses"] = Case("flux-svdq", "flux", "ulysses", shard_only=True)
    return {"models": models, "calls": calls, "cases": cases}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """(one-process, context-parallel) results of every case of the job."""
    job = _job()
    return run_single(job), run_parallel(job, tmp_path_factory.mktemp("cp"))


@pytest.mark.parametrize("name", ["flux", "flux-svdq", "wan", "wan-svdq"])
@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_context_parallel_output_is_the_single_process_output(results, name, mode):
    single, parallel = results
    expected, got = single[f"{name}/{mode}"]["out"], parallel[f"{name}/{mode}"]["out"]
    assert got.shape == expected.shape
    assert max_errors(got, expected)[1] < TOL, name


def test_attention_within_each_shard_fails_the_tolerance(results):
    single, parallel = results
    _, rel = max_errors(parallel["shard-only/ulysses"]["out"], single["shard-only/ulysses"]["out"])
    assert rel > 100 * TOL


def test_fp8_attention_under_ulysses_is_the_single_process_fp8_attention(results):
    """Ulysses hands each rank the whole sequence of its heads: FP8 attention quantizes the same blocks."""
    single, parallel = results
    assert max_errors(parallel["fp8-attention/ulysses"]["out"], single["fp8-attention/ulysses"]["out"])[1] < TOL
    without = single["flux-svdq/ulysses"]["out"]
    assert max_errors(single["fp8-attention/ulysses"]["out"], without)[1] > 100 * TOL  # FP8 attention did run


def test_fp8_attention_refuses_ring_context_parallelism():
    model = tiny_flux(seed=3).to(DTYPE)
    enable_fp8_attention(model)
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    for module in model.modules():
        if hasattr(module, "processor"):
            module.processor._parallel_config = config  # as enable_parallelism sets it
            assert module.processor.original._parallel_config is config
    with pytest.raises(ValueError, match="FP8 attention.*ring"), torch.no_grad():
        model(**_cast(flux_inputs(model, 7)))


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_first_block_cache_takes_the_whole_sequences_decision(results, mode):
    """The second call's change, small over the sequence, is large on rank 1's shard: every rank must skip."""
    single, parallel = results
    assert int(single[f"cache/{mode}"]["skipped"]) == 1
    assert int(parallel[f"cache/{mode}"]["skipped"]) == 1
    assert max_errors(parallel[f"cache/{mode}"]["out"], single[f"cache/{mode}"]["out"])[1] < TOL
