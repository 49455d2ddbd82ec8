"""Export round trips: published file -> quantduo -> published file / lite folder -> quantduo computes the same; a
quantduo-calibrated (signed) model exports to nunchaku_lite and loads back to the same outputs; what a layout cannot
hold is refused by name; the files carry what upstream writes (metadata, dtypes, diffusers' exact target shapes).
Plus a LoRA on the split single-block proj_out."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import FAST, flux_inputs, samples_from, tiny_flux  # noqa: E402
from tests.integrations.published.flux_files import flux_checkpoint, round_to_bf16, save_single_file  # noqa: E402

from quantduo.cli import main as cli  # noqa: E402
from quantduo.integrations.diffusers import quantization_config, quantize_transformer  # noqa: E402
from quantduo.integrations.lora import attach_lora  # noqa: E402
from quantduo.integrations.published import export_checkpoint, load_published_transformer, read_checkpoint  # noqa: E402
from quantduo.integrations.published.export import comfy_config, lite_state_dict  # noqa: E402
from quantduo.svdquant import CheckpointError, SVDQuantLinear  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402


def run(model, seed=4):
    with torch.no_grad():
        return model(**flux_inputs(model, seed))[0]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    base = round_to_bf16(tiny_flux(seed=1).float())
    tensors, _, _ = flux_checkpoint(base, rank=16)
    path = save_single_file(tensors, tmp_path_factory.mktemp("pub") / "svdq.safetensors", base)
    return path, load_published_transformer(path, dtype=torch.float32)[0]


def test_nunchaku_round_trip(published, tmp_path):
    path, model = published
    out = export_checkpoint(model, tmp_path / "again.safetensors", "nunchaku")
    original, again = read_checkpoint(path).tensors, read_checkpoint(out).tensors
    assert sorted(original) == sorted(again)  # the same names, nothing added or lost
    for key in original:
        if key.endswith(("qweight", "wscales", "wzeros")):
            assert torch.equal(original[key].float(), again[key].float()), key
    reloaded, _ = load_published_transformer(out, dtype=torch.float32)
    assert relative_error(run(reloaded), run(model)) < 1e-6


@pytest.fixture(scope="module")
def quantduo_flux():
    """``(quantized, float)``: a quantduo-calibrated tiny FLUX for nunchaku_lite (signed activations everywhere and
    one ``proj_out`` per single block, what that layout runs) whose first ``attn.to_q`` has no bias (a diffusers
    module built with ``bias=False``), and that float model."""
    model = tiny_flux(seed=5)
    model.transformer_blocks[0].attn.to_q.bias = None
    float_model = copy.deepcopy(model)
    cfg = quantization_config(model, unsigned_act=[], split_proj_out=False, **dict(FAST, search_tokens=32))
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2), cfg, progress=False)
    return model, float_model


def test_lite_round_trip_of_a_quantduo_model(quantduo_flux, tmp_path):
    """A quantduo-calibrated FLUX (signed activations everywhere) -> nunchaku_lite -> the same outputs."""
    model = quantduo_flux[0]
    folder = export_checkpoint(model, tmp_path / "lite", "nunchaku-lite")
    loaded, report = load_published_transformer(folder, dtype=torch.bfloat16)
    assert report.layout == "nunchaku-lite"
    name = "transformer_blocks.0.attn.to_k"
    for buf in ("qweight", "wscales", "smooth_factor", "proj_up", "bias"):
        assert torch.equal(getattr(loaded.get_submodule(name), buf), getattr(model.get_submodule(name), buf)), buf
    # the one rounding: the layout stores the down-projection with 1 / smooth folded in, in 16 bits
    assert relative_error(run(loaded.float()), run(model.float())) < 5e-3
    with pytest.raises(ValueError, match="post-GELU|uint4|int4 activations"):
        export_checkpoint(model, tmp_path / "x.safetensors", "nunchaku")  # Nunchaku runs ff.net.2 shifted unsigned


def test_nunchaku_export_of_a_default_quantduo_model(tmp_path):
    """A tiny FLUX calibrated with the defaults (post-GELU inputs shifted UINT4, the single block's proj_out split
    into its attention and MLP halves as deepcompressor does) exports to the Nunchaku single file, which loads back
    to the same outputs; nunchaku_lite, which holds neither, is refused."""
    model = tiny_flux(seed=6)
    float_out = run(copy.deepcopy(model))
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2),
                         quantization_config(model, **dict(FAST, search_tokens=32)), progress=False)
    split = model.single_transformer_blocks[0].proj_out
    assert (split.out_proj.act_format, split.mlp_fc2.act_format) == ("int4", "uint4")
    assert relative_error(run(model), float_out) < 0.2
    path = export_checkpoint(model, tmp_path / "svdq.safetensors", "nunchaku")
    loaded, report = load_published_transformer(path, dtype=torch.float32)
    assert report.layout == "nunchaku"
    assert relative_error(run(loaded), run(model.float())) < 5e-3  # lora_down stored with 1 / smooth folded in
    with pytest.raises(ValueError, match="uint4|split proj_out"):
        export_checkpoint(model, tmp_path / "lite", "nunchaku-lite")


def test_cli_export_and_refusals(published, tmp_path):
    path, model = published
    assert cli(["export", "--layout", "nunchaku", "--model", str(path), "--out", str(tmp_path / "o.safetensors"),
                "--dtype", "float32"]) == 0
    assert relative_error(run(load_published_transformer(tmp_path / "o.safetensors", dtype=torch.float32)[0]),
                          run(model)) < 1e-6
    with pytest.raises(ValueError, match="split proj_out|uint4"):  # lite has no split halves / shifted layers
        export_checkpoint(model, tmp_path / "lite", "nunchaku-lite")


def test_a_shift_other_than_nunchakus_is_refused(published, tmp_path):
    """Nunchaku adds 0.171875 to the inputs of its post-GELU layers: a layer holding another input-space shift is
    refused by name."""
    model = copy.deepcopy(published[1])
    with torch.no_grad():
        model.get_submodule("transformer_blocks.0.ff.net.2").act_shift.fill_(0.25)
    refusal = r"mlp_fc2: post-GELU layer with a shift other than Nunchaku's act_shift = 0.171875 \(it has 0.25 to"
    with pytest.raises(ValueError, match=refusal):
        export_checkpoint(model, tmp_path / "x.safetensors", "nunchaku")


def test_lora_on_the_split_proj_out(published):
    """A LoRA on the diffusers ``proj_out`` [N, attn + mlp] splits by input columns onto the two halves."""
    _, model = published
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 640, generator=g) * 0.05, torch.randn(128, 4, generator=g) * 0.05
    with_lora = copy.deepcopy(model)
    attach_lora(with_lora, {"single_transformer_blocks.0.proj_out.lora_A.weight": a,
                            "single_transformer_blocks.0.proj_out.lora_B.weight": b}, "split")
    x = torch.randn(2, 640, generator=g)
    name = "single_transformer_blocks.0.proj_out"
    with torch.no_grad():
        delta = with_lora.get_submodule(name)(x) - model.get_submodule(name)(x)
    assert relative_error(delta, x @ a.T @ b.T) < 1e-4


def test_nunchaku_metadata_is_what_merge_safetensors_writes(published, tmp_path):
    """Nunchaku's merge_safetensors writes ``config``, ``comfy_config``, ``model_class`` and ``quantization_config``;
    Nunchaku's FLUX loader reads ``quantization_config`` (transformer_flux.py) and V2 its ``rank`` (default 32)."""
    path, model = published
    out = export_checkpoint(model, tmp_path / "meta.safetensors", "nunchaku")
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["model_class"] == "NunchakuFluxTransformer2dModel"
    int4 = {"dtype": "int4", "scale_dtype": None, "group_size": 64}  # merge_safetensors' INT4 spelling
    assert json.loads(metadata["quantization_config"]) == {"method": "svdquant", "weight": int4, "activation": int4,
                                                           "rank": 16}
    assert json.loads(metadata["config"])["_class_name"] == "FluxTransformer2DModel"
    tiny = {"axes_dim": [8, 28, 28], "context_in_dim": 64, "depth": 1, "depth_single_blocks": 1, "guidance_embed": False,
            "hidden_size": 128, "in_channels": 4, "num_heads": 2, "out_channels": 4, "vec_in_dim": 64}
    assert json.loads(metadata["comfy_config"]) == {"model_class": "FluxSchnell",
                                                    "model_config": {**COMFY_FLUX_DEV["model_config"], **tiny}}
    reloaded, report = load_published_transformer(out, dtype=torch.float32)
    assert report.layout == "nunchaku" and relative_error(run(reloaded), run(model)) < 1e-6


