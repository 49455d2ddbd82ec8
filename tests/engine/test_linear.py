"""Execution dispatch of the 4-bit linear layer (quantduo.engine.linear, quantduo.svdquant.linear).

Each execution through the kernels (``cpu_kernels()``: the Triton interpreter on CPU, tests/conftest.py) against its
PyTorch reference at few and many tokens; ``auto`` resolution; the fp8 execution's few-token path (``a16``);
``forward_gelu``; the derived state (``bias_a16``, fp8 scales, ``smoothing_folded_out``) after in-place edits and
after the low-rank branch is replaced; bad inputs. The ``gpu`` tests run the same checks in bf16 at FLUX shapes.
On CPU, float16 / float32 (bf16 tl.dot is wrong in the interpreter); the fp8 GEMM is emulated in float32 there
(``fp8_rowwise_gemm``), on CUDA it is ``torch._scaled_mm``. Kernel outputs are poisoned before each kernel.
"""
from __future__ import annotations

import copy

import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch import nn

from quantduo.engine import linear as engine
from quantduo.engine.linear import (FP8_A16_MAX_TOKENS, GEMV_MAX_TOKENS, SKINNY_MAX_TOKENS, Fp8Rows,
                                    a16_reference_forward, cpu_kernels, fp8_reference_forward, reconstructed_weight,
                                    reference_forward, resolve_execution, takes_fp8_rows)
from quantduo.formats import quantizers as qz
from quantduo.formats.fp8 import quantize_fp8_per_token_ref
from quantduo.formats.registry import EXECUTIONS
from quantduo.integrations.lora import attach_lora
from quantduo.svdquant import SVDQuantLinear, refresh_derived, set_execution
from quantduo.utils import relative_error

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)

DERIVED = ("bias_a16", "fp8_wscale", "fp8_inv_wscale", "fp8_inv_smooth")


def _random_layer(k, n, act_format, weight_format="int4", rank=16, dtype=torch.float16, device="cpu",
                  group_size=64, execution="auto"):
    """An SVDQuantLinear with random stored buffers (global RNG): quantized Gaussian residual, smoothing in
    [0.5, 1.5], low-rank factors N(0, 0.1), bias N(0, 1), shift 0.17 for uint4."""
    m = SVDQuantLinear(k, n, rank=rank, act_format=act_format, weight_format=weight_format, dtype=dtype,
                       device=device, group_size=group_size, execution=execution)
    kp = m.padded_in_features
    with torch.no_grad():
        w = torch.randn(n, kp, device=device)
        if weight_format == "nvfp4":
            codes, sc, gs = qz.quantize_nvfp4(w)
            m.qweight.copy_(qz.pack_nibbles(codes)); m.wscales.copy_(sc); m.wscale_global.copy_(gs)
        else:
            q, sc = qz.quantize_int4(w, m.group_size, dtype)
            m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(sc)
        m.smooth_factor.uniform_(0.5, 1.5)
        if act_format == "uint4":
            m.act_shift.fill_(0.17)
        m.proj_down.normal_(0, 0.1); m.proj_up.normal_(0, 0.1); m.bias.normal_()
    return m


def _int4_layer(k, n, act_format, rank=16, dtype=torch.float32, device="cpu", seed=0, smoothed=True):
    """A random INT4 SVDQuantLinear (own generator) with smoothing, low-rank branch, bias (and a shift for uint4)."""
    g = torch.Generator().manual_seed(seed)
    m = SVDQuantLinear(k, n, rank=rank, act_format=act_format, dtype=dtype, device=device)
    with torch.no_grad():
        q, sc = qz.quantize_int4(torch.randn(n, m.padded_in_features, generator=g).to(device), 64, dtype)
        m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(sc)
        if smoothed:
            m.smooth_factor.copy_(torch.rand(m.padded_in_features, generator=g) + 0.5)
        m.proj_down.copy_(torch.randn(m.padded_in_features, rank, generator=g) * 0.1)
        m.proj_up.copy_(torch.randn(n, rank, generator=g) * 0.3)
        m.bias.copy_(torch.randn(n, generator=g))
        if act_format == "uint4":
            m.act_shift.fill_(0.17)
    return m


def _fresh_copy(m: SVDQuantLinear) -> SVDQuantLinear:
    """A new layer of m's format loaded with m's stored buffers (derived state computed from scratch)."""
    fresh = SVDQuantLinear(m.in_features, m.out_features, rank=m.proj_down.shape[1], bias=m.bias is not None,
                           weight_format=m.weight_format, act_format=m.act_format, group_size=m.group_size,
                           dtype=m.dtype, execution=m.execution)
    fresh.load_state_dict(m.state_dict())
    fresh.refresh_derived()
    return fresh


def _assert_derived_current(m: SVDQuantLinear) -> None:
    fresh = _fresh_copy(m)
    for name in DERIVED:
        assert torch.equal(getattr(m, name), getattr(fresh, name)), name
    assert m.smoothing_folded_out == fresh.smoothing_folded_out


# --------------------------------------------------------------------------------------------------
# each execution through the kernels vs its reference
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act_format,weight_format,tokens,dtype", [
    ("int4", "int4", 9, torch.float16), ("uint4", "int4", 9, torch.float16), ("int4", "int4", 80, torch.float16),
    ("none", "int4", 1, torch.float16), ("none", "int4", 9, torch.float16), ("none", "int4", 40, torch.float16),
    ("none", "int4", 9, torch.float32), ("none", "int4", 40, torch.float32), ("nvfp4", "nvfp4", 9, torch.float16),
    ("nvfp4", "int4", 9, torch.float16), ("int4", "nvfp4", 9, torch.float16)])
