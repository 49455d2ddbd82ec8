"""Left-padded batches: every head full == plain transformers (non-pad positions, generate), and at 50% streaming
heads the padded run == each row's unpadded run (one-shot, chunked prefill, decode, static decode, generate)."""
import copy

import numpy as np
import pytest
import torch

from quantduo.duo import attention as A
from quantduo.duo.cache import DuoCache
from quantduo.duo.decode import GraphedDecoder
from quantduo.duo.deploy import apply_duo, chunked_prefill
from quantduo.kernels.decode_attention import decode_attention
from quantduo.duo.layout import duo_layers
from quantduo.duo.compat import cache_kwargs
from tests.duo.test_deploy import RECENT, SINK, tiny_model
from tests.duo.test_families import family_model, without_window

pytestmark = pytest.mark.usefixtures("single_thread")

PADS = [0, 5, 17]  # row 2's padding outlasts the first prefill chunk
T = 44
HALF = np.array([[True, False, False, True], [False, True, False, False], [False, False, True, True]])


def padded_batch(seed: int = 0):
    """ids [3, T], mask [3, T] (left padding PADS; pad id 0), real positions [3, T]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (len(PADS), T), generator=g)
    mask = torch.ones_like(ids)
    for b, p in enumerate(PADS):
        ids[b, :p], mask[b, :p] = 0, 0
    return ids, mask, (mask.cumsum(1) - 1).clamp_min(0)


def run_chunks(model, ids, chunks, mask=None, pos=None, cache=None):
    """Logits [B, T, V] of ids fed as consecutive chunks of the given sizes into a DuoCache."""
    cache = cache if cache is not None else DuoCache.from_model(model)
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            kw = {} if mask is None else {"attention_mask": mask[:, :start + n], "position_ids": pos[:, start:start + n]}
            outs.append(model(ids[:, start:start + n], **cache_kwargs(model, cache), **kw).logits)
            start += n
    return torch.cat(outs, 1)


def row_chunks(chunks, pad):
    """Chunk sizes of a row's unpadded run: the padded chunks less the row's padding (empty ones dropped)."""
    ends = np.cumsum(chunks)
    cuts = sorted({max(0, int(e) - pad) for e in ends} - {0})
    return list(np.diff([0] + cuts))


@pytest.fixture(scope="module")
def half_model():
    return apply_duo(tiny_model("llama", seed=21), HALF, SINK, RECENT)


@pytest.mark.parametrize("chunks", [[T], [12, 9, 14] + [1] * 9], ids=["one-shot", "chunked+decode"])
def test_padded_rows_equal_their_unpadded_runs_at_half_streaming(half_model, chunks):
    ids, mask, pos = padded_batch()
    padded = run_chunks(half_model, ids, chunks, mask, pos)
    for b, p in enumerate(PADS):
        alone = run_chunks(half_model, ids[b:b + 1, p:], row_chunks(chunks, p))
        torch.testing.assert_close(padded[b:b + 1, p:], alone, atol=2e-5, rtol=1e-5)
    if len(chunks) == 1:
        return  # a one-shot prefill is dense for every head (reference rule)
    # the streaming heads matter: every head full differs
    full = run_chunks(apply_duo(tiny_model("llama", seed=21), np.ones((3, 4), bool), SINK, RECENT), ids, chunks,
                      mask, pos)
    assert (full[:, -1] - padded[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("chunks", [[T], [12, 9, 14] + [1] * 9], ids=["one-shot", "chunked+decode"])
def test_padded_rows_equal_their_unpadded_runs_with_the_per_token_window(chunks):
    """The per-token window option counts sinks and windows per row, from each row's first real token."""
    model = apply_duo(tiny_model("llama", seed=21), HALF, SINK, RECENT, window="token")
    ids, mask, pos = padded_batch()
    padded = run_chunks(model, ids, chunks, mask, pos)
    for b, p in enumerate(PADS):
        alone = run_chunks(model, ids[b:b + 1, p:], row_chunks(chunks, p))
        torch.testing.assert_close(padded[b:b + 1, p:], alone, atol=2e-5, rtol=1e-5)


def static_padded_steps(model, ids, mask, prompt: int, steps: int) -> torch.Tensor:
    """Logits [B, steps, V] of static decode steps after a padded prefill of ``prompt`` tokens (RoPE: slots)."""
    cache = DuoCache.from_model(model, max_cache_len=T, static=True)
    with torch.no_grad():
        model(ids[:, :prompt], attention_mask=mask[:, :prompt], **cache_kwargs(model, cache))
    dec = GraphedDecoder(model, cache, prompt, use_graph=False)
    return torch.stack([dec(ids[:, i:i + 1]).clone() for i in range(prompt, prompt + steps)], 1)


