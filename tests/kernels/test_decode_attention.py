"""Split-KV decode attention and the KV-cache write kernels (Triton; the CPU interpreter here) vs their
PyTorch references.

16-bit, INT8 and INT4 caches, GQA group sizes 1 / 3 / 4, device-side length masks, ring-buffer slot
positions, several splits (some wholly past the length). Partial buffers are poisoned before each call.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantduo.duo import attention as A
from quantduo.duo.cache import DuoCache
from quantduo.duo.deploy import apply_duo
from quantduo.formats.kv import quantize_unchecked
from quantduo.kernels import decode_attention as dk
from quantduo.kernels.cache_write import kv_quant_write, ring_write
from quantduo.formats.reference import decode_attention_ref
from tests.duo.test_decode import MASK, PROMPT, static_decode_logits
from tests.duo.test_deploy import RECENT, SINK, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", poisoned)


def make_cache(b, hkv, t, d, bits, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    if bits == 16:
        return k, v
    return quantize_unchecked(k, bits, group), quantize_unchecked(v, bits, group)


def query(b, hq, d, dtype, seed=1):
    # [B, 1, Hq, D] transposed, as the attention modules hand it over (not contiguous)
    return torch.randn(b, 1, hq, d, generator=torch.Generator().manual_seed(seed)).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("bits,group", [(16, 1), (8, 16), (8, 32), (4, 8), (4, 32)])
@pytest.mark.parametrize("mask", ["none", "length", "slots+length", "slots"])
def test_decode_attention_matches_reference(bits, group, mask):
    b, hkv, rep, t, d = 1, 2, 4, 300, 32
    k, v = make_cache(b, hkv, t, d, bits, group, torch.float32)
    q = query(b, hkv * rep, d, torch.float32)
    length = torch.tensor([137]) if "length" in mask else None
    key_pos = torch.randint(-1, 250, (t,), generator=torch.Generator().manual_seed(2)) if "slots" in mask else None
    out = dk.decode_attention(q, k, v, 0.3, length, key_pos)
    expect = decode_attention_ref(q, k, v, 0.3, length, key_pos)
    assert out.shape == (b, hkv * rep, 1, d) and torch.isfinite(out).all()
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=1e-4)
    if length is not None and key_pos is None:  # keys past the length must not matter
        k2, v2 = make_cache(b, hkv, t, d, bits, group, torch.float32, seed=5)
        if bits == 16:
            k2[:, :, :137], v2[:, :, :137] = k[:, :, :137], v[:, :, :137]
        else:
            for new, old in ((k2, k), (v2, v)):
                for name in ("codes", "scale", "zero"):
                    getattr(new, name)[:, :, :137] = getattr(old, name)[:, :, :137]
        torch.testing.assert_close(dk.decode_attention(q, k2, v2, 0.3, length, key_pos), out, atol=0, rtol=0)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), hkv=st.integers(1, 3), rep=st.sampled_from([1, 3, 4]), t=st.integers(1, 200),
       bits=st.sampled_from([16, 8, 4]), group=st.sampled_from([8, 16]))
def test_decode_attention_shapes_fp16(b, hkv, rep, t, bits, group):
    d = 16
    k, v = make_cache(b, hkv, t, d, bits, group, torch.float16)
    q = query(b, hkv * rep, d, torch.float16)
    length = torch.tensor([max(1, t // 2)])
    out = dk.decode_attention(q, k, v, d ** -0.5, length)
    expect = decode_attention_ref(q.float(), *(x.float() if torch.is_tensor(x) else x for x in (k, v)),
                                  d ** -0.5, length)
    torch.testing.assert_close(out.float(), expect, atol=3e-3, rtol=3e-3)


def test_decode_attention_rejects_bad_inputs():
    q = query(1, 4, 16, torch.float32)
    k, v = make_cache(1, 2, 10, 16, 16, 1, torch.float32)
    with pytest.raises(ValueError, match="Hkv"):
        dk.decode_attention(query(1, 3, 16, torch.float32), k, v, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        dk.decode_attention(query(1, 4, 12, torch.float32), k[..., :12], v[..., :12], 1.0)
    with pytest.raises(ValueError, match="share layout"):
        dk.decode_attention(q, k, v[:, :, :5], 1.0)
    with pytest.raises(ValueError, match="key_pos"):
        dk.decode_attention(q, k, v, 1.0, torch.tensor([3]), torch.arange(9))
    kq, vq = make_cache(1, 2, 10, 16, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="share layout"):
        dk.decode_attention(q, kq, v, 1.0)
    kq.scale = kq.scale[..., :1]
    with pytest.raises(ValueError, match="bad quantized cache"):
        dk.decode_attention(q, kq, vq, 1.0)


@pytest.mark.parametrize("bits,group", [(None, 4), (4, 4), (8, 8)])
def test_static_duo_decode_through_the_kernel(monkeypatch, bits, group):
    """A Duo model decoding with the Triton kernel gives the reference path's logits."""
    model = apply_duo(copy.deepcopy(tiny_model("llama", seed=11)), MASK, SINK, RECENT)
    ids = torch.randint(0, 64, (1, PROMPT + 6), generator=torch.Generator().manual_seed(3))
    logits = []
    for fn in (decode_attention_ref, dk.decode_attention):
        monkeypatch.setattr(A, "decode_attention_ref", fn)
        cache = DuoCache.from_model(model, max_cache_len=64, static=True, kv_bits=bits, kv_group=group)
        logits.append(static_decode_logits(model, cache, ids))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group", [(16, 1), (8, 128), (4, 128), (4, 64)])