def test_exact_forward(act_format, weight_format, tokens, dtype):
    """``exact`` through the kernels == forward_reference, with leading dims (rows = 2 x tokens) and padded
    in_features (100 -> 128): W4A16 at 2, 18 and 80 rows (2 and 18: the skinny GEMM; 80 > SKINNY_MAX_TOKENS: the
    reconstructed weight + GEMM, float16 and float32; one row, the GEMV: test_smoothing_folded_out), W4A4 at 18
    (skinny) and 160 (16-bit GEMM of the dequantized operands), NVFP4 (Triton weight dequantization + the reference
    arithmetic)."""
    m = _random_layer(100, 48, act_format, weight_format, dtype=dtype, execution="exact")
    x = torch.randn(2, tokens, 100, dtype=dtype)
    with cpu_kernels():
        y = m(x)
    assert y.shape == (2, tokens, 48)
    assert relative_error(y, m.forward_reference(x)) < 2e-3


@pytest.mark.parametrize("act_format", ["int4", "uint4"])
@pytest.mark.parametrize("tokens", [9, 32, 33, 80])
def test_w4a4_exact_paths(act_format, tokens):
    """Both W4A4 paths against forward_reference (rows = 2 x tokens: 18 and 64 the skinny GEMM on 4-bit codes, 66
    and 160 the dequantized operands + GEMM + rank-r update), at a rank that is not a power of two (as after
    attaching a LoRA to the low-rank branch)."""
    m = _random_layer(100, 48, act_format, rank=24, execution="exact")
    x = torch.randn(2, tokens, 100, dtype=torch.float16)
    with cpu_kernels():
        assert relative_error(m(x), m.forward_reference(x)) < 2e-3


@pytest.mark.parametrize("execution", ["exact", "a16", "fp8"])
@pytest.mark.parametrize("act_format", ["int4", "uint4"])
@pytest.mark.parametrize("rows", [1, 9, 64, 80])
def test_execution_vs_reference(execution, act_format, rows):
    """Every execution of one stored INT4 W4A4 layer through the kernels against its own reference at few and many
    tokens (one row: the GEMV; up to 64 the skinny GEMM; above, cuBLAS / the fp8 GEMM). The fp8 execution runs
    ``a16`` up to FP8_A16_MAX_TOKENS tokens."""
    torch.manual_seed(rows)
    m = _random_layer(128, 48, act_format, execution=execution)
    x = torch.randn(rows, 128, dtype=torch.float16)
    with cpu_kernels():
        y = m(x)
    if execution == "exact":
        expected, tolerance = reference_forward(m, x), 2e-3
    elif execution == "a16" or rows <= FP8_A16_MAX_TOKENS:
        expected, tolerance = a16_reference_forward(m, x), 2e-3
    else:
        expected, tolerance = fp8_reference_forward(m, x), 5e-3
    assert y.shape == (rows, 48) and torch.isfinite(y).all()
    assert relative_error(y, expected) < tolerance
    # outside cpu_kernels() the CPU runs the same execution's PyTorch reference (fp8: a16 up to 16 tokens)
    assert torch.equal(m(x), expected)


def test_reference_execution():
    """``reference`` runs the PyTorch arithmetic, kernels or not."""
    m = _random_layer(100, 48, "uint4", execution="reference")
    x = torch.randn(3, 5, 100, dtype=torch.float16)
    expected = reference_forward(m, x)
    assert torch.equal(m(x), expected)
    with cpu_kernels():
        assert torch.equal(m(x), expected)


