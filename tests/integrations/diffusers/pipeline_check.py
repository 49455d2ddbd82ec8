"""The pipeline round trip of the zoo tests: capture calibration calls inside a tiny pipeline, quantize its denoiser
by the inferred rules, save the pipeline folder, load it with ``DiffusionPipeline.from_pretrained`` (quantduo's
diffusers backend) and generate; the PSNR of that output vs the bf16 pipeline's (saved and loaded the same way)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from quantduo.integrations.diffusers import (capture_calibration_inputs, denoiser_of, load_pipeline, mark_quantized,
                                             quantduo_config_for, quantization_config, quantize_transformer,
                                             save_pipeline)
from quantduo.svdquant import SVDQuantLinear

SETTINGS = dict(rank=16, search_tokens=128, lowrank_iters=4)
PROMPTS = ["a photo of a cat", "a red bus"]


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``20 log10(range(ref) / rmse(out - ref))`` in dB (float32)."""
    ref, out = ref.float(), out.float()
    rmse = (out - ref).pow(2).mean().sqrt().clamp(min=1e-12)
    return float(20 * torch.log10((ref.max() - ref.min()) / rmse))


def _generate(pipe: Any, call: dict, steps: int) -> torch.Tensor:
    """The pipeline's output for "a dog in a park" (``output_type="pt"``: images, or video frames), seed 3."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a dog in a park", num_inference_steps=steps, output_type="pt",
               generator=torch.Generator().manual_seed(3), **call)
    return out.frames if hasattr(out, "frames") else out.images


def quantized_pipeline_psnr(build: Callable[[], Any], folder: Path, call: dict, steps: int = 3) -> float:
    """PSNR (dB) of the quantized, saved and reloaded pipeline's output vs the bf16 pipeline's, both called with
    ``call`` (size, ...). The bf16 pipeline is ``build()`` saved next to ``folder`` and loaded as diffusers loads it
    in bf16 (a class's ``_keep_in_fp32_modules`` stay float32, as in the quantized one). Asserts the reloaded
    denoiser holds SVDQuant layers."""
    reference = folder.with_name(folder.name + "-bf16")
    save_pipeline(build(), reference)
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    samples = capture_calibration_inputs(pipe, PROMPTS, num_samples=4, num_inference_steps=2, progress=False, **call)
    _, denoiser = denoiser_of(pipe)
    config = quantization_config(denoiser, **SETTINGS)
    quantize_transformer(denoiser, samples, config, progress=False)
    mark_quantized(denoiser, quantduo_config_for(config))
    save_pipeline(pipe, folder)
    reloaded = load_pipeline(folder)
    assert sum(isinstance(m, SVDQuantLinear) for m in denoiser_of(reloaded)[1].modules()) > 5
    return psnr(_generate(reloaded, call, steps), _generate(load_pipeline(reference), call, steps))
