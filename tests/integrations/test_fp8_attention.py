"""FP8 attention: the Triton kernel (interpreter on CPU, native fp8 dots on GPU), its reference, the processor."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import quantduo.integrations.fp8_attention as fp8_module
from quantduo.formats.attention_fp8 import (E4M3_MAX, fp8_attention_heads_reference, fp8_attention_reference,
                                            quantize_blocks_e4m3)
from quantduo.integrations.fp8_attention import (NORM_BOUND_MARGIN, FP8AttentionProcessor, disable_fp8_attention,
                                                 enable_fp8_attention, fp8_attention_enabled, norm_bounds)
from quantduo.kernels.attention_fp8 import (default_warps, fp8_attention, graph_operands, quantize_blocks_e4m3_kernel,
                                           quantize_operands)
from quantduo.utils import relative_error


def _qkv(b, h, s_q, s_kv, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for s in (s_q, s_kv, s_kv))
    k = k + 2.0 * torch.randn(1, 1, 1, d, generator=g)  # a shared key offset, as DiT keys have
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def test_block_quantization_reference():
    x = torch.randn(2, 3, 37, 16) * torch.logspace(-2, 2, 37)[:, None]
    codes, scales = quantize_blocks_e4m3(x, 16)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scales.shape == (2, 3, 3)
    per_token = scales.repeat_interleave(16, -1)[..., :37, None]
    blocks = torch.nn.functional.pad(codes.float().abs(), (0, 0, 0, 11)).reshape(2, 3, 3, -1).amax(-1)
    assert torch.equal(blocks, torch.full_like(blocks, E4M3_MAX))  # each block's absmax maps onto 448
    assert relative_error(codes.float() * per_token, x) < 0.04


@pytest.mark.parametrize("token_major", [False, True])
def test_block_quant_kernel_matches_reference(token_major):
    x = torch.randn(1, 2, 40, 32).transpose(1, 2).contiguous().transpose(1, 2) * 5  # strided, as diffusers gives
    codes, scales = quantize_blocks_e4m3_kernel(x, 16, token_major=token_major)
    ref_codes, ref_scales = quantize_blocks_e4m3(x, 16)
    assert codes.shape == (1, 2, 48, 32)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(codes[:, :, :40].float(), ref_codes.float())
    assert torch.equal(codes[:, :, 40:].float(), torch.zeros(1, 2, 8, 32))


@pytest.mark.parametrize("shape", [(1, 2, 40, 40, 32, 16, 16), (2, 1, 33, 50, 16, 16, 32), (1, 1, 64, 64, 64, 32, 16)])
def test_kernel_matches_reference(shape, poison_empty):
    b, h, s_q, s_kv, d, bm, bn = shape
    q, k, v = _qkv(b, h, s_q, s_kv, d, seed=s_q)
    out = fp8_attention(q, k, v, block_m=bm, block_n=bn)
    ref = fp8_attention_reference(q, k, v, q_block=bm, kv_block=bn)
    assert out.shape == q.shape and not out.isnan().any()
    assert relative_error(out, ref) < 1e-5


def test_graph_operands_are_the_kernels_operands():
    """The PyTorch quantization a compiled graph runs gives the quantization launches' codes, scales, padding and
    memory layouts (V token-contiguous), bit for bit."""
    q, k, v = (t * 3 for t in _qkv(1, 2, 40, 50, 32, seed=3))
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided, as diffusers gives
    for got, want in zip(graph_operands(q, k, v, 16, 32), quantize_operands(q, k, v, 16, 32)):
        assert got.shape == want.shape and got.stride() == want.stride()
        assert torch.equal(got.float(), want.float())


def test_compiled_fp8_attention_is_eager(poison_empty):
    """Under torch.compile the quantization becomes graph operations and the attention one opaque op: one graph,
    the eager kernel's output."""
    q, k, v = _qkv(1, 2, 40, 50, 32, seed=4)
    compiled = torch.compile(lambda q, k, v: fp8_attention(q, k, v, block_m=16, block_n=32), fullgraph=True)
    assert relative_error(compiled(q, k, v), fp8_attention(q, k, v, block_m=16, block_n=32)) < 1e-6


def test_error_vs_exact_attention():
    q, k, v = _qkv(1, 2, 64, 64, 32)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err = relative_error(fp8_attention_reference(q, k, v, q_block=32, kv_block=32), exact)
    assert 1e-3 < err < 0.08  # fp8 rounding is visible, and bounded