def _unsigned_fake_quant(act: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """Hand-written unsigned INT4 per 64 of float32 ``act [M, K]`` by Nunchaku's rule, dequantized: codes
    round(a * (1 / s)) in [0, 15] with s = max * float32(1 / 15) (1 for an all-zero group), times s rounded to
    ``dtype``."""
    g = act.clamp(min=0).reshape(act.shape[0], -1, 64)
    amax = g.amax(-1, keepdim=True)
    scales = torch.where(amax > 0, amax * torch.tensor(1 / 15), torch.ones_like(amax))
    return (torch.round(g * (1 / scales)).clamp(0, 15) * scales.to(dtype).float()).reshape(act.shape)


def test_shifted_reference_follows_nunchaku_order():
    """A bf16 post-GELU layer (shift 0.171875, input space) computes Nunchaku's arithmetic: ``Q_a(round(round(x +
    shift) / smooth)) @ R^T`` + the low-rank branch of ``round(x / smooth)`` + the stored bias, whose shift term is
    ``R @ (shift / smooth)`` (``bias_a16`` adds it back); the former order (``round(x / smooth) + shift / smooth``)
    moves the output by about 2 % of its norm."""
    torch.manual_seed(0)
    m = _random_layer(256, 64, "uint4", dtype=torch.bfloat16, execution="reference")
    with torch.no_grad():
        m.act_shift.fill_(0.171875)
    x = F.gelu(torch.randn(32, 256) * 3, approximate="tanh").to(torch.bfloat16)
    smooth, residual = m.smooth_factor.float(), m.dequantized_residual()
    shifted = ((x.float() + 0.171875).to(torch.bfloat16).float() / smooth).to(torch.bfloat16).float()
    xs = (x.float() / smooth).to(torch.bfloat16)
    low_rank = ((xs @ m.proj_down) @ m.proj_up.T).float()
    expected = (_unsigned_fake_quant(shifted) @ residual.T + low_rank + m.bias.float()).to(torch.bfloat16)
    assert torch.equal(m(x), expected)
    old_order = xs.float() + (0.171875 / smooth).to(torch.bfloat16).float()
    former = (_unsigned_fake_quant(old_order) @ residual.T + low_rank + m.bias.float()).to(torch.bfloat16)
    assert relative_error(former, expected) > 5e-3
    m.refresh_derived()
    shift_term = residual @ (torch.full((256,), 0.171875) / smooth)
    torch.testing.assert_close(engine.shift_term(m), shift_term, rtol=1e-6, atol=1e-5)
    assert torch.equal(m.bias_a16, (m.bias.float() + shift_term).to(torch.bfloat16))


@pytest.mark.parametrize("tokens", [1, 9, 80])
def test_a16_group_128(tokens):
    """W4A16 with groups of 128 at every token count (the GEMV and the skinny GEMM serve groups of 64 only; the
    reconstruction serves any group)."""
    torch.manual_seed(0)
    m = SVDQuantLinear(256, 32, rank=8, act_format="none", group_size=128, dtype=torch.float32, execution="exact")
    with torch.no_grad():
        q, scales = qz.quantize_int4(torch.randn(32, 256), 128, torch.float32)
        m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(scales)
        m.proj_down.normal_(0, 0.1); m.proj_up.normal_(0, 0.1); m.bias.normal_()
    x = torch.randn(tokens, 256)
    with cpu_kernels():
        assert relative_error(m(x), m.forward_reference(x)) < 1e-5


@pytest.mark.parametrize("tokens,rank", [(1, 0), (80, 0), (80, 8)])
def test_smoothing_folded_out(tokens, rank):
    """16-bit activations skip ``x / smooth`` only while smooth_factor is all ones (one token: the GEMV; 80: the
    reconstructed weight + GEMM): the flag follows in-place writes and load_state_dict."""
    m = _random_layer(128, 32, "none", rank=rank, execution="exact")
    x = torch.randn(tokens, 128, dtype=torch.float16)
    for factor, identity in ((None, True), (2.0, False), ("load", True)):
        if factor is None:
            m.smooth_factor.fill_(1.0)
        elif factor == "load":
            m.load_state_dict({**m.state_dict(), "smooth_factor": torch.ones(128, dtype=torch.float16)})
        else:
            m.smooth_factor.mul_(factor)
        with cpu_kernels():
            y = m(x)
        assert m.smoothing_folded_out == identity
        assert relative_error(y, m.forward_reference(x)) < 2e-3


@pytest.mark.parametrize("act_format", ["int4", "uint4"])
def test_a16_execution(act_format):
    """``a16``: the same stored weights with 16-bit activations, y = (x / smooth) @ R^T + low-rank + bias with the
    unsigned shift's term unfolded from the bias (``bias_a16``); closer to the unquantized-activation layer than
    W4A4; no stored tensor changes; its kernel path (80 rows: the reconstructed weight) matches its reference."""
    torch.manual_seed(0)
    m = _random_layer(128, 64, act_format, dtype=torch.float32)
    stored = {k: v.clone() for k, v in m.state_dict().items()}
    assert m.set_execution("a16") is m and m.execution == "a16"
    assert stored.keys() == m.state_dict().keys()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in stored.items())
    assert (act_format == "int4") == torch.equal(m.bias_a16, m.bias)
    x = torch.rand(80, 128) * 2 - 0.1
    xs = x / m.smooth_factor
    residual = m.dequantized_residual()
    shift_term = residual @ (m.act_shift / m.smooth_factor)
    expected = xs @ residual.T + (xs @ m.proj_down) @ m.proj_up.T + m.bias + shift_term
    assert relative_error(a16_reference_forward(m, x), expected) < 1e-6
    assert relative_error(a16_reference_forward(m, x), expected) < relative_error(m.forward_reference(x), expected)
    with cpu_kernels():
        assert relative_error(m(x), a16_reference_forward(m, x)) < 1e-5


