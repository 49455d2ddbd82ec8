"""One call from a published checkpoint to a runnable diffusers transformer or pipeline.

``load_published_transformer(path, base=None)`` reads any layout (:mod:`.reader`), builds the diffusers model on
the meta device from the config the checkpoint carries (or the base folder's), puts the decoded quantized layers
in (:mod:`.build`), loads the 16-bit tensors from the checkpoint and, for those it lacks, from the base model's
diffusers folder, and only then moves the result to ``device``: every error is raised before anything is
allocated there.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from quantduo.svdquant import CheckpointError, refresh_derived

from .build import build_layers, group_keys
from .reader import (LITE_METHOD, PublishedCheckpoint, checkpoint_dtype, model_folder, read_checkpoint,
                     read_safetensors, weight_files)

FLUX_CLASS = "FluxTransformer2DModel"


@dataclass
class LoadReport:
    """What a load did: ``layout``; ``quantized`` (diffusers module names now quantized); ``plain`` (16-bit
    tensors from the checkpoint); ``from_base`` (16-bit tensors from the base folder); ``dtype`` (the compute
    dtype)."""

    layout: str
    quantized: list[str]
    plain: list[str]
    from_base: list[str]
    dtype: torch.dtype = torch.bfloat16

    def summary(self) -> str:
        return (f"{self.layout}: {len(self.quantized)} quantized modules, {len(self.plain)} tensors from the "
                f"checkpoint, {len(self.from_base)} from the base model; 0 unmapped, 0 missing")


def is_published(path: str | Path) -> bool:
    """Whether ``path`` is a published checkpoint this package reads: a safetensors file, or a model / pipeline
    folder whose denoiser config holds a ``nunchaku_lite`` quantization config."""
    path = Path(path)
    if path.is_file():
        return True
    try:
        config = json.loads((model_folder(path) / "config.json").read_text())
    except (CheckpointError, OSError, json.JSONDecodeError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == LITE_METHOD


def _base_model_folder(base: str | Path | None) -> Path | None:
    return None if base is None else model_folder(Path(base))


def _model_config(ckpt: PublishedCheckpoint, base: Path | None) -> dict:
    base_config = json.loads((base / "config.json").read_text()) if base is not None else None
    config = ckpt.config or base_config
    if config is None:
        raise CheckpointError(f"{ckpt.source} carries no model config: pass the base model's diffusers folder")
    name = config.get("_class_name", FLUX_CLASS if ckpt.layout != "nunchaku-lite" else None)
    if ckpt.layout != "nunchaku-lite" and name != FLUX_CLASS:
        raise CheckpointError(f"{ckpt.source} is a {ckpt.layout} FLUX checkpoint, its config names {name!r}")
    if base_config is not None and base_config.get("_class_name", name) != name:
        raise CheckpointError(f"the checkpoint holds a {name}, the base folder {base} a {base_config['_class_name']}")
    if not hasattr(diffusers, str(name)):
        raise CheckpointError(f"{ckpt.source} names model class {name!r}, which diffusers does not have")
    return {**config, "_class_name": name}


def _meta_model(config: dict) -> nn.Module:
    cls = getattr(diffusers, config["_class_name"])
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    materialized = [name for name, t in model.state_dict(keep_vars=True).items() if not t.is_meta]
    if materialized:  # the meta-device context did not apply (e.g. a patched torch factory function)
        raise RuntimeError(f"{cls.__name__} built outside the meta device ({materialized[:3]} ...): cannot tell the "
                           "tensors the checkpoint must provide")
    return model


def _base_tensors(base: Path | None, keys: list[str]) -> dict[str, torch.Tensor]:
    if base is None or not keys:
        return {}
    found = {}
    for file in weight_files(base):
        found.update(read_safetensors(file, keys)[0])
    return found


def _fill(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    model.load_state_dict(cast, strict=False, assign=True)


def load_published_transformer(source: str | Path, base: str | Path | None = None,
                               dtype: torch.dtype | None = None,
                               device: torch.device | str = "cpu") -> tuple[nn.Module, LoadReport]:
    """A published checkpoint (Nunchaku single file, V2 names, or ``nunchaku_lite`` folder) as a diffusers
    transformer on ``device`` with compute dtype ``dtype`` (None: a ``nunchaku_lite`` folder's ``compute_dtype``,
    as diffusers loads it, else bfloat16); ``base``: the base model's diffusers pipeline or model folder, for the
    config and the 16-bit tensors the checkpoint lacks. Returns ``(model, report)``.

    Raises :class:`CheckpointError` for an unknown layout, a truncated file, an unsupported rank / group size /
    precision, a checkpoint of another model class or config, any key that maps nowhere (all listed) and any
    model tensor that neither the checkpoint nor ``base`` provides (all listed).
    """
    ckpt = read_checkpoint(source)
    dtype = checkpoint_dtype(ckpt) if dtype is None else dtype
    base_dir = _base_model_folder(base)
    model = _meta_model(_model_config(ckpt, base_dir))
    grouped = group_keys(ckpt)
    layers = build_layers(grouped, model, dtype)
    for name, layer in layers.items():
        model.set_submodule(name, layer)
    needed = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    unmapped = grouped.unmapped + sorted(set(grouped.plain) - set(needed))
    if unmapped:
        raise CheckpointError(f"{len(unmapped)} checkpoint keys map to nothing in {type(model).__name__}: {unmapped}")
    base_tensors = _base_tensors(base_dir, [k for k in needed if k not in grouped.plain])
    missing = [k for k in needed if k not in grouped.plain and k not in base_tensors]
    if missing:
        where = "" if base_dir is None else f" nor the base folder {base_dir}"
        raise CheckpointError(f"{len(missing)} model tensors are in neither the checkpoint{where}: {missing}")
    _fill(model, {**grouped.plain, **base_tensors}, dtype)
    report = LoadReport(ckpt.layout, sorted(layers), sorted(grouped.plain), sorted(base_tensors), dtype)
    model = model.to(device).eval().requires_grad_(False)
    refresh_derived(model)  # on the target device, so that a compiled model has no layer left to compute
    return model, report


def load_published_pipeline(source: str | Path, base: str | Path | None = None, dtype: torch.dtype | None = None,
                            device: str = "cpu") -> tuple[Any, LoadReport]:
    """A diffusers pipeline whose transformer is the published checkpoint ``source`` and whose other components
    (text encoders, VAE, scheduler) come from the local pipeline folder ``base`` (default: ``source`` itself
    when it is a pipeline folder), all in ``dtype`` (None: as :func:`load_published_transformer` chooses)."""
    base = base if base is not None else (source if (Path(source) / "model_index.json").is_file() else None)
    if base is None or not (Path(base) / "model_index.json").is_file():
        raise CheckpointError(f"{source}: pass the base model's local diffusers pipeline folder (model_index.json) "
                              "for the text encoders, VAE and scheduler")
    transformer, report = load_published_transformer(source, base, dtype, device)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(base), transformer=transformer, dtype=report.dtype)
    return pipe.to(device), report
