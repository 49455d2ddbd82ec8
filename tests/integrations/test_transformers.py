"""4-bit weights from the SVDQuant module on the tiny retrieval LM, alone and combined with DuoAttention."""
import copy
import warnings

import pytest
import torch

from quantduo.duo import demo
from quantduo.duo.cache import DuoCache
from quantduo.duo.evaluate import passkey_accuracy
from quantduo.duo.deploy import apply_duo
from quantduo.duo.patterns import load_pattern
from quantduo.integrations.transformers import quantize_causal_lm, weight_bytes
from quantduo.models import tiny_lm
from quantduo.svdquant import SVDQuantLinear

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup():
    model = tiny_lm.load()
    samples = demo.eval_samples(n=12, seed=11)
    calibration = torch.stack([s.input_ids for s in demo.eval_samples(n=2, seed=99)])
    retrieval = load_pattern(demo.SHIPPED_PATTERN).binarize(0.5)
    return model, samples, calibration, retrieval


def test_w4a16_weights_keep_passkey_accuracy_with_duo(setup):
    model, samples, calibration, retrieval = setup
    duo = apply_duo(copy.deepcopy(model), retrieval, tiny_lm.SINK, tiny_lm.RECENT)
    before = weight_bytes(duo)
    report = quantize_causal_lm(duo, calibration, "w4a16", progress=False, dtype="float32")
    assert isinstance(duo.model.layers[0].self_attn.q_proj, SVDQuantLinear)
    assert {r.name for r in report.skipped()} >= {"lm_head"}
    assert all(r.status == "w4a16" for r in report.quantized())
    # fp32 model: decoder linears go from 32 to ~4.5 bits (measured 3.20 MB -> 0.53 MB in all)
    assert weight_bytes(duo) < 0.2 * before
    full = passkey_accuracy(model, samples)
    duo_w4 = passkey_accuracy(duo, samples, lambda: DuoCache.from_model(duo, max_cache_len=tiny_lm.EVAL_CONTEXT))
    assert full == 1.0 and duo_w4 == full


def test_bad_calibration_ids(setup):
    model = setup[0]
    with pytest.raises(ValueError, match="long \\[B, T\\]"):
        quantize_causal_lm(copy.deepcopy(model), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown (LLM|storage) format"):
        quantize_causal_lm(copy.deepcopy(model), torch.zeros(1, 4, dtype=torch.long), fmt="int3")
