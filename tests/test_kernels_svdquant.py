"""Triton SVDQuant kernels vs their PyTorch references.

On CPU the kernels run in the Triton interpreter (tests/conftest.py) at tiny shapes in float16/float32
(bf16 tl.dot is wrong in the interpreter); the ``gpu`` tests run the same checks in bf16 at FLUX shapes.
Outputs are poisoned (NaN / sentinel bytes) before each kernel so unwritten elements fail.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from quantduo import kernels as qk
from quantduo.kernels import reference as ref
from quantduo.kernels.act_quant import act_quant
from quantduo.kernels.gemm_w4a4 import w4_gemm
from quantduo.kernels.gemm_w4a8 import expand_w4_int8, w4a8_gemm
from quantduo.kernels.nvfp4 import nvfp4_dequant
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant import hopper_formats as hf
from quantduo.svdquant import quantizers as qz

CPU_GEMM = dict(BM=16, BN=32, GROUP_M=2, num_warps=4, num_stages=2)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """Every torch.empty the kernels allocate starts as NaN / 0x7F bytes, so unwritten outputs show."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x7F)
    monkeypatch.setattr(torch, "empty", poisoned)


def _inputs(M, N, K, r, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x = t(M, K, scale=2.0)
    x[:, 3] *= 20  # an outlier channel
    smooth = (torch.rand(K, generator=g) + 0.5).to(dtype).to(device)
    shift = (torch.rand(K, generator=g) * 0.3).to(dtype).to(device)
    return x, smooth, shift, t(K, r, scale=0.1), t(N, r, scale=0.1), t(N)


@pytest.mark.parametrize("mode", ["int4", "uint4", "int8", "none"])
@pytest.mark.parametrize("dtype,splits", [(torch.float16, 2), (torch.float32, 1)])
def test_act_quant(mode, dtype, splits):
    M, K, r = 40, 256, 16
    x, smooth, shift, ld, _, _ = _inputs(M, 8, K, r, dtype)
    q, qs, lxp = act_quant(x, smooth, shift, ld, mode, config=(16, 64, splits))
    rq, rqs, rlx = ref.act_quant_ref(x, smooth, shift, ld, mode)
    if mode != "none":
        assert torch.equal(q, rq)
        assert torch.equal(qs, rqs)
    assert lxp.shape == (splits, M, r)
    torch.testing.assert_close(lxp.sum(0), rlx, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["int4", "uint4", "none"])
@pytest.mark.parametrize("gelu", [False, True])
def test_w4_gemm(mode, gelu):
    M, N, K, r = 24, 96, 256, 16  # M, N not multiples of the tile: masked edges
    dtype = torch.float16
    x, smooth, shift, ld, lu, bias = _inputs(M, N, K, r, dtype)
    wq, ws = qz.quantize_int4(torch.randn(N, K), 64, dtype)
    qw, ws = qz.pack_int4(wq), ws.to(dtype)
    if mode == "none":
        a, a_s = x, None
        lxp = act_quant(x, smooth, None, ld, "none")[2]
    else:
        a, a_s, lxp = act_quant(x, smooth, shift, ld, mode)
    y = w4_gemm(a, a_s, qw, ws, lxp, lu, bias, mode, dtype, gelu=gelu, smooth=smooth, config=CPU_GEMM)
    y_ref = ref.w4_gemm_ref(a, a_s, qw, ws, lxp.sum(0), lu, bias, mode, dtype, gelu=gelu, smooth=smooth)
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) < 1e-3


@pytest.mark.parametrize("next_mode", ["int4", "uint4"])
def test_w4_gemm_quant_next(next_mode):
    """MLP fc1 epilogue: GELU, then fc2's smoothing, 4-bit quantization and low-rank partial sums."""
    M, N, K, r = 20, 128, 128, 16
    dtype = torch.float32  # exact epilogue arithmetic: the quantized codes must match bit for bit
    x, smooth, shift, ld, lu, bias = _inputs(M, N, K, r, dtype)
    _, smooth2, shift2, ld2, _, _ = _inputs(M, 8, N, r, dtype, seed=1)
    wq, ws = qz.quantize_int4(torch.randn(N, K), 64, dtype)
    qw = qz.pack_int4(wq)
    a, a_s, lxp = act_quant(x, smooth, shift, ld, "int4")
    q2, qs2, lx2 = w4_gemm(a, a_s, qw, ws, lxp, lu, bias, "int4", dtype, gelu=True, config=dict(CPU_GEMM, BN=64),
                           next_layer=dict(smooth=smooth2, shift=shift2, lora_down=ld2, mode=next_mode))
    h = ref.w4_gemm_ref(a, a_s, qw, ws, lxp.sum(0), lu, bias, "int4", dtype, gelu=True)
    rq, rqs, rlx = ref.quant_next_ref(h, smooth2, shift2, ld2, next_mode)
    codes = qz.unpack_int4 if next_mode == "int4" else qz.unpack_uint4
    assert (codes(q2).int() - codes(rq).int()).abs().max() <= 1  # GELU's tanh may differ in the last ulp
    assert (codes(q2) != codes(rq)).float().mean() < 0.01
    torch.testing.assert_close(qs2, rqs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lx2[0], rlx, rtol=1e-4, atol=1e-3)


