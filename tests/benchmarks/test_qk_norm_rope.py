"""benchmarks/qk_norm_rope.py on the CPU: its inputs have FLUX's layout, its eager chain and kernel call agree with the
reference at a small size, and the timings stop with a clear message without CUDA."""
import pytest
import torch

from benchmarks import qk_norm_rope


def test_inputs_are_views_of_fused_projections():
    inputs = qk_norm_rope.flux_qk_inputs("cpu", text=3, side=2, heads=2, dim=32)
    assert inputs["txt"].shape == (1, 3, 2, 32) and inputs["image"].shape == (1, 4, 2, 32)
    assert inputs["image"].stride()[1] == 3 * 2 * 32 and inputs["txt"].dtype == torch.bfloat16
    assert all(type(n) is torch.nn.RMSNorm for n in inputs["norms"])
    assert inputs["cos"].shape == (7, 32) and inputs["bound"] > 32 ** 0.5 * 0.25


def test_chain_and_kernel_match_the_reference():
    inputs = qk_norm_rope.flux_qk_inputs("cpu", text=3, side=4, heads=2, dim=32)
    ref = qk_norm_rope.reference(inputs)
    assert qk_norm_rope.agreement(qk_norm_rope.eager_chain(inputs), ref) == dict(max_steps=0, differing=0.0)
    assert qk_norm_rope.agreement(qk_norm_rope.kernel_call(inputs, (16, 4)), ref)["max_steps"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_main_needs_a_gpu(capsys):
    assert qk_norm_rope.main([]) == 1
    assert "CUDA" in capsys.readouterr().out
