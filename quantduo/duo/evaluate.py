"""Passkey-retrieval evaluation and KV-cache memory of full / DuoAttention / streaming models."""
from __future__ import annotations

from typing import Callable

import torch

from quantduo.duo.compat import cache_kwargs

from quantduo.duo.data import PasskeySample


@torch.no_grad()
def passkey_accuracy(model, samples: list[PasskeySample], make_cache: Callable[[], object] | None = None) -> float:
    """Fraction of questions answered exactly by greedy ``model.generate``.

    Each sample's first question is asked: the prompt is ``input_ids[:prompt_len]`` and the
    answer must match the passkey value tokens. ``make_cache()`` gives a fresh ``cache``
    per prompt (None: the model's default: a DuoCache after apply_duo, else a DynamicCache).
    """
    if not samples:
        raise ValueError("no samples")
    ok = 0
    for s in samples:
        prompt_len, answer = s.questions[0]
        ids = s.input_ids[None, :prompt_len].to(model.device)
        kw = cache_kwargs(model, make_cache()) if make_cache is not None else {}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(answer), do_sample=False,
                             min_new_tokens=len(answer), pad_token_id=0, **kw)
        ok += out[0, prompt_len:].tolist() == list(answer)
    return ok / len(samples)


def kv_bytes_full(config, n_tokens: int, batch: int = 1, bytes_per_elem: int = 2) -> int:
    """Bytes of a full KV cache of ``n_tokens`` tokens for a transformers decoder config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * n_tokens * batch * bytes_per_elem
