"""Read a published SVDQuant checkpoint (file or folder) into a :class:`PublishedCheckpoint`, detecting its layout.

Nothing here allocates on a GPU: tensors are read onto the CPU and every shape / config problem raises
:class:`~quantduo.svdquant.CheckpointError` first.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from quantduo.svdquant import CheckpointError
from quantduo.utils import DTYPES

from .layouts import detect_file_layout

LITE_METHOD = "nunchaku_lite"
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_SUPPORTED_LITE = {"svdq_w4a4": {("int4", 64), ("nvfp4", 16)}, "awq_w4a16": {("int4", 64)}}


@dataclass
class PublishedCheckpoint:
    """A published checkpoint read into memory.

    layout: one of :data:`~.layouts.LAYOUTS`; tensors: every stored tensor by key (CPU); config: the diffusers
    model config it carries (single-file metadata ``config`` / the folder's ``config.json``), or None;
    quantization: the lite ``quantization_config`` (None for the single-file layouts); source: where it came from.
    """

    layout: str
    tensors: dict[str, torch.Tensor]
    config: dict | None
    source: Path
    quantization: dict | None = None
    metadata: dict = field(default_factory=dict)


def read_safetensors(path: Path, keys=None) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, metadata)`` of a safetensors file (``keys``: only those); :class:`CheckpointError` for a
    missing, truncated or corrupt file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = f.keys() if keys is None else [k for k in keys if k in set(f.keys())]
            return {k: f.get_tensor(k) for k in names}, dict(f.metadata() or {})
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} does not exist") from err
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} not found: {what}") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a diffusers model folder (single or sharded)."""
    index = folder / f"{_WEIGHTS}.index.json"
    if index.is_file():
        shards = sorted(set(_json(index, "sharded weights index")["weight_map"].values()))
        return [folder / s for s in shards]
    if (folder / _WEIGHTS).is_file():
        return [folder / _WEIGHTS]
    raise CheckpointError(f"{folder} holds no {_WEIGHTS} (nor a sharded index)")


def model_folder(path: Path) -> Path:
    """``path`` itself for a diffusers model folder, ``path/transformer`` for a pipeline folder."""
    if (path / "model_index.json").is_file():
        for name in ("transformer", "unet"):
            if (path / name / "config.json").is_file():
                return path / name
        raise CheckpointError(f"pipeline folder {path} has no transformer/ or unet/ model folder")
    if (path / "config.json").is_file():
        return path
    raise CheckpointError(f"{path} is neither a diffusers model folder (config.json) nor a pipeline folder "
                          "(model_index.json)")


def _check_lite_config(path: Path, quant: dict) -> None:
    for section, supported in _SUPPORTED_LITE.items():
        spec = quant.get(section)
        if spec is None:
            continue
        pair = (spec.get("precision"), spec.get("group_size"))
        if pair not in supported:
            raise CheckpointError(f"{path}: {section} with precision {pair[0]!r} and group size {pair[1]!r} is not "
                                  f"supported (supported: {sorted(supported)})")
        if section == "svdq_w4a4" and (not isinstance(spec.get("rank"), int) or spec["rank"] % 16):
            raise CheckpointError(f"{path}: svdq_w4a4 rank {spec.get('rank')!r} is not supported (a multiple of 16)")
        if not isinstance(spec.get("targets"), list):
            raise CheckpointError(f"{path}: {section}.targets must be a list of module names")
    if not any(quant.get(s) for s in _SUPPORTED_LITE):
        raise CheckpointError(f"{path}: nunchaku_lite quantization_config has neither svdq_w4a4 nor awq_w4a16")
    if quant.get("compute_dtype", "bfloat16") not in DTYPES:
        raise CheckpointError(f"{path}: nunchaku_lite compute_dtype {quant['compute_dtype']!r} is not one of "
                              f"{sorted(DTYPES)}")


def checkpoint_dtype(ckpt: "PublishedCheckpoint") -> torch.dtype:
    """The compute dtype a checkpoint asks for: a ``nunchaku_lite`` folder's ``compute_dtype`` (diffusers' default
    for these folders too), bfloat16 for the single-file layouts, which record none."""
    return DTYPES[(ckpt.quantization or {}).get("compute_dtype", "bfloat16")]


def read_lite_folder(path: Path) -> PublishedCheckpoint:
    """A diffusers ``nunchaku_lite`` model (or pipeline) folder."""
    folder = model_folder(path)
    config = _json(folder / "config.json", "model config")
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != LITE_METHOD:
        raise CheckpointError(f"{folder / 'config.json'} has quantization method {quant.get('quant_method')!r}, "
                              f"not {LITE_METHOD!r}: unknown checkpoint layout")
    _check_lite_config(folder, quant)
    tensors = {}
    for file in weight_files(folder):
        tensors.update(read_safetensors(file)[0])
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    return PublishedCheckpoint("nunchaku-lite", tensors, config, folder, quantization=quant)


def read_single_file(path: Path) -> PublishedCheckpoint:
    """A Nunchaku single file (either naming); its metadata ``config`` (if any) is the diffusers model config."""
    tensors, metadata = read_safetensors(path)
    layout = detect_file_layout(tensors)
    config = None
    if "config" in metadata:
        try:
            config = json.loads(metadata["config"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: metadata 'config' is not valid JSON ({err})") from err
    return PublishedCheckpoint(layout, tensors, config, path, metadata=metadata)


def read_checkpoint(source: str | Path) -> PublishedCheckpoint:
    """Read any published layout: a ``.safetensors`` file (Nunchaku / Nunchaku V2 names) or a folder
    (``nunchaku_lite`` model or pipeline folder)."""
    path = Path(source)
    if path.is_dir():
        return read_lite_folder(path)
    return read_single_file(path)
