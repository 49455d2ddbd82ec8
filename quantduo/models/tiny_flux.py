"""A tiny FLUX pipeline built in-process (no downloads): CLIP + T5 text encoders with a small word-level vocabulary,
a 2-level VAE and a 1+1-block FluxTransformer2DModel, randomly initialised. ``quantduo example-pipeline DIR`` saves
one, for trying ``quantduo quantize`` / ``quantduo generate`` on a CPU in seconds; the tests use it too."""
from __future__ import annotations

import diffusers
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel


def tiny_flux(seed: int = 0, in_channels: int = 16) -> torch.nn.Module:
    """FluxTransformer2DModel: inner dim 128 (2 heads x 64), 1 double + 1 single block, text dim 64."""
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[8, 28, 28],
    ).eval()


def word_tokenizer(max_length: int):
    """A transformers fast tokenizer over a small word-level vocabulary, built offline."""
    words = ("a an the of on in with at photo cat dog red blue green house tree sky car bus table bowl fruit man "
             "riding wave snowy mountain sunrise two playing park plate pasta night lighthouse coast").split()
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", eos_token="[EOS]")


def tiny_flux_pipeline(seed: int = 0):
    """A complete FluxPipeline from tiny components (CLIP + T5 text encoders, 2-level VAE, tiny FLUX transformer)."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(16))
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
        tokenizer=word_tokenizer(16), text_encoder_2=t5.eval(), tokenizer_2=word_tokenizer(16),
        transformer=tiny_flux(seed, in_channels=16),
    )
