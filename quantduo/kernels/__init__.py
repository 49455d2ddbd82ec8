"""Triton engine for SVDQuant layers (Nunchaku-style fusion; Hopper-aware).

* :func:`svdquant_linear_forward` — forward of :class:`~quantduo.svdquant.SVDQuantLinear` (any format):
  INT4/UINT4 W4A4 -> kernel 1 (:mod:`.act_quant`) + kernel 2 (:mod:`.gemm_w4a4`); W4A16 -> kernel 2 on
  16-bit inputs; NVFP4 -> Triton weight dequantization (:mod:`.nvfp4`) + float GEMM.
* :func:`svdquant_mlp_forward` — fc1 -> GELU -> fc2 where fc1's epilogue applies GELU and quantizes for fc2.
* :func:`w4a8_linear_forward` — forward of the Hopper W4A8 format
  (:class:`~quantduo.svdquant.hopper_formats.SVDQuantW4A8Linear`, :mod:`.gemm_w4a8`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .act_quant import act_quant
from .gemm_w4a4 import w4_gemm
from .gemm_w4a8 import expand_w4_int8, w4a8_gemm
from .nvfp4 import nvfp4_dequant

# Tokens from which the W4A8 path expands the weights to int8 once per call (compute-bound regime).
W4A8_EXPAND_MIN_TOKENS = 1024

__all__ = ["svdquant_linear_forward", "svdquant_mlp_forward", "w4a8_linear_forward", "act_quant", "w4_gemm",
           "w4a8_gemm", "expand_w4_int8", "nvfp4_dequant", "W4A8_EXPAND_MIN_TOKENS"]


def _flat_padded(module, x: torch.Tensor) -> torch.Tensor:
    """``x [..., in_features]`` -> contiguous ``[M, K_padded]`` (zero-padded like the module)."""
    if x.shape[-1] != module.in_features:
        raise ValueError(f"expected inputs with last dim {module.in_features}, got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, module.in_features)
    extra = module.padded_in_features - module.in_features
    return (F.pad(x2, (0, extra)) if extra else x2).contiguous()


def _lora(module):
    return (module.lora_down, module.lora_up) if module.rank > 0 else (None, None)


def _nvfp4_forward(module, x2: torch.Tensor) -> torch.Tensor:
    """NVFP4 weights: Triton dequantization, then the reference arithmetic in float32."""
    from quantduo.svdquant import quantizers as qz

    w = nvfp4_dequant(module.qweight, module.wscales, module.wscale_global)
    xs = x2 / module.smooth_factor.to(x2.dtype)
    act = qz.fake_quant(xs.float() + module.act_shift.float(), module.act_format, module.group_size)
    y = act @ w.T
    if module.rank > 0:
        y = y + ((xs.to(module.dtype) @ module.lora_down) @ module.lora_up.T).float()
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x2.dtype)


def svdquant_linear_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Fused forward of an ``SVDQuantLinear``: ``x [..., in_features]`` -> ``[..., out_features]`` (x.dtype)."""
    lead = x.shape[:-1]
    x2 = _flat_padded(module, x)
    if module.weight_format == "nvfp4" or module.act_format == "nvfp4":
        y = _nvfp4_forward(module, x2)
    else:
        ld, lu = _lora(module)
        if module.act_format == "none":
            lxp = act_quant(x2, module.smooth_factor, None, ld, "none")[2] if ld is not None else None
            y = w4_gemm(x2, None, module.qweight, module.wscales, lxp, lu, module.bias, "none", x.dtype,
                        smooth=module.smooth_factor)
        else:
            q, qs, lxp = act_quant(x2, module.smooth_factor, module.act_shift, ld, module.act_format)
            y = w4_gemm(q, qs, module.qweight, module.wscales, lxp, lu, module.bias, module.act_format, x.dtype)
    return y.reshape(*lead, module.out_features)


def svdquant_mlp_forward(fc1, fc2, x: torch.Tensor, gelu: str = "tanh") -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` for two W4A4 ``SVDQuantLinear`` with fc1's epilogue doing GELU (tanh) and
    fc2's kernel 1 (smoothing, 4-bit quantization, low-rank down-projection): the hidden activations never
    reach memory in 16 bits. Falls back to two separate layers when the shapes or formats don't allow it.
    """
    if gelu != "tanh":
        raise ValueError("only the tanh GELU is fused")
    fusable = (
        fc1.weight_format == fc2.weight_format == "int4" and fc1.act_format in ("int4", "uint4")
        and fc2.act_format in ("int4", "uint4") and fc2.in_features == fc1.out_features
        and fc2.padded_in_features == fc1.out_features and fc1.out_features % 128 == 0
        and fc1.group_size == fc2.group_size == 64
    )
    if not fusable:
        return fc2(F.gelu(fc1(x), approximate="tanh"))
    lead = x.shape[:-1]
    x2 = _flat_padded(fc1, x)
    ld1, lu1 = _lora(fc1)
    q, qs, lxp = act_quant(x2, fc1.smooth_factor, fc1.act_shift, ld1, fc1.act_format)
    ld2, lu2 = _lora(fc2)
    cfg = {"BM": 16, "BN": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4} if x2.shape[0] <= 16 else None
    q2, qs2, lx2 = w4_gemm(q, qs, fc1.qweight, fc1.wscales, lxp, lu1, fc1.bias, fc1.act_format, x.dtype, gelu=True,
                           next_layer=dict(smooth=fc2.smooth_factor, shift=fc2.act_shift, lora_down=ld2,
                                           mode=fc2.act_format), config=cfg)
    y = w4_gemm(q2, qs2, fc2.qweight, fc2.wscales, lx2, lu2, fc2.bias, fc2.act_format, x.dtype)
    return y.reshape(*lead, fc2.out_features)


def w4a8_linear_forward(module, x: torch.Tensor, expand: bool | None = None) -> torch.Tensor:
    """Forward of an ``SVDQuantW4A8Linear``: ``x [..., in_features]`` -> ``[..., out_features]`` (x.dtype).

    expand: use the int8 scratch expansion (default: when there are >= W4A8_EXPAND_MIN_TOKENS tokens).
    """
    lead = x.shape[:-1]
    x2 = _flat_padded(module, x)
    ld, lu = _lora(module)
    q, qs, lxp = act_quant(x2, module.smooth_factor, None, ld, "int8")
    if expand is None:
        expand = x2.shape[0] >= W4A8_EXPAND_MIN_TOKENS
    weight = expand_w4_int8(module.qweight, module.wmult) if expand else module.qweight
    y = w4a8_gemm(q, qs, weight, module.wmult, module.wscale_row, lxp, lu, module.bias, x.dtype)
    return y.reshape(*lead, module.out_features)
