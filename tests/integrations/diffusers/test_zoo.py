"""Structural rules on tiny configs of the real diffusers denoisers: quantize, save, reload through the diffusers
backend (``Model.from_pretrained``), run, compare with the bf16 model.

PSNR (dB) of the reloaded quantized denoiser's output vs the same model in bf16, on held-out synthetic inputs:
``20 log10(range(ref) / rmse)``. Settings: INT4 W4A4, rank 16, 128 search rows, 4 refinement iterations, smoothing
search on, 4 calibration calls of batch 2; random-init weights (their residual streams dominate the output, so
these PSNRs are much higher than on trained models). Measured on this CPU, seed 0; each bound in ``ZOO_PSNR`` is the
measured value minus about 3 dB:

flux 55.9, flux-kontext 54.2, flux-fill 55.3, sd3 55.1, sd3.5 54.9, pixart-sigma 53.8, sana 35.5 (its feed-forward is
1x1 convolutions, left 16-bit), qwen-image 57.0, wan 51.3, hunyuan-video 55.2, chroma 44.4, hidream 54.9,
lumina2 41.5, sdxl-unet 31.9.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from quantduo.integrations.diffusers import (block_names, lazy_denoiser, mark_quantized, quantduo_config_for,
                                             quantization_config, quantize_transformer, resolved_rules, rules_for)
from quantduo.svdquant import CalibrationError, SVDQuantLinear
from quantduo.svdquant.blockwise import LazyWeights, chain_plan

from .pipeline_check import SETTINGS, psnr, quantized_pipeline_psnr
from .tiny_models import samples_from
from .tiny_zoo import ZOO, tiny_pixart_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")
ZOO_PSNR = {  # minimum PSNR (dB) vs bf16 (measured values in the module docstring)
    "flux": 52.0, "flux-kontext": 51.0, "flux-fill": 52.0, "sd3": 52.0, "sd3.5": 51.5, "pixart-sigma": 50.5, "sana": 32.5,
    "qwen-image": 54.0, "wan": 48.0, "hunyuan-video": 52.0, "chroma": 41.0, "hidream": 51.5, "lumina2": 38.5,
    "sdxl-unet": 29.0,
}
PIPELINE_PSNR = {"sd3": 41.0, "pixart-sigma": 40.0}  # minimum PSNR (dB) of the generated image vs bf16


def to_bf16(kwargs: dict) -> dict:
    return {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()}


def quantize_save_reload(kind: str, tmp_path) -> tuple[float, nn.Module, nn.Module]:
    """(PSNR vs bf16, reloaded quantized model, bf16 original) of zoo model ``kind``."""
    model, inputs = ZOO[kind]()
    reference = copy.deepcopy(model).to(torch.bfloat16)
    config = quantization_config(model, **SETTINGS)
    quantize_transformer(model, samples_from(inputs, 4), config, progress=False)
    mark_quantized(model, quantduo_config_for(config))
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(str(tmp_path), dtype=torch.bfloat16).eval()
    held_out = to_bf16(inputs(100))
    with torch.no_grad():
        return psnr(reloaded(**held_out)[0], reference(**held_out)[0]), reloaded, reference


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_zoo_quantize_save_reload_run(kind, tmp_path):
    """Linears outside the block lists stay ``nn.Linear``; conditioning linears inside are W4A16; everything else in
    the body is W4A4 with a low-rank branch; the reloaded model is within its PSNR bound of bf16."""
    model, inputs = ZOO[kind]()
    rules = resolved_rules(model, **inputs(0))
    value, reloaded, _ = quantize_save_reload(kind, tmp_path)
    print(f"{kind}: PSNR {value:.1f} dB")
    modules = dict(reloaded.named_modules())
    assert all(type(modules[name]) is nn.Linear for name in rules.skip)
    assert all(modules[name].act_format == "none" for name in rules.weight_only)
    w4a4 = [m for m in modules.values() if isinstance(m, SVDQuantLinear) and m.act_format != "none"]
    assert w4a4 and all(m.rank == SETTINGS["rank"] for m in w4a4)
    assert value > ZOO_PSNR[kind], value


def test_modulation_detected_where_it_exists():
    """adaLN modulation linears (``Linear(SiLU(temb))``) are found inside the blocks of the classes that have them."""
    expected = {"flux": "transformer_blocks.0.norm1.linear", "sd3": "transformer_blocks.1.norm1_context.linear",
                "qwen-image": "transformer_blocks.0.img_mod.1", "hunyuan-video": "single_transformer_blocks.0.norm.linear",
                "hidream": "double_stream_blocks.0.block.adaLN_modulation.1", "lumina2": "layers.0.norm1.linear",
                "sdxl-unet": "down_blocks.0.resnets.0.time_emb_proj"}
    for kind, name in expected.items():
        model, inputs = ZOO[kind]()
        assert name in resolved_rules(model, **inputs(0)).weight_only, kind


def test_structure_that_defeats_the_rules():
    """No block list: an error naming the class and its first linear. A linear fed a token stream in one call and
    conditioning only in another: a calibration error naming it."""
    with pytest.raises(ValueError, match=r"Sequential.*'0'.*no nn.ModuleList of attention blocks"):
        rules_for(nn.Sequential(nn.Linear(64, 64)))

    class Ambiguous(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.MultiheadAttention(64, 1, batch_first=True)])
            self.shared = nn.ModuleList([nn.Linear(64, 64), nn.MultiheadAttention(64, 1)])

        def forward(self, x, emb):
            return self.shared[0](x).mean() + self.shared[0](emb).mean()

    model = Ambiguous()
    config = quantization_config(model, **SETTINGS)
    samples = samples_from(lambda s: dict(x=torch.randn(2, 8, 64), emb=torch.randn(2, 64)), 1)
    with pytest.raises(CalibrationError, match="'shared.0'"):
        quantize_transformer(model, samples, config, progress=False)


PIPELINES = {"sd3": (tiny_sd3_pipeline, {}), "pixart-sigma": (tiny_pixart_pipeline, dict(use_resolution_binning=False))}


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_full_pipeline(kind, tmp_path):
    """Capture calibration calls inside the pipeline, quantize by the inferred rules, save the pipeline folder, load it
    with DiffusionPipeline.from_pretrained and generate: PSNR of the image vs the bf16 pipeline's.
    Measured on this CPU: SD3 44.2 dB, PixArt-Sigma 43.0 dB (16x16 images, 3 steps; FLUX: test_pipeline.py)."""
    build, extra = PIPELINES[kind]
    value = quantized_pipeline_psnr(build, tmp_path / "quantized", dict(height=16, width=16, max_sequence_length=16,
                                                                         **extra))
    print(f"{kind} pipeline: PSNR {value:.1f} dB")
    assert value > PIPELINE_PSNR[kind], value


CHAINS = {"flux", "flux-kontext", "flux-fill", "sd3", "sd3.5", "pixart-sigma", "sana", "qwen-image", "wan"}


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_blockwise_chain_detection(kind):
    """Block-by-block calibration needs each block fed by the previous one. It holds for the classes in ``CHAINS``;
    the others compute block inputs between blocks (HunyuanVideo's token refiner, Chroma / HiDream between double and
    single blocks, Lumina2's refiners, the UNet's skip connections) and get an error naming the block."""
    model, inputs = ZOO[kind]()
    blocks = [(name, model.get_submodule(name)) for name in block_names(model)]
    cpu = torch.device("cpu")
    if kind in CHAINS:
        assert len(chain_plan(model, blocks, ((), inputs(0)), cpu, cpu)) == len(blocks) - 1
    else:
        with pytest.raises(ValueError, match="is computed between"):
            chain_plan(model, blocks, ((), inputs(0)), cpu, cpu)


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_lazy_skeleton_filled_from_its_file_is_the_model(kind, tmp_path):
    """A skeleton of the class (parameters on the meta device, computed buffers such as RoPE tables real) filled by
    LazyWeights from the model's safetensors file computes the model's output exactly, for every class: what
    ``quantize --blockwise`` calibrates is the model on disk."""
    model, inputs = ZOO[kind]()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    skeleton = lazy_denoiser({**model.config, "_class_name": type(model).__name__}, kind, torch.float32)
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    LazyWeights([tmp_path / "model.safetensors"]).load(skeleton, "", "cpu")
    with torch.no_grad():
        assert torch.equal(skeleton(**inputs(0))[0], model.eval()(**inputs(0))[0])
