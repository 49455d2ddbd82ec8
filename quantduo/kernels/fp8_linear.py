"""FP8 execution of INT4 SVDQuant layers on Hopper (:class:`~quantduo.svdquant.fp8_execution.SVDQuantFP8Linear`).

Above a few dozen tokens a layer runs as one row-wise-scaled fp8 GEMM (``torch._scaled_mm``):

    y = s_x[m] * s_w[n] * (e4m3(x / s_x) @ e4m3(W * (1 / s_w))^T) + bias
    W = (q * scale + lora_up @ lora_down^T) / smooth

* :func:`quantize_fp8_per_token` — one pass over the activations (a row per program): ``s_x = absmax * (1 / 448)``
  per token, FP8 E4M3 codes of ``x * (1 / s_x)``. Under ``torch.compile`` the same arithmetic is written in
  PyTorch ops instead, so Inductor fuses it into the op that produces ``x`` (LayerNorm + modulation, GELU, ...).
* :func:`expand_w4_fp8` — the layer's whole weight (4-bit residual, low-rank branch and smoothing folded in, as
  :mod:`.dequant_w4`) rounded to fp8 with the static per-channel scale ``s_w``; a ``torch.library`` custom op,
  so compiled graphs call it as one opaque kernel.

The low-rank branch and the smoothing are inside ``W``: the activations need neither, and fp8's per-element
exponent keeps the outlier channels that smoothing exists for in 4-bit integer formats.
Reference: :meth:`SVDQuantFP8Linear.forward_reference`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantduo.svdquant.quantizers import FP8_E4M3_MAX

from .common import to_e4m3
from .dequant_w4 import dequant_w4
from .fp8_concat import fp8_rowwise_gemm


@triton.jit
def _fp8_token_quant_kernel(X, Q, SCALE, K, stride_xm, stride_qm, BLOCK: tl.constexpr, NATIVE: tl.constexpr):
    """Program m: row m of X ``[M, K]`` (16/32-bit) -> Q float8_e4m3fn ``[M, K]``, SCALE float32 ``[M]``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(X + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)
    y = x * tl.math.div_rn(1.0, scale)
    tl.store(Q + row * stride_qm + cols, to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0), NATIVE), mask=mask)
    tl.store(SCALE + row, scale)


def quantize_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per row of ``x [M, K]``: (codes float8_e4m3fn ``[M, K]``, scale float32 ``[M]``).

    ``scale = absmax * (1 / 448)`` (1.0 for all-zero rows), codes ``e4m3(clamp(x * (1 / scale), +-448))``, round
    to nearest even. Plain PyTorch ops: the reference, and what ``torch.compile`` fuses into the producer of x.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax * (1.0 / FP8_E4M3_MAX), torch.ones_like(amax))
    q = (xf * (1.0 / scale)[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8_per_token_ref` for ``x [M, K]`` (unit column stride): the Triton row kernel on CUDA
    (and under the interpreter), PyTorch ops while ``torch.compile`` traces (fusable into x's producer)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"expected a 2-D row-major tensor, got shape {tuple(x.shape)} strides {x.stride()}")
    if torch.compiler.is_compiling():
        return quantize_fp8_per_token_ref(x)
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _fp8_token_quant_kernel[(M,)](x, q, scale, K, x.stride(0), q.stride(0), BLOCK=block, NATIVE=x.is_cuda,
                                  num_warps=max(1, min(16, block // 512)))
    return q, scale


@torch.library.custom_op("quantduo::expand_w4_fp8", mutates_args=())
def expand_w4_fp8(qweight: torch.Tensor, wscales: torch.Tensor, lora_down: torch.Tensor | None,
                  lora_up: torch.Tensor | None, inv_smooth: torch.Tensor | None, inv_wscale: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    """float8_e4m3fn ``[N, K]``: ``e4m3(clamp(W * inv_wscale[n], +-448))`` with ``W`` the reconstructed layer
    weight of :func:`~quantduo.kernels.dequant_w4.dequant_w4` (same arguments; inv_smooth and inv_wscale
    float32 ``[K]`` / ``[N]``)."""
    return dequant_w4(qweight, wscales, torch.float8_e4m3fn, group_size, lora_down, lora_up, scratch=False,
                      row_scale=inv_wscale, inv_smooth=inv_smooth)


@expand_w4_fp8.register_fake
def _expand_w4_fp8_shape(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size):
    return qweight.new_empty(qweight.shape[0], 2 * qweight.shape[1], dtype=torch.float8_e4m3fn)


def fp8_linear_forward(module, x: torch.Tensor) -> torch.Tensor:
    """The fp8 GEMM path of an ``SVDQuantFP8Linear``: ``x [..., in_features]`` -> ``[..., out_features]``
    (x.dtype). Traceable by ``torch.compile`` (no host syncs, no shared scratch buffers)."""
    x2 = module._pad_input(x).reshape(-1, module.padded_in_features).contiguous()
    xq, x_scale = quantize_fp8_per_token(x2)
    low_rank = (module.lora_down, module.lora_up) if module.rank > 0 else (None, None)
    inv_smooth = None if module.smoothing_folded_out else module.inv_smooth_fp8
    w8 = expand_w4_fp8(module.qweight, module.wscales, *low_rank, inv_smooth, module.inv_wscale_fp8, module.group_size)
    y = fp8_rowwise_gemm(xq, w8, x_scale, module.wscale_fp8, module.bias, x.dtype)
    return y.reshape(*x.shape[:-1], module.out_features)
