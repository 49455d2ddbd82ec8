"""The INT4 x fp8 group GEMM (quantduo.kernels.w4a8_cute): its reference by hand on the CPU; where CUTLASS's CuTe DSL
is installed, the kernel compiled for sm_90a without a GPU; on a Hopper GPU, the kernel against its reference."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from quantduo.formats import quantizers as qz
from quantduo.formats.reference import w4a8_group_gemm_ref

HAVE_CUTE = importlib.util.find_spec("cutlass") is not None
needs_cute = pytest.mark.skipif(not HAVE_CUTE, reason="nvidia-cutlass-dsl not installed")


def test_reference_by_hand():
    """Two groups of 64 inputs, two outputs, one token, written out: byte ``j`` of a row holds input ``2j`` in its low
    nibble; each group's integer sum is scaled by that group's scale of the row (scales_t is [group, row]); then the
    token's scale, the low-rank term and the bias."""
    q = torch.zeros(2, 128, dtype=torch.int8)
    q[0, 0], q[0, 1], q[0, 64] = 3, -8, 7  # row 0: inputs 0 and 1 in group 0, input 64 in group 1
    q[1, 127] = -1
    codes = qz.pack_int4(q)
    assert codes[0, 0].item() == 0x83  # input 0 (3) low, input 1 (-8 -> 0x8) high
    scales_t = torch.tensor([[0.5, 2.0], [0.25, 4.0]], dtype=torch.bfloat16)  # [group, row]
    xq = torch.zeros(1, 128)
    xq[0, 0], xq[0, 1], xq[0, 64], xq[0, 127] = 2.0, 0.5, -1.5, 3.0
    xq = xq.to(torch.float8_e4m3fn)
    xs = torch.tensor([0.125])
    lx = torch.tensor([[1.0] * 16], dtype=torch.bfloat16)
    up = torch.zeros(2, 16, dtype=torch.bfloat16)
    up[1, 3] = 0.5
    bias = torch.tensor([0.25, -1.0], dtype=torch.bfloat16)
    out = w4a8_group_gemm_ref(codes, scales_t, xq, xs, lx, up, bias)
    row0 = 0.125 * (0.5 * (3 * 2.0 + (-8) * 0.5) + 0.25 * (7 * -1.5)) + 0.25
    row1 = 0.125 * (4.0 * (-1 * 3.0)) + 0.5 - 1.0
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), torch.tensor([[row0, row1]]).to(torch.bfloat16).float())


def test_reference_equals_the_dequantized_product():
    """The grouped sum equals ``x @ (q * s)^T`` with every weight dequantized (the scales transposed back)."""
    g = torch.Generator().manual_seed(0)
    n, k, t, r = 8, 256, 5, 16
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, k // 64, generator=g).to(torch.bfloat16)
    xq = (torch.randn(t, k, generator=g) * 4).to(torch.float8_e4m3fn)
    xs = torch.rand(t, generator=g)
    lx = torch.randn(t, r, generator=g).to(torch.bfloat16)
    up = torch.randn(n, r, generator=g).to(torch.bfloat16)
    out = w4a8_group_gemm_ref(qz.pack_int4(q), scales.T.contiguous(), xq, xs, lx, up, None)
    w = q.double() * scales.double().repeat_interleave(64, dim=1)
    expected = (xq.double() @ w.T) * xs.double()[:, None] + lx.double() @ up.double().T
    torch.testing.assert_close(out.double(), expected.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2)


@needs_cute
def test_compiles_for_hopper_without_a_gpu(monkeypatch):
    """``cute.compile`` for sm_90a on fake tensors: both token tiles, K of two and of four groups (the main loop run
    zero and one time), a token count past a tile; shapes it does not take refused."""
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    from quantduo.kernels import w4a8_cute  # noqa: PLC0415  (optional dependency)
    for tokens_tile in (64, 128):
        for k in (128, 256):
            assert w4a8_cute.compile_kernel(100, 256, k, 32, tokens_tile=tokens_tile, stages=4) is not None
    with pytest.raises(ValueError, match="N % 128"):
        w4a8_cute.compile_kernel(16, 200, 256, 32)
    with pytest.raises(ValueError, match="even number of groups"):
        w4a8_cute.compile_kernel(16, 128, 192, 32)
    with pytest.raises(ValueError, match="tokens_tile"):
        w4a8_cute.W4A8GroupGemm(tokens_tile=256)


@needs_cute
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU")
@pytest.mark.parametrize("tokens, n, k, tokens_tile", [(100, 256, 256, 128), (64, 128, 384, 64),
                                                       (4096, 3072, 3072, 128), (17, 384, 3072, 64), (32, 128, 128, 64)])
def test_kernel_matches_the_reference(tokens, n, k, tokens_tile):
    from quantduo.kernels import w4a8_cute  # noqa: PLC0415  (optional dependency)
    g = torch.Generator().manual_seed(tokens + n)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scales_t = (torch.rand(k // 64, n, generator=g) * 0.02).to(torch.bfloat16)
    xq = (torch.randn(tokens, k, generator=g) * 64).to(torch.float8_e4m3fn)
    xs = torch.rand(tokens, generator=g) / 64
    lx = torch.randn(tokens, 32, generator=g).to(torch.bfloat16)
    up = (torch.randn(n, 32, generator=g) * 0.1).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    operands = [qz.pack_int4(q), scales_t, xq, xs, lx, up, bias]
    expected = w4a8_group_gemm_ref(*operands).float()
    out = w4a8_cute.w4a8_group_gemm(*[o.cuda() for o in operands], tokens_tile=tokens_tile).float().cpu()
    assert out.isfinite().all()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 4e-3, rel
