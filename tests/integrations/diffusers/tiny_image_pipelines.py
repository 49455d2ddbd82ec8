"""Tiny real diffusers image pipelines around the zoo's denoisers (:mod:`.tiny_zoo`), built in-process: every
component a real transformers / diffusers class in a tiny config, random weights, word-level tokenizers
(:func:`~quantduo.models.tiny_flux.word_tokenizer`), nothing downloaded.

Each ``tiny_<name>_pipeline(seed)`` returns a float32 pipeline (``seed`` initialises the text encoders and VAE;
the denoiser is the zoo builder's, as test_zoo.py validated it); ``PIPELINES[name]`` pairs it with the call
arguments (size, the conditioning image / mask, ...) that keep one call on the CPU well under a second: 16x16 or
32x32 pixels, 8x8 latents (FLUX-style: 4x4 tokens of 4 x 2x2 packed channels).
"""
from __future__ import annotations

import diffusers
import torch
from transformers import CLIPTextModel, Gemma2Config, Gemma2Model

from quantduo.models.tiny_flux import tiny_flux_pipeline, word_tokenizer

from .tiny_models import tiny_sdxl_unet
from .tiny_zoo import (_clip_with_projection, _t5, _tiny_vae, tiny_chroma, tiny_flux_fill, tiny_flux_kontext,
                       tiny_lumina2, tiny_sana)

TOKENS = 16  # tokenizer / text-encoder length


def _flux_components(seed: int) -> dict:
    """The text encoders, tokenizers, VAE (4 latent channels, scale 2) and scheduler of the tiny FluxPipeline."""
    parts = tiny_flux_pipeline(seed).components
    return {k: parts[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}


def _gemma2(vocab: int) -> Gemma2Model:
    """2-layer Gemma2 text encoder, hidden size 64 (SANA / Lumina 2 read its last or second-to-last layer)."""
    return Gemma2Model(Gemma2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=64, sliding_window=64, pad_token_id=0,
        eos_token_id=2, bos_token_id=0)).eval()


def _dc_vae() -> diffusers.AutoencoderDC:
    """3-level deep-compression autoencoder (ResBlocks only), 4 latent channels, scale factor 4."""
    return diffusers.AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=8, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()), upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=1.0,
    ).eval()


def tiny_flux_kontext_pipeline(seed: int = 0) -> diffusers.FluxKontextPipeline:
    """FluxKontextPipeline: the tiny FLUX pipeline's CLIP + T5 encoders and VAE, the zoo's Kontext transformer
    (guidance-distilled; the reference image's latents are appended to the sequence)."""
    return diffusers.FluxKontextPipeline(**_flux_components(seed), transformer=tiny_flux_kontext()[0])


def tiny_flux_fill_pipeline(seed: int = 0) -> diffusers.FluxFillPipeline:
    """FluxFillPipeline: the tiny FLUX pipeline's encoders and VAE, the zoo's Fill transformer (48 input channels:
    noise 16 + masked-image latents 16 + packed mask 16)."""
    return diffusers.FluxFillPipeline(**_flux_components(seed), transformer=tiny_flux_fill()[0])


def tiny_chroma_pipeline(seed: int = 0) -> diffusers.ChromaPipeline:
    """ChromaPipeline: T5 (64), tiny VAE, the zoo's Chroma transformer."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(TOKENS))
    return diffusers.ChromaPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(),
        text_encoder=_t5(vocab), tokenizer=word_tokenizer(TOKENS), transformer=tiny_chroma()[0],
    )


def tiny_sdxl_pipeline(seed: int = 0) -> diffusers.StableDiffusionXLPipeline:
    """StableDiffusionXLPipeline: CLIP (32) + CLIP-with-projection (32, pooled 64) text encoders, tiny VAE, the zoo's
    SDXL-style UNet (cross-attention 32 + 32 = 64, time ids 6 x 8 + pooled 64)."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(TOKENS))
    return diffusers.StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=_clip_with_projection(vocab, cls=CLIPTextModel),
        text_encoder_2=_clip_with_projection(vocab, projection_dim=64), tokenizer=word_tokenizer(TOKENS),
        tokenizer_2=word_tokenizer(TOKENS), unet=tiny_sdxl_unet()[0], scheduler=diffusers.EulerDiscreteScheduler(),
    )


def tiny_sana_pipeline(seed: int = 0) -> diffusers.SanaPipeline:
    """SanaPipeline: Gemma2 (64), a 3-level AutoencoderDC (scale 4), the zoo's SANA transformer."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(TOKENS))
    return diffusers.SanaPipeline(
        tokenizer=word_tokenizer(TOKENS), text_encoder=_gemma2(vocab), vae=_dc_vae(), transformer=tiny_sana()[0],
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )


def tiny_lumina2_pipeline(seed: int = 0) -> diffusers.Lumina2Pipeline:
    """Lumina2Pipeline: Gemma2 (64), tiny VAE, the zoo's Lumina 2 transformer. The pipeline sizes latents with a
    fixed VAE factor 8, so a 64x64 request gives 8x8 latents and (this VAE's factor being 2) a 16x16 image."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(TOKENS))
    return diffusers.Lumina2Pipeline(
        transformer=tiny_lumina2()[0], scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(),
        text_encoder=_gemma2(vocab), tokenizer=word_tokenizer(TOKENS),
    )


def _image(seed: int, channels: int = 3, side: int = 16) -> torch.Tensor:
    """A fixed image tensor ``[1, channels, side, side]`` in [0, 1]: smooth gradients plus seeded noise."""
    ramp = torch.linspace(0, 1, side)
    base = (ramp[:, None] + ramp[None, :]) / 2
    noise = torch.rand(1, channels, side, side, generator=torch.Generator().manual_seed(seed))
    return (0.7 * base + 0.3 * noise).clamp(0, 1)


def _mask(side: int = 16) -> torch.Tensor:
    """``[1, 1, side, side]``: 1 (repaint) in the right half, 0 (keep) elsewhere."""
    mask = torch.zeros(1, 1, side, side)
    mask[..., side // 2:] = 1.0
    return mask


SIZE16 = dict(height=16, width=16)
PIPELINES = {  # name: (builder, call arguments)
    "flux-kontext": (tiny_flux_kontext_pipeline,
                     dict(SIZE16, image=_image(0), max_area=16 * 16, _auto_resize=False, max_sequence_length=TOKENS)),
    "flux-fill": (tiny_flux_fill_pipeline,
                  dict(SIZE16, image=_image(0), mask_image=_mask(), max_sequence_length=TOKENS)),
    "chroma": (tiny_chroma_pipeline, dict(SIZE16, max_sequence_length=TOKENS)),
    "sdxl": (tiny_sdxl_pipeline, SIZE16),
    "sana": (tiny_sana_pipeline, dict(height=32, width=32, use_resolution_binning=False, max_sequence_length=TOKENS,
                                      complex_human_instruction=None)),
    # the default system prompt (~30 words) prepended to the prompt would fill all 16 text tokens
    "lumina2": (tiny_lumina2_pipeline, dict(height=64, width=64, max_sequence_length=TOKENS, system_prompt="a photo")),
}
