"""quantduo as a diffusers quantizer backend (``quant_method: "quantduo"``).

Importing this module registers :class:`QuantDuoConfig` / :class:`QuantDuoQuantizer` in diffusers' quantizer
mappings, so a folder written by ``model.save_pretrained`` of a quantduo-quantized denoiser (its ``config.json``
carries the ``quantization_config``) loads with plain diffusers calls::

    model = FluxTransformer2DModel.from_pretrained("flux-int4/transformer")
    pipe = DiffusionPipeline.from_pretrained("flux-int4")

The ``quantization_config`` holds the storage format of every quantized layer (``layers``: constructor arguments
of :class:`~quantduo.svdquant.SVDQuantLinear` by module name) and the execution to run them with; it never holds a
path. Loading replaces the named ``nn.Linear`` modules of the empty skeleton, diffusers fills their buffers from
the safetensors file, and the layers' derived state is computed on the device they landed on.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from packaging.version import InvalidVersion, Version
from torch import nn

from quantduo._version import __version__
from quantduo.formats.registry import EXECUTIONS, format_names, get_format
from quantduo.svdquant import CheckpointError, SVDQuantLinear
from quantduo.svdquant.serialization import check_unfused, convert_smoothed_act_shift, layer_specs, replace_linears
from quantduo.svdquant.linear import ACT_FORMATS, WEIGHT_FORMATS, set_execution
from quantduo.utils import verify_manifest

from .fusions import FUSED_NAMES, enable_fusions

QUANT_METHOD = "quantduo"
DIGEST_KEY = "quantduo_sha256"  # safetensors metadata: SHA-256 over every stored tensor (names, dtypes, shapes, bytes)
# checkpoints written before this version store the smoothed-space act_shift (converted on load)
INPUT_SPACE_SHIFT_SINCE = Version("0.3.0")
LAYER_FIELDS = {"in_features": int, "out_features": int, "rank": int, "bias": bool, "weight_format": str,
                "act_format": str, "group_size": int}


class QuantizationConfigError(CheckpointError):
    """A ``quantization_config`` that is not a valid quantduo config (the message names the field)."""


class _QuantMethod(str):
    """The method name; diffusers reads ``quant_method.value`` as it does of its own enum."""

    @property
    def value(self) -> str:
        return str(self)


def _check_layer(name: str, spec: Any) -> dict:
    """A validated copy of one ``layers`` entry (``QuantizationConfigError`` naming the field otherwise)."""
    if not isinstance(spec, dict):
        raise QuantizationConfigError(f"quantization_config.layers[{name!r}] must be an object, got {type(spec).__name__}")
    missing = sorted(set(LAYER_FIELDS) - set(spec))
    unknown = sorted(set(spec) - set(LAYER_FIELDS))
    if missing or unknown:
        raise QuantizationConfigError(f"quantization_config.layers[{name!r}]: missing {missing}, unknown {unknown}")
    for key, kind in LAYER_FIELDS.items():
        if type(spec[key]) is not kind:
            raise QuantizationConfigError(f"quantization_config.layers[{name!r}].{key} must be {kind.__name__}, "
                                          f"got {spec[key]!r}")
    if spec["weight_format"] not in WEIGHT_FORMATS or spec["act_format"] not in ACT_FORMATS:
        raise QuantizationConfigError(f"quantization_config.layers[{name!r}]: weight_format / act_format must be one of "
                                      f"{WEIGHT_FORMATS} / {ACT_FORMATS}, got {spec['weight_format']!r} / "
                                      f"{spec['act_format']!r}")
    if min(spec["in_features"], spec["out_features"], spec["group_size"]) <= 0 or spec["rank"] < 0:
        raise QuantizationConfigError(f"quantization_config.layers[{name!r}]: sizes must be positive, rank >= 0")
    return dict(spec)


class QuantDuoConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a quantduo checkpoint.

    Args:
        format: the storage format's name in :mod:`quantduo.formats.registry` (``"int4"``, ``"nvfp4"``, ...).
        rank: rank of the low-rank branch used at quantization.
        execution: how loaded layers run (``"auto"``, ``"reference"``, ``"exact"``, ``"a16"``, ``"fp8"``).
        fast_accum: fp8 GEMMs without float32 promotion along K.
        fuse: replace FLUX/GELU blocks by their fused versions after loading (same outputs, same state dict).
        layers: ``{module name: SVDQuantLinear constructor arguments}`` of every quantized layer.
        quantduo_version: the version that wrote the checkpoint (before 0.3.0: ``act_shift`` stored in the smoothed
            space, converted on load).
    """

    def __init__(self, format: str = "int4", rank: int = 32, execution: str = "auto", fast_accum: bool = True,
                 fuse: bool = True, layers: dict[str, dict] | None = None, quantduo_version: str = __version__,
                 quant_method: str = QUANT_METHOD, **unknown: Any) -> None:
        if unknown:
            raise QuantizationConfigError(f"quantization_config has unknown field(s) {sorted(unknown)} for "
                                          f"quant_method {QUANT_METHOD!r}")
        if quant_method != QUANT_METHOD:
            raise QuantizationConfigError(f"quantization_config.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if format not in format_names():
            raise QuantizationConfigError(f"quantization_config.format {format!r} is not one of {format_names()}")
        if execution not in EXECUTIONS:
            raise QuantizationConfigError(f"quantization_config.execution {execution!r} is not one of {EXECUTIONS}")
        if type(rank) is not int or rank < 0:
            raise QuantizationConfigError(f"quantization_config.rank must be a non-negative integer, got {rank!r}")
        if not isinstance(layers or {}, dict):
            raise QuantizationConfigError("quantization_config.layers must be an object {module name: layer}")
        _parse_version(quantduo_version)
        self.quant_method = _QuantMethod(QUANT_METHOD)
        self.format, self.rank, self.execution = format, rank, execution
        self.fast_accum, self.fuse, self.quantduo_version = bool(fast_accum), bool(fuse), quantduo_version
        self.layers = {name: _check_layer(name, spec) for name, spec in (layers or {}).items()}

    def stores_smoothed_act_shift(self) -> bool:
        """Whether the checkpoint's ``act_shift`` is the smoothed-space shift (written by quantduo < 0.3.0)."""
        return _parse_version(self.quantduo_version) < INPUT_SPACE_SHIFT_SINCE

    def to_dict(self) -> dict[str, Any]:
        return dict(quant_method=QUANT_METHOD, format=self.format, rank=self.rank, execution=self.execution,
                    fast_accum=self.fast_accum, fuse=self.fuse, layers=self.layers,
                    quantduo_version=self.quantduo_version)

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``repr`` and ``to_json_string`` show: the whole config (every field is meaningful)."""
        return self.to_dict()


def _parse_version(version: Any) -> Version:
    """``quantization_config.quantduo_version`` parsed (``QuantizationConfigError`` if it is not a version)."""
    try:
        return Version(version)
    except (InvalidVersion, TypeError) as err:
        raise QuantizationConfigError(f"quantization_config.quantduo_version must be a version string such as "
                                      f"{__version__!r}, got {version!r}") from err


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over ``tensors`` in name order: each name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


_METADATA = re.compile(rb'"__metadata__":(\{[^{}]*\})')


def sort_safetensors_metadata(path: str | Path) -> None:
    """Put the ``__metadata__`` keys of a safetensors file's header in sorted order, in place. safetensors writes
    them in hash-map order, which changes from process to process, so a file with two keys (diffusers' ``format``
    and :data:`DIGEST_KEY`) is otherwise not reproducible byte for byte; sorting keeps the header's length."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        found = _METADATA.search(header)
        if found is None:
            return
        ordered = json.dumps(json.loads(found.group(1)), separators=(",", ":"), sort_keys=True).encode()
        if len(ordered) != len(found.group(1)):
            raise ValueError(f"{path}: unexpected safetensors metadata encoding {found.group(1)[:80]!r}")
        f.seek(8 + found.start(1))
        f.write(ordered)


def verify_files(files: list[str]) -> None:
    """Check the safetensors ``files`` of one checkpoint against the digest their metadata records
    (``QuantizationConfigError`` for a missing digest, an unreadable file or a mismatch: a corrupt checkpoint)."""
    tensors, recorded = {}, set()
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                recorded.add((f.metadata() or {}).get(DIGEST_KEY))
                tensors.update({name: f.get_tensor(name) for name in f.keys()})
        except (SafetensorError, OSError) as err:
            raise QuantizationConfigError(f"cannot read {file}: {err}") from err
    if None in recorded or len(recorded) != 1:
        raise QuantizationConfigError(f"{files[0]} records no {DIGEST_KEY}: not written by quantduo's save_pretrained")
    if state_digest(tensors) != recorded.pop():
        raise QuantizationConfigError(f"{Path(files[0]).parent} is corrupt: its tensors do not match the SHA-256 "
                                      f"recorded when it was saved")


def fused_modules(state_dict: dict[str, Any]) -> list[str]:
    """Names of the fused projections (``to_qkv``, ``to_kv``, ``to_added_qkv``) holding entries of ``state_dict``."""
    modules = {key.rpartition(".")[0] for key in state_dict}
    return sorted(m for m in modules if m.rpartition(".")[2] in FUSED_NAMES)


def _owner(model: nn.Module, param_name: str) -> tuple[nn.Module, str]:
    module_name, _, tensor_name = param_name.rpartition(".")
    return model.get_submodule(module_name), tensor_name


class QuantDuoQuantizer(DiffusersQuantizer):
    """Loads and saves quantduo checkpoints through diffusers' ``from_pretrained`` / ``save_pretrained``."""

    requires_calibration = True  # quantization needs calibration data: quantduo.quantize_, then save_pretrained
    # the class's ``_keep_in_fp32_modules`` (Wan: RoPE, time embedder, modulation tables, norms) load in float32 as
    # they do unquantized; a quantized layer's buffers keep the layer's dtypes (create_quantized_param)
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: QuantDuoConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.compute_dtype = torch.bfloat16

    def update_torch_dtype(self, torch_dtype: torch.dtype | None) -> torch.dtype:
        self.compute_dtype = torch_dtype or torch.bfloat16
        return self.compute_dtype

    def validate_environment(self, *args, **kwargs) -> None:
        get_format(self.quantization_config.format)
        if not self.quantization_config.layers:
            raise QuantizationConfigError("quantization_config.layers is empty: the checkpoint names no quantized layer")

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files) -> list[str]:
        files = [checkpoint_files] if isinstance(checkpoint_files, (str, Path)) else list(checkpoint_files or [])
        safetensors_files = [str(f) for f in files if str(f).endswith(".safetensors")]
        if not safetensors_files:
            raise QuantizationConfigError("quantduo checkpoints are safetensors files; found none")
        # a quantduo manifest covers every file, configs included; folders written by a bare save_pretrained have
        # only the tensor digest in their safetensors metadata (reading the tensors again would hash them twice)
        if verify_manifest(Path(safetensors_files[0]).parent, required=False) is None:
            verify_files(safetensors_files)
        return loaded_keys

    def get_state_dict_and_metadata(self, state_dict: dict[str, Any], safe_serialization: bool = False
                                    ) -> tuple[dict[str, Any], dict[str, str]]:
        """The state dict to write and its digest; ``FusedLayersError`` for a model with fused projections (their
        layers would not reload: ``unfuse_qkv`` first)."""
        check_unfused(fused_modules(state_dict))
        return state_dict, {DIGEST_KEY: state_digest(state_dict)}

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        replace_linears(model, self.quantization_config.layers, self.compute_dtype, device="meta")

    def check_if_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                                 state_dict: dict[str, Any], **kwargs) -> bool:
        return isinstance(_owner(model, param_name)[0], SVDQuantLinear)

    def check_quantized_param_shape(self, param_name: str, current: torch.Tensor, loaded: torch.Tensor) -> bool:
        if current.shape != loaded.shape:
            raise QuantizationConfigError(f"{param_name}: the checkpoint holds {tuple(loaded.shape)}, the layer "
                                          f"described by quantization_config needs {tuple(current.shape)}")
        return True

    def create_quantized_param(self, model: nn.Module, param_value: torch.Tensor, param_name: str,
                               target_device: torch.device | str, state_dict: dict[str, Any],
                               unexpected_keys: list[str] | None = None, **kwargs) -> None:
        """Put a stored buffer into its layer exactly: packed codes and their own-format scales keep their dtype,
        the compute-dtype buffers take the layer's."""
        module, tensor_name = _owner(model, param_name)
        current = module._buffers[tensor_name]
        self.check_quantized_param_shape(param_name, current, param_value)
        module._buffers[tensor_name] = param_value.to(device=target_device, dtype=current.dtype)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        """Check and finish the loaded layers (an older checkpoint's ``act_shift`` converted to the input space; the
        config then says this version, so that the model saves as current), set their execution, fuse."""
        config = self.quantization_config
        smoothed_shift = config.stores_smoothed_act_shift()
        _realign(model)
        for name, module in model.named_modules():
            if isinstance(module, SVDQuantLinear):
                meta = [n for n, b in module.named_buffers() if b.is_meta and n in module.state_dict()]
                if meta:
                    raise QuantizationConfigError(f"quantized layer {name!r}: the checkpoint lacks {meta}")
                if smoothed_shift:
                    convert_smoothed_act_shift(module)
                _materialize_derived(module)
        if smoothed_shift:
            config.quantduo_version = __version__
        set_execution(model, config.execution, config.fast_accum)
        if config.fuse:
            enable_fusions(model)
        return model

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


