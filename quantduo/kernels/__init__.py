"""Triton engine for SVDQuant layers (Nunchaku-style fusion; Hopper-aware).

* :func:`svdquant_linear_forward` — forward of :class:`~quantduo.svdquant.SVDQuantLinear` (any format):
  INT4/UINT4 W4A4 -> kernel 1 (:mod:`.act_quant`) + the skinny split-K GEMM (:mod:`.gemm_w4_skinny`) up to 64
  tokens, above that kernel 1's dequantized activations + cuBLAS (path "float"; kernel 2, :mod:`.gemm_w4a4`, is
  path "packed"); W4A16 -> the one-token GEMV (:mod:`.gemv_w4`, decoding), the skinny GEMM (few tokens), the
  weight-streaming GEMM (:mod:`.gemm_w4_dequant`, float32 few tokens) or, above 64 tokens, the whole weight
  reconstructed into a scratch buffer (:mod:`.dequant_w4`) + cuBLAS; NVFP4 -> Triton weight dequantization
  (:mod:`.nvfp4`) + float GEMM.
* :func:`svdquant_mlp_forward` — fc1 -> GELU -> fc2 (path "packed": fc1's epilogue applies GELU and quantizes for
  fc2).
* :func:`w4a8_linear_forward` — forward of the Hopper W4A8 formats
  (:class:`~quantduo.svdquant.hopper_formats.SVDQuantW4A8Linear`, int8 or fp8 activations): small M -> the skinny
  GEMM (fp8 format, 16-bit activations) or the weight-streaming split-K GEMM (int8); large M, int8 -> per-token
  kernel 1 + weight expansion into a cached scratch buffer + int8 GEMM (:mod:`.gemm_w4a8`); large M, fp8 -> the
  fp8 concatenation (:mod:`.fp8_concat`: two activation passes, expansion with the low-rank tail, one
  ``torch._scaled_mm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .act_quant import act_quant
from .dequant_w4 import dequant_w4
from .fp8_concat import fp8_concat_quant, fp8_row_stats, fp8_rowwise_gemm
from .gemm_w4_dequant import w4_dequant_gemm
from .gemm_w4_skinny import w4_skinny_gemm
from .gemm_w4a4 import w4_gemm
from .gemm_w4a8 import expand_w4, w4a8_gemm
from .gemv_w4 import w4_gemv
from .nvfp4 import nvfp4_dequant
from .reference import smooth_input

# Token counts up to which the weight-streaming GEMM serves W4A16 with in-kernel smoothing and the fp8
# W4A8 format with 16-bit activations (memory-bound regime; NOTES.md).
DEQUANT_MAX_TOKENS = 64
# Token counts up to which W4A16 and W4A4 run the skinny split-K GEMM (weights as the wide dot operand).
SKINNY_MAX_TOKENS = 64
# Token counts up to which W4A16 runs the CUDA-core GEMV (one program row per token, each re-reading the weights;
# at 4 tokens the skinny GEMM was 1.6-2.0x faster with the low-rank branch, at 1 token 0.7-0.9x as fast,
# BENCHMARKS.md).
GEMV_MAX_TOKENS = 1
# Tokens from which the int8 W4A8 path expands the weights once per call (below: the packed GEMM, which
# measured faster than the weight-streaming GEMM at 16 tokens on H200). fp8 uses the concatenation above
# DEQUANT_MAX_TOKENS.
W4A8_EXPAND_MIN_TOKENS = 1024
W4A8_PATHS = ("dequant", "packed", "expanded", "concat")
W4A4_PATHS = ("skinny", "packed", "float")

__all__ = ["svdquant_linear_forward", "svdquant_mlp_forward", "w4a8_linear_forward", "act_quant", "w4_gemm",
           "w4a8_gemm", "w4_dequant_gemm", "dequant_w4", "w4_skinny_gemm", "w4_gemv", "expand_w4",
           "nvfp4_dequant",
           "DEQUANT_MAX_TOKENS", "SKINNY_MAX_TOKENS", "GEMV_MAX_TOKENS", "W4A8_EXPAND_MIN_TOKENS", "W4A8_PATHS",
           "W4A4_PATHS", "is_w4a4", "w4a4_path", "w4a8_path"]


def _flat_padded(module, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in_features]`` -> contiguous ``[M, K_padded]`` (zero-padded like the module)."""
    return module._pad_input(x).reshape(-1, module.padded_in_features).contiguous()


def _lora(module):
    return (module.lora_down, module.lora_up) if module.rank > 0 else (None, None)


