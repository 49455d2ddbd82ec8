"""The skinny split-K GEMM (quantduo.kernels.gemm_w4_skinny) vs its references (quantduo.formats.reference:
``w4_gemv_ref`` for 16-bit activations, ``w4_gemm_ref`` for 4-bit codes).

On CPU the kernel runs in the Triton interpreter (tests/conftest.py) at tiny shapes in float16 (bf16 tl.dot is wrong
in the interpreter); the ``gpu`` tests of the engine (tests/engine/test_linear.py) run it in bf16 at FLUX shapes.
Outputs are poisoned (NaN / sentinel bytes) before each kernel so unwritten elements fail.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels.act_quant import act_quant
from quantduo.kernels.gemm_w4_skinny import w4_skinny_gemm
from quantduo.utils import relative_error

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


@pytest.mark.parametrize("mode,M,split,r,gelu", [
    ("none", 1, 1, 16, False), ("none", 5, 4, 16, True), ("none", 17, 2, 0, False), ("none", 40, 1, 16, False),
    ("int4", 9, 4, 16, False), ("int4", 33, 1, 0, True), ("uint4", 16, 2, 16, False), ("int4", 3, 8, 16, False)])
def test_w4_skinny_gemm(mode, M, split, r, gelu, inputs):
    """Skinny split-K GEMM vs its references (16-bit activations: exact float32 weights, ``w4_gemv_ref``; 4-bit
    codes: ``w4_gemm_ref``): every nibble value, masked token and row edges (N = 80 with 64-row tiles), K split
    1 / 2 / 4 / 8 ways (the group scales prefetched across slice ends), low-rank, bias and GELU; a second call
    gives the same result (workspace and counters reset)."""
    N, K, dtype = 80, 512, torch.float16
    x, smooth, shift, ld, lu, bias = inputs(M, N, K, max(r, 1), dtype)
    g = torch.Generator().manual_seed(1)
    qw = qz.pack_int4(torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8))
    ws = (torch.rand(N, K // 64, generator=g) + 0.1).to(dtype)
    a, a_s, lxp = act_quant(x, smooth, shift, ld if r else None, "smooth" if mode == "none" else mode,
                            config=(16, 64, 2))
    lu = lu if r else None
    cfg = dict(BM=16 if M <= 16 else 64, BN=64, SPLIT_K=split, num_warps=4, num_stages=1)
    y = w4_skinny_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, gelu=gelu, config=cfg)
    lx = lxp.sum(0) if r else None
    if mode == "none":
        y_ref = ref.w4_gemv_ref(a, qw, ws, lx, lu, bias, dtype)
        if gelu:
            y_ref = F.gelu(y_ref.float(), approximate="tanh").to(dtype)
    else:
        y_ref = ref.w4_gemm_ref(a, a_s, qw, ws, lx, lu, bias, mode, dtype, gelu=gelu)
    assert y.shape == (M, N) and torch.isfinite(y).all()
    assert relative_error(y, y_ref) < 1e-3
    again = w4_skinny_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, gelu=gelu, config=cfg)
    assert relative_error(again, y_ref) < 1e-3


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 64), n=st.integers(1, 150), groups=st.sampled_from([1, 2, 3, 4, 6]),
       split=st.sampled_from([1, 2, 3]), mode=st.sampled_from(["none", "int4", "uint4"]),
       r=st.sampled_from([0, 8, 32]), seed=st.integers(0, 2**16))
def test_w4_skinny_gemm_shapes(m, n, groups, split, mode, r, seed, inputs):
    """Any token count up to 64, row count, K (whole groups) and split that divides the groups."""
    if groups % split:
        split = 1
    K, dtype = 64 * groups, torch.float16
    x, smooth, shift, ld, lu, bias = inputs(m, n, K, max(r, 1), dtype, seed=seed)
    g = torch.Generator().manual_seed(seed)
    qw = qz.pack_int4(torch.randint(-8, 8, (n, K), generator=g, dtype=torch.int8))
    ws = (torch.rand(n, groups, generator=g) + 0.1).to(dtype)
    a, a_s, lxp = act_quant(x, smooth, shift, ld if r else None, "smooth" if mode == "none" else mode,
                            config=(16, 64, 1))
    lu = lu if r else None
    cfg = dict(BM=16 if m <= 16 else (32 if m <= 32 else 64), BN=64, SPLIT_K=split, num_warps=4, num_stages=1)
    y = w4_skinny_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, config=cfg)
    lx = lxp.sum(0) if r else None
    y_ref = (ref.w4_gemv_ref(a, qw, ws, lx, lu, bias, dtype) if mode == "none"
             else ref.w4_gemm_ref(a, a_s, qw, ws, lx, lu, bias, mode, dtype))
    assert relative_error(y, y_ref) < 1e-3


def test_w4_skinny_gemm_bad_inputs():
    qw, ws, x = torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2), torch.randn(4, 128).half()
    with pytest.raises(ValueError, match="mode must be one of"):
        w4_skinny_gemm(x, None, qw, ws, None, None, None, "int8", torch.float16)
    with pytest.raises(ValueError, match="16-bit activations must be"):
        w4_skinny_gemm(x.float(), None, qw, ws, None, None, None, "none", torch.float16)
    with pytest.raises(ValueError, match="wscales must be"):
        w4_skinny_gemm(x, None, qw, torch.ones(8, 3), None, None, None, "none", torch.float16)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        w4_skinny_gemm(torch.randn(65, 128).half(), None, qw, ws, None, None, None, "none", torch.float16)
    with pytest.raises(ValueError, match="4-bit activations must be"):
        w4_skinny_gemm(torch.zeros(4, 64, dtype=torch.uint8), None, qw, ws, None, None, None, "int4", torch.float16)
    with pytest.raises(ValueError, match="SPLIT_K=4 must divide"):
        w4_skinny_gemm(x, None, qw, ws, None, None, None, "none", torch.float16,
                       config=dict(BM=16, BN=64, SPLIT_K=4, num_warps=4, num_stages=1))
