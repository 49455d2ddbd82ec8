"""LoRA on SVDQuant models without re-quantization: the LoRA joins the 16-bit low-rank branch.

A LoRA on a linear ``y = x W^T`` adds ``strength * scale * x A^T B^T`` (``A [r, in]``, ``B [out, r]``,
``scale = alpha / r``). An :class:`SVDQuantLinear` feeds its low-rank branch the smoothed input ``x / s``, so
``x A^T B^T = (x / s) (diag(s) A^T) B^T``: the LoRA becomes extra columns ``s[:, None] * A^T`` of the
SVD branch's ``proj_down`` and ``strength * scale * B`` of its ``proj_up``. The executions that keep the branch in 16
bits (``exact``, ``a16``) run the LoRA there; fp8 execution folds the whole branch, LoRA included, into each call's
fp8 weight, so a LoRA's effect carries that execution's rounding (within fp8's error of the layer output, but the
difference with and without the LoRA is far noisier than in 16 bits). Full-precision ``nn.Linear`` layers (embedders kept in 16 bits) get
the LoRA merged into their weight instead; their original weight is kept so that LoRAs can be re-weighted or
removed exactly. Several LoRAs can be attached at once, each under its own name.

Accepted key formats (a ``.safetensors`` path or a state dict of tensors):

* diffusers / PEFT: ``[transformer.|base_model.model.]<module>.lora_A[.<adapter>].weight`` / ``lora_B``, with
  an optional ``<module>.alpha`` and ``lora_B.bias`` (PEFT's ``lora_bias``: added to the layer's bias, scaled as B);
* kohya with diffusers module names: ``lora_transformer_<module with '.' -> '_'>.lora_down.weight`` /
  ``lora_up.weight`` / ``alpha`` (also ``lora_unet_`` prefix);
* kohya with the original FLUX (BFL) names: ``lora_unet_double_blocks_3_img_attn_qkv.lora_down.weight`` ... ;
  fused projections (``img_attn_qkv``, ``single_blocks_*_linear1``) are split by output rows onto the diffusers
  modules, sharing ``A``; the embedders and final layer (``img_in``, ``txt_in``, ``time_in_*``, ``vector_in_*``,
  ``guidance_in_*``, ``final_layer_linear``, ``final_layer_adaLN_modulation_1`` with its shift / scale halves
  swapped) map as diffusers maps them (one difference: ``.alpha`` scales the final layer too, as kohya and ComfyUI
  apply it; diffusers ignores it there);
* the same BFL names as ComfyUI writes them, ``diffusion_model.double_blocks.3.img_attn.qkv.lora_down.weight`` /
  ``.alpha``, or with ``lora_A`` / ``lora_B`` (with or without the ``diffusion_model.`` prefix);
* XLabs: ``double_blocks.N.processor.{qkv,proj}_lora{1,2}.{down,up}.weight`` (1: image stream, 2: text stream)
  and ``single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight`` (the attention's q / k / v, ``proj_out``).

Ambiguous files raise :class:`LoraFormatError` rather than letting one entry win: several PEFT adapters, two keys
for one matrix, two formats reaching one module; so do DoRA files. The bias / norm deltas of kohya files
(``.diff``, ``.diff_b``) are skipped with a :class:`LoraKeysSkipped` warning (diffusers drops the bias and norm
deltas too, and refuses a linear layer's full ``.diff``).

Scale ``alpha / r``: from ``<module>.alpha`` tensors, else from the adapter config diffusers and PEFT store —
the safetensors metadata ``lora_adapter_metadata`` (diffusers' ``save_lora_weights``) or a PEFT folder's
``adapter_config.json`` — with ``use_rslora`` (``alpha / sqrt(r)``) and ``rank_pattern`` / ``alpha_pattern``; else
1. Text-encoder keys (``text_encoder*.``, kohya ``lora_te*_``, ComfyUI ``text_encoders.*``) are not applied: the transformer part is, and the
skipped keys are reported by a :class:`LoraKeysSkipped` warning. A LoRA on a split ``proj_out``
(:class:`~quantduo.svdquant.split.SplitProjOut`, published Nunchaku checkpoints) is split by input columns onto its
halves.

A model whose attention projections are fused (``fuse_qkv`` of :mod:`quantduo.integrations.diffusers`, diffusers'
``fuse_qkv_projections``: ``fused_projections`` set) runs fused copies of ``to_q`` / ``to_k`` / ``to_v``, which a LoRA
change would not reach: attaching, re-weighting or removing a LoRA there raises :class:`FusedProjectionsError`.
LoRAs attached before fusing are part of the fused layers.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quantduo.svdquant.linear import SVDQuantLinear
from quantduo.svdquant.serialization import LORA_REGISTRY
from quantduo.svdquant.split import SplitProjOut


class LoraFormatError(ValueError):
    """A LoRA file whose keys or shapes do not match the model."""


class FusedProjectionsError(ValueError):
    """A LoRA change on a model whose attention projections are fused."""


class LoraKeysSkipped(UserWarning):
    """A LoRA file holds keys that are not applied (text encoders; kohya bias / norm deltas): the rest was."""


@dataclass
class LoraFactors:
    """One module's LoRA: ``down`` (A) float32 ``[r, in]``, ``up`` (B) float32 ``[out, r]``, ``scale`` = alpha / r,
    ``bias`` float32 ``[out]`` or None (PEFT's ``lora_bias``: B's bias, scaled as B is)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    bias: torch.Tensor | None = None


