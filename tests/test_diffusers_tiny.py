"""Tiny configs of the real diffusers denoisers (built in-process, no downloads) + per-model SVDQuant rule tests.

The builders here are imported by the other ``test_diffusers_*`` / ``test_lora`` modules.
"""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from quantduo.integrations.diffusers import (  # noqa: E402
    CalibrationSample, FusedFluxSingleBlock, FusedGeluMLP, convert_to_fp8, convert_to_w4a8, convert_to_w4a16,
    quantization_config, quantize_transformer, rules_for,
)
from quantduo.svdquant import SVDQuantLinear  # noqa: E402
from quantduo.svdquant.hopper_formats import SVDQuantW4A8Linear  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

FAST = dict(rank=16, search_tokens=64, lowrank_iters=4)


def tiny_flux(seed: int = 0, in_channels: int = 16) -> torch.nn.Module:
    """FluxTransformer2DModel: inner dim 128 (2 heads x 64), 1 double + 1 single block, text dim 64."""
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[8, 28, 28],
    ).eval()


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


def _status(report, name):
    return next(r for r in report.layers if r.name == name)


MODELS = {
    "pixart": (tiny_pixart, ["adaln_single.emb.timestep_embedder.linear_1", "caption_projection.linear_1", "proj_out"],
               ["adaln_single.linear"], ["transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v"], 0.05),
    "sd3": (tiny_sd3, ["context_embedder", "time_text_embed.text_embedder.linear_1", "norm_out.linear", "proj_out"],
            ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear"],
            ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"], 0.05),
    "sdxl": (tiny_sdxl_unet, ["time_embedding.linear_1", "add_embedding.linear_2"], ["down_blocks.0.resnets.0.time_emb_proj"],
             ["mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"], 0.3),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_rules_and_accuracy(kind):
    """Skip / W4A16 / shared-input rules are applied and the quantized model stays close to full precision."""
    build, skipped, weight_only, shared, max_err = MODELS[kind]
    model, inputs = build()
    ref = model(**inputs(100))[0]
    report = quantize_transformer(model, samples_from(inputs, 2), quantization_config(model, smooth=False, **FAST), progress=False)
    assert all(_status(report, n).status == "skipped" for n in skipped)
    assert all(_status(report, n).status == "w4a16" for n in weight_only)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in skipped)
    groups = {tuple(_status(report, n).group) for n in shared}
    assert len(groups) == 1 and set(shared) <= set(next(iter(groups)))
    down = [model.get_submodule(n).proj_down for n in shared]
    assert all(torch.equal(d, down[0]) for d in down)
    n_quant = sum(isinstance(m, SVDQuantLinear) for m in model.modules())
    assert n_quant == len(report.quantized()) > 0
    with torch.no_grad():
        err = relative_error(model(**inputs(100))[0], ref)
    # measured (2 seeds): PixArt 0.009-0.010, SD3 0.007-0.009, SDXL UNet 0.14-0.17 (36 chained 4-bit layers)
    assert 0 < err < max_err, err


def test_flux_rules_and_shared_groups():
    model = tiny_flux()
    report = quantize_transformer(
        model, samples_from(lambda s: flux_inputs(model, s), 2), quantization_config(model, smooth=False, **FAST), progress=False
    )
    for name in ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out"]:
        assert _status(report, name).status == "skipped"
    for name in ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.0.norm.linear"]:
        assert _status(report, name).status == "w4a16" and model.get_submodule(name).act_format == "none"
    single = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
              "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]
    assert set(_status(report, single[0]).group) == set(single)
    assert model.get_submodule("transformer_blocks.0.ff.net.2").act_format == "uint4"


def test_flux_svdq_w4a16_format():
    """``svdq-w4a16``: every quantized layer W4A16 with the low-rank branch, about as accurate as the weight-only
    baseline ``w4a16`` on these random weights (no outlier directions for the branch to take; where there are,
    it is several times more accurate: tests/test_svdquant.py::test_w4a16_svdquant)."""
    errors = {}
    for fmt in ("w4a16", "svdq-w4a16"):
        torch.manual_seed(0)
        model = tiny_flux()
        inputs = flux_inputs(model, 100)
        with torch.no_grad():
            ref = model(**inputs)[0]
        quantize_transformer(model, samples_from(lambda s, m=model: flux_inputs(m, s), 2),
                             quantization_config(model, fmt, smooth=False, **FAST), progress=False)
        layers = [m for m in model.modules() if isinstance(m, SVDQuantLinear)]
        assert layers and all(m.act_format == "none" for m in layers)
        assert all((m.rank > 0) == (fmt == "svdq-w4a16") for m in layers)
        with torch.no_grad():
            errors[fmt] = relative_error(model(**inputs)[0], ref)
    assert 0 < errors["svdq-w4a16"] < 1.1 * errors["w4a16"] < 0.05, errors


@pytest.mark.parametrize("act_format", ["int8", "fp8", "none"])
def test_flux_hopper_conversion(act_format):
    """convert_to_w4a8 turns every W4A4 layer into the Hopper format (W4A16 layers stay) and keeps the output;
    convert_to_w4a16 ("none") runs them with 16-bit activations, closer to bf16 than W4A4."""
    model = tiny_flux()
    inputs = flux_inputs(model, 100)
    with torch.no_grad():
        ref = model(**inputs)[0]
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2),
                         quantization_config(model, smooth=False, **FAST), progress=False)
    w4a4 = sum(isinstance(m, SVDQuantLinear) and m.act_format != "none" for m in model.modules())
    with torch.no_grad():
        err_w4a4 = relative_error(model(**inputs)[0], ref)
    if act_format == "none":
        assert convert_to_w4a16(model) == w4a4 > 0
        assert all(m.act_format == "none" for m in model.modules() if isinstance(m, SVDQuantLinear))
    else:
        assert convert_to_w4a8(model, act_format) == w4a4 > 0
        assert all(m.act_format == act_format for m in model.modules() if isinstance(m, SVDQuantW4A8Linear))
    with torch.no_grad():
        err = relative_error(model(**inputs)[0], ref)
    assert 0 < err < 0.05, err
    if act_format == "none":
        assert err < 0.8 * err_w4a4, (err, err_w4a4)  # measured 0.0059 vs 0.0099


