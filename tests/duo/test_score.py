"""Training-free head scoring (quantduo.duo.score) on the shipped tiny LM, against the gate-trained pattern."""
import numpy as np
import pytest

from quantduo.duo import demo
from quantduo.duo.patterns import load_pattern
from quantduo.models import tiny_lm

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_lm.load()


def test_scores_pick_the_trained_retrieval_heads_and_keep_passkey_accuracy(model):
    scores = demo.tiny_score(model, n_batches=6)
    assert scores.shape == (4, 4) and scores.gates.max() == 1.0
    trained = load_pattern(demo.SHIPPED_PATTERN).binarize(0.5)
    chosen = scores.binarize(0.5)
    assert (chosen & trained).sum() >= 5  # of 8 retrieval heads (measured 6)
    samples = demo.eval_samples(n=8, seed=7)
    res = demo.evaluate_modes(model, chosen, samples)
    assert res["duo"]["accuracy"] == res["full"]["accuracy"] >= 0.9
    # the lowest-scored half kept as retrieval heads instead breaks retrieval
    assert demo.evaluate_modes(model, ~chosen, samples)["duo"]["accuracy"] <= 0.5


def test_scoring_leaves_the_model_as_it_was(model):
    attn = model.model.layers[0].self_attn
    before = (model.config._attn_implementation, set(vars(attn)))
    demo.tiny_score(model, n_batches=1)
    assert (model.config._attn_implementation, set(vars(attn))) == before
    assert np.isfinite(demo.tiny_score(model, n_batches=1).gates).all()
