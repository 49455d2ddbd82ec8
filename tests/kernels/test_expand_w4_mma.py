"""The Gluon INT4 -> fp8 expansion (quantduo.kernels.expand_w4_mma) vs the float32 reference
``e4m3(clamp(w4_dequant_ref * inv_wscale))`` built from the documented packing, and vs the Triton expansion.

Gluon has no interpreter: on the CPU the kernel is compiled for sm_90a (each operand reaches its ``mma`` layout by a
trivial conversion, asserted while compiling, with 8-byte code loads and 16-byte fp8 stores and no shared memory),
and its configuration and input checks run; the numerics run on the GPU (``gpu`` marker).
"""
from __future__ import annotations

import multiprocessing

import pytest
import torch

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.formats.fp8 import fp8_steps_apart
from quantduo.kernels import expand_w4_mma as ex
from quantduo.kernels.dequant_w4 import dequant_w4

from .gluon_compile import compile_for_hopper


def _compile_for_hopper(dtype: str, **constexprs):
    half = "*bf16" if dtype == "bf16" else "*fp16"
    pointers = {"W": "*i32", "WS": half, "LD": half, "LU": half, "INV_SMOOTH": "*fp32", "ROW_SCALE": "*fp32",
                "OUT": "*fp8e4nv"}
    return compile_for_hopper(ex._expand_w4_kernel, pointers, ("N", "K"), ex.WARPS, **constexprs)


# (dtype, low rank R or 0, smoothing, row steps, stages)
COMPILE_CASES = [("bf16", 32, True, 8, 2), ("fp16", 16, False, 3, 3), ("bf16", 0, True, 1, 1), ("fp16", 24, True, 5, 2)]


def _compile_cases(cases):
    out = []
    for dtype, rank, smooth, steps, stages in cases:
        kernel = _compile_for_hopper(dtype, HAS_LR=rank > 0, R=max(rank, 8), HAS_SMOOTH=smooth, ROW_STEPS=steps,
                                     STAGES=stages, WARPS_=ex.WARPS)
        out.append((kernel.asm["ptx"], kernel.metadata.shared))
    return out


