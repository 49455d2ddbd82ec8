"""FP8 execution of INT4 SVDQuant layers (quantduo.svdquant.fp8_execution, quantduo.kernels.fp8_linear).

On CPU the Triton kernels run in the interpreter (tests/conftest.py); the fp8 GEMM is emulated in float32 there
(``fp8_rowwise_gemm``), on CUDA it is ``torch._scaled_mm``. Outputs are poisoned before each kernel.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quantduo.integrations.lora import attach_lora
from quantduo.formats import reference as ref
from quantduo.kernels.dequant_w4 import dequant_w4
from quantduo.kernels.fp8_linear import quantize_fp8_per_token, quantize_fp8_per_token_ref
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant import hopper_formats as hf
from quantduo.formats import quantizers as qz
from quantduo.svdquant.fp8_execution import SVDQuantFP8Linear, to_fp8_execution
from quantduo.utils import relative_error


pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


def _int4_module(k, n, act_format, rank=16, dtype=torch.float32, device="cpu", seed=0, smoothed=True):
    """A random INT4 SVDQuantLinear with smoothing, low-rank branch, bias (and a shift for uint4)."""
    g = torch.Generator().manual_seed(seed)
    m = SVDQuantLinear(k, n, rank=rank, act_format=act_format, dtype=dtype, device=device)
    with torch.no_grad():
        q, sc = qz.quantize_int4(torch.randn(n, m.padded_in_features, generator=g).to(device), 64, dtype)
        m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(sc)
        if smoothed:
            m.smooth_factor.copy_(torch.rand(m.padded_in_features, generator=g) + 0.5)
        m.proj_down.copy_(torch.randn(m.padded_in_features, rank, generator=g) * 0.1)
        m.proj_up.copy_(torch.randn(n, rank, generator=g) * 0.3)
        m.bias.copy_(torch.randn(n, generator=g))
        if act_format == "uint4":
            m.act_shift.fill_(0.17)
    return m


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [192, 256, 1000])
def test_quantize_fp8_per_token(dtype, k):
    """The row kernel gives the reference's scales and codes bit for bit, zero rows included (scale 1), with
    outlier channels and rows of very different magnitude."""
    torch.manual_seed(0)
    x = (torch.randn(7, k) * torch.logspace(-3, 2, 7)[:, None]).to(dtype)
    x[:, 5] *= 50
    x[3] = 0
    q, scale = quantize_fp8_per_token(x)
    q_ref, scale_ref = quantize_fp8_per_token_ref(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref) and scale[3] == 1
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert q.float().abs().amax(dim=1)[torch.arange(7) != 3].eq(448).all()  # every nonzero row uses the range
    deq = q.float() * scale[:, None]
    assert relative_error(deq, x.float()) < 0.04  # 3 mantissa bits


def _fp8_ordinal(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes as signed step counts from zero (sign-magnitude -> integer; -0 and +0 both 0)."""
    b = q.view(torch.uint8).int()
    return torch.where(b >= 128, -(b - 128), b)


@pytest.mark.parametrize("kx,kg", [(0, 320), (128, 512), (100, 60)])
def test_quantize_fp8_per_token_gelu(kx, kg):
    """Rows of cat(x, gelu_tanh(h)) formed inside the row kernel: the reference's scales (to float32 rounding of the
    GELU's tanh) and codes (at most one step apart, rarely)."""
    torch.manual_seed(1)
    x = torch.randn(9, kx) * 3 if kx else None
    h = torch.randn(9, kg) * 4
    h[2] = -30  # GELU(-30) = 0: a row of zeros in the GELU part
    q, scale = quantize_fp8_per_token(x, h)
    q_ref, scale_ref = quantize_fp8_per_token_ref(x, h)
    assert q.shape == (9, kx + kg) and q.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    codes_apart = (_fp8_ordinal(q) - _fp8_ordinal(q_ref)).abs()  # -0 and +0 (GELU of very negative inputs) alike
    assert codes_apart.max() <= 1 and codes_apart.float().mean() < 1e-2
    expected = torch.cat([t for t in (x, nn.functional.gelu(h, approximate="tanh")) if t is not None], dim=1)
    assert relative_error(q.float() * scale[:, None], expected) < 0.04


