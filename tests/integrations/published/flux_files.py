"""Whole FLUX checkpoints in the published layouts, built by the test-side packer from a (tiny) diffusers FLUX, and
the matching re-statement model: the same diffusers model with every quantized module replaced by a module
computing Nunchaku's arithmetic (:mod:`tests.integrations.published.packer`) from the packer's logical tensors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from tests.integrations.published.packer import (AwqLayer, W4A4Layer, awq_from_weight, bf16, interleave_modulation,
                                                 quantized_from_weight)

V2_TENSORS = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down",
              "lora_up": "proj_up"}
V2_DOUBLE = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
             "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
             "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
             "norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q",
             "norm_added_k": "attn.norm_added_k"}
V2_SINGLE = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}


class Rows(nn.Module):
    """Output rows ``[start, stop)`` of a (fused) re-stated layer."""

    def __init__(self, layer, start: int, stop: int):
        super().__init__()
        self.layer, self.start, self.stop = layer, start, stop

    def forward(self, x):
        return self.layer(x)[..., self.start:self.stop].to(x.dtype)


class Restated(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x).to(x.dtype)


class RestatedSplitProjOut(nn.Module):
    """Nunchaku's single-block output: ``out_proj(attn) + mlp_fc2(gelu(mlp))``."""

    def __init__(self, out_proj: W4A4Layer, mlp_fc2: W4A4Layer, attn_dim: int):
        super().__init__()
        self.out_proj, self.mlp_fc2, self.attn_dim = out_proj, mlp_fc2, attn_dim

    def forward(self, x):
        return (self.out_proj(x[..., : self.attn_dim]) + self.mlp_fc2(x[..., self.attn_dim:])).to(x.dtype)


class RestatedAdaLN(nn.Module):
    """Nunchaku's AdaLayerNormZero(Single): modulation outputs interleaved over ``splits`` chunks
    (``emb.view(B, -1, splits).permute(2, 0, 1)``), ``norm(x) * scale + shift`` with the ``+1`` in the bias. For the
    double block, diffusers' block then computes ``(1 + scale_mlp)``: ``scale_mlp - 1`` is returned for it."""

    def __init__(self, linear: AwqLayer, norm: nn.Module, splits: int):
        super().__init__()
        self.linear, self.norm, self.splits = linear, norm, splits

    def forward(self, x, emb=None, **_):
        out = self.linear(F.silu(emb.float())).to(x.dtype)
        chunks = out.view(out.shape[0], -1, self.splits).permute(2, 0, 1)
        norm_x = self.norm(x) * chunks[1][:, None] + chunks[0][:, None]
        if self.splits == 3:
            return norm_x, chunks[2]
        return norm_x, chunks[2], chunks[3], chunks[4] - 1, chunks[5]


def _weight(model, name):
    m = model.get_submodule(name)
    return m.weight.detach().float(), (None if m.bias is None else m.bias.detach().float())


def _cat(model, block, names):
    ws = [_weight(model, f"{block}.{n}") for n in names]
    return torch.cat([w for w, _ in ws]), torch.cat([b for _, b in ws])


