"""AWQ W4A16 layers (TinyChat packing, any zeros) held exactly as signed INT4 + a per-group offset branch, run by
the reference path and by the project's W4A16 kernels (Triton interpreter, float16 / float32)."""
from __future__ import annotations

import pytest
import torch

from tests.integrations.published.packer import AwqLayer, bf16
from quantduo.engine.linear import cpu_kernels
from quantduo.formats import nunchaku as nk
from quantduo.integrations.published import awq_to_signed
from quantduo.integrations.published.build import StoredModule, _awq_layer
from quantduo.integrations.published.layouts import Role
from quantduo.utils import relative_error


def awq(zeros: str, n=128, k=192, seed=0) -> AwqLayer:
    g = torch.Generator().manual_seed(seed)
    scales = bf16(torch.rand(n, k // 64, generator=g) * 0.02 + 0.001)  # files hold 16-bit scales and zeros
    codes = torch.randint(0, 16, (n, k), generator=g).to(torch.uint8)
    z = -7 * scales if zeros == "symmetric" else bf16(torch.randn(n, k // 64, generator=g) * 0.1)
    if zeros == "symmetric":
        codes = codes.clamp(0, 14)
    return AwqLayer(codes, scales, z, torch.randn(n, generator=g))


@pytest.mark.parametrize("zeros", ["symmetric", "arbitrary"])
def test_signed_form_is_exact(zeros):
    """Exact in float32 for 16-bit scales / zeros (every product and sum fits the float32 mantissa)."""
    layer = awq(zeros)
    codes, offsets = awq_to_signed(nk.AwqParts(layer.codes, layer.scales, layer.zeros))
    assert codes.min() >= -8 and codes.max() <= 7
    rebuilt = codes.float() * layer.scales.repeat_interleave(64, 1) + offsets.repeat_interleave(64, 1)
    assert torch.equal(rebuilt, layer.weight())
    assert (offsets == 0).all() == (zeros == "symmetric")  # deepcompressor's zeros need no offset branch


class _Model(torch.nn.Module):
    def __init__(self, n, k):
        super().__init__()
        self.proj = torch.nn.Linear(k, n)


@pytest.mark.parametrize("zeros", ["symmetric", "arbitrary"])
def test_loaded_layer_matches_awq_semantics_on_every_path(zeros):
    layer = awq(zeros)
    stored = StoredModule("proj", "", Role("awq", ("proj",)), layer.stored(padded_groups=16))
    module = _awq_layer(stored, _Model(128, 192), torch.float32)["proj"]
    assert module.rank == (0 if zeros == "symmetric" else 3)
    x = torch.randn(3, 5, 192, generator=torch.Generator().manual_seed(1))
    ref = layer(x)
    with torch.no_grad():
        assert relative_error(module(x), ref) < 1e-6  # reference path, float32
        half = _awq_layer(stored, _Model(128, 192), torch.float16)["proj"].set_execution("exact")
        with cpu_kernels():
            for tokens in (1, 8, 80):  # GEMV, skinny GEMM, reconstructed weight
                xt = x.reshape(-1, 192)[:tokens].half()
                assert relative_error(half(xt), layer(xt.float())) < 2e-3, tokens
