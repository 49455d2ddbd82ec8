"""The token-stream tracker (which linears read only per-sample conditioning): what it finds on a FLUX transformer,
and that tracking only the first calls finds the same while leaving no tracking mode active afterwards."""
import pytest
import torch
from torch import nn

from quantduo.models.tiny_flux import tiny_flux
from quantduo.svdquant.dataflow import StreamTracker

from tests.integrations.diffusers.tiny_models import flux_inputs

# FLUX's adaLN modulation linears read SiLU(time + pooled text embedding): one row per sample, no token stream
CONDITIONING = {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                "single_transformer_blocks.0.norm.linear", "time_text_embed.timestep_embedder.linear_1",
                "time_text_embed.timestep_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
                "time_text_embed.text_embedder.linear_2", "norm_out.linear"}


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _track(model, calls: int, max_calls: int | None) -> StreamTracker:
    with StreamTracker(model, _linears(model), max_calls=max_calls) as tracker, torch.no_grad():
        for seed in range(calls):
            model(**flux_inputs(model, seed))
    return tracker


def test_conditioning_linears_of_flux():
    model = tiny_flux()
    tracker = _track(model, 1, None)
    assert tracker.conditioning_only() == CONDITIONING
    assert "transformer_blocks.0.attn.to_q" in tracker.reads_stream and not tracker.ambiguous()


def test_tracking_the_first_calls_finds_the_same_and_stops_tracking():
    model = tiny_flux()
    stack_depths = []
    probe = model.transformer_blocks[0].attn.to_q.register_forward_pre_hook(
        lambda m, a: stack_depths.append(torch._C._len_torch_function_stack()))
    limited = _track(model, 4, max_calls=2)
    probe.remove()
    assert limited.calls == 2 and limited.conditioning_only() == _track(model, 4, None).conditioning_only()
    assert stack_depths == [1, 1, 0, 0]  # the tracking mode is pushed for the tracked calls only
    assert torch._C._len_torch_function_stack() == 0


def test_a_call_that_raises_pops_the_tracking_mode():
    model = tiny_flux()
    with StreamTracker(model, _linears(model), max_calls=2), torch.no_grad():
        with pytest.raises(RuntimeError):
            model(**{**flux_inputs(model, 0), "hidden_states": torch.randn(1, 16, 3)})  # wrong channel count
        assert torch._C._len_torch_function_stack() == 0
