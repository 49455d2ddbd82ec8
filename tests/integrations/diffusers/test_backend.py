"""quantduo as a diffusers quantizer backend: ``save_pretrained`` / ``from_pretrained`` of a quantized denoiser,
config validation, corruption."""
from __future__ import annotations

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantduo.integrations.diffusers import (QuantDuoConfig, QuantizationConfigError, enable_fusions, mark_quantized,
                                             quantduo_config_for, quantization_config, quantize_transformer)
from quantduo import __version__
from quantduo.integrations.diffusers.backend import DIGEST_KEY, state_digest
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant.split import SplitProjOut
from quantduo.utils import relative_error

from .tiny_models import FAST, flux_inputs, samples_from, tiny_flux
from .tiny_zoo import tiny_wan

LAYER = dict(in_features=128, out_features=128, rank=16, bias=True, weight_format="int4", act_format="int4",
             group_size=64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(quantized tiny FLUX, its save_pretrained folder, inputs, its output in the reference execution, with the
    fusions that loading applies)."""
    model = tiny_flux()
    config = quantization_config(model, smooth=False, dtype="float32", **FAST)
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2), config, progress=False)
    folder = tmp_path_factory.mktemp("flux") / "transformer"
    mark_quantized(model, quantduo_config_for(config, execution="reference"))
    model.save_pretrained(folder)
    enable_fusions(model)
    inputs = flux_inputs(model, 7)
    with torch.no_grad():
        out = model(**inputs)[0]
    return model, folder, inputs, out


def test_round_trip_is_bit_identical(saved):
    model, folder, inputs, out = saved
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "quantduo" and config["execution"] == "reference"
    assert set(config["layers"]) == {n for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)}
    loaded = diffusers.FluxTransformer2DModel.from_pretrained(folder, dtype=torch.float32)
    layers = [m for m in loaded.modules() if isinstance(m, SVDQuantLinear)]
    assert len(layers) == len(config["layers"]) and all(m.execution == "reference" for m in layers)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert isinstance(loaded.single_transformer_blocks[0].proj_out, SplitProjOut)  # stored as its two halves
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_quantization_config_argument_and_execution(saved):
    """``from_pretrained(dir, quantization_config=QuantDuoConfig(...))`` loads the same checkpoint (the folder's
    config wins, as for every diffusers backend); the loaded model's layers can then run another execution."""
    _, folder, inputs, out = saved
    with pytest.warns(UserWarning, match="quantization_config"):
        loaded = diffusers.FluxTransformer2DModel.from_pretrained(
            folder, dtype=torch.float32, quantization_config=QuantDuoConfig(execution="a16"))
    with torch.no_grad():
        assert torch.equal(loaded(**inputs)[0], out)


def test_unquantized_folder_is_refused(tmp_path):
    tiny_flux().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        diffusers.FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=QuantDuoConfig(layers={}))


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(format="int3"), "format"),
    (lambda c: c.update(execution="fast"), "execution"),
    (lambda c: c.update(colour="red"), "colour"),
    (lambda c: c.update(rank=-1), "rank"),
    (lambda c: c["layers"][next(iter(c["layers"]))].pop("rank"), "missing"),
    (lambda c: c["layers"][next(iter(c["layers"]))].update(bias="yes"), "bias"),
    (lambda c: c["layers"].update({"transformer_blocks.0.nothing": dict(LAYER)}), "nothing"),
    (lambda c: c["layers"][next(iter(c["layers"]))].update(out_features=64), "64x"),
    (lambda c: c.update(quantduo_version="latest"), "quantduo_version"),
])
def test_malformed_config_is_named(saved, tmp_path, edit, field):
    """A quantization_config edited by hand fails with an error naming the field (or layer) before any weight is
    loaded."""
    _, folder, _, _ = saved
    broken = tmp_path / "transformer"
    broken.mkdir()
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (broken / "config.json").write_text(json.dumps(config))
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=field):
        diffusers.FluxTransformer2DModel.from_pretrained(broken)


