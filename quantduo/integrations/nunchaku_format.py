"""Read (and write) the published Nunchaku / deepcompressor single-file SVDQuant layout for W4A4 INT4 linears.

Per quantized linear ``<prefix>`` the file holds (``N`` out, ``K`` in, both padded to multiples of 128, ``r`` rank,
a multiple of 16), every tensor in the tiled order of Nunchaku's GPU kernels (an ``mma`` fragment layout with
``warp_n = 128``, as produced by deepcompressor's ``NunchakuWeightPacker``):

* ``qweight``  int8 ``[N, K/2]``: signed INT4 codes; logical ``[N, K]`` viewed as
  ``(N/128, 8, 2, 8, 1, K/64, 1, 2, 4, 8)`` and permuted by :data:`_WEIGHT_PERM`, then 8 nibbles per 32-bit
  little-endian word (element ``i`` of a word at bits ``4i``);
* ``wscales``  ``[K/64, N]``: per-64-input-group scales, logical ``[N, K/64]`` viewed as
  ``(N/128, 1, 8, 2, 4, 2, K/64)`` and permuted by :data:`_VECTOR_PERM`;
* ``smooth_factor`` ``[K]`` and ``bias`` ``[N]``: the same per-128 swizzle as the scales (one column);
* ``proj_down`` ``[K, r]``: the down factor ``[r, K]`` in 16x16 tiles (:func:`_pack_lowrank`), **applied to the raw
  input** (Nunchaku folds ``1 / smooth`` into it); ``proj_up`` ``[N, r]``: ``[N, r]`` in 16x16 tiles.

Nunchaku fuses ``to_q/to_k/to_v`` into ``to_qkv`` (and ``add_q/k/v_proj`` into ``add_qkv_proj``); splitting along
the output rows is exact in the logical layout and gives the shared smoothing + shared down-projection that
:class:`SVDQuantLinear` groups use. Limits (stated, not guessed around): only W4A4 INT4 layers are read; the
activation format is signed INT4 (the file has no unsigned/shift flag); AWQ W4A16 layers (``wzeros``) and NVFP4
micro-scales raise :class:`CheckpointError`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantduo.svdquant import CheckpointError, SVDQuantLinear
from quantduo.formats import quantizers as qz
from quantduo.utils import atomic_write

WARP_N = 128
LOWRANK_TILE = 16
_WEIGHT_PERM = (0, 5, 6, 1, 3, 8, 2, 7, 4, 9)
_VECTOR_PERM = (0, 6, 1, 2, 4, 3, 5)
_LOWRANK_PERM = (0, 1, 3, 6, 2, 5, 4, 7)
# fused Nunchaku module name suffix -> diffusers module suffixes (split by output rows, equal sizes)
FUSED = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.add_qkv_proj": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_LINEAR_KEYS = {"qweight", "wscales", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up", "bias"}


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(perm)), key=lambda i: perm[i]))


def _tile(x: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...]) -> torch.Tensor:
    """Logical tensor -> stored order (flat)."""
    return x.reshape(view).permute(perm).contiguous().reshape(-1)


def _untile(stored: torch.Tensor, view: tuple[int, ...], perm: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Stored order -> logical tensor of ``shape``."""
    return stored.reshape([view[p] for p in perm]).permute(_inverse(perm)).contiguous().reshape(shape)


