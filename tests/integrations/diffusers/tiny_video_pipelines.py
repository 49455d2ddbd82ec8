"""Complete diffusers pipelines around the zoo's tiny video and large-text-encoder denoisers: every component a real
transformers / diffusers class in a tiny config with random weights (seeded), the denoiser the one ``tiny_zoo``
builds, tokenizers word-level vocabularies built in code (nothing downloaded).

The chat-templated text encoders (Qwen2.5-VL, Llama) get :func:`chat_tokenizer`: its pre-tokenizer splits text like
the Llama-3 / Qwen2 byte-level tokenizers do (one token per word, digit, punctuation run or newline run) and it knows
their template markers, so the number of template tokens the pipelines crop (``crop_start`` 95 for HunyuanVideo,
``prompt_template_encode_start_idx`` 34 for QwenImage) is the number of template tokens this tokenizer produces, and
the denoiser sees the prompt's hidden states as it would with the real tokenizer.
"""
from __future__ import annotations

import diffusers
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPTextModel, LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast,
                          Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, UMT5Config, UMT5EncoderModel)

from quantduo.models.tiny_flux import word_tokenizer

from .tiny_zoo import (_clip_config, _clip_with_projection, _t5, _tiny_vae, tiny_hidream, tiny_hunyuan_video,
                       tiny_qwen_image, tiny_wan)

# the pre-tokenizer pattern of the Llama-3 and Qwen2 tokenizers (Qwen2 splits digits one by one; the templates here
# have single digits)
CHAT_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
CHAT_MARKERS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
                "<|im_end|>"]


def chat_tokenizer(max_length: int, bos: bool = False) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer with the Llama-3 / Qwen2 pre-tokenizer (words keep their leading space, as in the
    byte-level vocabularies: ``word_tokenizer``'s words with and without it), the chat-template markers as special
    tokens, and ``<|begin_of_text|>`` prepended when ``bos`` (Llama 3)."""
    words = word_tokenizer(max_length).get_vocab()
    vocab = {**words, **{" " + w: len(words) + i for i, w in enumerate(sorted(words, key=words.get)[3:])}}
    vocab.update({m: len(vocab) + i for i, m in enumerate(CHAT_MARKERS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(CHAT_SPLIT), behavior="isolated")
    tok.add_special_tokens(CHAT_MARKERS)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
            special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", eos_token="[EOS]")


def _llama_config(vocab: int, layers: int) -> LlamaConfig:
    """Llama, hidden 64 (2 heads of 32, 1 key/value head), ``layers`` layers."""
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=vocab - len(CHAT_MARKERS), eos_token_id=2)


def tiny_wan_pipeline(seed: int = 0) -> diffusers.WanPipeline:
    """WanPipeline (text-to-video): UMT5 encoder (64), a 2-level AutoencoderKLWan (4 latent channels, 2x spatial and
    2x temporal compression: 3 frames -> 2 latent frames), the zoo's tiny Wan transformer."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(16))
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2,
                                          relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2,
                                          decoder_start_token_id=0)).eval()
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2,
                                     scale_factor_spatial=2)
    return diffusers.WanPipeline(
        tokenizer=word_tokenizer(16), text_encoder=encoder, vae=vae, transformer=tiny_wan()[0],
        scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=3.0),
    )


def tiny_hunyuan_video_pipeline(seed: int = 0) -> diffusers.HunyuanVideoPipeline:
    """HunyuanVideoPipeline: Llama (2 layers, hidden 64: the pipeline takes the states 2 layers below the top) with
    :func:`chat_tokenizer`, CLIP text model (pooled 32, 77 positions), a 2-level AutoencoderKLHunyuanVideo (4 latent
    channels, 2x spatial and 4x temporal compression, the smallest temporal ratio the class has: 5 frames -> 2
    latent frames), the zoo's tiny HunyuanVideo transformer."""
    torch.manual_seed(seed)
    tokenizer = chat_tokenizer(128, bos=True)
    vae = diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
        block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, scaling_factor=1.0,
        spatial_compression_ratio=2, temporal_compression_ratio=4)
    return diffusers.HunyuanVideoPipeline(
        text_encoder=LlamaModel(_llama_config(len(tokenizer), 2)).eval(), tokenizer=tokenizer,
        transformer=tiny_hunyuan_video()[0], vae=vae, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=CLIPTextModel(_clip_config(len(word_tokenizer(16)), 77)).eval(), tokenizer_2=word_tokenizer(77),
    )


def tiny_qwen_image_pipeline(seed: int = 0) -> diffusers.QwenImagePipeline:
    """QwenImagePipeline: Qwen2.5-VL (1 text layer, hidden 64; 1-layer vision tower, unused for text) with
    :func:`chat_tokenizer`, a 2-level AutoencoderKLQwenImage (4 latent channels, 2x compression), the zoo's tiny
    QwenImage transformer."""
    torch.manual_seed(seed)
    tokenizer = chat_tokenizer(1024)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=None, eos_token_id=2, rope_parameters=dict(rope_type="default", mrope_section=[4, 6, 6], rope_theta=10000.0)),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
        pad_token_id=0, bos_token_id=None, eos_token_id=2)
    vae = diffusers.AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                           temperal_downsample=[False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    return diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tokenizer,
        transformer=tiny_qwen_image()[0],
    )


def tiny_hidream_pipeline(seed: int = 0) -> diffusers.HiDreamImagePipeline:
    """HiDreamImagePipeline: two CLIP-with-projection encoders (32 + 32 = pooled 64), T5 (64), Llama (2 layers,
    hidden 64: both layers' states feed the transformer) with :func:`chat_tokenizer`, tiny VAE, the zoo's tiny
    HiDream transformer."""
    torch.manual_seed(seed)
    vocab = len(word_tokenizer(16))
    tokenizer = chat_tokenizer(128, bos=True)
    return diffusers.HiDreamImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_tiny_vae(),
        text_encoder=_clip_with_projection(vocab), tokenizer=word_tokenizer(16),
        text_encoder_2=_clip_with_projection(vocab), tokenizer_2=word_tokenizer(16), text_encoder_3=_t5(vocab),
        tokenizer_3=word_tokenizer(16), text_encoder_4=LlamaForCausalLM(_llama_config(len(tokenizer), 2)).eval(),
        tokenizer_4=tokenizer, transformer=tiny_hidream()[0],
    )
