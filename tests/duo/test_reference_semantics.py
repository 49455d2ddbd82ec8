"""The reference deployment rules pinned by hand-computed cases, and whole-model logits of the tiny LM against a
plain re-statement of the rules (tests/duo_reference_impl.py)."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tests.duo.reference_impl import reference_logits, visible

from quantduo.duo.cache import DuoCache, DuoLayer
from quantduo.duo.deploy import apply_duo, duo_attention_forward
from quantduo.models import tiny_lm
from quantduo.duo.compat import cache_kwargs

pytestmark = pytest.mark.usefixtures("single_thread")

SINK, RECENT = 2, 3
# chunk 1 = positions 0..5, chunk 2 = positions 6..9, then decode steps at 10 and 11: the keys a streaming
# head's query sees, written out by hand from the reference rules
EXPECTED_STREAMING = {
    0: {0}, 3: {0, 1, 2, 3}, 5: {0, 1, 2, 3, 4, 5},          # chunk 1: dense
    6: {0, 1, 3, 4, 5, 6}, 7: {0, 1, 3, 4, 5, 6, 7},         # chunk 2: sinks + last 3 before it + the chunk
    9: {0, 1, 3, 4, 5, 6, 7, 8, 9},
    10: {0, 1, 7, 8, 9, 10},                                 # decode: sinks + last 3 + the new token
    11: {0, 1, 8, 9, 10, 11},
}
CHUNKS = [(0, 6), (6, 10), (10, 11), (11, 12)]
# the per-token window option (window="token"), same chunks: sinks + the last 3 positions up to the query
EXPECTED_STREAMING_TOKEN = {
    0: {0}, 3: {0, 1, 2, 3}, 5: {0, 1, 3, 4, 5},
    6: {0, 1, 4, 5, 6}, 7: {0, 1, 5, 6, 7}, 9: {0, 1, 7, 8, 9},
    10: {0, 1, 8, 9, 10},
    11: {0, 1, 9, 10, 11},
}


def test_the_rule_restatement_agrees_with_the_hand_computed_cases():
    starts = {p: s for s, e in CHUNKS for p in range(s, e)}
    for p, keys in EXPECTED_STREAMING.items():
        assert {kp for kp in range(12) if visible(p, kp, starts[p], True, SINK, RECENT)} == keys
    for p, keys in EXPECTED_STREAMING_TOKEN.items():
        assert {kp for kp in range(12) if visible(p, kp, starts[p], True, SINK, RECENT, per_token=True)} == keys


def _seen_keys(static: bool, kv_source: str, window: str = "chunk") -> dict[int, tuple[set, set]]:
    """Run one retrieval and one streaming KV head through the duo attention with zero queries (uniform weights
    over the visible keys) and one-hot values (value of position j = e_j): the support of each output row is the
    set of keys that query saw. Returns {position: (retrieval keys, streaming keys)}."""
    d = 16
    module = SimpleNamespace(duo_n_full=1, duo_sink=SINK, duo_recent=RECENT, duo_window=window, duo_keep_window=False,
                             num_key_value_groups=1, scaling=1.0)
    layer = DuoLayer(1, 1, SINK, RECENT, max_cache_len=16 if static else None, static=static)
    keys = torch.zeros(1, 2, 12, d)
    values = torch.eye(d)[:12].expand(1, 2, 12, d).contiguous()
    seen = {}
    for s, e in CHUNKS:
        q = torch.zeros(1, 2, e - s, d)
        if kv_source == "duo_cache":
            kv, _ = layer.update(keys[:, :, s:e], values[:, :, s:e])
            out, _ = duo_attention_forward(module, q, kv, kv)
        else:  # plain tensors holding every token (no cache / a transformers cache)
            out, _ = duo_attention_forward(module, q, keys[:, :, :e], values[:, :, :e])
        for i in range(e - s):
            seen[s + i] = tuple({int(j) for j in torch.nonzero(out[0, i, h] > 1e-6)} for h in range(2))
    return seen


@pytest.mark.parametrize("static, kv_source", [(False, "duo_cache"), (True, "duo_cache"), (False, "plain")])
def test_which_keys_each_query_sees(static, kv_source):
    seen = _seen_keys(static, kv_source)
    for p, keys in EXPECTED_STREAMING.items():
        assert seen[p] == (set(range(p + 1)), keys), p


@pytest.mark.parametrize("kv_source", ["duo_cache", "plain"])
def test_which_keys_each_query_sees_with_the_per_token_window(kv_source):
    seen = _seen_keys(False, kv_source, window="token")
    for p, keys in EXPECTED_STREAMING_TOKEN.items():
        assert seen[p] == (set(range(p + 1)), keys), p


def test_the_per_token_window_needs_a_dynamic_cache_to_decode():
    with pytest.raises(ValueError, match="static DuoCache does not support.*per-token-window"):
        _seen_keys(True, "duo_cache", window="token")


def test_streaming_ring_holds_sink_plus_recent_plus_one():
    layer = DuoLayer(1, 1, SINK, RECENT)
    for s, e in CHUNKS:
        layer.update(torch.randn(1, 2, e - s, 16), torch.randn(1, 2, e - s, 16))
    assert layer.stream_keys.shape[2] == SINK + RECENT + 1
    assert sorted(layer.stream_pos[0].tolist()) == [0, 1, 8, 9, 10, 11]


def _tiny_duo(sparsity_mask, window: str = "chunk"):
    model = tiny_lm.load()
    return model, apply_duo(copy.deepcopy(model), sparsity_mask, tiny_lm.SINK, tiny_lm.RECENT, window=window)


def tiny_mask() -> np.ndarray:
    """50% streaming heads of the tiny LM, interleaved (reordering is exercised)."""
    return np.array([[True, False, True, False], [False, True, False, True],
                     [True, True, False, False], [False, False, True, True]])


def tiny_ids(n: int = 300) -> torch.Tensor:
    rng = np.random.default_rng(0)
    hay = tiny_lm.haystack_ids(seed=3, n_words=4000)
    start = int(rng.integers(0, len(hay) - n))
    return torch.tensor([[tiny_lm.BOS_ID] + hay[start:start + n - 1]])


@pytest.mark.parametrize("window", ["chunk", "token"])
@pytest.mark.parametrize("name, chunks", [("one-shot", [300]), ("chunked", [70, 100, 130]),
                                          ("decode", [260] + [1] * 40)])
def test_tiny_lm_logits_match_the_reference_rules(name, chunks, window):
    model, duo = _tiny_duo(tiny_mask(), window)
    ids = tiny_ids()
    ref = reference_logits(model, tiny_mask(), tiny_lm.SINK, tiny_lm.RECENT, ids, chunks, per_token=window == "token")
    cache, outs, start = DuoCache.from_model(duo), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(duo(ids[:, start:start + n], **cache_kwargs(duo, cache)).logits)
            start += n
    diff = (torch.cat(outs, 1) - ref).abs().max().item()
    print(f"max |logit diff| vs reference rules ({name}, {window} window): {diff:.2e}")
    assert diff < 1e-3
    # the streaming windows matter here: full attention gives other logits
    if name != "one-shot" or window == "token":
        full = reference_logits(model, np.ones((4, 4), bool), tiny_lm.SINK, tiny_lm.RECENT, ids, chunks)
        assert (full - ref).abs().max() > 1e-2
