"""Tensor layouts of published SVDQuant files, checked against the test-side packer (independent index arithmetic
from the documented layout) and against the store orders upstream documents in its packer's comments."""
from __future__ import annotations

import pytest
import torch

from quantduo.formats import nunchaku as nk
from tests.integrations.published.packer import (AwqLayer, Nvfp4Layer, W4A4Layer, micro_scale_positions,
                                                 vector_positions)

G = torch.Generator().manual_seed(0)


def random_w4a4(n=256, k=384, r=32) -> W4A4Layer:
    return W4A4Layer(torch.randint(-8, 8, (n, k), generator=G).to(torch.int8), torch.rand(n, k // 64, generator=G),
                     torch.rand(k, generator=G), torch.randn(k, r, generator=G), torch.randn(n, r, generator=G),
                     torch.randn(n, generator=G))


def random_awq(n=12, k=192) -> AwqLayer:
    return AwqLayer(torch.randint(0, 16, (n, k), generator=G).to(torch.uint8), torch.rand(n, k // 64, generator=G),
                    torch.randn(n, k // 64, generator=G), torch.randn(n, generator=G))


def test_vector_store_order_is_the_documented_one():
    """deepcompressor's pack_scale: each 128 channels are stored 0 1 8 9 | 2 3 10 11 | ... | 16 17 24 25 ..."""
    stored = nk.pack_vector(torch.arange(256.0))
    assert stored[:20].tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 16, 17, 24, 25]
    assert stored[128:132].tolist() == [128, 129, 136, 137]
    assert torch.equal(stored[vector_positions(256, 1).reshape(-1)], torch.arange(256.0))


def test_micro_scale_store_order_is_the_documented_one():
    """pack_micro_scale: lane 0 holds channels 0 32 64 96, lane 1 holds 8 40 72 104, lane 4 holds 1 33 65 97; each
    entry is the 4 fp8 scales of 64 inputs."""
    logical = torch.arange(128)[:, None] * 4 + torch.arange(4)[None, :]  # [N=128, K/16=4], value = n*4 + j
    stored = nk.tile(logical, nk.micro_scale_view(128, 64), nk.MICRO_SCALE_PERM)
    channels = (stored[::4] // 4).tolist()
    assert channels[:8] == [0, 32, 64, 96, 8, 40, 72, 104] and channels[16:20] == [1, 33, 65, 97]
    assert (stored[:4] % 4).tolist() == [0, 1, 2, 3]


def test_w4a4_decode_matches_the_independent_packer():
    layer = random_w4a4()
    parts = nk.decode_w4a4("layer", layer.stored())
    assert torch.equal(parts.codes, layer.codes) and torch.equal(parts.wscales, layer.wscales)
    assert torch.equal(parts.smooth, layer.smooth) and torch.equal(parts.bias, layer.bias)
    assert torch.equal(parts.lora_down, layer.lora_down) and torch.equal(parts.lora_up, layer.lora_up)


def random_nvfp4(n=256, k=384, r=32) -> Nvfp4Layer:
    scales = (torch.rand(n, k // 16, generator=G) * 8 + 0.01).to(torch.float8_e4m3fn)
    return Nvfp4Layer(torch.randint(0, 16, (n, k), generator=G).to(torch.uint8), scales, torch.rand(k, generator=G),
                      torch.randn(k, r, generator=G), torch.randn(n, r, generator=G), torch.randn(n, generator=G),
                      wcscales=torch.rand(n, generator=G) + 0.5, wtscale=0.003)


def test_packer_micro_scale_positions_are_the_documented_order():
    logical = torch.arange(128)[:, None] * 4 + torch.arange(4)[None, :]
    stored = torch.empty(512, dtype=torch.long)
    stored[micro_scale_positions(128, 64).reshape(-1)] = logical.reshape(-1)
    assert torch.equal(stored, nk.tile(logical, nk.micro_scale_view(128, 64), nk.MICRO_SCALE_PERM))


def test_nvfp4_decode_matches_the_independent_packer():
    """E2M1 codes through the MMA tiling, fp8 scales through the micro-scale tiling, wcscales through the vector
    swizzle, wtscale as is."""
    layer = random_nvfp4()
    stored = layer.stored()
    assert stored["wscales"].dtype == torch.float8_e4m3fn and stored["wscales"].shape == (24, 256)
    parts = nk.decode_w4a4("layer", stored)
    assert parts.nvfp4 and torch.equal(parts.codes, layer.codes)
    assert torch.equal(parts.wscales.view(torch.uint8), layer.wscales.view(torch.uint8))
    assert torch.equal(parts.wcscales, layer.wcscales) and float(parts.wtscale) == pytest.approx(0.003)
    assert torch.equal(parts.lora_down, layer.lora_down) and torch.equal(parts.smooth, layer.smooth)
    with pytest.raises(nk.LayoutError, match="wcscales must be float16 / bfloat16 / float32"):
        nk.decode_w4a4("l", {**stored, "wcscales": stored["wcscales"].to(torch.float8_e4m3fn)})
    with pytest.raises(nk.LayoutError, match="wtscale must hold one value"):
        nk.decode_w4a4("l", {**stored, "wtscale": torch.ones(2)})
    with pytest.raises(nk.LayoutError, match="writing NVFP4 layers is not supported"):
        nk.encode_w4a4(parts)


def test_w4a4_encode_is_the_inverse_and_pads_like_deepcompressor():
    layer = random_w4a4(n=192, k=320, r=8)  # not multiples of the 128 / 128 / 16 tiling
    stored = nk.encode_w4a4(nk.W4A4Parts(layer.codes, layer.wscales, layer.smooth, layer.lora_down, layer.lora_up,
                                         layer.bias))
    assert stored["qweight"].shape == (256, 192) and stored["lora_down"].shape == (384, 16)
    parts = nk.decode_w4a4("layer", stored)
    assert torch.equal(parts.codes[:192, :320], layer.codes) and not parts.codes[192:].any()
    assert torch.equal(parts.lora_down[:320, :8], layer.lora_down) and torch.equal(parts.smooth[320:], torch.ones(64))
    assert torch.equal(parts.wscales[:192, :5], layer.wscales) and torch.equal(parts.bias[:192], layer.bias)


def test_awq_decode_matches_the_independent_packer_with_padded_groups():
    layer = random_awq()
    stored = layer.stored(padded_groups=16)
    assert stored["qweight"].dtype == torch.int32 and stored["qweight"].shape == (3, 96)
    assert stored["wscales"].shape == (16, 12)
    parts = nk.decode_awq("layer", stored)
    assert torch.equal(parts.codes, layer.codes) and torch.equal(parts.scales, layer.scales)
    assert torch.equal(parts.zeros, layer.zeros)
    assert torch.equal(parts.dequantized(), layer.weight())
    again = nk.encode_awq(parts)
    assert all(torch.equal(again[k], stored[k]) for k in ("qweight", "wscales", "wzeros"))
    assert nk.awq_padded_groups(48) == 48 and nk.awq_padded_groups(3) == 16 and nk.awq_padded_groups(9) == 16


def test_decoders_reject_what_the_layout_cannot_hold():
    stored = random_w4a4().stored()
    with pytest.raises(nk.LayoutError, match="rank 8"):
        nk.decode_w4a4("l", {**stored, "lora_up": torch.zeros(256, 8), "lora_down": torch.zeros(384, 8)})
    with pytest.raises(nk.LayoutError, match="group size 32"):
        nk.decode_w4a4("l", {**stored, "wscales": torch.zeros(12, 256)})
    with pytest.raises(nk.LayoutError, match="lacks"):
        nk.decode_w4a4("l", {k: v for k, v in stored.items() if k != "lora_up"})
    with pytest.raises(nk.LayoutError, match="NVFP4"):
        nk.decode_w4a4("l", {**stored, "wtscale": torch.ones(1)})
    awq = random_awq().stored()
    with pytest.raises(nk.LayoutError, match="group size 64"):
        nk.decode_awq("l", {**awq, "wscales": torch.zeros(2, 12), "wzeros": torch.zeros(2, 12)})
    with pytest.raises(nk.LayoutError, match="int32"):
        nk.decode_awq("l", {**awq, "qweight": awq["qweight"].view(torch.int8)})


def test_the_lowrank_pair_is_optional_as_a_pair():
    """Nunchaku's loader marks lora_down / lora_up optional (src/Linear.cpp ``ParamFlags::Optional``) and fills
    rank-0 tensors where a file has none (transformer_flux.py): no pair is rank 0, half a pair is an error."""
    layer = random_w4a4()
    stored = {k: v for k, v in layer.stored().items() if k not in ("lora_down", "lora_up")}
    parts = nk.decode_w4a4("l", stored)
    assert parts.lora_down.shape == (384, 0) and parts.lora_up.shape == (256, 0)
    assert torch.equal(parts.codes, layer.codes) and torch.equal(parts.bias, layer.bias)
    assert nk.check_w4a4("l", {**stored, "lora_down": torch.zeros(384, 0), "lora_up": torch.zeros(256, 0)})[2] == 0
    with pytest.raises(nk.LayoutError, match=r"'blocks\.0\.out_proj' lacks \['lora_down'\]: the low-rank pair"):
        nk.decode_w4a4("blocks.0.out_proj", {**stored, "lora_up": layer.stored()["lora_up"]})


def test_awq_bias_is_stored_in_the_scales_dtype():
    """deepcompressor writes the AWQ bias in the weight dtype (Nunchaku asserts one dtype per layer)."""
    layer = random_awq()
    parts = nk.AwqParts(layer.codes, layer.scales.bfloat16(), layer.zeros.bfloat16(), layer.bias.float())
    stored = nk.encode_awq(parts)
    assert {k: v.dtype for k, v in stored.items()} == {"qweight": torch.int32, "wscales": torch.bfloat16,
                                                       "wzeros": torch.bfloat16, "bias": torch.bfloat16}
