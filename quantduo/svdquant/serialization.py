"""Save / load quantized models as a folder of ``model.safetensors`` + ``quantduo_config.json`` +
``quantduo_manifest.json`` (the SHA-256 of both files and how the folder was made), written atomically as a folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils import InputError, atomic_folder, verify_manifest, write_manifest
from .config import SVDQuantConfig
from .linear import SVDQuantLinear
from .split import SPLIT_HALVES, SplitProjOut

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quantduo_config.json"
# 2: the manifest covers every file (1 kept the weights' SHA-256 in the config); 3: act_shift holds the input-space
# shift (2 held the smoothed-space act_shift / smooth_factor: converted on load, convert_smoothed_act_shift)
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, FORMAT_VERSION)
INPUT_SPACE_SHIFT_FORMAT = 3  # the first format whose act_shift is the input-space shift
LORA_REGISTRY = "_quantduo_loras"  # the module attribute that holds attached LoRAs (quantduo.integrations.lora)


class CheckpointError(InputError):
    """A quantized checkpoint is missing, corrupt or does not match the model."""


class FusedLayersError(ValueError):
    """The model holds runtime fusions of its layers (a fused QKV projection): a checkpoint of it would not reload
    into the model class; unfuse it before saving."""


def check_unfused(names: list[str]) -> None:
    """``FusedLayersError`` if ``names`` (of fused layers found in a model to save) is not empty."""
    if names:
        raise FusedLayersError(
            f"the model holds fused projections ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): saved, "
            f"they would not reload into the model class. Unfuse them first "
            f"(quantduo.integrations.diffusers.unfuse_qkv(model)) and fuse again after saving")


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """Constructor arguments of every :class:`SVDQuantLinear` in ``model``, by module name (the storage format;
    the execution is not stored). The halves of a :class:`SplitProjOut` are named ``<proj_out>.out_proj`` and
    ``<proj_out>.mlp_fc2``, which is how :func:`replace_linears` knows to split the model's ``<proj_out>``.
    ``FusedLayersError`` if some layer is a runtime fusion (``fused_parts``)."""
    check_unfused([name for name, m in model.named_modules() if getattr(m, "fused_parts", None)])
    return {
        name: dict(
            in_features=m.in_features, out_features=m.out_features, rank=m.rank, bias=m.bias is not None,
            weight_format=m.weight_format, act_format=m.act_format, group_size=m.group_size,
        )
        for name, m in model.named_modules()
        if isinstance(m, SVDQuantLinear)
    }


def save_quantized(model: nn.Module, directory: str | Path, config: SVDQuantConfig, extra: dict | None = None,
                   made_by: dict | None = None) -> Path:
    """Write the whole ``model`` state (quantized and full-precision parts) to the folder ``directory``.

    The folder appears complete or not at all (:func:`~quantduo.utils.atomic_folder`; an old checkpoint there stays
    intact until the new one is complete); its manifest holds the SHA-256 of every file, checked on load.
    ``extra``: JSON-serialisable metadata stored alongside (e.g. the model class); ``made_by``: recorded in the
    manifest (format and rank are added).
    """
    return write_checkpoint(directory, *checkpoint_state(model), config, extra, made_by)


def check_no_loras(model: nn.Module) -> None:
    """``ValueError`` if LoRAs are attached to ``model`` (:mod:`quantduo.integrations.lora` keeps them in each
    module's :data:`LORA_REGISTRY`): a checkpoint of it would hold them inside the low-rank branches and 16-bit
    weights, where they could no longer be removed or re-weighted."""
    attached = sorted({name for m in model.modules() for name in getattr(m, LORA_REGISTRY, {})})
    if attached:
        raise ValueError(f"LoRAs {attached} are attached: a checkpoint would bake them into the model for good; "
                         "remove them first (quantduo.integrations.lora.remove_lora) and attach them after loading")


def checkpoint_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """What :func:`save_quantized` writes of ``model``: its state as host-memory copies (a snapshot: the model may
    change or move afterwards) and its :func:`layer_specs`; ``ValueError`` with LoRAs attached
    (:func:`check_no_loras`)."""
    check_no_loras(model)
    layers = layer_specs(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}, layers


def write_checkpoint(directory: str | Path, state: dict[str, torch.Tensor], layers: dict[str, dict],
                     config: SVDQuantConfig, extra: dict | None = None, made_by: dict | None = None) -> Path:
    """Write a :func:`checkpoint_state` snapshot to the folder ``directory``, atomically (see :func:`save_quantized`);
    touches no model, so it may run in another thread."""
    meta = dict(format_version=FORMAT_VERSION, config=config.to_dict(), layers=layers, extra=extra or {})
    with atomic_folder(directory) as tmp:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt", "quantduo": str(FORMAT_VERSION)})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1))
        write_manifest(tmp, {"weight_format": config.weight_format, "act_format": config.act_format,
                             "rank": config.rank, **(made_by or {})})
    return Path(directory)


def read_checkpoint_meta(directory: str | Path) -> dict:
    """Check the folder against its manifest, then parse and validate ``quantduo_config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a quantduo checkpoint directory")
    verify_manifest(directory)
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')!r} (this quantduo "
                              f"reads {', '.join(map(str, READABLE_VERSIONS))})")
    return meta


