"""Nunchaku / deepcompressor single-file layout: tiling conventions, and a synthetic FLUX file written in that
layout from our own quantized tiny FLUX reads back to the same modules."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import FAST, flux_inputs, samples_from, tiny_flux  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

from quantduo.integrations import nunchaku_format as nf  # noqa: E402
from quantduo.integrations.diffusers import quantization_config, quantize_transformer  # noqa: E402
from quantduo.svdquant import CheckpointError, SVDQuantLinear  # noqa: E402


def test_vector_swizzle_matches_upstream_store_order():
    """deepcompressor's pack_scale documents the stored order of a 128-vector: 0 1 8 9 | 2 3 10 11 | ... | 16 17 24 25."""
    stored = nf._tile(torch.arange(128.0), nf._vector_view(128, 1), nf._VECTOR_PERM)
    assert stored[:20].tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15, 16, 17, 24, 25]


def test_tilings_are_bijective():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-7, 8, (256, 384), generator=g, dtype=torch.int8)
    view = nf._weight_view(256, 384)
    assert torch.equal(nf._untile(nf._tile(codes, view, nf._WEIGHT_PERM), view, nf._WEIGHT_PERM, (256, 384)), codes)
    assert not torch.equal(nf._tile(codes, view, nf._WEIGHT_PERM).reshape(256, 384), codes)
    for down, shape in [(True, (32, 384)), (False, (256, 32))]:
        x = torch.randn(shape, generator=g)
        assert torch.equal(nf._unpack_lowrank(nf._pack_lowrank(x, down), down), x)


@pytest.fixture(scope="module")
def quantized():
    model = tiny_flux(seed=5)
    cfg = quantization_config(model, weight_only=[], unsigned_act=[], **dict(FAST, search_tokens=32))
    quantize_transformer(model, samples_from(lambda s: flux_inputs(model, s), 2), cfg, progress=False)
    return model


def test_synthetic_nunchaku_file_reads_back_to_our_modules(quantized, tmp_path):
    path = nf.export_nunchaku_checkpoint(quantized, tmp_path / "svdq-int4-tiny-flux.safetensors")
    from safetensors.torch import load_file

    keys = load_file(str(path)).keys()
    assert "transformer_blocks.0.attn.to_qkv.qweight" in keys and "transformer_blocks.0.attn.to_q.qweight" not in keys
    assert load_file(str(path))["transformer_blocks.0.attn.to_qkv.wscales"].shape == (2, 384)
    fresh = tiny_flux(seed=99)  # different full-precision weights: everything must come from the file
    replaced = nf.load_nunchaku_checkpoint(fresh, path)
    ours = {n: m for n, m in quantized.named_modules() if isinstance(m, SVDQuantLinear)}
    assert sorted(replaced) == sorted(ours)
    for name, mine in ours.items():
        theirs = fresh.get_submodule(name)
        for buf in ("qweight", "wscales", "smooth_factor", "proj_up", "bias"):
            assert torch.equal(getattr(theirs, buf), getattr(mine, buf)), (name, buf)
        # proj_down is stored divided by the smoothing factor (bf16): one rounding step
        torch.testing.assert_close(theirs.proj_down.float(), mine.proj_down.float(), rtol=1e-2, atol=1e-3)
    inputs = flux_inputs(quantized, 42)
    with torch.no_grad():
        assert relative_error(fresh(**inputs)[0], quantized(**inputs)[0]) < 5e-3


def test_bad_nunchaku_files_are_rejected(quantized):
    tensors = {f"transformer_blocks.0.ff.net.2.{k}": v for k, v in nf.encode_linear(quantized.get_submodule("transformer_blocks.0.ff.net.2")).items()}
    with pytest.raises(CheckpointError, match="AWQ"):
        nf.load_nunchaku_checkpoint(tiny_flux(), {**tensors, "transformer_blocks.0.ff.net.2.wzeros": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no counterpart"):
        nf.load_nunchaku_checkpoint(tiny_flux(), {k.replace("ff.net.2", "ff.net.9"): v for k, v in tensors.items()})
    broken = dict(tensors)
    broken["transformer_blocks.0.ff.net.2.proj_up"] = torch.zeros(128, 8)
    with pytest.raises(CheckpointError, match="shape"):
        nf.load_nunchaku_checkpoint(tiny_flux(), broken)
    with pytest.raises(ValueError, match="signed W4A4"):
        q = copy.deepcopy(quantized)
        q.get_submodule("transformer_blocks.0.ff.net.2").act_format = "uint4"
        nf.export_nunchaku_checkpoint(q, "/nonexistent/x.safetensors")
