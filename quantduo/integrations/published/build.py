"""Map a :class:`~.reader.PublishedCheckpoint` onto a diffusers model: group its keys by stored module, decode each
module (:mod:`quantduo.formats.nunchaku`) into :class:`SVDQuantLinear` layers with Nunchaku's semantics, and load
the 16-bit tensors. Every key is accounted for: a key that maps nowhere is an error, as is a model tensor that
neither the checkpoint nor the base weights provide.

Semantics (as Nunchaku computes them):

* W4A4 INT4 layers: ``y = Q(x / smooth) @ R^T + x @ lora_down @ lora_up^T + bias`` with signed INT4
  activations (per 64: ``amax * float32(1 / 7)``, codes ``x`` times its reciprocal, the scale kept in 16 bits:
  :func:`~quantduo.formats.quantizers.quantize_activations_4bit`); post-GELU layers (:attr:`~.layouts.Role.shifted`)
  quantize ``(x + 0.171875) / smooth`` as unsigned INT4 (``amax * float32(1 / 15)``) and their stored bias already
  holds the shift's terms (used as is). In quantduo terms: ``act_format="uint4"``, ``act_shift = 0.171875`` (input
  space, exact in 16 bits; quantduo adds it and divides in Nunchaku's order), ``proj_down = lora_down * smooth``.
* W4A4 NVFP4 layers (Blackwell files): the same formula with ``R = grid[code] * wscales * wcscales[n] * wtscale``
  (FP8 scales per 16 inputs, optional per-channel ``wcscales`` and per-tensor ``wtscale``, 1 where absent) and
  activations quantized per 16 to E2M1 with FP8 scales (``amax * float32(1 / 6)``, codes ``x`` times its
  reciprocal) and no tensor scale (:func:`~quantduo.formats.quantizers.quantize_nvfp4_nunchaku`); every layer signed and unshifted, post-GELU ones
  included (Nunchaku's kernels shift and quantize unsigned only under INT4). In quantduo terms:
  ``weight_format="nvfp4"``, ``act_format="nvfp4_nunchaku"``, ``wscale_channel = wcscales``,
  ``wscale_global = wtscale``.
* AWQ W4A16 layers: ``w = code * scale + zero``; held exactly as signed codes ``code - o`` (``o`` per group,
  chosen so the codes fit [-8, 7]) plus, where ``o * scale + zero`` is not 0, a rank-``K/64`` branch that adds
  those per-group offsets (``proj_down`` = group indicator, ``proj_up`` = offsets).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from quantduo.formats import nunchaku as nk
from quantduo.formats import quantizers as qz
from quantduo.svdquant import CheckpointError, SVDQuantLinear
from quantduo.svdquant.split import SPLIT_HALVES, SplitProjOut

from .layouts import AWQ_TENSORS, BLOCKS, GELU_SHIFT, W4A4_TENSORS, Role, block_roles, canonical_tensor
from .reader import PublishedCheckpoint


@dataclass
class StoredModule:
    """The tensors of one stored quantized / plain module: ``prefix`` (stored name), ``scope`` (block prefix with
    trailing dot, or ``""``), ``role``, ``tensors`` (canonical tensor name -> tensor) and their original keys."""

    prefix: str
    scope: str
    role: Role
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)

    def targets(self) -> list[str]:
        return [self.scope + t for t in self.role.targets]


@dataclass
class Grouped:
    """A checkpoint's keys sorted out: stored modules, plain tensors under their diffusers names, unmapped keys."""

    modules: list[StoredModule]
    plain: dict[str, torch.Tensor]
    unmapped: list[str]