@dataclass
class _Attached:
    """A LoRA as stored on a module: for SVDQuantLinear ``down`` is already ``s[:, None] * A^T`` ``[K_pad, r]``;
    for nn.Linear it is ``A [r, in]``. ``up`` is ``scale * B [out, r]``, ``bias`` ``scale * b [out]`` or None
    (strength not applied)."""

    down: torch.Tensor
    up: torch.Tensor
    strength: float
    bias: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# reading key formats
# ---------------------------------------------------------------------------------------------
_PEFT = re.compile(r"^(?:transformer\.|unet\.|base_model\.model\.)?(?P<module>.+?)\.lora_(?P<part>[AB])"
                   r"(?:\.(?P<adapter>[^.]+))?\.(?P<kind>weight|bias)$")
_KOHYA = re.compile(r"^(?:lora_(?:unet|transformer)_|(?P<comfy>diffusion_model\.))(?P<module>.+?)"
                    r"\.(?P<part>lora_down|lora_up|alpha)(?:\.weight)?$")
_PEFT_ALPHA = re.compile(r"^(?:transformer\.|unet\.|base_model\.model\.)?(?P<module>.+?)\.alpha$")
# XLabs: double_blocks.N.processor.{qkv,proj}_lora{1 (image stream), 2 (text stream)}.{down,up}.weight and
# single_blocks.N.processor.{qkv,proj}_lora.{down,up}.weight (qkv: the attention's q, k, v; proj: linear2)
_XLABS = re.compile(r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<idx>\d+)\.processor\."
                    r"(?P<proj>qkv|proj)_lora(?P<stream>[12]?)\.(?P<part>down|up)\.weight$")
