"""Hopper-native SVDQuant formats: W4A8 with 8-bit-exact weight group scales (int8 or fp8 activations).

Hopper (sm_90) has no 4-bit tensor cores, and a per-64-group rescale of the accumulator (the INT4-g64
W4A4 format) keeps its 8-bit tensor cores at about bf16 speed. These formats keep the 4-bit weights but
make one long 8-bit dot exact:

* **weights**: INT4 values ``q`` in [-7, 7] (same nibble packing as :mod:`.quantizers`), group scale
  ``row_scale[n] * mult[n, g]`` with an integer multiplier ``mult`` (uint8), so ``q * mult`` is exact in
  the 8-bit operand type and ``row_scale`` (float32 per output channel) moves to the GEMM epilogue:

  - ``act_format="int8"``: ``mult`` in ``[1, MULT_MAX]``, ``|q * mult| <= 126`` is an exact int8;
  - ``act_format="fp8"``: ``mult`` in :data:`FP8_MULTS` (``2**j`` with codes in [-7, 7], or ``3 * 2**j``
    with codes in [-6, 6]), so ``q * mult`` (at most 4 significant bits, ``<= 448``) is an exact
    float8_e4m3fn.
* **activations**: symmetric per token of the smoothed input, float32 scale: INT8 (``absmax / 127``,
  round half to even) or FP8 E4M3 (``absmax / 448``, round to nearest even). There is no unsigned shift
  (signed 8-bit handles post-GELU inputs); the converter unfolds the shift term from the bias.

Storage per weight: 4 bits + 8 / 64 (multiplier) + 32 / K (row scale) + the 16-bit low-rank factors.
"""
from __future__ import annotations

import torch

from . import quantizers as qz
from .linear import LowRankQuantLinear, SVDQuantLinear, padded_features

MULT_MAX = 18  # 7 * 18 = 126 <= 127
INT8_MAX = 127
# fp8 group multipliers: 2**j (codes +-7, 7 * 64 = 448 = float8_e4m3fn max) and 3 * 2**j (codes +-6: 3 * q
# has at most 4 significant bits for |q| <= 6), so q * mult is exact in float8_e4m3fn.
FP8_MULTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FP8_ODD_QMAX = 6
ACT_FORMATS = ("int8", "fp8")