def test_invalid_inputs():
    q, k, v = _qkv(1, 1, 8, 8, 16)
    with pytest.raises(ValueError, match="shapes disagree"):
        fp8_attention_reference(q, k[..., :8], v)
    with pytest.raises(ValueError, match="4-D"):
        fp8_attention(q[0], k, v)
    with pytest.raises(ValueError, match="power of two"):
        fp8_attention(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(ValueError, match="block_n"):
        fp8_attention(q, k, v, block_n=24)


def _tiny_flux(head_dim=32):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]).eval()


def _flux_inputs(img=16, txt=4):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, img, 4, generator=g), encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(img, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)


def test_processor_enable_disable_flux():
    model, inputs = _tiny_flux(), _flux_inputs()
    with torch.no_grad():
        ref = model(**inputs)[0]
        assert enable_fp8_attention(model, q_block=16, kv_block=16) == 2
        assert enable_fp8_attention(model, q_block=16, kv_block=16) == 2  # idempotent: no double wrapping
        assert isinstance(model.transformer_blocks[0].attn.processor.original, type(model.single_transformer_blocks[0].attn.processor.original))
        assert fp8_attention_enabled(model)
        out = model(**inputs)[0]
        assert disable_fp8_attention(model) == 2 and not fp8_attention_enabled(model)
        again = model(**inputs)[0]
    assert torch.equal(again, ref)
    err = relative_error(out, ref)
    assert 1e-4 < err < 0.05  # fp8 attention was used, and the output stays close


def test_compiles_without_graph_breaks_and_runs_fp8():
    """The SDPA hook is traced by torch.compile: one graph (fullgraph), the fp8 output of eager mode."""
    model, inputs = _tiny_flux(), _flux_inputs()
    sdpa = F.scaled_dot_product_attention
    with torch.no_grad():
        plain = model(**inputs)[0]
        enable_fp8_attention(model, q_block=16, kv_block=16)
        eager = model(**inputs)[0]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)[0]
        disable_fp8_attention(model)
    torch._dynamo.reset()
    assert relative_error(compiled, eager) < 1e-5
    assert relative_error(compiled, plain) > 1e-4  # fp8 attention ran inside the compiled graph
    assert F.scaled_dot_product_attention is sdpa  # untouched outside the wrapped calls


def test_hook_is_seen_only_inside_the_wrapped_call():
    sdpa, seen = F.scaled_dot_product_attention, []
    FP8AttentionProcessor(lambda: seen.append(F.scaled_dot_product_attention))()
    assert seen[0] is not sdpa and F.scaled_dot_product_attention is sdpa

    def failing():
        raise KeyError("inside")
    with pytest.raises(KeyError):
        FP8AttentionProcessor(failing)()
    assert F.scaled_dot_product_attention is sdpa
    # PyTorch's CausalBias recognizes SDPA by identity: with wrappers alive it must still serve GQA callers
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    out = F.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(3, 5), enable_gqa=True)
    assert out.shape == (1, 4, 3, 16)


def test_wrapped_model_deepcopies():
    model, inputs = _tiny_flux(), _flux_inputs()
    enable_fp8_attention(model, q_block=16, kv_block=16)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copied(**inputs)[0], model(**inputs)[0])
    assert fp8_attention_enabled(copied)
    assert disable_fp8_attention(model) == 2 and disable_fp8_attention(copied) == 2


