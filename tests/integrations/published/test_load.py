"""Published FLUX checkpoints (Nunchaku single file, V2 names, nunchaku_lite folders) load with zero unmapped /
missing keys and compute what Nunchaku computes: every layer and the whole transformer vs the re-statement of
:mod:`tests.integrations.published.packer`, float32; wrong names, a dropped shift or permuted tiles do not match."""
from __future__ import annotations

import json

import pytest
import torch
from torch._dynamo.utils import counters
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import flux_inputs, tiny_flux  # noqa: E402
from tests.integrations.published.flux_files import (flux_checkpoint, lite_folder, round_to_bf16,  # noqa: E402
                                                     save_single_file, to_v2)
from tests.integrations.published.packer import SHIFT, fake_quant  # noqa: E402

from quantduo.integrations.diffusers import FusedFluxSingleBlock, enable_fusions  # noqa: E402
from quantduo.integrations.published import group_keys, load_published_transformer, read_checkpoint  # noqa: E402
from quantduo.integrations.published.build import _w4a4_layer  # noqa: E402
from quantduo.formats import nunchaku as nk  # noqa: E402
from quantduo.svdquant import (CheckpointError, SVDQuantConfig, SVDQuantLinear, load_quantized,  # noqa: E402
                               save_quantized, set_execution)
from quantduo.svdquant.serialization import replace_linears  # noqa: E402
from quantduo.svdquant.split import SplitProjOut  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

EXACT = 1e-6


@pytest.fixture(scope="module")
def base():
    return round_to_bf16(tiny_flux(seed=1).float())


@pytest.fixture(scope="module")
def checkpoint(base):
    return flux_checkpoint(base, rank=16, seed=0)


@pytest.fixture(scope="module")
def single_file(checkpoint, base, tmp_path_factory):
    return save_single_file(checkpoint[0], tmp_path_factory.mktemp("svdq") / "svdq-int4_r16-tiny.safetensors", base)


@pytest.fixture(scope="module")
def loaded(single_file):
    return load_published_transformer(single_file, dtype=torch.float32)


def run(model, seed=3):
    with torch.no_grad():
        return model(**flux_inputs(model, seed))[0]


def layer_input(width: int, post_gelu: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 24, width, generator=torch.Generator().manual_seed(seed)) * 2
    return torch.nn.functional.gelu(x, approximate="tanh") if post_gelu else x


def quantized_input(model, name: str) -> torch.Tensor:
    """An input for the quantized module ``name``: post-GELU for the MLP outputs; for the single block's
    ``proj_out``, the attention half signed and the MLP half post-GELU."""
    post_gelu = name.endswith(("net.2", "proj_out"))
    x = layer_input(model.get_submodule(name).in_features, post_gelu)
    if name.endswith("proj_out"):
        x = torch.cat([layer_input(128, False, 1), x[..., 128:]], dim=-1)
    return x


def test_every_key_is_mapped_and_every_tensor_provided(loaded, single_file):
    model, report = loaded
    grouped = group_keys(read_checkpoint(single_file))
    assert report.layout == "nunchaku" and grouped.unmapped == []
    assert sum(len(m.keys) for m in grouped.modules) + len(grouped.plain) == len(read_checkpoint(single_file).tensors)
    assert set(grouped.plain) <= set(model.state_dict()) and not [n for n, t in model.state_dict().items() if t.is_meta]
    assert len(report.quantized) == 20  # double: 6 q/k/v, 6 more W4A4, 2 AWQ; single: 3 q/k/v, proj_mlp, proj_out, AWQ
    assert isinstance(model.single_transformer_blocks[0].proj_out, SplitProjOut)
    assert model.get_submodule("transformer_blocks.0.ff.net.2").act_format == "uint4"
    assert model.get_submodule("single_transformer_blocks.0.proj_out.mlp_fc2").act_format == "uint4"
    assert model.get_submodule("transformer_blocks.0.attn.to_out.0").act_format == "int4"
    assert model.get_submodule("transformer_blocks.0.norm1.linear").act_format == "none"


QUANTIZED = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.add_k_proj",
             "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_add_out",
             "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2",
             "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp",
             "single_transformer_blocks.0.proj_out"]


@pytest.mark.parametrize("name", QUANTIZED)
def test_each_layer_matches_nunchaku_semantics(loaded, checkpoint, name):
    model, ref = loaded[0], checkpoint[1]
    x = quantized_input(model, name)
    with torch.no_grad():
        assert relative_error(model.get_submodule(name)(x), ref.get_submodule(name)(x)) < EXACT


@pytest.mark.parametrize("name", ["transformer_blocks.0.norm1", "transformer_blocks.0.norm1_context",
                                  "single_transformer_blocks.0.norm"])