def convert_smoothed_act_shift(layer: SVDQuantLinear) -> None:
    """Give ``layer``, just loaded from a checkpoint that stored the smoothed-space shift (format_version 2, or a
    diffusers folder of quantduo < 0.3.0: ``act_shift = shift / smooth_factor``), the input-space shift layers hold
    now: ``act_shift * smooth_factor`` in float32, rounded to the buffer's dtype (zeros, the signed layers', stay
    zeros). Call it before the derived state is computed."""
    old = layer.act_shift.detach()
    layer.act_shift = (old.float() * layer.smooth_factor.float()).to(old.dtype)


def _split_stored_halves(model: nn.Module, specs: dict[str, dict]) -> None:
    """Split each ``nn.Linear`` of ``model`` whose halves ``<name>.out_proj`` / ``<name>.mlp_fc2`` ``specs`` holds
    into a :class:`SplitProjOut` (after the stored attention width); ``CheckpointError`` if only one half is stored
    or the widths do not add up to the layer's inputs."""
    for parent in sorted({n.rpartition(".")[0] for n in specs if n.rpartition(".")[2] in SPLIT_HALVES}):
        try:
            current = model.get_submodule(parent)
        except AttributeError:
            continue  # reported by replace_linears
        if not isinstance(current, nn.Linear):
            continue
        attn, mlp = (specs.get(f"{parent}.{half}") for half in SPLIT_HALVES)
        if attn is None or mlp is None:
            raise CheckpointError(f"checkpoint holds one half of the split layer {parent!r} but not the other")
        if attn["in_features"] + mlp["in_features"] != current.in_features:
            raise CheckpointError(
                f"checkpoint splits {parent!r} into {attn['in_features']} + {mlp['in_features']} inputs but the "
                f"model's has {current.in_features}")
        model.set_submodule(parent, SplitProjOut.from_linear(current, attn["in_features"]))


def replace_linears(model: nn.Module, specs: dict[str, dict], dtype: torch.dtype,
                    device: torch.device | str | None = None) -> None:
    """Swap the ``nn.Linear`` modules named in ``specs`` for empty :class:`SVDQuantLinear` of the stored shape, on
    ``device`` (default: where the replaced module is); a layer stored as two halves (``<name>.out_proj`` and
    ``<name>.mlp_fc2``) becomes a :class:`SplitProjOut` first. ``CheckpointError`` naming the layer for a name or
    shape the model does not have."""
    _split_stored_halves(model, specs)
    for name, spec in specs.items():
        try:
            current = model.get_submodule(name)
        except AttributeError as err:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in the model") from err
        if not isinstance(current, (nn.Linear, SVDQuantLinear)):
            raise CheckpointError(f"checkpoint layer {name!r} is a {type(current).__name__} in the model, not a Linear")
        if (current.out_features, current.in_features) != (spec["out_features"], spec["in_features"]):
            raise CheckpointError(
                f"checkpoint layer {name!r} is {spec['out_features']}x{spec['in_features']} but the model's is "
                f"{current.out_features}x{current.in_features}"
            )
        where = device or next(current.buffers(), next(current.parameters(), torch.empty(0))).device
        model.set_submodule(name, SVDQuantLinear(**spec, dtype=dtype, device=where))


def load_quantized(model: nn.Module, directory: str | Path) -> dict:
    """Turn a full-precision ``model`` skeleton into the quantized model stored in ``directory`` (in place).

    Returns the checkpoint metadata. Raises :class:`CheckpointError` on a corrupt or mismatched checkpoint.
    """
    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    weights = directory / WEIGHTS_NAME
    config = SVDQuantConfig.from_dict(meta["config"])
    replace_linears(model, meta["layers"], config.torch_dtype)
    try:
        state = load_file(weights, device=str(next(model.parameters(), torch.empty(0)).device))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {weights}: {err}") from err
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"checkpoint does not match the model: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if meta["format_version"] < INPUT_SPACE_SHIFT_FORMAT:
        for module in model.modules():
            if isinstance(module, SVDQuantLinear):
                convert_smoothed_act_shift(module)
    refresh_derived(model)
    return meta


def refresh_derived(model: nn.Module) -> None:
    """:meth:`SVDQuantLinear.refresh_derived` of every quantized layer of ``model`` (after loading weights)."""
    for module in model.modules():
        if isinstance(module, SVDQuantLinear):
            module.refresh_derived()
