"""Passkey-retrieval evaluation and KV-cache memory of full / DuoAttention / streaming models."""
from __future__ import annotations

from typing import Callable

import torch

from quantduo.duo.compat import cache_kwargs
from quantduo.duo.data import PasskeySample
from quantduo.duo.deploy import chunked_prefill


@torch.no_grad()
def passkey_accuracy(model, samples: list[PasskeySample], make_cache: Callable[[], object] | None = None,
                     prefill_chunk: int | None = None) -> float:
    """Fraction of questions answered exactly by greedy ``model.generate``.

    Each sample's first question is asked: the prompt is ``input_ids[:prompt_len]`` and the
    answer must match the passkey value tokens. ``make_cache()`` gives a fresh ``cache``
    per prompt (None: the model's default: a DuoCache after apply_duo, else a DynamicCache). ``prefill_chunk``:
    the prompt but its last token goes into that cache ``prefill_chunk`` tokens at a time first (as long-context
    deployments prefill; needs ``make_cache``), then ``generate`` goes on from the cache.
    """
    if not samples:
        raise ValueError("no samples")
    if prefill_chunk is not None and make_cache is None:
        raise ValueError("a chunked prefill needs make_cache")
    ok = 0
    for s in samples:
        prompt_len, answer = s.questions[0]
        ids = s.input_ids[None, :prompt_len].to(model.device)
        cache = make_cache() if make_cache is not None else None
        if prefill_chunk is not None:
            chunked_prefill(model, ids[:, :-1], cache, prefill_chunk)
        kw = cache_kwargs(model, cache) if cache is not None else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer), do_sample=False,
                             min_new_tokens=len(answer), pad_token_id=0, **kw)
        ok += out[0, prompt_len:].tolist() == list(answer)
    return ok / len(samples)


@torch.no_grad()
def answer_logprob(model, samples: list[PasskeySample], make_cache: Callable[[], object],
                   prefill_chunk: int | None = None) -> float:
    """Mean log-probability (nats, float) of the passkey answer tokens under teacher forcing: each sample's first
    prompt but its last token goes into a fresh ``make_cache()`` (one pass, or ``prefill_chunk`` tokens at a time),
    then the last prompt token and the answer tokens are decoded one at a time. A continuous companion of
    :func:`passkey_accuracy` (closer to full attention's value = the streaming heads changed less)."""
    if not samples:
        raise ValueError("no samples")
    total, count = 0.0, 0
    for s in samples:
        prompt_len, answer = s.questions[0]
        ids = s.input_ids[None, :prompt_len + len(answer)].to(model.device)
        cache = make_cache()
        context = ids[:, :prompt_len - 1]
        chunked_prefill(model, context, cache, prefill_chunk or context.shape[1])
        for i in range(prompt_len - 1, prompt_len - 1 + len(answer)):
            logits = model(ids[:, i:i + 1], use_cache=True, **cache_kwargs(model, cache)).logits[0, -1]
            total += logits.float().log_softmax(-1)[ids[0, i + 1]].item()
            count += 1
    return total / count


def kv_bytes_full(config, n_tokens: int, batch: int = 1, bytes_per_elem: int = 2) -> int:
    """Bytes of a full KV cache of ``n_tokens`` tokens for a transformers decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * n_tokens * batch * bytes_per_elem
