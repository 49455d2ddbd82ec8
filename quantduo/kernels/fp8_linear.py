"""FP8 kernels of the fp8 execution: per-token activation quantization, weight expansion into fp8, the GEMM.

    y = s_x[m] * s_w[n] * (e4m3(x / s_x) @ e4m3(W * (1 / s_w))^T) + bias
    W = (q * scale + proj_up @ proj_down^T) / smooth

* :func:`quantize_fp8_per_token` — one pass over the activations (a row per program): ``s_x = absmax * (1 / 448)``
  per token, FP8 E4M3 codes of ``x * (1 / s_x)`` (reference: :func:`quantduo.formats.fp8.quantize_fp8_per_token_ref`).
  Under ``torch.compile`` the same arithmetic is written in PyTorch ops instead, so Inductor fuses it into the op
  that produces ``x`` (LayerNorm + modulation, ...). It can also form the layer input itself: ``cat(x,
  gelu_tanh(h))`` (FLUX single blocks) or ``gelu_tanh(h)`` alone (GELU MLPs), in the same single pass and without a
  16-bit copy of the wide input.
* :func:`expand_w4_fp8` — the layer's whole weight (4-bit residual, low-rank branch and smoothing folded in, as
  :mod:`.dequant_w4`) rounded to fp8 with the static per-channel scale ``s_w``: in eager calls on CUDA (and in
  compiled code traced for CUDA graphs, :func:`for_cuda_graphs`) the Gluon kernel of :mod:`.expand_w4_mma` where
  it serves the operands, else the Triton kernel of :mod:`.dequant_w4`.
* :func:`fp8_rowwise_gemm` — the row-wise scaled fp8 GEMM (``torch._scaled_mm`` on CUDA).

Under ``torch.compile`` the GELU row quantization and the expansion are ``triton_op`` operators
(:func:`.common.kernel_op`): Inductor launches their Triton kernels from its generated code, without a Python call
per layer (an opaque custom operator's dispatch costs tens of microseconds of host time, ~500 times per FLUX step);
eager calls launch the kernels directly.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from quantduo.formats.fp8 import quantize_fp8_per_token_ref

from . import expand_w4_mma
from .common import (gelu_tanh, kernel_op, load_row_segment, per_token_scale, row_segments, row_warps,
                     store_e4m3_segment)
from .dequant_w4 import dequant_w4

# QUANTDUO_FP8_EXPANSION: "auto" (the Gluon expansion in eager calls where it serves the operands; under
# torch.compile the Gluon one in code traced for CUDA graphs, see for_cuda_graphs, the Triton one elsewhere),
# "triton" (always the Triton kernel) or "gluon" (the Gluon kernel under torch.compile too, as an opaque operator:
# its Python dispatch per layer is host time that only a CUDA graph replays away)
EXPANSION = os.environ.get("QUANTDUO_FP8_EXPANSION", "auto")
if EXPANSION not in ("auto", "triton", "gluon"):
    raise ValueError(f"QUANTDUO_FP8_EXPANSION must be auto, triton or gluon, got {EXPANSION!r}")
# True inside for_cuda_graphs(). torch.compile guards on it (a module global read while tracing), so code traced
# for CUDA graphs and code traced for plain calls are separate compiled versions.
_TRACING_FOR_CUDA_GRAPHS = False


@contextlib.contextmanager
def for_cuda_graphs() -> Iterator[None]:
    """Within: calls are warm-ups or captures of CUDA graphs, so ``auto`` puts the Gluon expansion into the code
    torch.compile traces (the opaque operator's host dispatch is what a graph replay skips, and its kernel takes
    less device time than the Triton one); outside, compiled code keeps the Triton expansion that Inductor
    launches itself."""
    global _TRACING_FOR_CUDA_GRAPHS
    previous, _TRACING_FOR_CUDA_GRAPHS = _TRACING_FOR_CUDA_GRAPHS, True
    try:
        yield
    finally:
        _TRACING_FOR_CUDA_GRAPHS = previous


@triton.jit
def _row_segment(P, start, K, amax, B: tl.constexpr, GELU: tl.constexpr, NATIVE: tl.constexpr):
    """Columns ``start + [0, B)`` of the row at P (length K, zero past it) as float32, through ``gelu_tanh`` if
    GELU, and ``amax`` raised to their absmax."""
    v = load_row_segment(P, start, K, B)
    if GELU:
        v = gelu_tanh(v, NATIVE)
    return v, tl.maximum(amax, tl.max(tl.abs(v), axis=0))


@triton.jit
def _fp8_token_quant_kernel(X, G, Q, SCALE, KX, KG, stride_xm, stride_gm, stride_qm,
                            BX0: tl.constexpr, BX1: tl.constexpr, BG0: tl.constexpr, BG1: tl.constexpr,
                            NATIVE: tl.constexpr):
    """Program m: row m of ``cat(X[m], gelu_tanh(G[m]))`` -> Q float8_e4m3fn ``[M, KX + KG]``, SCALE float32 ``[M]``.

    X ``[M, KX]`` and G ``[M, KG]`` 16/32-bit with unit column stride. Each input is read as two power-of-two
    segments, BX0 + BX1 >= KX and BG0 + BG1 >= KG (:func:`.common.row_segments`: 3072 = 2048 + 1024, 12288 = 8192 +
    4096, so FLUX's rows have no padded lanes); a size of 0 leaves the segment out. One read of the row (kept in registers
    between the absmax and the quantization), one write of the codes.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row, g_row, q_row = X + row * stride_xm, G + row * stride_gm, Q + row * stride_qm
    amax = 0.0
    if BX0 > 0:
        x0, amax = _row_segment(x_row, 0, KX, amax, BX0, False, NATIVE)
    if BX1 > 0:
        x1, amax = _row_segment(x_row, BX0, KX, amax, BX1, False, NATIVE)
    if BG0 > 0:
        g0, amax = _row_segment(g_row, 0, KG, amax, BG0, True, NATIVE)
    if BG1 > 0:
        g1, amax = _row_segment(g_row, BG0, KG, amax, BG1, True, NATIVE)
    scale, inv_scale = per_token_scale(amax)
    if BX0 > 0:
        store_e4m3_segment(q_row, 0, KX, x0, inv_scale, BX0, NATIVE)
    if BX1 > 0:
        store_e4m3_segment(q_row, BX0, KX, x1, inv_scale, BX1, NATIVE)
    if BG0 > 0:
        store_e4m3_segment(q_row + KX, 0, KG, g0, inv_scale, BG0, NATIVE)
    if BG1 > 0:
        store_e4m3_segment(q_row + KX, BG0, KG, g1, inv_scale, BG1, NATIVE)
    tl.store(SCALE + row, scale)


