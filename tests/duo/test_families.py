"""Model families through transformers' own classes (tiny configs): Llama 2 / 3 / 3.1 (rope scaling llama3,
linear, dynamic), Mistral (sliding window ignored, as the reference; applied with respect_sliding_window), Qwen2 /
2.5 (mixed sliding layers) / Qwen3, Gemma 2 (soft-capping) / Gemma 3 (DuoAttention on global layers only), Phi-3
(fused qkv_proj). Each: every head full == plain transformers without a window on DuoAttention layers (logits past
the window, generate()); 50% streaming == the reference re-statement; identification (gate training, score_heads)
-> pattern -> generate()."""
import copy

import numpy as np
import pytest
import torch
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DynamicCache, Gemma2Config, Gemma2ForCausalLM,
                          Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from quantduo.duo.cache import DuoCache
from quantduo.duo.deploy import apply_duo, apply_pattern
from quantduo.duo.identify import IdentifyConfig, identify
from quantduo.duo.layout import duo_layers
from quantduo.duo.score import score_heads
from quantduo.duo.compat import cache_kwargs
from tests.duo.reference_impl import reference_logits
from tests.duo.test_deploy import RECENT, SINK

pytestmark = pytest.mark.usefixtures("single_thread")

WINDOW = 16
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
SLIDE4 = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
FAMILIES = {
    "llama2": (LlamaConfig, LlamaForCausalLM, {}),
    "llama3": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": LLAMA3}),
    "llama3.1": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": {**LLAMA3, "factor": 4.0}}),
    "llama-linear": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                         "rope_theta": 10000.0}}),
    "llama-dynamic": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                          "rope_theta": 10000.0},
                                                      "max_position_embeddings": 24}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": WINDOW}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen2.5-sliding": (Qwen2Config, Qwen2ForCausalLM, {"use_sliding_window": True, "max_window_layers": 2,
                                                        "sliding_window": WINDOW}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": WINDOW, "attn_logit_softcapping": 2.0,
                                                 "query_pre_attn_scalar": 8, "layer_types": SLIDE4}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": WINDOW, "layer_types": SLIDE4}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"sliding_window": None, "pad_token_id": 0, "bos_token_id": 1,
                                           "eos_token_id": 2}),
}
EXPECTED_DUO_LAYERS = {"qwen2.5-sliding": [0, 1], "gemma2": [1, 3], "gemma3": [1, 3]}
CHUNKS = [20, 9, 14] + [1] * 7  # 50 tokens: past the window of 16, chunks and decode steps


def family_model(name: str, seed: int = 0):
    cfg_cls, model_cls, extra = FAMILIES[name]
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=8, max_position_embeddings=256)
    cfg = cfg_cls(**{**kw, **extra})
    cfg._attn_implementation = "eager" if name == "gemma2" else "sdpa"
    model = model_cls(cfg).eval()
    for layer in model.model.layers:  # random biases / norm scales so that every permutation is exercised
        for p in layer.self_attn.parameters():
            if p.ndim == 1:
                torch.nn.init.normal_(p, std=0.5)
    return model


def without_window(model):
    """A copy of ``model`` whose config has no sliding window (the same weights): what the reference computes for a
    model whose every layer has the window (Mistral), since it never applies it."""
    plain = copy.deepcopy(model)
    plain.config.sliding_window = None
    return plain


def upstream_plain(name: str, model):
    """The plain transformers model that DuoAttention with every head full equals under the reference's rule: no
    sliding window on DuoAttention layers (Mistral: every layer; mixed models keep it on their sliding layers)."""
    return without_window(model) if name == "mistral" else model


def windowed_layers(name: str) -> list[bool]:
    """Per layer, whether the reference rule applies its sliding window: only on layers without DuoAttention."""
    return [i not in EXPECTED_DUO_LAYERS.get(name, range(4)) for i in range(4)]


