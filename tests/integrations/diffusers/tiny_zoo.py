"""Tiny configs of the real diffusers denoiser classes, each with a generator of synthetic call arguments.

Every builder returns ``(model, inputs)``: a float32 eval-mode model (random weights, seeded) and
``inputs(seed) -> kwargs`` for one call with batch 2. Sizes are the smallest the class accepts with 64-channel
groups: inner dim 128 (2 heads x 64), 1-2 blocks per list, 16-64 image tokens, 6-8 text tokens.
"""
from __future__ import annotations

from typing import Callable

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from quantduo.models.tiny_flux import word_tokenizer

from .tiny_models import tiny_pixart, tiny_sd3, tiny_sdxl_unet

B, TXT = 2, 6
Builder = Callable[[], tuple[torch.nn.Module, Callable[[int], dict]]]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flux_ids(side: int, frame: float = 0.0) -> torch.Tensor:
    """FLUX image position ids ``[side*side, 3]``: (frame, row, col)."""
    rows, cols = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    return torch.stack([torch.full_like(rows, frame), rows, cols], -1).reshape(-1, 3)


def _flux_like(cls, variant: str = "t2i", **extra):
    """FLUX / Chroma: ``variant`` ``"t2i"``, ``"kontext"`` (reference-image tokens appended along the sequence, ids
    with frame 1) or ``"fill"`` (masked-image + mask latents concatenated along channels: 16 + 32 inputs)."""
    in_channels = 48 if variant == "fill" else 16
    torch.manual_seed(0)
    model = cls(patch_size=1, in_channels=in_channels, out_channels=16, num_layers=1, num_single_layers=1,
                attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 28, 28),
                **extra).eval()
    side = 4

    def inputs(seed: int) -> dict:
        g = _g(seed)
        latents = torch.randn(B, side * side, 16, generator=g)
        ids = _flux_ids(side)
        if variant == "kontext":
            latents = torch.cat([latents, torch.randn(B, side * side, 16, generator=g)], 1)
            ids = torch.cat([ids, _flux_ids(side, 1.0)])
        elif variant == "fill":
            latents = torch.cat([latents, torch.randn(B, side * side, 32, generator=g)], -1)
        kwargs = dict(hidden_states=latents, encoder_hidden_states=torch.randn(B, TXT, 64, generator=g),
                      timestep=torch.rand(B, generator=g), img_ids=ids, txt_ids=torch.zeros(TXT, 3), return_dict=False)
        if "pooled_projection_dim" in extra:
            kwargs["pooled_projections"] = torch.randn(B, extra["pooled_projection_dim"], generator=g)
        if extra.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((B,), 3.5)
        return kwargs

    return model, inputs


def tiny_flux_t2i():
    return _flux_like(diffusers.FluxTransformer2DModel, pooled_projection_dim=64)


def tiny_flux_kontext():
    return _flux_like(diffusers.FluxTransformer2DModel, "kontext", pooled_projection_dim=64, guidance_embeds=True)


def tiny_flux_fill():
    return _flux_like(diffusers.FluxTransformer2DModel, "fill", pooled_projection_dim=64, guidance_embeds=True)


def tiny_chroma():
    return _flux_like(diffusers.ChromaTransformer2DModel, approximator_num_channels=16, approximator_hidden_dim=64,
                      approximator_layers=2)


def tiny_sd35():
    """SD3.5-style: RMS q/k norms and a second (dual) self-attention in block 0."""
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    ).eval()
    return model, tiny_sd3()[1]


def tiny_sana():
    torch.manual_seed(0)
    model = diffusers.SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=64, cross_attention_dim=128, caption_channels=64,
        sample_size=8, patch_size=1,
    ).eval()

    def inputs(seed: int) -> dict:
        g = _g(seed)
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(B, TXT, 64, generator=g),
                    timestep=torch.randint(0, 1000, (B,), generator=g), return_dict=False)

    return model, inputs


def tiny_qwen_image():
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, axes_dims_rope=(16, 24, 24),
    ).eval()

    def inputs(seed: int) -> dict:
        g = _g(seed)
        return dict(hidden_states=torch.randn(B, 16, 16, generator=g),
                    encoder_hidden_states=torch.randn(B, TXT, 64, generator=g),
                    encoder_hidden_states_mask=torch.ones(B, TXT), timestep=torch.rand(B, generator=g),
                    img_shapes=[[(1, 4, 4)]] * B, return_dict=False)

    return model, inputs


