"""fuse_qkv / unfuse_qkv on an SVDQuant tiny FLUX: the fused transformer computes what the unfused one does in every
execution (with the GELU fusions, under torch.compile), unfusing restores the model, mixed or non-concatenable
projections are skipped and reported, and LoRA changes and saving refuse a fused model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch import nn

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import FAST, flux_inputs, samples_from, tiny_flux  # noqa: E402

from quantduo.engine.linear import cpu_kernels  # noqa: E402
from quantduo.integrations.diffusers import (FusedFluxSingleBlock, enable_fusions, fuse_qkv,  # noqa: E402
                                             quantization_config, quantize_transformer, save_quantized_transformer,
                                             unfuse_qkv)
from quantduo.integrations.diffusers.backend import QuantDuoConfig, mark_quantized  # noqa: E402
from quantduo.integrations.lora import (FusedProjectionsError, attach_lora, remove_lora,  # noqa: E402
                                        set_lora_strength)
from quantduo.svdquant import FusedLayersError, SVDQuantLinear, set_execution  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

ATTENTIONS = ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
DOUBLE = "transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def quantized():
    """A tiny FLUX (inner dim 128) SVDQuant-quantized with smoothing (calibration shares it between q, k, v)."""
    fp = tiny_flux(seed=3)
    model = copy.deepcopy(fp)
    quantize_transformer(model, samples_from(lambda s: flux_inputs(fp, s), 2), quantization_config(model, **FAST),
                         progress=False)
    return model


def run(model, seed=7):
    """The transformer's output on fixed random inputs (16 image + 8 text tokens)."""
    with torch.no_grad():
        return model(**flux_inputs(model, seed))[0]


def test_fuses_every_quantized_attention(quantized):
    model = copy.deepcopy(quantized)
    report = fuse_qkv(model)
    assert report.quantized == ATTENTIONS and not report.linear and not report.skipped
    attn = model.get_submodule(DOUBLE)
    assert attn.fused_projections
    inner = attn.to_q.out_features
    assert isinstance(attn.to_qkv, SVDQuantLinear) and attn.to_qkv.fused_parts == (inner,) * 3
    assert attn.to_added_qkv.fused_parts == (inner,) * 3
    assert not hasattr(model.get_submodule(ATTENTIONS[1]), "to_added_qkv")  # single blocks: no text stream
    assert fuse_qkv(model).skipped == {name: "already fused" for name in ATTENTIONS}


@pytest.mark.parametrize("execution", ["reference", "exact", "a16", "fp8"])
def test_fused_transformer_equals_unfused(quantized, execution):
    """Every execution (its PyTorch arithmetic on the CPU; the kernels are compared layer by layer in
    tests/svdquant/test_concat.py): fused output = unfused output to float rounding."""
    model = copy.deepcopy(quantized)
    set_execution(model, execution)
    fused = copy.deepcopy(model)
    fuse_qkv(fused)
    assert relative_error(run(fused), run(model)) < 1e-5


def test_unfuse_restores_the_model(quantized):
    model = copy.deepcopy(quantized)
    keys, before = list(model.state_dict()), run(model)
    fuse_qkv(model)
    assert unfuse_qkv(model) == len(ATTENTIONS)
    for name in ATTENTIONS:
        attn = model.get_submodule(name)
        assert not attn.fused_projections and not hasattr(attn, "to_qkv") and not hasattr(attn, "to_added_qkv")
    assert list(model.state_dict()) == keys
    assert torch.equal(run(model), before)
    assert unfuse_qkv(model) == 0


@pytest.mark.parametrize("fusions_first", [True, False])
def test_composes_with_enable_fusions_in_fp8(quantized, fusions_first):
    model = copy.deepcopy(quantized)
    set_execution(model, "fp8")
    plain = run(model)
    steps = [enable_fusions, fuse_qkv] if fusions_first else [fuse_qkv, enable_fusions]
    for step in steps:
        step(model)
    assert isinstance(model.single_transformer_blocks[0], FusedFluxSingleBlock)
    assert model.single_transformer_blocks[0].attn.fused_projections
    assert relative_error(run(model), plain) < 1e-5


