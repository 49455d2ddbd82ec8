"""Quantized denoisers inside diffusers pipelines: save, load, compute dtype.

A quantized pipeline folder is an ordinary diffusers folder (``pipe.save_pretrained``) whose denoiser's
``config.json`` carries quantduo's ``quantization_config`` (:mod:`.backend`): ``DiffusionPipeline.from_pretrained``
loads it once quantduo is imported, and it references no other folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch import nn

from quantduo.formats.registry import find_format
from quantduo.svdquant import CheckpointError, QuantizationReport, SVDQuantConfig, SVDQuantLinear
from quantduo.svdquant.linear import set_execution
from quantduo.utils import atomic_write

from .backend import QuantDuoConfig, mark_quantized
from .rules import DENOISER_ATTRS, rules_for

MODEL_CONFIG = "config.json"


def quantduo_config_for(config: SVDQuantConfig, execution: str = "auto") -> QuantDuoConfig:
    """The :class:`QuantDuoConfig` recording an :class:`SVDQuantConfig`'s storage format."""
    low_rank = config.rank > 0 and (config.act_format != "none" or config.w4a16_svdquant)
    fmt = find_format(config.weight_format, config.act_format, low_rank)
    return QuantDuoConfig(format=fmt.name, rank=config.rank, execution=execution)


def save_quantized_transformer(model: nn.Module, directory: str | Path, config: SVDQuantConfig,
                               report: QuantizationReport | None = None) -> Path:
    """Save a quantized denoiser as a diffusers model folder (``config.json`` with the ``quantization_config``,
    safetensors weights) and, if given, ``report.json``."""
    rules_for(model)
    directory = Path(directory)
    mark_quantized(model, quantduo_config_for(config))
    model.save_pretrained(directory)
    if report is not None:
        atomic_write(directory / "report.json", lambda tmp: Path(tmp).write_text(report.to_json()))
    return directory


def model_class_of(directory: str | Path) -> type:
    """The diffusers model class named by ``directory/config.json`` (``CheckpointError`` for a folder that is not a
    quantduo-quantized diffusers model)."""
    path = Path(directory) / MODEL_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} not found: not a diffusers model folder") from err
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from err
    if (config.get("quantization_config") or {}).get("quant_method") != "quantduo":
        raise CheckpointError(f"{path} holds no quantduo quantization_config")
    name = config.get("_class_name", "")
    if not hasattr(diffusers, name):
        raise CheckpointError(f"{path} names model class {name!r}, which diffusers does not have")
    return getattr(diffusers, name)


def is_quantized_pipeline(directory: str | Path) -> bool:
    """Whether the pipeline folder's denoiser carries quantduo's ``quantization_config``."""
    for attr in DENOISER_ATTRS:
        path = Path(directory) / attr / MODEL_CONFIG
        if path.is_file():
            config = json.loads(path.read_text())
            return (config.get("quantization_config") or {}).get("quant_method") == "quantduo"
    return False


def load_quantized_transformer(directory: str | Path, device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A quantized denoiser from a folder written by :func:`save_quantized_transformer` (through diffusers'
    ``from_pretrained``), on ``device`` with compute dtype ``dtype``."""
    model = model_class_of(directory).from_pretrained(str(directory), dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def denoiser_attr(pipe: Any) -> str:
    """``"transformer"`` or ``"unet"``: the pipeline's denoiser component."""
    for attr in DENOISER_ATTRS:
        if isinstance(getattr(pipe, attr, None), nn.Module):
            return attr
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet component")


def load_into_pipeline(pipe: Any, directory: str | Path) -> nn.Module:
    """Put the quantized denoiser stored in ``directory`` into ``pipe`` (replacing ``transformer`` / ``unet``, whose
    class must match). Returns the new module, on the old one's device and dtype."""
    attr = denoiser_attr(pipe)
    current = getattr(pipe, attr)
    cls = model_class_of(directory)
    if type(current) is not cls:
        raise CheckpointError(f"checkpoint holds a {cls.__name__}, the pipeline's {attr} is a {type(current).__name__}")
    param = next(current.parameters())
    model = load_quantized_transformer(directory, param.device, param.dtype)
    pipe.register_modules(**{attr: model})
    return model


def cast_denoiser(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Set a (quantized) denoiser's compute dtype in place: floating-point parameters and buffers of its unquantized
    modules, and the compute-dtype buffers of its quantized layers (:meth:`SVDQuantLinear.to_compute_dtype`: packed
    codes and fp8 / float32 scales keep theirs). Returns ``model``."""
    for module in model.modules():
        if isinstance(module, SVDQuantLinear):  # a leaf
            module.to_compute_dtype(dtype)
        else:
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and buf.dtype.itemsize > 1:  # not fp8
                    module._buffers[name] = buf.to(dtype)
    return model


def save_pipeline(pipe: Any, directory: str | Path) -> Path:
    """``pipe.save_pretrained(directory)`` with every component saved (a quantized denoiser with its
    ``quantization_config``), then the ``_name_or_path`` entries diffusers records (the absolute path the pipeline
    was loaded from) removed from its JSON configs: the folder stands alone and can be moved."""
    directory = Path(directory)
    pipe.save_pretrained(directory)
    for path in directory.rglob("*.json"):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and "_name_or_path" in config:
            del config["_name_or_path"]
            atomic_write(path, lambda tmp, c=config: Path(tmp).write_text(json.dumps(c, indent=2, sort_keys=True)))
    return directory


def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                  execution: str = "auto") -> Any:
    """A diffusers pipeline from a local folder (quantized by quantduo or not) on ``device``; its quantized layers
    run by ``execution`` (``"auto"`` keeps the checkpoint's choice)."""
    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise CheckpointError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), dtype=dtype).to(device)
    if execution != "auto":
        set_execution(getattr(pipe, denoiser_attr(pipe)), execution)
    return pipe
