"""End to end on a tiny FluxPipeline: calibration capture, CLI quantize / generate, save / load into the pipeline,
and image quality vs full precision (PSNR and an LPIPS-like feature distance)."""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from tests.integrations.diffusers.tiny_models import flux_inputs, tiny_flux_pipeline  # noqa: E402

from quantduo.cli import main as cli  # noqa: E402
from quantduo.integrations.diffusers import (FusedFluxSingleBlock, QuantizationConfigError,  # noqa: E402
                                             denoiser_safetensors, load_pipeline_lazily,
                                             capture_calibration_inputs, load_into_pipeline, load_pipeline)
from quantduo.svdquant import CheckpointError, SVDQuantLinear  # noqa: E402
from quantduo.svdquant.blockwise import LazyWeights  # noqa: E402
from quantduo.utils import ManifestError, relative_error  # noqa: E402

SIZE = ["--height", "32", "--width", "32", "--max-sequence-length", "16", "--guidance", "3.5", "--dtype", "float32"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images ``[H, W, 3]``."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS-like distance, honestly NOT LPIPS (no learned weights offline): a fixed-seed random 3-layer conv net
    (3->16->32->32 channels, 3x3, stride 2 after the first, ReLU); at each layer features are unit-normalised over
    channels per pixel, the squared difference is averaged over pixels, summed over layers. 0 = identical."""
    g = torch.Generator().manual_seed(1234)
    convs = [torch.randn(o, i, 3, 3, generator=g) / (i * 9) ** 0.5 for i, o in [(3, 16), (16, 32), (32, 32)]]
    xa, xb = (torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1 for x in (a, b))
    total = 0.0
    for i, w in enumerate(convs):
        xa, xb = (torch.relu(torch.nn.functional.conv2d(x, w, stride=1 if i == 0 else 2, padding=1)) for x in (xa, xb))
        na, nb = (x / x.norm(dim=1, keepdim=True).clamp(min=1e-10) for x in (xa, xb))
        total += float((na - nb).pow(2).sum(1).mean())
    return total


def save_side_by_side(images: list[np.ndarray], path) -> None:
    from PIL import Image

    Image.fromarray(np.concatenate(images, axis=1)).resize((96 * len(images), 96), Image.NEAREST).save(path)


def test_capture_samples_every_step():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    samples = capture_calibration_inputs(pipe, ["a cat", "a red car"], num_samples=100, num_inference_steps=3,
                                         progress=False, height=32, width=32, max_sequence_length=16)
    assert sorted((s.prompt_index, s.step) for s in samples) == [(p, s) for p in range(2) for s in range(3)]
    assert samples[0].kwargs["hidden_states"].shape == (1, 64, 16)
    few = capture_calibration_inputs(pipe, ["a cat", "a red car"], num_samples=4, num_inference_steps=3,
                                     progress=False, height=32, width=32, max_sequence_length=16)
    assert len(few) == 4


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory):
    """(BF16 pipeline folder, ``quantduo quantize`` output folder), made once through the CLI."""
    tmp = tmp_path_factory.mktemp("pipelines")
    base, quant = tmp / "bf16", tmp / "int4"
    tiny_flux_pipeline().save_pretrained(base)
    assert cli(["quantize", "--model", str(base), *SIZE, "--calib-samples", "6", "--calib-steps", "3",
                "--search-tokens", "64", "--prompt", "a photo of a cat", "--prompt", "a red bus", "--prompt",
                "a snowy mountain at sunrise", "--format", "int4", "--rank", "16", "--out", str(quant)]) == 0
    return base, quant


def test_cli_generate_and_quality(quantized_dirs, tmp_path):
    from PIL import Image

    base, quant = quantized_dirs
    config = json.loads((quant / "transformer" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "quantduo" and config["format"] == "int4" and len(config["layers"]) > 10
    saved_text = "".join(p.read_text() for p in quant.rglob("*.json") if p.name != "quantduo_manifest.json")
    assert str(base) not in saved_text and "/tmp" not in saved_text  # self-contained: no path to the base model
    # (only the manifest's provenance records the command line as typed, paths included; no loader reads it)
    images = {}
    for name, model, extra in [("bf16", base, []), ("svdquant", quant, []), ("a16", quant, ["--a16"]),
                               ("fp8", quant, ["--fp8"])]:
        out = tmp_path / f"{name}.png"
        assert cli(["generate", "--model", str(model), *SIZE, "--prompt", "a dog in a park", "--steps", "4",
                    "--seed", "3", "--out", str(out), *extra]) == 0
        images[name] = np.array(Image.open(out).convert("RGB"))
    assert psnr(images["a16"], images["bf16"]) > 40 and not np.array_equal(images["a16"], images["svdquant"])
    # fp8 execution of the same weights
    assert psnr(images["fp8"], images["bf16"]) > 40 and not np.array_equal(images["fp8"], images["a16"])
    save_side_by_side([images["bf16"], images["svdquant"]], tmp_path / "bf16_vs_svdquant.png")
    q_psnr, q_dist = psnr(images["svdquant"], images["bf16"]), feature_distance(images["svdquant"], images["bf16"])
    print(f"\nvs BF16: PSNR {q_psnr:.2f} dB, feature distance {q_dist:.5f}; images: {tmp_path / 'bf16_vs_svdquant.png'}")
    assert 0 < q_dist and q_psnr < 80  # quantization changed the image (not a silent no-op)
    assert q_psnr > 40 and q_dist < 0.01  # measured 56.6 dB / 0.0003 (tiny random pipeline, 32x32)
    assert feature_distance(images["bf16"], images["bf16"]) == 0.0


def test_load_into_pipeline_and_errors(quantized_dirs, tmp_path):
    import shutil

    _, quant = quantized_dirs
    loaded = load_pipeline(quant, torch.float32)
    assert sum(isinstance(m, SVDQuantLinear) for m in loaded.transformer.modules()) > 10
    a16 = [m for m in load_pipeline(quant, torch.float32, execution="a16").transformer.modules()
           if isinstance(m, SVDQuantLinear)]
    assert len(a16) > 10 and all(m.execution == "a16" for m in a16)
    fp8_model = load_pipeline(quant, torch.float32, execution="fp8").transformer
    fp8 = [m for m in fp8_model.modules() if isinstance(m, SVDQuantLinear)]
    assert len(fp8) == len(a16) and all(m.execution == "fp8" for m in fp8)
    assert isinstance(fp8_model.single_transformer_blocks[0], FusedFluxSingleBlock)  # fused on load
    with pytest.raises(ValueError, match="execution"):
        load_pipeline(quant, torch.float32, execution="int3")
    # the float32 checkpoint in a bfloat16 pipeline: every compute dtype follows, packed codes stay
    half = load_pipeline(quant, torch.bfloat16).transformer
    assert half.x_embedder.weight.dtype == torch.bfloat16
    layers = [m for m in half.modules() if isinstance(m, SVDQuantLinear)]
    assert all(m.dtype == torch.bfloat16 and m.qweight.dtype == torch.uint8 for m in layers)
    inputs = flux_inputs(loaded.transformer, 5)
    with torch.no_grad():
        full = loaded.transformer(**inputs)[0]
        bf16 = half(**{k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v
                       for k, v in inputs.items()})[0]
    assert relative_error(bf16, full) < 5e-2
    fresh = tiny_flux_pipeline(seed=1)
    model = load_into_pipeline(fresh, quant / "transformer")
    assert fresh.transformer is model
    assert torch.equal(model.state_dict()["transformer_blocks.0.attn.to_q.qweight"],
                       loaded.transformer.state_dict()["transformer_blocks.0.attn.to_q.qweight"])
    broken = tmp_path / "broken"
    shutil.copytree(quant, broken)
    data = bytearray((broken / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="corrupt"):
        load_into_pipeline(fresh, broken / "transformer")
    (broken / "quantduo_manifest.json").unlink()  # without the manifest, the tensors' own digest still catches it
    with pytest.raises(ManifestError, match="no quantduo_manifest.json"):
        load_into_pipeline(fresh, broken / "transformer")
    with pytest.raises(QuantizationConfigError, match="corrupt"):
        diffusers.FluxTransformer2DModel.from_pretrained(broken / "transformer")
    with pytest.raises(CheckpointError, match="not found"):
        load_into_pipeline(fresh, tmp_path)


@pytest.mark.gpu
def test_gpu_fp8_pipeline_compiled_and_graphed(quantized_dirs):
    """The quantized tiny pipeline on CUDA in fused FP8 execution under torch.compile + CUDA graphs (64x64 images:
    272 tokens, above the few-token path) gives the bf16 pipeline's image."""
    from quantduo.integrations.cuda_graph import enable_cuda_graph

    base, quant = quantized_dirs
    kwargs = dict(prompt="a dog in a park", height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
                  max_sequence_length=16, output_type="np")
    images = {}
    for name, model, execution in [("bf16", base, "auto"), ("fp8", quant, "fp8")]:
        pipe = load_pipeline(model, torch.bfloat16, "cuda", execution=execution)
        if execution == "fp8":
            assert any(isinstance(m, FusedFluxSingleBlock) for m in pipe.transformer.modules())
            enable_cuda_graph(pipe.transformer, compile=True)
        with torch.no_grad():
            images[name] = (pipe(generator=torch.Generator().manual_seed(3), **kwargs).images[0] * 255).round()
    assert psnr(images["fp8"], images["bf16"]) > 30


def test_lazy_pipeline_leaves_the_denoiser_on_disk_and_refuses_other_formats(tmp_path):
    """load_pipeline_lazily: the denoiser's parameters stay on the meta device (its computed buffers real), the other
    components load; LazyWeights fills a block with the stored values. A denoiser saved as .bin has no safetensors
    files: a CheckpointError (quantize --blockwise then loads it into host memory); a corrupt file: a ValueError."""
    from_disk = tiny_flux_pipeline()
    from_disk.save_pretrained(tmp_path / "safe")
    pipe, weights = load_pipeline_lazily(tmp_path / "safe", torch.float32)
    assert all(p.device.type == "meta" for p in pipe.transformer.parameters())
    assert all(p.device.type == "cpu" for p in pipe.text_encoder_2.parameters())
    block = pipe.transformer.transformer_blocks[0]
    weights.load(block, "transformer_blocks.0", "cpu")
    for name, tensor in from_disk.transformer.transformer_blocks[0].state_dict().items():
        assert torch.equal(block.state_dict()[name], tensor), name
    from_disk.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert denoiser_safetensors(tmp_path / "bin") == []
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_pipeline_lazily(tmp_path / "bin")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read .*bad.safetensors"):
        LazyWeights([tmp_path / "bad.safetensors"])


def test_cli_generate_compiles_the_repeated_blocks(quantized_dirs, tmp_path, monkeypatch, capsys):
    """``--compile`` (blocks, the default): diffusers' regional compilation of the loaded (fused) transformer's
    blocks, the image that of the uncompiled run within the compiler's roundings; a denoiser class without repeated
    blocks is refused before anything loads."""
    from PIL import Image

    from quantduo.cli import diffusion

    _, quant = quantized_dirs
    compiled_blocks = []
    real = diffusion._compile_blocks

    def spy(denoiser):
        real(denoiser)
        compiled_blocks.extend(type(m).__name__ for m in denoiser.modules() if m._compiled_call_impl is not None)
    monkeypatch.setattr(diffusion, "_compile_blocks", spy)
    images = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"{len(extra)}.png"
        assert cli(["generate", "--model", str(quant), *SIZE, "--prompt", "a dog", "--steps", "2", "--seed", "3",
                    "--out", str(out), *extra]) == 0
        images.append(np.array(Image.open(out).convert("RGB")))
    torch._dynamo.reset()
    assert sorted(set(compiled_blocks)) == ["FusedFluxDoubleBlock", "FusedFluxSingleBlock"]
    assert psnr(images[1], images[0]) > 40

    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "_repeated_blocks", [])
    monkeypatch.setattr(diffusion, "load_pipeline", lambda *a, **k: pytest.fail("loaded before the check"))
    capsys.readouterr()
    assert cli(["generate", "--model", str(quant), *SIZE, "--prompt", "a dog", "--out", str(tmp_path / "x.png"),
                "--compile", "blocks"]) == 2
    assert "--compile: blocks: FluxTransformer2DModel names no repeated blocks" in capsys.readouterr().err
