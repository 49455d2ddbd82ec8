"""FLUX attention with FlashAttention-3's fp8 kernel and Q / K prepared by one kernel (flux_fa3) vs diffusers' own
processor running under the SDPA hook of the fa3 backend (the same semantics reached through diffusers' modules)."""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.normalization import RMSNorm
from torch import nn

import quantduo.integrations.fp8_attention as fp8_module
from quantduo.engine.linear import cpu_kernels
from quantduo.integrations.diffusers import flux_fa3
from quantduo.integrations.fp8_attention import disable_fp8_attention, enable_fp8_attention, norm_bounds
from quantduo.kernels.attention_fa3 import FA3_AVAILABLE
from quantduo.utils import relative_error


def _tiny_flux(head_dim=64, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8]).eval()
    g = torch.Generator().manual_seed(5)
    for name, module in model.named_modules():  # norm weights far from 1, so each stream's weight matters
        if type(module).__name__ == "RMSNorm" and name.rsplit(".", 1)[-1].startswith("norm_"):
            module.weight.data = torch.rand(module.weight.shape, generator=g) * 3 + 0.1
    return model.to(device=device, dtype=dtype)


def _inputs(dtype=torch.float32, device="cpu", img=16, txt=5):
    g = torch.Generator().manual_seed(1)
    side = int(img ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)  # noqa: E731
    return dict(hidden_states=t(1, img, 4, scale=30), encoder_hidden_states=t(1, txt, 32, scale=30),
                pooled_projections=t(1, 32), timestep=torch.tensor([0.5], device=device, dtype=dtype),
                img_ids=img_ids.to(device), txt_ids=torch.zeros(txt, 3, device=device), return_dict=False)


def _count_fused_calls(monkeypatch) -> list:
    calls = []

    def spy(*args):
        calls.append(args[0])
        return flux_fa3.flux_fa3_attention(*args)
    monkeypatch.setattr(fp8_module, "flux_fa3_attention", spy)
    return calls


def _attention_inputs(model, joint: bool, dtype=torch.float32, device="cpu", img=16, txt=5):
    """Keyword arguments of a joint (text + image) or single-stream FLUX attention call, with FLUX's rotary tables."""
    g = torch.Generator().manual_seed(1)
    side = int(img ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    rotary = model.pos_embed(torch.cat([torch.zeros(txt, 3), img_ids]).to(device))
    width = model.config.num_attention_heads * model.config.attention_head_dim
    t = lambda *s: (torch.randn(*s, generator=g) * 3).to(device=device, dtype=dtype)  # noqa: E731
    if joint:
        return dict(hidden_states=t(1, img, width), encoder_hidden_states=t(1, txt, width), image_rotary_emb=rotary)
    return dict(hidden_states=t(1, txt + img, width), image_rotary_emb=rotary)


def _outputs(attn, kwargs) -> torch.Tensor:
    out = attn(**kwargs)
    return torch.cat([out[0], out[1]], dim=1) if isinstance(out, tuple) else out


def _hook_path(model, attn, kwargs):
    """The attention's output with FLUX's processor run by diffusers under the SDPA hook (the default), then the
    fused path switched on."""
    enable_fp8_attention(model, backend="fa3", fuse_flux_qk=False)
    out = _outputs(attn, kwargs)
    enable_fp8_attention(model, backend="fa3")  # the fused path is the backend's default
    return out


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 128)])
def test_fused_path_matches_diffusers_processor_under_the_hook(monkeypatch, kernel, joint, dtype, head_dim):
    """Joint (text rows first, each stream its own norms) and single-stream FLUX attention take the fused path,
    and its output is the hook path's: same norms (FLUX's ``torch.nn.RMSNorm``, whose bf16 rounding differs from
    diffusers' ``RMSNorm``: ~2 % of the codes, 2.8 % of the bf16 output here), order, rotation, bounds and per-head V scales
    (the reference or, under the interpreter, the kernel)."""
    model = _tiny_flux(head_dim=head_dim, dtype=dtype)
    attn = (model.transformer_blocks if joint else model.single_transformer_blocks)[0].attn
    kwargs = _attention_inputs(model, joint, dtype, img=64 if dtype == torch.bfloat16 else 16)
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        plain = _outputs(attn, kwargs)
        hook = _hook_path(model, attn, kwargs)
        if kernel:
            with cpu_kernels():
                fused = _outputs(attn, kwargs)
        else:
            fused = _outputs(attn, kwargs)
        disable_fp8_attention(model)
    assert calls == [attn]  # the hook path (the default) did not take the fused path
    assert relative_error(fused, hook) < 5e-3  # the same codes; attention outputs of FlashAttention-3's bf16
    assert relative_error(fused, plain) > 1e-2  # fp8 attention ran: its E4M3 error is ten times that


