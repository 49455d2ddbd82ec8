"""The zoo's video and large-text-encoder denoisers in their real diffusers pipelines (issue 19): quantized by the
rules inferred from calibration calls captured inside the pipeline, saved, reloaded with
``DiffusionPipeline.from_pretrained`` and run; PSNR of the generated frames / image vs the bf16 pipeline's
(``pipeline_check.quantized_pipeline_psnr``; pipelines from ``tiny_video_pipelines``, 3 steps).

Measured on this CPU, seed 0; each bound in ``PIPELINE_PSNR`` is the measured value minus about 3 dB:

wan 47.1 (3 frames of 16x16: 2 latent frames, classifier-free guidance with the empty negative prompt),
hunyuan-video 47.6 (5 frames of 16x16: 2 latent frames, embedded guidance), qwen-image 51.2 (16x16, true CFG with
negative prompt " "), hidream 45.8 (256x256: HiDreamImagePipeline rescales every request to the area
``(default_sample_size * vae_scale_factor)**2``, 128 x the VAE's factor 2 here, whatever height / width are
passed, so its call has no size; 64x64 = 4096 image tokens, the slowest case, about 14 s).
"""
from __future__ import annotations

import pytest
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from .pipeline_check import quantized_pipeline_psnr
from .tiny_video_pipelines import (tiny_hidream_pipeline, tiny_hunyuan_video_pipeline, tiny_qwen_image_pipeline,
                                   tiny_wan_pipeline)

pytestmark = pytest.mark.usefixtures("single_thread")
PIPELINES = {  # builder, call arguments (size, frames, text length)
    "wan": (tiny_wan_pipeline, dict(height=16, width=16, num_frames=3, max_sequence_length=16)),
    "hunyuan-video": (tiny_hunyuan_video_pipeline, dict(height=16, width=16, num_frames=5, max_sequence_length=16)),
    "qwen-image": (tiny_qwen_image_pipeline, dict(height=16, width=16, max_sequence_length=16, negative_prompt=" ")),
    "hidream": (tiny_hidream_pipeline, dict(max_sequence_length=16)),
}
PIPELINE_PSNR = {"wan": 44.5, "hunyuan-video": 44.5, "qwen-image": 48.0, "hidream": 43.0}  # minimum PSNR (dB) vs bf16


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_video_zoo_pipeline(kind, tmp_path):
    """Capture inside the pipeline, quantize, save the pipeline folder, reload it through the diffusers backend and
    generate: the output within its PSNR bound of the bf16 pipeline's."""
    build, call = PIPELINES[kind]
    value = quantized_pipeline_psnr(build, tmp_path / "quantized", call)
    print(f"{kind} pipeline: PSNR {value:.1f} dB")
    assert value > PIPELINE_PSNR[kind], value


def test_chat_tokenizer_gives_the_cropped_template_lengths():
    """The pipelines drop a fixed number of leading template tokens (the real tokenizers' count); with
    :func:`chat_tokenizer` that count is exactly the template, so the denoiser gets the prompt's states."""
    hunyuan, qwen = tiny_hunyuan_video_pipeline(), tiny_qwen_image_pipeline()
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    assert len(hunyuan.tokenizer(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"] == 95
    prefix = qwen.prompt_template_encode.split("{}")[0]
    assert len(qwen.tokenizer(prefix).input_ids) == qwen.prompt_template_encode_start_idx == 34
