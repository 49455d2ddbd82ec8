"""benchmarks/layer_norm_fp8.py on the CPU: its inputs have FLUX's layout, its eager chain and kernel call agree with
the reference at a small size, and the timings stop with a clear message without CUDA."""
import pytest
import torch

from benchmarks import layer_norm_fp8


def test_inputs_are_views_of_the_modulation():
    inputs = layer_norm_fp8.adaln_inputs("cpu", (3, 5), width=64)
    assert inputs["x0"].shape == (1, 3, 64) and inputs["x1"].shape == (1, 5, 64)
    assert inputs["shift"].stride(0) == 6 * 64 and inputs["scale"].shape == (1, 64)
    assert layer_norm_fp8.adaln_inputs("cpu", (4, 0), width=64)["x1"] is None


@pytest.mark.parametrize("tokens", [(3, 5), (6, 0)])
def test_chain_and_kernel_match_the_reference(tokens):
    inputs = layer_norm_fp8.adaln_inputs("cpu", tokens, width=96)
    ref = layer_norm_fp8.reference(inputs)
    assert layer_norm_fp8.agreement(layer_norm_fp8.eager_chain(inputs), ref) == dict(
        max_steps=0, differing=0.0, scale_rel=0.0)
    assert layer_norm_fp8.agreement(layer_norm_fp8.kernel_call(inputs, 2), ref)["max_steps"] <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_main_needs_a_gpu(capsys):
    assert layer_norm_fp8.main([]) == 1
    assert "CUDA" in capsys.readouterr().out


def test_update_paths_give_the_eager_update_and_its_codes():
    """Both timed forms of the double block's update + norm2 (the update-first kernel; an update function, here
    eager, then the adaLN kernel) give the eager update bit for bit and codes within a step of its reference."""
    inputs = layer_norm_fp8.update_inputs("cpu", 3)
    assert inputs["r"].shape == inputs["x0"].shape == (1, 3, 3072) and inputs["gate"].shape == (1, 3072)
    updated = inputs["x0"] + inputs["gate"][:, None] * inputs["r"]
    ref = layer_norm_fp8.layer_norm_modulate_fp8_ref(updated, inputs["shift"], inputs["scale"], layer_norm_fp8.EPS)
    for path in (layer_norm_fp8.updated_kernel_call,
                 layer_norm_fp8.update_then_kernel(lambda x, g, r: x + g[:, None] * r)):
        out = path(inputs)
        assert torch.equal(out[2], updated)
        assert layer_norm_fp8.agreement(out[:2], ref)["max_steps"] <= 1
