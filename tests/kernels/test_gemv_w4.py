"""The one-token GEMV (quantduo.kernels.gemv_w4) vs its reference (quantduo.formats.reference.w4_gemv_ref)."""
from __future__ import annotations

import pytest
import torch

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels.act_quant import act_quant
from quantduo.kernels.gemv_w4 import _pick, w4_gemv
from quantduo.utils import relative_error

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


@pytest.mark.parametrize("M,N,K,r,dtype,cfg", [
    (1, 40, 256, 16, torch.float16, dict(BN=16, BKW=16, num_warps=4, num_stages=2)),  # 2 K steps, N edge
    (3, 24, 192, 0, torch.float32, dict(BN=8, BKW=16, num_warps=2, num_stages=1)),  # last K step partial
    (2, 8, 64, 0, torch.bfloat16, None)])  # default config, bf16 (no tl.dot); see the tolerance below
def test_w4_gemv(M, N, K, r, dtype, cfg, inputs):
    """One-token GEMV vs its reference: every nibble value and sign (codes cover [-8, 7]), groups spanning
    the word boundaries of a K step, masked rows and K steps, low-rank and bias."""
    x, smooth, _, ld, lu, bias = inputs(M, N, K, max(r, 1), dtype)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    qw, ws = qz.pack_int4(codes), (torch.rand(N, K // 64, generator=g) + 0.1).to(dtype)
    lxp = act_quant(x, smooth, None, ld, "none", config=(16, 64, 2))[2] if r else None
    lu = lu if r else None
    y = w4_gemv(x, qw, ws, lxp, lu, bias, dtype, config=cfg)
    y_ref = ref.w4_gemv_ref(x, qw, ws, lxp.sum(0) if r else None, lu, bias, dtype)
    assert torch.isfinite(y).all()
    # the interpreter truncates float32 -> bf16 (1 ulp = 0.4 %)
    assert relative_error(y, y_ref) < {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]


def test_w4_gemv_bad_inputs():
    x, qw, ws = torch.randn(1, 128), torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2)
    with pytest.raises(ValueError, match="qweight must be uint8"):
        w4_gemv(torch.randn(1, 100), qw, ws, None, None, None, torch.float32)
    with pytest.raises(ValueError, match="wscales must be"):
        w4_gemv(x, qw, torch.ones(8, 4), None, None, None, torch.float32)
    with pytest.raises(ValueError, match="BKW must be a multiple of 8"):
        w4_gemv(x, qw, ws, None, None, None, torch.float32, config=dict(BN=8, BKW=4, num_warps=1, num_stages=1))


@pytest.mark.parametrize("K", [64, 192, 3072, 4096, 14336])
def test_default_k_steps_are_never_partly_masked(K):
    """The default configuration's K step divides K's words (FLUX's 3072 inputs: 3 steps of 128 words, not 2 of 256
    with half of the second masked), at most 256 words."""
    words = K // 8
    step = _pick(1, 18432, words)["BKW"]
    assert words % step == 0 and step <= 256 and step % 8 == 0
    assert K < 2048 or step >= 128  # no needlessly short steps at real widths