def half_mask(model, seed: int = 1) -> np.ndarray:
    n = len(duo_layers(model.config))
    mask = np.random.default_rng(seed).permutation(np.arange(n * 4) % 2 == 0).reshape(n, 4)
    mask[0] = [True, False, True, False]  # interleaved: needs reordering
    return mask


def every_layer(model, mask: np.ndarray) -> np.ndarray:
    """Retrieval mask of every layer (layers without DuoAttention: all heads full)."""
    full = np.ones((model.config.num_hidden_layers, 4), bool)
    full[duo_layers(model.config)] = mask
    return full


def run_chunks(model, ids, chunks, cache=None):
    """Logits of ids fed as consecutive chunks into ``cache`` (default: a DuoCache)."""
    cache, outs, start = cache if cache is not None else DuoCache.from_model(model), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(ids[:, start:start + n], **cache_kwargs(model, cache)).logits)
            start += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_all_full_equals_plain_transformers(name):
    model = family_model(name)
    assert duo_layers(model.config) == EXPECTED_DUO_LAYERS.get(name, [0, 1, 2, 3])
    duo = apply_duo(copy.deepcopy(model), np.ones((len(duo_layers(model.config)), 4), bool), SINK, RECENT)
    model = upstream_plain(name, model)
    ids = torch.randint(3, 64, (2, sum(CHUNKS)), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(duo(ids).logits, want, atol=1e-4, rtol=1e-4)
    # chunked: as transformers' own chunked run (dynamic rope scaling depends on the positions of each forward)
    want = run_chunks(model, ids, CHUNKS, DynamicCache(config=model.config))
    torch.testing.assert_close(run_chunks(duo, ids, CHUNKS), want, atol=1e-4, rtol=1e-4)
    prompt = ids[:, :30]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, min_new_tokens=8, do_sample=False,
              pad_token_id=0)
    assert duo.generate(prompt, **kw).tolist() == model.generate(prompt, **kw).tolist()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_half_streaming_equals_reference(name):
    model = family_model(name, seed=3)
    mask = half_mask(model)
    ids = torch.randint(3, 64, (1, sum(CHUNKS)), generator=torch.Generator().manual_seed(4))
    ref = reference_logits(model, every_layer(model, mask), SINK, RECENT, ids, CHUNKS, windowed=windowed_layers(name))
    duo = apply_duo(copy.deepcopy(model), mask, SINK, RECENT)
    torch.testing.assert_close(run_chunks(duo, ids, CHUNKS), ref, atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() > 2e-3  # the streaming heads matter


@pytest.mark.parametrize("name", ["llama3", "mistral", "gemma2", "gemma3", "phi3", "qwen2.5-sliding"])
def test_identification_then_generate(name):
    """Gate training (2 steps) and score_heads give [DuoAttention layers, KV heads] patterns; deployed at 50%
    they generate what the reference rules give."""
    model = family_model(name, seed=5)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 64, (1, 40), generator=g)
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, -6:] = True
    cfg = IdentifyConfig(steps=2, sink=SINK, recent=RECENT, chunk=16)
    trained = identify(model, lambda step: (ids, target), cfg, progress=False)
    scored = score_heads(model, [(ids, target)], SINK, RECENT)
    shape = (len(duo_layers(model.config)), 4)
    assert trained.shape == scored.shape == shape
    assert not np.allclose(trained.gates, 1.0) and scored.gates.max() == 1.0
    duo = apply_pattern(copy.deepcopy(model), scored, 0.5)
    prompt = ids[:, :30]
    out = duo.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                       do_sample=False, pad_token_id=0)
    expect = prompt
    for i in range(5):
        logits = reference_logits(model, every_layer(model, scored.binarize(0.5)), SINK, RECENT, expect,
                                  [30] + [1] * i, windowed=windowed_layers(name))
        eos = duo.generation_config.eos_token_id
        logits[..., [] if eos is None else np.atleast_1d(eos).tolist()] = float("-inf")  # min_new_tokens
        expect = torch.cat([expect, logits[:, -1:].argmax(-1)], 1)
    assert out.tolist() == expect.tolist()


