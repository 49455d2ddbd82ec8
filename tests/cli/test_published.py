"""``quantduo generate --model <published checkpoint> --base <pipeline folder>`` on a tiny FLUX pipeline: the Nunchaku
single file, its V2 renaming and a nunchaku_lite folder generate; the file's images match the base model closely."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import tiny_flux_pipeline  # noqa: E402
from tests.integrations.published.flux_files import (flux_checkpoint, lite_folder, round_to_bf16,  # noqa: E402
                                                     save_single_file, to_v2)

from quantduo.cli import main as cli  # noqa: E402

SIZE = ["--height", "32", "--width", "32", "--max-sequence-length", "16", "--guidance", "3.5", "--dtype", "float32",
        "--steps", "2", "--seed", "3", "--prompt", "a dog in a park", "--device", "cpu"]


def test_generate_from_published_layouts(capsys, tmp_path):
    from PIL import Image

    pipe = tiny_flux_pipeline(seed=2)
    round_to_bf16(pipe.transformer.float())
    pipe.save_pretrained(tmp_path / "base")
    tensors, _, _ = flux_checkpoint(pipe.transformer, rank=16)
    sources = {"file": save_single_file(tensors, tmp_path / "svdq.safetensors"),  # no config: the base's
               "v2": save_single_file(to_v2(tensors), tmp_path / "v2.safetensors", pipe.transformer),
               "lite": lite_folder(pipe.transformer, tmp_path / "lite")[0]}
    images = {}
    for name, model in [("base", tmp_path / "base"), *sources.items()]:
        out = tmp_path / f"{name}.png"
        extra = [] if name == "base" else ["--base", str(tmp_path / "base")]
        assert cli(["generate", "--model", str(model), *SIZE, "--out", str(out), *extra]) == 0
        images[name] = np.array(Image.open(out).convert("RGB")).astype(np.float64)
    assert np.array_equal(images["file"], images["v2"])
    for name in sources:
        assert np.abs(images[name] - images["base"]).mean() < 8, name
    assert cli(["generate", "--model", str(sources["file"]), *SIZE, "--out", str(tmp_path / "x.png")]) == 2
    assert "argument --base" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_export_arguments_are_checked_first(capsys, tmp_path):
    """export refuses an unquantized pipeline and an output of the wrong kind in one line each, before loading."""
    assert cli(["example-pipeline", str(tmp_path / "base")]) == 0
    assert cli(["export", "--layout", "nunchaku", "--model", str(tmp_path / "base"),
                "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "argument --model" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert cli(["export", "--layout", "nunchaku", "--model", str(tmp_path / "nothing"),
                "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "argument --model" in capsys.readouterr().err


QUANTIZE = ["--height", "32", "--width", "32", "--max-sequence-length", "16", "--dtype", "float32", "--device", "cpu",
            "--calib-samples", "2", "--calib-steps", "2", "--search-tokens", "32", "--rank", "8", "--prompt", "a cat"]


def test_quantize_for_each_export_layout(capsys, tmp_path):
    """``quantize`` then ``export`` of a quantduo pipeline folder: a default quantization exports to the Nunchaku
    single file and not to nunchaku_lite; ``--for-layout nunchaku-lite`` calibrates what nunchaku_lite holds (signed
    activations, one proj_out), which then exports. (A loaded quantduo pipeline carries its quantization_config in
    the diffusers config: the layouts write their own instead.)"""
    assert cli(["example-pipeline", str(tmp_path / "base")]) == 0
    for layout, out in (("nunchaku", "svdq.safetensors"), ("nunchaku-lite", "lite")):
        folder = tmp_path / f"quantized-{layout}"
        assert cli(["quantize", "--model", str(tmp_path / "base"), "--out", str(folder), *QUANTIZE,
                    "--for-layout", layout]) == 0
        assert cli(["export", "--layout", layout, "--model", str(folder), "--out", str(tmp_path / out),
                    "--dtype", "float32"]) == 0
        assert (tmp_path / out).exists()
    capsys.readouterr()
    assert cli(["export", "--layout", "nunchaku-lite", "--model", str(tmp_path / "quantized-nunchaku"),
                "--out", str(tmp_path / "lite2"), "--dtype", "float32"]) == 1
    assert "uint4" in capsys.readouterr().err and not (tmp_path / "lite2").exists()
