"""Export round trips: published file -> quantduo -> published file / lite folder -> quantduo computes the same; a
quantduo-calibrated (signed) model exports to nunchaku_lite and loads back to the same outputs; what a layout cannot
hold is refused by name. Plus a LoRA on the split single-block proj_out."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import FAST, flux_inputs, samples_from, tiny_flux  # noqa: E402
from tests.integrations.published.flux_files import flux_checkpoint, round_to_bf16, save_single_file  # noqa: E402

from quantduo.cli import main as cli  # noqa: E402
from quantduo.integrations.diffusers import quantization_config, quantize_transformer  # noqa: E402
from quantduo.integrations.lora import attach_lora  # noqa: E402
from quantduo.integrations.published import export_checkpoint, load_published_transformer, read_checkpoint  # noqa: E402
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


def test_lite_round_trip_of_a_quantduo_model(tmp_path):
    """A quantduo-calibrated FLUX (signed activations everywhere) -> nunchaku_lite -> the same outputs."""
    model = tiny_flux(seed=5)
    cfg = quantization_config(model, unsigned_act=[], **dict(FAST, search_tokens=32))
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2), cfg, progress=False)
    folder = export_checkpoint(model, tmp_path / "lite", "nunchaku-lite")
    loaded, report = load_published_transformer(folder, dtype=torch.bfloat16)
    assert report.layout == "nunchaku-lite"
    name = "transformer_blocks.0.attn.to_q"
    for buf in ("qweight", "wscales", "smooth_factor", "proj_up", "bias"):
        assert torch.equal(getattr(loaded.get_submodule(name), buf), getattr(model.get_submodule(name), buf)), buf
    # the one rounding: the layout stores the down-projection with 1 / smooth folded in, in 16 bits
    assert relative_error(run(loaded.float()), run(model.float())) < 5e-3
    with pytest.raises(ValueError, match="post-GELU|uint4|int4 activations"):
        export_checkpoint(model, tmp_path / "x.safetensors", "nunchaku")  # Nunchaku runs ff.net.2 shifted unsigned


def test_cli_export_and_refusals(published, tmp_path):
    path, model = published
    assert cli(["export", "--layout", "nunchaku", "--model", str(path), "--out", str(tmp_path / "o.safetensors"),
                "--dtype", "float32"]) == 0
    assert relative_error(run(load_published_transformer(tmp_path / "o.safetensors", dtype=torch.float32)[0]),
                          run(model)) < 1e-6
    with pytest.raises(ValueError, match="split proj_out|uint4"):  # lite has no split halves / shifted layers
        export_checkpoint(model, tmp_path / "lite", "nunchaku-lite")


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
