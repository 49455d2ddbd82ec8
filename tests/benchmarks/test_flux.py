"""The FLUX benchmark's float32 reference: the model's output computed in float32, the model left as it was."""
import copy

import torch

from benchmarks import flux
from quantduo.utils import relative_error


def test_float32_reference_is_the_float32_model_and_leaves_the_bf16_weights_unchanged():
    model = flux.build_model(flux.SMALL, "cpu")
    inputs = flux.make_inputs(model, 16, 8, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wide_model = copy.deepcopy(model).float()
    wide_inputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        expected = wide_model(**wide_inputs)[0]
        bf16_out = model(**inputs)[0].float()

    got = flux.float32_reference(model, inputs)

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert relative_error(bf16_out, got) > 1e-3  # the BF16 execution is a different computation
    after = model.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())


def test_variant_options_parse_suffixes_and_the_triton_expansion_switch():
    """``-tritonexp`` selects the Triton fp8 expansion for that variant only: enable / disable restore the default."""
    from benchmarks import flux_peers
    from quantduo.kernels import fp8_linear

    options = flux_peers.variant_options("svdq-auto-qkv-tritonexp")
    assert options == flux_peers.VariantOptions("svdq-auto", quantized_qkv=True, expansion="triton")
    assert flux_peers.variant_options("svdq-fp8").expansion is None
    assert flux_peers.variant_options("svdq-fp8-fa3fp8qk-gluonexp") == flux_peers.VariantOptions(
        "svdq-fp8", fp8_attention="fa3", fuse_flux_qk=True, expansion="gluon")
    assert flux_peers.variant_options("svdq-fp8-fa3fp8qk") == flux_peers.VariantOptions(
        "svdq-fp8", fp8_attention="fa3", fuse_flux_qk=True)
    assert flux_peers.variant_options("svdq-fp8-fa3fp8qk-ln16") == flux_peers.VariantOptions(
        "svdq-fp8", fp8_attention="fa3", fuse_flux_qk=True, adaln16=True)
    default = fp8_linear.EXPANSION
    model = torch.nn.Linear(4, 4)
    flux_peers.enable_features(model, flux_peers.VariantOptions("svdq-auto", expansion="triton"))
    assert fp8_linear.EXPANSION == "triton"
    flux_peers.disable_features(model, options)
    assert fp8_linear.EXPANSION == default


def test_regional_compile_compiles_each_block_in_place_and_is_undone():
    """``+rcompile`` compiles the 2 blocks of the small model (not the model); ``uncompile_blocks`` undoes it."""
    model = flux.build_model(flux.SMALL, "cpu")
    assert flux.compile_suffix("svdq-fp8-fa3fp8qk+rcompile") == ("svdq-fp8-fa3fp8qk", flux.REGIONAL)
    assert flux.compile_suffix("bf16+compile") == ("bf16", flux.COMPILE)
    assert flux.compile_suffix("bf16") == ("bf16", None)

    runner = flux.compiled_runner(model, flux.REGIONAL, "default")

    compiled = [type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None]
    assert runner is model
    assert compiled == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    flux.uncompile_blocks(model)
    assert all(m._compiled_call_impl is None for m in model.modules())
    assert flux.compiled_runner(model, None, "default") is model


def test_regional_compile_compiles_the_blocks_a_fusion_put_in_place():
    """After ``enable_fusions`` the block lists hold the fused blocks: those are what ``+rcompile`` compiles."""
    from quantduo.integrations.diffusers import enable_fusions

    model = flux.build_model(flux.SMALL, "cpu")
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "blocks" in n]:
        model.set_submodule(name, flux.fast_svdquant(linear, "int4", 8))
    enable_fusions(model)
    flux.compiled_runner(model, flux.REGIONAL, "default")

    compiled = [type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None]
    assert compiled == ["FusedFluxDoubleBlock", "FusedFluxSingleBlock"]