ALIGNMENT = 64  # bytes; tensors read from a safetensors file can start anywhere


def _realign(model: nn.Module) -> None:
    """Copy every parameter / buffer that does not start on a 64-byte boundary (a view into the loaded file) into
    its own allocation: the math libraries pick their vector paths by alignment, so a loaded model then computes
    bit for bit what the saved one did."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and not tensor.is_meta and tensor.data_ptr() % ALIGNMENT:
                    tensor.data = tensor.data.clone()


def _materialize_derived(module: SVDQuantLinear) -> None:
    """Give the non-persistent (derived) buffers left on the meta device real storage next to the stored ones,
    then compute them."""
    device = module.qweight.device
    for name, buf in module._buffers.items():
        if buf is not None and buf.is_meta:
            module._buffers[name] = torch.empty_like(buf, device=device)
    module.refresh_derived()


def mark_quantized(model: nn.Module, config: QuantDuoConfig) -> nn.Module:
    """Make an in-memory quantized diffusers model save as a quantduo checkpoint: ``config.layers`` from its
    quantized layers, ``quantization_config`` in its config, the quantizer attached (``save_pretrained`` checks it)."""
    config.layers = {name: _check_layer(name, spec) for name, spec in layer_specs(model).items()}
    model.register_to_config(quantization_config=config)
    model.hf_quantizer = QuantDuoQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = config.quant_method
    return model


def register() -> None:
    """Add ``"quantduo"`` to diffusers' quantizer mappings (idempotent)."""
    diffusers_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = QuantDuoQuantizer
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = QuantDuoConfig


register()
