"""denoiser_offloaded (GPU): the pipeline runs on the GPU while the denoiser's blocks live on the CPU and visit the GPU
one at a time; the captured calibration calls equal those of the pipeline run wholly on the GPU. Capture inside a
pipeline whose first call parameter is not the prompt."""
import pytest
import torch

from quantduo.integrations.diffusers import block_names, capture_calibration_inputs, denoiser_offloaded
from quantduo.models.tiny_flux import tiny_flux_pipeline

from .tiny_image_pipelines import PIPELINES

CALL = dict(height=32, width=32, max_sequence_length=16, guidance_scale=3.5, num_samples=4, num_inference_steps=2)


def _devices_while_running(denoiser, names: list[str]) -> list[dict[str, str]]:
    """Hooks recording, as each block starts, the device type of every block's parameters."""
    seen = []

    def probe(module, args):
        seen.append({n: next(denoiser.get_submodule(n).parameters()).device.type for n in names})

    for name in names:
        denoiser.get_submodule(name).register_forward_pre_hook(probe)
    return seen


@pytest.mark.gpu
def test_gpu_offloaded_denoiser_holds_one_block_on_the_gpu_and_captures_the_same_calls():
    on_gpu = tiny_flux_pipeline().to("cuda")
    expected = capture_calibration_inputs(on_gpu, ["a cat", "a red bus"], progress=False, **CALL)
    pipe = tiny_flux_pipeline()
    names = block_names(pipe.transformer)
    with denoiser_offloaded(pipe, "cuda"):
        assert pipe.text_encoder_2.device.type == "cuda" and pipe.transformer.x_embedder.weight.is_cuda
        seen = _devices_while_running(pipe.transformer, names)
        got = capture_calibration_inputs(pipe, ["a cat", "a red bus"], progress=False, **CALL)
    assert seen and len(names) >= 2
    for devices in seen:  # the running block is the only one on the GPU (its pre-hook ran before this probe)
        assert sorted(devices.values()).count("cuda") == 1
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())
    assert pipe.text_encoder_2.device.type == "cpu"
    for a, b in zip(expected, got):
        torch.testing.assert_close(b.kwargs["hidden_states"], a.kwargs["hidden_states"])


def test_capture_in_a_pipeline_whose_first_parameter_is_the_image():
    """FluxKontextPipeline.__call__(image, prompt, ...): the prompts reach ``prompt`` (not ``image``), and the
    captured calls carry the reference image's tokens after the noise tokens (16 + 16)."""
    build, call = PIPELINES["flux-kontext"]
    samples = capture_calibration_inputs(build(), ["a cat", "a red bus"], num_samples=3, num_inference_steps=2,
                                         progress=False, **call)
    assert len(samples) == 3 and all(s.kwargs["hidden_states"].shape[1] == 32 for s in samples)
    by_prompt = {s.prompt_index: s.kwargs["encoder_hidden_states"] for s in samples}  # 3 of 4 calls: both prompts
    assert sorted(by_prompt) == [0, 1] and not torch.equal(by_prompt[0], by_prompt[1])
