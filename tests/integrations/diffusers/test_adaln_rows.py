"""The FLUX blocks' adaLN straight to fp8 rows (quantduo.integrations.diffusers.fusions): where every reader of a
norm output takes per-token fp8 rows, the fused blocks hand them the codes of one pass instead of the 16-bit tensor,
and the model's output stays the unfused model's."""
from __future__ import annotations

import copy

import pytest
import torch

from quantduo.engine.linear import Fp8Rows, cpu_kernels
from quantduo.integrations.diffusers import FusedFluxDoubleBlock, enable_fusions, fuse_qkv, fusions
from quantduo.integrations.fp8_attention import enable_fp8_attention
from quantduo.svdquant import set_execution
from quantduo.utils import relative_error

from .test_rules import _quantized_flux
from .tiny_models import flux_inputs


@pytest.fixture(scope="module")
def fp8_flux():
    """The tiny FLUX model quantized (float16 layers: the Triton interpreter's bfloat16 dots are wrong), in fp8
    execution, and inputs of 81 image + 72 text tokens: above the 64 tokens from which fp8 layers quantize their
    input per token, in both streams."""
    model, _, _ = _quantized_flux("float16")
    set_execution(model, "fp8")
    return model, flux_inputs(model, 100, img=81, txt=72)


def _count_rows(monkeypatch) -> list:
    """From now on every fp8-rows adaLN of the fused blocks (with the residual update in front or not) appends its
    row count to the returned list."""
    calls = []
    plain, updated = fusions.layer_norm_fp8_rows, fusions.gated_residual_fp8_rows

    def plain_spy(x0, shift, scale, eps, x1=None):
        rows = plain(x0, shift, scale, eps, x1)
        calls.append(rows.codes.shape[0])
        return rows

    def updated_spy(x, residual, gate, shift, scale, eps):
        out, rows = updated(x, residual, gate, shift, scale, eps)
        calls.append(rows.codes.shape[0])
        return out, rows
    monkeypatch.setattr(fusions, "layer_norm_fp8_rows", plain_spy)
    monkeypatch.setattr(fusions, "gated_residual_fp8_rows", updated_spy)
    return calls


@pytest.mark.parametrize("qkv", [False, True])
def test_adaln_rows_match_the_unfused_model(fp8_flux, monkeypatch, qkv):
    """Four adaLNs per double block (image and text, before the attention and the MLPs), one per single block
    (text + image together) go out as fp8 rows, separate or fused QKV projections alike: off the kernels the
    output is the unfused model's (the same codes), with the Triton kernels (interpreter) within their roundings."""
    model, inputs = fp8_flux
    model = copy.deepcopy(model)
    if qkv:
        fuse_qkv(model)
    fused = copy.deepcopy(model)
    enable_fusions(fused)
    calls = _count_rows(monkeypatch)
    with torch.no_grad():
        expected, got = model(**inputs)[0], fused(**inputs)[0]
        assert calls == [81, 72, 81, 72, 81 + 72]
        assert relative_error(got, expected) < 1e-6
        with cpu_kernels():
            expected, got = model(**inputs)[0], fused(**inputs)[0]
    assert relative_error(got, expected) < 5e-3


def test_adaln_rows_through_fp8_attention(fp8_flux, monkeypatch):
    """Under FP8 attention (the fa3 backend, its reference on the CPU: the fused Q / K path computes the attention)
    the rows reach the projections too."""
    model, inputs = fp8_flux
    model = copy.deepcopy(model)
    enable_fp8_attention(model, backend="fa3")
    fused = copy.deepcopy(model)
    enable_fusions(fused)
    calls = _count_rows(monkeypatch)
    with torch.no_grad():
        expected, got = model(**inputs)[0], fused(**inputs)[0]
    assert len(calls) == 5 and relative_error(got, expected) < 1e-6


def test_few_tokens_and_other_processors_keep_the_16_bit_norm(fp8_flux, monkeypatch):
    """At 64 text tokens or fewer the text stream's readers run 16-bit activations: its norms stay 16-bit while the
    image stream's go out as rows. An attention processor other than FLUX's plain one (here a subclass) may use
    its input otherwise: no rows at all, and the block's own forward runs."""
    model, _ = fp8_flux
    fused = copy.deepcopy(model)
    enable_fusions(fused)
    calls = _count_rows(monkeypatch)
    inputs = flux_inputs(model, 101, img=81, txt=8)
    with torch.no_grad():
        expected, got = model(**inputs)[0], fused(**inputs)[0]
    assert calls == [81, 81, 81 + 8] and relative_error(got, expected) < 1e-6

    class OtherProcessor(type(model.transformer_blocks[0].attn.processor)):
        pass
    for attn in (fused.transformer_blocks[0].attn, fused.single_transformer_blocks[0].attn):
        attn.set_processor(OtherProcessor())
    calls.clear()
    inputs = flux_inputs(model, 102, img=81, txt=72)
    with torch.no_grad():
        expected, got = model(**inputs)[0], fused(**inputs)[0]
    assert calls == [] and relative_error(got, expected) < 1e-6
    assert isinstance(fused.transformer_blocks[0], FusedFluxDoubleBlock)


def test_adaln_rows_can_be_switched_off(fp8_flux, monkeypatch):
    """``enable_fusions(model, adaln_rows=False)``: the other fusions only, the blocks' norms stay 16-bit."""
    model, inputs = fp8_flux
    fused = copy.deepcopy(model)
    enable_fusions(fused, adaln_rows=False)
    calls = _count_rows(monkeypatch)
    with torch.no_grad():
        expected, got = model(**inputs)[0], fused(**inputs)[0]
    assert isinstance(fused.transformer_blocks[0], FusedFluxDoubleBlock)
    assert calls == [] and relative_error(got, expected) < 1e-6


def test_fused_blocks_compile_to_one_graph(fp8_flux):
    """The rows (a NamedTuple with shape / dtype properties) pass through Dynamo: one graph, the eager output."""
    model, inputs = fp8_flux
    fused = copy.deepcopy(model)
    enable_fusions(fused)
    with torch.no_grad():
        eager = fused(**inputs)[0]
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(**inputs)[0]
    torch._dynamo.reset()
    assert relative_error(compiled, eager) < 1e-6


def test_rows_answer_like_the_tensor():
    codes, scale = torch.zeros(6, 8, dtype=torch.float8_e4m3fn), torch.ones(6)
    rows = Fp8Rows(codes, scale, (2, 3), torch.bfloat16)
    assert rows.shape == (2, 3, 8) and rows.shape[1] == 3 and rows.dtype == torch.bfloat16
    assert rows.device == codes.device and not rows.is_cuda


@pytest.mark.gpu
def test_gpu_adaln_rows_in_the_compiled_model(monkeypatch):
    """On the GPU (fp8 execution by default on Hopper / Ada), bf16: the fused blocks hand rows from the kernel to the
    layers, eager and compiled (Inductor launches the kernel), within the roundings of the unfused model."""
    model, _, _ = _quantized_flux("bfloat16")
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16 if k.endswith("states") or k == "pooled_projections" else None)
              if torch.is_tensor(v) else v for k, v in flux_inputs(model, 100, img=81, txt=72).items()}
    fused = copy.deepcopy(model)
    enable_fusions(fused)
    calls = _count_rows(monkeypatch)
    with torch.no_grad():
        expected, got = model(**inputs)[0], fused(**inputs)[0]
        assert len(calls) == 5
        compiled = torch.compile(fused)(**inputs)[0]
    torch._dynamo.reset()
    assert relative_error(got, expected) < 1e-2
    assert relative_error(compiled, got) < 1e-2
