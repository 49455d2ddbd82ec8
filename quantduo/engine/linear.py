"""Forward of a 4-bit linear layer, dispatched by (storage format, execution, device, token count).

The layer is any object with the attributes of :class:`quantduo.svdquant.SVDQuantLinear` (``N`` out features,
``K`` padded in features, ``r`` rank):

* ``qweight`` uint8 ``[N, K // 2]``, ``wscales`` ``[N, K // G]``, ``wscale_global`` float32 ``[]`` and
  ``wscale_channel`` float32 ``[N]`` (NVFP4);
* ``smooth_factor`` / ``act_shift`` ``[K]`` (the shift is added to the input before the smoothing division:
  4-bit activations quantize ``(x + act_shift) / smooth_factor``), ``proj_down`` ``[K, r]``, ``proj_up`` ``[N, r]``,
  ``bias`` ``[N]``;
* derived (kept current by the layer): ``bias_a16`` ``[N]`` (the bias for 16-bit / fp8 activations: the
  unsigned shift's term :func:`shift_term` unfolded), ``fp8_wscale`` / ``fp8_inv_wscale`` float32 ``[N]``,
  ``fp8_inv_smooth`` float32 ``[K]``, ``smoothing_folded_out`` (all smoothing factors are 1);
* ``weight_format``, ``act_format``, ``group_size``, ``in_features``, ``out_features``, ``execution``,
  ``fast_accum``.

Execution paths (names of :mod:`quantduo.formats.registry`):

============  =========================  ============================================================
execution     tokens                     path
============  =========================  ============================================================
reference     any                        PyTorch: the stored format's arithmetic (:func:`reference_forward`)
exact, W4A4   <= 64 / more               4-bit activations (kernel 1) + the skinny split-K GEMM /
                                         dequantized activations + weight + cuBLAS
exact, NVFP4  any                        Triton weight dequantization + the reference arithmetic
a16, NVFP4    any                        Triton weight dequantization + 16-bit activations (PyTorch)
a16           <= 64 / more               smoothing kernel + the register-operand GEMM (``gemm_w4_mma``;
                                         one token of a layer without smoothing and low-rank, or where that
                                         GEMM cannot serve the operands: the GEMV; more tokens there: the
                                         skinny GEMM) / the weight reconstructed into a scratch buffer +
                                         cuBLAS (also the W4A16 formats' ``exact``)
fp8           <= 64 / more               ``a16`` / per-token fp8 activations x the weight expanded into an fp8
                                         buffer + one row-wise scaled ``torch._scaled_mm``
============  =========================  ============================================================

INT4 layers in fp8 execution above 64 tokens also read :class:`Fp8Rows`: their input already quantized per token by
its producer (:func:`layer_norm_fp8_rows`: a DiT block's adaLN in one pass), one quantization for every layer that
reads it.

Kernels run on CUDA tensors; on the CPU the same paths run their PyTorch references, unless
:func:`cpu_kernels` is active (tests: Triton's interpreter, ``TRITON_INTERPRET=1``). Under ``torch.compile`` the fp8
path above 64 tokens is traced (its activation quantization fuses into the producer, its kernels are ``triton_op``
operators that Inductor launches itself); every other kernel path is one opaque operator, ``quantduo::kernel_linear``
(:func:`kernel_linear`): no graph break.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F

from quantduo.formats import quantizers as qz
from quantduo.formats.fp8 import layer_norm_modulate_fp8_ref, quantize_fp8_per_token_ref, quantize_fp8_weight
from quantduo.formats.reference import shift_smooth_input, smooth_input
from quantduo.formats.registry import act_family
from quantduo.kernels.act_quant import act_quant
from quantduo.kernels.dequant_w4 import dequant_w4
from quantduo.kernels.fp8_linear import expand_w4_fp8, fp8_rowwise_gemm, quantize_fp8_per_token
from quantduo.kernels import gemm_w4_mma
from quantduo.kernels.gemm_w4_skinny import w4_skinny_gemm
from quantduo.kernels.gemv_w4 import w4_gemv
from quantduo.kernels.layer_norm_fp8 import gated_residual_layer_norm_fp8, layer_norm_modulate_fp8
from quantduo.kernels.nvfp4 import nvfp4_dequant
from quantduo.kernels import w4a16_cutlass

# Token counts up to which INT4 layers run the few-token GEMMs (16-bit activations: the Gluon register-operand GEMM,
# 4-bit ones: the skinny split-K GEMM); above it W4A4 dequantizes for cuBLAS, 16-bit activations reconstruct the
# weight, fp8 expands it into fp8.
SKINNY_MAX_TOKENS = 64
# Token counts up to which the fp8 execution runs the a16 kernels (16-bit activations: the register-operand GEMM
# streams the 4-bit weights, faster on an H100 than expanding them into fp8 tiles inside an fp8 GEMM at 3 of the 4
# FLUX shapes, BENCHMARKS.md); above it the weight is expanded into an fp8 buffer once per call for cuBLAS's GEMM.
FP8_A16_MAX_TOKENS = 64
# Token counts up to which 16-bit activations run the CUDA-core GEMV (decoding) when it is one launch (smoothing folded
# out, no low-rank branch: the W4A16 LLM layers) or the register-operand GEMM cannot serve them; with smoothing and a
# low-rank branch, kernel 1 + that GEMM beat smoothing + kernel 1 + GEMV at one token at every FLUX.1 and Llama-3-8B
# shape on an H100 (BENCHMARKS.md, fourteenth session).
GEMV_MAX_TOKENS = 1
# Token counts up to which 16-bit activations above SKINNY_MAX_TOKENS run CUTLASS's INT4 x bf16 GEMM where
# QUANTDUO_CUTLASS_LIB names it (kernel-notes item 76; opt-in until a device run times it against the
# reconstructed weight); above it the reconstructed weight and one cuBLAS GEMM.
LIBRARY_MAX_TOKENS = 256
# Compute capability from which CUDA GPUs have fp8 tensor cores (Ada, Hopper, Blackwell).
FP8_CAPABILITY = (8, 9)

_CPU_KERNELS = [False]


@contextlib.contextmanager
def cpu_kernels():
    """Run the Triton kernels on CPU tensors inside this block (Triton's interpreter: ``TRITON_INTERPRET=1`` must
    be set before Triton is imported); outside it CPU tensors take the PyTorch references."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("CPU kernels need the Triton interpreter: set TRITON_INTERPRET=1 before importing quantduo")
    _CPU_KERNELS[0] = True
    try:
        yield
    finally:
        _CPU_KERNELS[0] = False


