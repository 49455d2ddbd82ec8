"""Static (CUDA-graph friendly) decode and quantized KV inside DuoCache, against dense references (CPU)."""
import copy

import numpy as np
import pytest
import torch
from transformers import StaticCache

from quantduo.duo.cache import DuoCache
from quantduo.duo.decode import GraphedDecoder
from quantduo.duo.deploy import apply_duo
from quantduo.formats.kv import bytes_per_element, quantize_kv
from quantduo.duo.compat import cache_kwargs
from tests.duo.reference_impl import reference_logits
from tests.duo.test_deploy import RECENT, SINK, tiny_model

MASK = np.array([[True, False, False, True], [False, False, False, False], [False, True, True, False]])
PROMPT, STEPS = 40, 12  # decoding crosses the ring-buffer wrap-around (sink 3 + recent 8)


pytestmark = pytest.mark.usefixtures("single_thread")


def static_decode_logits(model, cache, ids: torch.Tensor, sabotage: bool = False) -> torch.Tensor:
    """Prefill ids[:, :PROMPT] then decode the rest one token at a time through GraphedDecoder (eager
    here); ``sabotage`` zeroes DuoCache's Python lengths before each step (static steps must not use them)."""
    with torch.no_grad():
        first = model(ids[:, :PROMPT], **cache_kwargs(model, cache)).logits[:, -1:]
    dec = GraphedDecoder(model, cache, PROMPT, use_graph=False)
    outs = [first]
    for i in range(PROMPT, ids.shape[1] - 1):
        if sabotage:
            for layer in cache.layers:
                layer.length = 0
        outs.append(dec(ids[:, i:i + 1]).clone()[:, None])
    return torch.cat(outs, 1)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", seed=11)
    ids = torch.randint(0, 64, (1, PROMPT + STEPS))
    steps = ids.shape[1] - PROMPT
    ref = reference_logits(model, MASK, SINK, RECENT, ids, [PROMPT] + [1] * steps)[:, PROMPT - 1:-1]
    with torch.no_grad():
        full = model(ids).logits[:, PROMPT - 1:-1]
    return model, apply_duo(copy.deepcopy(model), MASK, SINK, RECENT), ids, ref, full


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_static_duo_decode_matches_dense_reference(setup, device):
    """On CUDA the cache writes are the Triton ring / quantize-on-write kernels."""
    _, duo, ids, ref, full = setup
    duo = copy.deepcopy(duo).to(device)
    out = static_decode_logits(duo, DuoCache.from_model(duo, max_cache_len=64, static=True), ids.to(device),
                               sabotage=True)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-4, rtol=1e-4)
    assert (full - ref).abs().max() > 1e-2  # streaming heads matter here


def test_all_full_static_cache_and_static_sdpa_equal_full_attention(setup):
    model, duo, ids, _, full = setup
    out = static_decode_logits(duo, DuoCache.from_model(duo, max_cache_len=64, static=True, all_full=True), ids)
    torch.testing.assert_close(out, full, atol=2e-4, rtol=1e-4)
    out = static_decode_logits(model, StaticCache(config=model.config, max_cache_len=64), ids)
    torch.testing.assert_close(out, full, atol=2e-4, rtol=1e-4)


def test_static_cache_rejects_overflow_and_dynamic_cache():
    with pytest.raises(ValueError, match="max_cache_len"):
        DuoCache([1], 2, SINK, RECENT, static=True)
    duo = apply_duo(tiny_model("llama"), MASK, SINK, RECENT)
    with pytest.raises(ValueError, match="static"):
        GraphedDecoder(duo, DuoCache.from_model(duo, max_cache_len=8), 0)


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.3)])
def test_quantized_kv_cache(setup, bits, tol):
    _, duo, ids, ref, _ = setup
    cache = DuoCache.from_model(duo, max_cache_len=64, static=True, kv_bits=bits, kv_group=4)
    out = static_decode_logits(duo, cache, ids)
    err = (out - ref).abs().max().item()
    assert 0 < err < tol
    # stored codes are exactly the reference quantizer's, and the byte count is the real one
    assert cache.layers[0].full.bufs["kcodes"].shape[-1] == 8 * bits // 8
    n_full, n_stream, d, cap = MASK.sum(), (~MASK).sum(), 8, 64
    assert cache.layers[0].full.capacity == cap
    expect = 2 * d * (n_full * cap * bytes_per_element(bits, 4) + n_stream * (SINK + RECENT + 1) * 4)
    assert cache.memory_bytes() == expect
    x = torch.randn(1, 2, 5, 8)
    layer2 = DuoCache([2], 2, SINK, RECENT, max_cache_len=8, kv_bits=bits, kv_group=4).layers[0]
    layer2.update(x, x)
    q = quantize_kv(x, bits, 4)
    assert torch.equal(layer2.full.bufs["kcodes"][:, :, :5], q.codes)
    assert torch.equal(layer2.full.bufs["vscale"][:, :, :5], q.scale)


@pytest.mark.gpu
def test_gpu_graph_replay_equals_eager_static_decode():
    model = apply_duo(tiny_model("llama", seed=2).cuda(), MASK, SINK, RECENT)
    ids = torch.randint(0, 64, (1, PROMPT + STEPS), device="cuda")
    outs = []
    for use_graph in (False, True):
        cache = DuoCache.from_model(model, max_cache_len=64, static=True)
        with torch.no_grad():
            model(ids[:, :PROMPT], **cache_kwargs(model, cache))
        dec = GraphedDecoder(model, cache, PROMPT, use_graph=use_graph)
        outs.append(torch.stack([dec(ids[:, i:i + 1]).clone() for i in range(PROMPT, ids.shape[1])]))
    assert dec.graph is not None
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
