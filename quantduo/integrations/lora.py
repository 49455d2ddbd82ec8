"""LoRA on SVDQuant models without re-quantization: the LoRA joins the 16-bit low-rank branch.

A LoRA on a linear ``y = x W^T`` adds ``strength * scale * x A^T B^T`` (``A [r, in]``, ``B [out, r]``,
``scale = alpha / r``). An :class:`SVDQuantLinear` feeds its low-rank branch the smoothed input ``x / s``, so
``x A^T B^T = (x / s) (diag(s) A^T) B^T``: the LoRA becomes extra columns ``s[:, None] * A^T`` of the
SVD branch's ``proj_down`` and ``strength * scale * B`` of its ``proj_up``. Full-precision ``nn.Linear`` layers (embedders kept in 16 bits) get
the LoRA merged into their weight instead; their original weight is kept so that LoRAs can be re-weighted or
removed exactly. Several LoRAs can be attached at once, each under its own name.

Accepted key formats (a ``.safetensors`` path or a state dict of tensors):

* diffusers / PEFT: ``[transformer.|base_model.model.]<module>.lora_A[.<adapter>].weight`` / ``lora_B``, with
  an optional ``<module>.alpha``;
* kohya with diffusers module names: ``lora_transformer_<module with '.' -> '_'>.lora_down.weight`` /
  ``lora_up.weight`` / ``alpha`` (also ``lora_unet_`` prefix);
* kohya with the original FLUX (BFL) names: ``lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight`` ... ;
  fused projections (``img_attn_qkv``, ``single_blocks_*_linear1``) are split by output rows onto the diffusers
  modules, sharing ``A``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from quantduo.svdquant.linear import SVDQuantLinear


class LoraFormatError(ValueError):
    """A LoRA file whose keys or shapes do not match the model."""


@dataclass
class LoraFactors:
    """One module's LoRA: ``down`` (A) float32 ``[r, in]``, ``up`` (B) float32 ``[out, r]``, ``scale`` = alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0


@dataclass
class _Attached:
    """A LoRA as stored on a module: for SVDQuantLinear ``down`` is already ``s[:, None] * A^T`` ``[K_pad, r]``;
    for nn.Linear it is ``A [r, in]``. ``up`` is ``scale * B [out, r]`` (strength not applied)."""

    down: torch.Tensor
    up: torch.Tensor
    strength: float


# ---------------------------------------------------------------------------------------------
# reading key formats
# ---------------------------------------------------------------------------------------------
_PEFT = re.compile(r"^(?:transformer\.|unet\.|base_model\.model\.)?(?P<module>.+?)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")
_KOHYA = re.compile(r"^lora_(?:unet|transformer)_(?P<module>.+?)\.(?P<part>lora_down|lora_up|alpha)(?:\.weight)?$")
_PEFT_ALPHA = re.compile(r"^(?:transformer\.|unet\.|base_model\.model\.)?(?P<module>.+?)\.alpha$")

# BFL FLUX names -> diffusers module suffixes (lists are fused projections, split by output rows)
_BFL_DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"],
    "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_mod_lin": ["norm1_context.linear"],
}
_BFL_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}
_BFL_NAME = re.compile(r"^(?P<kind>double|single)_blocks_(?P<idx>\d+)_(?P<rest>.+)$")


def _targets(key_module: str, modules: dict[str, nn.Module], underscored: dict[str, str]) -> list[str] | None:
    """Diffusers module names a LoRA key's module refers to (several for fused BFL projections)."""
    if key_module in modules:
        return [key_module]
    if key_module in underscored:
        return [underscored[key_module]]
    m = _BFL_NAME.match(key_module)
    if m:
        table, block = (_BFL_DOUBLE, "transformer_blocks") if m["kind"] == "double" else (_BFL_SINGLE, "single_transformer_blocks")
        suffixes = table.get(m["rest"])
        if suffixes:
            return [f"{block}.{m['idx']}.{s}" for s in suffixes]
    return None


