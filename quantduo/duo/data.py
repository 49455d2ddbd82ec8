"""Synthetic multi-passkey retrieval data over a haystack text (DuoAttention identification data).

A sample is a window of haystack tokens with ``n_passkeys`` passkey sentences inserted at sorted
depths, followed by one question (plus its answer) per passkey, in a random order. Only token ids
are handled here, so any tokenizer works: the caller passes ``encode(text) -> list[int]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class PasskeyFormat:
    """Templates of the passkey task; ``{name}`` / ``{value}`` are filled in.

    The defaults suit any word-level or BPE tokenizer: the question repeats the start of the
    inserted sentence, so answering it needs retrieval of a far-away token span.
    """

    insert: str = "pass key {name} is {value} ."
    question: str = "pass key {name} is"
    answer: str = "{value} ."
    names: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOP")
    value_words: tuple[str, ...] = tuple("0123456789")
    value_len: int = 4


@dataclass
class PasskeySample:
    """One sample.

    input_ids: [T] int64 tokens (haystack with passkeys, then questions and answers).
    target_mask: [T] bool, True on every token of the question / answer section (the reference's
        supervision: its labels cover the whole section after the haystack).
    questions: list of (prompt_len, answer_ids): ``input_ids[:prompt_len]`` ends with a
        question and ``answer_ids`` (int list) are the passkey value tokens that follow it.
    """

    input_ids: torch.Tensor
    target_mask: torch.Tensor
    questions: list[tuple[int, list[int]]]

    def answer_mask(self) -> torch.Tensor:
        """[T] bool, True at the positions whose *next* token is an answer token."""
        mask = torch.zeros_like(self.target_mask)
        for prompt_len, answer in self.questions:
            mask[prompt_len - 1:prompt_len - 1 + len(answer)] = True
        return mask


def read_haystack(path: str | Path, encode: Encode) -> list[int]:
    """Encode a haystack text file; raises ValueError when the file holds no text."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"haystack file {path} is empty")
    return encode(" ".join(text.split()))


def make_sample(
    haystack_ids: Sequence[int],
    encode: Encode,
    context_len: int,
    n_passkeys: int,
    rng: np.random.Generator,
    fmt: PasskeyFormat = PasskeyFormat(),
    depth_range: tuple[float, float] = (0.05, 0.95),
    min_distance: int = 0,
) -> PasskeySample:
    """Build one multi-passkey sample of exactly ``context_len`` tokens.

    The passkeys are inserted at sorted depths in ``depth_range`` of the haystack part, and
    every passkey sentence ends at least ``min_distance`` tokens before the first question
    (use ``min_distance > sink + recent`` so streaming attention cannot see any passkey).
    """
    if not 1 <= n_passkeys <= len(fmt.names):
        raise ValueError(f"n_passkeys must be in [1, {len(fmt.names)}], got {n_passkeys}")
    names = rng.choice(len(fmt.names), size=n_passkeys, replace=False)
    values = [" ".join(rng.choice(fmt.value_words, size=fmt.value_len)) for _ in names]
    inserts = [encode(fmt.insert.format(name=fmt.names[n], value=v)) for n, v in zip(names, values)]
    order = rng.permutation(n_passkeys)
    qa = [(encode(fmt.question.format(name=fmt.names[names[i]])), encode(fmt.answer.format(value=values[i])))
          for i in order]
    n_hay = context_len - sum(map(len, inserts)) - sum(len(q) + len(a) for q, a in qa)
    if n_hay <= 0:
        raise ValueError(f"context_len {context_len} too short for {n_passkeys} passkeys")
    if len(haystack_ids) < n_hay:
        raise ValueError(f"haystack has {len(haystack_ids)} tokens, need at least {n_hay}")
    start = int(rng.integers(0, len(haystack_ids) - n_hay + 1))
    hay = list(haystack_ids[start:start + n_hay])
    lo = int(depth_range[0] * n_hay)
    hi = min(int(depth_range[1] * n_hay), n_hay - min_distance)
    if hi < lo:
        raise ValueError("context too short for the requested depth range and min_distance")
    cuts = np.sort(rng.integers(lo, hi + 1, size=n_passkeys))
    ids: list[int] = []
    prev = 0
    for cut, ins in zip(cuts, inserts):
        ids += hay[prev:cut] + ins
        prev = cut
    ids += hay[prev:]
    target = [False] * len(ids)
    questions = []
    for q, a in qa:
        ids += q
        questions.append((len(ids), encode(values[order[len(questions)]])))
        target += [True] * (len(q) + len(a))
        ids += a
    return PasskeySample(torch.tensor(ids), torch.tensor(target), questions)


