"""Quantized denoisers inside diffusers pipelines: save, load, compute dtype.

A quantized pipeline folder is an ordinary diffusers folder (``pipe.save_pretrained``) whose denoiser's
``config.json`` carries quantduo's ``quantization_config`` (:mod:`.backend`): ``DiffusionPipeline.from_pretrained``
loads it once quantduo is imported, and it references no other folder. quantduo writes it atomically as a folder,
with a ``quantduo_manifest.json`` (SHA-256 of every file, config included; how it was made) that its loaders check.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from accelerate import init_empty_weights
from torch import nn

from quantduo.formats.registry import find_format
from quantduo.svdquant import CheckpointError, QuantizationReport, SVDQuantConfig, SVDQuantLinear
from quantduo.svdquant.blockwise import LazyWeights
from quantduo.svdquant.linear import set_execution
from quantduo.svdquant.serialization import check_unfused
from quantduo.utils import atomic_folder, show_progress, verify_manifest, write_manifest

from .backend import QUANT_METHOD, QuantDuoConfig, mark_quantized, sort_safetensors_metadata
from .fusions import fused_attentions
from .rules import DENOISER_ATTRS, rules_for

MODEL_CONFIG = "config.json"
MODEL_INDEX = "model_index.json"
REPORT_NAME = "report.json"


def quantduo_config_for(config: SVDQuantConfig, execution: str = "auto") -> QuantDuoConfig:
    """The :class:`QuantDuoConfig` recording an :class:`SVDQuantConfig`'s storage format."""
    low_rank = config.rank > 0 and (config.act_format != "none" or config.w4a16_svdquant)
    fmt = find_format(config.weight_format, config.act_format, low_rank)
    return QuantDuoConfig(format=fmt.name, rank=config.rank, execution=execution)


def save_quantized_transformer(model: nn.Module, directory: str | Path, config: SVDQuantConfig,
                               report: QuantizationReport | None = None, made_by: dict | None = None) -> Path:
    """Save a quantized denoiser as a diffusers model folder (``config.json`` with the ``quantization_config``,
    safetensors weights, ``report.json`` if given, the manifest with ``made_by``), atomically as a folder."""
    rules_for(model)
    qconfig = quantduo_config_for(config)
    mark_quantized(model, qconfig)
    with atomic_folder(directory) as tmp:
        model.save_pretrained(tmp)
        _finish_folder(tmp, qconfig, {REPORT_NAME: report.to_json()} if report is not None else {}, made_by)
    return Path(directory)


def _finish_folder(tmp: Path, qconfig: QuantDuoConfig | None, extra_files: dict[str, str],
                   made_by: dict | None) -> None:
    """Complete a folder written by ``save_pretrained``: drop the ``_name_or_path`` entries (absolute paths), add
    ``extra_files`` and the manifest (``made_by`` plus the format and rank of a quantized denoiser); the safetensors
    metadata in sorted order, so that the same model always gives the same bytes."""
    for path in tmp.rglob("*.safetensors"):
        sort_safetensors_metadata(path)
    for path in tmp.rglob("*.json"):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and "_name_or_path" in config:
            del config["_name_or_path"]
            path.write_text(json.dumps(config, indent=2, sort_keys=True))
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    quant = {} if qconfig is None else {"format": qconfig.format, "rank": qconfig.rank}
    write_manifest(tmp, {**quant, **(made_by or {})})


def model_class_of(directory: str | Path) -> type:
    """The diffusers model class named by ``directory/config.json`` (``CheckpointError`` for a folder that is not a
    quantduo-quantized diffusers model)."""
    path = Path(directory) / MODEL_CONFIG
    config = read_json(path, "a diffusers model folder")
    if not quantized_by_quantduo(config):
        raise CheckpointError(f"{path} holds no quantduo quantization_config")
    return diffusers_model_class(config, path)


def quantized_by_quantduo(config: dict) -> bool:
    """Whether a model's ``config.json`` (as a dict) carries quantduo's ``quantization_config``."""
    return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def diffusers_model_class(config: dict, source: str | Path) -> type:
    """The diffusers model class a ``config.json`` (read from ``source``) names (``CheckpointError`` for a class
    diffusers does not have)."""
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(f"{source} names model class {config.get('_class_name')!r}, which diffusers does not have")
    return cls


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path`` (``CheckpointError`` saying the folder is not ``what``, or naming the bad file)."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} not found: not {what}") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable or not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object")
    return config


def read_denoiser_config(pipeline_dir: str | Path) -> tuple[str, dict]:
    """(component name, its ``config.json``) of the denoiser of the pipeline folder ``pipeline_dir``, read without
    loading anything (``CheckpointError`` naming the file for a folder that is not a diffusers pipeline)."""
    path = Path(pipeline_dir)
    index = read_json(path / MODEL_INDEX, "a diffusers pipeline folder")
    for attr in DENOISER_ATTRS:
        if attr in index:
            return attr, read_json(path / attr / MODEL_CONFIG, f"the {attr} folder of a diffusers pipeline")
    raise CheckpointError(f"{path / MODEL_INDEX} lists no {' or '.join(DENOISER_ATTRS)} component")