def test_folder_of_quantduo_before_0_3_loads_with_the_input_space_shift(saved, tmp_path):
    """A folder written by quantduo < 0.3.0 (``quantduo_version`` 0.2.0; each ``act_shift`` in the smoothed space:
    the input shift / ``smooth_factor``) loads to the input-space shift and the same outputs; saved again it records
    this version, and reloads unchanged (not converted twice)."""
    model, folder, inputs, out = saved
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["quantduo_version"] = "0.2.0"
    (old / "config.json").write_text(json.dumps(config))
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    shifted = [k for k in state if k.endswith(".act_shift") and state[k].any()]
    assert shifted  # the post-GELU layers
    for key in [k for k in state if k.endswith(".act_shift")]:
        smooth = state[key.removesuffix("act_shift") + "smooth_factor"]
        state[key] = (state[key].float() / smooth.float()).to(state[key].dtype)
    save_file(state, str(old / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt", DIGEST_KEY: state_digest(state)})
    loaded = diffusers.FluxTransformer2DModel.from_pretrained(old, dtype=torch.float32)
    for key in shifted:
        torch.testing.assert_close(loaded.state_dict()[key], model.state_dict()[key], rtol=1e-6, atol=0)
    with torch.no_grad():
        y = loaded(**inputs)[0]
    assert relative_error(y, out) < 1e-5
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["quantduo_version"] \
        == __version__
    again = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "again", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(**inputs)[0], y)


def test_digest_covers_every_tensor(saved, tmp_path):
    """A flipped byte anywhere in the tensor data, or a file without quantduo's digest, is refused."""
    from safetensors import safe_open

    _, folder, _, _ = saved
    weights = folder / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        assert len(f.metadata()[DIGEST_KEY]) == 64
    copy = tmp_path / "transformer"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    save_file(load_file(str(weights)), str(copy / weights.name))  # the same tensors, no digest
    with pytest.raises(QuantizationConfigError, match="records no"):
        diffusers.FluxTransformer2DModel.from_pretrained(copy)


def test_safetensors_metadata_in_sorted_order(tmp_path):
    """safetensors writes metadata keys in hash-map order (it varies between saves); after
    sort_safetensors_metadata the same tensors and metadata always give the same bytes, and the file reads back."""
    from safetensors import safe_open

    from quantduo.integrations.diffusers.backend import sort_safetensors_metadata

    contents = set()
    for i in range(6):
        path = tmp_path / f"{i}.safetensors"
        save_file({"w": torch.arange(6.0)}, str(path), metadata={"format": "pt", DIGEST_KEY: "0" * 64})
        sort_safetensors_metadata(path)
        contents.add(path.read_bytes())
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt", DIGEST_KEY: "0" * 64}
        assert torch.equal(load_file(str(path))["w"], torch.arange(6.0))
    assert len(contents) == 1
    assert next(iter(contents)).find(b'"format"') < next(iter(contents)).find(DIGEST_KEY.encode())


def test_keep_in_fp32_modules_stay_float32(tmp_path):
    """A class with ``_keep_in_fp32_modules`` (Wan: RoPE, time embedder, modulation tables, norms) loads them in
    float32 when quantized, as diffusers loads the unquantized model in bf16: every tensor outside the quantized
    layers has the dtype of the plain bf16 load."""
    model, inputs = tiny_wan()
    model.save_pretrained(tmp_path / "plain")
    plain = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    config = quantization_config(model, **FAST)
    quantize_transformer(model, samples_from(inputs, 1), config, progress=False)
    mark_quantized(model, quantduo_config_for(config))
    model.save_pretrained(tmp_path / "quantized")
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path / "quantized", dtype=torch.bfloat16)
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, SVDQuantLinear)}
    dtypes = {n: t.dtype for n, t in loaded.state_dict().items() if n.rpartition(".")[0] not in quantized}
    assert torch.float32 in dtypes.values()
    assert dtypes == {n: plain.state_dict()[n].dtype for n in dtypes}
