"""The INT4 x fp8 group GEMM (quantduo.kernels.w4a8_cute): its reference by hand on the CPU; where CUTLASS's CuTe DSL
is installed, the kernel compiled for sm_90a without a GPU; on a Hopper GPU, the kernel against its reference."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from quantduo.formats import quantizers as qz
from quantduo.formats.reference import w4a8_folded_gemm_ref, w4a8_group_gemm_ref

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


def test_folded_scales_by_hand():
    """row_scale = 8 * max |s| / 448 per row; folded = s / row_scale, transposed to [group, row]; a zero row keeps 1."""
    wscales = torch.tensor([[0.5, -2.0], [0.0, 0.0]], dtype=torch.bfloat16)
    folded_t, row_scale = qz.fp8_folded_scales(wscales)
    torch.testing.assert_close(row_scale, torch.tensor([16 / 448, 1.0]))
    torch.testing.assert_close(folded_t, torch.tensor([[0.5 * 448 / 16, 0.0], [-2.0 * 448 / 16, 0.0]]))
    assert abs(float((8 * folded_t.abs()).max()) - 448) < 1e-3  # E4M3 saturates the rounding above it


def test_folded_reference_by_hand():
    """One weight: q = 3, folded 0.3 -> float16 0.30004883, times 3 -> float16 0.9003906, -> E4M3 0.875 (its
    neighbours 0.875 and 0.9375); times x = 2, xs = 0.5, row_scale = 4: 3.5; plus lx . up = 0.25 and bias 1."""
    q = torch.zeros(1, 128, dtype=torch.int8)
    q[0, 5] = 3
    folded_t = torch.full((2, 1), 0.3)
    xq = torch.zeros(1, 128)
    xq[0, 5] = 2.0
    lx = torch.zeros(1, 16, dtype=torch.bfloat16)
    lx[0, 0] = 0.5
    up = torch.zeros(1, 16, dtype=torch.bfloat16)
    up[0, 0] = 0.5
    out = w4a8_folded_gemm_ref(qz.pack_int4(q), folded_t, torch.tensor([4.0]), xq.to(torch.float8_e4m3fn),
                               torch.tensor([0.5]), lx, up, torch.tensor([1.0], dtype=torch.bfloat16))
    assert float(torch.tensor(3.0, dtype=torch.float16) * torch.tensor(0.3, dtype=torch.float16)) == 0.900390625
    assert out.item() == 0.875 * 2 * 0.5 * 4 + 0.25 + 1.0


def test_folded_weights_are_the_scaled_codes_within_fp8_steps():
    """With :func:`fp8_folded_scales`, ``row_scale * e4m3(q * folded)`` is ``q * s`` within one E4M3 rounding (and
    the float16 ones): the folded GEMM and the promoted one agree to fp8 precision."""
    g = torch.Generator().manual_seed(1)
    n, k, t = 16, 256, 6
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    folded_t, row_scale = qz.fp8_folded_scales(wscales)
    xq = (torch.randn(t, k, generator=g) * 16).to(torch.float8_e4m3fn)
    xs, lx = torch.rand(t, generator=g), torch.zeros(t, 16, dtype=torch.bfloat16)
    up = torch.zeros(n, 16, dtype=torch.bfloat16)
    folded = w4a8_folded_gemm_ref(qz.pack_int4(q), folded_t, row_scale, xq, xs, lx, up, None).float()
    promoted = w4a8_group_gemm_ref(qz.pack_int4(q), wscales.T.contiguous(), xq, xs, lx, up, None).float()
    rel = (folded - promoted).norm() / promoted.norm()
    assert 1e-4 < rel < 0.04, rel  # rounded (not equal), within fp8's 3-bit mantissa


@needs_cute
def test_compiles_for_hopper_without_a_gpu(monkeypatch):
    """``cute.compile`` for sm_90a on fake tensors: both token tiles, K of two and of four groups (the main loop run
    zero and one time), a token count past a tile; shapes it does not take refused."""
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_90a")
    from quantduo.kernels import w4a8_cute  # noqa: PLC0415  (optional dependency)
    for tokens_tile in (64, 128):
        for k in (128, 256):
            for folded in (False, True):
                assert w4a8_cute.compile_kernel(100, 256, k, 32, tokens_tile, stages=4, folded=folded) is not None
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
@pytest.mark.parametrize("tokens, n, k, tokens_tile", [(100, 256, 256, 128), (64, 128, 384, 64), (32, 128, 128, 64),
                                                       (4096, 3072, 3072, 128), (17, 384, 3072, 64)])
@pytest.mark.parametrize("folded", [False, True])
def test_kernel_matches_the_reference(tokens, n, k, tokens_tile, folded):
    from quantduo.kernels import w4a8_cute  # noqa: PLC0415  (optional dependency)
    g = torch.Generator().manual_seed(tokens + n)
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    wscales = (torch.rand(n, k // 64, generator=g) * 0.02).to(torch.bfloat16)
    xq = (torch.randn(tokens, k, generator=g) * 64).to(torch.float8_e4m3fn)
    xs = torch.rand(tokens, generator=g) / 64
    lx = torch.randn(tokens, 32, generator=g).to(torch.bfloat16)
    up = (torch.randn(n, 32, generator=g) * 0.1).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    if folded:
        folded_t, row_scale = qz.fp8_folded_scales(wscales)
        operands = [qz.pack_int4(q), folded_t, row_scale, xq, xs, lx, up, bias]
        expected, run = w4a8_folded_gemm_ref(*operands).float(), w4a8_cute.w4a8_folded_gemm
    else:
        operands = [qz.pack_int4(q), wscales.T.contiguous(), xq, xs, lx, up, bias]
        expected, run = w4a8_group_gemm_ref(*operands).float(), w4a8_cute.w4a8_group_gemm
    out = run(*[o.cuda() for o in operands], tokens_tile=tokens_tile).float().cpu()
    assert out.isfinite().all()
    rel = (out - expected).norm() / expected.norm()
    assert rel < 4e-3, rel
