"""The zoo's image denoisers in their real diffusers pipelines (:mod:`.tiny_image_pipelines`): calibration calls
captured inside the pipeline (2 prompts x 2 steps, 4 kept), the denoiser quantized by the inferred rules (INT4 W4A4,
rank 16), the pipeline saved, reloaded with ``DiffusionPipeline.from_pretrained`` (quantduo's backend) and run
for 3 steps: PSNR (dB) of its image vs the bf16 pipeline's (:func:`.pipeline_check.quantized_pipeline_psnr`).

Measured on this CPU, seed 0; each bound in ``PIPELINE_PSNR`` is the measured value minus about 3 dB:

flux-kontext 51.7 (16x16 reference image: its 16 latent tokens appended to the 16 noise tokens), flux-fill 50.1
(16x16 image + right-half mask), chroma 41.0, sdxl 29.8 (the UNet alone in test_zoo.py: 31.9), sana 39.4,
lumina2 41.6.

For scale: adding 5% noise (of each tensor's std) to the bf16 denoiser's weights gives 38-42 dB on these pipelines;
the whole pipeline in float32 vs bf16, 37-53 dB. Both sides here run their text encoders and VAE in bf16, so only the
denoiser differs. Call arguments (``PIPELINES`` in :mod:`.tiny_image_pipelines`): Kontext without its auto-resize to
the preferred ~1024^2 resolutions (``_auto_resize=False``, ``max_area=16*16``); SANA without resolution binning and
without the complex human instruction (166 words, after which the 16-token encoder would see none of the prompt);
Lumina 2 with a 2-word system prompt for the same reason, and 64x64 requested because the pipeline sizes latents with
a fixed VAE factor 8 (8x8 latents; this VAE decodes them to 16x16). Every pipeline of this file runs on the CPU:
nothing is skipped.
"""
from __future__ import annotations

import pytest

from .pipeline_check import quantized_pipeline_psnr
from .tiny_image_pipelines import PIPELINES

pytestmark = pytest.mark.usefixtures("single_thread")
PIPELINE_PSNR = {  # minimum PSNR (dB) of the generated image vs bf16 (measured values in the module docstring)
    "flux-kontext": 48.5, "flux-fill": 47.0, "chroma": 38.0, "sdxl": 27.0, "sana": 36.5, "lumina2": 38.5,
}


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_quantized_pipeline_matches_bf16(kind, tmp_path):
    """Quantize inside the pipeline, save, reload through the diffusers backend, generate: within the bound of the
    bf16 pipeline's image."""
    build, call = PIPELINES[kind]
    value = quantized_pipeline_psnr(build, tmp_path / "quantized", call)
    print(f"{kind} pipeline: PSNR {value:.1f} dB")
    assert value > PIPELINE_PSNR[kind], value