@pytest.mark.parametrize("act_format,smoothed", [("int4", True), ("uint4", True), ("none", True), ("none", False)])
def test_fp8_execution(act_format, smoothed):
    """``fp8`` keeps the INT4 weights; its reference is fp8_tok(x) @ fp8_chan(W)^T + bias_a16 with W the layer's
    16-bit-activation weight, close to ``a16`` (3-mantissa-bit operands), and its kernel path (80 rows > 64: row
    kernel + fp8 expansion + fp8 GEMM) matches the reference; few tokens run ``a16``."""
    m = _int4_layer(100, 48, act_format, smoothed=smoothed)
    qweight = m.qweight.clone()
    m.set_execution("fp8")
    assert torch.equal(m.qweight, qweight) and m.execution == "fp8"
    assert m.smoothing_folded_out == (not smoothed)
    x = torch.randn(2, 40, 100) * 3
    y_ref = m(x)  # on the CPU outside cpu_kernels(): the fp8 reference
    assert y_ref.shape == (2, 40, 48)
    assert torch.equal(y_ref.reshape(-1, 48), fp8_reference_forward(m, x).reshape(-1, 48))
    err_vs_a16 = relative_error(y_ref, a16_reference_forward(m, x))
    assert 1e-3 < err_vs_a16 < 0.05  # fp8 rounding is there, and small
    # the same product written out: per-token codes times per-channel codes
    xq, xs = quantize_fp8_per_token_ref(nn.functional.pad(x.reshape(-1, 100), (0, 28)))
    w = reconstructed_weight(m)
    wq = (w / m.fp8_wscale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    explicit = (xq.float() @ wq.T) * xs[:, None] * m.fp8_wscale + m.bias_a16
    assert relative_error(y_ref.reshape(-1, 48), explicit) < 1e-3
    with cpu_kernels():
        assert relative_error(m(x), y_ref) < 5e-3
        few = x[:1, :9]  # 9 rows: the a16 kernels, 16-bit activations
        assert relative_error(m(few), a16_reference_forward(m, few)) < 2e-3


def test_fp8_rows_are_the_layer_input_quantized():
    """An INT4 layer in fp8 execution reads Fp8Rows of x (x's per-token codes) as it reads x: the same output off
    and on the kernels; takes_fp8_rows says which layers and inputs can; others refuse rows with a clear error."""
    torch.manual_seed(3)
    m = _random_layer(128, 40, "uint4", execution="fp8")
    x = torch.randn(2, 40, 128, dtype=torch.float16) * 3
    rows = Fp8Rows(*quantize_fp8_per_token_ref(x.reshape(-1, 128)), (2, 40), x.dtype)
    assert takes_fp8_rows(m, x) and not takes_fp8_rows(m, x[:, :32])  # 64 tokens: 16-bit activations
    assert torch.equal(m(rows), m(x))
    with cpu_kernels():
        assert torch.equal(m(rows), m(x))
    padded = _random_layer(100, 40, "uint4", execution="fp8")  # K padded to 128 inside the layer
    exact = _random_layer(128, 40, "uint4", execution="exact")
    assert not takes_fp8_rows(padded, x[..., :100]) and not takes_fp8_rows(exact, x)
    for layer in (padded, exact):
        with pytest.raises(ValueError, match="cannot read fp8 rows"):
            layer(rows)


@pytest.mark.parametrize("rows", [1, 9, FP8_A16_MAX_TOKENS])
def test_fp8_few_tokens_is_a16(rows):
    """Up to FP8_A16_MAX_TOKENS tokens the fp8 execution is the a16 execution, bit for bit; one more token runs the
    fp8 GEMM."""
    torch.manual_seed(1)
    fp8 = _random_layer(128, 40, "uint4", execution="fp8")
    a16 = _fresh_copy(fp8).set_execution("a16")
    x = torch.randn(rows + 1, 128, dtype=torch.float16)
    with cpu_kernels():
        assert torch.equal(fp8(x[:rows]), a16(x[:rows]))
        if rows == FP8_A16_MAX_TOKENS:
            y = fp8(x)
            assert not torch.equal(y, a16(x))
            assert relative_error(y, fp8_reference_forward(fp8, x)) < 5e-3


@pytest.mark.parametrize("fast_accum", [True, False])
def test_fp8_expands_above_a16_tokens(fast_accum, monkeypatch):
    """Above FP8_A16_MAX_TOKENS tokens the fp8 execution expands the INT4 weights into an fp8 buffer for the
    row-wise scaled GEMM (one expansion per call), with the fp8 reference's result."""
    calls = []
    real = engine.expand_w4_fp8
    monkeypatch.setattr(engine, "expand_w4_fp8", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(2)
    m = _random_layer(128, 40, "int4", execution="fp8")
    m.set_execution("fp8", fast_accum)
    x = torch.randn(FP8_A16_MAX_TOKENS + 1, 128, dtype=torch.float16)
    with cpu_kernels():
        y = m(x)
    assert calls == [1]
    assert relative_error(y, fp8_reference_forward(m, x)) < 5e-3


def test_fp8_expanded_compiles_into_one_graph():
    """Above FP8_A16_MAX_TOKENS tokens the fp8 execution traces as one graph (activation quantization in PyTorch
    ops, the expansion one operator: opaque under the interpreter, a triton_op on the GPU) with the eager result."""
    torch.manual_seed(3)
    m = _random_layer(128, 48, "int4", execution="fp8")
    x = torch.randn(FP8_A16_MAX_TOKENS + 16, 128, dtype=torch.float16)
    torch._dynamo.reset()
    with cpu_kernels(), torch.no_grad():
        eager = m(x)
        compiled = torch.compile(m, fullgraph=True)(x)
    assert relative_error(compiled, eager) < 1e-3
    assert relative_error(eager, fp8_reference_forward(m, x)) < 5e-3


# --------------------------------------------------------------------------------------------------
# auto resolution
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_format,act_format", [("int4", "int4"), ("int4", "uint4"), ("int4", "none"),
                                                      ("nvfp4", "nvfp4"), ("int4", "nvfp4")])
def test_auto_resolution(weight_format, act_format, monkeypatch):
    """``auto`` is ``reference`` on the CPU (also inside cpu_kernels()); on CUDA ``fp8`` for INT4 weights and
    non-NVFP4 activations where the GPU has fp8 tensor cores, ``exact`` elsewhere. Other executions stay as set."""
    m = _random_layer(64, 16, act_format, weight_format)
    assert m.execution == "auto"
    x = torch.randn(3, 64, dtype=torch.float16)
    assert resolve_execution(m, x) == "reference"
    assert torch.equal(m(x), reference_forward(m, x))
    with cpu_kernels():
        assert resolve_execution(m, x) == "reference"
        assert torch.equal(m(x), reference_forward(m, x))
    cuda_x = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # resolution only reads these
    int4 = weight_format == "int4" and act_format != "nvfp4"
    for fp8_cores in (True, False):
        monkeypatch.setattr(engine, "has_fp8", lambda device, fp8_cores=fp8_cores: fp8_cores)
        assert resolve_execution(m, cuda_x) == ("fp8" if int4 and fp8_cores else "exact")
    for execution in ("reference", "exact") + (("a16", "fp8") if int4 else ()):
        m.set_execution(execution)
        assert resolve_execution(m, x) == resolve_execution(m, cuda_x) == execution


def test_one_token_routing(monkeypatch):
    """One 16-bit token: a layer with smoothing and a low-rank branch takes kernel 1 + the Gluon GEMM where that GEMM
    serves the operands; a plain W4A16 layer (smoothing folded out, rank 0) keeps the one-launch GEMV, and so does
    every layer where the Gluon GEMM cannot serve (the GEMMs are recorded, not run: Gluon has no CPU interpreter)."""
    taken = []
    monkeypatch.setattr(engine.gemm_w4_mma, "w4a16_mma_gemm", lambda *a, **k: taken.append("mma"))
    monkeypatch.setattr(engine, "w4_gemv", lambda *a, **k: taken.append("gemv"))
    smoothed = _int4_layer(128, 64, "int4", dtype=torch.float16).set_execution("a16")
    plain = _int4_layer(128, 64, "int4", rank=0, dtype=torch.float16, smoothed=False).set_execution("a16")
    refresh_derived(plain)
    assert plain.smoothing_folded_out and plain.rank == 0 and not smoothed.smoothing_folded_out
    x = torch.randn(1, 128, dtype=torch.float16)
    with cpu_kernels():
        for serves, layer, path in [(True, smoothed, "mma"), (True, plain, "gemv"), (False, smoothed, "gemv"),
                                    (False, plain, "gemv")]:
            monkeypatch.setattr(engine.gemm_w4_mma, "supports", lambda *a, serves=serves: serves)
            taken.clear()
            engine._a16_kernels(layer, x, layer.bias)
            assert taken == [path], (serves, layer.rank)