def round_to_bf16(model: nn.Module) -> nn.Module:
    """The model's parameters rounded to bfloat16 values (kept float32): what a bf16 file stores."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(bf16(p))
    return model


def _double_layers(model, block, rank, g, precision):
    """The double block's layers; ``out_proj*`` with the smoothing fused away (smooth 1, ``smooth_orig`` the
    factors), as deepcompressor's converter writes every layer named ``*out_proj*``."""
    def attn(names, shifted=False, smooth_fused=False):
        return quantized_from_weight(precision, *_cat(model, block, names), rank, g, shifted, fused=len(names) > 1,
                                     smooth_fused=smooth_fused)

    return {
        "qkv_proj": attn(["attn.to_q", "attn.to_k", "attn.to_v"]),
        "qkv_proj_context": attn(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
        "out_proj": attn(["attn.to_out.0"], smooth_fused=True),
        "out_proj_context": attn(["attn.to_add_out"], smooth_fused=True),
        "mlp_fc1": attn(["ff.net.0.proj"]), "mlp_fc2": attn(["ff.net.2"], shifted=True),
        "mlp_context_fc1": attn(["ff_context.net.0.proj"]), "mlp_context_fc2": attn(["ff_context.net.2"], shifted=True),
        "norm1.linear": interleave_modulation(awq_from_weight(*_weight(model, f"{block}.norm1.linear")), 6),
        "norm1_context.linear": interleave_modulation(awq_from_weight(*_weight(model, f"{block}.norm1_context.linear")), 6),
    }


def _single_layers(model, block, rank, g, precision):
    w, b = _weight(model, f"{block}.proj_out")
    dim = w.shape[1] - model.get_submodule(block).mlp_hidden_dim
    quantized = lambda *args, **kw: quantized_from_weight(precision, *args, **kw)  # noqa: E731
    return {
        "qkv_proj": quantized(*_cat(model, block, ["attn.to_q", "attn.to_k", "attn.to_v"]), rank, g, fused=True),
        "mlp_fc1": quantized(*_weight(model, f"{block}.proj_mlp"), rank, g),
        "out_proj": quantized(w[:, :dim], b, rank, g, smooth_fused=True),
        "mlp_fc2": quantized(w[:, dim:], None, rank, g, shifted=True),
        "norm.linear": interleave_modulation(awq_from_weight(*_weight(model, f"{block}.norm.linear")), 3),
    }


_DOUBLE_TARGETS = {"qkv_proj_context": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                   "qkv_proj": ["attn.to_q", "attn.to_k", "attn.to_v"], "out_proj": ["attn.to_out.0"],
                   "out_proj_context": ["attn.to_add_out"], "mlp_fc1": ["ff.net.0.proj"], "mlp_fc2": ["ff.net.2"],
                   "mlp_context_fc1": ["ff_context.net.0.proj"], "mlp_context_fc2": ["ff_context.net.2"]}
_DOUBLE_NORMS = {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q",
                 "norm_added_k": "attn.norm_added_k"}


def _restate_rows(ref, block, layer, targets):
    start = 0
    for t in targets:
        n = ref.get_submodule(f"{block}.{t}").out_features
        ref.set_submodule(f"{block}.{t}", Rows(layer, start, start + n))
        start += n


def _stored(prefix: str, layer) -> dict[str, torch.Tensor]:
    """A layer's stored tensors under ``prefix`` (AWQ scale groups padded like TinyChat: 16 for the tiny model)."""
    stored = layer.stored(padded_groups=16) if isinstance(layer, AwqLayer) else layer.stored()
    return {f"{prefix}.{k}": v for k, v in stored.items()}


def flux_checkpoint(model: nn.Module, rank: int = 16, seed: int = 0,
                    precision: str = "int4") -> tuple[dict[str, torch.Tensor], nn.Module, dict]:
    """``(tensors, restated model, logical layers)`` of a Nunchaku single file for ``model`` (a float32 diffusers
    FLUX whose weights are bf16 values), W4A4 layers in ``precision`` (``"int4"`` or ``"nvfp4"``).
    ``logical layers``: ``{stored module prefix: W4A4Layer | Nvfp4Layer | AwqLayer}``."""
    g = torch.Generator().manual_seed(seed)
    ref, tensors, logical = copy.deepcopy(model), {}, {}
    quantized_owners = set()
    for i, blk in enumerate(model.transformer_blocks):
        block = f"transformer_blocks.{i}"
        layers = _double_layers(model, block, rank, g, precision)
        for name, layer in layers.items():
            logical[f"{block}.{name}"] = layer
            tensors.update(_stored(f"{block}.{name}", layer))
        for name, targets in _DOUBLE_TARGETS.items():
            _restate_rows(ref, block, layers[name], targets)
            quantized_owners.update(f"{block}.{t}" for t in targets)
        for key, splits in (("norm1", 6), ("norm1_context", 6)):
            ref.set_submodule(f"{block}.{key}", RestatedAdaLN(layers[f"{key}.linear"], blk.get_submodule(key).norm, splits))
            quantized_owners.add(f"{block}.{key}.linear")
        for name, target in _DOUBLE_NORMS.items():
            tensors[f"{block}.{name}.weight"] = model.get_submodule(f"{block}.{target}").weight.detach().clone()
            quantized_owners.add(f"{block}.{target}")
    for i, blk in enumerate(model.single_transformer_blocks):
        block = f"single_transformer_blocks.{i}"
        layers = _single_layers(model, block, rank, g, precision)
        for name, layer in layers.items():
            logical[f"{block}.{name}"] = layer
            tensors.update(_stored(f"{block}.{name}", layer))
        _restate_rows(ref, block, layers["qkv_proj"], ["attn.to_q", "attn.to_k", "attn.to_v"])
        ref.set_submodule(f"{block}.proj_mlp", Restated(layers["mlp_fc1"]))
        dim = blk.proj_out.in_features - blk.mlp_hidden_dim
        ref.set_submodule(f"{block}.proj_out", RestatedSplitProjOut(layers["out_proj"], layers["mlp_fc2"], dim))
        ref.set_submodule(f"{block}.norm", RestatedAdaLN(layers["norm.linear"], blk.norm.norm, 3))
        quantized_owners.update(f"{block}.{t}" for t in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out",
                                                         "norm.linear", "attn.norm_q", "attn.norm_k"))
        for name in ("norm_q", "norm_k"):
            tensors[f"{block}.{name}.weight"] = model.get_submodule(f"{block}.attn.{name}").weight.detach().clone()
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in quantized_owners:
            tensors[key] = value.clone()
    return {k: (_to_file_dtype(v)) for k, v in tensors.items()}, ref, logical


