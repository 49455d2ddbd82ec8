"""4-bit quantizers with pack/unpack: the ground truth every kernel is checked against.

Packed layouts (all little-endian in the last dimension):

* **INT4 (signed)** — values in [-7, 7] (symmetric, -8 unused), two's-complement nibbles.
  ``packed[..., j]`` (uint8) holds element ``2j`` in its low nibble and ``2j+1`` in its high nibble.
  Scales: ``absmax / 7`` per group of ``group_size`` consecutive elements of the last dim,
  shape ``[..., K // group_size]``.
* **UINT4 (unsigned)** — values in [0, 15], same nibble order, scale ``max / 15`` per group.
  Used for shifted non-negative activations (post-GELU).
* **NVFP4** — E2M1 codes (bit 3 = sign, bits 0-2 index into ``FP4_E2M1_GRID``), same nibble order.
  One FP8-E4M3 scale per 16 elements and one FP32 per-tensor scale:
  ``x ~= grid[code] * float(scale_fp8) * global_scale``.
* **NVFP4, Nunchaku's activations** (:func:`quantize_nvfp4_nunchaku`) — the same codes and FP8 scales per 16
  without a tensor scale: ``x ~= grid[code] * float(scale_fp8)``, the codes taken from the scale before its FP8
  rounding (what Nunchaku's kernels compute on Blackwell).

Rounding is round-half-to-even (``torch.round``) everywhere.
"""
from __future__ import annotations

import torch

INT4_MAX = 7
UINT4_MAX = 15
FP8_E4M3_MAX = 448.0
FP4_E2M1_MAX = 6.0
FP4_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
NVFP4_GROUP = 16
# the shift of post-GELU activations before unsigned INT4 quantization, added before smoothing (the tanh GELU's
# lower bound, rounded): deepcompressor's calibration and Nunchaku's kernels (SHIFT_GELU)
GELU_SHIFT = 0.171875

_TINY = torch.finfo(torch.float32).tiny


