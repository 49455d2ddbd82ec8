"""Write a quantized FLUX transformer in the published layouts, so Nunchaku users can run models quantized (or
loaded) here.

* ``"nunchaku"`` — the single file (deepcompressor names, fused q/k/v, split single-block ``proj_out``, AWQ
  modulation in Nunchaku's interleaved order with the ``+1``, a bias on every layer), with the metadata Nunchaku's
  ``merge_safetensors`` writes: ``config``, ``comfy_config``, ``model_class`` and ``quantization_config`` (plus the
  ``rank`` Nunchaku V2 reads from it);
* ``"nunchaku-lite"`` — a diffusers model folder (``config.json`` with the ``nunchaku_lite`` config, diffusers
  target names, modulation in diffusers order), every target at its diffusers module's exact shape, with a bias
  only where the module has one (diffusers builds its layers from the modules).

Every 16-bit tensor is written in the model's dtype, AWQ biases included (as deepcompressor writes them).

Only layers whose arithmetic the layout computes are written, else :class:`ValueError` names the layer: W4A4 INT4
layers with signed activations — and, in the Nunchaku file, the post-GELU layers as shifted unsigned INT4 with
Nunchaku's shift (``act_shift = 0.171875`` on every channel: what :mod:`.build` reads and quantduo's calibration
picks for post-GELU inputs; a larger shift, picked for inputs below the GELU's minimum, Nunchaku cannot run) —,
fused q/k/v sharing smoothing and down-projection, and INT4 weight-only layers (rank 0, or the per-group offset
branch :mod:`.build` creates) as AWQ.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quantduo.formats import nunchaku as nk
from quantduo.formats import quantizers as qz
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant.split import SplitProjOut
from quantduo.svdquant.serialization import check_no_loras
from quantduo.utils import atomic_folder, atomic_write, write_manifest

from .build import modulation_bias_offset
from .layouts import GELU_SHIFT, Role, block_roles
from .loader import FLUX_CLASS
from .reader import LITE_METHOD

EXPORT_LAYOUTS = ("nunchaku", "nunchaku-lite")
# What a calibration must leave out for each layout to hold it (SVDQuantConfig fields; ``quantduo quantize
# --for-layout``): nunchaku_lite runs every layer with signed activations and has one proj_out per single block.
CALIBRATION_FOR_LAYOUT = {"nunchaku": {}, "nunchaku-lite": {"unsigned_act": [], "split_proj_out": False}}


def _w4a4_parts(name: str, layers: list[SVDQuantLinear], shifted: bool) -> nk.W4A4Parts:
    """Layers sharing their input (fused by output rows) -> one W4A4 layer's logical parts (bias None when no layer
    has one, else the biases with zeros for the layers without)."""
    first = layers[0]
    for layer, lname in zip(layers, [name] * len(layers)):
        want = "uint4" if shifted else "int4"
        if not isinstance(layer, SVDQuantLinear) or layer.weight_format != "int4" or layer.act_format != want:
            raise ValueError(f"{lname}: the layout runs this layer as W4A4 INT4 with {want} activations; it is "
                             f"{getattr(layer, 'weight_format', type(layer).__name__)}/{getattr(layer, 'act_format', '')}")
        if not (torch.equal(layer.smooth_factor, first.smooth_factor) and torch.equal(layer.proj_down, first.proj_down)):
            raise ValueError(f"{name}: fused layers must share smoothing and the low-rank down-projection")
    smooth = first.smooth_factor.float()
    if shifted and not torch.allclose(first.act_shift.float(), torch.full_like(smooth, GELU_SHIFT), rtol=1e-2):
        raise ValueError(f"{name}: post-GELU layer with a shift other than Nunchaku's act_shift = {GELU_SHIFT} "
                         f"(it has {first.act_shift.float().min():.6g} to {first.act_shift.float().max():.6g}); "
                         f"Nunchaku cannot run it")
    cat = lambda attr: torch.cat([getattr(m, attr) for m in layers])  # noqa: E731
    bias = None
    if any(m.bias is not None for m in layers):
        bias = torch.cat([m.bias if m.bias is not None else m.smooth_factor.new_zeros(m.out_features) for m in layers])
    down = first.proj_down.float() / smooth[:, None]
    return nk.W4A4Parts(qz.unpack_int4(cat("qweight")), cat("wscales"), first.smooth_factor,
                        down.to(first.dtype), cat("proj_up"), bias)


def _awq_parts(name: str, layer: SVDQuantLinear) -> nk.AwqParts:
    """An INT4 weight-only layer (signed codes + optional per-group offset branch) -> AWQ parts."""
    if not isinstance(layer, SVDQuantLinear) or layer.weight_format != "int4" or layer.act_format != "none" \
            or layer.group_size != nk.AWQ_GROUP or layer.padded_in_features != layer.in_features:
        raise ValueError(f"{name}: AWQ layers are INT4 weight-only with group {nk.AWQ_GROUP}")
    s = layer.wscales.float()
    offsets = torch.zeros_like(s)
    if layer.rank:
        groups = layer.in_features // nk.AWQ_GROUP
        indicator = torch.eye(groups).repeat_interleave(nk.AWQ_GROUP, dim=0)
        if layer.rank != groups or not torch.equal(layer.proj_down.float(), indicator):
            raise ValueError(f"{name}: a weight-only layer with a low-rank branch has no AWQ form")
        offsets = layer.proj_up.float()
    signed = qz.unpack_int4(layer.qweight).to(torch.int32)
    n, k = signed.shape
    # unsigned codes = signed + o per group: o = 7 (TinyChat's symmetric zero point) where the codes allow it
    o = torch.where(signed.reshape(n, k // nk.AWQ_GROUP, -1).amin(-1) >= -7, 7, 8)
    codes = signed + o.repeat_interleave(nk.AWQ_GROUP, dim=1)
    return nk.AwqParts(codes.to(torch.uint8), s.to(layer.dtype), (offsets - o * s).to(layer.dtype), layer.bias)


def _modulation_to_nunchaku(parts: nk.AwqParts, splits: int) -> nk.AwqParts:
    """Diffusers chunk order -> Nunchaku's interleaved rows with ``+1`` on the scale chunks' bias (a zero bias
    where the layer has none), rounded once to the scales' dtype."""
    n = parts.codes.shape[0]
    inverse = lambda t: t.reshape(splits, n // splits, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # noqa: E731
    bias = torch.zeros(n) if parts.bias is None else parts.bias.float()
    bias = inverse(bias + modulation_bias_offset(n, splits)).to(parts.scales.dtype)
    return nk.AwqParts(inverse(parts.codes), inverse(parts.scales), inverse(parts.zeros), bias)


def _module(model: nn.Module, name: str) -> nn.Module:
    parent, _, leaf = name.rpartition(".")
    if leaf in ("out_proj", "mlp_fc2") and parent.endswith("proj_out"):
        split = model.get_submodule(parent)
        if not isinstance(split, SplitProjOut):
            raise ValueError(f"{parent}: the Nunchaku layout stores proj_out as two halves (attention / post-GELU "
                             "MLP); this model holds it as one layer (calibrated with split_proj_out=False)")
        return getattr(split, leaf)
    return model.get_submodule(name)


def _role_tensors(model: nn.Module, scope: str, stored: str, role: Role) -> dict[str, torch.Tensor]:
    names = [scope + t for t in role.targets]
    modules = [_module(model, n) for n in names]
    if role.kind == "plain":
        return {f"{scope}{stored}.weight": modules[0].weight}
    if role.kind == "awq":
        parts = _awq_parts(names[0], modules[0])
        if role.adanorm_splits:
            parts = _modulation_to_nunchaku(parts, role.adanorm_splits)
        return {f"{scope}{stored}.{k}": v for k, v in nk.encode_awq(parts).items()}
    parts = _w4a4_parts(scope + stored, modules, role.shifted)
    if parts.bias is None:  # Nunchaku builds every FLUX W4A4 layer with a bias
        parts = replace(parts, bias=parts.smooth.new_zeros(parts.codes.shape[0]))
    tensors = nk.encode_w4a4(parts)
    tensors["smooth_orig"] = tensors["smooth"]
    return {f"{scope}{stored}.{k}": v for k, v in tensors.items()}


def nunchaku_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The Nunchaku single file's tensors of a quantized diffusers FLUX ``model``."""
    tensors, owners = {}, set()
    for block_list, roles in block_roles("nunchaku").items():
        for i in range(len(getattr(model, block_list))):
            scope = f"{block_list}.{i}."
            for stored, role in roles.items():
                tensors.update(_role_tensors(model, scope, stored, role))
                owners.update(scope + t.removesuffix(".out_proj").removesuffix(".mlp_fc2") for t in role.targets)
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if not any(owner == o or owner.startswith(o + ".") for o in owners):
            tensors[key] = value
    return tensors


def _model_config(model: nn.Module) -> dict:
    """The diffusers config of ``model`` as written into a layout: without private keys and without the
    ``quantization_config`` of the checkpoint it was loaded from (a quantduo pipeline's), which the layout
    replaces with its own."""
    return {"_class_name": type(model).__name__,
            **{k: v for k, v in model.config.items() if not k.startswith("_") and k != "quantization_config"}}


def comfy_config(config: dict) -> dict | None:
    """The ComfyUI model config (``comfy_config``: ComfyUI's ``Flux`` / ``FluxSchnell`` parameters, as in
    ComfyUI-nunchaku's ``models/configs/flux.1-*.json``) of a diffusers FLUX ``config``; None where the diffusers
    config does not determine it (not a FluxTransformer2DModel, patch size other than 1, channels that are not
    2x2-packed latents). Fixed by diffusers' FLUX, not its config: ``mlp_ratio`` 4, q/k/v biases, RoPE theta
    10000, the pipeline's 2x2 latent packing (ComfyUI's ``patch_size`` 2: ``in_channels`` / 4)."""
    in_channels, out_channels = config["in_channels"], config.get("out_channels") or config["in_channels"]
    if config.get("_class_name") != FLUX_CLASS or config.get("patch_size", 1) != 1 or in_channels % 4 \
            or out_channels % 4:
        return None
    guidance = bool(config.get("guidance_embeds", False))
    return {"model_class": "Flux" if guidance else "FluxSchnell", "model_config": {
        "axes_dim": list(config["axes_dims_rope"]), "context_in_dim": config["joint_attention_dim"],
        "depth": config["num_layers"], "depth_single_blocks": config["num_single_layers"],
        "disable_unet_model_creation": True, "guidance_embed": guidance,
        "hidden_size": config["num_attention_heads"] * config["attention_head_dim"], "image_model": "flux",
        "in_channels": in_channels // 4, "mlp_ratio": 4.0, "num_heads": config["num_attention_heads"],
        "out_channels": out_channels // 4, "patch_size": 2, "qkv_bias": True, "theta": 10000,
        "vec_in_dim": config["pooled_projection_dim"]}}


def nunchaku_metadata(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The single file's metadata, as Nunchaku's ``merge_safetensors`` writes it (every value a JSON string but
    ``model_class``): ``config`` (the diffusers config), ``comfy_config`` (where :func:`comfy_config` knows it),
    ``model_class`` and ``quantization_config`` (INT4 W4A4, group 64; NVFP4 files, which cannot be written here,
    say ``fp4_e2m1_all`` with fp8 scales per 16), plus the ``rank`` Nunchaku V2 builds its layers with (read from
    ``quantization_config``, default 32) where every W4A4 layer of ``tensors`` has the same one."""
    config = _model_config(model)
    int4 = {"dtype": "int4", "scale_dtype": None, "group_size": nk.INT4_GROUP}
    quant = {"method": "svdquant", "weight": int4, "activation": int4}
    ranks = {t.shape[1] for k, t in tensors.items() if k.endswith(".lora_up")}
    if len(ranks) == 1:
        quant["rank"] = ranks.pop()
    metadata = {"config": json.dumps(config), "model_class": "NunchakuFluxTransformer2dModel",
                "quantization_config": json.dumps(quant)}
    comfy = comfy_config(config)
    if comfy is not None:
        metadata["comfy_config"] = json.dumps(comfy)
    return metadata


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def lite_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, quantization_config)`` of a quantized diffusers ``model`` in the nunchaku_lite layout.
    :class:`ValueError` for a W4A4 layer whose shape is not a multiple of the 128 x 128 tiling: diffusers builds
    each target at its module's exact shape, leaving no room for the padding the kernels would need."""
    svdq, awq, tensors, ranks = [], [], {}, set()
    for name, module in model.named_modules():
        if isinstance(module, SplitProjOut):
            raise ValueError(f"{name}: nunchaku_lite targets are diffusers modules and a split proj_out is two "
                             "layers: export it as `nunchaku`, or calibrate for this layout with "
                             "SVDQuantConfig(split_proj_out=False, unsigned_act=[])")
        if not isinstance(module, SVDQuantLinear):
            continue
        if module.act_format == "none":
            tensors.update({f"{name}.{k}": v for k, v in nk.encode_awq(_awq_parts(name, module), pad_groups=False).items()})
            awq.append(name)
            continue
        if module.out_features % nk.WARP_N or module.in_features % nk.K_TILE:
            raise ValueError(f"{name}: nunchaku_lite stores W4A4 layers at their exact shape, and Nunchaku's kernels "
                             f"need out / in features multiples of {nk.WARP_N} / {nk.K_TILE}; this one is "
                             f"[{module.out_features}, {module.in_features}]")
        stored = nk.encode_w4a4(_w4a4_parts(name, [module], shifted=False))
        renames = {"smooth": "smooth_factor", "lora_down": "proj_down", "lora_up": "proj_up"}
        tensors.update({f"{name}.{renames.get(k, k)}": v for k, v in stored.items()})
        svdq.append(name)
        ranks.add(stored["lora_up"].shape[1])
    if len(ranks) > 1:
        raise ValueError(f"nunchaku_lite stores one rank for all layers; this model has ranks {sorted(ranks)}")
    quantized = set(svdq + awq)
    tensors.update({k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in quantized})
    dtype = next(v.dtype for v in tensors.values() if v.is_floating_point() and v.dtype.itemsize > 1)
    config = {"quant_method": LITE_METHOD, "compute_dtype": str(dtype).removeprefix("torch.")}
    if svdq:
        config["svdq_w4a4"] = {"precision": "int4", "group_size": 64, "rank": ranks.pop(), "targets": svdq}
    if awq:
        config["awq_w4a16"] = {"precision": "int4", "group_size": 64, "targets": awq}
    return tensors, config


def export_checkpoint(model: nn.Module, out: str | Path, layout: str, made_by: dict | None = None) -> Path:
    """Write ``model`` in ``layout`` (:data:`EXPORT_LAYOUTS`): a ``.safetensors`` file for ``"nunchaku"`` (written
    atomically), a model folder for ``"nunchaku-lite"`` (written as a whole, atomically, with a
    ``quantduo_manifest.json``; ``made_by`` goes into it). Returns the path written; ``ValueError`` with LoRAs
    attached (:func:`~quantduo.svdquant.serialization.check_no_loras`)."""
    out = Path(out)
    check_no_loras(model)
    if layout == "nunchaku":
        tensors = nunchaku_state_dict(model)
        return _save(tensors, out, nunchaku_metadata(model, tensors))
    if layout == "nunchaku-lite":
        tensors, quant = lite_state_dict(model)
        config = json.dumps({**_model_config(model), "quantization_config": quant}, indent=2)
        with atomic_folder(out) as tmp:
            save_file(tensors, str(tmp / "diffusion_pytorch_model.safetensors"))
            (tmp / "config.json").write_text(config)
            write_manifest(tmp, {"layout": layout, **(made_by or {})})
        return out
    raise ValueError(f"unknown export layout {layout!r}; choose one of {', '.join(EXPORT_LAYOUTS)}")