def test_processor_passes_unservable_calls_through():
    proc = FP8AttentionProcessor(lambda attn, q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    q, k, v = _qkv(1, 1, 8, 8, 16)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    assert torch.equal(proc(None, q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert not torch.equal(proc(None, q, k, v, None), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="q_block"):
        FP8AttentionProcessor(proc, q_block=48)


@pytest.mark.gpu
@pytest.mark.parametrize("s", [4608, 1000])
def test_gpu_native_fp8_kernel(s):
    q, k, v = _qkv(1, 4, s, s, 128, dtype=torch.bfloat16, device="cuda", seed=s)
    out = fp8_attention(q, k, v)
    ref = fp8_attention_reference(q, k, v)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert not out.isnan().any()
    assert relative_error(out, ref) < 2e-2  # bf16 output rounding + MMA order + rare fp8 ties of P
    assert relative_error(out, exact) < 1.5 * relative_error(ref, exact) + 1e-2


def test_kernel_defaults_are_the_reference_defaults():
    """Called without blocks, kernel and reference quantize Q / K / V in the same blocks (the format's defaults)."""
    q, k, v = _qkv(1, 1, 200, 200, 32)
    assert relative_error(fp8_attention(q, k, v), fp8_attention_reference(q, k, v)) < 1e-5


def test_default_warps_follow_the_query_block():
    assert [default_warps(b) for b in (16, 32, 64, 128, 256)] == [4, 4, 4, 8, 8]


def _random_norm_weights(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if type(module).__name__ == "RMSNorm" and name.rsplit(".", 1)[-1].startswith("norm_"):
            module.weight.data = torch.rand(module.weight.shape, generator=g) * 3 + 0.1


def test_norm_bounds_of_flux_attention():
    """sqrt(head_dim) * max|w| over the norms q (norm_q, norm_added_q) and k (norm_k, norm_added_k) go through."""
    model = _tiny_flux()
    _random_norm_weights(model)
    joint, single = model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn
    q_max = max(joint.norm_q.weight.abs().max(), joint.norm_added_q.weight.abs().max())
    k_max = max(joint.norm_k.weight.abs().max(), joint.norm_added_k.weight.abs().max())
    q_bound, k_bound = norm_bounds(joint, joint.processor)
    assert q_bound == pytest.approx(math.sqrt(32) * float(q_max) * NORM_BOUND_MARGIN)
    assert k_bound == pytest.approx(math.sqrt(32) * float(k_max) * NORM_BOUND_MARGIN)
    assert norm_bounds(single, single.processor)[0] == pytest.approx(
        math.sqrt(32) * float(single.norm_q.weight.abs().max()) * NORM_BOUND_MARGIN)
    assert norm_bounds(joint, object()) is None  # an unknown processor: no static bound
    joint.norm_k = torch.nn.LayerNorm(32)
    assert norm_bounds(joint, joint.processor) is None


def _record_heads_reference_calls(monkeypatch) -> list:
    """From now on, every per-head reference call of the fa3 backend appends (|q| max, |k| max, q_bound, k_bound)
    to the returned list, then computes as before."""
    seen = []

    def spy(q, k, v, sm_scale, q_bound, k_bound):
        seen.append((q.abs().max(), k.abs().max(), q_bound, k_bound))
        return fp8_attention_heads_reference(q, k, v, sm_scale, q_bound, k_bound)

    monkeypatch.setattr(fp8_module, "fp8_attention_heads_reference", spy)
    return seen


def test_fa3_backend_quantizes_q_k_by_their_norm_bounds(monkeypatch):
    """On CPU the fa3 backend's SDPA hook runs the per-head reference with the modules' norm bounds, and the q / k that reach
    it never exceed them (large inputs, random norm weights)."""
    model, inputs = _tiny_flux(head_dim=64), _flux_inputs()  # 64: a head dim FlashAttention-3 has
    _random_norm_weights(model)
    inputs["hidden_states"] = inputs["hidden_states"] * 50
    with torch.no_grad():
        plain = model(**inputs)[0]
        assert enable_fp8_attention(model, backend="fa3", fuse_flux_qk=False) == 2  # the SDPA-hook path
        out = model(**inputs)[0]
        seen = _record_heads_reference_calls(monkeypatch)
        model(**inputs)
        disable_fp8_attention(model)
    assert len(seen) == 2
    for q_max, k_max, q_bound, k_bound in seen:
        assert q_bound is not None and q_max <= q_bound and k_max <= k_bound
        assert q_max > q_bound / 10  # the bound is not vacuous
    assert not torch.equal(out, plain) and relative_error(out, plain) < 0.1  # fp8 attention ran, stays close


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        enable_fp8_attention(_tiny_flux(), backend="cudnn")


def test_norm_bounds_hold_in_sd3_joint_attention(monkeypatch):
    """SD3's joint attention (RMSNorm q / k, no rotary embedding): the bounds are found and hold."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
        qk_norm="rms_norm").eval()
    _random_norm_weights(model)
    enable_fp8_attention(model, backend="fa3")
    seen = _record_heads_reference_calls(monkeypatch)
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 4, 8, 8) * 30, encoder_hidden_states=torch.randn(1, 5, 32) * 30,
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]))
    assert seen
    for q_max, k_max, q_bound, k_bound in seen:
        assert q_bound is not None and q_max <= q_bound and k_max <= k_bound