def test_quantize_fp8_per_token_bad_input():
    with pytest.raises(ValueError, match="2-D row-major"):
        quantize_fp8_per_token(torch.randn(4, 64).t())
    with pytest.raises(ValueError, match="2-D row-major"):
        quantize_fp8_per_token(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="2-D row-major"):
        quantize_fp8_per_token(torch.randn(4, 64), torch.randn(64, 4).t())
    with pytest.raises(ValueError, match="same rows"):
        quantize_fp8_per_token(torch.randn(4, 64), torch.randn(5, 64))
    with pytest.raises(ValueError, match="give x, gelu_input"):
        quantize_fp8_per_token(None)


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
    codes_apart = (got.view(torch.uint8).int() - expected.view(torch.uint8).int()).abs()
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


@pytest.mark.parametrize("act_format,smoothed", [("int4", True), ("uint4", True), ("none", True), ("none", False)])
def test_to_fp8_execution(act_format, smoothed):
    """The converted layer keeps the INT4 weights; its reference is fp8_tok(x) @ fp8_chan(W)^T + bias with W the
    layer's 16-bit-activation weight, close to the 16-bit-activation layer (3-mantissa-bit operands), and its
    kernel path (80 rows > 64: row kernel + fp8 expansion + fp8 GEMM) matches the reference."""
    m = _int4_module(100, 48, act_format, smoothed=smoothed)
    m8 = to_fp8_execution(m)
    assert isinstance(m8, SVDQuantFP8Linear) and torch.equal(m8.qweight, m.qweight) and m8.act_format == "fp8"
    assert m8.smoothing_folded_out == (not smoothed)
    a16 = m if act_format == "none" else hf.to_w4a16(m)
    x = torch.randn(2, 40, 100) * 3
    y_ref = m8.forward_reference(x)
    assert y_ref.shape == (2, 40, 48)
    err_vs_a16 = relative_error(y_ref, a16.forward_reference(x))
    assert 1e-3 < err_vs_a16 < 0.05  # fp8 rounding is there, and small
    # the same product written out: per-token codes times per-channel codes
    xq, xs = hf.quantize_fp8_tokens(nn.functional.pad(x.reshape(-1, 100), (0, 28)))
    w = m8.reconstructed_weight()
    wq = (w / m8.wscale_fp8[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    explicit = (xq.float() @ wq.T) * xs[:, None] * m8.wscale_fp8 + m8.bias
    assert relative_error(y_ref.reshape(-1, 48), explicit) < 1e-3
    m8.backend = "triton"
    assert relative_error(m8(x), y_ref) < 5e-3
    few = x[:1, :9]  # 9 rows: the W4A16 kernels, 16-bit activations
    assert relative_error(m8(few), a16.forward_reference(few)) < 2e-3


def test_forward_gelu():
    """``forward_gelu(h, prefix)`` is the layer applied to cat(prefix, gelu_tanh(h)): through the kernels (80 rows:
    GELU and concatenation in the row kernel), as the torch fallback (reference backend, few tokens) and without
    a prefix; widths that do not add up are rejected."""
    m8 = to_fp8_execution(_int4_module(192, 48, "int4"))
    h, prefix = torch.randn(2, 40, 128) * 3, torch.randn(2, 40, 64)
    x = torch.cat([prefix, nn.functional.gelu(h, approximate="tanh")], dim=-1)
    expected = m8.forward_reference(x)
    assert torch.equal(m8.forward_gelu(h, prefix), expected)  # backend "auto" on the CPU: the reference
    m8.backend = "triton"
    assert relative_error(m8.forward_gelu(h, prefix), expected) < 5e-3
    assert torch.equal(m8.forward_gelu(h[:1, :9], prefix[:1, :9]), m8(x[:1, :9]))  # 9 tokens: W4A16 kernels
    no_prefix = to_fp8_execution(_int4_module(128, 48, "none"))
    no_prefix.backend = "triton"
    y = no_prefix.forward_gelu(h)
    assert relative_error(y, no_prefix.forward_reference(nn.functional.gelu(h, approximate="tanh"))) < 5e-3
    with pytest.raises(ValueError, match="192 input channels"):
        m8.forward_gelu(h)
    with pytest.raises(ValueError, match="192 input channels"):
        m8.forward_gelu(h, prefix[:, :10])


def test_fp8_execution_is_not_saved(tmp_path):
    """Saving refuses a model in fp8 execution (not a storage format) before writing anything."""
    from quantduo.svdquant import SVDQuantConfig, save_quantized

    model = nn.Sequential(to_fp8_execution(_int4_module(128, 32, "int4")))
    with pytest.raises(ValueError, match="fp8 execution"):
        save_quantized(model, tmp_path / "ckpt", SVDQuantConfig())
    assert not (tmp_path / "ckpt").exists()


def test_to_fp8_execution_bad_input():
    with pytest.raises(ValueError, match="INT4 SVDQuantLinear"):
        to_fp8_execution(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="nvfp4"):
        to_fp8_execution(SVDQuantLinear(64, 32, weight_format="nvfp4", act_format="nvfp4"))


def test_fp8_scale_follows_lora():
    """Attaching a LoRA extends the low-rank branch and recomputes the per-channel fp8 scale: the output then
    matches the reference of the new weight (stale scales would clip the LoRA's larger weights)."""
    model = nn.Sequential(to_fp8_execution(_int4_module(128, 32, "none", rank=8)))
    layer = model[0]
    before = layer.wscale_fp8.clone()
    a = torch.randn(4, 128) * 0.5
    b = torch.randn(32, 4) * 5
    attach_lora(model, {"0.lora_A.weight": a, "0.lora_B.weight": b}, "big")
    assert layer.rank == 12 and not torch.equal(layer.wscale_fp8, before)
    amax = layer.reconstructed_weight().abs().amax(dim=1)
    torch.testing.assert_close(layer.wscale_fp8, amax / 448)
    layer.backend = "triton"
    x = torch.randn(80, 128)
    assert relative_error(layer(x), layer.forward_reference(x)) < 5e-3


# --------------------------------------------------------------------------------------------------
# GPU: FLUX shapes in bf16, and torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (12288, 3072), (3072, 12288)])
def test_gpu_fp8_execution(n, k):
    """Both accumulations against the float32 reference; fast accumulation is on by default, differs from the
    precise one and stays within its ~1e-3 (precise: float32 promotion along K)."""
    m8 = to_fp8_execution(_int4_module(k, n, "int4", rank=32, dtype=torch.bfloat16, device="cuda"))
    precise = to_fp8_execution(_int4_module(k, n, "int4", rank=32, dtype=torch.bfloat16, device="cuda"), False)
    a16 = hf.to_w4a16(_int4_module(k, n, "int4", rank=32, dtype=torch.bfloat16, device="cuda"))
    assert m8.fast_accum and not precise.fast_accum
    for tokens in (16, 300, 4608):
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        expected = a16.forward_reference(x) if tokens <= 64 else m8.forward_reference(x)  # few tokens: W4A16
        assert relative_error(precise(x), expected) < 5e-3
        assert relative_error(m8(x), expected) < 8e-3
        if tokens > 64:
            assert not torch.equal(m8(x), precise(x))


@pytest.mark.gpu
def test_gpu_fp8_execution_compiled():
    """Under torch.compile (activation quantization fused by Inductor into the LayerNorm before it, which may skip
    the LayerNorm's bf16 rounding, so a few fp8 codes differ) the layer is as accurate as eager: both against the
    same layer with unquantized activations."""
    m = _int4_module(3072, 3072, "int4", rank=32, dtype=torch.bfloat16, device="cuda")
    norm = nn.LayerNorm(3072, device="cuda", dtype=torch.bfloat16)
    model = nn.Sequential(norm, to_fp8_execution(m)).requires_grad_(False)
    x = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # inference: the fp8 ops have no backward
        eager = model(x)
        compiled = torch.compile(model)(x)
        exact = hf.to_w4a16(m).forward_reference(nn.functional.layer_norm(x.float(), (3072,)))
    err_eager, err_compiled = relative_error(eager, exact), relative_error(compiled, exact)
    assert 1e-3 < err_compiled < 1.2 * err_eager and err_eager < 0.05, (err_eager, err_compiled)


@pytest.mark.gpu
def test_gpu_forward_gelu_compiled():
    """A FLUX single block's proj_out (3072 + 12288 -> 3072) fed by forward_gelu, eager and compiled (the row
    kernel as one custom op: the same result), against the reference of the materialized input."""
    m8 = to_fp8_execution(_int4_module(15360, 3072, "int4", rank=32, dtype=torch.bfloat16, device="cuda"))
    h = torch.randn(4608, 12288, device="cuda", dtype=torch.bfloat16) * 2
    attn = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = m8.forward_reference(torch.cat([attn.float(), nn.functional.gelu(h.float(), approximate="tanh")], 1))
        eager = m8.forward_gelu(h, attn)
        compiled = torch.compile(lambda a, b: m8.forward_gelu(a, b))(h, attn)
    assert relative_error(eager, expected) < 5e-3
    assert relative_error(compiled, eager) < 1e-3
