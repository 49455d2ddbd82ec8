"""DuoAttention deployment: head reordering, DuoCache chunked prefill + decode, generate(), memory."""
import copy
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from tests.duo.reference_impl import reference_logits

from quantduo.duo import attention as A
from quantduo.duo.cache import GROWTH, DuoCache
from quantduo.duo.deploy import apply_duo, apply_pattern, chunked_prefill
from quantduo.duo.patterns import DuoPattern
from quantduo.duo.compat import cache_kwargs

SINK, RECENT = 3, 8
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),  # q/k norms
}


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(arch: str, seed: int = 0):
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=8, max_position_embeddings=256, attn_implementation="sdpa", **extra)
    model = model_cls(cfg).eval()
    if arch == "qwen2":
        for layer in model.model.layers:  # random biases so that bias permutation is exercised
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_duo_cache_prefill_and_decode_match_dense_reference(arch):
    model = tiny_model(arch)
    mask = np.random.default_rng(1).random((3, 4)) < 0.5
    mask[0] = [True, False, True, False]  # interleaved: needs reordering
    mask[1] = False  # a layer of streaming heads only
    ids = torch.randint(0, 64, (2, 70))
    chunks = [30, 3, 27] + [1] * 10
    ref = reference_logits(model, mask, SINK, RECENT, ids, chunks)
    duo = apply_duo(copy.deepcopy(model), mask, SINK, RECENT)
    cache = DuoCache.from_model(duo)
    with torch.no_grad():
        outs = [duo(ids[:, a:b], **cache_kwargs(duo, cache)).logits for a, b in ((0, 30), (30, 33), (33, 60))]
        outs += [duo(ids[:, i:i + 1], **cache_kwargs(duo, cache)).logits for i in range(60, 70)]
        nocache = duo(ids).logits
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=2e-4, rtol=1e-4)
    with torch.no_grad():  # without a cache: one dense first chunk
        torch.testing.assert_close(nocache, model(ids).logits, atol=2e-4, rtol=1e-4)
        # the streaming reference really differs from full attention (the test can fail)
        assert (model(ids).logits - ref).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_all_retrieval_heads_equal_full_attention(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 64, (1, 40))
    duo = apply_duo(copy.deepcopy(model), np.ones((3, 4), bool), SINK, RECENT)
    with torch.no_grad():
        torch.testing.assert_close(duo(ids, cache=DuoCache.from_model(duo)).logits, model(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_generate_matches_reference_and_saves_memory():
    model = tiny_model("llama", seed=3)
    mask = np.array([[True, False, False, True], [False, True, False, False], [False, False, True, True]])
    prompt = torch.randint(0, 64, (1, 50))
    ids = prompt
    for i in range(6):  # greedy decoding with the reference rules (prompt = first chunk, then decode steps)
        logits = reference_logits(model, mask, SINK, RECENT, ids, [50] + [1] * i)
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
    duo = apply_duo(copy.deepcopy(model), mask, SINK, RECENT)
    cache = DuoCache.from_model(duo, max_cache_len=56)
    out = duo.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                       **cache_kwargs(duo, cache), pad_token_id=0)
    assert out.tolist() == ids.tolist()
    d = 2 * 8 * 4  # K+V, head_dim 8, fp32
    assert cache.memory_bytes() == d * (mask.sum() * 56 + (~mask).sum() * (SINK + RECENT + 1))
    assert cache.memory_bytes() < d * 12 * 56 * 0.6


def test_chunked_prefill_helper_matches_reference():
    model = tiny_model("qwen3", seed=5)
    mask = np.array([[True, False, False, False], [False, False, True, True], [False, True, False, False]])
    ids = torch.randint(0, 64, (1, 61))
    ref = reference_logits(model, mask, SINK, RECENT, ids, [7] * 8 + [5])[:, -1]
    duo = apply_duo(copy.deepcopy(model), mask, SINK, RECENT)
    last = chunked_prefill(duo, ids, DuoCache.from_model(duo), chunk_size=7)
    torch.testing.assert_close(last, ref, atol=2e-4, rtol=1e-4)


def test_bad_inputs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="shape"):
        apply_duo(copy.deepcopy(model), np.ones((3, 5), bool), SINK, RECENT)
    with pytest.raises(ValueError, match="shape"):
        apply_pattern(copy.deepcopy(model), DuoPattern(np.ones((4, 4))), 0.5)
    with pytest.raises(ValueError, match="apply_duo"):
        DuoCache.from_model(model)
    duo = apply_duo(copy.deepcopy(model), np.ones((3, 4), bool), SINK, RECENT)
    with pytest.raises(ValueError, match="already"):
        apply_duo(duo, np.ones((3, 4), bool), SINK, RECENT)
    with pytest.raises(ValueError, match="left padding"):
        duo(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.tensor([[1] * 5, [1, 1, 1, 1, 0]]))
    cache = DuoCache.from_model(duo, max_cache_len=8)
    with pytest.raises(ValueError, match="full"):
        duo(torch.zeros(1, 9, dtype=torch.long), **cache_kwargs(duo, cache))
    with pytest.raises(ValueError, match="4-D"):  # bidirectional: not causal + padding
        duo(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="model_type"):
        apply_duo(SimpleNamespace(config=SimpleNamespace(model_type="deepseek_v3")), np.ones((1, 4), bool), 1, 2)


