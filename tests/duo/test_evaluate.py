"""The evaluation metrics against plain teacher-forced forwards of the tiny LM."""
import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from quantduo.duo import demo
from quantduo.duo.cache import DuoCache
from quantduo.duo.compat import cache_kwargs
from quantduo.duo.deploy import apply_duo, chunked_prefill
from quantduo.duo.evaluate import answer_logprob, greedy_answer, passkey_accuracy
from quantduo.models import tiny_lm
from tests.duo.test_reference_semantics import tiny_mask

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


def _protocol_logits(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of ids [1, T] fed as consecutive forwards of the given sizes into one fresh DuoCache."""
    cache, outs, start = DuoCache.from_model(model), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(model(ids[:, start:start + n], use_cache=True, **cache_kwargs(model, cache)).logits[0])
            start += n
    return torch.cat(outs)


def _prompt_chunks(prompt_len: int, chunk: int) -> list[int]:
    return [min(chunk, prompt_len - s) for s in range(0, prompt_len, chunk)]


def test_eval_prefills_the_whole_prompt_in_chunks_then_decodes():
    """The reference's needle protocol (scripts/niah.sh, --simulation_length 0): the whole prompt, its last token
    included, in chunks of 50, then one decode step per answer token. The former protocol (prompt[:-1] in chunks,
    the last prompt token as a decode step) gives other values on this model."""
    model, samples = tiny_lm.load(), demo.eval_samples(n=2, seed=7)
    duo = apply_duo(copy.deepcopy(model), tiny_mask(), tiny_lm.SINK, tiny_lm.RECENT)
    chunk, want = 50, []
    for s in samples:
        prompt_len, answer = s.questions[0]
        assert prompt_len % chunk not in (0, 1)  # the two protocols then split the prompt differently
        ids = s.input_ids[None, :prompt_len + len(answer)]
        rows = range(prompt_len - 1, prompt_len - 1 + len(answer))
        logits = _protocol_logits(duo, ids, _prompt_chunks(prompt_len, chunk) + [1] * (len(answer) - 1))
        old = _protocol_logits(duo, ids, _prompt_chunks(prompt_len - 1, chunk) + [1] * len(answer))
        assert (old[prompt_len - 1] - logits[prompt_len - 1]).abs().max() > 1e-2
        want += [logits[r].float().log_softmax(-1)[ids[0, r + 1]].item() for r in rows]
        prompt = ids[:, :prompt_len]
        last = logits[prompt_len - 1]
        first = greedy_answer(duo, prompt, DuoCache.from_model(duo), 1, chunk)
        assert first == [int(last.argmax())]
        with torch.no_grad():
            torch.testing.assert_close(chunked_prefill(duo, prompt, DuoCache.from_model(duo), chunk)[0], last,
                                       atol=1e-5, rtol=1e-5)
    fed = []
    duo.model.register_forward_pre_hook(lambda module, args, kwargs: fed.append(kwargs["input_ids"].shape[1]),
                                        with_kwargs=True)
    got = answer_logprob(duo, samples, lambda: DuoCache.from_model(duo), chunk)
    assert got == pytest.approx(float(np.mean(want)), abs=1e-6)
    assert passkey_accuracy(duo, samples, lambda: DuoCache.from_model(duo), chunk) == 1.0
    per_sample = [_prompt_chunks(p, chunk) + [1] * (len(a) - 1) for p, a in (s.questions[0] for s in samples)]
    assert fed == sum(per_sample, []) * 2  # answer_logprob, then passkey_accuracy


def test_greedy_answer_decodes_from_the_prefilled_prompt():
    """greedy_answer's tokens are the argmax chain of the protocol's logits (prompt in chunks, then decode steps)."""
    model, samples = tiny_lm.load(), demo.eval_samples(n=1, seed=8)
    duo = apply_duo(copy.deepcopy(model), tiny_mask(), tiny_lm.SINK, tiny_lm.RECENT)
    prompt_len, answer = samples[0].questions[0]
    seq = samples[0].input_ids[None, :prompt_len]
    for _ in range(len(answer)):
        chunks = _prompt_chunks(prompt_len, 64) + [1] * (seq.shape[1] - prompt_len)
        seq = torch.cat([seq, _protocol_logits(duo, seq, chunks)[-1].argmax().view(1, 1)], 1)
    got = greedy_answer(duo, seq[:, :prompt_len], DuoCache.from_model(duo), len(answer), 64)
    assert got == seq[0, prompt_len:].tolist()