def kernels_for(x: torch.Tensor) -> bool:
    """Whether ``x`` goes through the Triton kernels (CUDA, or the CPU inside :func:`cpu_kernels`)."""
    return x.is_cuda or _CPU_KERNELS[0]


_FP8_BY_DEVICE: dict[int, bool] = {}


@torch.compiler.assume_constant_result
def _device_has_fp8(index: int) -> bool:
    """Cached per device index in a plain dict (torch.compile warns about ``functools.lru_cache`` wrappers)."""
    if index not in _FP8_BY_DEVICE:
        _FP8_BY_DEVICE[index] = torch.cuda.get_device_capability(index) >= FP8_CAPABILITY
    return _FP8_BY_DEVICE[index]


def has_fp8(device: torch.device) -> bool:
    """Whether ``device`` is a CUDA GPU with fp8 tensor cores."""
    if device.type != "cuda":
        return False
    return _device_has_fp8(device.index if device.index is not None else torch.cuda.current_device())


def resolve_execution(layer, x: torch.Tensor) -> str:
    """The concrete execution of ``layer.execution`` for input ``x``: ``"auto"`` becomes ``"reference"`` on the
    CPU, ``"fp8"`` for INT4 layers on GPUs with fp8 tensor cores and ``"exact"`` on other GPUs."""
    execution = layer.execution
    if execution != "auto":
        return execution
    if not x.is_cuda:
        return "reference"
    int4 = layer.weight_format == "int4" and act_family(layer.act_format) != "nvfp4"
    return "fp8" if int4 and has_fp8(x.device) else "exact"