def make_bos_sample(haystack_ids: Sequence[int], encode: Encode, bos_id: int, context_len: int, n_passkeys: int,
                    rng: np.random.Generator, fmt: PasskeyFormat = PasskeyFormat(),
                    min_distance: int = 0) -> PasskeySample:
    """:func:`make_sample` of ``context_len`` tokens whose first token is ``bos_id``."""
    s = make_sample(haystack_ids, encode, context_len - 1, n_passkeys, rng, fmt, min_distance=min_distance)
    ids = torch.cat([torch.tensor([bos_id]), s.input_ids])
    target = torch.cat([torch.tensor([False]), s.target_mask])
    return PasskeySample(ids, target, [(p + 1, a) for p, a in s.questions])


NATO_ALPHABET = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
                 "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor",
                 "whiskey", "xray", "yankee", "zulu")
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
            "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
            "twentieth")


@dataclass(frozen=True)
class ReferencePasskeyTask:
    """The reference's multiple-passkey retrieval samples (mit-han-lab/duo-attention ``duo_attn/data.py``,
    ``MultiplePasskeyRetrievalDataset``), its defaults and texts verbatim (the needle's "Remeber" included).

    A sample of ``context_length`` haystack tokens: ``num_passkeys`` needles (``needle`` + a passkey of
    ``passkey_length`` words of :data:`NATO_ALPHABET`, each wrapped in ``separator``) inserted at sorted depth ratios
    drawn without replacement from ``depth_intervals`` evenly spaced values in [min_depth, max_depth]; then
    ``prompt1`` (after the BOS token) in front, padding from the haystack's end, ``prompt2``, and one
    ``question`` + passkey + ``separator`` per needle, *in insertion order*; the supervised tokens are that
    question / answer section. Context lengths run over ``context_intervals`` evenly spaced values
    (:func:`reference_context_lengths`).
    """

    passkey_length: int = 32
    num_passkeys: int = 10
    needle: str = "Remeber this sequence of words, it's the {ordinal_number} passkey to the vault: "
    question: str = ("Based on the content of the book, what is the {ordinal_number} passkey to the vault?\n"
                     "Passkey: ")
    prompt1: str = "<|im_start|> This is a very long story book: <book> "
    prompt2: str = " </book>.\n\n"
    separator: str = "\n\n"
    min_depth: float = 0.1
    max_depth: float = 0.9
    depth_intervals: int = 20
    context_intervals: int = 20
    pad_to_multiple_of: int = 16


def reference_context_lengths(context_min: int, context_max: int, task: ReferencePasskeyTask = ReferencePasskeyTask()
                              ) -> list[int]:
    """The reference's haystack lengths per sample: ``torch.linspace(min, max, intervals, dtype=torch.int)``."""
    return torch.linspace(context_min, context_max, task.context_intervals, dtype=torch.int).tolist()


def _check_passkeys(task: ReferencePasskeyTask) -> None:
    if not 1 <= task.num_passkeys <= min(len(ORDINALS), task.depth_intervals):
        raise ValueError(f"num_passkeys must be in [1, {min(len(ORDINALS), task.depth_intervals)}], "
                         f"got {task.num_passkeys}")


def _reference_passkey(encode: Encode, generator: torch.Generator, task: ReferencePasskeyTask) -> list[int]:
    """One passkey's tokens: ``passkey_length`` words of :data:`NATO_ALPHABET` drawn from ``generator``."""
    words = torch.randint(0, len(NATO_ALPHABET), (task.passkey_length,), generator=generator).tolist()
    return encode(" ".join(NATO_ALPHABET[i] for i in words))


