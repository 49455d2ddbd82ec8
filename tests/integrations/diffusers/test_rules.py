"""Per-model SVDQuant rules on tiny configs of the real diffusers denoisers, and executions of the quantized
model."""
from __future__ import annotations

import copy

import pytest
import torch

from quantduo.engine.linear import cpu_kernels
from quantduo.integrations.diffusers import (FusedFluxDoubleBlock, FusedFluxSingleBlock, FusedGeluMLP, enable_fusions,
                                             quantization_config, quantize_transformer, rules_for)
from quantduo.svdquant import SVDQuantLinear, set_execution
from quantduo.utils import relative_error

from .tiny_models import FAST, flux_inputs, samples_from, tiny_flux, tiny_pixart, tiny_sd3, tiny_sdxl_unet


def _status(report, name):
    return next(r for r in report.layers if r.name == name)


MODELS = {
    "pixart": (tiny_pixart, ["adaln_single.emb.timestep_embedder.linear_1", "caption_projection.linear_1", "proj_out",
                             "adaln_single.linear"], [], ["transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v"], 0.05),
    "sd3": (tiny_sd3, ["context_embedder", "time_text_embed.text_embedder.linear_1", "norm_out.linear", "proj_out"],
            ["transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear"],
            ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"], 0.05),
    "sdxl": (tiny_sdxl_unet, ["time_embedding.linear_1", "add_embedding.linear_2"], ["down_blocks.0.resnets.0.time_emb_proj"],
             ["mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v"], 0.3),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_rules_and_accuracy(kind):
    """Skip / W4A16 / shared-input rules are applied and the quantized model stays close to full precision."""
    build, skipped, weight_only, shared, max_err = MODELS[kind]
    model, inputs = build()
    ref = model(**inputs(100))[0]
    report = quantize_transformer(model, samples_from(inputs, 2), quantization_config(model, smooth=False, **FAST), progress=False)
    assert all(_status(report, n).status == "skipped" for n in skipped)
    assert all(_status(report, n).status == "w4a16" for n in weight_only)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in skipped)
    groups = {tuple(_status(report, n).group) for n in shared}
    assert len(groups) == 1 and set(shared) <= set(next(iter(groups)))
    down = [model.get_submodule(n).proj_down for n in shared]
    assert all(torch.equal(d, down[0]) for d in down)
    n_quant = sum(isinstance(m, SVDQuantLinear) for m in model.modules())
    assert n_quant == len(report.quantized()) > 0
    with torch.no_grad():
        err = relative_error(model(**inputs(100))[0], ref)
    # measured (2 seeds): PixArt 0.009-0.010, SD3 0.007-0.009, SDXL UNet 0.14-0.17 (36 chained 4-bit layers)
    assert 0 < err < max_err, err


def test_flux_rules_and_shared_groups():
    model = tiny_flux()
    report = quantize_transformer(
        model, samples_from(lambda s: flux_inputs(model, s), 2), quantization_config(model, smooth=False, **FAST), progress=False
    )
    for name in ["x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1", "norm_out.linear", "proj_out"]:
        assert _status(report, name).status == "skipped"
    for name in ["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear", "single_transformer_blocks.0.norm.linear"]:
        assert _status(report, name).status == "w4a16" and model.get_submodule(name).act_format == "none"
    single = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
              "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"]
    assert set(_status(report, single[0]).group) == set(single)
    assert model.get_submodule("transformer_blocks.0.ff.net.2").act_format == "uint4"