def tokens_of(x: torch.Tensor) -> int:
    """Rows of ``x [..., K]``."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class Fp8Rows(NamedTuple):
    """A layer input ``[*lead, K]`` already quantized per token (:func:`quantize_fp8_per_token_ref`'s codes), read
    by INT4 layers in fp8 execution (:func:`takes_fp8_rows`) in place of the 16-bit tensor: ``codes``
    float8_e4m3fn ``[M, K]``, ``scale`` float32 ``[M]`` (M = prod(lead)), ``lead`` the input's leading dims,
    ``dtype`` the 16-bit input's dtype (the layers' output dtype). One quantization serves every layer that reads
    the input, and it can come from the input's producer (:func:`layer_norm_fp8_rows`). Code that only hands the
    input on to such layers (diffusers' FLUX attention processor, a GELU MLP) takes it as it is: it answers
    ``shape``, ``dtype``, ``device`` and ``is_cuda`` like the tensor."""
    codes: torch.Tensor
    scale: torch.Tensor
    lead: tuple
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.lead, self.codes.shape[-1]))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def is_cuda(self) -> bool:
        return self.codes.is_cuda


def takes_fp8_rows(layer, x: torch.Tensor) -> bool:
    """Whether ``layer(x)`` (``x [..., K]``) can read :class:`Fp8Rows` of x: an INT4 layer in fp8 execution for x,
    above :data:`FP8_A16_MAX_TOKENS` tokens (where the layer quantizes x per token itself), without padded input
    channels."""
    return (getattr(layer, "weight_format", None) == "int4" and resolve_execution(layer, x) == "fp8"
            and tokens_of(x) > FP8_A16_MAX_TOKENS and layer.padded_in_features == layer.in_features == x.shape[-1])


def layer_norm_fp8_rows(x0: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                        x1: torch.Tensor | None = None) -> Fp8Rows:
    """A DiT block's adaLN output ``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` (x the rows of
    ``cat([x0, x1], dim=1)``, x0 ``[B, S0, K]``, x1 ``[B, S1, K]`` or None, shift / scale ``[B, K]``) as
    :class:`Fp8Rows` ``[B, S0 + S1, K]``: one pass by the kernel
    (:func:`quantduo.kernels.layer_norm_fp8.layer_norm_modulate_fp8`), its reference off the kernels."""
    if kernels_for(x0):
        codes, qscale = layer_norm_modulate_fp8(x0, shift, scale, eps, x1)
    else:
        x = x0 if x1 is None else torch.cat([x0, x1], dim=1)
        codes, qscale = layer_norm_modulate_fp8_ref(x, shift, scale, eps)
    tokens = x0.shape[1] + (0 if x1 is None else x1.shape[1])
    return Fp8Rows(codes, qscale, (x0.shape[0], tokens), x0.dtype)


def gated_residual_fp8_rows(x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                            scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, Fp8Rows]:
    """A DiT block's residual update followed by its next adaLN: ``u = x + gate[:, None] * residual`` (x, residual
    ``[B, S, K]``, gate / shift / scale ``[B, K]``, one dtype, product and sum each rounded to it) and
    :func:`layer_norm_fp8_rows` of u: ``(u [B, S, K], Fp8Rows [B, S, K])``, one pass by the kernel
    (:func:`quantduo.kernels.layer_norm_fp8.gated_residual_layer_norm_fp8`), its reference off the kernels."""
    if kernels_for(x):
        codes, qscale, updated = gated_residual_layer_norm_fp8(x, residual, gate, shift, scale, eps)
    else:
        updated = x + gate[:, None] * residual
        codes, qscale = layer_norm_modulate_fp8_ref(updated, shift, scale, eps)
    return updated, Fp8Rows(codes, qscale, tuple(x.shape[:2]), x.dtype)


def _rows_forward(layer, rows: Fp8Rows) -> torch.Tensor:
    """``layer`` on :class:`Fp8Rows` -> ``[*rows.lead, out_features]`` in rows.dtype."""
    in_features = rows.codes.shape[-1]
    if (layer.weight_format != "int4" or resolve_execution(layer, rows.codes) != "fp8"
            or not layer.padded_in_features == layer.in_features == in_features):
        raise ValueError(f"{type(layer).__name__} ({layer.weight_format} weights, execution {layer.execution!r}, "
                         f"{layer.in_features} in features, {layer.padded_in_features} padded) cannot read fp8 rows "
                         f"of {in_features} channels: only INT4 layers in fp8 execution without padding can")
    if kernels_for(rows.codes):
        y = _fp8_gemm(layer, rows.codes, rows.scale, rows.dtype)
    else:
        y = fp8_codes_reference(layer, rows.codes, rows.scale, rows.dtype)
    return y.reshape(*rows.lead, layer.out_features)


def linear_forward(layer, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
    """``x [..., in_features]`` (or :class:`Fp8Rows` of it) -> ``[..., out_features]`` in x.dtype, by
    ``layer.execution``."""
    if isinstance(x, Fp8Rows):
        return _rows_forward(layer, x)
    execution = resolve_execution(layer, x)
    if execution == "fp8" and tokens_of(x) <= FP8_A16_MAX_TOKENS:
        execution = "a16"  # few tokens are memory-bound: 16-bit activations
    if execution == "reference" or not kernels_for(x):
        y = _reference_of(execution)(layer, x)
    elif execution == "fp8" and layer.weight_format == "int4":
        y = _fp8_gemm(layer, *quantize_fp8_per_token(_flat_padded(layer, x)), x.dtype)  # traced by torch.compile
    else:
        y = kernel_linear(layer, _flat_padded(layer, x), execution)
    return y.reshape(*x.shape[:-1], layer.out_features)


def gelu_linear_forward(layer, gelu_input: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(cat(prefix, gelu_tanh(gelu_input)))``: gelu_input ``[..., Kg]``, prefix ``[..., in_features - Kg]``
    or None. In fp8 execution above :data:`FP8_A16_MAX_TOKENS` tokens the GELU and the concatenation happen inside the
    per-token activation quantization (one pass, no 16-bit copy of the layer input)."""
    width = gelu_input.shape[-1] + (0 if prefix is None else prefix.shape[-1])
    if width != layer.in_features or (prefix is not None and prefix.shape[:-1] != gelu_input.shape[:-1]):
        raise ValueError(f"the layer takes {layer.in_features} input channels, got gelu_input "
                         f"{tuple(gelu_input.shape)} and prefix {None if prefix is None else tuple(prefix.shape)}")
    fused = (resolve_execution(layer, gelu_input) == "fp8" and kernels_for(gelu_input)
             and tokens_of(gelu_input) > FP8_A16_MAX_TOKENS and layer.padded_in_features == layer.in_features)
    if not fused:
        h = F.gelu(gelu_input, approximate="tanh")
        return linear_forward(layer, h if prefix is None else torch.cat([prefix, h], dim=-1))
    rows = lambda t: None if t is None else t.reshape(-1, t.shape[-1]).contiguous()  # noqa: E731
    y = _fp8_gemm(layer, *quantize_fp8_per_token(rows(prefix), rows(gelu_input)), gelu_input.dtype)
    return y.reshape(*gelu_input.shape[:-1], layer.out_features)


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
def _pad_input(layer, x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"{type(layer).__name__} expects inputs with last dim {layer.in_features}, "
                         f"got shape {tuple(x.shape)}")
    extra = layer.padded_in_features - layer.in_features
    return F.pad(x, (0, extra)) if extra else x


