"""Published NVFP4 FLUX checkpoints (Blackwell files: fp8 ``wscales`` per 16, ``wcscales``, ``wtscale``) load with
zero unmapped / missing keys and compute what Nunchaku computes (:class:`~tests.integrations.published.packer.
Nvfp4Layer`, float32); a scale applied wrongly, permuted scale tiles or quantduo's own two-level NVFP4 activations
do not match."""
from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import tiny_flux  # noqa: E402
from tests.integrations.published.flux_files import (flux_checkpoint, lite_folder, round_to_bf16,  # noqa: E402
                                                     save_single_file, to_v2)
from tests.integrations.published.test_load import EXACT, QUANTIZED, quantized_input, run  # noqa: E402

from quantduo.integrations.published import group_keys, load_published_transformer, read_checkpoint  # noqa: E402
from quantduo.svdquant import CheckpointError, SVDQuantLinear, set_execution  # noqa: E402
from quantduo.svdquant.serialization import layer_specs  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402


@pytest.fixture(scope="module")
def base():
    return round_to_bf16(tiny_flux(seed=1).float())


@pytest.fixture(scope="module")
def checkpoint(base):
    return flux_checkpoint(base, rank=16, seed=0, precision="nvfp4")


@pytest.fixture(scope="module")
def single_file(checkpoint, base, tmp_path_factory):
    return save_single_file(checkpoint[0], tmp_path_factory.mktemp("svdq") / "svdq-fp4_r16-tiny.safetensors", base)


@pytest.fixture(scope="module")
def loaded(single_file):
    return load_published_transformer(single_file, dtype=torch.float32)


def test_every_key_is_mapped_and_layers_are_nunchaku_nvfp4(loaded, single_file, checkpoint):
    model, report = loaded
    ckpt = read_checkpoint(single_file)
    grouped = group_keys(ckpt)
    assert report.layout == "nunchaku" and grouped.unmapped == []
    assert sum(len(m.keys) for m in grouped.modules) + len(grouped.plain) == len(ckpt.tensors)
    assert not [n for n, t in model.state_dict().items() if t.is_meta]
    assert any(k.endswith("qkv_proj.wcscales") for k in ckpt.tensors) and any(k.endswith("wtscale") for k in ckpt.tensors)
    fc2 = model.get_submodule("transformer_blocks.0.ff.net.2")
    assert (fc2.weight_format, fc2.act_format) == ("nvfp4", "nvfp4_nunchaku") and not fc2.act_shift.any()
    to_k = model.get_submodule("transformer_blocks.0.attn.to_k")  # fused q/k/v: per-channel scales, rows 128..255
    assert torch.equal(to_k.wscale_channel, checkpoint[2]["transformer_blocks.0.qkv_proj"].wcscales[128:256])
    out = model.get_submodule("transformer_blocks.0.attn.to_out.0")
    assert float(out.wscale_global) == checkpoint[2]["transformer_blocks.0.out_proj"].wtscale != 1.0
    assert model.get_submodule("transformer_blocks.0.norm1.linear").act_format == "none"  # AWQ stays INT4


@pytest.mark.parametrize("name", QUANTIZED)
def test_each_layer_matches_nunchaku_nvfp4_semantics(loaded, checkpoint, name):
    model, ref = loaded[0], checkpoint[1]
    x = quantized_input(model, name)
    with torch.no_grad():
        assert relative_error(model.get_submodule(name)(x), ref.get_submodule(name)(x)) < EXACT


def test_whole_transformer_matches_nunchaku_end_to_end(loaded, checkpoint, base):
    model, ref = loaded[0], checkpoint[1]
    y = run(model)
    assert relative_error(y, run(ref)) < 1e-5
    assert relative_error(y, run(base)) < 0.05


@pytest.mark.parametrize("change", ["channel scale", "tensor scale", "two-level activations"])
def test_a_scale_applied_wrongly_does_not_match(loaded, checkpoint, change):
    name = "transformer_blocks.0.attn.to_q" if change == "channel scale" else "transformer_blocks.0.attn.to_out.0"
    layer = copy.deepcopy(loaded[0].get_submodule(name))
    with torch.no_grad():
        if change == "channel scale":
            layer.wscale_channel.fill_(1.0)
        elif change == "tensor scale":
            layer.wscale_global.fill_(1.0)
        else:
            layer.act_format = "nvfp4"  # quantduo's own NVFP4: tensor scale, codes from the fp8 scale
        x = quantized_input(loaded[0], name)
        assert relative_error(layer(x), checkpoint[1].get_submodule(name)(x)) > 1e-4


def test_permuted_scale_tiles_do_not_load_the_same(checkpoint, base, loaded, tmp_path):
    tensors = dict(checkpoint[0])
    key = "transformer_blocks.0.qkv_proj.wscales"  # [K/16, N] fp8: swap two lanes' 4-scale words
    w = tensors[key].view(torch.uint8).reshape(-1, 4)
    tensors[key] = w[torch.arange(w.shape[0]) ^ 1].reshape(tensors[key].shape).view(torch.float8_e4m3fn)
    model, _ = load_published_transformer(save_single_file(tensors, tmp_path / "perm.safetensors", base),
                                          dtype=torch.float32)
    assert relative_error(run(model), run(loaded[0])) > 1e-3
    wc = dict(checkpoint[0])
    key = "transformer_blocks.0.qkv_proj.wcscales"
    wc[key] = wc[key].reshape(-1, 2).flip(-1).reshape(-1)  # the per-128 swizzle's pairs swapped
    model, _ = load_published_transformer(save_single_file(wc, tmp_path / "wc.safetensors", base), dtype=torch.float32)
    assert relative_error(run(model), run(loaded[0])) > 1e-4


def test_v2_names_and_lite_folders(checkpoint, base, loaded, tmp_path):
    v2 = save_single_file(to_v2(checkpoint[0]), tmp_path / "v2.safetensors", base)
    model, report = load_published_transformer(v2, dtype=torch.float32)
    assert report.layout == "nunchaku-v2" and torch.equal(run(model), run(loaded[0]))
    folder, ref = lite_folder(base, tmp_path / "lite", rank=16, precision="nvfp4")
    model, report = load_published_transformer(folder, dtype=torch.float32)
    assert report.layout == "nunchaku-lite"
    assert model.get_submodule("transformer_blocks.0.ff.net.2").act_format == "nvfp4_nunchaku"
    assert relative_error(run(model), run(ref)) < 1e-5
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["svdq_w4a4"].update(precision="int4", group_size=64)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="says svdq_w4a4 precision 'int4', but its wscales are torch.float8_e4m3fn"):
        load_published_transformer(folder)
    config["quantization_config"]["svdq_w4a4"].update(precision="nvfp4", group_size=64)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"precision 'nvfp4' and group size 64 is not supported"):
        load_published_transformer(folder)


def test_a16_runs_and_the_state_dict_round_trips(loaded):
    model = copy.deepcopy(loaded[0])
    exact = run(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, SVDQuantLinear)}
    for name, layer in layers.items():  # layer by layer: the split proj_out has no model-level spec
        (spec,) = layer_specs(layer).values()
        again = SVDQuantLinear(**spec, dtype=torch.float32)
        again.load_state_dict(layer.state_dict(), strict=True)
        x = quantized_input(model, name)
        with torch.no_grad():
            assert torch.equal(again(x), layer(x)), name
    set_execution(model, "a16")
    assert relative_error(run(model), exact) < 0.05