def test_mistral_sliding_window_is_ignored_as_the_reference():
    """DuoAttention on a Mistral model with a window of 16 computes what it computes on the same weights without a
    window (the reference never applies it), in deployment and identification, over 50 tokens; the window does
    matter there (respect_sliding_window, the former rule, differs)."""
    model = family_model("mistral", seed=3)
    plain = without_window(model)
    mask = half_mask(model)
    ids = torch.randint(3, 64, (1, sum(CHUNKS)), generator=torch.Generator().manual_seed(4))
    want = run_chunks(apply_duo(copy.deepcopy(plain), mask, SINK, RECENT), ids, CHUNKS)
    torch.testing.assert_close(run_chunks(apply_duo(copy.deepcopy(model), mask, SINK, RECENT), ids, CHUNKS), want,
                               atol=1e-5, rtol=1e-5)
    windowed = run_chunks(apply_duo(copy.deepcopy(model), mask, SINK, RECENT, respect_sliding_window=True), ids, CHUNKS)
    assert (windowed - want).abs().max() > 1e-3
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, -6:] = True
    cfg = IdentifyConfig(steps=2, sink=SINK, recent=RECENT, chunk=16, block=None)
    gates = [identify(m, lambda step: (ids, target), cfg, progress=False).gates for m in (model, plain)]
    np.testing.assert_allclose(gates[0], gates[1], atol=1e-6)
    scores = [score_heads(m, [(ids, target)], SINK, RECENT).gates for m in (model, plain)]
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-5)
    respected = score_heads(model, [(ids, target)], SINK, RECENT, respect_sliding_window=True).gates
    assert np.abs(respected - scores[1]).max() > 1e-3


def test_respect_sliding_window_applies_it_to_every_head():
    """respect_sliding_window=True: every head full == plain transformers with Mistral's window; 50% streaming ==
    the reference re-statement applying the window on every layer."""
    model = family_model("mistral", seed=3)
    ids = torch.randint(3, 64, (1, sum(CHUNKS)), generator=torch.Generator().manual_seed(4))
    full = apply_duo(copy.deepcopy(model), np.ones((4, 4), bool), SINK, RECENT, respect_sliding_window=True)
    want = run_chunks(model, ids, CHUNKS, DynamicCache(config=model.config))
    torch.testing.assert_close(run_chunks(full, ids, CHUNKS), want, atol=1e-4, rtol=1e-4)
    mask = half_mask(model)
    ref = reference_logits(model, mask, SINK, RECENT, ids, CHUNKS)
    duo = apply_duo(copy.deepcopy(model), mask, SINK, RECENT, respect_sliding_window=True)
    torch.testing.assert_close(run_chunks(duo, ids, CHUNKS), ref, atol=2e-4, rtol=1e-4)


def test_sliding_window_caches_and_unsupported_architectures_are_refused():
    duo = apply_duo(family_model("mistral"), np.ones((4, 4), bool), SINK, RECENT)
    with pytest.raises(ValueError, match="DynamicCache of full layers"):  # keeps only the last window of tokens
        duo(torch.ones(1, 5, dtype=torch.long), **cache_kwargs(duo, DynamicCache(config=duo.config)))
    mla = DeepseekV2ForCausalLM(DeepseekV2Config(vocab_size=64, hidden_size=64, intermediate_size=96,
                                                 num_hidden_layers=1, num_attention_heads=4, kv_lora_rank=16,
                                                 q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                                 v_head_dim=8, n_routed_experts=2, num_experts_per_tok=1,
                                                 first_k_dense_replace=1))
    with pytest.raises(ValueError, match="per-KV-head"):
        apply_duo(mla, np.ones((1, 4), bool), SINK, RECENT)