# ---------------------------------------------------------------------------------------------
# grouping keys
# ---------------------------------------------------------------------------------------------
def _scope_tables(ckpt: PublishedCheckpoint) -> list[tuple[re.Pattern, dict[str, Role]]]:
    """(scope pattern, {stored module: Role}) pairs of the checkpoint's layout."""
    if ckpt.layout == "nunchaku-lite":
        q = ckpt.quantization
        roles = {t: Role("w4a4", (t,)) for t in (q.get("svdq_w4a4") or {}).get("targets", [])}
        roles.update({t: Role("awq", (t,)) for t in (q.get("awq_w4a16") or {}).get("targets", [])})
        return [(re.compile(r"^()"), roles)]
    tables = block_roles(ckpt.layout)
    return [(re.compile(rf"^({b}\.\d+\.)"), tables[b]) for b in BLOCKS]


def _match(rest: str, roles: dict[str, Role]) -> tuple[str, str] | None:
    """``(stored module, tensor name)`` if ``rest`` is ``<module>.<tensor>`` for a module of ``roles``."""
    module, _, tensor = rest.rpartition(".")
    return (module, tensor) if module in roles else None


def group_keys(ckpt: PublishedCheckpoint) -> Grouped:
    """Sort every key of ``ckpt`` into stored modules, plain tensors (diffusers names) or unmapped keys."""
    modules: dict[str, StoredModule] = {}
    plain, unmapped = {}, []
    tables = _scope_tables(ckpt)
    for key, tensor in ckpt.tensors.items():
        found = None
        for pattern, roles in tables:
            m = pattern.match(key)
            if m and (hit := _match(key[m.end():], roles)):
                found = (m.group(1), *hit, roles[hit[0]])
                break
        if found is None:
            plain[key] = tensor  # a diffusers name, checked against the model later
            continue
        scope, module, tensor_name, role = found
        if role.kind == "plain":
            plain[f"{scope}{role.targets[0]}.{tensor_name}"] = tensor
            continue
        name = canonical_tensor(tensor_name)
        if name not in (W4A4_TENSORS if role.kind == "w4a4" else AWQ_TENSORS):
            unmapped.append(key)
            continue
        stored = modules.setdefault(scope + module, StoredModule(scope + module, scope, role))
        stored.tensors[name] = tensor
        stored.keys.append(key)
    if ckpt.layout == "nunchaku-lite":
        _check_lite_precision(ckpt, modules.values())
    return Grouped(list(modules.values()), plain, unmapped)


def _check_lite_precision(ckpt: PublishedCheckpoint, modules) -> None:
    """The lite config's ``svdq_w4a4.precision`` must be what the tensors hold (NVFP4: float8 ``wscales``)."""
    precision = (ckpt.quantization.get("svdq_w4a4") or {}).get("precision")
    for stored in modules:
        scales = stored.tensors.get("wscales")
        if stored.role.kind == "w4a4" and scales is not None and (scales.dtype == torch.float8_e4m3fn) != (
                precision == "nvfp4"):
            raise CheckpointError(f"{stored.prefix}: quantization_config says svdq_w4a4 precision {precision!r}, "
                                  f"but its wscales are {scales.dtype}")


# ---------------------------------------------------------------------------------------------
# building layers
# ---------------------------------------------------------------------------------------------
def _target_linear(model: nn.Module, name: str) -> tuple[int, int]:
    """``(in_features, out_features)`` the model needs at ``name`` (split halves of a FLUX single block's
    ``proj_out``: the attention / MLP input columns)."""
    parent, _, leaf = name.rpartition(".")
    if leaf in SPLIT_HALVES and parent.endswith("proj_out"):
        linear, block = _get(model, parent), _get(model, parent.rpartition(".")[0])
        mlp = block.mlp_hidden_dim
        return (linear.in_features - mlp if leaf == "out_proj" else mlp), linear.out_features
    linear = _get(model, name)
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"checkpoint module targets {name!r}, which is a {type(linear).__name__} in "
                              f"{type(model).__name__}, not a linear layer")
    return linear.in_features, linear.out_features


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise CheckpointError(f"checkpoint module {name!r} has no counterpart in {type(model).__name__} "
                              "(a checkpoint for another model class or config?)") from err