# keys diffusers drops when it loads kohya FLUX LoRAs (bias and norm deltas): skipped with a warning, as there
_DROPPED = re.compile(r"\.(?:diff|diff_b)$")
_DORA = re.compile(r"\.(?:dora_scale|lora_magnitude_vector(?:\.[^.]+)?)(?:\.weight)?$")

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
    "xlabs_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],  # XLabs' single-block qkv_lora: linear1's q, k, v rows
}
_BFL_NAME = re.compile(r"^(?P<kind>double|single)_blocks_(?P<idx>\d+)_(?P<rest>.+)$")
# BFL embedders / final layer -> diffusers modules (diffusers' _convert_kohya_flux_lora_to_diffusers)
_BFL_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out", "final_layer_adaLN_modulation_1": "norm_out.linear",
}
# BFL modules whose output halves are (shift, scale) where diffusers has (scale, shift)
_SWAP_SCALE_SHIFT = {"final_layer_adaLN_modulation_1"}
# text encoders: diffusers' ``text_encoder[_2].``, kohya's ``lora_te[N]_``, ComfyUI's ``text_encoders.<name>.``
_TEXT_ENCODER = re.compile(r"^(?:text_encoders?(?:_\d)?\.|lora_te\d?_)")
_ADAPTER_METADATA = "lora_adapter_metadata"
_PEFT_WEIGHTS, _PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class AdapterConfig:
    """The scaling part of a PEFT ``LoraConfig``: ``scale(module, rank)`` = ``alpha / r`` (``alpha / sqrt(r)`` with
    ``use_rslora``), ``r`` and ``alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (PEFT's matching: the
    pattern matches the end of the module name at a ``.`` boundary)."""

    lora_alpha: float
    r: int | None = None
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, config: dict) -> "AdapterConfig | None":
        """From a PEFT config dict, or diffusers' metadata whose keys carry a ``transformer.`` prefix; None without
        ``lora_alpha``."""
        plain = {k.removeprefix("transformer."): v for k, v in config.items()
                 if not k.startswith(("text_encoder", "unet."))}
        if plain.get("lora_alpha") is None:
            return None
        return cls(float(plain["lora_alpha"]), plain.get("r"), bool(plain.get("use_rslora", False)),
                   plain.get("rank_pattern") or {}, plain.get("alpha_pattern") or {})

    @staticmethod
    def _lookup(patterns: dict, module: str, default):
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    def scale(self, module: str, rank: int) -> float:
        r = self._lookup(self.rank_pattern, module, self.r or rank)
        alpha = float(self._lookup(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _targets(key_module: str, modules: dict[str, nn.Module], underscored: dict[str, str]) -> list[str] | None:
    """Diffusers module names a LoRA key's module refers to (several for fused BFL projections); BFL names may come
    with dots (``double_blocks.0.img_attn.qkv``, PEFT-style files with the original names)."""
    if key_module in modules:
        return [key_module]
    if key_module in underscored:
        return [underscored[key_module]]
    key_module = key_module.replace(".", "_")
    if key_module in _BFL_TOP:
        return [_BFL_TOP[key_module]]
    m = _BFL_NAME.match(key_module)
    if m:
        table, block = (_BFL_DOUBLE, "transformer_blocks") if m["kind"] == "double" else (_BFL_SINGLE, "single_transformer_blocks")
        suffixes = table.get(m["rest"])
        if suffixes:
            return [f"{block}.{m['idx']}.{s}" for s in suffixes]
    return None


def _key_part(key: str) -> tuple[str, str, str | None] | None:
    """``(module, part "A" | "B" | "B_bias" | "alpha", adapter or None)`` of one LoRA key in any supported format,
    None when the key is none of them. ComfyUI's ``diffusion_model.`` names become kohya's underscored BFL names."""
    if m := _XLABS.match(key):
        part = "A" if m["part"] == "down" else "B"
        if m["kind"] == "single":
            return f"single_blocks_{m['idx']}_{'xlabs_qkv' if m['proj'] == 'qkv' else 'linear2'}", part, None
        if not m["stream"]:
            return None  # a double block's processor names its stream
        stream = "img" if m["stream"] == "1" else "txt"
        return f"double_blocks_{m['idx']}_{stream}_attn_{m['proj']}", part, None
    if m := _KOHYA.match(key):
        module = m["module"].replace(".", "_") if m["comfy"] else m["module"]
        return module, {"lora_down": "A", "lora_up": "B", "alpha": "alpha"}[m["part"]], None
    if m := _PEFT.match(key):
        if m["kind"] == "bias" and m["part"] == "A":
            return None  # PEFT's lora_bias is B's only
        return _comfy_module(m["module"]), m["part"] + ("_bias" if m["kind"] == "bias" else ""), m["adapter"]
    if m := _PEFT_ALPHA.match(key):
        return _comfy_module(m["module"]), "alpha", None
    return None


def _comfy_module(module: str) -> str:
    """A ``diffusion_model.``-prefixed (ComfyUI) module name as kohya's underscored name, as its ``lora_down`` /
    ``alpha`` keys give it, so that its ``lora_A`` / ``lora_B`` keys and its ``.alpha`` meet in one group; other
    names unchanged."""
    if module.startswith("diffusion_model."):
        return module.removeprefix("diffusion_model.").replace(".", "_")
    return module


def _group_keys(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{key_module: {"A"|"B"|"alpha": tensor}}`` from any supported key format; text-encoder keys and the bias /
    norm deltas diffusers also drops (``.diff``, ``.diff_b``) are left out with a :class:`LoraKeysSkipped` warning.
    :class:`LoraFormatError` for unknown keys, DoRA, several adapters in one file, or two keys for one matrix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    first_key: dict[tuple[str, str], str] = {}
    unknown, skipped, adapters = [], [], set()
    for key, tensor in state.items():
        if _TEXT_ENCODER.match(key) or _DROPPED.search(key):
            skipped.append(key)
            continue
        if _DORA.search(key):
            raise LoraFormatError(f"{key}: DoRA LoRAs (a magnitude vector per layer) are not supported")
        parsed = _key_part(key)
        if parsed is None:
            unknown.append(key)
            continue
        module, part, adapter = parsed
        if adapter is not None:
            adapters.add(adapter)
        if (module, part) in first_key:
            raise LoraFormatError(f"{key} and {first_key[module, part]} both give the {part} matrix of {module!r} "
                                  "(two adapters or two key formats for one layer): pass one of them")
        first_key[module, part] = key
        groups.setdefault(module, {})[part] = tensor
    if len(adapters) > 1:
        raise LoraFormatError(f"the LoRA holds several PEFT adapters {sorted(adapters)}: pass one adapter's keys")
    if unknown:
        raise LoraFormatError(f"unrecognised LoRA keys (not diffusers/PEFT, kohya, ComfyUI or XLabs): {unknown[:5]}")
    if skipped:
        warnings.warn(LoraKeysSkipped(f"{len(skipped)} LoRA keys not applied (text encoders; bias / norm / weight "
                                      f"deltas): {skipped}"), stacklevel=3)
    return groups


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_lora_source(source) -> tuple[dict[str, torch.Tensor], AdapterConfig | None]:
    """``(state dict, adapter config or None)`` of a LoRA: a ``.safetensors`` file (config from its
    ``lora_adapter_metadata``), a PEFT folder (``adapter_model.safetensors`` + ``adapter_config.json``) or a state
    dict."""
    if isinstance(source, dict):
        return dict(source), None
    path = Path(source)
    if path.is_dir():
        state, _ = _read_safetensors(path / _PEFT_WEIGHTS)
        config_path = path / _PEFT_CONFIG
        return state, AdapterConfig.from_dict(json.loads(config_path.read_text())) if config_path.is_file() else None
    state, metadata = _read_safetensors(path)
    raw = metadata.get(_ADAPTER_METADATA)
    return state, AdapterConfig.from_dict(json.loads(raw)) if raw else None


def read_lora(source: str | Path | dict[str, torch.Tensor], model: nn.Module) -> dict[str, LoraFactors]:
    """Parse a LoRA for ``model``: ``{module name: LoraFactors}``.

    Raises :class:`LoraFormatError` for unknown keys, modules absent from the model, missing halves or
    shapes that do not fit the target modules.
    """
    state, config = load_lora_source(source)
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
        if "alpha" in parts:
            scale = float(parts["alpha"]) / down.shape[0]
        else:
            scale = config.scale(targets[0] if len(targets) == 1 else key_module, down.shape[0]) if config else 1.0
        bias = parts["B_bias"].float() if "B_bias" in parts else None
        if bias is not None and bias.shape != (up.shape[0],):
            raise LoraFormatError(f"LoRA {key_module!r}: B's bias {tuple(bias.shape)} does not fit B {tuple(up.shape)}")
        if key_module.replace(".", "_") in _SWAP_SCALE_SHIFT:
            up = torch.cat(up.chunk(2)[::-1])
            bias = None if bias is None else torch.cat(bias.chunk(2)[::-1])
        for target, factors in _split(key_module, targets, model, LoraFactors(down, up, scale, bias)).items():
            if factors.bias is not None and model.get_submodule(target).bias is None:
                raise LoraFormatError(f"LoRA {key_module!r} has a bias (PEFT lora_bias) but module {target!r} has none")
            if target in result:
                raise LoraFormatError(f"two LoRA entries of this file reach module {target!r} ({key_module!r} is "
                                      "one): a file mixing key formats for the same layer")
            result[target] = factors
    return result


def _split(key_module: str, targets: list[str], model: nn.Module, lora: LoraFactors) -> dict[str, LoraFactors]:
    """Split a (possibly fused) LoRA over ``targets`` by output rows, checking shapes."""
    modules = [model.get_submodule(t) for t in targets]
    if len(modules) == 1 and isinstance(modules[0], SplitProjOut):
        return _split_columns(key_module, targets[0], modules[0], lora)
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
    biases = [None] * len(sizes) if lora.bias is None else lora.bias.split(sizes)
    return {t: LoraFactors(lora.down, up, lora.scale, bias)
            for t, up, bias in zip(targets, lora.up.split(sizes), biases)}


def _split_columns(key_module: str, target: str, module: SplitProjOut, lora: LoraFactors) -> dict[str, LoraFactors]:
    """A LoRA on a :class:`SplitProjOut` (``x = cat(attn, mlp)``): ``A``'s input columns split over the halves,
    ``B`` shared, B's bias (if any) on one half only (the halves' outputs are summed): the one with a bias,
    ``out_proj`` where both have one."""
    widths = [module.out_proj.in_features, module.mlp_fc2.in_features]
    if lora.down.shape[1] != sum(widths) or lora.up.shape[0] != module.out_features:
        raise LoraFormatError(f"LoRA {key_module!r} is [{lora.up.shape[0]}, {lora.down.shape[1]}], module {target!r} "
                              f"is [{module.out_features}, {sum(widths)}]")
    biases = (lora.bias, None) if module.out_proj.bias is not None else (None, lora.bias)
    return {f"{target}.{half}": LoraFactors(down, lora.up, lora.scale, bias)
            for half, down, bias in zip(("out_proj", "mlp_fc2"), lora.down.split(widths, dim=1), biases)}


# ---------------------------------------------------------------------------------------------
# attaching
# ---------------------------------------------------------------------------------------------
def _registry(module: nn.Module) -> dict[str, _Attached]:
    """Per-module LoRA registry; first use records the base state (rank / weight) the LoRAs are added to."""
    if not hasattr(module, LORA_REGISTRY):
        setattr(module, LORA_REGISTRY, {})
        if isinstance(module, SVDQuantLinear):
            module._quantduo_base_rank = module.proj_down.shape[1]
        else:
            module._quantduo_base_weight = module.weight.detach().clone()
        module._quantduo_base_bias = None if module.bias is None else module.bias.detach().clone()
    return getattr(module, LORA_REGISTRY)


def _rebuild(module: nn.Module) -> None:
    """Recompute the module's low-rank branch (or merged weight) and bias from its base state and attached LoRAs."""
    loras = getattr(module, LORA_REGISTRY).values()
    with torch.no_grad():
        if module.bias is not None:
            bias = module._quantduo_base_bias.float()
            for a in (a for a in loras if a.bias is not None):
                bias = bias + a.strength * a.bias
            module.bias.copy_(bias)
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
    device = module.smooth_factor.device if isinstance(module, SVDQuantLinear) else module.weight.device
    bias = None if lora.bias is None else lora.scale * lora.bias.to(device)
    if isinstance(module, SVDQuantLinear):
        smooth = module.smooth_factor.float()
        down_t = torch.zeros(module.padded_in_features, lora.down.shape[0], device=device)
        down_t[: module.in_features] = lora.down.T.to(device)
        return _Attached(smooth[:, None] * down_t, lora.scale * lora.up.to(device), strength, bias)
    return _Attached(lora.down.to(device), lora.scale * lora.up.to(device), strength, bias)


def _check_unfused(model: nn.Module) -> None:
    """:class:`FusedProjectionsError` if some attention module of ``model`` runs fused projections."""
    fused = [n for n, m in model.named_modules() if getattr(m, "fused_projections", False)]
    if fused:
        raise FusedProjectionsError(
            f"the attention projections of {', '.join(fused[:3])}{', ...' if len(fused) > 3 else ''} are fused "
            f"(to_qkv): a LoRA change would not reach them. Change LoRAs before fusing, or unfuse first "
            f"(quantduo.integrations.diffusers.unfuse_qkv(model)) and fuse again after")


def attach_lora(
    model: nn.Module, source: str | Path | dict[str, torch.Tensor], name: str, strength: float = 1.0
) -> list[str]:
    """Attach a LoRA to ``model`` under ``name`` (no re-quantization); returns the modules it touched.

    Raises ``ValueError`` if ``name`` is already attached, :class:`LoraFormatError` for a LoRA that does not fit,
    :class:`FusedProjectionsError` on a model with fused attention projections.
    """
    _check_unfused(model)
    if name in attached_loras(model):
        raise ValueError(f"a LoRA named {name!r} is already attached; remove it or pick another name")
    factors = read_lora(source, model)
    for module_name, lora in factors.items():
        module = model.get_submodule(module_name)
        _registry(module)[name] = _prepare(module, lora, strength)
        _rebuild(module)
    return list(factors)


def _modules_with(model: nn.Module, name: str) -> list[nn.Module]:
    """The modules holding LoRA ``name`` (``KeyError`` if none; :class:`FusedProjectionsError` on a model with fused
    attention projections)."""
    _check_unfused(model)
    found = [m for m in model.modules() if name in getattr(m, LORA_REGISTRY, {})]
    if not found:
        raise KeyError(f"no LoRA named {name!r} is attached (attached: {sorted(attached_loras(model))})")
    return found


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    """Re-weight an attached LoRA."""
    for module in _modules_with(model, name):
        getattr(module, LORA_REGISTRY)[name].strength = strength
        _rebuild(module)


def remove_lora(model: nn.Module, name: str) -> None:
    """Detach a LoRA; the module returns exactly to its state without it."""
    for module in _modules_with(model, name):
        del getattr(module, LORA_REGISTRY)[name]
        _rebuild(module)


def attached_loras(model: nn.Module) -> dict[str, float]:
    """``{name: strength}`` of the LoRAs attached to ``model``."""
    return {n: a.strength for m in model.modules() for n, a in getattr(m, LORA_REGISTRY, {}).items()}