def test_gated_attention_chunks_match_dense_masks():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    gate = torch.tensor([1.0, 0.0])
    out = A.gated_attention(q, k, v, gate, SINK, RECENT, 8 ** -0.5, chunk=16)
    pos = torch.arange(50)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    full = torch.nn.functional.scaled_dot_product_attention(q[:, :2], kk[:, :2], vv[:, :2], is_causal=True)
    stream = torch.nn.functional.scaled_dot_product_attention(
        q[:, 2:], kk[:, 2:], vv[:, 2:], attn_mask=A.streaming_allowed(pos, pos, SINK, RECENT))
    torch.testing.assert_close(out, torch.cat([full, stream], 1), atol=1e-5, rtol=1e-5)


def _lower_right_reference(q, k, v, scaling):
    """Causal attention of the last Tq positions (dense mask, float32)."""
    tq, tk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    allowed = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    return torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float(), attn_mask=allowed,
        scale=scaling)


@pytest.mark.parametrize("q_start,tq,rep", [(37, 20, 2), (5, 1, 1), (64, 64, 4)])
def test_split_causal_attention_matches_lower_right_mask(q_start, tq, rep):
    """A later prefill chunk as rectangle + causal square merged by log-sum-exp (the CUDA path; float32 math
    here) equals causal attention with a dense lower-right mask, and so does full_prefill's CPU path."""
    torch.manual_seed(0)
    q = torch.randn(1, 2 * rep, tq, 8)
    k, v = torch.randn(1, 2, q_start + tq, 8), torch.randn(1, 2, q_start + tq, 8)
    expected = _lower_right_reference(q, k, v, 0.3)
    torch.testing.assert_close(A.split_causal_attention(q, k, v, q_start, 0.3), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.full_prefill(q, k, v, q_start, 0.3), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_split_causal_attention_matches_lower_right_mask():
    """full_prefill of a later chunk on CUDA (cuDNN attention parts, GQA 4) vs the dense float32 reference."""
    torch.manual_seed(0)
    q = torch.randn(1, 16, 512, 128, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, 2048, 128, dtype=torch.bfloat16) for _ in range(2))
    expected = _lower_right_reference(q, k, v, 0.088)
    out = A.full_prefill(q.cuda(), k.cuda(), v.cuda(), 2048 - 512, 0.088).cpu()
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("mask_kind", ["half", "all_full", "all_streaming"])
def test_generate_without_arguments_never_holds_more_than_a_full_cache(mask_kind):
    """generate() with no cache builds a DuoCache; over prefill + 64 decode steps its bytes stay within a full
    cache of the tokens held, and its retrieval store within GROWTH x those tokens."""
    model = tiny_model("llama", seed=2)
    mask = {"half": np.array([[True, False] * 2] * 3), "all_full": np.ones((3, 4), bool),
            "all_streaming": np.zeros((3, 4), bool)}[mask_kind]
    duo = apply_duo(copy.deepcopy(model), mask, SINK, RECENT)
    seen = []

    def check(cache):
        assert isinstance(cache, DuoCache)
        assert cache.memory_bytes() <= cache.full_cache_bytes()
        for layer in cache.layers:
            assert layer.length <= layer.full.capacity <= max(layer.length, int(np.ceil(GROWTH * layer.length)))
        seen.append(cache.memory_bytes() / cache.full_cache_bytes())

    handle = duo.register_forward_hook(lambda module, args, kwargs, out: check(kwargs["cache"]), with_kwargs=True)
    prompt = torch.randint(0, 64, (2, 37))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from our calls
        duo.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, min_new_tokens=64,
                     do_sample=False, pad_token_id=0)
    handle.remove()
    assert len(seen) == 64
    if mask_kind == "half":
        assert seen[-1] < 0.7


def test_capacity_growth_is_bounded_and_budgeted():
    cache = DuoCache([2, 0, 4], 4, SINK, RECENT)
    duo_bytes, full_bytes = [], []
    for t in [5] + [1] * 200 + [40, 3]:
        for layer in cache.layers:
            layer.update(torch.randn(1, 4, t, 8), torch.randn(1, 4, t, 8))
        for layer in cache.layers:
            assert layer.length <= layer.full.capacity <= max(layer.length, int(np.ceil(GROWTH * layer.length)))
            assert layer.memory_bytes() <= layer.full_cache_bytes(layer.length)
        duo_bytes.append(cache.memory_bytes())
        full_bytes.append(cache.full_cache_bytes())
    assert duo_bytes[-1] < 0.7 * full_bytes[-1]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_all_full_matches_plain_transformers(arch):
    """generate() on the duo model (no cache passed; greedy, sampling, beams) with every head full equals plain
    transformers."""
    model = tiny_model(arch, seed=4)
    duo = apply_duo(copy.deepcopy(model), np.ones((3, 4), bool), SINK, RECENT)
    prompt = torch.randint(0, 64, (2, 21))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    for extra in (dict(do_sample=False), dict(do_sample=True, top_k=5), dict(num_beams=3, do_sample=False)):
        torch.manual_seed(0)
        want = model.generate(prompt, **kw, **extra)
        torch.manual_seed(0)
        assert duo.generate(prompt, **kw, **extra).tolist() == want.tolist(), extra


def test_beam_search_reorders_the_duo_cache():
    """Beam search at 50% streaming heads equals beam search on the reference rules (DynamicCache path)."""
    model = tiny_model("llama", seed=6)
    mask = np.array([[True, False] * 2] * 3)
    duo = apply_duo(copy.deepcopy(model), mask, SINK, RECENT)
    prompt = torch.randint(0, 64, (1, 30))
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=10, min_new_tokens=10, num_beams=3,
              do_sample=False, pad_token_id=0)
    with_duo_cache = duo.generate(prompt, **kw)
    with_full_cache = duo.generate(prompt, **cache_kwargs(duo, DynamicCache(config=duo.config)), **kw)
    assert with_duo_cache.tolist() == with_full_cache.tolist()