def test_has_fp8_on_cpu():
    assert not engine.has_fp8(torch.device("cpu"))
    assert engine.tokens_of(torch.zeros(2, 3, 8)) == 6 and engine.tokens_of(torch.zeros(4, 0)) == 0
    assert GEMV_MAX_TOKENS == 1 and SKINNY_MAX_TOKENS == FP8_A16_MAX_TOKENS == 64


# --------------------------------------------------------------------------------------------------
# forward_gelu
# --------------------------------------------------------------------------------------------------
def test_forward_gelu():
    """``forward_gelu(h, prefix)`` is the layer applied to cat(prefix, gelu_tanh(h)): through the kernels (80 rows:
    GELU and concatenation in the row kernel, then the expansion path), as the torch fallback (CPU outside
    cpu_kernels(), up to FP8_A16_MAX_TOKENS tokens: the a16 kernels on the materialized input) and without a prefix;
    widths that do not add up are rejected."""
    m8 = _int4_layer(192, 48, "int4").set_execution("fp8")
    h, prefix = torch.randn(2, 40, 128) * 3, torch.randn(2, 40, 64)
    x = torch.cat([prefix, nn.functional.gelu(h, approximate="tanh")], dim=-1)
    expected = m8(x)
    assert torch.equal(expected, fp8_reference_forward(m8, x))
    assert torch.equal(m8.forward_gelu(h, prefix), expected)  # the CPU outside cpu_kernels(): the fp8 reference
    with cpu_kernels():
        assert relative_error(m8.forward_gelu(h, prefix), expected) < 5e-3
        assert torch.equal(m8.forward_gelu(h[:1], prefix[:1]), m8(x[:1]))  # 40 tokens: a16 kernels
        assert torch.equal(m8.forward_gelu(h[:1, :9], prefix[:1, :9]), m8(x[:1, :9]))
    no_prefix = _int4_layer(128, 48, "none").set_execution("fp8")
    with cpu_kernels():
        y = no_prefix.forward_gelu(h)
    assert y.shape == (2, 40, 48)
    assert relative_error(y, fp8_reference_forward(no_prefix, nn.functional.gelu(h, approximate="tanh"))
                          .reshape(2, 40, 48)) < 5e-3
    with pytest.raises(ValueError, match="192 input channels"):
        m8.forward_gelu(h)
    with pytest.raises(ValueError, match="192 input channels"):
        m8.forward_gelu(h, prefix[:, :10])
    with pytest.raises(ValueError, match="192 input channels"):
        m8.forward_gelu(h, prefix[:1])  # other rows


@pytest.mark.parametrize("execution", ["exact", "a16"])
def test_forward_gelu_other_executions(execution):
    """Outside the fused fp8 path forward_gelu is the layer on the materialized input (padded in_features too)."""
    m = _random_layer(100, 24, "uint4", execution=execution)
    h, prefix = torch.randn(70, 60, dtype=torch.float16), torch.randn(70, 40, dtype=torch.float16)
    x = torch.cat([prefix, nn.functional.gelu(h, approximate="tanh")], dim=-1)
    with cpu_kernels():
        assert torch.equal(m.forward_gelu(h, prefix), m(x))


def test_forward_gelu_fp8_padded():
    """fp8 above 64 tokens with in_features not a multiple of the group (100 -> 128): no fused row kernel (the
    padded input is materialized), the fp8 GEMM on the padded input."""
    m8 = _int4_layer(100, 24, "uint4").set_execution("fp8")
    h, prefix = torch.randn(70, 60) * 3, torch.randn(70, 40)
    x = torch.cat([prefix, nn.functional.gelu(h, approximate="tanh")], dim=-1)
    with cpu_kernels():
        y = m8.forward_gelu(h, prefix)
    assert relative_error(y, fp8_reference_forward(m8, x)) < 5e-3


# --------------------------------------------------------------------------------------------------
# derived state
# --------------------------------------------------------------------------------------------------
def test_derived_state_follows_inplace_edits():
    """In-place writes to stored buffers (bias, shift, smoothing, low-rank factors, codes, scales) refresh
    ``bias_a16``, the fp8 scales and ``smoothing_folded_out`` on the next eager call: each equals that of a fresh
    layer loaded with the same buffers, and the kernels match the fresh references."""
    m = _int4_layer(128, 32, "uint4", dtype=torch.float16).set_execution("fp8")
    x = torch.randn(80, 128, dtype=torch.float16)
    edits = [lambda: m.bias.add_(1.0), lambda: m.act_shift.mul_(2.0), lambda: m.proj_up.mul_(10.0),
             lambda: m.proj_down.add_(0.05), lambda: m.wscales.mul_(0.5), lambda: m.smooth_factor.fill_(1.0),
             lambda: m.qweight.copy_(m.qweight.flip(0)), lambda: m.smooth_factor.mul_(1.5)]
    for i, edit in enumerate(edits):
        before = {name: getattr(m, name).clone() for name in DERIVED}
        with torch.no_grad():
            edit()
        with cpu_kernels():
            y = m(x)
        _assert_derived_current(m)
        assert any(not torch.equal(before[name], getattr(m, name)) for name in DERIVED), i
        assert relative_error(y, fp8_reference_forward(_fresh_copy(m), x)) < 5e-3, i
        with cpu_kernels():
            assert torch.equal(m.set_execution("a16")(x[:9]), _fresh_copy(m)(x[:9]))
        m.set_execution("fp8")
    assert not m.smoothing_folded_out