# diffusers' FLUX.1-dev transformer config, and ComfyUI-nunchaku's nodes/models/configs/flux.1-dev.json
FLUX_DEV = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
            "guidance_embeds": True, "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24,
            "num_layers": 19, "num_single_layers": 38, "out_channels": None, "patch_size": 1,
            "pooled_projection_dim": 768}
COMFY_FLUX_DEV = {"model_class": "Flux", "model_config": {
    "axes_dim": [16, 56, 56], "context_in_dim": 4096, "depth": 19, "depth_single_blocks": 38,
    "disable_unet_model_creation": True, "guidance_embed": True, "hidden_size": 3072, "image_model": "flux",
    "in_channels": 16, "mlp_ratio": 4.0, "num_heads": 24, "out_channels": 16, "patch_size": 2, "qkv_bias": True,
    "theta": 10000, "vec_in_dim": 768}}


@pytest.mark.parametrize("diffusers_changes, comfy_class, comfy_changes", [
    ({}, "Flux", {}),
    ({"guidance_embeds": False}, "FluxSchnell", {"guidance_embed": False}),  # flux.1-schnell.json
    ({"in_channels": 384, "out_channels": 64}, "Flux", {"in_channels": 96}),  # FLUX.1-Fill-dev, flux.1-fill-dev.json
    ({"in_channels": 128, "out_channels": 64}, "Flux", {"in_channels": 32}),  # FLUX.1-Depth-dev
])
def test_comfy_config_of_the_published_flux_models(diffusers_changes, comfy_class, comfy_changes):
    assert comfy_config({**FLUX_DEV, **diffusers_changes}) == {
        "model_class": comfy_class, "model_config": {**COMFY_FLUX_DEV["model_config"], **comfy_changes}}
    assert comfy_config({**FLUX_DEV, "patch_size": 2}) is None  # not the 2x2 packing ComfyUI's Flux assumes


