"""A DiT block's adaLN straight to per-token fp8 codes (quantduo.kernels.layer_norm_fp8) vs diffusers' own modules:
``AdaLayerNormZeroSingle`` (FLUX single blocks: text and image rows normalized together) and ``AdaLayerNormZero``
(double blocks, one stream), then the per-token quantization of the layers that read their output."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle

from quantduo.formats.attention_fp8 import E4M3_MAX
from quantduo.formats.fp8 import fp8_steps_apart, layer_norm_modulate_fp8_ref, quantize_fp8_per_token_ref
from quantduo.kernels.layer_norm_fp8 import gated_residual_layer_norm_fp8, layer_norm_modulate_fp8
from tests.kernels.compiled import assert_compiled_matches_eager

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)

EPS = 1e-6  # diffusers' adaLN LayerNorms


def _norm(cls, k, dtype, seed, device="cpu"):
    """diffusers' adaLN module with random modulation weights large enough that shift and scale matter."""
    torch.manual_seed(seed)
    norm = cls(k)
    with torch.no_grad():
        norm.linear.weight.normal_(0, 0.5)
        norm.linear.bias.normal_(0, 0.5)
    return norm.to(device=device, dtype=dtype)


def _rows(b, s, k, dtype, seed, device="cpu", wide=False):
    """``[b, s, k]`` with a per-row offset and an outlier channel; a view of ``[b, s, 2 k]`` when ``wide``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, 2 * k if wide else k, generator=g) * 2 + torch.randn(b, s, 1, generator=g) * 3
    x[..., 3] *= 30
    return x.to(device=device, dtype=dtype)[..., :k]


def _close(got, want, dtype):
    """Codes mostly equal, within one E4M3 step: the rows' statistics round differently (PyTorch's layer_norm, its
    ``rsqrt``, vs the kernel's float32 sums), which moves a 16-bit rounding of the normalized row now and then. Where
    the modulation's sum cancels (``n * (1 + scale)`` near ``-shift``) one such move spans several E4M3 steps of the
    small result, so those few (< 1e-5 of the codes) need only agree within one bf16 step of the largest code
    (448 / 2**8). On the CPU, the eager chain against itself with ``rstd`` 1-4 float32 ulps off at the FLUX shape:
    2-7e-7 of the codes 19-46 steps apart, each within 0.44 of a code. A dropped rounding of the chain moves whole
    percents of the codes and fails the mean."""
    (codes, scale), (want_codes, want_scale) = got, want
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == want_codes.shape and codes.is_contiguous()
    apart = fp8_steps_apart(codes, want_codes)
    assert apart.float().mean() < (1e-3 if dtype == torch.float32 else 5e-3)
    far = apart > 1
    assert far.float().mean() < 1e-5
    assert ((codes.float() - want_codes.float())[far].abs() <= E4M3_MAX * 2.0 ** -8).all()
    torch.testing.assert_close(scale, want_scale, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [256, 96, 100])  # one segment; 64 + 32; 64 + 64 with 28 padded lanes
def test_single_block_norm_matches_diffusers(dtype, k):
    """Text rows then image rows normalized together, two batches with their own modulation: the kernel's codes
    are those of diffusers' ``AdaLayerNormZeroSingle`` output, and the reference's are exactly them."""
    norm = _norm(AdaLayerNormZeroSingle, k, dtype, seed=k)
    txt, img = _rows(2, 5, k, dtype, seed=1, wide=True), _rows(2, 12, k, dtype, seed=2)
    temb = torch.randn(2, k, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        out, _ = norm(torch.cat([txt, img], dim=1), emb=temb)
        shift, scale, _ = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    want = quantize_fp8_per_token_ref(out.reshape(-1, k))
    reference = layer_norm_modulate_fp8_ref(torch.cat([txt, img], dim=1), shift, scale, EPS)
    assert torch.equal(reference[0].view(torch.uint8), want[0].view(torch.uint8))
    assert torch.equal(reference[1], want[1])
    _close(layer_norm_modulate_fp8(txt, shift, scale, EPS, x1=img), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_block_norm_one_stream(dtype):
    """One stream (``AdaLayerNormZero``: shift_msa, scale_msa first of its six chunks), the text stream shorter than
    a program count would suggest."""
    k = 128
    norm = _norm(AdaLayerNormZero, k, dtype, seed=7)
    x = _rows(3, 7, k, dtype, seed=8)
    temb = torch.randn(3, k, generator=torch.Generator().manual_seed(9)).to(dtype)
    with torch.no_grad():
        out = norm(x, emb=temb)[0]
        shift, scale = norm.linear(norm.silu(temb)).chunk(6, dim=1)[:2]
    _close(layer_norm_modulate_fp8(x, shift, scale, EPS), quantize_fp8_per_token_ref(out.reshape(-1, k)), dtype)


def test_swapped_or_shared_modulation_is_seen():
    """The test can fail: shift and scale swapped, or batch 0's modulation used for batch 1, move most codes."""
    k, dtype = 64, torch.float32
    x = _rows(2, 4, k, dtype, seed=10)
    shift, scale = torch.randn(2, k) * 0.5, torch.randn(2, k) * 0.5
    want = layer_norm_modulate_fp8_ref(x, shift, scale, EPS)
    for wrong in (layer_norm_modulate_fp8(x, scale, shift, EPS),
                  layer_norm_modulate_fp8(x, shift[:1].expand(2, k), scale[:1].expand(2, k), EPS)):
        assert fp8_steps_apart(wrong[0], want[0]).float().mean() > 0.2