def test_serves_only_the_plain_processor_call():
    model, x = _tiny_flux(), torch.randn(1, 4, 128)
    attn = model.transformer_blocks[0].attn
    processor, bounds = attn.processor, norm_bounds(attn, attn.processor)
    assert flux_fa3.serves(processor, attn, x, x, None, bounds)
    assert not flux_fa3.serves(processor, attn, x, x, torch.ones(1, 8, 8, dtype=torch.bool), bounds)  # a mask
    assert not flux_fa3.serves(processor, attn, x, x, None, None)  # no static bounds
    assert not flux_fa3.serves(object(), attn, x, x, None, bounds)  # another processor
    processor._attention_backend = "flash"
    assert not flux_fa3.serves(processor, attn, x, x, None, bounds)  # an attention backend chosen in diffusers
    processor._attention_backend = None
    attn.norm_added_k.eps = 1e-5
    assert not flux_fa3.serves(processor, attn, x, x, None, bounds)  # norms of one call with different eps
    attn.norm_added_k.eps = attn.norm_q.eps
    assert flux_fa3.serves(processor, attn, x, x, None, bounds)
    assert not flux_fa3.serves(processor, attn, x.half(), x.half(), None, bounds)  # weights in another dtype
    eps, names = attn.norm_q.eps, ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
    attn.norm_k = RMSNorm(attn.head_dim, eps=eps)
    assert not flux_fa3.serves(processor, attn, x, x, None, bounds)  # diffusers' RMSNorm beside PyTorch's
    for name in names:
        setattr(attn, name, RMSNorm(attn.head_dim, eps=eps))
    assert flux_fa3.serves(processor, attn, x, x, None, bounds)  # diffusers' RMSNorm throughout: its rounding
    for name in names:
        setattr(attn, name, nn.LayerNorm(attn.head_dim, eps=eps))
    assert not flux_fa3.serves(processor, attn, x, x, None, bounds)  # a norm the kernel does not reproduce
    small = _tiny_flux(head_dim=32).transformer_blocks[0].attn
    assert not flux_fa3.serves(small.processor, small, x, x, None, bounds)  # a head dim FlashAttention-3 lacks
    odd = _tiny_flux(head_dim=96).transformer_blocks[0].attn
    assert not flux_fa3.serves(odd.processor, odd, x, x, None, bounds)  # one it has, not a power of two


def test_fused_path_compiles_to_one_graph(monkeypatch):
    model, inputs = _tiny_flux(), _inputs()
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        enable_fp8_attention(model, backend="fa3")  # fuse_flux_qk: on by default with fa3
        eager = model(**inputs)[0]
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)[0]
        disable_fp8_attention(model)
    torch._dynamo.reset()
    assert len(calls) >= 4  # eager and traced calls of both attentions
    assert relative_error(compiled, eager) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not FA3_AVAILABLE, reason="flash_attn_3 (FlashAttention-3) not installed")
@pytest.mark.parametrize("joint", [True, False])
def test_gpu_fused_path_matches_the_hook_path(monkeypatch, joint):
    """On the GPU the kernel's float32 arithmetic (approximate reciprocal square root, its summation order) may put
    a few codes one E4M3 step from the eager modules', and this model's attention is peaked enough (norm weights
    up to 3) that a code in a hundred moves its output by a few percent: both fp8 paths are therefore held to the
    exact float32 attention, the fused one no further from it than the hook path."""
    model = _tiny_flux(head_dim=128, dtype=torch.bfloat16, device="cuda")
    attn = (model.transformer_blocks if joint else model.single_transformer_blocks)[0].attn
    kwargs = _attention_inputs(model, joint, torch.bfloat16, "cuda", img=256, txt=32)
    exact_model = _tiny_flux(head_dim=128, device="cuda")
    exact_attn = (exact_model.transformer_blocks if joint else exact_model.single_transformer_blocks)[0].attn
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        exact = _outputs(exact_attn, {k: v.float() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        hook = _hook_path(model, attn, kwargs)
        fused = _outputs(attn, kwargs)
        compiled = _outputs(torch.compile(attn), kwargs)
        disable_fp8_attention(model)
    torch._dynamo.reset()
    assert len(calls) >= 2
    assert relative_error(fused, exact) < 1.05 * relative_error(hook, exact)
    assert relative_error(compiled, fused) < 1e-2


def test_fused_path_needs_the_fa3_backend():
    with pytest.raises(ValueError, match="fa3"):
        enable_fp8_attention(_tiny_flux(), backend="triton", fuse_flux_qk=True)
    model = _tiny_flux()
    enable_fp8_attention(model, backend="triton")
    assert not model.transformer_blocks[0].attn.processor.fuse_flux_qk  # the default follows the backend
    enable_fp8_attention(model, backend="fa3")
    assert model.transformer_blocks[0].attn.processor.fuse_flux_qk