def _check_groups(x: torch.Tensor, group_size: int) -> None:
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if x.shape[-1] % group_size != 0:
        raise ValueError(
            f"last dimension {x.shape[-1]} is not divisible by group_size {group_size}; "
            "pad the input channels (quantduo.formats.quantizers.pad_to_multiple) or pick another group size"
        )


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """View ``x [..., K]`` as ``[..., K // group_size, group_size]`` (float32)."""
    _check_groups(x, group_size)
    return x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = -1) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` up to a multiple of ``multiple``."""
    size = x.shape[dim]
    extra = (-size) % multiple
    if extra == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = extra
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


# ---------------------------------------------------------------------------------------------
# nibble packing
# ---------------------------------------------------------------------------------------------
def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[..., K]`` (any int dtype, values taken mod 16) into uint8 ``[..., K // 2]``."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of 4-bit values")
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 ``[..., K // 2]`` into raw nibbles (uint8 in [0, 15]) ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed 4-bit data must be uint8, got {packed.dtype}")
    low = packed & 0xF
    high = packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values in [-8, 7] ``[..., K]`` into uint8 ``[..., K // 2]``."""
    return pack_nibbles(q)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 ``[..., K // 2]`` to signed int8 values in [-8, 7], ``[..., K]``."""
    nib = unpack_nibbles(packed).to(torch.int8)
    return torch.where(nib >= 8, nib - 16, nib)


def pack_uint4(q: torch.Tensor) -> torch.Tensor:
    """Pack unsigned values in [0, 15] ``[..., K]`` into uint8 ``[..., K // 2]``."""
    return pack_nibbles(q)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack uint8 ``[..., K // 2]`` to uint8 values in [0, 15], ``[..., K]``."""
    return unpack_nibbles(packed)


# ---------------------------------------------------------------------------------------------
# integer group quantizers
# ---------------------------------------------------------------------------------------------
def _group_scales(gmax: torch.Tensor, qmax: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """``gmax / qmax`` rounded to ``scale_dtype`` (1.0 for all-zero groups), as float32."""
    scales = torch.where(gmax > 0, gmax / qmax, torch.ones_like(gmax))
    return scales.to(scale_dtype).float()


def quantize_int4(
    x: torch.Tensor, group_size: int = 64, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric signed INT4 with one scale per group of the last dim.

    Args:
        x: ``[..., K]`` float tensor, K divisible by ``group_size``.
        scale_dtype: dtype the scales are stored in; values are rounded with the stored scales.
    Returns:
        q: int8 ``[..., K]`` in [-7, 7]; scales: float32 ``[..., K // group_size]`` (absmax / 7,
        1.0 for all-zero groups so dequantization is exact there).
    """
    g = _grouped(x, group_size)
    scales = _group_scales(g.abs().amax(dim=-1), INT4_MAX, scale_dtype)
    q = torch.round(g / scales.unsqueeze(-1)).clamp_(-INT4_MAX, INT4_MAX)
    return q.to(torch.int8).reshape(x.shape), scales


def quantize_uint4(
    x: torch.Tensor, group_size: int = 64, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned INT4 (values in [0, 15]) of non-negative data, one scale (max / 15) per group.

    Negative inputs clamp to 0. Returns q: uint8 ``[..., K]``, scales: float32 ``[..., K // group_size]``.
    """
    g = _grouped(x, group_size).clamp(min=0)
    scales = _group_scales(g.amax(dim=-1), UINT4_MAX, scale_dtype)
    q = torch.round(g / scales.unsqueeze(-1)).clamp_(0, UINT4_MAX)
    return q.to(torch.uint8).reshape(x.shape), scales


def quantize_activations_4bit(
    x: torch.Tensor, group_size: int = 64, unsigned: bool = False, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit activations as Nunchaku's kernels quantize them (``quantize_w4a4_from_fpsum_warp``), per group of
    ``group_size`` of the last dim:

    * ``s = amax * float32(1 / qmax)``: a float32 product, not a division (qmax 7 signed, 15 unsigned; amax the
      largest magnitude in both cases, negative unsigned inputs included, which then saturate to code 0; 1.0 for
      an all-zero group, whose codes are 0);
    * codes ``round_half_even(x * (1 / s))``: x times the float32 reciprocal of the unrounded ``s`` (the GPU kernel
      takes ``rcp.approx.ftz.f32`` as Nunchaku does), saturated to [-7, 7] / [0, 15];
    * the scale returned is ``s`` rounded to ``scale_dtype`` (Nunchaku keeps it in the activations' 16-bit dtype).

    Where ``x / s`` lands on a half-integer, ``x * (1 / s)`` falls on either side of it: bf16 activations hit such
    ties often (``x = amax / 2``), so this differs from :func:`quantize_int4` there.
    Returns q: int8 (signed) / uint8 (unsigned) ``[..., K]``, scales: float32 ``[..., K // group_size]``.
    """
    g = _grouped(x, group_size)
    qmax = UINT4_MAX if unsigned else INT4_MAX
    amax = g.abs().amax(dim=-1)  # also for unsigned groups (Nunchaku's __habs2): a negative input sets the scale
    s = amax * torch.tensor(1 / qmax, dtype=torch.float32, device=x.device)
    s = torch.where(amax > 0, s, torch.ones_like(s))
    q = torch.round(g * torch.reciprocal(s).unsqueeze(-1)).clamp_(0 if unsigned else -qmax, qmax)
    codes = q.to(torch.uint8 if unsigned else torch.int8).reshape(x.shape)
    return codes, s.to(scale_dtype).float()


def fake_quant_activations(
    x: torch.Tensor, fmt: str, group_size: int = 64, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Run-time activation quantization, quantized then dequantized (float32): the 4-bit integer formats by
    :func:`quantize_activations_4bit` (scales rounded to ``scale_dtype``, the activations' dtype), the others as
    :func:`fake_quant`."""
    if fmt in ("int4", "uint4"):
        return dequantize_groups(*quantize_activations_4bit(x, group_size, fmt == "uint4", scale_dtype))
    return fake_quant(x, fmt, group_size)


def fp8_folded_scales(wscales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales ``[N, G]`` (any float dtype) -> (``folded_t`` float32 ``[G, N]``, ``row_scale`` float32 ``[N]``)
    for an fp8 GEMM that decodes each weight to ``e4m3(q * folded)``: ``row_scale = 8 * max_g |scale| / 448`` (1 for an
    all-zero row), ``folded = scale / row_scale``, so that ``|q * folded| <= 448`` for every INT4 code and
    ``q * scale = row_scale * q * folded``."""
    s = wscales.float()
    row_scale = s.abs().amax(dim=1) * (8 / FP8_E4M3_MAX)
    row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    return (s / row_scale[:, None]).T.contiguous(), row_scale


def dequantize_groups(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of the integer group quantizers: ``q [..., K] * scales [..., K // G]`` -> float32 ``[..., K]``."""
    group_size = q.shape[-1] // scales.shape[-1]
    g = q.float().reshape(*scales.shape, group_size)
    return (g * scales.float().unsqueeze(-1)).reshape(q.shape)


# ---------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------
def _fp4_round(y: torch.Tensor) -> torch.Tensor:
    """Round |y| <= 6 to the nearest E2M1 grid index (ties to the even code), returns int64 [0, 7]."""
    grid = FP4_E2M1_GRID.to(y.device)
    mid = (grid[1:] + grid[:-1]) / 2  # decision boundaries
    idx = torch.bucketize(y, mid, right=False)  # y == mid goes to the lower index
    on_tie = (idx < 7) & (y == mid[idx.clamp(max=6)]) & (idx % 2 == 1)
    # bucketize puts ties at the lower code; move them to the even neighbour.
    return torch.where(on_tie, idx + 1, idx)


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor FP32 scale so the largest group scale lands on the top of FP8-E4M3."""
    amax = x.float().abs().amax()
    return torch.where(amax > 0, amax / (FP4_E2M1_MAX * FP8_E4M3_MAX), torch.ones_like(amax))


def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, sign bit 3 | grid index) of ``y``: round-half-even onto the grid, saturating at +-6."""
    y = y.clamp(-FP4_E2M1_MAX, FP4_E2M1_MAX)
    idx = _fp4_round(y.abs())
    return (idx | ((y < 0) & (idx > 0)).long() << 3).to(torch.uint8)


def quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4: E2M1 codes, an FP8-E4M3 scale per 16 elements of the last dim, an FP32 tensor scale.

    Returns codes uint8 ``[..., K]`` (sign bit 3 | grid index), scales float8_e4m3fn ``[..., K // 16]``,
    global_scale float32 scalar.
    """
    if global_scale is None:
        global_scale = nvfp4_global_scale(x)
    g = _grouped(x, NVFP4_GROUP) / global_scale
    absmax = g.abs().amax(dim=-1)
    scales = (absmax / FP4_E2M1_MAX).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    scale_f = scales.float()
    safe = torch.where(scale_f > 0, scale_f, torch.ones_like(scale_f)).unsqueeze(-1)
    return _e2m1_codes(g / safe).reshape(x.shape), scales, global_scale.float()


def quantize_nvfp4_nunchaku(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 activations as Nunchaku quantizes them (``quantize_w4a4_fp4_from_fpsum_warp``): per 16 elements of
    the last dim ``s = min(amax * float32(1 / 6), 448)`` in float32; codes = E2M1 of ``x * (1 / s)`` (the float32
    reciprocal of ``s`` before its FP8 rounding, as the kernel's ``rcp``; round-half-even, saturating); the stored
    scale is ``s`` rounded to float8_e4m3fn (round-half-even). No tensor scale. Returns codes uint8 ``[..., K]`` and
    scales float8_e4m3fn ``[..., K // 16]``."""
    g = _grouped(x, NVFP4_GROUP)
    scale = (g.abs().amax(dim=-1) * torch.tensor(1 / FP4_E2M1_MAX, dtype=torch.float32)).clamp(max=FP8_E4M3_MAX)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)  # all-zero groups: codes 0
    return _e2m1_codes(g * torch.reciprocal(safe)).reshape(x.shape), scale.to(torch.float8_e4m3fn)


def dequantize_nvfp4(codes: torch.Tensor, scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_nvfp4`; returns float32 ``[..., K]``."""
    grid = FP4_E2M1_GRID.to(codes.device)
    mag = grid[(codes & 0x7).long()]
    val = torch.where((codes & 0x8) > 0, -mag, mag)
    g = val.reshape(*scales.shape, NVFP4_GROUP) * scales.float().unsqueeze(-1)
    return (g * global_scale.float()).reshape(codes.shape)


# ---------------------------------------------------------------------------------------------
# fake quantization (quantize -> dequantize), the semantic used by the reference forward
# ---------------------------------------------------------------------------------------------
def fake_quant(
    x: torch.Tensor, fmt: str, group_size: int = 64, scale_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Quantize then dequantize the last dim of ``x`` with format ``fmt``; returns float32.

    ``fmt``: ``"int4"`` (signed, per-``group_size``), ``"uint4"`` (unsigned), ``"nvfp4"`` (groups of 16,
    FP8 scales, tensor scale), ``"nvfp4_nunchaku"`` (groups of 16, FP8 scales, no tensor scale:
    :func:`quantize_nvfp4_nunchaku`), ``"none"`` (identity). ``scale_dtype``: storage dtype of INT4 group scales.
    """
    if fmt == "none":
        return x.float()
    if fmt == "int4":
        return dequantize_groups(*quantize_int4(x, group_size, scale_dtype))
    if fmt == "uint4":
        return dequantize_groups(*quantize_uint4(x, group_size, scale_dtype))
    if fmt == "nvfp4":
        return dequantize_nvfp4(*quantize_nvfp4(x))
    if fmt == "nvfp4_nunchaku":
        return dequantize_nvfp4(*quantize_nvfp4_nunchaku(x), torch.ones((), device=x.device))
    raise ValueError(f"unknown 4-bit format {fmt!r}; expected one of int4, uint4, nvfp4, nvfp4_nunchaku, none")