def test_padded_static_decode_equals_unpadded_rows(half_model):
    """Static (graph-capturable) decode steps with per-row ring slots and key positions."""
    ids, mask, _ = padded_batch(1)
    prompt = 30
    steps = static_padded_steps(half_model, ids, mask, prompt, T - prompt)
    for b, p in enumerate(PADS):
        alone = DuoCache.from_model(half_model, max_cache_len=T, static=True)
        with torch.no_grad():
            half_model(ids[b:b + 1, p:prompt], **cache_kwargs(half_model, alone),
                       position_ids=torch.arange(p, prompt)[None])  # the padded run's RoPE positions are slots
        dec1 = GraphedDecoder(half_model, alone, prompt - p, use_graph=False)
        dec1.pos.fill_(prompt)
        want = torch.stack([dec1(ids[b:b + 1, i:i + 1]).clone() for i in range(prompt, T)], 1)
        torch.testing.assert_close(steps[b:b + 1], want, atol=2e-5, rtol=1e-5)


def test_padded_static_decode_through_the_kernel(half_model, monkeypatch):
    """The same steps through the Triton decode kernel (interpreter, float32; key_pos [B, T]) as through the
    PyTorch reference."""
    ids, mask, _ = padded_batch(1)
    want = static_padded_steps(half_model, ids, mask, 30, 3)
    monkeypatch.setattr(A, "decode", lambda q, k, v, s, length=None, key_pos=None:
                        decode_attention(q, k, v, s, length, key_pos))
    torch.testing.assert_close(static_padded_steps(half_model, ids, mask, 30, 3), want, atol=1e-5, rtol=1e-5)


def test_padded_generate_equals_unpadded_rows(half_model):
    ids, mask, _ = padded_batch(2)
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    out = half_model.generate(ids, attention_mask=mask, **kw)
    for b, p in enumerate(PADS):
        alone = half_model.generate(ids[b:b + 1, p:], attention_mask=mask[b:b + 1, p:], **kw)
        assert out[b, T:].tolist() == alone[0, T - p:].tolist()


def test_chunked_prefill_helper_with_padding(half_model):
    ids, mask, pos = padded_batch(3)
    last = chunked_prefill(half_model, ids, DuoCache.from_model(half_model), 10, attention_mask=mask)
    for b, p in enumerate(PADS):
        alone = chunked_prefill(half_model, ids[b:b + 1, p:], DuoCache.from_model(half_model), 10)
        if p % 10 == 0:  # same chunk boundaries in real positions only then
            torch.testing.assert_close(last[b:b + 1], alone, atol=2e-5, rtol=1e-5)
    want = run_chunks(half_model, ids, [10] * 4 + [4], mask, pos)[:, -1]
    torch.testing.assert_close(last, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "mistral-window", "gemma2"])
def test_all_full_padded_equals_plain_transformers(arch):
    """Left padding with every head full, also past a sliding window of 16 (Mistral: ignored, as the reference, or
    applied with respect_sliding_window) and with soft-capping and sliding layers (Gemma 2)."""
    model = tiny_model(arch, seed=22) if arch in ("llama", "qwen2") else family_model(arch.split("-")[0], seed=22)
    layers = len(duo_layers(model.config))
    respect = arch == "mistral-window"
    duo = apply_duo(copy.deepcopy(model), np.ones((layers, 4), bool), SINK, RECENT, respect_sliding_window=respect)
    model = without_window(model) if arch == "mistral" else model
    ids, mask, pos = padded_batch(4)
    with torch.no_grad():
        want = model(ids, attention_mask=mask, position_ids=pos).logits
        got = run_chunks(duo, ids, [20, 10] + [1] * 14, mask, pos)
        got_nocache = duo(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got_nocache[real], want[real], atol=2e-5, rtol=1e-5)
    kw = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    for extra in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        assert duo.generate(ids, **kw, **extra).tolist() == model.generate(ids, **kw, **extra).tolist(), extra


def test_four_d_causal_padding_mask_is_honoured(half_model):
    """A 4-D boolean or additive mask equal to causal + left padding gives the 2-D mask's logits."""
    ids, mask, pos = padded_batch(5)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    four = causal[None, None] & mask.bool()[:, None, None, :]
    additive = torch.zeros(four.shape).masked_fill(~four, torch.finfo(torch.float32).min)
    with torch.no_grad():
        want = half_model(ids, attention_mask=mask, position_ids=pos).logits
        for m in (four, additive):
            got = half_model(ids, attention_mask=m, position_ids=pos).logits
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-6, rtol=1e-6)
            got = half_model(ids, attention_mask=m, position_ids=pos, cache=DuoCache.from_model(half_model)).logits
            torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-5)
        holed = four.clone()
        holed[:, :, -1, -3] = False
        for bad in (four.transpose(-1, -2), holed):
            with pytest.raises(ValueError, match="4-D"):
                half_model(ids, attention_mask=bad, position_ids=pos)


def test_padding_cannot_change_under_a_cache(half_model):
    ids, mask, pos = padded_batch(6)
    cache = DuoCache.from_model(half_model)
    with torch.no_grad():
        half_model(ids[:, :20], attention_mask=mask[:, :20], **cache_kwargs(half_model, cache))
        bad = mask[:, :21].clone()
        bad[1, :6] = 0  # row 1 already had real tokens
        with pytest.raises(ValueError, match="left padding"):
            half_model(ids[:, 20:21], attention_mask=bad, **cache_kwargs(half_model, cache))