def test_zero_rows_and_bad_input():
    k = 64
    x, mod = torch.zeros(1, 3, k), torch.zeros(1, k)
    codes, scale = layer_norm_modulate_fp8(x, mod, mod, EPS)
    assert torch.equal(scale, torch.ones(3)) and not codes.float().any()  # an all-zero row: scale 1, codes 0
    with pytest.raises(ValueError, match="x0 / x1"):
        layer_norm_modulate_fp8(x, mod, mod, EPS, x1=torch.zeros(2, 3, k))
    with pytest.raises(ValueError, match="x0 / x1"):
        layer_norm_modulate_fp8(x.transpose(1, 2), mod, mod, EPS)
    with pytest.raises(ValueError, match="shift"):
        layer_norm_modulate_fp8(x, torch.zeros(1, k + 1), mod, EPS)
    with pytest.raises(ValueError, match="scale"):
        layer_norm_modulate_fp8(x, mod, mod.half(), EPS)
    huge = torch.zeros(1, 1, k).expand(2 ** 16, 2 ** 15, k)  # 2**31 rows, no memory behind them
    with pytest.raises(ValueError, match="2\\*\\*31"):
        layer_norm_modulate_fp8(huge, mod.expand(2 ** 16, k), mod.expand(2 ** 16, k), EPS)


def test_compiled_call_is_one_graph():
    """Under torch.compile the kernel is one operator (its fake gives the outputs' shapes): the eager codes."""
    x0, x1 = _rows(2, 3, 64, torch.float32, seed=11), _rows(2, 5, 64, torch.float32, seed=12)
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)

    def prepare(x0, x1):
        return layer_norm_modulate_fp8(x0, shift, scale, EPS, x1=x1)
    assert_compiled_matches_eager(prepare, x0, x1)


@pytest.mark.gpu
def test_gpu_flux_single_block_shape():
    """FLUX.1's single block at 1024x1024: 512 text + 4096 image rows of 3072 (2048 + 1024), bf16."""
    k, dtype = 3072, torch.bfloat16
    norm = _norm(AdaLayerNormZeroSingle, k, dtype, seed=13, device="cuda")
    txt, img = _rows(1, 512, k, dtype, seed=14, device="cuda"), _rows(1, 4096, k, dtype, seed=15, device="cuda")
    temb = torch.randn(1, k, device="cuda", dtype=dtype)
    with torch.no_grad():
        out, _ = norm(torch.cat([txt, img], dim=1), emb=temb)
        shift, scale, _ = norm.linear(norm.silu(temb)).chunk(3, dim=1)
    _close(layer_norm_modulate_fp8(txt, shift, scale, EPS, x1=img), quantize_fp8_per_token_ref(out.reshape(-1, k)),
           dtype)


