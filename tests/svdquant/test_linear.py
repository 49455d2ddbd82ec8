"""SVDQuantLinear's NVFP4 channel scales (``wscale_channel``) in state dicts."""
from __future__ import annotations

import pytest
import torch

from quantduo.svdquant import SVDQuantLinear


def _nvfp4(**kw) -> SVDQuantLinear:
    return SVDQuantLinear(64, 32, rank=16, weight_format="nvfp4", dtype=torch.float32, **kw)


def test_channel_scales_are_nvfp4_only_and_saved():
    assert SVDQuantLinear(64, 32, rank=16, dtype=torch.float32).wscale_channel is None
    layer = _nvfp4(act_format="nvfp4_nunchaku")
    with torch.no_grad():
        layer.wscale_channel.copy_(torch.linspace(0.5, 2.0, 32))
    again = _nvfp4(act_format="nvfp4_nunchaku")
    again.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(again.wscale_channel, layer.wscale_channel)


def test_checkpoints_saved_before_channel_scales_load_them_as_ones():
    """A whole layer's state without ``wscale_channel`` (older NVFP4 checkpoints) loads strictly with ones; a
    partial state dict (other keys of a model) leaves the layer's channel scales alone."""
    layer = _nvfp4()
    with torch.no_grad():
        layer.wscale_channel.fill_(3.0)
    old = {k: v for k, v in _nvfp4().state_dict().items() if k != "wscale_channel"}
    layer.load_state_dict({"bias": torch.ones(32)}, strict=False)
    assert torch.equal(layer.wscale_channel, torch.full((32,), 3.0))
    layer.load_state_dict(old, strict=True)
    assert torch.equal(layer.wscale_channel, torch.ones(32))


def test_channel_scales_multiply_the_output_rows():
    layer = _nvfp4(act_format="nvfp4_nunchaku", bias=False)
    with torch.no_grad():
        layer.qweight.random_(0, 256, generator=torch.Generator().manual_seed(0))
        layer.proj_up.zero_()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    with torch.no_grad():
        layer.wscale_channel.copy_(torch.arange(1.0, 33.0))
    assert torch.allclose(layer(x), y * torch.arange(1.0, 33.0), rtol=1e-6, atol=1e-6)
    assert y.abs().sum() > 0
    with pytest.raises(ValueError, match="act_format must be one of"):
        _nvfp4(act_format="fp4")
