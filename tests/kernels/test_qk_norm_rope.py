"""FLUX's Q / K preparation for FlashAttention-3 in one kernel (quantduo.kernels.qk_norm_rope) vs the eager modules:
PyTorch's RMSNorm (FLUX's attention in diffusers) or diffusers' own, diffusers' rotary embedding, then the per-head
E4M3 quantization by a static bound."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from quantduo.formats.attention_fp8 import E4M3_MAX, quantize_heads_e4m3, rms_norm_rope_e4m3_ref
from quantduo.formats.fp8 import fp8_steps_apart
from quantduo.kernels.qk_norm_rope import rms_norm_rope_e4m3
from tests.kernels.compiled import assert_compiled_matches_eager

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)

EPS = 1e-6


def _norm(d, dtype, seed, device="cpu", kind="torch"):
    """PyTorch's ``torch.nn.RMSNorm`` (``kind="torch"``) or diffusers' ``RMSNorm`` (``"diffusers"``), weights in
    [0.25, 1.75)."""
    norm = (torch.nn.RMSNorm(d, eps=EPS) if kind == "torch" else RMSNorm(d, eps=EPS)).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.25)
    return norm


def _rope(text, image_side, d, device="cpu"):
    """FLUX's rotary tables for ``text`` text tokens and an ``image_side``^2 image (ids as the pipeline makes them)."""
    rows, cols = torch.meshgrid(torch.arange(image_side), torch.arange(image_side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    ids = torch.cat([torch.zeros(text, 3), img_ids])
    axes = [d // 8, 7 * d // 16, 7 * d // 16]
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=axes)(ids)
    return cos.to(device), sin.to(device)


def _projections(b, s, h, d, dtype, seed, device="cpu", fused=False):
    """q-like ``[b, s, h, d]``: a view of a wider QKV projection output when ``fused`` (row stride 3 h d)."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * h * d if fused else h * d
    flat = (torch.randn(b, s, width, generator=g) * 3).to(dtype).to(device)
    flat[..., 5] *= 20  # an outlier channel
    return flat[..., : h * d].unflatten(-1, (h, d))


def _assert_codes_close(got: torch.Tensor, want: torch.Tensor):
    """E4M3 codes within one step of the chain's, but where the rotation cancels (``x cos - y sin`` near 0, whose
    inputs may differ by one 16-bit rounding of the normalized row): there the codes are small and several steps
    may lie within that rounding, so those few (< 1e-5 of them) only need to agree within one bf16 step of the
    largest code (448 / 2**8)."""
    apart = fp8_steps_apart(got, want)
    assert apart.float().mean() < 0.005
    far = apart > 1
    assert far.float().mean() < 1e-5
    assert ((got.float() - want.float())[far].abs() <= E4M3_MAX * 2.0 ** -8).all()


def _diffusers_codes(parts, norms, cos, sin, bound):
    """The documented chain by the eager modules: RMSNorm per stream, text first, rotary, static-bound E4M3."""
    y = torch.cat([norm(x) for x, norm in zip(parts, norms)], dim=1)
    if cos is not None:
        y = apply_rotary_emb(y, (cos, sin), sequence_dim=1)
    return quantize_heads_e4m3(y, bound)[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["torch", "diffusers"])
@pytest.mark.parametrize("joint,rope,fused", [(True, True, False), (False, True, True), (True, False, True),
                                              (False, False, False)])
def test_codes_match_eager_modules(dtype, kind, joint, rope, fused):
    """Joint (text + image rows, each stream its own norm weight) and single-stream calls, with and without the
    rotary embedding, contiguous and strided (fused QKV) inputs, PyTorch's and diffusers' RMSNorm (their 16-bit
    roundings differ): the reference equals the eager chain, the kernel is within one E4M3 step of it (float32
    summation order) and mostly equal."""
    d, h, text, side = 64, 3, 5, 4
    image = _projections(2, side * side, h, d, dtype, seed=1, fused=fused)
    txt = _projections(2, text, h, d, dtype, seed=2, fused=fused)
    parts = [txt, image] if joint else [image]
    norms = [_norm(d, dtype, seed=3 + i, kind=kind) for i in range(len(parts))]
    cos, sin = _rope(text if joint else 0, side, d) if rope else (None, None)
    bound = 12.0
    want = _diffusers_codes(parts, norms, cos, sin, bound)
    kwargs = dict(cos=cos, sin=sin, round_before_weight=kind == "diffusers")
    if joint:
        kwargs.update(x1=image, w1=norms[1].weight)
    ref = rms_norm_rope_e4m3_ref(parts[0], norms[0].weight, EPS, bound, **kwargs)
    got = rms_norm_rope_e4m3(parts[0], norms[0].weight, EPS, bound, **kwargs)
    assert got.dtype == torch.float8_e4m3fn and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(ref.view(torch.uint8), want.view(torch.uint8))
    _assert_codes_close(got, want)


def test_bound_saturates_and_scales():
    """Codes are the rotated rows times 448 / bound: a bound twice as large halves them, values past it saturate."""
    x = _projections(1, 6, 2, 32, torch.float32, seed=4)
    w = torch.ones(32)
    loose = rms_norm_rope_e4m3(x, w, EPS, 64.0).float()
    tight = rms_norm_rope_e4m3(x, w, EPS, 32.0).float()
    assert torch.allclose(tight, (loose * 2).to(torch.float8_e4m3fn).float())
    clipped = rms_norm_rope_e4m3(x, w, EPS, 0.5).float()
    assert clipped.abs().max() == 448.0 and not clipped.isnan().any()


def test_bad_inputs_are_refused():
    x = _projections(1, 4, 2, 32, torch.float32, seed=5)
    w = torch.ones(32)
    with pytest.raises(ValueError, match="bound"):
        rms_norm_rope_e4m3(x, w, EPS, 0.0)
    with pytest.raises(ValueError, match="weights"):
        rms_norm_rope_e4m3(x, torch.ones(16), EPS, 1.0)
    with pytest.raises(ValueError, match="cos / sin"):
        rms_norm_rope_e4m3(x, w, EPS, 1.0, cos=torch.ones(3, 32), sin=torch.ones(3, 32))
    with pytest.raises(ValueError, match="both"):
        rms_norm_rope_e4m3(x, w, EPS, 1.0, cos=torch.ones(4, 32))
    with pytest.raises(ValueError, match="equal B, H, D"):
        rms_norm_rope_e4m3(x, w, EPS, 1.0, x1=_projections(1, 4, 3, 32, torch.float32, seed=6), w1=w)
    huge = torch.zeros(1, 1, 1, 32).expand(2 ** 16, 2 ** 10, 32, 32)  # 2**31 head rows, no memory behind them
    with pytest.raises(ValueError, match="2\\*\\*31"):
        rms_norm_rope_e4m3(huge, w, EPS, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        rms_norm_rope_e4m3(_projections(1, 4, 2, 24, torch.float32, seed=7), torch.ones(24), EPS, 1.0)


def test_compiled_call_is_one_graph():
    """Under torch.compile the kernel is one operator (its fake gives the output's shape): fullgraph, the eager
    codes."""
    x0, x1 = (_projections(1, s, 2, 32, torch.float32, seed=s) for s in (3, 5))
    w0, w1 = torch.rand(32) + 0.5, torch.rand(32) + 0.5
    cos, sin = torch.rand(8, 32), torch.rand(8, 32)

    def prepare(x0, x1):
        return (rms_norm_rope_e4m3(x0, w0, EPS, 9.0, x1, w1, cos, sin),)
    assert_compiled_matches_eager(prepare, x0, x1)


@pytest.mark.gpu
def test_gpu_flux_shape_bf16():
    """FLUX.1 at 1024x1024 (512 text + 4096 image tokens, 24 heads of 128), bf16, fused-QKV strides, PyTorch's
    RMSNorm (diffusers' FLUX attention)."""
    d, h, text, side = 128, 24, 512, 64
    image = _projections(1, side * side, h, d, torch.bfloat16, seed=8, device="cuda", fused=True)
    txt = _projections(1, text, h, d, torch.bfloat16, seed=9, device="cuda")
    norms = [_norm(d, torch.bfloat16, seed=10 + i, device="cuda") for i in range(2)]
    cos, sin = _rope(text, side, d, device="cuda")
    want = _diffusers_codes([txt, image], norms, cos, sin, 40.0)
    got = rms_norm_rope_e4m3(txt, norms[0].weight, EPS, 40.0, image, norms[1].weight, cos, sin)
    _assert_codes_close(got, want)