def test_modulation_matches_nunchaku_interleaved_layout(loaded, checkpoint, name):
    """AWQ modulation (interleaved rows, +1 in the bias) -> diffusers' chunk order and (1 + scale)."""
    model, ref = loaded[0], checkpoint[1]
    x, emb = layer_input(128, False, 2)[:1], layer_input(128, False, 3)[0, :1]
    with torch.no_grad():
        ours, theirs = model.get_submodule(name)(x, emb=emb), ref.get_submodule(name)(x, emb=emb)
    for a, b in zip(ours, theirs):
        assert relative_error(a, b) < EXACT


def test_whole_transformer_matches_nunchaku_end_to_end(loaded, checkpoint, base):
    model, ref = loaded[0], checkpoint[1]
    y = run(model)
    assert relative_error(y, run(ref)) < 1e-5
    assert relative_error(y, run(base)) < 0.05  # and it is a good quantization of the float model


def test_v2_names_and_lite_folders_load_to_the_same_semantics(checkpoint, base, loaded, tmp_path):
    v2 = save_single_file(to_v2(checkpoint[0]), tmp_path / "v2.safetensors", base)
    model, report = load_published_transformer(v2, dtype=torch.float32)
    assert report.layout == "nunchaku-v2" and torch.equal(run(model), run(loaded[0]))
    folder, ref = lite_folder(base, tmp_path / "lite", rank=16)
    model, report = load_published_transformer(folder, dtype=torch.float32)
    assert report.layout == "nunchaku-lite"
    assert model.get_submodule("transformer_blocks.0.ff.net.2").act_format == "int4"  # lite: signed everywhere
    assert isinstance(model.get_submodule("single_transformer_blocks.0.proj_out"), SVDQuantLinear)
    assert relative_error(run(model), run(ref)) < 1e-5


def test_dropping_the_shift_does_not_match(single_file, checkpoint):
    """The post-GELU layers run as signed INT4 without the shift: far from Nunchaku (the reader must not)."""
    stored = {k.rsplit(".", 1)[1]: v for k, v in read_checkpoint(single_file).tensors.items()
              if k.startswith("transformer_blocks.0.mlp_fc2.")}
    parts = nk.decode_w4a4("mlp_fc2", stored)
    right = _w4a4_layer(parts, slice(0, 128), 512, True, torch.float32)
    wrong = _w4a4_layer(parts, slice(0, 128), 512, False, torch.float32)
    x = layer_input(512, True)
    ref = checkpoint[2]["transformer_blocks.0.mlp_fc2"](x)
    with torch.no_grad():
        assert relative_error(right(x), ref) < EXACT
        assert relative_error(wrong(x), ref) > 1e-2
    # the re-statement itself: the shift and unsigned range matter
    assert relative_error(fake_quant(x + SHIFT, True) - SHIFT, x) < relative_error(fake_quant(x, False), x)


def test_post_gelu_layers_hold_nunchakus_shift_itself(loaded, single_file):
    """``act_shift`` is the input-space shift: Nunchaku's 0.171875 on every channel of the post-GELU layers (exact in
    16 bits: a bf16 layer holds it as is), zeros on the signed ones."""
    model = loaded[0]
    for name in ("transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.2",
                 "single_transformer_blocks.0.proj_out.mlp_fc2"):
        layer = model.get_submodule(name)
        assert layer.act_format == "uint4" and torch.equal(layer.act_shift, torch.full_like(layer.act_shift, SHIFT))
    assert not model.get_submodule("transformer_blocks.0.attn.to_out.0").act_shift.any()
    stored = {k.rsplit(".", 1)[1]: v for k, v in read_checkpoint(single_file).tensors.items()
              if k.startswith("transformer_blocks.0.mlp_fc2.")}
    bf16 = _w4a4_layer(nk.decode_w4a4("mlp_fc2", stored), slice(0, 128), 512, True, torch.bfloat16)
    assert bf16.act_shift.dtype == torch.bfloat16 and bool((bf16.act_shift.float() == 0.171875).all())


def test_permuted_tiles_or_a_wrong_name_do_not_load_the_same(checkpoint, base, loaded, tmp_path):
    tensors = dict(checkpoint[0])
    key = "transformer_blocks.0.qkv_proj.qweight"
    q = tensors[key]
    tensors[key] = q.reshape(q.shape[0], -1, 4)[:, :, [1, 0, 2, 3]].reshape(q.shape)  # swap two k-lanes' words
    model, _ = load_published_transformer(save_single_file(tensors, tmp_path / "perm.safetensors", base),
                                          dtype=torch.float32)
    assert relative_error(run(model), run(loaded[0])) > 1e-3
    renamed = {k.replace(".mlp_context_fc2.", ".mlp_ctx_fc2."): v for k, v in checkpoint[0].items()}
    with pytest.raises(CheckpointError, match=r"map to nothing.*mlp_ctx_fc2\.qweight"):
        load_published_transformer(save_single_file(renamed, tmp_path / "renamed.safetensors", base))