def test_every_exported_tensor_is_in_the_model_dtype(published, quantduo_flux, tmp_path):
    """deepcompressor writes every tensor in the weight dtype, AWQ biases included (nunchaku/utils.py,
    convert.py), and Nunchaku asserts it on load; only the integer codes differ (W4A4 int8, AWQ int32)."""
    bf16_published = load_published_transformer(published[0], dtype=torch.bfloat16)[0]
    single = read_checkpoint(export_checkpoint(bf16_published, tmp_path / "bf16.safetensors", "nunchaku")).tensors
    bf16_quantduo = copy.deepcopy(quantduo_flux[0]).to(torch.bfloat16)
    lite = read_checkpoint(export_checkpoint(bf16_quantduo, tmp_path / "lite", "nunchaku-lite")).tensors
    awq = ("norm1.linear.qweight", "norm1_context.linear.qweight", "norm.linear.qweight")
    for tensors in (single, lite):
        expected = {k: torch.int32 if k.endswith(awq) else torch.int8 if k.endswith(".qweight") else torch.bfloat16
                    for k in tensors}
        assert {k: v.dtype for k, v in tensors.items()} == expected


def _diffusers_lite_shapes(float_model, quant: dict) -> dict[str, tuple[int, ...]]:
    """The state dict shapes diffusers' nunchaku_lite quantizer requires (quantizers/nunchaku/utils.py): each target
    replaced by a layer built from the module's in / out features and bias presence — SVDQW4A4Linear: qweight
    [N, K/2], wscales [K/64, N], smooth_factor [K], proj_down [K, r], proj_up [N, r]; AWQW4A16Linear: qweight
    [N/4, K/2], wscales / wzeros [K/64, N]; bias [N] iff the module has one — every other key as the model's."""
    rank = quant["svdq_w4a4"]["rank"]
    layers = {"svdq_w4a4": lambda n, k: {"qweight": (n, k // 2), "wscales": (k // 64, n), "smooth_factor": (k,),
                                         "proj_down": (k, rank), "proj_up": (n, rank)},
              "awq_w4a16": lambda n, k: {"qweight": (n // 4, k // 2), "wscales": (k // 64, n), "wzeros": (k // 64, n)}}
    shapes, targets = {}, set()
    for op, tensors in layers.items():
        for target in quant[op]["targets"]:
            module = float_model.get_submodule(target)
            n, k = module.out_features, module.in_features
            shapes.update({f"{target}.{t}": s for t, s in tensors(n, k).items()})
            if module.bias is not None:
                shapes[f"{target}.bias"] = (n,)
            targets.add(target)
    shapes.update({k: tuple(v.shape) for k, v in float_model.state_dict().items() if k.rpartition(".")[0] not in targets})
    return shapes


def test_lite_targets_have_the_exact_shapes_diffusers_builds(quantduo_flux, tmp_path):
    model, float_model = quantduo_flux
    folder = export_checkpoint(model, tmp_path / "lite", "nunchaku-lite")
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    stored = read_checkpoint(folder).tensors
    assert {k: tuple(v.shape) for k, v in stored.items()} == _diffusers_lite_shapes(float_model, quant)
    assert "transformer_blocks.0.attn.to_q.bias" not in stored and "transformer_blocks.0.attn.to_k.bias" in stored
    assert "transformer_blocks.0.norm1.linear.bias" in stored


def test_lite_refuses_a_shape_the_kernels_would_need_padded():
    """nunchaku_lite has no room for padding (diffusers builds the module's exact shape), Nunchaku's kernels tile
    by 128 x 128: a clear error instead of a padded tensor diffusers would reject."""
    holder = torch.nn.ModuleDict({"proj": SVDQuantLinear(128, 192, rank=16, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match=r"proj: .*multiples of 128 / 128; this one is \[192, 128\]"):
        lite_state_dict(holder)


def test_lite_folder_loads_in_its_compute_dtype(quantduo_flux, tmp_path):
    """Without a dtype a nunchaku_lite folder loads in the ``compute_dtype`` its config names, as diffusers loads
    it (here float16, written into the exported config); an explicit dtype wins; an unknown one is refused."""
    folder = export_checkpoint(quantduo_flux[0], tmp_path / "lite", "nunchaku-lite")
    config_path = next(folder.rglob("config.json"))
    config = json.loads(config_path.read_text())
    config["quantization_config"]["compute_dtype"] = "float16"
    config_path.write_text(json.dumps(config))
    loaded, report = load_published_transformer(folder)
    assert report.dtype == torch.float16
    assert loaded.get_submodule("transformer_blocks.0.attn.to_k").wscales.dtype == torch.float16
    assert load_published_transformer(folder, dtype=torch.bfloat16)[1].dtype == torch.bfloat16
    config["quantization_config"]["compute_dtype"] = "float8"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="compute_dtype 'float8'"):
        load_published_transformer(folder)