def _to_file_dtype(t: torch.Tensor) -> torch.Tensor:
    """What the files store: floating tensors as bfloat16, fp8 NVFP4 scales and integer codes as they are."""
    return t.to(torch.bfloat16) if t.is_floating_point() and t.element_size() > 1 else t


def to_v2(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Nunchaku V2's in-memory names of a single file's tensors."""
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            table = V2_DOUBLE if parts[0] == "transformer_blocks" else V2_SINGLE
            scope, rest = ".".join(parts[:2]), ".".join(parts[2:])
            module, _, tensor = rest.rpartition(".")
            key = f"{scope}.{table.get(module, module)}.{V2_TENSORS.get(tensor, tensor)}"
        out[key] = value
    return out


def save_single_file(tensors, path: Path, model=None) -> Path:
    metadata = {"model_class": "NunchakuFluxTransformer2dModel"}
    if model is not None:
        metadata["config"] = json.dumps({"_class_name": "FluxTransformer2DModel", **dict(model.config)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------
# nunchaku_lite folders
# ---------------------------------------------------------------------------------------------
def lite_folder(model: nn.Module, directory: Path, rank: int = 16, seed: int = 0,
                precision: str = "int4") -> tuple[Path, nn.Module]:
    """A diffusers ``nunchaku_lite`` model folder for ``model`` (every linear of the blocks W4A4 in ``precision``
    with signed activations, NVFP4 with per-channel scales on every other layer; modulation linears AWQ in diffusers
    order) and the re-statement model."""
    g = torch.Generator().manual_seed(seed)
    ref, tensors, svdq, awq = copy.deepcopy(model), {}, [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(("transformer_blocks", "single_transformer_blocks")):
            continue
        w, b = module.weight.detach().float(), (None if module.bias is None else module.bias.detach().float())
        if name.endswith("norm1.linear") or name.endswith("norm1_context.linear") or name.endswith("norm.linear"):
            layer, stored = awq_from_weight(w, b), None
            stored = layer.stored()
            awq.append(name)
        else:
            layer = quantized_from_weight(precision, w, b, rank, g, fused=len(svdq) % 2 == 1)
            stored = layer.stored(V2_TENSORS)
            del stored["smooth_factor_orig"]
            svdq.append(name)
        tensors.update({f"{name}.{k}": v for k, v in stored.items()})
        ref.set_submodule(name, Restated(layer))
    for key, value in model.state_dict().items():
        if key.rpartition(".")[0] not in svdq + awq:
            tensors[key] = value.clone()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: (_to_file_dtype(v)).contiguous() for k, v in tensors.items()},
              str(directory / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "FluxTransformer2DModel", **dict(model.config), "quantization_config": {
        "quant_method": "nunchaku_lite", "compute_dtype": "bfloat16",
        "svdq_w4a4": {"precision": precision, "group_size": 16 if precision == "nvfp4" else 64, "rank": rank,
                      "targets": svdq},
        "awq_w4a16": {"precision": "int4", "group_size": 64, "targets": awq}}}
    (directory / "config.json").write_text(json.dumps(config))
    return directory, ref
