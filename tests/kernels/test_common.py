"""Triton helpers of quantduo.kernels.common against PyTorch's own operations (in the interpreter on a CPU, on the
GPU where one is present): 16-bit rounding, the GELU, the saturating E4M3 conversion."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch import nn

from quantduo.kernels.common import gelu_tanh, round_to, to_e4m3_saturated

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _apply(X, Y, N: tl.constexpr, OP: tl.constexpr, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
    cols = tl.arange(0, N)
    x = tl.load(X + cols)
    if OP == 0:
        tl.store(Y + cols, round_to(x, DTYPE, NATIVE))
    elif OP == 1:
        tl.store(Y + cols, gelu_tanh(x, NATIVE))
    else:
        tl.store(Y + cols, to_e4m3_saturated(x, NATIVE))


def _run(x: torch.Tensor, op: int, dtype=tl.float32, out_dtype=torch.float32) -> torch.Tensor:
    y = torch.empty(x.numel(), dtype=out_dtype, device=DEVICE)
    _apply[(1,)](x, y, x.numel(), op, dtype, x.is_cuda)
    return y


@pytest.mark.parametrize("dtype,torch_dtype", [(tl.bfloat16, torch.bfloat16), (tl.float16, torch.float16)])
def test_round_to_is_nearest_even(dtype, torch_dtype):
    """Random values, exact ties (half an ulp above values with an even and an odd last bit), values whose rounding
    carries into the exponent, all as PyTorch's cast rounds them."""
    torch.manual_seed(0)
    mantissa_bits = 7 if torch_dtype == torch.bfloat16 else 10
    base = (torch.randn(960) * 10 + 0.5).to(torch_dtype).float()
    ties = base + torch.floor(torch.log2(base.abs())).sub(mantissa_bits + 1).exp2() * base.sign()
    carries = torch.tensor([1.99999, 3.99999, -7.99999, 255.9999]).repeat(16)
    x = torch.cat([torch.randn(1024) * 100, ties, carries]).to(DEVICE)  # 2048 values
    assert torch.equal(_run(x, 0, dtype), x.to(torch_dtype).float())


def test_gelu_matches_the_exact_function():
    """Within float32 rounding of the tanh-approximated GELU in float64, tails included: PyTorch's float32 form
    ``0.5 x (1 + tanh u)`` matches it to ~1e-7 absolute but flushes to 0 below about -5; the kernels' form keeps
    the tiny values to float32's smallest numbers. The float64 truth is taken as ``x sigmoid(2u)`` too (``1 +
    tanh u`` cancels in float64 as well)."""
    x = torch.cat([torch.linspace(-12, 12, 999), torch.tensor([-1e4, -60.0, 0.0, 60.0, 1e4] * 5)]).to(DEVICE)
    xd = x.double()
    u = 0.7978845608028654 * (xd + 0.044715 * xd ** 3)
    torch.testing.assert_close(nn.functional.gelu(x, approximate="tanh"), (xd * torch.sigmoid(2 * u)).float(),
                               rtol=2e-6, atol=2e-7)
    # rtol: in the tail the exponent z ~ 100 carries its own float32 rounding (~|z| 2**-24 relative in 2**z)
    torch.testing.assert_close(_run(x, 1), (xd * torch.sigmoid(2 * u)).float(), rtol=1e-5, atol=1e-37)


def test_e4m3_conversion_saturates():
    """Values past +-448 and infinities saturate, others round to nearest even, as a clamp before PyTorch's cast."""
    x = torch.tensor([-1e30, -float("inf"), -464.0, -448.0, 447.9, 448.1, 479.9, 480.0, 1e6, float("inf"),
                      0.0, 1e-9, 3.125, -3.375, 13.0, 0.3], device=DEVICE)
    q = _run(x, 2, out_dtype=torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))