def test_bad_inputs_fail_before_anything_reaches_the_device(checkpoint, base, single_file, tmp_path):
    """Every error is a CheckpointError raised before the model is moved (device 'cuda' is never reached)."""
    def fails(source, match, **kw):
        with pytest.raises(CheckpointError, match=match):
            load_published_transformer(source, device="cuda", **kw)

    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "unknown.safetensors"))
    fails(tmp_path / "unknown.safetensors", "unknown checkpoint layout")
    data = single_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    fails(tmp_path / "cut.safetensors", "truncated")
    low_rank = dict(checkpoint[0])
    low_rank["transformer_blocks.0.out_proj.lora_up"] = torch.zeros(128, 8, dtype=torch.bfloat16)
    low_rank["transformer_blocks.0.out_proj.lora_down"] = torch.zeros(128, 8, dtype=torch.bfloat16)
    fails(save_single_file(low_rank, tmp_path / "r8.safetensors", base), "rank 8")
    group = dict(checkpoint[0])
    group["transformer_blocks.0.out_proj.wscales"] = torch.ones(4, 128, dtype=torch.bfloat16)
    fails(save_single_file(group, tmp_path / "g32.safetensors", base), "group size 32")
    other = tiny_flux(seed=1)
    other.register_to_config(num_attention_heads=3)
    fails(save_single_file(checkpoint[0], tmp_path / "cfg.safetensors", other), "another model")
    sd3 = save_single_file(checkpoint[0], tmp_path / "sd3.safetensors")
    fails(sd3, "no model config")
    meta = json.dumps({"_class_name": "SD3Transformer2DModel"})
    save_file({k: v.contiguous() for k, v in checkpoint[0].items()}, str(tmp_path / "sd3b.safetensors"),
         metadata={"config": meta})
    fails(tmp_path / "sd3b.safetensors", "FluxTransformer2DModel|SD3")
    missing = {k: v for k, v in checkpoint[0].items() if not k.startswith("x_embedder.")}
    fails(save_single_file(missing, tmp_path / "missing.safetensors", base), r"in neither the checkpoint: \['x_embedder\.weight', 'x_embedder\.bias'\]")


def test_base_folder_provides_config_and_missing_tensors(checkpoint, base, loaded, tmp_path):
    base.save_pretrained(tmp_path / "base" / "transformer")
    (tmp_path / "base" / "model_index.json").write_text("{}")
    blocks_only = {k: v for k, v in checkpoint[0].items() if k.startswith(("transformer_blocks", "single_transformer"))}
    model, report = load_published_transformer(save_single_file(blocks_only, tmp_path / "blocks.safetensors"),
                                               base=tmp_path / "base", dtype=torch.float32)
    assert "x_embedder.weight" in report.from_base and "transformer_blocks.0.attn.norm_q.weight" in report.plain
    assert torch.equal(run(model), run(loaded[0]))


def test_fp8_a16_and_fused_single_block_run_the_loaded_model(loaded, checkpoint):
    """Other executions approximate the exact semantics; the fused single block composes with the split proj_out."""
    import copy

    model = copy.deepcopy(loaded[0])
    exact = run(model)
    fused = enable_fusions(model)
    assert isinstance(model.single_transformer_blocks[0], FusedFluxSingleBlock) and fused
    assert relative_error(run(model), exact) < 1e-6
    for execution in ("a16", "fp8"):
        set_execution(model, execution)
        assert relative_error(run(model), exact) < 0.05, execution


def test_loaded_model_compiles_to_one_graph(single_file):
    """The loader computes every layer's derived state on the target device, so ``torch.compile`` of a freshly
    loaded transformer traces one graph with no break and gives the eager output."""
    model, _ = load_published_transformer(single_file, dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(model, backend="eager"))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert relative_error(compiled, run(model)) < 1e-6


