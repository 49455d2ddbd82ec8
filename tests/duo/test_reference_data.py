"""The reference's identification samples (mit-han-lab/duo-attention ``duo_attn/data.py``), restated here from its
rules with a character-level tokenizer (every text is visible in the ids), against make_reference_sample."""
import pytest
import torch

from quantduo.duo.data import (NATO_ALPHABET, ORDINALS, ReferencePasskeyTask, make_reference_sample,
                               reference_context_lengths, reference_haystack)


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def _expected(hay, bos, n, seed, task):
    """The reference's __getitem__ + _insert_needle + _construct_input, step by step."""
    g = torch.Generator().manual_seed(seed)
    depths = torch.linspace(task.min_depth, task.max_depth, task.depth_intervals)
    depths = depths[torch.randperm(task.depth_intervals, generator=g)[:task.num_passkeys]].sort().values
    keys = []
    for _ in range(task.num_passkeys):
        words = torch.randint(0, 26, (task.passkey_length,), generator=g)
        keys.append(encode(" ".join(NATO_ALPHABET[i] for i in words)))
    h = hay[:n]
    ctx, last = [], 0
    for i, (d, k) in enumerate(zip(depths, keys)):
        point = int(len(h) * d)
        needle = encode(f"Remeber this sequence of words, it's the {ORDINALS[i]} passkey to the vault: ") + k
        ctx += h[last:point] + encode("\n\n") + needle + encode("\n\n")
        last = point
    ctx += h[last:]
    qa = []
    for i, k in enumerate(keys):
        qa += encode(f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\nPasskey: ")
        qa += k + encode("\n\n")
    ctx = [bos] + encode("<|im_start|> This is a very long story book: <book> ") + ctx
    p2 = encode(" </book>.\n\n")
    pad = 16 - (len(ctx) + len(qa) + len(p2)) % 16
    ctx += hay[-pad:] + p2
    return ctx + qa, [False] * len(ctx) + [True] * len(qa), keys


@pytest.mark.parametrize("n, passkeys, seed", [(700, 10, 0), (301, 3, 5), (64, 1, 2)])
def test_reference_sample_is_the_reference_layout(n, passkeys, seed):
    hay = list(range(1000, 1000 + 900))
    task = ReferencePasskeyTask(num_passkeys=passkeys)
    s = make_reference_sample(hay, encode, 1, n, torch.Generator().manual_seed(seed), task)
    ids, target, keys = _expected(hay, 1, n, seed, task)
    assert s.input_ids.tolist() == ids and s.target_mask.tolist() == target
    assert len(ids) % 16 == 0
    # the questions in insertion order, each answered by its own passkey
    assert [a for _, a in s.questions] == keys
    for i, (prompt_len, answer) in enumerate(s.questions):
        question = encode(f"what is the {ORDINALS[i]} passkey to the vault?\nPasskey: ")
        assert ids[prompt_len - len(question):prompt_len] == question
        assert ids[prompt_len:prompt_len + len(answer)] == answer


def test_reference_context_lengths_and_errors():
    assert reference_context_lengths(1000, 2000) == torch.linspace(1000, 2000, 20, dtype=torch.int).tolist()
    assert reference_context_lengths(100, 100)[::7] == [100, 100, 100]
    with pytest.raises(ValueError, match="haystack has 10 tokens, need at least 16"):
        make_reference_sample(list(range(10)), encode, None, 50, torch.Generator())
    with pytest.raises(ValueError, match="num_passkeys"):
        make_reference_sample(list(range(100)), encode, None, 50, torch.Generator(), ReferencePasskeyTask(num_passkeys=21))


def _constructor_cut(seed, passkeys, max_len, bos=True):
    """The reference constructor's haystack length bound: ``max - 300 - other_input_len``, other_input_len from
    prompt1 (with BOS), prompt2 and, per passkey, two separators, the first needle, the first question and the
    passkey drawn in the constructor (twice: in the needle and in the answer)."""
    g = torch.Generator().manual_seed(seed)
    key = encode(" ".join(NATO_ALPHABET[i] for i in torch.randint(0, 26, (32,), generator=g)))
    prompt1 = [1] * bos + encode("<|im_start|> This is a very long story book: <book> ")
    needle = encode("Remeber this sequence of words, it's the first passkey to the vault: ") + key
    question = encode("Based on the content of the book, what is the first passkey to the vault?\nPasskey: ")
    other = len(prompt1) + len(encode(" </book>.\n\n")) + (2 * 2 + len(needle) + len(question) + len(key)) * passkeys
    return max_len - 300 - other, g


@pytest.mark.parametrize("passkeys, max_len, bos", [(1, 3000, True), (2, 1400, False), (3, 90000, True)])
def test_reference_haystack_is_the_constructors(passkeys, max_len, bos):
    """The constructor keeps the first max tokens, then cuts them to leave room for a sample's other tokens (a
    slice, so a negative bound drops tokens from the end); its passkey draw comes before the samples' draws."""
    hay = list(range(1000, 1000 + 5000))
    task = ReferencePasskeyTask(num_passkeys=passkeys)
    gen = torch.Generator().manual_seed(7)
    got = reference_haystack(hay, encode, 1 if bos else None, max_len, gen, task)
    cut, expected_gen = _constructor_cut(7, passkeys, max_len, bos)
    kept = hay[:max_len]
    assert got == (kept[:cut] if len(kept) + (max_len - 300 - cut) > max_len - 300 else kept)
    assert torch.equal(gen.get_state(), expected_gen.get_state())  # the constructor's draw, and only it


def test_reference_sample_from_a_short_haystack_takes_all_of_it():
    """A sample longer than the (cut) haystack holds the whole haystack, as the reference's slice does; its
    padding comes from the haystack's end."""
    hay = list(range(1000, 1000 + 500))
    task = ReferencePasskeyTask(num_passkeys=2)
    s = make_reference_sample(hay, encode, 1, 700, torch.Generator().manual_seed(4), task)
    ids, target, _ = _expected(hay, 1, 700, 4, task)
    assert s.input_ids.tolist() == ids and s.target_mask.tolist() == target
    assert int(((s.input_ids >= 1000) & (s.input_ids < 1500)).sum()) >= 500
