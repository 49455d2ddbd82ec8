"""FP8 kernels of the fp8 execution (quantduo.kernels.fp8_linear) vs their references (quantduo.formats.fp8):
the per-token row kernel, the weight expansion into fp8 and the row-wise scaled GEMM.

On CPU the Triton kernels run in the interpreter (tests/conftest.py): the interpreter's float32 -> fp8 cast rounds
some values wrongly, so the kernels round to E4M3 in float32 arithmetic (``common.round_e4m3``) and cast exact
values only. The fp8 GEMM is emulated in float32 there, on CUDA it is ``torch._scaled_mm``. Outputs are poisoned
before each kernel.
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.formats.fp8 import (fp8_channel_scale, fp8_steps_apart, quantize_fp8_per_token_ref,
                                  quantize_fp8_weight)
from quantduo.kernels.common import ROW_MAX_WARPS, row_warps
from quantduo.kernels.fp8_linear import expand_w4_fp8, fp8_rowwise_gemm, quantize_fp8_per_token
from quantduo.utils import relative_error

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [192, 256, 1000])
def test_quantize_fp8_per_token(dtype, k):
    """The row kernel gives the reference's scales and codes bit for bit, zero rows included (scale 1), with
    outlier channels and rows of very different magnitude."""
    torch.manual_seed(0)
    x = (torch.randn(7, k) * torch.logspace(-3, 2, 7)[:, None]).to(dtype)
    x[:, 5] *= 50
    x[3] = 0
    q, scale = quantize_fp8_per_token(x)
    q_ref, scale_ref = quantize_fp8_per_token_ref(x)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref) and scale[3] == 1
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert q.float().abs().amax(dim=1)[torch.arange(7) != 3].eq(448).all()  # every nonzero row uses the range
    deq = q.float() * scale[:, None]
    assert relative_error(deq, x.float()) < 0.04  # 3 mantissa bits


@pytest.mark.parametrize("kx,kg,device", [(0, 320, "cpu"), (128, 512, "cpu"), (100, 60, "cpu"), (96, 192, "cpu"),
                                          pytest.param(3072, 12288, "cuda", marks=pytest.mark.gpu),
                                          pytest.param(0, 12288, "cuda", marks=pytest.mark.gpu)])
def test_quantize_fp8_per_token_gelu(kx, kg, device):
    """Rows of cat(x, gelu_tanh(h)) formed inside the row kernel: the reference's scales (to float32 rounding of the
    GELU) and codes (at most one step apart, rarely). Widths: two power-of-two segments with a masked tail (100 =
    64 + 36, 60 = 32 + 28, 320 = 256 + 64), exact ones (96 = 64 + 32, FLUX's 3072 + 12288), one segment (128, 512);
    on CUDA the hardware's E4M3 conversion and fast division."""
    torch.manual_seed(1)
    x = torch.randn(9, kx, device=device) * 3 if kx else None
    h = torch.randn(9, kg, device=device) * 4
    h[2] = -30  # GELU(-30) = 0: a row of zeros in the GELU part
    q, scale = quantize_fp8_per_token(x, h)
    q_ref, scale_ref = quantize_fp8_per_token_ref(x, h)
    assert q.shape == (9, kx + kg) and q.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    codes_apart = fp8_steps_apart(q, q_ref)  # -0 and +0 (GELU of very negative inputs) alike
    assert codes_apart.max() <= 1 and codes_apart.float().mean() < 1e-2
    expected = torch.cat([t for t in (x, nn.functional.gelu(h, approximate="tanh")) if t is not None], dim=1)
    assert relative_error(q.float() * scale[:, None], expected) < 0.04


def test_row_kernel_warps_are_powers_of_two():
    """Triton takes only powers of two: rows whose segments add up to 3 * 2**k (3072 = 2048 + 1024) included."""
    for lanes in (64, 512, 1536, 3072, 6144, 12288, 15360, 20480):
        warps = row_warps(lanes)
        assert warps & (warps - 1) == 0 and 1 <= warps <= ROW_MAX_WARPS
    assert row_warps(3072) == 4


def test_quantize_fp8_per_token_bad_input():
    with pytest.raises(ValueError, match="2-D row-major"):
        quantize_fp8_per_token(torch.randn(4, 64).t())
    with pytest.raises(ValueError, match="2-D row-major"):
        quantize_fp8_per_token(torch.randn(2, 4, 64))
    with pytest.raises(ValueError, match="2-D row-major"):
        quantize_fp8_per_token(torch.randn(4, 64), torch.randn(64, 4).t())
    with pytest.raises(ValueError, match="same rows"):
        quantize_fp8_per_token(torch.randn(4, 64), torch.randn(5, 64))
    with pytest.raises(ValueError, match="give x, gelu_input"):
        quantize_fp8_per_token(None)


@pytest.mark.parametrize("rank,smoothed,dtype", [(0, False, torch.float32), (16, True, torch.float32),
                                                 (8, True, torch.float16)])
def test_expand_w4_fp8(rank, smoothed, dtype):
    """The whole layer weight in fp8 with the static per-channel scale: the codes of ``quantize_fp8_weight`` of the
    float32 reconstructed weight (at most one step apart where the kernel's float32 sums round differently;
    bit-exact without the low-rank and smoothing terms)."""
    torch.manual_seed(0)
    N, K = 48, 256
    q, scales = qz.quantize_int4(torch.randn(N, K) * torch.logspace(-2, 1, K), 64, dtype)
    qw = qz.pack_int4(q)
    down = (torch.randn(K, rank) * 0.3).to(dtype) if rank else None
    up = torch.randn(N, rank).to(dtype) if rank else None
    smooth = torch.rand(K) + 0.5 if smoothed else None
    w = ref.w4_dequant_ref(qw, scales, torch.float32, 64, down, up, smooth)
    inv_wscale = 1 / fp8_channel_scale(w)
    got = expand_w4_fp8(qw, scales, down, up, None if smooth is None else 1 / smooth, inv_wscale, 64)
    expected = quantize_fp8_weight(w, inv_wscale)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (N, K)
    codes_apart = fp8_steps_apart(got, expected.to(torch.float8_e4m3fn))
    assert codes_apart.max() <= 1 and codes_apart.float().mean() < 1e-3
    if not rank and not smoothed:
        assert torch.equal(got.float(), expected)
    assert got.float().abs().amax(1).eq(448).all()  # the static scale maps each row's absmax to 448


def test_compiled_expansion_follows_the_kernel_choice(monkeypatch):
    """QUANTDUO_FP8_EXPANSION=gluon puts the opaque ``expand_w4_fp8_gluon`` operator (the eager choice) into compiled
    graphs, the default the Triton ``expand_w4_fp8`` operator; both give the eager codes."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from quantduo.kernels import fp8_linear
    torch.manual_seed(1)
    q, scales = qz.quantize_int4(torch.randn(32, 128), 64, torch.float32)
    args = (qz.pack_int4(q), scales, None, None, None, torch.rand(32) + 1, 64)
    eager = expand_w4_fp8(*args)
    for choice, op in (("gluon", "expand_w4_fp8_gluon"), ("auto", "expand_w4_fp8")):
        monkeypatch.setattr(fp8_linear, "EXPANSION", choice)
        torch._dynamo.reset()
        backend = EagerAndRecordGraphs()
        got = torch.compile(expand_w4_fp8, fullgraph=True, backend=backend)(*args)
        targets = [str(n.target) for g in backend.graphs for n in g.graph.nodes if n.op == "call_function"]
        assert f"quantduo.{op}.default" in targets, targets
        assert torch.equal(got.view(torch.uint8), eager.view(torch.uint8))
    torch._dynamo.reset()


def test_auto_expansion_in_code_traced_for_cuda_graphs(monkeypatch):
    """``auto``: code traced inside ``for_cuda_graphs()`` gets the opaque Gluon operator, code traced outside the
    Triton one; one compiled function called both ways keeps both versions (torch.compile guards on the choice),
    and leaving the context restores the plain choice."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from quantduo.kernels import fp8_linear
    monkeypatch.setattr(fp8_linear, "EXPANSION", "auto")
    torch.manual_seed(3)
    q, scales = qz.quantize_int4(torch.randn(32, 128), 64, torch.float32)
    args = (qz.pack_int4(q), scales, None, None, None, torch.rand(32) + 1, 64)
    torch._dynamo.reset()
    backend = EagerAndRecordGraphs()
    compiled = torch.compile(expand_w4_fp8, fullgraph=True, backend=backend)

    def ops_of(graph):
        return {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}

    compiled(*args)
    with fp8_linear.for_cuda_graphs():
        compiled(*args)
    assert not fp8_linear._TRACING_FOR_CUDA_GRAPHS
    compiled(*args)  # the first version again: no new trace
    assert len(backend.graphs) == 2
    assert "quantduo.expand_w4_fp8.default" in ops_of(backend.graphs[0])
    assert "quantduo.expand_w4_fp8_gluon.default" in ops_of(backend.graphs[1])
    monkeypatch.setattr(fp8_linear, "EXPANSION", "triton")  # an explicit choice wins over the context
    with fp8_linear.for_cuda_graphs():
        compiled(*args)
    assert "quantduo.expand_w4_fp8.default" in ops_of(backend.graphs[-1])
    torch._dynamo.reset()


@pytest.mark.parametrize("bias,out_dtype", [(True, torch.float32), (False, torch.float16)])
def test_fp8_rowwise_gemm(bias, out_dtype):
    """``(a @ b^T) * a_scale[m] * b_scale[n] + bias`` (float32 emulation on the CPU); K % 16 checked."""
    torch.manual_seed(2)
    a = (torch.randn(10, 64) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    b = (torch.randn(24, 64) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    sa, sb = (torch.rand(10) + 0.1) * 1e-2, (torch.rand(24) + 0.1) * 1e-2
    bvec = torch.randn(24) if bias else None
    y = fp8_rowwise_gemm(a, b, sa, sb, bvec, out_dtype)
    expected = (a.double() @ b.double().T) * sa.double()[:, None] * sb.double()[None, :]
    if bias:
        expected = expected + bvec.double()
    assert y.dtype == out_dtype and y.shape == (10, 24)
    assert relative_error(y, expected) < (1e-6 if out_dtype == torch.float32 else 1e-3)
    with pytest.raises(ValueError, match="K % 16"):
        fp8_rowwise_gemm(a[:, :40], b[:, :40], sa, sb, None, out_dtype)


@pytest.mark.gpu
def test_gpu_compiled_kernels_launch_from_inductor(caplog):
    """Under torch.compile the expansion and the GELU row quantization are Triton kernels in Inductor's generated
    code (no opaque operator called per layer), which write only their outputs (no defensive copy of the weights:
    Inductor found the kernels' stores), with the eager result bit for bit (float32 scales: eager runs the same
    Triton kernel, not the Gluon expansion)."""
    torch.manual_seed(0)
    N, K, rank = 256, 512, 32
    q, scales = qz.quantize_int4(torch.randn(N, K, device="cuda"), 64, torch.bfloat16)
    qw = qz.pack_int4(q)
    down = torch.randn(K, rank, device="cuda", dtype=torch.bfloat16) * 0.1
    up = torch.randn(N, rank, device="cuda", dtype=torch.bfloat16) * 0.1
    inv_smooth, inv_wscale = torch.rand(K, device="cuda") + 0.5, torch.rand(N, device="cuda") + 1
    h = torch.randn(300, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(300, 128, device="cuda", dtype=torch.bfloat16)

    def both(qw, scales, down, up, inv_smooth, inv_wscale, x, h):
        return (expand_w4_fp8(qw, scales, down, up, inv_smooth, inv_wscale, 64),) + quantize_fp8_per_token(x, h)

    args = (qw, scales, down, up, inv_smooth, inv_wscale, x, h)
    eager = both(*args)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="torch._higher_order_ops.triton_kernel_wrap"):
        compiled, codes = run_and_get_code(torch.compile(both, fullgraph=True), *args)
    code = "\n".join(codes)
    assert "_dequant_w4_kernel" in code and "_fp8_token_quant_kernel" in code
    assert "ops.quantduo" not in code
    assert "assuming every input is mutated" not in caplog.text
    for got, expected in zip(compiled, eager):
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