def denoiser_skeleton(config: dict, source: str | Path) -> nn.Module:
    """The denoiser a ``config.json`` (read from ``source``) describes, built on the meta device: its layer shapes
    without memory or weights (``CheckpointError`` for a class diffusers does not have)."""
    cls = diffusers_model_class(config, source)
    with torch.device("meta"):
        return cls.from_config(config)


def lazy_denoiser(config: dict, source: str | Path, dtype: torch.dtype) -> nn.Module:
    """The denoiser ``config`` describes with its parameters on the meta device and its computed (non-stored)
    buffers real, everything cast to ``dtype`` as ``from_pretrained(dtype=)`` casts; its stored tensors come from
    :class:`~quantduo.svdquant.blockwise.LazyWeights`."""
    with init_empty_weights(include_buffers=False):
        skeleton = diffusers_model_class(config, source).from_config(config)
    # nn.Module.to: ModelMixin.to adds only a warning about float32 modules to the same cast
    return nn.Module.to(skeleton, dtype).eval().requires_grad_(False)


def denoiser_safetensors(pipeline_dir: str | Path) -> list[Path]:
    """The ``*.safetensors`` files of a pipeline folder's denoiser (empty when it is stored otherwise)."""
    attr, _ = read_denoiser_config(pipeline_dir)
    return sorted((Path(pipeline_dir) / attr).glob("*.safetensors"))


def load_pipeline_lazily(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, LazyWeights]:
    """A full-precision pipeline from a local folder with its denoiser's weights left on disk: the other components
    on the CPU as :func:`load_pipeline` loads them; the denoiser built with its parameters on the meta device (its
    computed buffers real, cast to ``dtype``), and the :class:`~quantduo.svdquant.blockwise.LazyWeights` of its
    safetensors files, from which blockwise calibration reads one block at a time
    (:func:`~quantduo.integrations.diffusers.denoiser_offloaded`, ``quantize_transformer_blockwise(...,
    weights=)``). Host memory: the pipeline without its denoiser. ``CheckpointError`` when the denoiser has no
    safetensors files."""
    path = Path(model_dir)
    attr, config = read_denoiser_config(path)
    verify_manifest(path, required=False)
    files = denoiser_safetensors(path)
    if not files:
        raise CheckpointError(f"{path / attr} holds no .safetensors weights: blockwise calibration reads the "
                              "denoiser block by block from safetensors files")
    skeleton = lazy_denoiser(config, path, dtype)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), dtype=dtype, **{attr: skeleton})
    pipe.set_progress_bar_config(disable=not show_progress())
    return pipe, LazyWeights(files, dtype)


def is_quantized_pipeline(directory: str | Path) -> bool:
    """Whether the pipeline folder's denoiser carries quantduo's ``quantization_config``."""
    return quantized_by_quantduo(read_denoiser_config(directory)[1])


def load_quantized_transformer(directory: str | Path, device: torch.device | str = "cpu",
                               dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A quantized denoiser from a folder written by :func:`save_quantized_transformer` or inside one written by
    :func:`save_pipeline` (checked against the manifest, then loaded through diffusers' ``from_pretrained``), on
    ``device`` with compute dtype ``dtype``."""
    cls = model_class_of(directory)
    verify_manifest(directory)
    model = cls.from_pretrained(str(directory), dtype=dtype)
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


def save_pipeline(pipe: Any, directory: str | Path, extra_files: dict[str, str] | None = None,
                  made_by: dict | None = None) -> Path:
    """``pipe.save_pretrained`` with every component saved (a quantized denoiser with its ``quantization_config``),
    the ``_name_or_path`` entries diffusers records (the absolute path the pipeline was loaded from) removed from its
    JSON configs, ``extra_files`` ({name: text}) added and a manifest written: the folder stands alone, can be moved
    and says how it was made (``made_by``, e.g. the command line). Written atomically as a folder: an old folder at
    ``directory`` stays intact until the new one is complete. ``FusedLayersError`` for a denoiser with fused QKV
    projections (:func:`~quantduo.integrations.diffusers.unfuse_qkv` first)."""
    denoiser = getattr(pipe, denoiser_attr(pipe))
    check_unfused(fused_attentions(denoiser))
    qconfig = denoiser.config.get("quantization_config")
    with atomic_folder(directory) as tmp:
        pipe.save_pretrained(tmp)
        _finish_folder(tmp, qconfig if isinstance(qconfig, QuantDuoConfig) else None, extra_files or {}, made_by)
    return Path(directory)


def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                  execution: str = "auto") -> Any:
    """A diffusers pipeline from a local folder (quantized by quantduo or not) on ``device``; its quantized layers
    run by ``execution`` (``"auto"`` keeps the checkpoint's choice). A folder with a manifest is checked against it;
    a quantized one must have one (``ManifestError`` / ``CheckpointError`` naming the file otherwise)."""
    path = Path(model_dir)
    _, config = read_denoiser_config(path)
    verify_manifest(path, required="quantization_config" in config)
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=not show_progress())
    if execution != "auto":
        set_execution(getattr(pipe, denoiser_attr(pipe)), execution)
    return pipe