def test_w4a8_expand_and_gemm():
    M, N, K, r = 24, 96, 256, 16
    dtype = torch.float16
    x, smooth, _, ld, lu, bias = _inputs(M, N, K, r, dtype)
    q8, mult, row = hf.quantize_int4_int8exact(torch.randn(N, K))
    qw = qz.pack_int4(q8)
    expanded = expand_w4_int8(qw, mult)
    assert torch.equal(expanded, ref.w4_to_int8_ref(qw, mult))
    a, a_s, lxp = act_quant(x, smooth, None, ld, "int8")
    y_ref = ref.w4a8_gemm_ref(a, a_s, qw, mult, row, lxp.sum(0), lu, bias, dtype, gelu=True)
    for w in (qw, expanded):
        y = w4a8_gemm(a, a_s, w, mult, row, lxp, lu, bias, dtype, gelu=True,
                      config=dict(BM=16, BN=32, BK=128, GROUP_M=2, num_warps=4, num_stages=2))
        assert rel(y, y_ref) < 1e-3


def test_nvfp4_dequant():
    codes, scales, gs = qz.quantize_nvfp4(torch.randn(40, 96))
    qw = qz.pack_nibbles(codes)
    assert torch.equal(nvfp4_dequant(qw, scales, gs), ref.nvfp4_dequant_ref(qw, scales, gs))


def _random_module(k, n, act_format, weight_format="int4", rank=16, dtype=torch.float16, device="cpu"):
    m = SVDQuantLinear(k, n, rank=rank, act_format=act_format, weight_format=weight_format, dtype=dtype,
                       device=device)
    kp = m.padded_in_features
    with torch.no_grad():
        w = torch.randn(n, kp, device=device)
        if weight_format == "nvfp4":
            codes, sc, gs = qz.quantize_nvfp4(w)
            m.qweight.copy_(qz.pack_nibbles(codes)); m.wscales.copy_(sc); m.wscale_global.copy_(gs)
        else:
            q, sc = qz.quantize_int4(w, 64, dtype)
            m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(sc)
        m.smooth_factor.uniform_(0.5, 1.5)
        if act_format == "uint4":
            m.act_shift.fill_(0.17)
        m.lora_down.normal_(0, 0.1); m.lora_up.normal_(0, 0.1); m.bias.normal_()
    return m


@pytest.mark.parametrize("act_format,weight_format", [("int4", "int4"), ("uint4", "int4"), ("none", "int4"),
                                                      ("nvfp4", "nvfp4")])
def test_module_forward(act_format, weight_format):
    """svdquant_linear_forward == forward_reference, with leading dims and padded in_features (100 -> 128)."""
    m = _random_module(100, 48, act_format, weight_format)
    m.backend = "triton"
    x = torch.randn(2, 9, 100, dtype=torch.float16)
    y = m(x)
    assert y.shape == (2, 9, 48)
    assert rel(y, m.forward_reference(x)) < 2e-3


def test_mlp_forward():
    fc1, fc2 = _random_module(64, 128, "int4"), _random_module(128, 64, "uint4")
    x = torch.randn(3, 7, 64, dtype=torch.float16)
    y = qk.svdquant_mlp_forward(fc1, fc2, x)
    y_ref = fc2.forward_reference(F.gelu(fc1.forward_reference(x).float(), approximate="tanh").to(x.dtype))
    assert y.shape == (3, 7, 64)
    assert rel(y, y_ref) < 2e-2  # a few 4-bit codes of fc2's input may flip on GELU's last ulp


def test_w4a8_module_and_converter():
    """to_w4a8 keeps the function (within W4A8 quantization error); its kernels match its reference."""
    torch.manual_seed(0)
    m = _random_module(128, 64, "uint4", dtype=torch.float32)
    m8 = hf.to_w4a8(m)
    x = torch.rand(33, 128) * 2 - 0.1
    assert m8.storage_bits_per_weight() < m.storage_bits_per_weight()
    assert rel(m8.forward_reference(x), m.forward_reference(x)) < 0.1
    m8.backend = "triton"
    for expand in (False, True):
        assert rel(qk.w4a8_linear_forward(m8, x, expand=expand), m8.forward_reference(x)) < 1e-5
    assert rel(m8(x), m8.forward_reference(x)) < 1e-5


def test_int8exact_quantizer():
    r = torch.randn(16, 256) * torch.logspace(-2, 1, 256)
    q, mult, row = hf.quantize_int4_int8exact(r)
    assert q.abs().max() <= 7 and mult.min() >= 1 and mult.max() <= hf.MULT_MAX
    assert (q.int() * mult.int().repeat_interleave(64, 1)).abs().max() <= 127
    err = rel(hf.dequantize_int4_int8exact(q, mult, row), r)
    err_std = rel(qz.fake_quant(r, "int4", 64), r)
    assert err < 1.5 * err_std


# --------------------------------------------------------------------------------------------------
# GPU: the same checks in bf16 at FLUX shapes
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (12288, 3072), (3072, 12288)])
@pytest.mark.parametrize("tokens", [16, 300, 4608])
def test_gpu_forward_bf16(n, k, tokens):
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    for fmt in ("int4", "uint4", "none"):
        m = _random_module(k, n, fmt, rank=0 if fmt == "none" else 32, dtype=torch.bfloat16, device="cuda")
        assert rel(qk.svdquant_linear_forward(m, x), m.forward_reference(x)) < 5e-3
    m8 = hf.to_w4a8(_random_module(k, n, "int4", rank=32, dtype=torch.bfloat16, device="cuda"))
    for expand in (False, True):
        assert rel(qk.w4a8_linear_forward(m8, x, expand=expand), m8.forward_reference(x)) < 5e-3
