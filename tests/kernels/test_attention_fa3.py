"""FlashAttention-3's fp8 attention: the per-head E4M3 format (CPU), its reference, the kernel (GPU, where
``flash_attn_3`` is installed)."""
import math

import pytest
import torch
import torch.nn.functional as F

from quantduo.formats.attention_fp8 import (E4M3_MAX, attention_on_codes_reference, fp8_attention_heads_reference,
                                            fp8_attention_reference, quantize_heads_e4m3)
from quantduo.kernels import attention_fa3
from quantduo.kernels.attention_fa3 import FA3_AVAILABLE, fa3_fp8_attention, fa3_operands, fa3_unavailable_reason
from quantduo.utils import relative_error


def _qkv(b, h, s, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    k = k + 2.0 * torch.randn(1, 1, 1, d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def test_head_scales_are_each_heads_absmax():
    x = torch.randn(2, 3, 37, 16) * torch.tensor([0.01, 1.0, 50.0])[None, :, None, None]
    x[1, 2, 5, 7] = -900.0  # one head's absmax set by one element
    codes, scale = quantize_heads_e4m3(x)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape and scale.shape == (2, 3)
    for b in range(2):
        for h in range(3):
            assert scale[b, h] == x[b, h].abs().max() * (1.0 / E4M3_MAX)  # the documented rule, head by head
    assert codes[1, 2, 5, 7].float() == -E4M3_MAX
    assert relative_error(codes.float() * scale[..., None, None], x) < 0.04
    zero_codes, zero_scale = quantize_heads_e4m3(torch.zeros(1, 2, 4, 16))
    assert torch.equal(zero_scale, torch.ones(1, 2)) and not zero_codes.float().any()


def test_static_bound_sets_every_heads_scale():
    x = torch.randn(1, 2, 10, 16)
    codes, scale = quantize_heads_e4m3(x, bound=8.0)
    assert torch.equal(scale, torch.full((1, 2), 8.0 / E4M3_MAX))
    assert torch.equal(codes.float(), (x * (E4M3_MAX / 8.0)).to(torch.float8_e4m3fn).float())
    clipped, _ = quantize_heads_e4m3(x * 100, bound=8.0)  # beyond the bound: saturates, no inf / nan
    assert clipped.float().abs().max() == E4M3_MAX
    with pytest.raises(ValueError, match="bound"):
        quantize_heads_e4m3(x, bound=0.0)


def test_heads_reference_is_the_block_reference_with_one_block_per_head():
    q, k, v = _qkv(1, 2, 48, 32, seed=1)
    heads = fp8_attention_heads_reference(q, k, v, kv_block=48)
    blocks = fp8_attention_reference(q, k, v, q_block=48, kv_block=48)
    assert torch.equal(heads, blocks)
    walked = fp8_attention_heads_reference(q, k, v, kv_block=16)  # same scales, P quantized per key block walk
    assert relative_error(walked, blocks) < 0.02


def test_heads_reference_error_vs_exact_and_bounds():
    q, k, v = _qkv(1, 2, 64, 32, seed=2)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    dynamic = relative_error(fp8_attention_heads_reference(q, k, v), exact)
    bound = float(max(q.abs().max(), k.abs().max())) * 3  # a loose bound: E4M3 keeps its relative precision
    static = relative_error(fp8_attention_heads_reference(q, k, v, q_bound=bound, k_bound=bound), exact)
    assert 1e-3 < dynamic < 0.1 and static < 1.3 * dynamic


def test_operands_are_bshd_views_of_the_format():
    q, k, v = _qkv(1, 3, 20, 16, seed=3)
    (q8, dq), (k8, dk), (v8, dv) = fa3_operands(q, k, v, q_bound=9.0)
    assert q8.shape == (1, 20, 3, 16) and q8.stride(-1) == 1 and dq.shape == (1, 3)
    assert torch.equal(dq, torch.full((1, 3), 9.0 / E4M3_MAX))
    want_k, want_dk = quantize_heads_e4m3(k)
    assert torch.equal(k8.transpose(1, 2).float(), want_k.float()) and torch.equal(dk, want_dk)
    assert torch.equal(dv, quantize_heads_e4m3(v)[1])


def test_unavailable_reason_on_cpu():
    q = torch.randn(1, 1, 4, 128)
    assert fa3_unavailable_reason(q) is not None
    with pytest.raises(ValueError):
        fa3_fp8_attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.skipif(not FA3_AVAILABLE, reason="flash_attn_3 (FlashAttention-3) not installed")
@pytest.mark.parametrize("s", [4608, 1000])
def test_gpu_fa3_matches_heads_reference(s):
    q, k, v = _qkv(1, 4, s, 128, dtype=torch.bfloat16, device="cuda", seed=s)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for bounds in ((None, None), (float(q.abs().max()) * 2, float(k.abs().max()) * 2)):
        out = fa3_fp8_attention(q, k, v, None, *bounds)
        ref = fp8_attention_heads_reference(q, k, v, None, *bounds)
        assert out.shape == q.shape and out.dtype == q.dtype and not out.isnan().any()
        assert relative_error(out, ref) < 4e-2  # bf16 output, MMA order, FA3's own key tile for the P walk: 0.031
        # at 4608 tokens on an H100 (0.025 against one key block); the exact-attention check below bounds quality
        assert relative_error(out, exact) < 1.5 * relative_error(ref, exact) + 1e-2
    assert relative_error(fa3_fp8_attention(q, k, v, 0.5 / math.sqrt(128)),
                          fp8_attention_heads_reference(q, k, v, 0.5 / math.sqrt(128))) < 4e-2


@pytest.mark.gpu
@pytest.mark.skipif(not FA3_AVAILABLE, reason="flash_attn_3 (FlashAttention-3) not installed")
def test_gpu_compiled_fa3_operator_matches_eager():
    """Inductor's graph around the opaque FlashAttention-3 operator gives the eager result on the GPU."""
    q, k, v = _qkv(1, 4, 1000, 128, dtype=torch.bfloat16, device="cuda", seed=7)
    bounds = (float(q.abs().max()) * 1.5, float(k.abs().max()) * 1.5)
    eager = fa3_fp8_attention(q, k, v, None, *bounds)
    compiled = torch.compile(fa3_fp8_attention, fullgraph=True)(q, k, v, None, *bounds)
    torch._dynamo.reset()
    assert compiled.shape == eager.shape and compiled.dtype == eager.dtype
    assert relative_error(compiled, eager) < 1e-2  # Inductor's fused quantization may round a rare code apart


def _fa3_stand_in(q8, k8, v8, softmax_scale, causal, q_descale, k_descale, v_descale):
    """FlashAttention-3's fp8 forward on the CPU, by its reference: BSHD codes, per-head descales -> bf16 BSHD."""
    n_blocks = -(-k8.shape[1] // 128)
    out = attention_on_codes_reference(q8.transpose(1, 2), q_descale[..., None, None], k8.transpose(1, 2),
                                       k_descale[..., None].expand(-1, -1, n_blocks), v8.transpose(1, 2),
                                       v_descale[..., None].expand(-1, -1, n_blocks), softmax_scale, 128,
                                       torch.bfloat16)
    return out.transpose(1, 2).contiguous()


def test_compiled_fa3_path_is_one_graph(monkeypatch):
    """Under torch.compile the quantization is graph operations and FlashAttention-3 one opaque operator (its fake
    gives the kernel's output layout): fullgraph, the eager result. FlashAttention-3 stood in by its reference."""
    monkeypatch.setattr(attention_fa3, "flash_attn_func", _fa3_stand_in)
    monkeypatch.setattr(attention_fa3, "fa3_unavailable_reason", lambda q: None)
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(1, 2, 40, 64, seed=5))
    (q8, dq), (k8, dk), (v8, dv) = fa3_operands(q, k, v)
    torch.library.opcheck(attention_fa3._fa3_on_codes, (q8, k8, v8, dq, dk, dv, 0.125),
                          test_utils=("test_faketensor",))  # the fake's shape / strides / dtype
    eager = fa3_fp8_attention(q, k, v, None, 12.0, 14.0)
    compiled = torch.compile(fa3_fp8_attention, fullgraph=True, backend="aot_eager")(q, k, v, None, 12.0, 14.0)
    torch._dynamo.reset()
    assert eager.shape == q.shape and eager.dtype == torch.bfloat16
    assert torch.equal(compiled, eager)
    want = fp8_attention_heads_reference(q, k, v, None, 12.0, 14.0)
    assert relative_error(eager, want) < 1e-2