def _flat_padded(layer, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in_features]`` -> contiguous ``[M, K_padded]`` (zero-padded like the layer)."""
    return _pad_input(layer, x).reshape(-1, layer.padded_in_features).contiguous()


def dequantized_residual(layer) -> torch.Tensor:
    """The layer's 4-bit residual as float32 ``[N, K_padded]`` (smoothed input space; NVFP4: times the channel
    scales)."""
    if layer.weight_format == "nvfp4":
        tensor_scaled = qz.dequantize_nvfp4(qz.unpack_nibbles(layer.qweight), layer.wscales, layer.wscale_global)
        return tensor_scaled * layer.wscale_channel[:, None]
    return qz.dequantize_groups(qz.unpack_int4(layer.qweight), layer.wscales)


def shift_term(layer) -> torch.Tensor:
    """What the unsigned shift adds to the 4-bit GEMM's output, float32 ``[N]``: ``Q_w(R) @ (act_shift / smooth)``
    (the 16-bit-activation paths, which run without the shift, add it back to the stored ``bias``; that bias was
    corrected by calibration with the unquantized residual, as deepcompressor corrects it)."""
    return dequantized_residual(layer) @ (layer.act_shift.float() / layer.smooth_factor.float())


def _low_rank(layer, x_smooth: torch.Tensor) -> torch.Tensor:
    """The 16-bit low-rank branch ``(x_smooth @ proj_down) @ proj_up^T`` in the layer dtype."""
    return (x_smooth.to(layer.proj_down.dtype) @ layer.proj_down) @ layer.proj_up.T


def reference_forward(layer, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The stored format's arithmetic: ``Q_a((x + act_shift) / smooth) @ R^T`` in float32 (the sum and the
    quotient each rounded to x.dtype: :func:`~quantduo.formats.reference.shift_smooth_input`; ``Q_a`` Nunchaku's
    run-time rule, :func:`~quantduo.formats.quantizers.fake_quant_activations`) + the 16-bit low-rank
    branch of ``x / smooth`` + bias (the shift's term :func:`shift_term` is folded into the stored bias).
    ``residual``: the dequantized residual float32 ``[N, K_padded]`` if already at hand. Output in x.dtype, shape
    ``[..., N]``."""
    xp = _pad_input(layer, x)
    x_smooth = smooth_input(xp, layer.smooth_factor)
    residual = dequantized_residual(layer) if residual is None else residual
    act = qz.fake_quant_activations(shift_smooth_input(xp, layer.smooth_factor, layer.act_shift).float(),
                                    layer.act_format, layer.group_size, x.dtype)
    y = act @ residual.T + _low_rank(layer, x_smooth).float()
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype)


