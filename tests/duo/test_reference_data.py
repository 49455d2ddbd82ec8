"""The reference's identification samples (mit-han-lab/duo-attention ``duo_attn/data.py``), restated here from its
rules with a character-level tokenizer (every text is visible in the ids), against make_reference_sample."""
import pytest
import torch

from quantduo.duo.data import (NATO_ALPHABET, ORDINALS, ReferencePasskeyTask, make_reference_sample,
                               reference_context_lengths)


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
    with pytest.raises(ValueError, match="haystack has 10 tokens, need at least 50"):
        make_reference_sample(list(range(10)), encode, None, 50, torch.Generator())
    with pytest.raises(ValueError, match="num_passkeys"):
        make_reference_sample(list(range(100)), encode, None, 50, torch.Generator(), ReferencePasskeyTask(num_passkeys=21))
