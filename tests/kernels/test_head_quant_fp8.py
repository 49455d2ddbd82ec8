"""FlashAttention-3's V operand in two passes (quantduo.kernels.head_quant_fp8) vs the documented rule: one scale per
(batch, head) over the whole concatenated sequence, ``absmax / 448`` (1.0 for an all-zero head), codes
``e4m3(x * (1 / scale))`` in the ``[B, S, H, D]`` layout, text rows first."""
from __future__ import annotations

import pytest
import torch

from quantduo.formats.attention_fp8 import quantize_token_heads_e4m3_ref as reference
from quantduo.kernels.head_quant_fp8 import TOKENS, quantize_token_heads_e4m3
from tests.kernels.compiled import assert_compiled_matches_eager

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


def _values(b, s, h, d, dtype, seed, device="cpu", fused=False):
    """v-like ``[b, s, h, d]``: a view of a wider QKV projection output when ``fused`` (row stride 3 h d)."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * h * d if fused else h * d
    flat = torch.randn(b, s, width, generator=g) * torch.rand(1, 1, width, generator=g) * 4
    return flat.to(dtype).to(device)[..., 2 * h * d if fused else 0:][..., : h * d].unflatten(-1, (h, d))


def _by_hand(parts):
    """The rule written out per (batch, head), independently of the reference's reshapes."""
    x = torch.cat(parts, dim=1).float()
    B, S, H, D = x.shape
    codes = torch.empty(B, S, H, D, dtype=torch.float8_e4m3fn)
    scale = torch.empty(B, H)
    for b in range(B):
        for h in range(H):
            amax = x[b, :, h].abs().max()
            scale[b, h] = amax * (1.0 / 448.0) if amax > 0 else 1.0
            codes[b, :, h] = (x[b, :, h] * (1.0 / scale[b, h])).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("joint,fused", [(True, False), (True, True), (False, True), (False, False)])
def test_codes_and_scales_follow_the_rule(dtype, joint, fused):
    """Text + image streams of different lengths (one shorter than a token block, one spanning three), contiguous and
    fused-QKV strides: the reference and the kernel give the rule's codes and scales exactly."""
    h, d = 3, 32
    image = _values(2, 2 * TOKENS + 7, h, d, dtype, seed=1, fused=fused)
    text = _values(2, 5, h, d, dtype, seed=2, fused=fused)
    text[1, 3, 2, 7] = 300.0  # one head's absmax set by a single text value
    parts = [text, image] if joint else [image]
    want_codes, want_scale = _by_hand(parts)
    for fn in (reference, quantize_token_heads_e4m3):
        codes, scale = fn(*parts)
        assert codes.dtype == torch.float8_e4m3fn and codes.shape == want_codes.shape and codes.is_contiguous()
        assert torch.equal(scale, want_scale), fn
        assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)), fn


def test_zero_head_gets_unit_scale_and_order_matters():
    """An all-zero head has scale 1.0 and zero codes; swapping the streams moves the rows (text first)."""
    text, image = _values(1, 3, 2, 16, torch.float32, seed=3), _values(1, 70, 2, 16, torch.float32, seed=4)
    text[:, :, 1], image[:, :, 1] = 0.0, 0.0
    codes, scale = quantize_token_heads_e4m3(text, image)
    assert scale[0, 1] == 1.0 and not codes[:, :, 1].float().any()
    swapped, _ = quantize_token_heads_e4m3(image, text)
    assert torch.equal(swapped[:, :70].view(torch.uint8), codes[:, 3:].view(torch.uint8))
    assert not torch.equal(swapped.view(torch.uint8), codes.view(torch.uint8))


def test_bad_inputs_are_refused():
    x = _values(1, 4, 2, 32, torch.float32, seed=5)
    with pytest.raises(ValueError, match="equal B, H, D"):
        quantize_token_heads_e4m3(x, _values(1, 4, 3, 32, torch.float32, seed=6))
    with pytest.raises(ValueError, match="power of two"):
        quantize_token_heads_e4m3(_values(1, 4, 2, 24, torch.float32, seed=7))
    with pytest.raises(ValueError, match="one floating dtype"):
        quantize_token_heads_e4m3(x, x.half())


def test_compiled_call_is_one_graph():
    """Under torch.compile the two passes are one operator: fullgraph, the eager codes and scales."""
    x0, x1 = _values(1, 3, 2, 32, torch.float32, seed=8), _values(1, 9, 2, 32, torch.float32, seed=9)
    assert_compiled_matches_eager(quantize_token_heads_e4m3, x0, x1)


@pytest.mark.gpu
def test_gpu_flux_shape_bf16():
    """FLUX.1 at 1024x1024: 512 text + 4096 image tokens of 24 heads of 128, bf16, fused-QKV strides."""
    text = _values(1, 512, 24, 128, torch.bfloat16, seed=10, device="cuda", fused=True)
    image = _values(1, 4096, 24, 128, torch.bfloat16, seed=11, device="cuda", fused=True)
    want_codes, want_scale = reference(text, image)
    codes, scale = quantize_token_heads_e4m3(text, image)
    assert torch.equal(scale, want_scale)
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
