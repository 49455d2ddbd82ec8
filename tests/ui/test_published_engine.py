"""The UI's image engine for a published SVDQuant checkpoint (``quantduo serve --model FILE --base DIR``): a Nunchaku
single file written by the tests' own packer on a tiny FLUX pipeline draws what the library draws from it, and the
bf16 reference is the base pipeline's image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from quantduo.cli import build_parser
from quantduo.integrations.published import load_published_pipeline
from quantduo.ui import serve
from quantduo.ui.backend import (ImageRequest, Job, PipelineEngine, PublishedEngine, UserError, engine_class,
                                 make_image_engine)
from tests.integrations.diffusers.tiny_models import tiny_flux_pipeline
from tests.integrations.published.flux_files import flux_checkpoint, round_to_bf16, save_single_file

PROMPT, SEED, STEPS, SIZE = "a dog in a park", 3, 2, 32


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(checkpoint file, base pipeline folder)."""
    root = tmp_path_factory.mktemp("published")
    pipe = tiny_flux_pipeline(seed=2)
    round_to_bf16(pipe.transformer.float())
    pipe.save_pretrained(root / "base")
    tensors, _, _ = flux_checkpoint(pipe.transformer, rank=16)
    return save_single_file(tensors, root / "svdq-int4-tiny.safetensors"), root / "base"


def library_image(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np",
               generator=torch.Generator("cpu").manual_seed(SEED))
    return np.round(np.clip(out.images[0], 0, 1) * 255).astype(np.uint8)


def test_published_checkpoint_draws_the_library_image_beside_the_base_model(published, tmp_path):
    checkpoint, base = published
    assert engine_class(str(checkpoint)) is PublishedEngine and engine_class(str(base)) is PipelineEngine
    engine = make_image_engine(str(checkpoint), tmp_path, base=base)
    result = engine.generate(ImageRequest(prompt=PROMPT, seed=SEED, steps=STEPS, size=SIZE, compare=True), Job("t"))
    pipe, report = load_published_pipeline(checkpoint, base, torch.bfloat16, "cpu")
    assert np.array_equal(result.image, library_image(pipe))
    assert np.array_equal(result.reference, library_image(DiffusionPipeline.from_pretrained(str(base),
                                                                                            dtype=torch.bfloat16)))
    assert result.execution == "auto" and result.reference_execution == "bf16"
    assert result.weight_bytes < result.reference_weight_bytes and result.psnr_db > 10


def test_published_checkpoint_without_base_is_a_readable_error(published, tmp_path):
    with pytest.raises(UserError, match="published SVDQuant checkpoint.*--base"):
        make_image_engine(str(published[0]), tmp_path)


def test_serve_refuses_a_published_checkpoint_without_base(published):
    with pytest.raises(SystemExit, match="published SVDQuant checkpoint: give --base"):
        serve(build_parser().parse_args(["serve", "--model", str(published[0])]), block=False)
