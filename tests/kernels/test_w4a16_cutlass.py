"""CUTLASS's INT4 x bf16 GEMM (quantduo.kernels.w4a16_cutlass): its reference by hand and the opt-in switch on the CPU;
on a Hopper GPU with the library built (QUANTDUO_CUTLASS_LIB or build/w4a8_lut/), the GEMM and the a16 layer that
runs it against their references."""
from __future__ import annotations

import os

import pytest
import torch

from quantduo.engine import linear as engine
from quantduo.formats import quantizers as qz
from quantduo.formats.reference import w4a16_convert_scale_ref
from quantduo.kernels import w4a16_cutlass
from quantduo.svdquant.linear import SVDQuantLinear

BUILT = os.environ.get(w4a16_cutlass.LIBRARY_ENV, "build/w4a8_lut/libqd_w4a8_lut.so")


@pytest.fixture
def library(monkeypatch):
    """The library path in the environment for one test (the loader's cache cleared before and after)."""
    def use(path):
        monkeypatch.setenv(w4a16_cutlass.LIBRARY_ENV, path)
        w4a16_cutlass._library.cache_clear()
    yield use
    monkeypatch.delenv(w4a16_cutlass.LIBRARY_ENV, raising=False)
    w4a16_cutlass._library.cache_clear()


def test_reference_rounds_each_weight_to_bf16():
    """``bf16(q * s)`` per weight: with s = 1.01 (bf16 1.0078125), q = 7 gives 7.0546875 -> bf16 7.0625, so one input
    of 1.0 returns 7.0625, not the float32 7.0546875."""
    q = torch.zeros(8, 64, dtype=torch.int8)
    q[0, 0] = 7
    scales_t = torch.full((1, 8), 1.01, dtype=torch.bfloat16)
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    x[0, 0] = 1.0
    out = w4a16_convert_scale_ref(x, qz.pack_int4(q), scales_t)
    assert out.dtype == torch.bfloat16 and out[0, 0].item() == 7.0625
    assert float(scales_t[0, 0]) * 7 == 7.0546875


def test_off_without_the_environment_variable(library, monkeypatch):
    monkeypatch.delenv(w4a16_cutlass.LIBRARY_ENV, raising=False)
    w4a16_cutlass._library.cache_clear()
    assert not w4a16_cutlass.enabled()
    m = SVDQuantLinear(128, 64, rank=8, act_format="none", dtype=torch.bfloat16)
    assert m.library_scales is None
    assert not w4a16_cutlass.available(torch.zeros(4, 128, dtype=torch.bfloat16), m.qweight, None)


def test_a_path_that_does_not_load_names_the_build_script(library):
    library("/nonexistent/libqd_w4a8_lut.so")
    with pytest.raises(OSError, match="build_w4a8_lut.sh"):
        w4a16_cutlass.enabled()


@pytest.mark.skipif(not os.path.exists(BUILT), reason="CUTLASS library not built (scripts/build_w4a8_lut.sh)")
def test_layers_keep_transposed_scales_where_the_library_is_named(library):
    """bf16 INT4 group-64 layers get ``library_scales`` = their scales transposed; float16 layers do not."""
    library(BUILT)
    m = SVDQuantLinear(128, 64, rank=8, act_format="none", dtype=torch.bfloat16)
    with torch.no_grad():
        m.wscales.copy_(torch.rand(64, 2) + 0.5)
    m.refresh_derived()
    assert torch.equal(m.library_scales, m.wscales.T.contiguous())
    assert SVDQuantLinear(128, 64, rank=8, act_format="none", dtype=torch.float16).library_scales is None


def _hopper_with_library() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and os.path.exists(BUILT)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_with_library(), reason="needs a Hopper GPU and the built CUTLASS library")
@pytest.mark.parametrize("tokens", [16, 100, 256])
def test_gpu_gemm_matches_its_reference(library, tokens):
    library(BUILT)
    q = torch.randint(-8, 8, (384, 1024), device="cuda", dtype=torch.int8)
    scales_t = (torch.rand(16, 384, device="cuda") * 0.02 + 0.01).to(torch.bfloat16)
    x = torch.randn(tokens, 1024, device="cuda", dtype=torch.bfloat16)
    qweight = qz.pack_int4(q)
    assert w4a16_cutlass.available(x, qweight, scales_t)
    out = w4a16_cutlass.w4a16_gemm(x, qweight, scales_t)
    expected = w4a16_convert_scale_ref(x, qweight, scales_t).float()
    assert float((out.float() - expected).norm() / expected.norm()) < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_with_library(), reason="needs a Hopper GPU and the built CUTLASS library")
def test_gpu_a16_layer_between_65_and_256_tokens_runs_the_library(library, monkeypatch):
    """An a16 layer with smoothing and a rank-32 branch at 100 tokens takes the library path and matches its
    reference."""
    library(BUILT)
    torch.manual_seed(0)
    m = SVDQuantLinear(1024, 384, rank=32, act_format="none", dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        m.qweight.copy_(qz.pack_int4(torch.randint(-7, 8, (384, 1024), device="cuda")))
        m.wscales.copy_(torch.rand(384, 16, device="cuda") * 0.02 + 0.001)
        m.smooth_factor.copy_(torch.rand(1024, device="cuda") + 0.5)
        m.proj_down.copy_(torch.randn(1024, 32, device="cuda") * 0.05)
        m.proj_up.copy_(torch.randn(384, 32, device="cuda") * 0.05)
    m.set_execution("a16")
    original, calls = engine._library_a16, []

    def spy(layer, x2, bias):
        calls.append(x2.shape[0])
        return original(layer, x2, bias)
    monkeypatch.setattr(engine, "_library_a16", spy)
    x = torch.randn(100, 1024, device="cuda", dtype=torch.bfloat16)
    expected = engine.a16_reference_forward(m, x).float()
    got = m(x).float()
    assert calls == [100]
    assert float((got - expected).norm() / expected.norm()) < 1e-2
