"""Tensor layouts of published SVDQuant checkpoints (Nunchaku's GPU kernels and TinyChat's AWQ kernels).

Pure encode / decode between the stored tensors of one linear layer and logical tensors; no model knowledge.

**W4A4 (SVDQuant) linears** — ``N`` out, ``K`` in features (both padded to multiples of 128 in the file), ``r``
rank (a multiple of 16). Every tensor is in the tiled order of Nunchaku's ``mma`` kernels (``warp_n = 128``):

* ``qweight`` int8 ``[N, K/2]``: signed INT4 codes; logical ``[N, K]`` viewed as
  ``(N/128, 8, 2, 8, 1, K/64, 1, 2, 4, 8)``, permuted by :data:`WEIGHT_PERM`, then 8 nibbles per 32-bit
  little-endian word (element ``i`` of a word at bits ``4i``);
* ``wscales`` ``[K/64, N]`` (INT4: fp16/bf16 per 64 inputs): logical ``[N, K/64]`` viewed as
  ``(N/128, 1, 8, 2, 4, 2, K/64)`` and permuted by :data:`VECTOR_PERM`; NVFP4: float8_e4m3fn ``[K/16, N]`` per
  16 inputs, logical ``[N, K/16]`` viewed as ``(N/128, 1, 4, 4, 8, K/64, 4)`` and permuted by
  :data:`MICRO_SCALE_PERM`;
* ``bias``, ``wcscales`` ``[N]`` and ``smooth`` ``[K]``: the per-128 swizzle of the scales (one column);
  ``wcscales`` (NVFP4, optional, module dtype) are per-output-channel weight scales;
* ``lora_down`` ``[K, r]``: the down factor ``[r, K]`` **applied to the raw input** (``1 / smooth`` folded in),
  ``lora_up`` ``[N, r]``: both in 16x16 tiles (:func:`pack_lowrank`); an optional pair (Nunchaku's
  ``ParamFlags::Optional``): a layer without it has rank 0;
* ``wtscale`` ``[1]`` or ``[]`` (NVFP4, optional, any float dtype): per-tensor weight scale, the kernels' ``alpha``.

An NVFP4 weight is ``grid[code] * wscales * wcscales[n] * wtscale`` (E2M1 codes: bit 3 sign, bits 0-2 index of
0, 0.5, 1, 1.5, 2, 3, 4, 6); deepcompressor writes ``wtscale`` for a per-tensor scale and ``wcscales`` for a
per-channel one (fused q/k/v: the per-tensor scales of the parts expanded over their rows).

**AWQ W4A16 linears** (TinyChat packing): ``qweight`` int32 ``[N/4, K/2]`` of unsigned codes, ``wscales`` and
``wzeros`` ``[G', N]`` with ``G' >= K/64`` (the group dimension may be padded), ``w = code * scale + zero``.
Within each row, 32 consecutive inputs form 8 int16 words, word ``j`` holding inputs ``j, j+8, j+16, j+24`` at bits
0, 4, 8, 12; the words of 4 consecutive rows are interleaved per 64 inputs (``[N/4, K/64, 4, 16]``); two int16
words make one little-endian int32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantduo.formats import quantizers as qz

WARP_N = 128
K_TILE = 128
LOWRANK_TILE = 16
INT4_GROUP = 64
NVFP4_GROUP = 16
AWQ_GROUP = 64
WEIGHT_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
VECTOR_PERM = (0, 6, 1, 2, 4, 3, 5)
MICRO_SCALE_PERM = (0, 5, 1, 4, 3, 2, 6)
LOWRANK_PERM = (0, 1, 3, 6, 2, 5, 4, 7)
_AWQ_ROWS = 4


class LayoutError(ValueError):
    """Stored tensors that do not have the shapes or dtypes of the layout."""


# ---------------------------------------------------------------------------------------------
# tiling primitives
# ---------------------------------------------------------------------------------------------
def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=lambda i: perm[i]))


def tile(x: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...]) -> torch.Tensor:
    """Logical tensor -> stored order, flat."""
    return x.reshape(view).permute(perm).contiguous().reshape(-1)


def untile(stored: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Stored order -> the logical tensor of ``shape``."""
    return stored.reshape([view[p] for p in perm]).permute(_inverse(perm)).contiguous().reshape(shape)


