"""``quantduo quantize --blockwise`` on a tiny FluxPipeline: a pipeline folder that loads and generates, and a
``--resume`` of the finished run (samples read back from ``--work-dir``, every block reloaded) writes the same
bytes."""
from __future__ import annotations

import torch

from quantduo.cli import main as cli
from quantduo.integrations.diffusers import load_pipeline
from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant.blockwise import finished_blocks
from tests.integrations.diffusers.tiny_models import tiny_flux_pipeline

ARGS = ["--height", "32", "--width", "32", "--max-sequence-length", "16", "--guidance", "3.5", "--dtype", "float32",
        "--calib-samples", "4", "--calib-steps", "2", "--search-tokens", "64", "--prompt", "a photo of a cat",
        "--prompt", "a red bus", "--rank", "16", "--blockwise"]


def test_blockwise_cli_and_resume(tmp_path, single_thread):
    base, work = tmp_path / "bf16", tmp_path / "work"
    tiny_flux_pipeline().save_pretrained(base)
    assert cli(["quantize", "--model", str(base), *ARGS, "--work-dir", str(work), "--out", str(tmp_path / "a")]) == 0
    assert finished_blocks(work) == 2 and (work / "samples.pt").is_file()
    assert cli(["quantize", "--model", str(base), *ARGS, "--work-dir", str(work), "--resume",
                "--out", str(tmp_path / "b")]) == 0
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (tmp_path / "b" / weights).read_bytes()
    pipe = load_pipeline(tmp_path / "a", dtype=torch.float32)
    assert any(isinstance(m, SVDQuantLinear) for m in pipe.transformer.modules())
    assert cli(["generate", "--model", str(tmp_path / "a"), "--prompt", "a cat", "--height", "32", "--width", "32",
                "--steps", "2", "--max-sequence-length", "16", "--dtype", "float32", "--out",
                str(tmp_path / "cat.png")]) == 0