def _double_block_update(b, s, k, dtype, seed, device="cpu"):
    """A FLUX double block's stream before ``norm2``: x, the attention output r (a view of a wider tensor), and
    gate / shift / scale chunks of one modulation output ``[b, 3 k]`` (batch stride 3 k)."""
    x, r = _rows(b, s, k, dtype, seed, device), _rows(b, s, k, dtype, seed + 1, device, wide=True)
    gate, shift, scale = (torch.randn(b, 3 * k, generator=torch.Generator().manual_seed(seed + 2)) * 0.7).to(
        device=device, dtype=dtype).chunk(3, dim=1)
    return x, r, gate, shift, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [128, 96])
def test_gated_residual_is_the_double_block_update_then_norm2(dtype, k):
    """The FLUX double block's ``x = x + gate_msa * attn_output`` then ``norm2(x) * (1 + scale_mlp) + shift_mlp``,
    written out as diffusers' block computes it: the kernel's updated stream is that x bit for bit, its codes those
    of the modulated norm."""
    x, r, gate, shift, scale = _double_block_update(2, 9, k, dtype, seed=20)
    norm2 = torch.nn.LayerNorm(k, elementwise_affine=False, eps=EPS)
    updated = x + gate.unsqueeze(1) * r
    want = quantize_fp8_per_token_ref((norm2(updated) * (1 + scale[:, None]) + shift[:, None]).reshape(-1, k))

    codes, qscale, got = gated_residual_layer_norm_fp8(x, r, gate, shift, scale, EPS)

    assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, updated)
    _close((codes, qscale), want, dtype)


def test_gated_residual_gate_and_residual_are_seen():
    """The test can fail: the gate of batch 0 used for batch 1, or the residual added without its gate, change the
    updated stream."""
    x, r, gate, shift, scale = _double_block_update(2, 4, 64, torch.float32, seed=30)
    want = x + gate[:, None] * r
    shared = gated_residual_layer_norm_fp8(x, r, gate[:1].expand(2, 64), shift, scale, EPS)[2]
    ungated = gated_residual_layer_norm_fp8(x, r, torch.ones_like(gate), shift, scale, EPS)[2]
    assert not torch.allclose(shared, want) and not torch.allclose(ungated, want)


def test_gated_residual_bad_input_and_compiled():
    x, r, gate, shift, scale = _double_block_update(1, 3, 64, torch.float32, seed=40)
    with pytest.raises(ValueError, match="residual"):
        gated_residual_layer_norm_fp8(x, r[:, :2], gate, shift, scale, EPS)
    with pytest.raises(ValueError, match="gate"):
        gated_residual_layer_norm_fp8(x, r, gate.half(), shift, scale, EPS)

    def update(x, r):
        return gated_residual_layer_norm_fp8(x, r, gate, shift, scale, EPS)
    assert_compiled_matches_eager(update, x, r)


@pytest.mark.gpu
def test_gpu_flux_double_block_update_shape():
    """FLUX.1's double-block image stream at 1024x1024: 4096 rows of 3072, bf16."""
    x, r, gate, shift, scale = _double_block_update(1, 4096, 3072, torch.bfloat16, seed=50, device="cuda")
    updated = x + gate.unsqueeze(1) * r
    want = layer_norm_modulate_fp8_ref(updated, shift, scale, EPS)
    codes, qscale, got = gated_residual_layer_norm_fp8(x, r, gate, shift, scale, EPS)
    assert torch.equal(got, updated)
    _close((codes, qscale), want, torch.bfloat16)