def weight_view(n: int, k: int) -> tuple[int, ...]:
    return (n // WARP_N, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)


def vector_view(n: int, columns: int) -> tuple[int, ...]:
    return (n // WARP_N, 1, 8, 2, 4, 2, columns)


def micro_scale_view(n: int, k: int) -> tuple[int, ...]:
    return (n // WARP_N, 1, 4, 4, 8, k // 64, 4)


def _lowrank_view(rows: int, cols: int) -> tuple[int, ...]:
    return (rows // LOWRANK_TILE, cols // LOWRANK_TILE, 2, 8, 1, 2, 4, 2)


def pack_lowrank(x: torch.Tensor, down: bool) -> torch.Tensor:
    """Logical low-rank factor -> stored: ``down`` takes ``[r, K]`` and gives ``[K, r]``; up takes and gives
    ``[N, r]``. Sizes must be multiples of 16."""
    t = LOWRANK_TILE
    if down:
        r, c = x.shape
        tiles = x.reshape(r // t, t, c // t, t).permute(2, 0, 1, 3)
    else:
        c, r = x.shape
        tiles = x.reshape(c // t, t, r // t, t).permute(0, 2, 1, 3)
    return tile(tiles, _lowrank_view(c, r), LOWRANK_PERM).reshape(c, r)


def unpack_lowrank(stored: torch.Tensor, down: bool) -> torch.Tensor:
    """Inverse of :func:`pack_lowrank`: ``[r, K]`` for ``down`` else ``[N, r]``."""
    t = LOWRANK_TILE
    rows, r = stored.shape
    tiles = untile(stored, _lowrank_view(rows, r), LOWRANK_PERM, (rows // t, r // t, t, t))
    if down:
        return tiles.permute(1, 2, 0, 3).reshape(r, rows)
    return tiles.permute(0, 2, 1, 3).reshape(rows, r)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    """``[N]`` (N a multiple of 128) -> the stored per-128 swizzle ``[N]``."""
    return tile(v, vector_view(v.shape[0], 1), VECTOR_PERM)


def unpack_vector(v: torch.Tensor) -> torch.Tensor:
    return untile(v, vector_view(v.shape[0], 1), VECTOR_PERM, (v.shape[0],))


# ---------------------------------------------------------------------------------------------
# W4A4 linears
# ---------------------------------------------------------------------------------------------
@dataclass
class W4A4Parts:
    """One SVDQuant W4A4 linear in logical order (file padding kept: ``N``, ``K`` multiples of 128).

    ``codes`` int8 ``[N, K]`` (signed INT4 values, or NVFP4 E2M1 codes 0..15 as uint8); ``wscales`` ``[N, K/64]``
    (INT4) or float8_e4m3fn ``[N, K/16]`` (NVFP4); ``smooth`` ``[K]``; ``lora_down`` ``[K, r]`` applied to the raw
    input (``1 / smooth`` folded in); ``lora_up`` ``[N, r]`` (``r`` may be 0); ``bias`` ``[N]`` or None;
    ``wcscales`` ``[N]`` or
    None and ``wtscale`` ``[]`` or None (NVFP4 per-channel / per-tensor scales).
    """

    codes: torch.Tensor
    wscales: torch.Tensor
    smooth: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor
    bias: torch.Tensor | None = None
    wcscales: torch.Tensor | None = None
    wtscale: torch.Tensor | None = None

    @property
    def nvfp4(self) -> bool:
        return self.wscales.dtype == torch.float8_e4m3fn


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...], why: str = "") -> None:
    if tuple(t.shape) != shape:
        raise LayoutError(f"{name} has shape {tuple(t.shape)}, expected {shape}{why}")


_LOWRANK_PAIR = frozenset({"lora_down", "lora_up"})


def check_w4a4(prefix: str, t: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Validate one W4A4 linear's stored tensors (``qweight, wscales, smooth`` + optional ``bias, wcscales,
    wtscale`` and the optional pair ``lora_down, lora_up``: both or neither, neither meaning rank 0); returns
    ``(N, K, r, group)``. ``LayoutError`` names the first problem."""
    missing = {"qweight", "wscales", "smooth"} - set(t)
    if missing:
        raise LayoutError(f"W4A4 layer {prefix!r} lacks {sorted(missing)}")
    if len(_LOWRANK_PAIR & set(t)) == 1:
        raise LayoutError(f"W4A4 layer {prefix!r} lacks {sorted(_LOWRANK_PAIR - set(t))}: the low-rank pair "
                          "lora_down / lora_up is stored whole, or not at all for rank 0")
    if t["qweight"].dtype not in (torch.int8, torch.uint8) or t["qweight"].dim() != 2:
        raise LayoutError(f"{prefix}.qweight must be int8 [N, K/2], got {t['qweight'].dtype} {tuple(t['qweight'].shape)}")
    n, k = t["qweight"].shape[0], t["qweight"].shape[1] * 2
    if n % WARP_N or k % K_TILE:
        raise LayoutError(f"{prefix}: [{n}, {k}] breaks the Nunchaku tiling (N and K multiples of {WARP_N}, {K_TILE})")
    nvfp4 = t["wscales"].dtype == torch.float8_e4m3fn
    group = NVFP4_GROUP if nvfp4 else INT4_GROUP
    if t["wscales"].dim() != 2 or t["wscales"].shape[1] != n or k % t["wscales"].shape[0]:
        raise LayoutError(f"{prefix}.wscales has shape {tuple(t['wscales'].shape)}, expected [K/group, {n}]")
    if k // t["wscales"].shape[0] != group:
        raise LayoutError(f"{prefix}: group size {k // t['wscales'].shape[0]} is not supported "
                          f"({'NVFP4 files use 16' if nvfp4 else 'INT4 files use 64'})")
    r = 0
    if "lora_up" in t:
        r = t["lora_up"].shape[1] if t["lora_up"].dim() == 2 else -1
        if r < 0 or r % LOWRANK_TILE:
            raise LayoutError(f"{prefix}: rank {r} is not supported (a multiple of {LOWRANK_TILE})")
        _expect(f"{prefix}.lora_up", t["lora_up"], (n, r))
        _expect(f"{prefix}.lora_down", t["lora_down"], (k, r), " (rank of lora_up)")
    _expect(f"{prefix}.smooth", t["smooth"], (k,))
    for name in ("bias", "wcscales"):
        if name in t:
            _expect(f"{prefix}.{name}", t[name], (n,))
    if "wtscale" in t and t["wtscale"].numel() != 1:
        raise LayoutError(f"{prefix}.wtscale must hold one value, got shape {tuple(t['wtscale'].shape)}")
    for name in ("wcscales", "wtscale"):
        if name in t and not (t[name].is_floating_point() and t[name].element_size() > 1):
            raise LayoutError(f"{prefix}.{name} must be float16 / bfloat16 / float32, got {t[name].dtype}")
    if not nvfp4 and ("wcscales" in t or "wtscale" in t):
        raise LayoutError(f"{prefix}: wcscales / wtscale belong to NVFP4 layers, but its wscales are "
                          f"{t['wscales'].dtype}")
    return n, k, r, group


def decode_w4a4(prefix: str, t: dict[str, torch.Tensor]) -> W4A4Parts:
    """Stored tensors of one W4A4 linear (names as in the Nunchaku single file) -> :class:`W4A4Parts` (no
    low-rank pair: rank-0 factors ``[K, 0]`` / ``[N, 0]`` in the dtype of ``smooth``)."""
    n, k, _, group = check_w4a4(prefix, t)
    nib = qz.unpack_nibbles(t["qweight"].contiguous().view(torch.uint8))
    nvfp4 = group == NVFP4_GROUP
    codes = untile(nib if nvfp4 else qz.unpack_int4(t["qweight"].contiguous().view(torch.uint8)),
                   weight_view(n, k), WEIGHT_PERM, (n, k))
    if nvfp4:
        scale_bytes = untile(t["wscales"].view(torch.uint8), micro_scale_view(n, k), MICRO_SCALE_PERM, (n, k // 16))
        wscales = scale_bytes.view(torch.float8_e4m3fn)
    else:
        wscales = untile(t["wscales"], vector_view(n, k // group), VECTOR_PERM, (n, k // group))
    return W4A4Parts(
        codes=codes, wscales=wscales, smooth=unpack_vector(t["smooth"]),
        lora_down=unpack_lowrank(t["lora_down"], down=True).T if "lora_down" in t else t["smooth"].new_zeros(k, 0),
        lora_up=unpack_lowrank(t["lora_up"], down=False) if "lora_up" in t else t["smooth"].new_zeros(n, 0),
        bias=unpack_vector(t["bias"]) if "bias" in t else None,
        wcscales=unpack_vector(t["wcscales"]) if "wcscales" in t else None,
        wtscale=t["wtscale"].reshape(()) if "wtscale" in t else None,
    )


def _pad_to(x: torch.Tensor, sizes: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    pads = []
    for dim in reversed(range(x.dim())):
        pads += [0, sizes[dim] - x.shape[dim]]
    return torch.nn.functional.pad(x, pads, value=value)


def encode_w4a4(parts: W4A4Parts) -> dict[str, torch.Tensor]:
    """:class:`W4A4Parts` (INT4; any ``N``, ``K`` multiple of 64, any rank) -> the stored tensors, padded to the
    128 / 128 / 16 tiling the way deepcompressor pads (codes and low-rank factors with 0, scales, smoothing and
    bias with 1 past the real channels)."""
    if parts.nvfp4:
        raise LayoutError("writing NVFP4 layers is not supported")
    n0, k0 = parts.codes.shape
    n, k = n0 + (-n0) % WARP_N, k0 + (-k0) % K_TILE
    r = parts.lora_up.shape[1] + (-parts.lora_up.shape[1]) % LOWRANK_TILE
    codes = _pad_to(parts.codes, (n, k))
    wscales = _pad_to(parts.wscales, (n, k // INT4_GROUP), 1.0)
    out = dict(
        qweight=qz.pack_int4(tile(codes, weight_view(n, k), WEIGHT_PERM).reshape(n, k)).view(torch.int8),
        wscales=tile(wscales, vector_view(n, k // INT4_GROUP), VECTOR_PERM).reshape(k // INT4_GROUP, n),
        smooth=pack_vector(_pad_to(parts.smooth, (k,), 1.0)),
        lora_down=pack_lowrank(_pad_to(parts.lora_down, (k, r)).T.contiguous(), down=True),
        lora_up=pack_lowrank(_pad_to(parts.lora_up, (n, r)), down=False),
    )
    if parts.bias is not None:
        out["bias"] = pack_vector(_pad_to(parts.bias, (n,), 1.0))
    return out


# ---------------------------------------------------------------------------------------------
# AWQ W4A16 linears (TinyChat packing)
# ---------------------------------------------------------------------------------------------
@dataclass
class AwqParts:
    """One AWQ W4A16 linear in logical order: ``codes`` uint8 ``[N, K]`` in [0, 15], ``scales`` / ``zeros``
    ``[N, K/64]`` (``w = codes * scales + zeros``), ``bias`` ``[N]`` or None."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None = None

    def dequantized(self) -> torch.Tensor:
        """``codes * scales + zeros`` float32 ``[N, K]``."""
        rep = lambda t: t.float().repeat_interleave(AWQ_GROUP, dim=1)  # noqa: E731
        return self.codes.float() * rep(self.scales) + rep(self.zeros)


def check_awq(prefix: str, t: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Validate one AWQ linear's stored tensors (``qweight, wscales, wzeros`` + optional ``bias``); returns
    ``(N, K)``."""
    missing = {"qweight", "wscales", "wzeros"} - set(t)
    if missing:
        raise LayoutError(f"AWQ layer {prefix!r} lacks {sorted(missing)}")
    q = t["qweight"]
    if q.dtype != torch.int32 or q.dim() != 2:
        raise LayoutError(f"{prefix}.qweight of an AWQ layer must be int32 [N/4, K/2], got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape[0] * _AWQ_ROWS, q.shape[1] * 2
    if k % AWQ_GROUP:
        raise LayoutError(f"{prefix}: K = {k} is not a multiple of the AWQ group {AWQ_GROUP}")
    for name in ("wscales", "wzeros"):
        s = t[name]
        if s.dim() != 2 or s.shape[1] != n or s.shape[0] < k // AWQ_GROUP:
            raise LayoutError(f"{prefix}.{name} has shape {tuple(s.shape)}, expected [>= {k // AWQ_GROUP}, {n}] "
                              f"(group size {AWQ_GROUP})")
    if t["wscales"].shape != t["wzeros"].shape:
        raise LayoutError(f"{prefix}: wscales {tuple(t['wscales'].shape)} and wzeros {tuple(t['wzeros'].shape)} differ")
    if "bias" in t:
        _expect(f"{prefix}.bias", t["bias"], (n,))
    return n, k


def _awq_words(q: torch.Tensor) -> torch.Tensor:
    """int32 ``[N/4, K/2]`` -> the row-major int16 words of each row as int32 in [0, 65535], ``[N, K/4]``."""
    rows4, k = q.shape[0], q.shape[1] * 2
    words = q.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # [N/4, K]
    words = words.reshape(rows4, k // 64, _AWQ_ROWS, 16).permute(0, 2, 1, 3)
    return words.reshape(rows4 * _AWQ_ROWS, k // 4)


def decode_awq(prefix: str, t: dict[str, torch.Tensor]) -> AwqParts:
    """Stored tensors of one AWQ linear -> :class:`AwqParts` (padded scale groups dropped)."""
    n, k = check_awq(prefix, t)
    words = _awq_words(t["qweight"]).reshape(n, k // 32, 1, 8)
    shifts = torch.arange(0, 16, 4, dtype=torch.int32).reshape(1, 1, 4, 1)
    codes = ((words >> shifts) & 0xF).reshape(n, k).to(torch.uint8)  # chunk of 32: nibble i of word j -> 8i + j
    groups = k // AWQ_GROUP
    return AwqParts(codes, t["wscales"][:groups].T.contiguous(), t["wzeros"][:groups].T.contiguous(),
                    t.get("bias"))


def awq_padded_groups(groups: int) -> int:
    """TinyChat's group count for ``groups`` groups of 64: whole int32 packs of 8, an even number of packs."""
    packs = -(-groups // 8)
    return (packs + packs % 2) * 8


def encode_awq(parts: AwqParts, pad_groups: bool = True) -> dict[str, torch.Tensor]:
    """:class:`AwqParts` (``N`` a multiple of 4, ``K`` of 64) -> stored tensors; ``pad_groups``: pad the scale
    groups the way TinyChat does (zero rows), as deepcompressor's Nunchaku files are. The bias is stored in the
    scales' dtype, as deepcompressor stores it (Nunchaku loads the layer's tensors in one dtype)."""
    n, k = parts.codes.shape
    if n % _AWQ_ROWS or k % AWQ_GROUP:
        raise LayoutError(f"AWQ layers need N % 4 == 0 and K % 64 == 0, got [{n}, {k}]")
    nib = parts.codes.to(torch.int32).reshape(n, k // 32, 4, 8)
    words = (nib << torch.arange(0, 16, 4, dtype=torch.int32).reshape(1, 1, 4, 1)).sum(dim=2)  # [N, K/32, 8]
    words = words.reshape(n // _AWQ_ROWS, _AWQ_ROWS, k // 64, 16).permute(0, 2, 1, 3).reshape(n // _AWQ_ROWS, k)
    qweight = words.to(torch.int16).view(torch.int32)  # int32 -> int16 wraps: two's complement of the 16 bits
    groups = awq_padded_groups(k // AWQ_GROUP) if pad_groups else k // AWQ_GROUP
    grouped = lambda x: _pad_to(x.T.contiguous(), (groups, n))  # noqa: E731
    out = dict(qweight=qweight, wscales=grouped(parts.scales), wzeros=grouped(parts.zeros))
    if parts.bias is not None:
        out["bias"] = parts.bias.to(parts.scales.dtype)
    return out
