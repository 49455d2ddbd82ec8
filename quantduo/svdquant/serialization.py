"""Save / load quantized models as ``model.safetensors`` + ``quantduo_config.json`` (written atomically)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..utils import atomic_write
from .config import SVDQuantConfig
from .linear import SVDQuantLinear

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quantduo_config.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A quantized checkpoint is missing, corrupt or does not match the model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def layer_specs(model: nn.Module) -> dict[str, dict]:
    """Constructor arguments of every :class:`SVDQuantLinear` in ``model``, by module name (the storage format;
    the execution is not stored)."""
    return {
        name: dict(
            in_features=m.in_features, out_features=m.out_features, rank=m.rank, bias=m.bias is not None,
            weight_format=m.weight_format, act_format=m.act_format, group_size=m.group_size,
        )
        for name, m in model.named_modules()
        if isinstance(m, SVDQuantLinear)
    }


def save_quantized(model: nn.Module, directory: str | Path, config: SVDQuantConfig, extra: dict | None = None) -> Path:
    """Write the whole ``model`` state (quantized and full-precision parts) to ``directory``.

    The weights file's SHA-256 goes into the JSON so that a corrupt file is detected on load.
    ``extra``: JSON-serialisable metadata stored alongside (e.g. the model class).
    """
    layers = layer_specs(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt", "quantduo": str(FORMAT_VERSION)}))
    meta = dict(
        format_version=FORMAT_VERSION, config=config.to_dict(), layers=layers,
        weights_sha256=_sha256(weights), extra=extra or {},
    )
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    return directory


def read_checkpoint_meta(directory: str | Path) -> dict:
    """Parse and validate ``quantduo_config.json``."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a quantduo checkpoint directory")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported format_version {meta.get('format_version')!r}")
    return meta


def replace_linears(model: nn.Module, specs: dict[str, dict], dtype: torch.dtype,
                    device: torch.device | str | None = None) -> None:
    """Swap the ``nn.Linear`` modules named in ``specs`` for empty :class:`SVDQuantLinear` of the stored shape, on
    ``device`` (default: where the replaced module is). ``CheckpointError`` naming the layer for a name or shape the
    model does not have."""
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
    if not weights.is_file():
        raise CheckpointError(f"{weights} not found")
    if _sha256(weights) != meta.get("weights_sha256"):
        raise CheckpointError(f"{weights} is corrupt: its SHA-256 does not match {CONFIG_NAME}")
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
    refresh_derived(model)
    return meta


def refresh_derived(model: nn.Module) -> None:
    """:meth:`SVDQuantLinear.refresh_derived` of every quantized layer of ``model`` (after loading weights)."""
    for module in model.modules():
        if isinstance(module, SVDQuantLinear):
            module.refresh_derived()