def reference_haystack(haystack_ids: Sequence[int], encode: Encode, bos_id: int | None, context_length_max: int,
                       generator: torch.Generator, task: ReferencePasskeyTask = ReferencePasskeyTask(),
                       buffer_size: int = 300) -> list[int]:
    """The haystack as the reference's dataset holds it after its constructor: the first ``context_length_max``
    tokens of ``haystack_ids`` (it trims its haystack text to that many tokens), then, where they and the other
    tokens of a sample would pass ``context_length_max - buffer_size``, only the first
    ``context_length_max - buffer_size - other`` of them (the reference's slice expression, a negative bound
    included), with ``other`` = prompt1 (after the BOS token) + prompt2 + ``num_passkeys`` x (two separators, the
    first needle, the first question and two passkeys). The passkey is drawn from ``generator``, as the reference
    draws one in its constructor before any sample. Samples then take their haystack from this list
    (:func:`make_reference_sample`), so the longest ones hold fewer haystack tokens than their nominal length."""
    _check_passkeys(task)
    hay = list(haystack_ids[:context_length_max])
    passkey, sep = _reference_passkey(encode, generator, task), encode(task.separator)
    first_needle = encode(task.needle.format(ordinal_number=ORDINALS[0]))
    first_question = encode(task.question.format(ordinal_number=ORDINALS[0]))
    other = (int(bos_id is not None) + len(encode(task.prompt1)) + len(encode(task.prompt2))
             + (2 * len(sep) + len(first_needle) + len(first_question) + 2 * len(passkey)) * task.num_passkeys)
    if len(hay) + other > context_length_max - buffer_size:
        hay = hay[:context_length_max - buffer_size - other]
    return hay


def make_reference_sample(haystack_ids: Sequence[int], encode: Encode, bos_id: int | None, context_length: int,
                          generator: torch.Generator, task: ReferencePasskeyTask = ReferencePasskeyTask()
                          ) -> PasskeySample:
    """One sample of :class:`ReferencePasskeyTask` with the first ``context_length`` tokens of ``haystack_ids`` (all
    of them where it is shorter, as the reference's slice; pass :func:`reference_haystack`'s list to have the
    reference's), random draws from ``generator`` in the reference's order (the depth permutation, then each
    passkey's words). The padding follows the reference's expression, which always pads: ``16 - total % 16`` tokens
    (1 to 16) from the end of ``haystack_ids``, so the sample length is a multiple of ``pad_to_multiple_of``.
    ValueError for a haystack shorter than the padding."""
    _check_passkeys(task)
    if len(haystack_ids) < task.pad_to_multiple_of:
        raise ValueError(f"haystack has {len(haystack_ids)} tokens, need at least {task.pad_to_multiple_of} (the "
                         "padding comes from its end)")
    depths = torch.linspace(task.min_depth, task.max_depth, task.depth_intervals)
    depths = depths[torch.randperm(task.depth_intervals, generator=generator)[:task.num_passkeys]].sort().values
    passkeys = [_reference_passkey(encode, generator, task) for _ in range(task.num_passkeys)]
    sep = encode(task.separator)
    hay = list(haystack_ids[:context_length])
    context, last = [], 0
    for i, (depth, key) in enumerate(zip(depths, passkeys)):
        cut = int(len(hay) * depth)  # float32 product, as the reference's tensor arithmetic
        context += hay[last:cut] + sep + encode(task.needle.format(ordinal_number=ORDINALS[i])) + key + sep
        last = cut
    context += hay[last:]
    questions = [encode(task.question.format(ordinal_number=ORDINALS[i])) for i in range(task.num_passkeys)]
    context = ([] if bos_id is None else [bos_id]) + encode(task.prompt1) + context
    prompt2 = encode(task.prompt2)
    qa_len = sum(len(q) + len(k) + len(sep) for q, k in zip(questions, passkeys))
    pad = task.pad_to_multiple_of - (len(context) + qa_len + len(prompt2)) % task.pad_to_multiple_of
    ids = context + list(haystack_ids[len(haystack_ids) - pad:]) + prompt2
    target, asked = [False] * len(ids), []
    for q, key in zip(questions, passkeys):
        ids += q
        asked.append((len(ids), key))
        ids += key + sep
        target += [True] * (len(q) + len(key) + len(sep))
    return PasskeySample(torch.tensor(ids), torch.tensor(target), asked)