def test_flux_svdq_w4a16_format():
    """``svdq-w4a16``: every quantized layer W4A16 with the low-rank branch, about as accurate as the weight-only
    baseline ``w4a16`` on these random weights (no outlier directions for the branch to take; where there are,
    it is several times more accurate: tests/test_svdquant.py::test_w4a16_svdquant)."""
    errors = {}
    for fmt in ("w4a16", "svdq-w4a16"):
        torch.manual_seed(0)
        model = tiny_flux()
        inputs = flux_inputs(model, 100)
        with torch.no_grad():
            ref = model(**inputs)[0]
        quantize_transformer(model, samples_from(lambda s, m=model: flux_inputs(m, s), 2),
                             quantization_config(model, fmt, smooth=False, **FAST), progress=False)
        layers = [m for m in model.modules() if isinstance(m, SVDQuantLinear)]
        assert layers and all(m.act_format == "none" for m in layers)
        assert all((m.rank > 0) == (fmt == "svdq-w4a16") for m in layers)
        with torch.no_grad():
            errors[fmt] = relative_error(model(**inputs)[0], ref)
    assert 0 < errors["svdq-w4a16"] < 1.1 * errors["w4a16"] < 0.05, errors


def _quantized_flux(dtype: str = "bfloat16"):
    model = tiny_flux()
    inputs = flux_inputs(model, 100)
    with torch.no_grad():
        ref = model(**inputs)[0]
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2),
                         quantization_config(model, smooth=False, dtype=dtype, **FAST), progress=False)
    return model, inputs, ref


def test_flux_a16_execution():
    """``a16`` runs every W4A4 layer with 16-bit activations (the W4A16 layers as they are), closer to bf16 than
    W4A4; going back to ``reference`` restores the W4A4 output exactly (no weights changed)."""
    model, inputs, ref = _quantized_flux()
    w4a4 = sum(isinstance(m, SVDQuantLinear) and m.act_format != "none" for m in model.modules())
    with torch.no_grad():
        out_w4a4 = model(**inputs)[0]
        assert set_execution(model, "a16") == sum(isinstance(m, SVDQuantLinear) for m in model.modules()) > w4a4 > 0
        err = relative_error(model(**inputs)[0], ref)
        set_execution(model, "reference")
        assert torch.equal(model(**inputs)[0], out_w4a4)
    err_w4a4 = relative_error(out_w4a4, ref)
    assert 0 < err < 0.8 * err_w4a4, (err, err_w4a4)  # measured 0.0059 vs 0.0099


def test_flux_fp8_fusions():
    """enable_fusions fuses the GELU MLPs and the single block's GELU + concatenation into the fp8 activation
    quantization: same state-dict keys, the unfused model's output (80 tokens: the fp8 kernels; the GELU is taken
    in float32 either way), and the PyTorch reference off the kernels; enable_fusions' record undoes it. float16
    layers: the Triton interpreter's bfloat16 dots are wrong."""
    model, _, _ = _quantized_flux("float16")
    set_execution(model, "fp8")
    fused = copy.deepcopy(model)
    undo = enable_fusions(fused)
    assert isinstance(fused.single_transformer_blocks[0], FusedFluxSingleBlock)
    assert isinstance(fused.transformer_blocks[0], FusedFluxDoubleBlock)
    assert isinstance(fused.transformer_blocks[0].ff, FusedGeluMLP)
    assert isinstance(fused.transformer_blocks[0].ff_context, FusedGeluMLP)
    assert list(fused.state_dict()) == list(model.state_dict())
    inputs = flux_inputs(model, 100, img=64, txt=16)
    with torch.no_grad():
        expected, got = model(**inputs)[0], fused(**inputs)[0]
        assert relative_error(got, expected) < 1e-6
        with cpu_kernels():
            expected, got = model(**inputs)[0], fused(**inputs)[0]
        assert relative_error(got, expected) < 5e-3
    assert set(undo) == {"transformer_blocks.0", "single_transformer_blocks.0"}
    for name, original in undo.items():
        fused.set_submodule(name, original)
    assert type(fused.single_transformer_blocks[0]).__name__ == "FluxSingleTransformerBlock"
    assert type(fused.transformer_blocks[0].ff).__name__ == "FeedForward"


def test_unsupported_class_is_rejected():
    with pytest.raises(ValueError, match="no nn.ModuleList of attention blocks"):
        quantization_config(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="unknown storage format"):
        quantization_config(tiny_flux(), fmt="int3")
    assert rules_for(tiny_flux()).skip