def quantize_int4_int8exact(
    r: torch.Tensor, group_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``r [N, K]`` (K divisible by ``group_size``) to INT4 with integer group multipliers.

    Returns q int8 ``[N, K]`` in [-7, 7], mult uint8 ``[N, K // group_size]`` in [1, MULT_MAX],
    row_scale float32 ``[N]``; ``r ~= q * mult * row_scale`` (group scale = ``mult * row_scale``).
    """
    g = qz._grouped(r, group_size)
    gmax = g.abs().amax(dim=-1)  # [N, G]
    row_max = gmax.amax(dim=-1)
    row_scale = torch.where(row_max > 0, row_max / (qz.INT4_MAX * MULT_MAX), torch.ones_like(row_max))
    mult = torch.round(gmax / (qz.INT4_MAX * row_scale[:, None])).clamp_(1, MULT_MAX)
    scale = mult * row_scale[:, None]
    q = torch.round(g / scale.unsqueeze(-1)).clamp_(-qz.INT4_MAX, qz.INT4_MAX)
    return q.to(torch.int8).reshape(r.shape), mult.to(torch.uint8), row_scale.float()


def quantize_int4_fp8exact(
    r: torch.Tensor, group_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``r [N, K]`` to INT4 with group multipliers from :data:`FP8_MULTS` (fp8-exact ``q * mult``).

    ``row_scale = row absmax / (7 * 64)``; each group takes the multiplier
    (and its code range: +-7 for powers of two, +-6 for ``3 * 2**j``) with the smallest squared error.
    Returns q int8 ``[N, K]``,
    mult uint8 ``[N, K // group_size]``, row_scale float32 ``[N]``.
    """
    g = qz._grouped(r, group_size)
    row_max = g.abs().amax(dim=(-1, -2))
    row_scale = torch.where(row_max > 0, row_max / (qz.INT4_MAX * 64), torch.ones_like(row_max))
    q, mult, _ = _best_fp8_mults(g, row_scale)
    return q.to(torch.int8).reshape(r.shape), mult.to(torch.uint8), row_scale.float()


def _best_fp8_mults(g: torch.Tensor, row_scale: torch.Tensor):
    """Per group of ``g [N, G, group]`` the multiplier of :data:`FP8_MULTS` with the least squared error for
    ``row_scale [N]``: (codes float32 ``[N, G, group]``, mult float32 ``[N, G]``, error ``[N, G]``)."""
    best_err = best_q = best_mult = None
    for mult in FP8_MULTS:
        qmax = qz.INT4_MAX if mult & (mult - 1) == 0 else FP8_ODD_QMAX
        scale = row_scale[:, None, None] * float(mult)
        q = torch.round(g / scale).clamp_(-qmax, qmax)
        err = (g - q * scale).square().sum(dim=-1)
        if best_err is None:
            best_err, best_q, best_mult = err, q, torch.full_like(err, float(mult))
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_q = torch.where(better[..., None], q, best_q)
            best_mult = torch.where(better, torch.full_like(err, float(mult)), best_mult)
    return best_q, best_mult, best_err


def dequantize_int4_int8exact(q: torch.Tensor, mult: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int4_int8exact`: float32 ``[N, K]``."""
    return qz.dequantize_groups(q, mult.float() * row_scale.float()[:, None])


def quantize_int8_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row of ``x [..., K]``: q int8 ``[..., K]``, scale float32 ``[...]`` (absmax / 127,
    1.0 for all-zero rows). Round half to even."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), scale


def quantize_fp8_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric FP8 E4M3 per row of ``x [..., K]``: q float8_e4m3fn ``[..., K]``, scale float32 ``[...]``
    (absmax / 448, 1.0 for all-zero rows). Round to nearest even."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / qz.FP8_E4M3_MAX, torch.ones_like(amax))
    q = (xf / scale.unsqueeze(-1)).clamp_(-qz.FP8_E4M3_MAX, qz.FP8_E4M3_MAX)
    return q.to(torch.float8_e4m3fn), scale


def fake_quant_tokens(x: torch.Tensor, act_format: str) -> torch.Tensor:
    """Quantize-dequantize per token with :func:`quantize_int8_tokens` (``"int8"``) or
    :func:`quantize_fp8_tokens` (``"fp8"``); float32, shape of ``x``."""
    q, scale = quantize_int8_tokens(x) if act_format == "int8" else quantize_fp8_tokens(x)
    return q.float() * scale.unsqueeze(-1)


def fake_quant_int8_tokens(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize with :func:`quantize_int8_tokens`; float32, shape of ``x``."""
    return fake_quant_tokens(x, "int8")


class SVDQuantW4A8Linear(LowRankQuantLinear):
    """SVDQuant layer in a Hopper W4A8 format (see module docstring); ``act_format`` ``"int8"`` or ``"fp8"``.

    ``y = Q8(x / smooth) @ (q * mult * row_scale)^T + (x / smooth) @ lora_down @ lora_up^T + bias``.
    Buffers beyond :class:`LowRankQuantLinear`'s (``N`` out, ``K`` padded in, ``G`` group): qweight uint8
    ``[N, K // 2]``, wmult uint8 ``[N, K // G]``, wscale_row float32 ``[N]``.
    Input ``[..., in_features]``, output in x.dtype.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 32, bias: bool = True,
                 group_size: int = 64, dtype: torch.dtype = torch.bfloat16, device=None,
                 act_format: str = "int8") -> None:
        if act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {act_format!r}")
        k = padded_features(in_features, group_size)
        super().__init__(in_features, out_features, k, rank, bias, dtype, device)
        self.act_format, self.group_size = act_format, group_size
        self.register_buffer("qweight", torch.zeros(out_features, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wmult", torch.ones(out_features, k // group_size, dtype=torch.uint8, device=device))
        self.register_buffer("wscale_row", torch.ones(out_features, dtype=torch.float32, device=device))

    def dequantized_residual(self) -> torch.Tensor:
        return dequantize_int4_int8exact(qz.unpack_int4(self.qweight), self.wmult, self.wscale_row)

    def quantized_activation(self, x_smooth: torch.Tensor) -> torch.Tensor:
        return fake_quant_tokens(x_smooth, self.act_format)

    def packed_buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.qweight, self.wmult, self.wscale_row)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantduo.kernels import w4a8_linear_forward

        return w4a8_linear_forward(self, x)


def to_w4a8(module: SVDQuantLinear, weight: torch.Tensor | None = None, act_format: str = "int8"
            ) -> SVDQuantW4A8Linear:
    """Convert a W4A4 :class:`SVDQuantLinear` to a Hopper W4A8 format (same smoothing and low-rank branch).

    act_format: ``"int8"`` (multipliers 1..18) or ``"fp8"`` (fp8-exact multipliers, see module docstring).
    ``weight`` (the original float ``[N, in_features]`` weight, optional): re-quantize the exact residual
    ``W * smooth - lora_up @ lora_down^T``; without it the module's dequantized 4-bit residual is
    re-quantized. The unsigned-activation shift folded into the bias is unfolded (W4A8 needs no shift).
    """
    if module.act_format == "none":
        raise ValueError("W4A16 modules have no activation quantizer to convert")
    with torch.no_grad():
        std_residual = module.dequantized_residual()
        if weight is None:
            residual = std_residual
        else:
            w = qz.pad_to_multiple(weight.float(), module.group_size) * module.smooth_factor.float()
            residual = w - module.lora_up.float() @ module.lora_down.float().T
        group = 64 if module.weight_format == "nvfp4" else module.group_size
        out = SVDQuantW4A8Linear(module.in_features, module.out_features, module.rank, module.bias is not None,
                                 group, module.dtype, module.qweight.device, act_format=act_format)
        quantize = quantize_int4_fp8exact if act_format == "fp8" else quantize_int4_int8exact
        q, mult, row_scale = quantize(residual, group)
        out.qweight.copy_(qz.pack_int4(q))
        out.wmult.copy_(mult)
        out.wscale_row.copy_(row_scale)
        out.smooth_factor.copy_(module.smooth_factor)
        out.lora_down.copy_(module.lora_down)
        out.lora_up.copy_(module.lora_up)
        if module.bias is not None:
            out.bias.copy_(module.bias.float() + std_residual @ module.act_shift.float())
        elif bool((module.act_shift != 0).any()):
            raise ValueError("module has an activation shift but no bias to unfold it from")
    return out


def to_w4a8_fp8(module: SVDQuantLinear, weight: torch.Tensor | None = None) -> SVDQuantW4A8Linear:
    """:func:`to_w4a8` with FP8 E4M3 activations and fp8-exact weight group multipliers."""
    return to_w4a8(module, weight, act_format="fp8")
