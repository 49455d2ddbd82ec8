"""Passkey-retrieval evaluation and KV-cache memory of full / DuoAttention / streaming models."""
from __future__ import annotations

from typing import Callable

import torch
from transformers import DynamicCache

from quantduo.duo.compat import cache_kwargs
from quantduo.duo.data import PasskeySample
from quantduo.duo.deploy import chunked_prefill


@torch.no_grad()
def greedy_answer(model, prompt: torch.Tensor, cache, n_tokens: int, prefill_chunk: int | None = None) -> list[int]:
    """The reference's needle protocol (its ``scripts/niah.sh``: ``--simulation_length 0``): the WHOLE prompt [1, T]
    (last token included) goes into ``cache`` ``prefill_chunk`` tokens at a time (None: one pass), then
    ``n_tokens`` tokens are decoded greedily (argmax, one decode step per token after the first). Returns them."""
    logits = chunked_prefill(model, prompt, cache, prefill_chunk or prompt.shape[1])
    tokens = [int(logits[0].argmax())]
    while len(tokens) < n_tokens:
        step = torch.tensor([tokens[-1:]], device=prompt.device)
        tokens.append(int(model(step, use_cache=True, **cache_kwargs(model, cache)).logits[0, -1].argmax()))
    return tokens


@torch.no_grad()
def passkey_accuracy(model, samples: list[PasskeySample], make_cache: Callable[[], object] = DynamicCache,
                     prefill_chunk: int | None = None) -> float:
    """Fraction of questions answered exactly by :func:`greedy_answer` (the reference's needle protocol).

    Each sample's first question is asked: the prompt is ``input_ids[:prompt_len]`` and the
    answer must match the passkey value tokens. ``make_cache()`` gives a fresh cache per prompt (default: a
    DynamicCache, holding every token; a DuoAttention model computes the same with it as with a DuoCache);
    ``prefill_chunk``: the prompt goes into it that many tokens at a time (None: one pass).
    """
    if not samples:
        raise ValueError("no samples")
    ok = 0
    for s in samples:
        prompt_len, answer = s.questions[0]
        prompt = s.input_ids[None, :prompt_len].to(model.device)
        ok += greedy_answer(model, prompt, make_cache(), len(answer), prefill_chunk) == list(answer)
    return ok / len(samples)


@torch.no_grad()
def answer_logprob(model, samples: list[PasskeySample], make_cache: Callable[[], object],
                   prefill_chunk: int | None = None) -> float:
    """Mean log-probability (nats, float) of the passkey answer tokens under teacher forcing, in the reference's
    needle protocol (:func:`greedy_answer`): each sample's whole first prompt goes into a fresh ``make_cache()``
    (one pass, or ``prefill_chunk`` tokens at a time) and gives the first answer token's logits, then the answer
    tokens but the last are decoded one at a time. A continuous companion of :func:`passkey_accuracy` (closer to
    full attention's value = the streaming heads changed less)."""
    if not samples:
        raise ValueError("no samples")
    total, count = 0.0, 0
    for s in samples:
        prompt_len, answer = s.questions[0]
        ids = s.input_ids[None, :prompt_len + len(answer)].to(model.device)
        cache = make_cache()
        logits = chunked_prefill(model, ids[:, :prompt_len], cache, prefill_chunk or prompt_len)[0]
        for i in range(prompt_len, prompt_len + len(answer)):
            total += logits.float().log_softmax(-1)[ids[0, i]].item()
            count += 1
            if i + 1 < prompt_len + len(answer):
                logits = model(ids[:, i:i + 1], use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]
    return total / count


def kv_bytes_full(config, n_tokens: int, batch: int = 1, bytes_per_elem: int = 2) -> int:
    """Bytes of a full KV cache of ``n_tokens`` tokens for a transformers decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * n_tokens * batch * bytes_per_elem
