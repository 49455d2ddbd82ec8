"""One-launch RMSNorm (Triton, interpreter on CPU) vs its reference and transformers' own RMSNorm modules."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from quantduo.integrations.transformers import FusedRMSNorm, fuse_rms_norms
from quantduo.formats.reference import rms_norm_ref
from quantduo.kernels.rms_norm import rms_norm


@pytest.mark.parametrize("shape,dtype,wdtype", [((3, 100), torch.float32, torch.float32),
                                                ((2, 5, 4, 16), torch.float16, torch.float16),
                                                ((1, 1, 64), torch.float16, torch.float32)])
def test_rms_norm_matches_reference(shape, dtype, wdtype):
    """Masked non-power-of-two rows, 4-D inputs (Qwen3's per-head q/k norms), mixed weight dtype (promotion)."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    w = (torch.rand(shape[-1]) + 0.5).to(wdtype)
    y = rms_norm(x, w, 1e-6)
    expected = rms_norm_ref(x, w, 1e-6)
    assert y.dtype == expected.dtype and y.shape == x.shape
    torch.testing.assert_close(y, expected, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_rms_norm_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)


@pytest.mark.parametrize("cfg_cls,model_cls,norms", [(LlamaConfig, LlamaForCausalLM, 5),
                                                     (Qwen3Config, Qwen3ForCausalLM, 9)])
def test_fuse_rms_norms_keeps_the_model(cfg_cls, model_cls, norms):
    """Every RMSNorm replaced (2 per layer + final; Qwen3 also q/k norms), same state dict keys, same logits
    through the PyTorch formula and through the kernel."""
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, attn_implementation="sdpa")
    model = model_cls(cfg).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        expected = model(ids).logits
        keys = set(model.state_dict())
        assert fuse_rms_norms(model) == norms
        assert set(model.state_dict()) == keys
        fused = [m for m in model.modules() if isinstance(m, FusedRMSNorm)]
        assert len(fused) == norms
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)
        for m in fused:
            m.backend = "triton"
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_rms_norm_bf16():
    x = torch.randn(7, 4096, device="cuda", dtype=torch.bfloat16) * 3
    w = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), atol=2e-2, rtol=1e-2)