def _fits(stored: int, needed: int, multiple: int) -> bool:
    return stored == needed + (-needed) % multiple


def _check_fit(stored: StoredModule, shapes: list[tuple[int, int]], n: int, k: int, multiple: int) -> None:
    rows, ins = sum(s[1] for s in shapes), {s[0] for s in shapes}
    if len(ins) != 1 or not _fits(n, rows, multiple) or not _fits(k, ins.pop(), multiple):
        raise CheckpointError(f"{stored.prefix}: stored as [{n}, {k}], but the model's {stored.targets()} need "
                              f"{[(o, i) for i, o in shapes]} (out, in): a checkpoint for another model config?")


def _w4a4_layers(stored: StoredModule, model: nn.Module, dtype: torch.dtype) -> dict[str, SVDQuantLinear]:
    try:
        parts = nk.decode_w4a4(stored.prefix, stored.tensors)
    except nk.LayoutError as err:
        raise CheckpointError(str(err)) from err
    shapes = [_target_linear(model, t) for t in stored.targets()]
    _check_fit(stored, shapes, *parts.codes.shape, nk.WARP_N)
    layers, start = {}, 0
    for name, (in_features, out_features) in zip(stored.targets(), shapes):
        rows = slice(start, start + out_features)
        layers[name] = _w4a4_layer(parts, rows, in_features, stored.role.shifted, dtype)
        start += out_features
    return layers


