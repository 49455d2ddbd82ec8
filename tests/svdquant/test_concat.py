"""concat_output_features: one SVDQuantLinear computing several layers of one input.

The rule under test: the fused layer's output is ``torch.cat([layer(x) for layer in layers], -1)``, in every
execution the CPU runs (the PyTorch references, and the Triton kernels in the interpreter inside ``cpu_kernels()``:
few tokens -> GEMV / skinny GEMM, many -> dequantized weights; fp8 above 64 tokens), with a shared ``proj_down``
(kept: rank r) or separate ones (rank sum r_i); and the refusals when the layers do not share their input side.
Parts have different widths so that any row-order mistake shows.
"""
from __future__ import annotations

import pytest
import torch

from quantduo.engine.linear import SKINNY_MAX_TOKENS, cpu_kernels
from quantduo.formats import quantizers as qz
from quantduo.formats.registry import executions_for
from quantduo.svdquant import SVDQuantLinear, concat_output_features
from quantduo.utils import relative_error

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)

K, RANK = 128, 8
WIDTHS = (32, 48, 64)  # q, k, v of different widths: a permuted concatenation cannot match


def _fill_residual(layer: SVDQuantLinear, w: torch.Tensor, global_scale: torch.Tensor) -> None:
    """Quantize ``w [N, K]`` into the layer's 4-bit residual (NVFP4 with the given per-tensor scale)."""
    if layer.weight_format == "nvfp4":
        codes, scales, gs = qz.quantize_nvfp4(w, global_scale)
        layer.qweight.copy_(qz.pack_nibbles(codes)); layer.wscales.copy_(scales); layer.wscale_global.copy_(gs)
        layer.wscale_channel.uniform_(0.5, 1.5)  # Nunchaku's per-channel scales (wcscales): rows of their own
    else:
        q, scales = qz.quantize_int4(w, layer.group_size, layer.dtype)
        layer.qweight.copy_(qz.pack_int4(q)); layer.wscales.copy_(scales)


