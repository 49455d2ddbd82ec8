"""Tiny configs of the real diffusers denoisers and a tiny FLUX pipeline (built in-process, no downloads), shared
by the diffusers integration tests."""
from __future__ import annotations

import diffusers
import torch

from quantduo.integrations.diffusers import CalibrationSample
from quantduo.models.tiny_flux import tiny_flux, tiny_flux_pipeline  # noqa: F401  (re-exported for the tests)

FAST = dict(rank=16, search_tokens=64, lowrank_iters=4)


def flux_inputs(model, seed: int, img: int = 16, txt: int = 8) -> dict:
    """Random FluxTransformer2DModel inputs: 4x4 image tokens, ``txt`` text tokens."""
    g = torch.Generator().manual_seed(seed)
    side = int(img ** 0.5)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(1, img, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, txt, model.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim, generator=g),
        timestep=torch.rand(1, generator=g), img_ids=img_ids.reshape(-1, 3).float(), txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


def tiny_pixart(seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=64, num_attention_heads=2, in_channels=4,
        out_channels=8, cross_attention_dim=128, caption_channels=64, norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()
    def inputs(s):
        g = torch.Generator().manual_seed(s)
        return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 6, 64, generator=g),
                    timestep=torch.randint(0, 1000, (2,), generator=g), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)
    return model, inputs


def tiny_sd3(seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    ).eval()
    def inputs(s):
        g = torch.Generator().manual_seed(s)
        return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 6, 64, generator=g),
                    pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.rand(2, generator=g) * 1000,
                    return_dict=False)
    return model, inputs


def tiny_sdxl_unet(seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(128,), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=64, attention_head_dim=2, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 64, transformer_layers_per_block=1,
        norm_num_groups=32,
    ).eval()
    def inputs(s):
        g = torch.Generator().manual_seed(s)
        return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.rand(2, generator=g) * 1000,
                    encoder_hidden_states=torch.randn(2, 6, 64, generator=g),
                    added_cond_kwargs={"text_embeds": torch.randn(2, 64, generator=g), "time_ids": torch.rand(2, 6, generator=g)},
                    return_dict=False)
    return model, inputs


def samples_from(inputs_fn, n: int) -> list[CalibrationSample]:
    return [CalibrationSample((), inputs_fn(i), 0, i) for i in range(n)]