def _w4a4_layer(parts: nk.W4A4Parts, rows: slice, in_features: int, shifted: bool,
                dtype: torch.dtype) -> SVDQuantLinear:
    """Output rows ``rows`` of a decoded W4A4 linear as an :class:`SVDQuantLinear` (Nunchaku's semantics: INT4, or
    NVFP4 whose layers are never shifted)."""
    shifted = shifted and not parts.nvfp4
    layer = SVDQuantLinear(in_features, rows.stop - rows.start, rank=parts.lora_up.shape[1],
                           bias=parts.bias is not None, weight_format="nvfp4" if parts.nvfp4 else "int4",
                           act_format=_act_format(parts.nvfp4, shifted), dtype=dtype)
    k = layer.padded_in_features
    smooth = parts.smooth[:k].float()
    with torch.no_grad():
        layer.qweight.copy_(qz.pack_nibbles(parts.codes[rows, :k]))
        layer.wscales.copy_(parts.wscales[rows, : k // layer.group_size])
        if parts.wcscales is not None:
            layer.wscale_channel.copy_(parts.wcscales[rows])
        if parts.wtscale is not None:
            layer.wscale_global.copy_(parts.wtscale)
        layer.smooth_factor.copy_(parts.smooth[:k])
        layer.proj_down.copy_(parts.lora_down[:k].float() * smooth[:, None])
        layer.proj_up.copy_(parts.lora_up[rows])
        if shifted:
            layer.act_shift.fill_(GELU_SHIFT)
        if parts.bias is not None:
            layer.bias.copy_(parts.bias[rows])
    return layer


def _act_format(nvfp4: bool, shifted: bool) -> str:
    if nvfp4:
        return "nvfp4_nunchaku"
    return "uint4" if shifted else "int4"


def modulation_order(x: torch.Tensor, splits: int) -> torch.Tensor:
    """Rows of Nunchaku's interleaved modulation layout (row ``i * splits + s``) -> diffusers' chunk order
    (row ``s * N / splits + i``); ``x`` ``[N, ...]``."""
    return x.reshape(x.shape[0] // splits, splits, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def modulation_bias_offset(n: int, splits: int) -> torch.Tensor:
    """The ``+1`` Nunchaku folds into the bias of the scale chunks (chunk 1 and chunk ``splits - 2``), ``[N]`` in
    diffusers' chunk order."""
    delta = torch.zeros(splits, n // splits)
    delta[1] = delta[splits - 2] = 1.0
    return delta.reshape(n)


def awq_to_signed(parts: nk.AwqParts) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact signed form of AWQ weights: ``(codes int8 [N, K] in [-8, 7], offsets float32 [N, K/64])`` with
    ``codes * scales + offsets == parts.codes * scales + zeros`` (per group ``o`` near ``-zeros / scales``,
    clamped so the codes fit; offsets ``o * scales + zeros``, 0 for the usual symmetric ``zeros = -7 * scales``
    with codes in [0, 14])."""
    n, k = parts.codes.shape
    g = parts.codes.reshape(n, k // nk.AWQ_GROUP, nk.AWQ_GROUP).to(torch.int32)
    s, z = parts.scales.float(), parts.zeros.float()
    ideal = torch.where(s != 0, -z / s, torch.zeros_like(s)).round().clamp(-64, 64).to(torch.int32)
    offset = torch.maximum(torch.minimum(ideal, g.amin(-1) + 8), g.amax(-1) - 7)
    codes = (g - offset[..., None]).reshape(n, k).to(torch.int8)
    return codes, offset.float() * s + z


def _awq_layer(stored: StoredModule, model: nn.Module, dtype: torch.dtype) -> dict[str, SVDQuantLinear]:
    try:
        parts = nk.decode_awq(stored.prefix, stored.tensors)
    except nk.LayoutError as err:
        raise CheckpointError(str(err)) from err
    (name,) = stored.targets()
    in_features, out_features = _target_linear(model, name)
    _check_fit(stored, [(in_features, out_features)], *parts.codes.shape, 1)
    splits = stored.role.adanorm_splits
    if splits:
        order = lambda t: modulation_order(t, splits)  # noqa: E731
        bias = None if parts.bias is None else order(parts.bias.float()) - modulation_bias_offset(out_features, splits)
        parts = nk.AwqParts(order(parts.codes), order(parts.scales), order(parts.zeros), bias)
    codes, offsets = awq_to_signed(parts)
    groups = in_features // nk.AWQ_GROUP
    rank = groups if bool((offsets != 0).any()) else 0
    layer = SVDQuantLinear(in_features, out_features, rank=rank, bias=parts.bias is not None, act_format="none",
                           dtype=dtype)
    with torch.no_grad():
        layer.qweight.copy_(qz.pack_int4(codes))
        layer.wscales.copy_(parts.scales)
        if rank:
            layer.proj_down.copy_(torch.eye(groups).repeat_interleave(nk.AWQ_GROUP, dim=0))
            layer.proj_up.copy_(offsets)
        if parts.bias is not None:
            layer.bias.copy_(parts.bias)
    return {name: layer}


def build_layers(grouped: Grouped, model: nn.Module, dtype: torch.dtype) -> dict[str, nn.Module]:
    """``{diffusers module name: quantized module}`` for every stored module (split ``proj_out`` halves joined
    into :class:`SplitProjOut`). ``model`` may live on the meta device (only shapes are read)."""
    layers: dict[str, nn.Module] = {}
    for stored in grouped.modules:
        build = _w4a4_layers if stored.role.kind == "w4a4" else _awq_layer
        layers.update(build(stored, model, dtype))
    for name in [n for n in layers if n.endswith(".proj_out.out_proj")]:
        parent = name.rpartition(".")[0]
        if parent + ".mlp_fc2" not in layers:
            raise CheckpointError(f"{parent}: the checkpoint holds out_proj but not mlp_fc2")
        layers[parent] = SplitProjOut(layers.pop(name), layers.pop(parent + ".mlp_fc2"))
    orphans = [n for n in layers if n.endswith(".proj_out.mlp_fc2")]
    if orphans:
        raise CheckpointError(f"{orphans[0].rpartition('.')[0]}: the checkpoint holds mlp_fc2 but not out_proj")
    return layers