def make_parts(act_format: str = "int4", weight_format: str = "int4", shared_down: bool = True, seed: int = 0,
               dtype: torch.dtype = torch.float16) -> list[SVDQuantLinear]:
    """Three layers of one input (like q / k / v after SVDQuant calibration): one smoothing in [0.5, 1.5], one
    act_shift (0.17 for uint4), one NVFP4 global scale; their own residuals N(0, 1), proj_up N(0, 0.3), biases
    N(0, 1); one proj_down N(0, 0.1) or one each."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.rand(K, generator=g) + 0.5
    down = torch.randn(K, RANK, generator=g) * 0.1
    global_scale = torch.tensor(0.01)
    parts = []
    for n in WIDTHS:
        m = SVDQuantLinear(K, n, rank=RANK, act_format=act_format, weight_format=weight_format, dtype=dtype)
        with torch.no_grad():
            _fill_residual(m, torch.randn(n, K, generator=g), global_scale)
            m.smooth_factor.copy_(smooth)
            m.act_shift.fill_(0.17 if act_format == "uint4" else 0.0)
            m.proj_down.copy_(down if shared_down else torch.randn(K, RANK, generator=g) * 0.1)
            m.proj_up.copy_(torch.randn(n, RANK, generator=g) * 0.3)
            m.bias.copy_(torch.randn(n, generator=g))
        m.refresh_derived()
        parts.append(m)
    return parts


def separate_outputs(parts: list[SVDQuantLinear], x: torch.Tensor) -> torch.Tensor:
    return torch.cat([m(x) for m in parts], dim=-1)


def _inputs(tokens: int, dtype=torch.float16) -> torch.Tensor:
    return torch.randn(1, tokens, K, generator=torch.Generator().manual_seed(tokens)).to(dtype)


FORMATS = [("int4", "int4"), ("int4", "uint4"), ("int4", "none"), ("nvfp4", "nvfp4")]


@pytest.mark.parametrize("shared_down", [True, False])
@pytest.mark.parametrize("weight_format,act_format", FORMATS)
def test_references_equal_separate_layers(weight_format, act_format, shared_down):
    """Outside cpu_kernels() each execution runs its PyTorch arithmetic: the fused layer equals the parts."""
    parts = make_parts(act_format, weight_format, shared_down)
    fused = concat_output_features(parts)
    assert fused.rank == (RANK if shared_down else RANK * len(parts))
    assert fused.out_features == sum(WIDTHS) and fused.fused_parts == WIDTHS
    for execution in [e for e in executions_for(weight_format, act_format) if e != "auto"]:
        for m in parts + [fused]:
            m.set_execution(execution)
        for tokens in (3, SKINNY_MAX_TOKENS + 16):
            x = _inputs(tokens)
            assert relative_error(fused(x), separate_outputs(parts, x)) < 1e-3, (execution, tokens)


@pytest.mark.parametrize("shared_down", [True, False])
@pytest.mark.parametrize("act_format", ["int4", "uint4"])
@pytest.mark.parametrize("execution", ["exact", "a16", "fp8"])
def test_kernels_equal_separate_layers(execution, act_format, shared_down):
    """Through the kernels (Triton interpreter): GEMV (1 token), skinny GEMM (<= 64), dequantized weights / the fp8
    GEMM (> 64)."""
    parts = make_parts(act_format, shared_down=shared_down, seed=1)
    fused = concat_output_features(parts)
    for m in parts + [fused]:
        m.set_execution(execution)
    with cpu_kernels():
        for tokens in (1, 5, SKINNY_MAX_TOKENS + 8):
            x = _inputs(tokens)
            assert relative_error(fused(x), separate_outputs(parts, x)) < 1e-3, tokens


def test_output_columns_follow_the_layers_order():
    """Each slice of the fused output is the layer at that position, and reordering the layers reorders it."""
    parts = make_parts(shared_down=False, seed=2)
    x = _inputs(4)
    for order in ([0, 1, 2], [2, 0, 1]):
        fused = concat_output_features([parts[i] for i in order]).set_execution("reference")
        pieces = fused(x).split([WIDTHS[i] for i in order], dim=-1)
        for i, piece in zip(order, pieces):
            assert relative_error(piece, parts[i].set_execution("reference")(x)) < 1e-3
    # the layers differ, so a permuted concatenation is far from the true one
    wrong = torch.cat([parts[i](x) for i in (2, 0, 1)], dim=-1)[..., : sum(WIDTHS)]
    assert relative_error(wrong, separate_outputs(parts, x)) > 0.5


def test_parts_are_left_unchanged():
    parts = make_parts(seed=3)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in parts]
    concat_output_features(parts)
    for m, state in zip(parts, before):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())


def _edited(parts: list[SVDQuantLinear], index: int, edit) -> list[SVDQuantLinear]:
    with torch.no_grad():
        edit(parts[index])
    return parts


@pytest.mark.parametrize("what,edit", [
    ("smooth_factor", lambda m: m.smooth_factor.mul_(1.01)),
    ("act_shift", lambda m: m.act_shift.add_(0.1)),
    ("group_size", lambda m: setattr(m, "group_size", 128)),
    ("execution", lambda m: m.set_execution("a16")),
    ("dtype", lambda m: m.to_compute_dtype(torch.float32)),
])
def test_refuses_layers_of_different_inputs(what, edit):
    parts = _edited(make_parts(seed=4), 1, edit)
    with pytest.raises(ValueError, match=what):
        concat_output_features(parts)


def test_refuses_different_nvfp4_global_scales():
    parts = _edited(make_parts("nvfp4", "nvfp4", seed=5), 2, lambda m: m.wscale_global.mul_(2))
    with pytest.raises(ValueError, match="wscale_global"):
        concat_output_features(parts)


def test_refuses_different_formats_and_bias():
    parts = make_parts(seed=6)
    uint4 = make_parts("uint4", seed=6)
    with pytest.raises(ValueError, match="act_format"):
        concat_output_features([parts[0], uint4[1]])
    no_bias = SVDQuantLinear(K, 16, rank=RANK, bias=False, dtype=torch.float16)
    no_bias.smooth_factor.copy_(parts[0].smooth_factor)
    with pytest.raises(ValueError, match="bias"):
        concat_output_features([parts[0], no_bias])
    with pytest.raises(TypeError, match="Linear"):
        concat_output_features([parts[0], torch.nn.Linear(K, 16)])
    with pytest.raises(ValueError, match="at least one"):
        concat_output_features([])