def _weight_view(n: int, k: int) -> tuple[int, ...]:
    return (n // WARP_N, 8, 2, 8, 1, k // 64, 1, 2, 4, 8)


def _vector_view(n: int, groups: int) -> tuple[int, ...]:
    return (n // WARP_N, 1, 8, 2, 4, 2, groups)


def _lowrank_view(rows: int, cols: int) -> tuple[int, ...]:
    """``[rows, cols]`` tile grid ``(row_tiles, col_tiles, 8, 4, 2, 2, 1, 2)`` after the tile transpose."""
    return (rows // LOWRANK_TILE, cols // LOWRANK_TILE, 2, 8, 1, 2, 4, 2)


def _pack_lowrank(x: torch.Tensor, down: bool) -> torch.Tensor:
    """Logical low-rank factor -> stored ``[rows_out, r]``: ``down`` takes ``[r, K]`` (stored ``[K, r]``),
    otherwise ``[N, r]``."""
    t = LOWRANK_TILE
    if down:
        r, c = x.shape
        tiles = x.reshape(r // t, t, c // t, t).permute(2, 0, 1, 3)
        out_rows, view = c, _lowrank_view(c, r)
    else:
        c, r = x.shape
        tiles = x.reshape(c // t, t, r // t, t).permute(0, 2, 1, 3)
        out_rows, view = c, _lowrank_view(c, r)
    return _tile(tiles, view, _LOWRANK_PERM).reshape(out_rows, -1)


def _unpack_lowrank(stored: torch.Tensor, down: bool) -> torch.Tensor:
    """Inverse of :func:`_pack_lowrank`: ``[r, K]`` for ``down`` else ``[N, r]``."""
    t = LOWRANK_TILE
    rows, r = stored.shape
    tiles = _untile(stored, _lowrank_view(rows, r), _LOWRANK_PERM, (rows // t, r // t, t, t))
    if down:
        return tiles.permute(1, 2, 0, 3).reshape(r, rows)
    return tiles.permute(0, 2, 1, 3).reshape(rows, r)


def _check_shapes(prefix: str, t: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    missing = {"qweight", "wscales", "smooth_factor", "proj_down", "proj_up"} - set(t)
    if missing:
        raise CheckpointError(f"Nunchaku layer {prefix!r} lacks {sorted(missing)}")
    if "wzeros" in t:
        raise CheckpointError(f"{prefix!r} is an AWQ W4A16 layer: not supported by this reader")
    n, k = t["qweight"].shape[0], t["qweight"].shape[1] * 2
    r = t["proj_up"].shape[1]
    expected = {"wscales": (k // 64, n), "smooth_factor": (k,), "proj_down": (k, r), "proj_up": (n, r)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise CheckpointError(f"{prefix}.{name} has shape {tuple(t[name].shape)}, expected {shape} "
                                  f"(INT4 group 64; NVFP4 files are not supported)")
    if n % WARP_N or k % (2 * 64) or r % LOWRANK_TILE:
        raise CheckpointError(f"{prefix}: [{n}, {k}] rank {r} breaks the Nunchaku tiling (128 / 128 / 16)")
    return n, k, r


def decode_linear(prefix: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One Nunchaku linear -> logical float tensors: ``codes`` int8 ``[N, K]``, ``wscales`` ``[N, K/64]``, ``smooth``
    ``[K]``, ``lora_down`` ``[K, r]`` (for ``x / smooth``), ``lora_up`` ``[N, r]``, ``bias`` ``[N]`` or absent."""
    n, k, r = _check_shapes(prefix, t)
    words = t["qweight"].contiguous().view(torch.uint8)
    codes = _untile(qz.unpack_int4(words), _weight_view(n, k), _WEIGHT_PERM, (n, k))
    smooth = _untile(t["smooth_factor"], _vector_view(k, 1), _VECTOR_PERM, (k,))
    out = dict(
        codes=codes, smooth=smooth,
        wscales=_untile(t["wscales"], _vector_view(n, k // 64), _VECTOR_PERM, (n, k // 64)),
        lora_down=_unpack_lowrank(t["proj_down"], down=True).T.float() * smooth.float()[:, None],
        lora_up=_unpack_lowrank(t["proj_up"], down=False),
    )
    if "bias" in t:
        out["bias"] = _untile(t["bias"], _vector_view(n, 1), _VECTOR_PERM, (n,))
    return out


def _module_from(parts: dict[str, torch.Tensor], rows: slice, linear: nn.Module, dtype: torch.dtype) -> SVDQuantLinear:
    """An :class:`SVDQuantLinear` replacing ``linear`` from output rows ``rows`` of decoded tensors."""
    k_pad = linear.in_features + (-linear.in_features) % 64
    module = SVDQuantLinear(linear.in_features, linear.out_features, rank=parts["lora_up"].shape[1],
                            bias=linear.bias is not None, act_format="int4", dtype=dtype)
    with torch.no_grad():
        module.qweight.copy_(qz.pack_int4(parts["codes"][rows, :k_pad]))
        module.wscales.copy_(parts["wscales"][rows, : k_pad // 64])
        module.smooth_factor.copy_(parts["smooth"][:k_pad])
        module.proj_down.copy_(parts["lora_down"][:k_pad])
        module.proj_up.copy_(parts["lora_up"][rows])
        if module.bias is not None:
            module.bias.copy_(parts["bias"][rows] if "bias" in parts else torch.zeros(linear.out_features))
    return module


def _targets(prefix: str, model: nn.Module) -> list[str]:
    for fused, members in FUSED.items():
        if prefix.endswith(fused):
            return [prefix[: -len(fused)] + m for m in members]
    return [prefix]


def load_nunchaku_checkpoint(model: nn.Module, source: str | Path | dict[str, torch.Tensor],
                             dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Swap the linears of ``model`` (a diffusers FLUX transformer) for the Nunchaku file's quantized layers;
    other tensors in the file (``<module>.weight`` / ``.bias``) are loaded as they are. Returns the replaced names.

    Raises :class:`CheckpointError` for keys that match nothing in the model, shape mismatches and unsupported layers.
    """
    state = load_file(str(source)) if isinstance(source, (str, Path)) else dict(source)
    prefixes = {key.rsplit(".", 1)[0] for key in state if key.endswith(".qweight")}
    plain = {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in prefixes}
    replaced = []
    for prefix in sorted(prefixes):
        tensors = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == prefix}
        parts = decode_linear(prefix, tensors)
        names = _targets(prefix, model)
        try:
            linears = [model.get_submodule(n) for n in names]
        except AttributeError as err:
            raise CheckpointError(f"Nunchaku layer {prefix!r} has no counterpart in {type(model).__name__}") from err
        if sum(m.out_features for m in linears) > parts["codes"].shape[0] or linears[0].in_features > parts["codes"].shape[1]:
            raise CheckpointError(f"Nunchaku layer {prefix!r} is smaller than the model's {names}")
        start = 0
        for name, linear in zip(names, linears):
            model.set_submodule(name, _module_from(parts, slice(start, start + linear.out_features), linear, dtype))
            start += linear.out_features
        replaced += names
    own = model.state_dict()
    unknown = [k for k in plain if k not in own]
    if unknown:
        raise CheckpointError(f"Nunchaku file keys not in the model: {unknown[:5]}")
    model.load_state_dict(plain, strict=False)
    return replaced


def encode_linear(module: SVDQuantLinear) -> dict[str, torch.Tensor]:
    """One W4A4 INT4 :class:`SVDQuantLinear` (possibly a fused stack, see :func:`export_nunchaku_checkpoint`) -> the
    Nunchaku tensors, padded to the 128 / 16 tiling. Signed activations only."""
    return _encode(qz.unpack_int4(module.qweight), module.wscales, module.smooth_factor, module.proj_down,
                   module.proj_up, module.bias)


def _pad(x: torch.Tensor, multiples: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    pads = []
    for dim, m in reversed(list(enumerate(multiples))):
        pads += [0, (-x.shape[dim]) % m]
    return torch.nn.functional.pad(x, pads, value=value)


def _encode(codes, wscales, smooth, lora_down, lora_up, bias) -> dict[str, torch.Tensor]:
    codes, wscales = _pad(codes, (WARP_N, 2 * 64)), _pad(wscales.float(), (WARP_N, 2), 1.0).to(wscales.dtype)
    n, k = codes.shape
    smooth = _pad(smooth, (k,), 1.0)
    down = _pad((lora_down.float() / smooth[: lora_down.shape[0], None].float()), (k, LOWRANK_TILE))
    up = _pad(lora_up, (WARP_N, LOWRANK_TILE))
    out = dict(
        qweight=qz.pack_int4(_tile(codes, _weight_view(n, k), _WEIGHT_PERM).reshape(n, k)).view(torch.int8),
        wscales=_tile(wscales, _vector_view(n, k // 64), _VECTOR_PERM).reshape(k // 64, n),
        smooth_factor=_tile(smooth, _vector_view(k, 1), _VECTOR_PERM),
        proj_down=_pack_lowrank(down.T.to(lora_down.dtype).contiguous(), down=True),
        proj_up=_pack_lowrank(up, down=False),
    )
    if bias is not None:
        out["bias"] = _tile(_pad(bias, (n,)), _vector_view(n, 1), _VECTOR_PERM)
    return out


def export_nunchaku_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` (W4A4 INT4 SVDQuant, signed activations) in the Nunchaku layout, fusing q/k/v groups
    (:data:`FUSED`; they must share smoothing and down-projection); full-precision tensors are written as they are."""
    modules = dict(model.named_modules())
    quantized = {n: m for n, m in modules.items() if isinstance(m, SVDQuantLinear)}
    bad = [n for n, m in quantized.items() if m.act_format != "int4" or m.weight_format != "int4"]
    if bad:
        raise ValueError(f"only signed W4A4 INT4 layers fit the Nunchaku layout, not {bad[:3]}")
    tensors, done = {}, set()
    for fused, members in FUSED.items():
        for name in [n for n in quantized if n.endswith(members[0])]:
            prefix = name[: -len(members[0])]
            group = [quantized[prefix + m] for m in members]
            if not all(torch.equal(g.smooth_factor, group[0].smooth_factor) and torch.equal(g.proj_down, group[0].proj_down) for g in group):
                raise ValueError(f"{prefix}{fused}: members do not share smoothing / down-projection")
            cat = lambda attr: torch.cat([getattr(g, attr) for g in group])  # noqa: E731
            bias = cat("bias") if group[0].bias is not None else None
            parts = _encode(qz.unpack_int4(cat("qweight")), cat("wscales"), group[0].smooth_factor,
                            group[0].proj_down, cat("proj_up"), bias)
            tensors.update({f"{prefix}{fused}.{k}": v for k, v in parts.items()})
            done.update(prefix + m for m in members)
    for name, module in quantized.items():
        if name not in done:
            tensors.update({f"{name}.{k}": v for k, v in encode_linear(module).items()})
    for key, value in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner not in quantized:
            tensors[key] = value
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))
