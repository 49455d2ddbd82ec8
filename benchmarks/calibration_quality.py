"""Quality of calibration choices on the shipped tiny digits DiT (CPU, about 3 minutes).

Usage: python benchmarks/calibration_quality.py

Compares, on the digits drawn by the quantized transformer vs the full-precision one (same seed and labels,
25 Euler steps, guidance 2): naive W4A4 (round-to-nearest, no smoothing, no low-rank) vs SVDQuant; whole-model vs
block-by-block calibration with full-precision ("parallel") or quantized ("sequential") block inputs; and the rows the
smoothing search and refinement use (512 / 2048 / 8192). Metrics: PSNR (dB, images in [0, 1]) and the random-conv
feature distance of tests/integrations/diffusers/test_pipeline.py (0 = identical; images upscaled to 32x32 RGB).
"""
from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from quantduo.integrations.diffusers import quantization_config, quantize_transformer, quantize_transformer_blockwise
from quantduo.models.tiny_dit import load_tiny_dit, sample_digits
from tests.integrations.diffusers.test_pipeline import feature_distance
from tests.svdquant.test_blockwise import calibration_samples

LABELS = torch.arange(10).repeat(4)  # 40 digits: CFG batch 80, 16 image tokens each
RANK = 16


def to_rgb(images: torch.Tensor) -> np.ndarray:
    """``[B, 1, 8, 8]`` in [0, 1] -> one uint8 RGB mosaic ``[32, 32 * B, 3]``."""
    big = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")[:, 0]
    mosaic = torch.cat(list(big), dim=1)
    return (mosaic.clamp(0, 1) * 255).round().byte()[..., None].expand(-1, -1, 3).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float((a - b).pow(2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def evaluate(model, reference: torch.Tensor) -> tuple[float, float]:
    images = sample_digits(model, LABELS, steps=25, seed=7)
    return psnr(images, reference), feature_distance(to_rgb(images), to_rgb(reference))


def run(name: str, search_tokens: int, naive: bool = False, blockwise: str | None = None) -> str:
    model = load_tiny_dit()
    samples = calibration_samples(model, steps=8)
    extra = dict(smooth=False, rank=0, lowrank_iters=1) if naive else dict(rank=RANK)
    config = quantization_config(model.transformer, search_tokens=search_tokens, **extra)
    start = time.perf_counter()
    if blockwise is None:
        quantize_transformer(model.transformer, samples, config, progress=False)
    else:
        with tempfile.TemporaryDirectory() as work:
            quantize_transformer_blockwise(model.transformer, samples, work, config,
                                           sequential=blockwise == "sequential", progress=False)
    seconds = time.perf_counter() - start
    value, distance = evaluate(model, REFERENCE)
    return f"| {name} | {search_tokens} | {value:.2f} | {distance:.5f} | {seconds:.1f} |"


if __name__ == "__main__":
    torch.set_num_threads(1)
    REFERENCE = sample_digits(load_tiny_dit(), LABELS, steps=25, seed=7)
    print("| quantizer | search rows | PSNR dB | feature distance | quantize s |\n| --- | --- | --- | --- | --- |")
    for row in [("naive W4A4", 512, True, None), ("SVDQuant whole model", 512, False, None),
                ("SVDQuant whole model", 2048, False, None), ("SVDQuant whole model", 8192, False, None),
                ("SVDQuant blockwise parallel", 512, False, "parallel"),
                ("SVDQuant blockwise sequential", 512, False, "sequential"),
                ("SVDQuant blockwise sequential", 2048, False, "sequential")]:
        print(run(*row), flush=True)