def tiny_wan():
    """Wan 2.1 text-to-video: 2 latent frames of 8x8 (3-D patches 1x2x2: 32 video tokens)."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=64, freq_dim=64, ffn_dim=256, num_layers=2, rope_max_seq_len=32,
    ).eval()

    def inputs(seed: int) -> dict:
        g = _g(seed)
        return dict(hidden_states=torch.randn(B, 4, 2, 8, 8, generator=g),
                    timestep=torch.randint(0, 1000, (B,), generator=g),
                    encoder_hidden_states=torch.randn(B, TXT, 64, generator=g), return_dict=False)

    return model, inputs


def tiny_hunyuan_video():
    """HunyuanVideo: 1 double + 1 single block, 1 token-refiner block, 2 latent frames of 8x8."""
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=64,
        pooled_projection_dim=32, rope_axes_dim=(16, 24, 24), guidance_embeds=True,
    ).eval()

    def inputs(seed: int) -> dict:
        g = _g(seed)
        return dict(hidden_states=torch.randn(B, 4, 2, 8, 8, generator=g),
                    timestep=torch.randint(0, 1000, (B,), generator=g),
                    encoder_hidden_states=torch.randn(B, TXT, 64, generator=g),
                    encoder_attention_mask=torch.ones(B, TXT), pooled_projections=torch.randn(B, 32, generator=g),
                    guidance=torch.full((B,), 3500.0), return_dict=False)

    return model, inputs


def tiny_hidream():
    """HiDream-I1: 1 double + 1 single block with MoE feed-forwards (2 routed experts, top-1), T5 + per-block Llama
    text states."""
    torch.manual_seed(0)
    model = diffusers.HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, caption_channels=[64, 64], text_emb_dim=64, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(32, 16, 16), max_resolution=(8, 8), llama_layers=[0, 1],
    ).eval()

    def inputs(seed: int) -> dict:
        g = _g(seed)
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), timesteps=torch.randint(0, 1000, (B,), generator=g),
                    encoder_hidden_states_t5=torch.randn(B, TXT, 64, generator=g),
                    encoder_hidden_states_llama3=torch.randn(2, B, TXT, 64, generator=g),
                    pooled_embeds=torch.randn(B, 64, generator=g), return_dict=False)

    return model, inputs


def tiny_lumina2():
    torch.manual_seed(0)
    model = diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=128, num_layers=1, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=64, axes_dim_rope=(16, 24, 24), axes_lens=(64, 32, 32),
        cap_feat_dim=64,
    ).eval()

    def inputs(seed: int) -> dict:
        g = _g(seed)
        return dict(hidden_states=torch.randn(B, 4, 8, 8, generator=g), timestep=torch.rand(B, generator=g),
                    encoder_hidden_states=torch.randn(B, TXT, 64, generator=g),
                    encoder_attention_mask=torch.ones(B, TXT, dtype=torch.bool), return_dict=False)

    return model, inputs


ZOO: dict[str, Builder] = {
    "flux": tiny_flux_t2i, "flux-kontext": tiny_flux_kontext, "flux-fill": tiny_flux_fill, "sd3": tiny_sd3,
    "sd3.5": tiny_sd35, "pixart-sigma": tiny_pixart, "sana": tiny_sana, "qwen-image": tiny_qwen_image, "wan": tiny_wan,
    "hunyuan-video": tiny_hunyuan_video, "chroma": tiny_chroma, "hidream": tiny_hidream, "lumina2": tiny_lumina2,
    "sdxl-unet": tiny_sdxl_unet,
}


def _tiny_vae() -> diffusers.AutoencoderKL:
    """2-level VAE, 4 latent channels (scale factor 2)."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=16, shift_factor=0.0, scaling_factor=1.0,
    )


def _t5(vocab: int):
    return T5EncoderModel(T5Config(vocab_size=vocab, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2,
                                   decoder_start_token_id=0)).eval()


def _clip_config(vocab: int, positions: int = 16, projection_dim: int = 32) -> CLIPTextConfig:
    """CLIP text encoder, hidden size 32, 1 layer, ``positions`` token positions, ``projection_dim`` projection."""
    return CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=positions, projection_dim=projection_dim,
                          eos_token_id=2, pad_token_id=0, bos_token_id=0)


def _clip_with_projection(vocab: int, projection_dim: int = 32, cls: type = CLIPTextModelWithProjection):
    """1-layer CLIP text encoder, hidden size 32, 16 positions: ``cls`` (with a ``projection_dim`` projection, or
    ``CLIPTextModel``)."""
    return cls(_clip_config(vocab, projection_dim=projection_dim)).eval()


def tiny_sd3_pipeline(seed: int = 0) -> diffusers.StableDiffusion3Pipeline:
    """StableDiffusion3Pipeline: two CLIP-with-projection encoders (32 + 32 = pooled 64), T5 (64), tiny VAE, tiny SD3."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(16))
    return diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3(seed)[0], scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=_tiny_vae(),
        text_encoder=_clip_with_projection(vocab), tokenizer=word_tokenizer(16),
        text_encoder_2=_clip_with_projection(vocab), tokenizer_2=word_tokenizer(16), text_encoder_3=_t5(vocab),
        tokenizer_3=word_tokenizer(16),
    )


def tiny_pixart_pipeline(seed: int = 0) -> diffusers.PixArtSigmaPipeline:
    """PixArtSigmaPipeline: T5 (64), tiny VAE, tiny PixArt transformer."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(16))
    return diffusers.PixArtSigmaPipeline(
        tokenizer=word_tokenizer(16), text_encoder=_t5(vocab), vae=_tiny_vae(), transformer=tiny_pixart(seed)[0],
        scheduler=diffusers.DPMSolverMultistepScheduler(),
    )
