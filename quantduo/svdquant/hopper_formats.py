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
  round half to even) or FP8 E4M3 (``absmax / 448``, round to nearest even; the absmax also covers the
  row's low-rank term, see the fp8 concatenation below). There is no unsigned shift
  (signed 8-bit handles post-GELU inputs); the converter unfolds the shift term from the bias.

Storage per weight: 4 bits + 8 / 64 (multiplier) + 32 / K (row scale) + the 16-bit low-rank factors.

**fp8 low-rank concatenation** (``act_format="fp8"``, more than a few tokens): the low-rank branch rides
inside the one fp8 GEMM as ``T = fp8_tail_width(r)`` extra K columns (``3r`` used, zero-padded to a multiple
of 64 so the GEMM keeps whole K tiles), so a row-wise-scaled fp8 GEMM (``torch._scaled_mm``) computes the
whole layer. With ``x_s = x * (1 / smooth)`` in float32 and ``l = bf16(x_s) @ lora_down_scaled``:

* ``s_x = max(absmax(x_s), absmax(l)) / 448`` per token;
* ``A = [e4m3(x_s / s_x) | hi(l / s_x) | lo(l / s_x) | hi(l / s_x) | 0]``;
* ``B = [q * mult | hi(u) | hi(u) | lo(u) | 0]`` with ``u = lora_up / (c * row_scale)``;
* ``y = s_x[m] * row_scale[n] * (A @ B^T) + bias``, ``hi(v) = e4m3(v)``, ``lo(v) = e4m3(v - hi(v))``.

``c`` (a power of two per rank, folded into ``lora_down_scaled = lora_down * c`` exactly) puts the largest
``|u|`` in (224, 448]. The hi/lo pairs keep about 8 significant bits of each low-rank operand (the
16-bit branch's precision, minus the neglected ``lo * lo`` term). See :func:`fp8_lowrank_operands`.

:func:`to_w4a16` is the other Hopper option for stored INT4 weights: the same layer with 16-bit activations (above
64 tokens the kernels reconstruct its weight for one 16-bit GEMM; more accurate and faster than W4A4 there).
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


FP8_TAIL_ALIGN = 64


def fp8_tail_width(rank: int) -> int:
    """K columns the low-rank tail occupies in the fp8 concatenation: ``3 * rank`` rounded up to 64."""
    return -(-3 * rank // FP8_TAIL_ALIGN) * FP8_TAIL_ALIGN


def fp8_lowrank_operands(lora_down: torch.Tensor, lora_up: torch.Tensor, row_scale: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The low-rank factors in the fp8 concatenation layout (module docstring).

    Args: lora_down ``[K, r]`` (16-bit), lora_up ``[N, r]``, row_scale float32 ``[N]``.
    Returns (lora_down_scaled ``[K, r]`` in lora_down's dtype, up_fp8 float8_e4m3fn ``[N, 2r]`` = hi | lo of
    ``lora_up / (c * row_scale)``).
    """
    u = lora_up.float() / row_scale.float()[:, None]
    umax = u.abs().amax(dim=0)
    c = torch.where(umax > 0, torch.exp2(torch.ceil(torch.log2(umax / qz.FP8_E4M3_MAX))), torch.ones_like(umax))
    lora_down_scaled = (lora_down.float() * c).to(lora_down.dtype)
    if not torch.isfinite(lora_down_scaled).all():
        raise ValueError("low-rank factors out of range for the fp8 concatenation (lora_down * c overflows)")
    hi, lo = split_e4m3(u / c)
    return lora_down_scaled, torch.cat([hi, lo], dim=1)


def split_e4m3(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` float32 -> (hi, lo) float8_e4m3fn with ``hi = e4m3(clamp(v, +-448))``, ``lo = e4m3(v - hi)``
    (``v`` may exceed 448 by a rounding step of its scale; ``lo`` takes the excess)."""
    hi = v.clamp(-qz.FP8_E4M3_MAX, qz.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return hi, (v - hi.float()).to(torch.float8_e4m3fn)


def fp8_lowrank_down(x: torch.Tensor, inv_smooth: torch.Tensor, lora_down_scaled: torch.Tensor) -> torch.Tensor:
    """``l = (x * inv_smooth)`` rounded to the lora dtype ``@ lora_down_scaled``, float32 ``[M, r]``."""
    xs = (x.float() * inv_smooth.float()).to(lora_down_scaled.dtype)
    return xs.float() @ lora_down_scaled.float()


def fp8_concat_activations(x: torch.Tensor, inv_smooth: torch.Tensor, lx: torch.Tensor | None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A operand of the fp8 concatenation: x ``[M, K]``, inv_smooth float32 ``[K]`` and lx float32 ``[M, r]``
    (:func:`fp8_lowrank_down`, None for rank 0) -> (float8_e4m3fn ``[M, K + fp8_tail_width(r)]``, scale
    float32 ``[M]``)."""
    xs = x.float() * inv_smooth.float()
    amax = xs.abs().amax(dim=-1)
    if lx is not None:
        amax = torch.maximum(amax, lx.abs().amax(dim=-1))
    scale = torch.where(amax > 0, amax / torch.full_like(amax, qz.FP8_E4M3_MAX), torch.ones_like(amax))
    inv_scale = torch.reciprocal(scale)[:, None]
    q = (xs * inv_scale).clamp_(-qz.FP8_E4M3_MAX, qz.FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    if lx is None:
        return q, scale
    r = lx.shape[1]
    hi, lo = split_e4m3(lx * inv_scale)
    pad = torch.zeros(x.shape[0], fp8_tail_width(r) - 3 * r, dtype=q.dtype, device=q.device)
    return torch.cat([q, hi, lo, hi, pad], dim=1), scale


def fp8_concat_weights(w8: torch.Tensor, up_fp8: torch.Tensor | None) -> torch.Tensor:
    """B operand of the fp8 concatenation: ``w8 = q * mult`` float8_e4m3fn ``[N, K]`` and up_fp8 ``[N, 2r]``
    (:func:`fp8_lowrank_operands`) -> ``[N, K + fp8_tail_width(r)]``."""
    if up_fp8 is None:
        return w8
    hi, lo = up_fp8.chunk(2, dim=1)
    r = hi.shape[1]
    pad = torch.zeros(w8.shape[0], fp8_tail_width(r) - 3 * r, dtype=w8.dtype, device=w8.device)
    return torch.cat([w8, hi, hi, lo, pad], dim=1)


class SVDQuantW4A8Linear(LowRankQuantLinear):
    """SVDQuant layer in a Hopper W4A8 format (see module docstring); ``act_format`` ``"int8"`` or ``"fp8"``.

    int8: ``y = Q8(x / smooth) @ (q * mult * row_scale)^T + (x / smooth) @ lora_down @ lora_up^T + bias``;
    fp8: the fp8 concatenation of the module docstring (:meth:`forward_reference`), and 16-bit activations at
    small token counts on the GPU (:meth:`forward_reference_a16`).
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

    def fp8_operands(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(inv_smooth float32 ``[K]``, lora_down_scaled, up_fp8) of the fp8 concatenation (the low-rank pair
        is None for rank 0), cached until the smoothing, low-rank factors or row scales change (in place or
        replaced, e.g. by a LoRA attach)."""
        watched = (self.smooth_factor, self.lora_down, self.lora_up, self.wscale_row)
        key = tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in watched)
        cached = getattr(self, "_fp8_operands_cache", None)
        if cached is None or cached[0] != key:
            inv_smooth = torch.reciprocal(self.smooth_factor.float())
            lowrank = (None, None) if self.rank == 0 else fp8_lowrank_operands(self.lora_down, self.lora_up,
                                                                               self.wscale_row)
            cached = self._fp8_operands_cache = (key, (inv_smooth, *lowrank))
        return cached[1]

    def forward_reference_a16(self, x: torch.Tensor) -> torch.Tensor:
        """The same weights with 16-bit activations (the small-M kernel path of the fp8 format):
        ``(x / smooth) @ (q * mult * row_scale)^T`` in float32 + the 16-bit low-rank branch + bias."""
        x_smooth = self._pad_input(x) / self.smooth_factor.to(x.dtype)
        low_rank = (x_smooth.to(self.dtype) @ self.lora_down) @ self.lora_up.T
        y = x_smooth.float() @ self.dequantized_residual().T + low_rank.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def forward_reference(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """int8: :meth:`LowRankQuantLinear.forward_reference`. fp8: the fp8 concatenation (module docstring),
        float32 products of the exact fp8 operands."""
        if self.act_format != "fp8":
            return super().forward_reference(x, residual)
        x2 = self._pad_input(x).reshape(-1, self.padded_in_features)
        inv_smooth, lora_down, up_fp8 = self.fp8_operands()
        lx = None if lora_down is None else fp8_lowrank_down(x2, inv_smooth, lora_down)
        a, a_scale = fp8_concat_activations(x2, inv_smooth, lx)
        w8 = (qz.unpack_int4(self.qweight).float() * self.wmult.float().repeat_interleave(self.group_size, 1))
        b = fp8_concat_weights(w8.to(torch.float8_e4m3fn), up_fp8)
        y = (a.float() @ b.float().T) * a_scale[:, None] * self.wscale_row[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


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
        _copy_unfolded_bias(out, module, std_residual)
    return out


def _copy_unfolded_bias(out: LowRankQuantLinear, module: SVDQuantLinear, residual: torch.Tensor) -> None:
    """``out.bias = module.bias + residual @ act_shift``: the unsigned-activation shift's term, which ``module``
    folds into its bias, taken back out (``out`` has no shift). residual: float32 ``[N, K]``."""
    if module.bias is not None:
        out.bias.copy_(module.bias.float() + residual @ module.act_shift.float())
    elif bool((module.act_shift != 0).any()):
        raise ValueError("module has an activation shift but no bias to unfold it from")


def to_w4a16(module: SVDQuantLinear) -> SVDQuantLinear:
    """A W4A4 :class:`SVDQuantLinear` run with 16-bit activations: the same stored INT4 residual, smoothing and
    low-rank branch, no activation quantizer (the unsigned shift's bias term unfolded).

    It changes the layer's arithmetic, not its weights: without the activation rounding the output is closer to
    the original layer, and on GPUs without 4-bit tensor cores (Hopper) it is faster above 64 tokens (the whole
    weight is reconstructed for one 16-bit GEMM, see :mod:`quantduo.kernels`).
    """
    if module.act_format == "none":
        raise ValueError("the module already has 16-bit activations")
    with torch.no_grad():
        out = SVDQuantLinear(module.in_features, module.out_features, module.rank, module.bias is not None,
                             module.weight_format, "none", module.group_size, module.dtype, module.qweight.device)
        out.load_state_dict(module.state_dict())
        out.act_shift.zero_()
        _copy_unfolded_bias(out, module, module.dequantized_residual())
    out.backend = module.backend
    return out


def to_w4a8_fp8(module: SVDQuantLinear, weight: torch.Tensor | None = None) -> SVDQuantW4A8Linear:
    """:func:`to_w4a8` with FP8 E4M3 activations and fp8-exact weight group multipliers."""
    return to_w4a8(module, weight, act_format="fp8")