def test_flux_fp8_fusions():
    """convert_to_fp8 fuses the GELU MLPs and the single block's GELU + concatenation into the fp8 activation
    quantization: same state-dict keys, the unfused model's output (80 tokens: the fp8 kernels; the GELU is taken
    in float32 either way), and the torch fallback off the kernels; enable_fusions' record undoes it."""
    import copy

    from quantduo.integrations.diffusers import enable_fusions

    model = tiny_flux()
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2),
                         quantization_config(model, smooth=False, **FAST), progress=False)
    fused = copy.deepcopy(model)
    n = convert_to_fp8(model, fuse=False)
    assert convert_to_fp8(fused) == n > 0
    assert isinstance(fused.single_transformer_blocks[0], FusedFluxSingleBlock)
    assert isinstance(fused.transformer_blocks[0].ff, FusedGeluMLP)
    assert isinstance(fused.transformer_blocks[0].ff_context, FusedGeluMLP)
    assert list(fused.state_dict()) == list(model.state_dict())
    inputs = flux_inputs(model, 100, img=64, txt=16)
    for backend in ("reference", "triton"):
        for m in list(model.modules()) + list(fused.modules()):
            if isinstance(m, SVDQuantLinear):
                m.backend = backend
        with torch.no_grad():
            expected, got = model(**inputs)[0], fused(**inputs)[0]
        assert relative_error(got, expected) < (1e-6 if backend == "reference" else 5e-3), backend
    undo = enable_fusions(model)
    assert set(undo) == {"transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "single_transformer_blocks.0"}
    for name, original in undo.items():
        model.set_submodule(name, original)
    assert type(model.single_transformer_blocks[0]).__name__ == "FluxSingleTransformerBlock"


def test_unsupported_class_is_rejected():
    with pytest.raises(ValueError, match="unsupported model class"):
        quantization_config(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown format"):
        quantization_config(tiny_flux(), fmt="int3")
    assert rules_for(tiny_flux()).skip


def _word_tokenizer(max_length: int):
    """A transformers fast tokenizer over a small word-level vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("a an the of on in with at photo cat dog red blue green house tree sky car bus table bowl fruit man "
             "riding wave snowy mountain sunrise two playing park plate pasta night lighthouse coast").split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", eos_token="[EOS]")


def tiny_flux_pipeline(seed: int = 0):
    """A complete FluxPipeline from tiny components (CLIP + T5 text encoders, 2-level VAE, tiny FLUX transformer)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vocab = len(_word_tokenizer(16))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16, projection_dim=64,
                                        eos_token_id=2, pad_token_id=0, bos_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0))
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0, scaling_factor=1.0, sample_size=32,
    )
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip.eval(),
        tokenizer=_word_tokenizer(16), text_encoder_2=t5.eval(), tokenizer_2=_word_tokenizer(16),
        transformer=tiny_flux(seed, in_channels=16),
    )