def _launch_token_quant(x: torch.Tensor | None, gelu_input: torch.Tensor | None, wrap: Callable | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The row kernel over ``cat(x, gelu_tanh(gelu_input))`` (validated 2-D inputs, unit column stride); wrap:
    ``wrap_triton`` inside a ``triton_op`` body."""
    first = x if x is not None else gelu_input
    M = first.shape[0]
    kx = 0 if x is None else x.shape[1]
    kg = 0 if gelu_input is None else gelu_input.shape[1]
    q = torch.empty(M, kx + kg, dtype=torch.float8_e4m3fn, device=first.device)
    scale = torch.empty(M, dtype=torch.float32, device=first.device)
    (bx0, bx1), (bg0, bg1) = row_segments(kx), row_segments(kg)
    kernel = _fp8_token_quant_kernel if wrap is None else wrap(_fp8_token_quant_kernel)
    kernel[(M,)](
        first if x is None else x, first if gelu_input is None else gelu_input, q, scale, kx, kg,
        0 if x is None else x.stride(0), 0 if gelu_input is None else gelu_input.stride(0), q.stride(0),
        BX0=bx0, BX1=bx1, BG0=bg0, BG1=bg1, NATIVE=first.is_cuda,
        num_warps=row_warps(bx0 + bx1 + bg0 + bg1))
    return q, scale


def _token_quant_gelu_shape(x, gelu_input):
    width = gelu_input.shape[1] + (0 if x is None else x.shape[1])
    return (gelu_input.new_empty(gelu_input.shape[0], width, dtype=torch.float8_e4m3fn),
            gelu_input.new_empty(gelu_input.shape[0], dtype=torch.float32))


@kernel_op("quantduo::fp8_token_quant_gelu", _token_quant_gelu_shape)
def _fp8_token_quant_gelu(x: torch.Tensor | None, gelu_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row kernel as one operator for compiled graphs (Inductor's own version reads long rows twice)."""
    return _launch_token_quant(x, gelu_input, wrap_triton)


def quantize_fp8_per_token(x: torch.Tensor | None, gelu_input: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8_per_token_ref` of ``x [M, Kx]`` and / or ``gelu_input [M, Kg]`` (2-D, unit column
    stride): the Triton row kernel on CUDA (and under the interpreter). While ``torch.compile`` traces, plain rows
    are quantized by PyTorch ops (fusable into x's producer) and rows with a GELU part by the kernel as one op."""
    given = [t for t in (x, gelu_input) if t is not None]
    if not given:
        raise ValueError("give x, gelu_input or both")
    for t in given:
        if t.dim() != 2 or t.stride(-1) != 1:
            raise ValueError(f"expected a 2-D row-major tensor, got shape {tuple(t.shape)} strides {t.stride()}")
    if len(given) == 2 and x.shape[0] != gelu_input.shape[0]:
        raise ValueError(f"x and gelu_input need the same rows, got {tuple(x.shape)} and {tuple(gelu_input.shape)}")
    if torch.compiler.is_compiling():
        if gelu_input is None:
            return quantize_fp8_per_token_ref(x)
        return _fp8_token_quant_gelu(x, gelu_input)
    return _launch_token_quant(x, gelu_input)


def expand_w4_fp8(qweight: torch.Tensor, wscales: torch.Tensor, lora_down: torch.Tensor | None,
                  lora_up: torch.Tensor | None, inv_smooth: torch.Tensor | None, inv_wscale: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    """float8_e4m3fn ``[N, K]``: ``e4m3(clamp(W * inv_wscale[n], +-448))`` with ``W`` the reconstructed layer
    weight of :func:`~quantduo.kernels.dequant_w4.dequant_w4` (same arguments; inv_smooth and inv_wscale
    float32 ``[K]`` / ``[N]``). Eager calls on CUDA: the Gluon kernel of :mod:`.expand_w4_mma` where it serves the
    operands (``QUANTDUO_FP8_EXPANSION=triton`` in the environment keeps the Triton kernel), else the Triton kernel.
    While ``torch.compile`` traces: the operator ``quantduo::expand_w4_fp8``, the Triton kernel launched by Inductor
    (Inductor cannot launch Gluon kernels, and as an opaque operator the Gluon one cost more host time than it saved
    device time: BENCHMARKS.md, fifteenth session); inside :func:`for_cuda_graphs` (or with
    ``QUANTDUO_FP8_EXPANSION=gluon``) the opaque operator ``quantduo::expand_w4_fp8_gluon`` (the eager choice)."""
    args = (qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size)
    if torch.compiler.is_compiling():
        return (_expand_w4_fp8_gluon_op if _gluon_when_compiled() else _expand_w4_fp8_op)(*args)
    return _expand_eagerly(*args)


def _gluon_when_compiled() -> bool:
    """Whether code being traced gets the opaque Gluon expansion operator (see QUANTDUO_FP8_EXPANSION)."""
    return EXPANSION == "gluon" or (EXPANSION == "auto" and _TRACING_FOR_CUDA_GRAPHS)


def _expand_eagerly(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size) -> torch.Tensor:
    """The Gluon expansion where it serves the operands (unless QUANTDUO_FP8_EXPANSION=triton), else the Triton
    kernel."""
    if EXPANSION != "triton" and group_size == expand_w4_mma.GROUP and \
            expand_w4_mma.supports(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale):
        return expand_w4_mma.expand_w4_fp8_mma(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale)
    return _launch_expansion(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size)


def _launch_expansion(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size,
                      wrap: Callable | None = None) -> torch.Tensor:
    """The Triton expansion kernel of :func:`expand_w4_fp8`; wrap: ``wrap_triton`` inside a ``triton_op`` body."""
    return dequant_w4(qweight, wscales, torch.float8_e4m3fn, group_size, lora_down, lora_up, scratch=False,
                      row_scale=inv_wscale, inv_smooth=inv_smooth, wrap=wrap)


def _expand_shape(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size):
    return qweight.new_empty(qweight.shape[0], 2 * qweight.shape[1], dtype=torch.float8_e4m3fn)


@kernel_op("quantduo::expand_w4_fp8", _expand_shape)
def _expand_w4_fp8_op(qweight: torch.Tensor, wscales: torch.Tensor, lora_down: torch.Tensor | None,
                      lora_up: torch.Tensor | None, inv_smooth: torch.Tensor | None, inv_wscale: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    return _launch_expansion(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size, wrap_triton)


@torch.library.custom_op("quantduo::expand_w4_fp8_gluon", mutates_args=())
def _expand_w4_fp8_gluon_op(qweight: torch.Tensor, wscales: torch.Tensor, lora_down: torch.Tensor | None,
                            lora_up: torch.Tensor | None, inv_smooth: torch.Tensor | None, inv_wscale: torch.Tensor,
                            group_size: int) -> torch.Tensor:
    """:func:`expand_w4_fp8` under ``torch.compile`` with QUANTDUO_FP8_EXPANSION=gluon: an opaque operator that runs
    the eager choice (the Gluon kernel where it serves the operands)."""
    return _expand_eagerly(qweight, wscales, lora_down, lora_up, inv_smooth, inv_wscale, group_size)


_expand_w4_fp8_gluon_op.register_fake(_expand_shape)


def fp8_rowwise_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(a @ b^T) * a_scale[m] * b_scale[n] + bias`` for float8_e4m3fn a ``[M, K]``, b ``[N, K]`` (K a multiple of
    16), float32 scales ``[M]`` / ``[N]``; ``[M, N]`` in out_dtype. CUDA: ``torch._scaled_mm`` (row-wise scaling;
    fast_accum: Hopper's fp8 accumulators are not promoted to float32 along K); elsewhere float32 emulation."""
    if a.shape[1] % 16:
        raise ValueError(f"fp8 GEMM needs K % 16 == 0, got {a.shape[1]}")
    if a.is_cuda:
        return torch._scaled_mm(a, b.t(), scale_a=a_scale[:, None], scale_b=b_scale[None, :],
                                bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    y = (a.float() @ b.float().T) * a_scale[:, None] * b_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