def test_a_loaded_published_model_round_trips_through_quantduo_format(loaded, tmp_path):
    """quantduo's format stores the split proj_out as its two halves: a float skeleton of the same model loads the
    folder back into a SplitProjOut and computes bit for bit what the published model computes."""
    save_quantized(loaded[0], tmp_path / "out", SVDQuantConfig(dtype="float32"))
    specs = json.loads((tmp_path / "out" / "quantduo_config.json").read_text())["layers"]
    assert {"single_transformer_blocks.0.proj_out.out_proj", "single_transformer_blocks.0.proj_out.mlp_fc2"} <= set(
        specs) and "single_transformer_blocks.0.proj_out" not in specs
    skeleton = tiny_flux(seed=7).float()
    load_quantized(skeleton, tmp_path / "out")
    split = skeleton.single_transformer_blocks[0].proj_out
    assert isinstance(split, SplitProjOut) and split.mlp_fc2.act_format == "uint4"
    assert torch.equal(run(skeleton), run(loaded[0]))


def test_a_checkpoint_with_half_a_split_layer_is_refused(loaded, tmp_path):
    """One stored half of a split layer, or halves whose widths do not add up to the model's layer: errors naming
    it, before any tensor is read."""
    save_quantized(loaded[0], tmp_path / "out", SVDQuantConfig(dtype="float32"))
    meta = json.loads((tmp_path / "out" / "quantduo_config.json").read_text())
    name = "single_transformer_blocks.0.proj_out"
    half = {k: v for k, v in meta["layers"].items() if k != f"{name}.mlp_fc2"}
    with pytest.raises(CheckpointError, match=f"one half of the split layer '{name}'"):
        replace_linears(tiny_flux(seed=7).float(), half, torch.float32)
    wide = {**meta["layers"], f"{name}.out_proj": {**meta["layers"][f"{name}.out_proj"], "in_features": 192}}
    with pytest.raises(CheckpointError, match=f"splits '{name}' into 192 \\+ 512 inputs but the model's has 640"):
        replace_linears(tiny_flux(seed=7).float(), wide, torch.float32)


def test_a_file_without_lowrank_pairs_loads_as_rank_0(base, tmp_path):
    """deepcompressor writes no lora_down / lora_up for a layer without a low-rank branch and Nunchaku loads it as
    rank 0: the loaded model computes ``Q(x / smooth) @ R^T + bias``, with no low-rank term; half a pair is an
    error naming the layer."""
    tensors, ref, _ = flux_checkpoint(base, rank=0, seed=0)
    assert not [k for k in tensors if ".lora_" in k]
    model, _ = load_published_transformer(save_single_file(tensors, tmp_path / "r0.safetensors", base),
                                          dtype=torch.float32)
    layers = [m for m in model.modules() if isinstance(m, SVDQuantLinear) and m.act_format != "none"]
    assert len(layers) == 18 and all(m.rank == 0 for m in layers)  # 12 double-block, 6 single-block W4A4
    for name in QUANTIZED:
        x = quantized_input(model, name)
        with torch.no_grad():
            assert relative_error(model.get_submodule(name)(x), ref.get_submodule(name)(x)) < EXACT, name
    assert relative_error(run(model), run(ref)) < 1e-5
    half = {**tensors, "transformer_blocks.0.mlp_fc1.lora_up": torch.zeros(512, 16, dtype=torch.bfloat16)}
    with pytest.raises(CheckpointError, match=r"'transformer_blocks\.0\.mlp_fc1' lacks \['lora_down'\]"):
        load_published_transformer(save_single_file(half, tmp_path / "half.safetensors", base))


@pytest.mark.parametrize("prefix, name", [("transformer_blocks.0.out_proj", "transformer_blocks.0.attn.to_out.0"),
                                          ("transformer_blocks.0.out_proj_context", "transformer_blocks.0.attn.to_add_out")])
def test_smooth_orig_is_a_record_the_layer_never_divides_by(single_file, checkpoint, loaded, prefix, name):
    """deepcompressor's out_proj files: smoothing fused into the layer before, ``smooth`` = 1, ``smooth_orig`` the
    calibration's factors, lora_down not divided by them. The kernels divide by ``smooth``: the loaded layer
    computes ``Q(x / smooth) @ R^T + x @ lora_down @ lora_up^T + bias``; one built from smooth_orig does not."""
    stored = {k.rsplit(".", 1)[1]: v for k, v in read_checkpoint(single_file).tensors.items()
              if k.startswith(prefix + ".")}
    assert torch.equal(stored["smooth"], torch.ones_like(stored["smooth"])) and (stored["smooth_orig"] != 1).all()
    x = layer_input(128, False)
    reference = checkpoint[2][prefix](x)
    with torch.no_grad():
        assert relative_error(loaded[0].get_submodule(name)(x), reference) < EXACT
        wrong = _w4a4_layer(nk.decode_w4a4(prefix, {**stored, "smooth": stored["smooth_orig"]}), slice(0, 128), 128,
                            False, torch.float32)
        assert relative_error(wrong(x), reference) > 1e-2
