"""Weight reconstruction (quantduo.kernels.dequant_w4) vs its reference (quantduo.formats.reference.w4_dequant_ref):
16-bit / float32 weights for the ``a16`` execution above a few tokens, fp8 codes for the ``fp8`` execution."""
from __future__ import annotations

import pytest
import torch

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.formats.fp8 import fp8_steps_apart
from quantduo.kernels.dequant_w4 import dequant_w4
from quantduo.utils import relative_error

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group,rank,smoothed", [(64, 0, False), (64, 16, True), (128, 24, True), (64, 0, True)])
def test_dequant_w4(dtype, group, rank, smoothed):
    """W4A16 weight reconstruction ``(q * scale + up @ down^T) / smooth`` against its float32 reference, rounded
    to dtype: 16-bit within one ulp (float32 sums in another order; the interpreter also truncates float32 ->
    bfloat16 where the GPU rounds to nearest even), float32 to 1e-5. Low-rank factors in float16 / float32 (the
    interpreter's bfloat16 dot is wrong)."""
    torch.manual_seed(0)
    N, K = 40, 512
    q, scales = qz.quantize_int4(torch.randn(N, K) * torch.logspace(-2, 1, K), group, dtype)
    qw = qz.pack_int4(q)
    lr_dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    down = torch.randn(K, rank, dtype=lr_dtype) * 0.3 if rank else None
    up = torch.randn(N, rank, dtype=lr_dtype) if rank else None
    smooth = torch.rand(K, dtype=dtype) + 0.5 if smoothed else None
    got = dequant_w4(qw, scales, dtype, group, down, up, smooth, scratch=False)
    expected = ref.w4_dequant_ref(qw, scales, dtype, group, down, up, smooth)
    assert got.dtype == dtype and got.shape == (N, K)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    else:
        assert ((got.float() - expected.float()).abs() <= torch.finfo(dtype).eps * expected.float().abs()).all()
    if rank:  # the low-rank term is there (a mutation dropping it fails)
        assert relative_error(got, ref.w4_dequant_ref(qw, scales, dtype, group, None, None, smooth)) > 0.1


def test_dequant_w4_bad_inputs():
    q, scales = qz.quantize_int4(torch.randn(32, 256), 64, torch.float16)
    qw = qz.pack_int4(q)
    with pytest.raises(ValueError, match="wscales"):
        dequant_w4(qw, scales[:, 1:], torch.float16)
    with pytest.raises(ValueError, match="come together"):
        dequant_w4(qw, scales, torch.float16, lora_down=torch.zeros(256, 8))
    with pytest.raises(ValueError, match="low-rank factors"):
        dequant_w4(qw, scales, torch.float16, lora_down=torch.zeros(128, 8), lora_up=torch.zeros(32, 8))
    with pytest.raises(ValueError, match="smooth"):
        dequant_w4(qw, scales, torch.float16, smooth=torch.ones(255))
    with pytest.raises(ValueError, match="BK"):
        dequant_w4(qw, scales, torch.float16, config=(16, 96, 4))


@pytest.mark.parametrize("rank,smoothed", [(0, False), (16, True)])
def test_dequant_w4_fp8(rank, smoothed):
    """Reconstruction straight to fp8 with a per-row scale: the codes of e4m3(clamp(W * row_scale)) of the float32
    reference W (at most one code step apart where the kernel's float32 sums round differently)."""
    torch.manual_seed(0)
    N, K = 40, 512
    q, scales = qz.quantize_int4(torch.randn(N, K) * torch.logspace(-2, 1, K), 64, torch.float32)
    qw = qz.pack_int4(q)
    down = torch.randn(K, rank) * 0.3 if rank else None
    up = torch.randn(N, rank) if rank else None
    smooth = torch.rand(K) + 0.5 if smoothed else None
    w = ref.w4_dequant_ref(qw, scales, torch.float32, 64, down, up, smooth)
    row_scale = 448 / w.abs().amax(dim=1)
    got = dequant_w4(qw, scales, torch.float8_e4m3fn, 64, down, up, scratch=False, row_scale=row_scale,
                     inv_smooth=None if smooth is None else 1 / smooth)
    expected = (w * row_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (N, K)
    codes_apart = fp8_steps_apart(got, expected)
    assert codes_apart.max() <= 1 and codes_apart.float().mean() < 1e-3
    if not rank:
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    with pytest.raises(ValueError, match="row_scale"):
        dequant_w4(qw, scales, torch.float8_e4m3fn, 64, scratch=False)
    with pytest.raises(ValueError, match="row_scale"):
        dequant_w4(qw, scales, torch.float32, 64, scratch=False, row_scale=row_scale)
    with pytest.raises(ValueError, match="not both"):
        dequant_w4(qw, scales, torch.float32, 64, smooth=torch.ones(K), inv_smooth=torch.ones(K), scratch=False)
    with pytest.raises(ValueError, match="float32"):
        dequant_w4(qw, scales, torch.float32, 64, inv_smooth=torch.ones(K, dtype=torch.float16), scratch=False)


# --------------------------------------------------------------------------------------------------
# GPU: FLUX widths in bf16 / fp8
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,k,group", [(3000, 3072, 64), (1000, 12288, 128)])
def test_gpu_dequant_w4(n, k, group):
    """The weight reconstruction at FLUX widths (N not a multiple of the tile, both group sizes): bfloat16 within
    one ulp of the float32 reference (plus the float32 rounding of the terms where they nearly cancel), fp8 at most
    one code apart (float32 sums in another order)."""
    torch.manual_seed(0)
    q, scales = qz.quantize_int4(torch.randn(n, k, device="cuda") * torch.logspace(-2, 1, k, device="cuda"), group,
                                 torch.bfloat16)
    qw = qz.pack_int4(q)
    down = torch.randn(k, 32, device="cuda", dtype=torch.bfloat16) * 0.3
    up = torch.randn(n, 32, device="cuda", dtype=torch.bfloat16)
    smooth = torch.rand(k, device="cuda") + 0.5
    w = ref.w4_dequant_ref(qw, scales, torch.float32, group, down, up, smooth)
    got = dequant_w4(qw, scales, torch.bfloat16, group, down, up, smooth, scratch=False)
    expected = ref.w4_dequant_ref(qw, scales, torch.bfloat16, group, down, up, smooth)
    tolerance = torch.finfo(torch.bfloat16).eps * expected.float().abs() + 1e-6 * w.abs().max()  # + float32 sums
    assert ((got.float() - expected.float()).abs() <= tolerance).all()  # (near-cancelling sums: absolute)
    row_scale = 448 / w.abs().amax(dim=1)
    got8 = dequant_w4(qw, scales, torch.float8_e4m3fn, group, down, up, scratch=False, row_scale=row_scale,
                      inv_smooth=1 / smooth)
    expected8 = (w * row_scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    codes_apart = fp8_steps_apart(got8, expected8)
    assert codes_apart.max() <= 1 and codes_apart.float().mean() < 1e-3