def test_derived_state_follows_lowrank_replacement():
    """Replacing proj_down / proj_up by new tensors of another rank (as attaching a LoRA does) and calling
    ``low_rank_updated``: the rank and the fp8 scales follow, the kernels match the references of the new branch.
    Without the call the derived state still follows (new tensors), at the same rank > 0."""
    m = _int4_layer(128, 32, "int4", rank=8, dtype=torch.float16)
    x = torch.randn(80, 128, dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    for new_rank, announce in ((12, True), (20, False), (4, True)):
        scale = m.fp8_wscale.clone()
        down = (torch.randn(128, new_rank, generator=g) * 0.5).half()
        up = (torch.randn(32, new_rank, generator=g) * 2).half()
        m.proj_down, m.proj_up = down, up
        if announce:
            m.low_rank_updated()
            assert m.rank == new_rank
        for execution, rows, expected in (("fp8", 80, fp8_reference_forward), ("a16", 9, a16_reference_forward),
                                          ("exact", 9, reference_forward), ("exact", 80, reference_forward)):
            m.set_execution(execution)
            with cpu_kernels():
                y = m(x[:rows])
            tolerance = 5e-3 if execution == "fp8" else 2e-3
            assert relative_error(y, expected(m, x[:rows])) < tolerance, (new_rank, execution, rows)
        assert not torch.equal(scale, m.fp8_wscale)
        torch.testing.assert_close(m.fp8_wscale, reconstructed_weight(m).abs().amax(dim=1) / 448)
        _assert_derived_current(m)


def test_lowrank_replacement_of_rank0_layer_without_announcing():
    m = _random_layer(128, 32, "none", rank=0, execution="a16")
    x = torch.randn(9, 128, dtype=torch.float16)
    g = torch.Generator().manual_seed(6)
    m.proj_down = torch.randn(128, 4, generator=g).half()
    m.proj_up = torch.randn(32, 4, generator=g).half()
    with cpu_kernels():
        assert relative_error(m(x), a16_reference_forward(m, x)) < 2e-3


def test_fp8_scale_follows_lora():
    """Attaching a LoRA extends the low-rank branch and recomputes the per-channel fp8 scale: the output then
    matches the reference of the new weight (stale scales would clip the LoRA's larger weights)."""
    model = nn.Sequential(_int4_layer(128, 32, "none", rank=8).set_execution("fp8"))
    layer = model[0]
    before = layer.fp8_wscale.clone()
    a = torch.randn(4, 128) * 0.5
    b = torch.randn(32, 4) * 5
    attach_lora(model, {"0.lora_A.weight": a, "0.lora_B.weight": b}, "big")
    assert layer.rank == 12 and not torch.equal(layer.fp8_wscale, before)
    amax = reconstructed_weight(layer).abs().amax(dim=1)
    torch.testing.assert_close(layer.fp8_wscale, amax / 448)
    x = torch.randn(80, 128)
    with cpu_kernels():
        assert relative_error(layer(x), fp8_reference_forward(layer, x)) < 5e-3


def test_execution_is_not_stored(tmp_path):
    """The execution and the derived buffers are not part of the state dict or a checkpoint: a model saved in fp8
    execution loads as ``auto`` with the same stored tensors and the same derived state."""
    from quantduo.svdquant import SVDQuantConfig, load_quantized, save_quantized
    from quantduo.svdquant.serialization import layer_specs

    model = nn.Sequential(_int4_layer(128, 32, "int4").set_execution("fp8", fast_accum=False))
    assert not set(DERIVED) & {k.split(".")[-1] for k in model.state_dict()}
    assert "execution" not in layer_specs(model)["0"]
    save_quantized(model, tmp_path / "ckpt", SVDQuantConfig(dtype="float32"))
    loaded = nn.Sequential(nn.Linear(128, 32))
    load_quantized(loaded, tmp_path / "ckpt")
    assert isinstance(loaded[0], SVDQuantLinear) and loaded[0].execution == "auto"
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    for name in DERIVED:
        assert torch.equal(getattr(loaded[0], name), getattr(model[0], name)), name


# --------------------------------------------------------------------------------------------------
# set_execution and bad inputs
# --------------------------------------------------------------------------------------------------
def test_set_execution_on_a_model():
    """Module-level set_execution sets every layer able to run the execution (a filter narrows them), returns the
    count, and rejects executions no layer can run."""
    model = nn.Sequential(_random_layer(64, 32, "int4"), nn.ReLU(), _random_layer(32, 16, "nvfp4", "nvfp4"),
                          _random_layer(16, 8, "none"))
    assert set_execution(model, "fp8", fast_accum=False) == 2
    assert [model[i].execution for i in (0, 2, 3)] == ["fp8", "auto", "fp8"] and not model[0].fast_accum
    assert model[2].fast_accum  # untouched
    assert set_execution(model, "exact", filter_fn=lambda m, name: name == "3") == 1
    assert [model[i].execution for i in (0, 2, 3)] == ["fp8", "auto", "exact"]
    assert set_execution(model, "exact") == 3
    with pytest.raises(ValueError, match="no quantized layer can run execution 'fp8' \\(formats: nvfp4/nvfp4\\)"):
        set_execution(nn.Sequential(_random_layer(32, 16, "nvfp4", "nvfp4")), "fp8")
    assert set_execution(nn.Sequential(_random_layer(32, 16, "nvfp4", "nvfp4")), "a16") == 1  # dequantized weight
    with pytest.raises(ValueError, match="no quantized layers"):
        set_execution(nn.Sequential(nn.Linear(4, 4)), "fp8")
    assert set_execution(nn.Sequential(nn.Linear(4, 4)), "auto") == 0
    for execution in EXECUTIONS:
        assert model[0].set_execution(execution).execution == execution


def test_bad_inputs(monkeypatch):
    m = _random_layer(100, 48, "int4")
    for execution in ("reference", "exact", "a16", "fp8"):
        m.set_execution(execution)
        for x in (torch.randn(4, 128, dtype=torch.float16), torch.randn(2, 3, 99, dtype=torch.float16)):
            with pytest.raises(ValueError, match="expects inputs with last dim 100"):
                m(x)
            with cpu_kernels(), pytest.raises(ValueError, match="expects inputs with last dim 100"):
                m(x)
    with pytest.raises(ValueError, match="execution 'w4a8' cannot run int4 weights with int4 activations"):
        m.set_execution("w4a8")
    assert m.execution == "fp8"  # unchanged
    with pytest.raises(ValueError, match="execution 'fp8' cannot run nvfp4 weights"):
        SVDQuantLinear(64, 32, weight_format="nvfp4", act_format="nvfp4", execution="fp8")
    with pytest.raises(ValueError, match="execution 'fp8' cannot run int4 weights with nvfp4 activations"):
        _random_layer(64, 32, "nvfp4").set_execution("fp8")
    with pytest.raises(ValueError, match="weight_format must be one of"):
        SVDQuantLinear(64, 32, weight_format="int8")
    with pytest.raises(ValueError, match="act_format must be one of"):
        SVDQuantLinear(64, 32, act_format="fp8")
    with pytest.raises(ValueError, match="zero-size"):
        SVDQuantLinear(0, 32)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        SVDQuantLinear(64, 32, rank=-1)
    with pytest.raises(ValueError, match="compute dtype"):
        m.to_compute_dtype(torch.int8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with cpu_kernels():
            pass
    assert not engine.kernels_for(torch.zeros(1))


def test_cpu_kernels_is_scoped():
    """Kernels run on CPU tensors only inside the block, also when the block raises."""
    x = torch.zeros(1)
    assert not engine.kernels_for(x)
    with cpu_kernels():
        assert engine.kernels_for(x)
    with pytest.raises(KeyError), cpu_kernels():
        raise KeyError
    assert not engine.kernels_for(x)


# --------------------------------------------------------------------------------------------------
# GPU: FLUX shapes in bf16, and torch.compile
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (12288, 3072), (3072, 12288)])
@pytest.mark.parametrize("tokens", [1, 16, 300, 4608])
def test_gpu_forward_bf16(n, k, tokens):
    """``exact`` of every INT4 format against forward_reference, and ``a16`` of the W4A4 ones against theirs."""
    torch.manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    for fmt, rank in (("int4", 32), ("uint4", 32), ("none", 0), ("none", 32)):
        m = _random_layer(k, n, fmt, rank=rank, dtype=torch.bfloat16, device="cuda", execution="exact")
        assert relative_error(m(x), m.forward_reference(x)) < 5e-3
        if fmt != "none":
            m.set_execution("a16")
            assert relative_error(m(x), a16_reference_forward(m, x)) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288)])