def a16_reference_forward(layer, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """16-bit activations on the stored weights: ``(x / smooth) @ R^T`` in float32 + the low-rank branch +
    ``bias_a16``; ``residual`` as in :func:`reference_forward`. Output in x.dtype, ``[..., N]``."""
    x_smooth = _pad_input(layer, x) / layer.smooth_factor.to(x.dtype)
    residual = dequantized_residual(layer) if residual is None else residual
    y = x_smooth.float() @ residual.T + _low_rank(layer, x_smooth).float()
    if layer.bias_a16 is not None:
        y = y + layer.bias_a16.float()
    return y.to(x.dtype)


def reconstructed_weight(layer) -> torch.Tensor:
    """The whole layer weight ``(R + proj_up @ proj_down^T) / smooth`` float32 ``[N, K_padded]``."""
    w_hat = dequantized_residual(layer) + layer.proj_up.float() @ layer.proj_down.float().T
    return w_hat / layer.smooth_factor.float()[None, :]


def fp8_reference_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """fp8 execution (above :data:`FP8_A16_MAX_TOKENS` tokens) in float32 products of the exact fp8 operands:
    per-token fp8 activations times the reconstructed weight in fp8 with the per-channel scale ``fp8_wscale``, +
    ``bias_a16``. Output in x.dtype, ``[..., N]``."""
    y = fp8_codes_reference(layer, *quantize_fp8_per_token_ref(_flat_padded(layer, x)), x.dtype)
    return y.reshape(*x.shape[:-1], layer.out_features)


def fp8_codes_reference(layer, xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The fp8 execution's GEMM in float32 on per-token codes ``xq`` float8_e4m3fn ``[M, K_padded]`` (scales
    float32 ``[M]``): ``[M, N]`` in out_dtype."""
    w8 = quantize_fp8_weight(reconstructed_weight(layer), layer.fp8_inv_wscale)
    y = (xq.float() @ w8.T) * x_scale[:, None] * layer.fp8_wscale[None, :]
    if layer.bias_a16 is not None:
        y = y + layer.bias_a16.float()
    return y.to(out_dtype)


def _reference_of(execution: str):
    """The PyTorch function computing ``execution``'s arithmetic."""
    return {"reference": reference_forward, "exact": reference_forward, "a16": a16_reference_forward,
            "fp8": fp8_reference_forward}[execution]


# ---------------------------------------------------------------------------------------------
# kernel paths
# ---------------------------------------------------------------------------------------------
# The buffers and attributes the kernel paths read: the kernel paths run as one custom operator, opaque to
# torch.compile (no graph break per few-token layer, e.g. the one-token adaLN modulation linears of every DiT block)
# and run in program order (their kernels share scratch buffers, which a traced graph must not see).
_KERNEL_TENSORS = ("qweight", "wscales", "wscale_global", "wscale_channel", "smooth_factor", "act_shift", "proj_down",
                   "proj_up", "bias", "bias_a16", "library_scales")


def kernel_linear(layer, x2: torch.Tensor, execution: str) -> torch.Tensor:
    """``x2 [M, K_padded]`` -> ``[M, N]`` in x2.dtype through the kernels of ``execution`` (not ``reference``; fp8
    execution here only for few tokens): called directly in eager mode (no operator dispatch on the per-token hot
    path), as the operator ``quantduo::kernel_linear`` while ``torch.compile`` traces."""
    if not torch.compiler.is_compiling():
        return _kernel_forward(layer, x2, execution)
    return torch.ops.quantduo.kernel_linear(
        x2, [getattr(layer, name, None) for name in _KERNEL_TENSORS], execution, layer.weight_format,
        layer.act_format, layer.group_size, layer.in_features, layer.out_features, layer.smoothing_folded_out)


@torch.library.custom_op(
    "quantduo::kernel_linear", mutates_args=(),
    schema="(Tensor x2, Tensor?[] tensors, str execution, str weight_format, str act_format, int group_size, "
           "int in_features, int out_features, bool smoothing_folded_out) -> Tensor")
def _kernel_linear_op(x2, tensors, execution, weight_format, act_format, group_size, in_features, out_features,
                      smoothing_folded_out):
    layer = types.SimpleNamespace(
        **dict(zip(_KERNEL_TENSORS, tensors)), weight_format=weight_format, act_format=act_format,
        group_size=group_size, in_features=in_features, out_features=out_features,
        smoothing_folded_out=smoothing_folded_out)
    layer.rank, layer.padded_in_features = layer.proj_down.shape[1], layer.smooth_factor.shape[0]
    return _kernel_forward(layer, x2, execution)


@_kernel_linear_op.register_fake
def _(x2, tensors, execution, weight_format, act_format, group_size, in_features, out_features,
      smoothing_folded_out):
    return x2.new_empty(x2.shape[0], out_features)


def _kernel_forward(layer, x2: torch.Tensor, execution: str) -> torch.Tensor:
    """The body of :func:`kernel_linear` (``layer``: the buffers and attributes it names)."""
    nvfp4_weights = layer.weight_format == "nvfp4"
    if nvfp4_weights or (execution == "exact" and act_family(layer.act_format) == "nvfp4"):
        residual = nvfp4_dequant(layer.qweight, layer.wscales, layer.wscale_global) * layer.wscale_channel[:, None] \
            if nvfp4_weights else None
        forward = a16_reference_forward if execution == "a16" else reference_forward
        return forward(layer, x2[:, : layer.in_features], residual)
    if execution == "exact" and layer.act_format in ("int4", "uint4"):
        return _w4a4_kernels(layer, x2)
    bias = layer.bias if execution == "exact" else layer.bias_a16  # W4A16 formats: the same bias
    return _a16_kernels(layer, x2, bias)


def _low_rank_factors(layer):
    return (layer.proj_down, layer.proj_up) if layer.rank > 0 else (None, None)


def _lowrank_partials(layer, x2: torch.Tensor) -> torch.Tensor | None:
    """Kernel 1's low-rank partials ``[S, M, r]`` of ``x2 / smooth`` (no quantization), None without low-rank."""
    return act_quant(x2, layer.smooth_factor, None, layer.proj_down, "none")[2] if layer.rank > 0 else None


def _smoothed_with_partials(layer, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``x2 / smooth`` in x2's dtype, kernel 1's low-rank partials ``[S, M, r]`` or None) in one pass of kernel 1's
    ``smooth`` mode; ``x2`` itself where the smoothing is folded out."""
    if layer.smoothing_folded_out:
        return x2, _lowrank_partials(layer, x2)
    xs, _, lxp = act_quant(x2, layer.smooth_factor, None, _low_rank_factors(layer)[0], "smooth")
    return xs, lxp


def _a16_kernels(layer, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """16-bit activations: one token -> the GEMV where that is one launch (no smoothing, no low-rank) or the
    register-operand GEMM cannot serve it; up to 64 16-bit tokens -> kernel 1 (smoothing + low-rank) and the
    register-operand GEMM where it serves the operands, else the skinny GEMM; up to LIBRARY_MAX_TOKENS bf16 tokens
    on a Hopper GPU with the CUTLASS library loaded -> :func:`_library_a16`; more tokens, float32 tokens or groups
    other than 64 -> the reconstructed weight and one cuBLAS GEMM."""
    M = x2.shape[0]
    g64 = layer.group_size == 64
    identity = layer.smoothing_folded_out
    lora_down, lora_up = _low_rank_factors(layer)
    one_launch_gemv = identity and layer.rank == 0
    if M <= GEMV_MAX_TOKENS and g64 and (
            one_launch_gemv or not gemm_w4_mma.supports(x2, layer.qweight, layer.wscales, lora_up)):
        xs = x2 if identity else smooth_input(x2, layer.smooth_factor)
        return w4_gemv(xs, layer.qweight, layer.wscales, _lowrank_partials(layer, x2), layer.proj_up, bias, x2.dtype)
    if M <= SKINNY_MAX_TOKENS and g64 and x2.dtype != torch.float32:
        xs, lxp = _smoothed_with_partials(layer, x2)
        if gemm_w4_mma.supports(xs, layer.qweight, layer.wscales, lora_up):
            return gemm_w4_mma.w4a16_mma_gemm(xs, layer.qweight, layer.wscales, lxp, layer.proj_up, bias, x2.dtype)
        return w4_skinny_gemm(xs, None, layer.qweight, layer.wscales, lxp, layer.proj_up, bias, "none", x2.dtype)
    if M <= LIBRARY_MAX_TOKENS and g64 and w4a16_cutlass.available(x2, layer.qweight, layer.library_scales):
        return _library_a16(layer, x2, bias)
    smooth = None if identity else layer.smooth_factor
    w = dequant_w4(layer.qweight, layer.wscales, x2.dtype, layer.group_size, lora_down, lora_up, smooth)
    return F.linear(x2, w, None if bias is None else bias.to(x2.dtype))


def _library_a16(layer, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """16-bit activations on CUTLASS's INT4 x bf16 GEMM: kernel 1's ``smooth`` mode (``x / smooth`` and the low-rank
    partials), the GEMM on the stored codes and ``library_scales``, then ``+ lx @ proj_up^T`` (lx rounded to the lora
    dtype) and the bias, each added in one bf16 rounding."""
    xs, lxp = _smoothed_with_partials(layer, x2)
    y = w4a16_cutlass.w4a16_gemm(xs, layer.qweight, layer.library_scales)
    if lxp is not None:
        y = torch.addmm(y, lxp.sum(0).to(layer.proj_up.dtype), layer.proj_up.T)
    return y if bias is None else y + bias.to(y.dtype)


def _w4a4_kernels(layer, x2: torch.Tensor) -> torch.Tensor:
    """INT4 / shifted UINT4 activations: up to 64 tokens kernel 1 (4-bit codes) + the skinny GEMM; more tokens
    kernel 1's dequantized activations, the dequantized residual and one cuBLAS GEMM, plus the low-rank branch
    as ``x @ (proj_down / smooth)`` and a rank-r update."""
    ld, lu = _low_rank_factors(layer)
    if x2.shape[0] <= SKINNY_MAX_TOKENS:
        q, qs, lxp = act_quant(x2, layer.smooth_factor, layer.act_shift, ld, layer.act_format)
        return w4_skinny_gemm(q, qs, layer.qweight, layer.wscales, lxp, lu, layer.bias, layer.act_format, x2.dtype)
    xq, _, _ = act_quant(x2, layer.smooth_factor, layer.act_shift, None, layer.act_format + "_deq")
    w = dequant_w4(layer.qweight, layer.wscales, x2.dtype, layer.group_size)
    y = F.linear(xq, w, None if layer.bias is None else layer.bias.to(x2.dtype))
    if ld is not None:
        lx = x2 @ (ld / layer.smooth_factor[:, None]).to(x2.dtype)
        y.addmm_(lx.to(y.dtype), lu.to(y.dtype).t())
    return y


def _fp8_gemm(layer, xq: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """fp8 activations ``xq [M, K]`` (float8_e4m3fn, per-token scales float32 ``[M]``) times the layer weight
    expanded into fp8 + ``bias_a16`` -> ``[M, N]`` in out_dtype (one row-wise scaled GEMM). Traceable by
    ``torch.compile`` (no host syncs, no shared scratch buffers between operators)."""
    inv_smooth = None if layer.smoothing_folded_out else layer.fp8_inv_smooth
    w8 = expand_w4_fp8(layer.qweight, layer.wscales, *_low_rank_factors(layer), inv_smooth, layer.fp8_inv_wscale,
                       layer.group_size)
    return fp8_rowwise_gemm(xq, w8, x_scale, layer.fp8_wscale, layer.bias_a16, out_dtype, fast_accum=layer.fast_accum)
