"""NVFP4 weight dequantization (quantduo.kernels.nvfp4) vs its reference: bit-exact float32."""
from __future__ import annotations

import pytest
import torch

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels.nvfp4 import nvfp4_dequant

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


@pytest.mark.parametrize("n,k", [(40, 96), (33, 128), (8, 16)])
def test_nvfp4_dequant(n, k):
    """Row edges (N not a multiple of the 32-row tile), K steps of 64 / 32 / 16."""
    torch.manual_seed(0)
    codes, scales, gs = qz.quantize_nvfp4(torch.randn(n, k) * torch.logspace(-2, 2, k))
    qw = qz.pack_nibbles(codes)
    got = nvfp4_dequant(qw, scales, gs)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    assert torch.equal(got, ref.nvfp4_dequant_ref(qw, scales, gs))