def test_gpu_split_k_repeatable(n, k):
    """The skinny split-K GEMM (float32 atomics) at M = 16 gives the reference result on every one of 20 calls
    (W4A16, W4A4)."""
    torch.manual_seed(0)
    x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
    for fmt in ("none", "int4"):
        m = _random_layer(k, n, fmt, rank=32, dtype=torch.bfloat16, device="cuda", execution="exact")
        expected = m.forward_reference(x)
        errors = [relative_error(m(x), expected) for _ in range(20)]
        assert max(errors) < 5e-3, errors


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3072, 3072), (12288, 3072), (3072, 12288)])
def test_gpu_fp8_execution(n, k):
    """Both accumulations against the float32 reference; fast accumulation is on by default, differs from the
    precise one and stays within its ~1e-3 (precise: float32 promotion along K)."""
    m8 = _int4_layer(k, n, "int4", rank=32, dtype=torch.bfloat16, device="cuda").set_execution("fp8")
    precise = _int4_layer(k, n, "int4", rank=32, dtype=torch.bfloat16, device="cuda").set_execution("fp8", False)
    assert m8.fast_accum and not precise.fast_accum
    for tokens in (16, 300, 4608):
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        # few tokens: a16
        expected = a16_reference_forward(m8, x) if tokens <= 64 else fp8_reference_forward(m8, x)
        assert relative_error(precise(x), expected) < 5e-3
        assert relative_error(m8(x), expected) < 8e-3
        if tokens > 64:
            assert not torch.equal(m8(x), precise(x))


@pytest.mark.gpu
def test_gpu_auto_is_fp8_on_hopper():
    """``auto`` on a GPU with fp8 tensor cores runs INT4 layers in fp8 (exact elsewhere), NVFP4 layers exact."""
    m = _int4_layer(256, 64, "int4", dtype=torch.bfloat16, device="cuda")
    x = torch.randn(100, 256, device="cuda", dtype=torch.bfloat16)
    expected = "fp8" if torch.cuda.get_device_capability() >= engine.FP8_CAPABILITY else "exact"
    assert resolve_execution(m, x) == expected
    assert torch.equal(m(x), m.set_execution(expected)(x))
    nv = _random_layer(256, 64, "nvfp4", "nvfp4", dtype=torch.bfloat16, device="cuda")
    assert resolve_execution(nv, x) == "exact"


@pytest.mark.gpu
def test_gpu_fp8_execution_compiled():
    """Under torch.compile (activation quantization fused by Inductor into the LayerNorm before it, which may skip
    the LayerNorm's bf16 rounding, so a few fp8 codes differ) the layer is as accurate as eager: both against the
    same layer with unquantized activations."""
    m = _int4_layer(3072, 3072, "int4", rank=32, dtype=torch.bfloat16, device="cuda")
    norm = nn.LayerNorm(3072, device="cuda", dtype=torch.bfloat16)
    model = nn.Sequential(norm, m.set_execution("fp8")).requires_grad_(False)
    x = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # inference: the fp8 ops have no backward
        eager = model(x)
        compiled = torch.compile(model)(x)
        exact = a16_reference_forward(m, nn.functional.layer_norm(x.float(), (3072,)))
    err_eager, err_compiled = relative_error(eager, exact), relative_error(compiled, exact)
    assert 1e-3 < err_compiled < 1.2 * err_eager and err_eager < 0.05, (err_eager, err_compiled)