def test_compiled_fused_model_matches_eager(quantized):
    """torch.compile traces the fused model (dynamo + AOT autograd; Inductor's CPU code generation, ~2 minutes here,
    adds nothing to what is tested) and computes what eager does."""
    model = copy.deepcopy(quantized)
    fuse_qkv(model)
    enable_fusions(model)
    eager = run(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    assert relative_error(run(compiled), eager) < 1e-5
    torch._dynamo.reset()


def test_plain_linear_attentions_use_diffusers_fusion():
    """An unquantized model: diffusers' own fuse_projections, same output."""
    model = tiny_flux(seed=4)
    before = run(model)
    report = fuse_qkv(model)
    assert report.linear == ATTENTIONS and not report.quantized
    assert type(model.get_submodule(DOUBLE).to_qkv) is nn.Linear
    assert relative_error(run(model), before) < 1e-5


def test_mixed_and_non_concatenable_attentions_are_skipped(quantized):
    model = copy.deepcopy(quantized)
    attn = model.get_submodule(DOUBLE)
    attn.to_k = nn.Linear(attn.to_k.in_features, attn.to_k.out_features)
    single = model.get_submodule(ATTENTIONS[1])
    with torch.no_grad():
        single.to_v.smooth_factor.mul_(1.5)
    before = run(model)
    report = fuse_qkv(model)
    assert not report.quantized and set(report.skipped) == set(ATTENTIONS)
    assert "Linear" in report.skipped[DOUBLE] and "SVDQuantLinear" in report.skipped[DOUBLE]
    assert "smooth_factor" in report.skipped[ATTENTIONS[1]]
    assert not attn.fused_projections and not hasattr(single, "to_qkv")
    assert torch.equal(run(model), before)


def _lora(model, seed: int) -> dict[str, torch.Tensor]:
    """diffusers/PEFT LoRA (rank 4) on the double block's to_q and add_v_proj and the single block's to_k."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in (f"{DOUBLE}.to_q", f"{DOUBLE}.add_v_proj", f"{ATTENTIONS[1]}.to_k"):
        m = model.get_submodule(name)
        state[f"{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) / m.in_features ** 0.5
        state[f"{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
    return state


def test_lora_attached_before_fusing_is_in_the_fused_layers(quantized):
    model = copy.deepcopy(quantized)
    attach_lora(model, _lora(model, 1), "style")
    with_lora = run(model)
    assert relative_error(with_lora, run(quantized)) > 1e-2  # the LoRA changes the output
    fuse_qkv(model)
    assert relative_error(run(model), with_lora) < 1e-5


def test_lora_changes_refuse_a_fused_model(quantized):
    model = copy.deepcopy(quantized)
    attach_lora(model, _lora(model, 1), "style")
    fuse_qkv(model)
    for change in (lambda: attach_lora(model, _lora(model, 2), "other"), lambda: set_lora_strength(model, "style", 0.5),
                   lambda: remove_lora(model, "style")):
        with pytest.raises(FusedProjectionsError, match="unfuse_qkv"):
            change()
    unfuse_qkv(model)
    set_lora_strength(model, "style", 0.5)


def test_saving_a_fused_model_is_refused(quantized, tmp_path):
    """Neither quantduo's save nor diffusers' save_pretrained (the backend) writes a fused model; unfused it saves."""
    model = copy.deepcopy(quantized)
    config = quantization_config(model, **FAST)
    mark_quantized(model, QuantDuoConfig(rank=FAST["rank"]))
    fuse_qkv(model)
    with pytest.raises(FusedLayersError, match="unfuse_qkv"):
        save_quantized_transformer(model, tmp_path / "a", config)
    with pytest.raises(FusedLayersError, match="to_qkv"):
        model.save_pretrained(tmp_path / "b")
    assert not (tmp_path / "a").exists() and not any((tmp_path / "b").glob("*.safetensors"))
    unfuse_qkv(model)
    save_quantized_transformer(model, tmp_path / "a", config)


def test_compiled_quantized_flux_is_one_graph_in_every_kernel_execution(quantized):
    """Through the kernels (Triton interpreter), the compiled quantized FLUX with its fusions traces as one graph:
    the few-token layers (here every layer: 24 tokens; at full size the one-token modulation linears) run as an
    opaque operator, not a graph break each (45 breaks before), and the output equals the eager kernels' bit for
    bit."""
    model = copy.deepcopy(quantized).half()
    enable_fusions(model)
    inputs = {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in flux_inputs(model, 7).items()}
    for execution in ("fp8", "exact"):
        set_execution(model, execution)
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad(), cpu_kernels():
            eager = model(**inputs)[0]
            compiled = torch.compile(model, backend="aot_eager")(**inputs)[0]
        assert sum(counters["graph_break"].values()) == 0, (execution, dict(counters["graph_break"]))
        assert torch.equal(compiled, eager), execution


def test_fused_blocks_join_the_repeated_blocks_of_regional_compilation(quantized):
    """diffusers' ``compile_repeated_blocks`` finds blocks by class name: after ``enable_fusions`` it compiles the
    fused blocks (it raised before, finding none of FLUX's); the class's own list is left as diffusers has it, and
    the fused model still computes what it did."""
    model = copy.deepcopy(quantized)
    set_execution(model, "fp8")
    class_list = list(type(model)._repeated_blocks)
    enable_fusions(model)
    inputs = flux_inputs(model, 0)
    with torch.no_grad():
        eager = model(**inputs)[0]

    model.compile_repeated_blocks(backend="eager")

    compiled = sorted({type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None})
    assert compiled == ["FusedFluxDoubleBlock", "FusedFluxSingleBlock"]
    assert type(model)._repeated_blocks == class_list
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs)[0], eager, rtol=0, atol=0)
    torch._dynamo.reset()
