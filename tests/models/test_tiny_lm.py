"""The shipped tiny retrieval LM: identification picks the retrieval heads; DuoAttention at 50%
streaming heads keeps full-attention passkey accuracy while streaming-only fails."""
import copy
import warnings

import numpy as np
import pytest

from quantduo.duo import demo
from quantduo.duo.cache import DuoCache
from quantduo.duo.deploy import apply_duo
from quantduo.duo.evaluate import passkey_accuracy
from quantduo.duo.patterns import load_pattern
from quantduo.models import tiny_lm

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.fixture(scope="module")
def model():
    return tiny_lm.load()

@pytest.fixture(scope="module")
def samples():
    return demo.eval_samples(n=12, seed=7)

def test_shipped_model_is_small_gqa_llama(model):
    assert (tiny_lm.ASSET_DIR / "model.safetensors").stat().st_size < 5e6
    cfg = model.config
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 8, 4)
    assert tiny_lm.decode(tiny_lm.encode("pass key A is 1 2 3 4 .")) == "pass key A is 1 2 3 4 ."
    with pytest.raises(KeyError, match="vocabulary"):
        tiny_lm.encode("hello")

def test_shipped_pattern_accuracy(model, samples):
    retrieval = load_pattern(demo.SHIPPED_PATTERN).binarize(0.5)
    res = demo.evaluate_modes(model, retrieval, samples)
    assert res["full"]["accuracy"] >= 0.9  # measured 1.0
    assert res["duo"]["accuracy"] == res["full"]["accuracy"]
    assert res["streaming"]["accuracy"] <= 0.2  # measured 0.0
    assert res["duo"]["kv_bytes"] < 0.6 * res["full"]["kv_bytes"]
    assert res["streaming"]["kv_bytes"] < 0.1 * res["full"]["kv_bytes"]

def test_identification_finds_heads_whose_removal_breaks_retrieval(model, samples):
    pattern = demo.tiny_identify(model, steps=40, progress=False)
    retrieval = pattern.binarize(0.5)
    res = demo.evaluate_modes(model, retrieval, samples[:8])
    assert res["duo"]["accuracy"] == res["full"]["accuracy"] >= 0.9
    # the complementary half (identified retrieval heads made streaming) breaks retrieval
    inverse = demo.evaluate_modes(model, ~retrieval, samples[:8])
    assert inverse["duo"]["accuracy"] <= 0.25

def test_run_duo_demo_with_shipped_pattern(tmp_path):
    res = demo.run_duo_demo(tmp_path, "cpu", identify_heads=False, n_eval=6)
    assert (tmp_path / "duo_gates.png").stat().st_size > 1000
    assert (tmp_path / "duo_pattern" / "full_attention_heads.tsv").exists()
    # measured: full 1.0, Duo 1.0, streaming-only 0.0
    assert res["duo"]["accuracy"] == res["full"]["accuracy"] == 1.0
    assert res["streaming"]["accuracy"] <= 0.5
    assert res["streaming"]["kv_bytes"] < res["duo"]["kv_bytes"] < 0.6 * res["full"]["kv_bytes"]
    assert np.array(res["retrieval"]).sum() == 8


@pytest.mark.parametrize("bits", [8, 4])
def test_duo_with_quantized_kv_keeps_accuracy(model, samples, bits):
    retrieval = load_pattern(demo.SHIPPED_PATTERN).binarize(0.5)
    m = apply_duo(copy.deepcopy(model), retrieval, tiny_lm.SINK, tiny_lm.RECENT)
    n = tiny_lm.EVAL_CONTEXT
    acc = passkey_accuracy(m, samples, lambda: DuoCache.from_model(m, max_cache_len=n, static=True, kv_bits=bits))
    print(f"tiny LM passkey accuracy, Duo + INT{bits} KV: {acc:.3f}")
    assert acc == passkey_accuracy(model, samples)  # full attention, 16-bit KV (measured 1.0)