def _lowrank_partials(module, x2: torch.Tensor, lora_down: torch.Tensor | None) -> torch.Tensor | None:
    """Kernel 1's low-rank partials ``[S, M, r]`` of ``x2 / smooth`` (no quantization), None without low-rank."""
    return act_quant(x2, module.smooth_factor, None, lora_down, "none")[2] if lora_down is not None else None


def _nvfp4_forward(module, x: torch.Tensor) -> torch.Tensor:
    """NVFP4 weights and/or activations: Triton dequantization of NVFP4 weights, then the reference
    arithmetic in float32."""
    residual = None
    if module.weight_format == "nvfp4":
        residual = nvfp4_dequant(module.qweight, module.wscales, module.wscale_global)
    return module.forward_reference(x, residual)


def _streaming_forward(module, x2: torch.Tensor, wfactor: torch.Tensor, wrow: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """16-bit activations through the weight-streaming GEMM, smoothing in-kernel (small M): kernel 1 computes
    only the low-rank partials. wfactor: group scales or multipliers ``[N, K // 64]``; wrow: per-row scale."""
    ld, lu = _lora(module)
    lxp = _lowrank_partials(module, x2, ld)
    return w4_dequant_gemm(x2, module.qweight, wfactor, lxp, lu, module.bias, x2.dtype, smooth=module.smooth_factor,
                           wrow=wrow)


def _w4a16_forward(module, x2: torch.Tensor, ld, lu) -> torch.Tensor:
    """W4A16: one token -> the GEMV; up to 64 16-bit tokens -> kernel 1 (smoothing + low-rank) and the skinny GEMM
    (float32 tokens: the weight-streaming GEMM, smoothing in-kernel); more tokens, or groups other than 64 (which
    only the reconstruction serves) -> the reconstructed weight and a cuBLAS GEMM
    (:func:`_reconstructed_w4a16_forward`)."""
    M = x2.shape[0]
    g64 = module.group_size == 64
    if M <= GEMV_MAX_TOKENS and g64:
        xs = x2 if module.smoothing_is_identity() else smooth_input(x2, module.smooth_factor)
        lxp = _lowrank_partials(module, x2, ld)
        return w4_gemv(xs, module.qweight, module.wscales, lxp, lu, module.bias, x2.dtype)
    if M <= SKINNY_MAX_TOKENS and g64 and x2.dtype != torch.float32:
        if module.smoothing_is_identity():
            xs = x2
            lxp = _lowrank_partials(module, x2, ld)
        else:
            xs, _, lxp = act_quant(x2, module.smooth_factor, None, ld, "smooth")
        return w4_skinny_gemm(xs, None, module.qweight, module.wscales, lxp, lu, module.bias, "none", x2.dtype)
    if M <= DEQUANT_MAX_TOKENS and g64:
        return _streaming_forward(module, x2, module.wscales)
    return _reconstructed_w4a16_forward(module, x2, ld, lu)  # any group size


def _reconstructed_w4a16_forward(module, x2: torch.Tensor, ld, lu) -> torch.Tensor:
    """W4A16 at large M (compute-bound): smoothing, INT4 residual and low-rank branch reconstructed into one weight
    in the shared scratch buffer (:mod:`.dequant_w4`), then one cuBLAS GEMM with the bias."""
    smooth = None if module.smoothing_is_identity() else module.smooth_factor
    w = dequant_w4(module.qweight, module.wscales, x2.dtype, module.group_size, ld, lu, smooth)
    return F.linear(x2, w, _bias_as(module, x2.dtype))


def _bias_as(module, dtype: torch.dtype) -> torch.Tensor | None:
    """The module's bias in ``dtype`` for ``F.linear`` (None without one)."""
    return None if module.bias is None else module.bias.to(dtype)


def is_w4a4(module) -> bool:
    """INT4 weights with INT4 / shifted UINT4 activations (the layers :data:`W4A4_PATHS` serve)."""
    return module.weight_format == "int4" and module.act_format in ("int4", "uint4")


def w4a4_path(tokens: int) -> str:
    """Default W4A4 path for ``tokens`` rows: ``"skinny"`` up to SKINNY_MAX_TOKENS, else ``"float"``."""
    return "skinny" if tokens <= SKINNY_MAX_TOKENS else "float"


def _w4a4_forward(module, x2: torch.Tensor, ld, lu, path: str) -> torch.Tensor:
    """W4A4 (INT4 / shifted UINT4 activations) through ``path`` (see :func:`svdquant_linear_forward`)."""
    if path == "float":
        xq, _, _ = act_quant(x2, module.smooth_factor, module.act_shift, None, module.act_format + "_deq")
        w = dequant_w4(module.qweight, module.wscales, x2.dtype, module.group_size)
        y = F.linear(xq, w, _bias_as(module, x2.dtype))
        if ld is not None:  # (x / smooth) @ lora_down as x @ (lora_down / smooth): one cuBLAS GEMM over x
            lx = x2 @ (ld / module.smooth_factor[:, None]).to(x2.dtype)
            y.addmm_(lx.to(y.dtype), lu.to(y.dtype).t())
        return y
    q, qs, lxp = act_quant(x2, module.smooth_factor, module.act_shift, ld, module.act_format)
    gemm = w4_skinny_gemm if path == "skinny" else w4_gemm
    return gemm(q, qs, module.qweight, module.wscales, lxp, lu, module.bias, module.act_format, x2.dtype)


def svdquant_linear_forward(module, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """Fused forward of an ``SVDQuantLinear``: ``x [..., in_features]`` -> ``[..., out_features]`` (x.dtype).

    path (W4A4 layers only; default :func:`w4a4_path`):

    * ``"skinny"``: kernel 1 (4-bit codes) + the skinny split-K GEMM (at most SKINNY_MAX_TOKENS tokens);
    * ``"packed"``: kernel 1 + kernel 2, the 4-bit GEMM with the fused low-rank epilogue (exact integer products);
    * ``"float"``: kernel 1 writes the dequantized 4-bit activations (``q * scale``, rounded to x's dtype), the
      INT4 residual is dequantized into the scratch buffer, one cuBLAS 16-bit GEMM with the bias; the low-rank
      branch is two cuBLAS GEMMs (``x @ (lora_down / smooth)``, then a rank-r update of the output). Same
      quantization points as the other paths; the 16-bit operands carry their rounding (relative 2^-9 per
      operand in bfloat16: ~3.5e-3 relative output difference at FLUX shapes, against ~0.09 for W4A4's own
      error). Hopper has no 4-bit tensor cores, and its 16-bit ones run this 3x faster than the 4-bit GEMM
      (BENCHMARKS.md).
    """
    lead = x.shape[:-1]
    if path is not None and (path not in W4A4_PATHS or not is_w4a4(module)):
        raise ValueError(f"path must be one of {W4A4_PATHS} and is for W4A4 INT4 layers, got {path!r} for "
                         f"{module.weight_format} weights / {module.act_format} activations")
    if module.weight_format == "nvfp4" or module.act_format == "nvfp4":
        return _nvfp4_forward(module, x)
    x2 = _flat_padded(module, x)
    ld, lu = _lora(module)
    if module.act_format in ("none", "fp8"):  # fp8 execution (SVDQuantFP8Linear) runs few tokens as W4A16
        y = _w4a16_forward(module, x2, ld, lu)
    else:
        y = _w4a4_forward(module, x2, ld, lu, path or w4a4_path(x2.shape[0]))
    return y.reshape(*lead, module.out_features)


def svdquant_mlp_forward(fc1, fc2, x: torch.Tensor, gelu: str = "tanh", path: str | None = None) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for two W4A4 ``SVDQuantLinear`` (GELU: tanh).

    path (default :func:`w4a4_path`): ``"packed"``: fc1's kernel 2 epilogue does GELU and fc2's kernel 1
    (smoothing, 4-bit quantization, low-rank down-projection), so the hidden activations never reach memory in
    16 bits; ``"skinny"``: fc1 is the skinny GEMM with GELU, fc2 a separate layer; ``"float"``: both layers
    through their 16-bit cuBLAS path with GELU between them. Falls back to two separate layers when the shapes
    or formats don't allow the fusion.
    """
    if gelu != "tanh":
        raise ValueError("only the tanh GELU is fused")
    path = path or w4a4_path(x.numel() // x.shape[-1])
    if path not in W4A4_PATHS:
        raise ValueError(f"path must be one of {W4A4_PATHS}, got {path!r}")
    four_bit = is_w4a4(fc1) and is_w4a4(fc2)
    if path == "float" and four_bit:
        h = F.gelu(svdquant_linear_forward(fc1, x, path), approximate="tanh")
        return svdquant_linear_forward(fc2, h, path)
    fusable = four_bit and (
        fc2.in_features == fc1.out_features and fc2.padded_in_features == fc1.out_features
        and fc1.out_features % 128 == 0 and fc1.group_size == fc2.group_size == 64
    )
    if not fusable:
        return fc2(F.gelu(fc1(x), approximate="tanh"))
    lead = x.shape[:-1]
    x2 = _flat_padded(fc1, x)
    ld1, lu1 = _lora(fc1)
    q, qs, lxp = act_quant(x2, fc1.smooth_factor, fc1.act_shift, ld1, fc1.act_format)
    if path == "skinny":  # few tokens: split-K fc1 with GELU, then fc2 (its own kernel 1)
        h = w4_skinny_gemm(q, qs, fc1.qweight, fc1.wscales, lxp, lu1, fc1.bias, fc1.act_format, x.dtype, gelu=True)
        return fc2(h.reshape(*lead, fc1.out_features))
    ld2, lu2 = _lora(fc2)
    q2, qs2, lx2 = w4_gemm(q, qs, fc1.qweight, fc1.wscales, lxp, lu1, fc1.bias, fc1.act_format, x.dtype, gelu=True,
                           next_layer=dict(smooth=fc2.smooth_factor, shift=fc2.act_shift, lora_down=ld2,
                                           mode=fc2.act_format))
    y = w4_gemm(q2, qs2, fc2.qweight, fc2.wscales, lx2, lu2, fc2.bias, fc2.act_format, x.dtype)
    return y.reshape(*lead, fc2.out_features)


def w4a8_path(module, tokens: int) -> str:
    """Default W4A8 path for ``tokens`` rows (see DEQUANT_MAX_TOKENS / W4A8_EXPAND_MIN_TOKENS)."""
    if module.act_format == "int8":
        return "expanded" if tokens >= W4A8_EXPAND_MIN_TOKENS else "packed"
    return "dequant" if tokens <= DEQUANT_MAX_TOKENS else "concat"


def _fp8_concat_forward(module, x2: torch.Tensor) -> torch.Tensor:
    """fp8 concatenation (``hopper_formats``): pass 1 (absmax + scaled low-rank partials), pass 2 (the A
    operand with its low-rank tail), the B operand expanded into the scratch buffer with its tail, one fp8 GEMM."""
    inv_smooth, lora_down, up_fp8 = module.fp8_operands()
    amaxp, lxp = fp8_row_stats(x2, inv_smooth, lora_down)
    a, a_scale = fp8_concat_quant(x2, inv_smooth, amaxp, lxp)
    b = expand_w4(module.qweight, module.wmult, True, module.group_size, tail=up_fp8)
    return fp8_rowwise_gemm(a, b, a_scale, module.wscale_row, module.bias, x2.dtype)


def w4a8_linear_forward(module, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """Forward of an ``SVDQuantW4A8Linear``: ``x [..., in_features]`` -> ``[..., out_features]`` (x.dtype).

    path (default :func:`w4a8_path`):

    * ``"dequant"``: weight-streaming GEMM; int8: kernel 1 in absmax mode, in-kernel activation quantization;
      fp8: 16-bit activations (W4A16 execution of the same weights, more accurate than fp8 activations), through
      the skinny GEMM up to SKINNY_MAX_TOKENS 16-bit tokens;
    * ``"packed"`` (int8): 8-bit kernel 1 + GEMM unpacking the weights in registers;
    * ``"expanded"`` (int8): 8-bit kernel 1 + expansion into the scratch buffer + 8-bit GEMM;
    * ``"concat"`` (fp8): the fp8 concatenation, one ``torch._scaled_mm`` (see :func:`_fp8_concat_forward`).
    """
    lead = x.shape[:-1]
    x2 = _flat_padded(module, x)
    ld, lu = _lora(module)
    path = path or w4a8_path(module, x2.shape[0])
    fp8 = module.act_format == "fp8"
    if path not in W4A8_PATHS or (path in ("packed", "expanded") and fp8) or (path == "concat" and not fp8):
        raise ValueError(f"unknown or unsupported W4A8 path {path!r} for act_format {module.act_format!r}")
    if path == "concat":
        y = _fp8_concat_forward(module, x2)
    elif path == "dequant" and fp8 and x2.shape[0] <= SKINNY_MAX_TOKENS and x2.dtype != torch.float32:
        xs, _, lxp = act_quant(x2, module.smooth_factor, None, ld, "smooth")
        y = w4_skinny_gemm(xs, None, module.qweight, module.wmult, lxp, lu, module.bias, "none", x.dtype,
                           wrow=module.wscale_row)
    elif path == "dequant" and fp8:
        y = _streaming_forward(module, x2, module.wmult, module.wscale_row)
    elif path == "dequant":
        _, amaxp, lxp = act_quant(x2, module.smooth_factor, None, ld, "amax")
        y = w4_dequant_gemm(x2, module.qweight, module.wmult, lxp, lu, module.bias, x.dtype, smooth=module.smooth_factor,
                            act=module.act_format, amax_partials=amaxp, wrow=module.wscale_row)
    else:
        q, qs, lxp = act_quant(x2, module.smooth_factor, None, ld, module.act_format)
        weight = expand_w4(module.qweight, module.wmult, False) if path == "expanded" else module.qweight
        y = w4a8_gemm(q, qs, weight, module.wmult, module.wscale_row, lxp, lu, module.bias, x.dtype)
    return y.reshape(*lead, module.out_features)
