"""KV quantization reference: error bounds, packing, byte counts, bad input."""
import pytest
import torch

from quantduo.formats.kv import bytes_per_element, dequantize_kv, quantize_kv


@pytest.mark.parametrize("bits", [4, 8])
def test_roundtrip_error_within_half_step(bits):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 33, 128) * 3
    q = quantize_kv(x, bits, group=64)
    y = dequantize_kv(q, torch.float32)
    g = x.reshape(2, 4, 33, 2, 64)
    step = (g.amax(-1) - g.amin(-1)) / (2 ** bits - 1)
    err = (y - x).abs().reshape(2, 4, 33, 2, 64).amax(-1)
    assert (err <= 0.5 * step + 2e-2 * step.clamp_min(1) + 1e-3).all()  # fp16 scale/zero rounding
    assert q.nbytes() == x.numel() * bytes_per_element(bits, 64)


def test_int4_packs_two_codes_per_byte_and_rejects_bad_input():
    x = torch.arange(128.0).reshape(1, 128)
    q = quantize_kv(x, 4, 128)
    assert q.codes.shape == (1, 64) and q.codes.dtype == torch.uint8
    expected = (torch.arange(128.0) / 127 * 15).round() * 127 / 15  # 16 levels spanning [0, 127]
    torch.testing.assert_close(dequantize_kv(q, torch.float32)[0], expected, atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="bits"):
        quantize_kv(x, 3)
    with pytest.raises(ValueError, match="multiple"):
        quantize_kv(torch.zeros(1, 100), 4, 128)
    with pytest.raises(ValueError, match="NaN"):
        quantize_kv(torch.full((1, 128), float("nan")), 4)