def _group_keys(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{key_module: {"A"|"B"|"alpha": tensor}}`` from any supported key format."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        if m := _KOHYA.match(key):
            part = {"lora_down": "A", "lora_up": "B", "alpha": "alpha"}[m["part"]]
        elif m := _PEFT.match(key):
            part = m["part"]
        elif m := _PEFT_ALPHA.match(key):
            part = "alpha"
        else:
            unknown.append(key)
            continue
        groups.setdefault(m["module"], {})[part] = tensor
    if unknown:
        raise LoraFormatError(f"unrecognised LoRA keys (not diffusers/PEFT or kohya): {unknown[:5]}")
    return groups


def read_lora(source: str | Path | dict[str, torch.Tensor], model: nn.Module) -> dict[str, LoraFactors]:
    """Parse a LoRA for ``model``: ``{module name: LoraFactors}``.

    Raises :class:`LoraFormatError` for unknown keys, modules absent from the model, missing halves or
    shapes that do not fit the target modules.
    """
    state = load_file(str(source)) if isinstance(source, (str, Path)) else dict(source)
    if not state:
        raise LoraFormatError("empty LoRA state dict")
    modules = dict(model.named_modules())
    underscored = {name.replace(".", "_"): name for name in modules if name}
    result: dict[str, LoraFactors] = {}
    for key_module, parts in _group_keys(state).items():
        if "A" not in parts or "B" not in parts:
            raise LoraFormatError(f"LoRA for {key_module!r} lacks its {'B (up)' if 'A' in parts else 'A (down)'} matrix")
        targets = _targets(key_module, modules, underscored)
        if targets is None:
            raise LoraFormatError(f"LoRA module {key_module!r} does not exist in {type(model).__name__}")
        down, up = parts["A"].float(), parts["B"].float()
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise LoraFormatError(f"LoRA {key_module!r}: A {tuple(down.shape)} and B {tuple(up.shape)} are not [r, in] / [out, r]")
        scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
        result.update(_split(key_module, targets, model, LoraFactors(down, up, scale)))
    return result


def _split(key_module: str, targets: list[str], model: nn.Module, lora: LoraFactors) -> dict[str, LoraFactors]:
    """Split a (possibly fused) LoRA over ``targets`` by output rows, checking shapes."""
    modules = [model.get_submodule(t) for t in targets]
    for name, module in zip(targets, modules):
        if not isinstance(module, (nn.Linear, SVDQuantLinear)):
            raise LoraFormatError(f"LoRA target {name!r} is a {type(module).__name__}, not a linear layer")
        if module.in_features != lora.down.shape[1]:
            raise LoraFormatError(
                f"LoRA {key_module!r} has in_features {lora.down.shape[1]}, module {name!r} has {module.in_features}"
            )
    sizes = [m.out_features for m in modules]
    if sum(sizes) != lora.up.shape[0]:
        raise LoraFormatError(f"LoRA {key_module!r} has {lora.up.shape[0]} output rows, targets {targets} have {sum(sizes)}")
    return {t: LoraFactors(lora.down, up, lora.scale) for t, up in zip(targets, lora.up.split(sizes))}


# ---------------------------------------------------------------------------------------------
# attaching
# ---------------------------------------------------------------------------------------------
def _registry(module: nn.Module) -> dict[str, _Attached]:
    """Per-module LoRA registry; first use records the base state (rank / weight) the LoRAs are added to."""
    if not hasattr(module, "_quantduo_loras"):
        module._quantduo_loras = {}
        if isinstance(module, SVDQuantLinear):
            module._quantduo_base_rank = module.proj_down.shape[1]
        else:
            module._quantduo_base_weight = module.weight.detach().clone()
    return module._quantduo_loras


def _rebuild(module: nn.Module) -> None:
    """Recompute the module's low-rank branch (or merged weight) from its base state and attached LoRAs."""
    loras = module._quantduo_loras.values()
    with torch.no_grad():
        if isinstance(module, SVDQuantLinear):
            r0, dtype = module._quantduo_base_rank, module.dtype
            module.proj_down = torch.cat([module.proj_down[:, :r0]] + [a.down.to(dtype) for a in loras], dim=1)
            module.proj_up = torch.cat([module.proj_up[:, :r0]] + [(a.up * a.strength).to(dtype) for a in loras], dim=1)
            module.low_rank_updated()
        else:
            weight = module._quantduo_base_weight.float()
            for a in loras:
                weight = weight + a.strength * a.up @ a.down
            module.weight.copy_(weight)


def _prepare(module: nn.Module, lora: LoraFactors, strength: float) -> _Attached:
    if isinstance(module, SVDQuantLinear):
        smooth = module.smooth_factor.float()
        down_t = torch.zeros(module.padded_in_features, lora.down.shape[0], device=smooth.device)
        down_t[: module.in_features] = lora.down.T.to(smooth.device)
        return _Attached(smooth[:, None] * down_t, lora.scale * lora.up.to(smooth.device), strength)
    device = module.weight.device
    return _Attached(lora.down.to(device), lora.scale * lora.up.to(device), strength)


def attach_lora(
    model: nn.Module, source: str | Path | dict[str, torch.Tensor], name: str, strength: float = 1.0
) -> list[str]:
    """Attach a LoRA to ``model`` under ``name`` (no re-quantization); returns the modules it touched.

    Raises ``ValueError`` if ``name`` is already attached, :class:`LoraFormatError` for a LoRA that does not fit.
    """
    if name in attached_loras(model):
        raise ValueError(f"a LoRA named {name!r} is already attached; remove it or pick another name")
    factors = read_lora(source, model)
    for module_name, lora in factors.items():
        module = model.get_submodule(module_name)
        _registry(module)[name] = _prepare(module, lora, strength)
        _rebuild(module)
    return list(factors)


def _modules_with(model: nn.Module, name: str) -> list[nn.Module]:
    found = [m for m in model.modules() if name in getattr(m, "_quantduo_loras", {})]
    if not found:
        raise KeyError(f"no LoRA named {name!r} is attached (attached: {sorted(attached_loras(model))})")
    return found


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    """Re-weight an attached LoRA."""
    for module in _modules_with(model, name):
        module._quantduo_loras[name].strength = strength
        _rebuild(module)


def remove_lora(model: nn.Module, name: str) -> None:
    """Detach a LoRA; the module returns exactly to its state without it."""
    for module in _modules_with(model, name):
        del module._quantduo_loras[name]
        _rebuild(module)


def attached_loras(model: nn.Module) -> dict[str, float]:
    """``{name: strength}`` of the LoRAs attached to ``model``."""
    return {n: a.strength for m in model.modules() for n, a in getattr(m, "_quantduo_loras", {}).items()}
