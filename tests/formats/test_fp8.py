"""FP8 E4M3 references (quantduo.formats.fp8): per-token activation quantizer, per-channel weight scale."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantduo.formats.fp8 import fp8_channel_scale, fp8_steps_apart, quantize_fp8_per_token_ref, quantize_fp8_weight
from quantduo.formats.quantizers import FP8_E4M3_MAX


def test_per_token_ref():
    """scale = absmax / 448 per row (1 for zero rows), codes within one E4M3 step of x / scale, the row's absmax
    at +-448."""
    torch.manual_seed(0)
    x = torch.randn(6, 96) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0
    q, scale = quantize_fp8_per_token_ref(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and q.shape == x.shape
    amax = x.abs().amax(1)
    torch.testing.assert_close(scale[amax > 0], amax[amax > 0] / FP8_E4M3_MAX, rtol=1e-6, atol=0)
    assert scale[2] == 1 and not q[2].float().any()
    assert q.float().abs().amax(1)[amax > 0].eq(FP8_E4M3_MAX).all()
    deq = q.float() * scale[:, None]
    assert ((deq - x).abs() <= x.abs() / 16 + scale[:, None] * 2 ** -9).all()  # 3 mantissa bits, subnormals


def test_per_token_ref_gelu():
    """The concatenated rows cat(x, gelu_tanh(h)) quantized as one row; gelu_input alone; nothing rejected."""
    torch.manual_seed(1)
    x, h = torch.randn(5, 32) * 3, torch.randn(5, 48) * 4
    q, scale = quantize_fp8_per_token_ref(x, h)
    q2, scale2 = quantize_fp8_per_token_ref(torch.cat([x, F.gelu(h, approximate="tanh")], 1))
    assert torch.equal(scale, scale2) and torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
    qg, sg = quantize_fp8_per_token_ref(None, h)
    q3, s3 = quantize_fp8_per_token_ref(F.gelu(h, approximate="tanh"))
    assert torch.equal(sg, s3) and torch.equal(qg.view(torch.uint8), q3.view(torch.uint8))
    with pytest.raises(ValueError, match="give x, gelu_input"):
        quantize_fp8_per_token_ref(None)


def test_weight_scale_and_codes():
    torch.manual_seed(2)
    w = torch.randn(8, 64) * torch.logspace(-2, 2, 8)[:, None]
    w[5] = 0
    scale = fp8_channel_scale(w.half())
    assert scale.dtype == torch.float32 and scale[5] == 1
    torch.testing.assert_close(scale[torch.arange(8) != 5], w.abs().amax(1)[torch.arange(8) != 5] / 448,
                               rtol=1e-3, atol=0)
    codes = quantize_fp8_weight(w, 1 / scale)
    assert codes.dtype == torch.float32
    assert torch.equal(codes, codes.to(torch.float8_e4m3fn).float())  # exact fp8 values
    assert codes.abs().amax(1)[torch.arange(8) != 5].le(448).all() and not codes[5].any()
    assert torch.equal(quantize_fp8_weight(w * 1e3, torch.ones(8)).abs().amax(), torch.tensor(448.0))  # saturates


def test_fp8_steps_apart_counts_steps_across_zero():
    a = torch.tensor([0.0, 1.0, -1.0, 448.0, -0.0]).to(torch.float8_e4m3fn)
    b = torch.tensor([0.0, 1.125, 1.0, 416.0, 0.0]).to(torch.float8_e4m3fn)
    # 1 -> 1.125 is one step; -1 -> 1 crosses zero (56 steps each side); 448 -> 416 one step; -0 == +0
    assert fp8_steps_apart(a, b).tolist() == [0, 1, 112, 1, 0]