@pytest.mark.gpu
def test_gpu_forward_gelu_compiled():
    """A FLUX single block's proj_out (3072 + 12288 -> 3072) fed by forward_gelu, eager and compiled (the row
    kernel as one custom op: the same result), against the reference of the materialized input."""
    m8 = _int4_layer(15360, 3072, "int4", rank=32, dtype=torch.bfloat16, device="cuda").set_execution("fp8")
    h = torch.randn(4608, 12288, device="cuda", dtype=torch.bfloat16) * 2
    attn = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = fp8_reference_forward(
            m8, torch.cat([attn.float(), nn.functional.gelu(h.float(), approximate="tanh")], 1))
        eager = m8.forward_gelu(h, attn)
        compiled = torch.compile(lambda a, b: m8.forward_gelu(a, b))(h, attn)
    assert relative_error(eager, expected) < 5e-3
    assert relative_error(compiled, eager) < 1e-3


def test_compiled_layer_computes_never_computed_derived_state():
    """A layer filled in place after construction and compiled before any eager call (as a benchmark building its
    layers directly does) computes its derived state while it is traced: the compiled a16 output keeps the bias
    (stale derived state would leave ``bias_a16`` at its zero initialization)."""
    torch.manual_seed(0)
    layers = [SVDQuantLinear(64, 32, rank=0, act_format="none", dtype=torch.float32, execution="a16")
              for _ in range(2)]
    q, scales = qz.quantize_int4(torch.randn(32, 64), 64, torch.float32)
    bias = torch.randn(32) * 10
    for m in layers:
        with torch.no_grad():
            m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(scales); m.bias.copy_(bias)
    x = torch.randn(5, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = layers[1](x)  # eager: refreshes first
        compiled = torch.compile(layers[0])(x)
    assert relative_error(compiled, expected) < 1e-5
    assert torch.equal(layers[0].bias_a16, bias)


def test_compiled_layers_share_one_graph_across_instances():
    """Traced code must not guard on per-layer values: a stack of identical blocks with a graph break inside each
    (as diffusers' FLUX blocks have) compiles the block's resumed frame once, not once per block (the recompile
    storm that ran most of a compiled FLUX step eagerly, past dynamo's recompile limit)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = SVDQuantLinear(64, 64, rank=8, dtype=torch.float32, execution="a16")
            self.second = SVDQuantLinear(64, 64, rank=8, dtype=torch.float32, execution="a16")

        def forward(self, x):
            x = self.first(x)
            torch._dynamo.graph_break()
            return self.second(x)

    torch.manual_seed(0)
    blocks = nn.Sequential(*(Block() for _ in range(6)))
    for m in blocks.modules():
        if isinstance(m, SVDQuantLinear):
            q, scales = qz.quantize_int4(torch.randn(64, 64), 64, torch.float32)
            with torch.no_grad():
                m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(scales)
                m.proj_down.normal_(); m.proj_up.normal_()
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = blocks(x)
        compiled = torch.compile(blocks)
        for _ in range(2):
            out = compiled(x)
    assert relative_error(out, eager) < 1e-5
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


def test_compiled_before_eager_warns_and_refresh_derived_avoids_the_break():
    """Layers filled in place and compiled before any eager call: the traced forward computes every pending layer
    on the device at once (a warning names the fix; the output is right); after ``refresh_derived(model)`` the
    compiled model is one graph with no break."""
    def filled_stack(seed: int) -> nn.Sequential:
        torch.manual_seed(seed)
        stack = nn.Sequential(*(SVDQuantLinear(64, 64, rank=4, dtype=torch.float32, execution="a16")
                                for _ in range(4)))
        for m in stack:
            q, scales = qz.quantize_int4(torch.randn(64, 64), 64, torch.float32)
            with torch.no_grad():
                m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(scales); m.bias.normal_()
                m.proj_down.normal_(); m.proj_up.normal_()
        return stack

    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = filled_stack(0)(x)
        stack = filled_stack(0)
        torch._dynamo.reset(); counters.clear()
        with pytest.warns(UserWarning, match="refresh_derived"):
            out = torch.compile(stack, backend="eager")(x)
        assert relative_error(out, expected) < 1e-6
        assert sum(counters["graph_break"].values()) >= 1
        copied = copy.deepcopy(filled_stack(0))  # pending by its flag, not listed
        torch._dynamo.reset()
        with pytest.warns(UserWarning, match="refresh_derived"):
            assert relative_error(torch.compile(copied, backend="eager")(x), expected) < 1e-6
        stack = filled_stack(0)
        refresh_derived(stack)
        torch._dynamo.reset(); counters.clear()
        out = torch.compile(stack, backend="eager")(x)
    assert relative_error(out, expected) < 1e-6
    assert sum(counters["graph_break"].values()) == 0 and counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("execution,tokens", [("a16", 1), ("a16", 5), ("exact", 5), ("fp8", 3), ("a16", 72)])
def test_kernel_paths_compile_without_graph_breaks(execution, tokens):
    """The kernel paths are one opaque operator (``quantduo::kernel_linear``): a compiled stack of few-token layers
    (a DiT's one-token modulation linears, the few-token fp8 fallback) traces as one graph with no break and
    gives the eager kernels' output."""
    torch.manual_seed(0)
    act = "none" if execution == "a16" else "int4"
    stack = nn.Sequential(*(SVDQuantLinear(64, 64, rank=8, act_format=act, dtype=torch.float16, execution=execution)
                            for _ in range(3)))
    for m in stack:
        q, scales = qz.quantize_int4(torch.randn(64, 64), 64, torch.float16)
        with torch.no_grad():
            m.qweight.copy_(qz.pack_int4(q)); m.wscales.copy_(scales); m.bias.normal_()
            m.proj_down.normal_(std=0.1); m.proj_up.normal_(std=0.1); m.smooth_factor.uniform_(0.5, 1.5)
        m.refresh_derived()
    x = torch.randn(tokens, 64, dtype=torch.float16)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad(), cpu_kernels():
        eager = stack(x)
        compiled = torch.compile(stack, backend="aot_eager")(x)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert torch.equal(compiled, eager)
