"""The evaluation metrics against plain teacher-forced forwards of the tiny LM."""
import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from quantduo.duo import demo
from quantduo.duo.cache import DuoCache
from quantduo.duo.deploy import apply_duo
from quantduo.duo.evaluate import answer_logprob, passkey_accuracy
from quantduo.models import tiny_lm

pytestmark = pytest.mark.usefixtures("single_thread")


def _teacher_forced_logprob(model, samples) -> float:
    """Mean log-prob of the answer tokens from ONE forward over prompt + answer (no cache)."""
    values = []
    with torch.no_grad():
        for s in samples:
            prompt_len, answer = s.questions[0]
            ids = s.input_ids[None, :prompt_len + len(answer)]
            logp = model(ids).logits[0].float().log_softmax(-1)
            values += [logp[prompt_len - 1 + i, tok].item() for i, tok in enumerate(answer)]
    return float(np.mean(values))


@pytest.mark.parametrize("prefill_chunk", [None, 50])
def test_answer_logprob_of_full_attention_is_the_teacher_forced_one(prefill_chunk):
    model, samples = tiny_lm.load(), demo.eval_samples(n=3, seed=7)
    got = answer_logprob(model, samples, DynamicCache, prefill_chunk)
    assert got == pytest.approx(_teacher_forced_logprob(model, samples), abs=1e-4)


def test_streaming_heads_lower_the_answer_logprob_and_chunks_reach_generate():
    model, samples = tiny_lm.load(), demo.eval_samples(n=3, seed=7)
    duo = apply_duo(copy.deepcopy(model), np.zeros((4, 4), bool), tiny_lm.SINK, tiny_lm.RECENT)
    make_cache = lambda: DuoCache.from_model(duo)  # noqa: E731
    assert answer_logprob(duo, samples, make_cache, 50) < _teacher_forced_logprob(model, samples) - 1.0
    assert passkey_accuracy(duo, samples, make_cache, 50) == 0.0  # streaming only: the passkey is out of reach
    with pytest.raises(ValueError, match="chunked prefill needs make_cache"):
        passkey_accuracy(duo, samples, prefill_chunk=50)