@pytest.fixture(scope="module")
def compiled():
    """The compile cases, built in a fresh process (Triton's interpreter leaks patches into later Gluon compiles of
    the same process: docs/kernel-notes.md item 42)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return dict(zip(COMPILE_CASES, pool.apply(_compile_cases, (COMPILE_CASES,))))


@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiles_for_hopper(compiled, case):
    ptx, shared = compiled[case]
    rank = case[1]
    assert shared == 0
    assert "lop3.b32" in ptx and "0x00780000, 0x41C00000, 0x6A" in ptx  # the documented nibble decode
    assert "ld.global.v2.b32" in ptx  # a thread's 16 codes of a row: one 8-byte load
    assert "st.global.v4.b32" in ptx  # its 16 fp8 codes of a row: one 16-byte store
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert ("mma.sync.aligned.m16n8k16" in ptx) == (rank > 0)


def test_pick_config():
    assert ex.pick_config(3072, 3072) == dict(ROW_STEPS=4, STAGES=3)
    assert ex.pick_config(130, 64) == dict(ROW_STEPS=3, STAGES=3)  # 3 row steps of 64 cover 130 rows
    assert ex.pick_config(64, 64) == dict(ROW_STEPS=1, STAGES=1)


def _layer(N, K, rank, dtype, smoothed, device, seed=0):
    torch.manual_seed(seed)
    q, scales = qz.quantize_int4(torch.randn(N, K) * torch.logspace(-2, 1, K), 64, dtype)
    q[::7, ::5] = -8  # the code quantize_int4 never writes, valid in the format
    qw, scales = qz.pack_int4(q), scales.to(dtype)
    down = (torch.randn(K, rank) * 0.3).to(dtype) if rank else None
    up = torch.randn(N, rank).to(dtype) if rank else None
    inv_smooth = 1 / (torch.rand(K) + 0.5) if smoothed else None
    w = ref.w4_dequant_ref(qw, scales, torch.float32, 64, down, up, None if inv_smooth is None else 1 / inv_smooth)
    inv_wscale = 448 / w.abs().amax(dim=1)
    to = (lambda t: None if t is None else t.to(device))
    return [to(t) for t in (qw, scales, down, up, inv_smooth, inv_wscale)], w * inv_wscale[:, None]


def test_rejects_operands():
    (qw, scales, down, up, inv_smooth, inv_wscale), _ = _layer(64, 128, 12, torch.bfloat16, True, "cpu")
    assert not ex.supports(qw, scales, down, up, inv_smooth, inv_wscale)
    with pytest.raises(ValueError, match="multiple of 8"):
        ex.expand_w4_fp8_mma(qw, scales, down, up, inv_smooth, inv_wscale)
    with pytest.raises(ValueError, match="come together"):
        ex.expand_w4_fp8_mma(qw, scales, down, None, inv_smooth, inv_wscale)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        ex.expand_w4_fp8_mma(qw, scales.float(), None, None, inv_smooth, inv_wscale)
    with pytest.raises(ValueError, match="CUDA"):
        ex.expand_w4_fp8_mma(qw, scales, None, None, inv_smooth, inv_wscale)


@pytest.mark.gpu
@pytest.mark.parametrize("N,K,rank,dtype,smoothed,config", [
    (3072, 1024, 32, torch.bfloat16, True, None),
    (200, 320, 32, torch.bfloat16, True, dict(ROW_STEPS=3, STAGES=2)),  # rows past N, stages not dividing
    (136, 192, 16, torch.float16, False, dict(ROW_STEPS=1, STAGES=1)),
    (520, 256, 8, torch.bfloat16, True, dict(ROW_STEPS=4, STAGES=3)),
    (1000, 640, 24, torch.float16, True, dict(ROW_STEPS=16, STAGES=2)),
    (256, 512, 0, torch.bfloat16, True, dict(ROW_STEPS=2, STAGES=2)),
    (256, 512, 0, torch.bfloat16, False, None),
])
def test_matches_reference(N, K, rank, dtype, smoothed, config):
    """The codes of ``e4m3(clamp(W * inv_wscale, +-448))`` of the float32 reference W, at most one step apart where
    the rank-r sum rounds differently (rare); bit-exact without the low-rank term, and within one step of the
    Triton expansion, bit-exact where that is."""
    (qw, scales, down, up, inv_smooth, inv_wscale), w8 = _layer(N, K, rank, dtype, smoothed, "cuda")
    assert ex.supports(qw, scales, down, up, inv_smooth, inv_wscale)
    got = ex.expand_w4_fp8_mma(qw, scales, down, up, inv_smooth, inv_wscale, config)
    expected = w8.clamp(-448, 448).to(torch.float8_e4m3fn).cuda()
    assert got.dtype == torch.float8_e4m3fn and got.shape == (N, K)
    apart = fp8_steps_apart(got, expected)
    assert apart.max() <= 1 and apart.float().mean() < 1e-3
    triton_codes = dequant_w4(qw, scales, torch.float8_e4m3fn, 64, down, up, scratch=False, row_scale=inv_wscale,
                              inv_smooth=inv_smooth)
    if not rank:
        assert torch.equal(got.view(torch.uint8), triton_codes.view(torch.uint8))
        if not smoothed:
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    assert fp8_steps_apart(got, triton_codes).max() <= 1


@pytest.mark.gpu
def test_strided_scales():
    """Group scales given transposed (column-major) read the same values as contiguous ones."""
    (qw, scales, down, up, inv_smooth, inv_wscale), _ = _layer(384, 512, 32, torch.bfloat16, True, "cuda")
    transposed = scales.t().contiguous().t()
    a = ex.expand_w4_fp8_mma(qw, scales, down, up, inv_smooth, inv_wscale)
    b = ex.expand_w4_fp8_mma(qw, transposed, down, up, inv_smooth, inv_wscale)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
