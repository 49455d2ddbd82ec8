"""Tiny Llama-architecture LM for the DuoAttention demo: config, word-level tokenizer, synthetic text.

The synthetic text is a first-order Markov chain over filler words (predicting the next word
needs only the previous token: a *local* skill) with passkey sentences inserted far from the
questions that ask for them (answering needs *retrieval* over the whole context).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_lm"
# the second, smaller model beside it (seed 1, hidden 64, 96-192-token contexts; its own TRAINING.md)
SEED1 = "tiny_lm_seed1"
SEED1_CONTEXT = 192
N_FILLER = 64
_SPECIALS = ("<pad>", "<bos>")
# the words of quantduo.duo.data.PasskeyFormat's default templates (digits, key names, template words)
PASSKEY_WORDS: tuple[str, ...] = tuple("0123456789") + tuple("ABCDEFGHIJKLMNOP") + ("pass", "key", "is", ".")
VOCAB: tuple[str, ...] = _SPECIALS + PASSKEY_WORDS + tuple(f"w{i}" for i in range(N_FILLER))
_INDEX = {w: i for i, w in enumerate(VOCAB)}
BOS_ID = _INDEX["<bos>"]

# Sizes used for training and the demo. sink + recent = 36 tokens, far below the context.
SINK, RECENT = 4, 32
TRAIN_CONTEXT = (192, 512)
EVAL_CONTEXT = 512


def encode(text: str) -> list[int]:
    """Whitespace-split word-level tokenizer; raises KeyError naming any unknown word."""
    try:
        return [_INDEX[w] for w in text.split()]
    except KeyError as err:
        raise KeyError(f"word {err.args[0]!r} is not in the tiny LM vocabulary") from None


def decode(ids) -> str:
    """Inverse of :func:`encode` for a sequence of int ids."""
    return " ".join(VOCAB[int(i)] for i in ids)


def llama_config(**overrides):
    """transformers LlamaConfig of the tiny LM (GQA: 8 query heads share 4 KV heads)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(VOCAB), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=1024,
              rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=BOS_ID, pad_token_id=0,
              eos_token_id=None)
    kw.update(overrides)
    return LlamaConfig(**kw)


def markov_tables(seed: int = 1234) -> np.ndarray:
    """[N_FILLER, 2] int successor table: word w is followed by table[w, 0] (p=0.8) or table[w, 1]."""
    return np.random.default_rng(seed).integers(0, N_FILLER, size=(N_FILLER, 2))


def haystack_text(n_words: int, seed: int) -> str:
    """Filler text of ``n_words`` words drawn from the fixed Markov chain."""
    rng = np.random.default_rng(seed)
    table = markov_tables()
    w = int(rng.integers(N_FILLER))
    out = []
    for coin in rng.random(n_words):
        out.append(f"w{w}")
        w = int(table[w, 0 if coin < 0.8 else 1])
    return " ".join(out)


def load(device: str = "cpu", dtype=None, name: str = ASSET_DIR.name):
    """A shipped tiny LM (``quantduo/assets/<name>``: the demo's ``tiny_lm`` or :data:`SEED1`) as a
    LlamaForCausalLM in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    path = ASSET_DIR.parent / name
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"tiny LM weights missing in {path}; run scripts/train_tiny_lm.py")
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa")
    return model.to(device).eval()


def haystack_ids(seed: int = 0, n_words: int = 50_000) -> list[int]:
    """Token ids of a Markov haystack (deterministic for a given seed)."""
    return encode(haystack_text(n_words, seed))