def test_gpu_decode_attention_llama_shapes(bits, group):
    b, hkv, rep, t, d = 1, 8, 4, 20_000, 128
    k, v = make_cache(b, hkv, t, d, bits, group, torch.bfloat16)
    k, v = (x.cuda() if torch.is_tensor(x) else type(x)(x.codes.cuda(), x.scale.cuda(), x.zero.cuda(), x.bits,
                                                        x.group) for x in (k, v))
    q = query(b, hkv * rep, d, torch.bfloat16).cuda()
    length = torch.tensor([15_000], device="cuda")
    out = dk.decode_attention(q, k, v, d ** -0.5, length)
    expect = decode_attention_ref(q, k, v, d ** -0.5, length)
    err = ((out.float() - expect.float()).norm() / expect.float().norm()).item()
    assert err < 1e-2, err


def empty_store(b, h, cap, d, bits, group, device="cpu"):
    names = {"codes": (d * bits // 8, torch.uint8), "scale": (d // group, torch.float16),
             "zero": (d // group, torch.float16)}
    return {f"{kv}{n}": torch.full((b, h, cap, w), 0x5A, dtype=dt, device=device) if dt == torch.uint8
            else torch.full((b, h, cap, w), float("nan"), dtype=dt, device=device)
            for kv in "kv" for n, (w, dt) in names.items()}


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 8), (4, 32), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_quant_write_bit_exact(bits, group, dtype):
    b, h, t, d, cap = 2, 3, 5, 32, 12
    g = torch.Generator().manual_seed(4)
    k = (torch.randn(b, t, h, d, generator=g) * 3).to(dtype).transpose(1, 2)  # projection layout, strided
    # v in another layout than k
    v = (torch.randn(b, h, t, d, generator=g) * 3).to(dtype)
    k[0, 0, 0] = 1.5  # a constant vector: zero spread
    pos = torch.tensor([7, 0, 11, 3, 4])
    bufs = empty_store(b, h, cap, d, bits, group)
    kv_quant_write(k, v, pos, bufs, bits, group)
    for name, x in (("k", k), ("v", v)):
        q = quantize_unchecked(x, bits, group)
        for part in ("codes", "scale", "zero"):
            got = bufs[name + part][:, :, pos]
            assert torch.equal(got, getattr(q, part)), (name, part)
        untouched = bufs[name + "codes"][:, :, [1, 2, 5, 6, 8, 9, 10]]
        assert (untouched == 0x5A).all()


def test_kv_quant_write_rejects_bad_inputs():
    k = torch.randn(1, 2, 3, 32)
    bufs = empty_store(1, 2, 8, 32, 4, 32)
    with pytest.raises(ValueError, match="group"):
        kv_quant_write(k, k, torch.arange(3), bufs, 4, 12)
    with pytest.raises(ValueError, match="pos"):
        kv_quant_write(k, k, torch.arange(2), bufs, 4, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_kv_quant_write_bit_exact(bits):
    k, v = (torch.randn(1, 64, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    pos = torch.randperm(100, device="cuda")[:64]
    bufs = empty_store(1, 8, 100, 128, bits, 128, "cuda")
    kv_quant_write(k, v, pos, bufs, bits, 128)
    for name, x in (("k", k), ("v", v)):
        q = quantize_unchecked(x, bits, 128)
        for part in ("codes", "scale", "zero"):
            assert torch.equal(bufs[name + part][:, :, pos], getattr(q, part)), (name, part)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits,group", [(16, 1), (8, 16), (4, 8)])
def test_decode_attention_per_row_key_positions(dtype, bits, group):
    """key_pos [B, T]: each row its own visible slots (left padding, per-row rings), with and without a length."""
    b, hkv, rep, t, d = 3, 2, 2, 150, 32
    k, v = make_cache(b, hkv, t, d, bits, group, dtype)
    q = query(b, hkv * rep, d, dtype)
    key_pos = torch.arange(t).repeat(b, 1)
    key_pos[1, :40] = -1  # row 1: 40 padding slots
    key_pos[2] = torch.randint(-1, 120, (t,), generator=torch.Generator().manual_seed(3))
    for length in (None, torch.tensor([100])):
        out = dk.decode_attention(q, k, v, 0.3, length, key_pos)
        expect = A.decode(q, k, v, 0.3, length, key_pos)  # the PyTorch reference on CPU
        torch.testing.assert_close(out, expect, atol=2e-3 if dtype == torch.float16 else 2e-5, rtol=1e-3)
        for row in range(b):  # a row alone with shared positions gives the same (up to its split count)
            one = (k[row:row + 1], v[row:row + 1]) if bits == 16 else tuple(
                type(x)(x.codes[row:row + 1], x.scale[row:row + 1], x.zero[row:row + 1], x.bits, x.group)
                for x in (k, v))
            alone = dk.decode_attention(q[row:row + 1], *one, 0.3, length, key_pos[row].contiguous())
            torch.testing.assert_close(out[row:row + 1], alone, atol=1e-3 if dtype == torch.float16 else 1e-6,
                                       rtol=1e-3)


@pytest.mark.parametrize("position", [0, 2, 3, 9, 10, 23])
def test_ring_write_matches_slot_arithmetic(position):
    """sink 3 + 7 cycling slots; positions before, at and past the wrap-around."""
    b, h, d, sink, recent = 2, 3, 16, 3, 7
    layer = DuoCache([0], h, sink, recent - 1).layers[0]  # a DuoLayer of recent r cycles over r + 1 slots
    k = torch.randn(b, 1, h, d).transpose(1, 2)  # projection layout
    v = torch.randn(b, h, 1, d)
    ring = [torch.randn(b, h, sink + recent, d) for _ in range(2)]
    ring_pos = (torch.arange(sink + recent) * 5).repeat(b, 1)
    expect = [r.clone() for r in ring], ring_pos.clone()
    p = torch.tensor([position])
    slot = layer._slot(p)
    expect[0][0].index_copy_(2, slot, k)
    expect[0][1].index_copy_(2, slot, v)
    expect[1][:, slot] = p
    ring_write(k, v, p, ring[0], ring[1], ring_pos, sink, recent)
    assert torch.equal(ring[0], expect[0][0]) and torch.equal(ring[1], expect[0][1])
    assert torch.equal(ring_pos, expect[1])
    with pytest.raises(ValueError, match="ring_write"):
        ring_write(k, v, p, ring[0][:, :, :4], ring[1], ring_pos, sink, recent)


@pytest.mark.parametrize("position", [4, 9, 30])
def test_ring_write_per_row_padding(position):
    """Row b writes at the slot of its real position p - pad[b]; a row still in its padding writes nothing."""
    b, h, d, sink, recent = 3, 2, 16, 3, 7
    layer = DuoCache([0], h, sink, recent - 1).layers[0]
    pad = torch.tensor([0, 2, 6])
    k, v = torch.randn(b, h, 1, d), torch.randn(b, h, 1, d)
    ring = [torch.randn(b, h, sink + recent, d) for _ in range(2)]
    ring_pos = torch.full((b, sink + recent), -1)
    expect = [r.clone() for r in ring], ring_pos.clone()
    for row in range(b):
        real = position - int(pad[row])
        if real >= 0:
            slot = int(layer._slot(real))
            expect[0][0][row, :, slot], expect[0][1][row, :, slot] = k[row, :, 0], v[row, :, 0]
            expect[1][row, slot] = position
    ring_write(k, v, torch.tensor([position]), ring[0], ring[1], ring_pos, sink, recent, pad)
    assert torch.equal(ring[0], expect[0][0]) and torch.equal(ring[1], expect[0][1])
    assert torch.equal(ring_pos, expect[1])
