"""Quality of calibration choices on the two shipped tiny DiTs, digits and shapes (CPU, about 5 minutes).

Usage: python benchmarks/calibration_quality.py [--models digits shapes]

Compares, on the images drawn by the quantized transformer vs the full-precision one (same seed and labels,
25 Euler steps, guidance 2; 40 images, classes in turn): naive W4A4 (round-to-nearest, no smoothing, no low-rank) vs
SVDQuant; whole-model vs block-by-block calibration with full-precision ("parallel") or quantized ("sequential") block
inputs; and the rows the smoothing search and refinement use (512 / 2048 / 8192). Metrics: PSNR (dB, images in
[0, 1]) and the random-conv feature distance of tests/integrations/diffusers/test_pipeline.py (0 = identical; images
upscaled 4x to RGB). Calibration: 8 sampling steps, one image per class with CFG; "quantize s" includes capturing it.

Measured 2026-12-05 on the 2-core development CPU shared with other jobs (times noisy; quality numbers exact):

digits (shipped digits DiT, 8x8, 10 classes):

| quantizer | search rows | PSNR dB | feature distance | quantize s |
| --- | --- | --- | --- | --- |
| naive W4A4 | 512 | 30.68 | 0.02911 | 3.1 |
| SVDQuant whole model | 512 | 37.00 | 0.01092 | 24.0 |
| SVDQuant whole model | 2048 | 36.95 | 0.01015 | 45.8 |
| SVDQuant whole model | 8192 | 37.17 | 0.00918 | 39.1 |
| SVDQuant blockwise parallel | 512 | 36.99 | 0.00946 | 10.5 |
| SVDQuant blockwise sequential | 512 | 37.18 | 0.00906 | 10.4 |
| SVDQuant blockwise sequential | 2048 | 36.74 | 0.01047 | 24.6 |

shapes (shipped shapes DiT, 12x12, 6 classes):

| quantizer | search rows | PSNR dB | feature distance | quantize s |
| --- | --- | --- | --- | --- |
| naive W4A4 | 512 | 24.95 | 0.06391 | 0.8 |
| SVDQuant whole model | 512 | 31.79 | 0.02279 | 3.6 |
| SVDQuant whole model | 2048 | 31.72 | 0.02329 | 9.5 |
| SVDQuant whole model | 8192 | 31.58 | 0.02445 | 13.5 |
| SVDQuant blockwise parallel | 512 | 31.69 | 0.02049 | 2.8 |
| SVDQuant blockwise sequential | 512 | 32.53 | 0.01686 | 2.9 |
| SVDQuant blockwise sequential | 2048 | 30.67 | 0.02808 | 7.2 |

SVDQuant beats naive W4A4 on both models: +6.3 dB / 2.7x lower feature distance (digits), +6.8 dB / 2.8x (shapes).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from quantduo.integrations.diffusers import quantization_config, quantize_transformer, quantize_transformer_blockwise
from quantduo.models.tiny_dit import CONFIGS, DigitFlux, load_tiny_dit, sample_digits
from tests.integrations.diffusers.test_pipeline import feature_distance
from tests.svdquant.test_blockwise import calibration_samples

NUM_IMAGES = 40  # digits: CFG batch 80, 16 image tokens each; shapes: CFG batch 80, 36 image tokens each
RANK = 16
ROWS = [("naive W4A4", 512, True, None), ("SVDQuant whole model", 512, False, None),
        ("SVDQuant whole model", 2048, False, None), ("SVDQuant whole model", 8192, False, None),
        ("SVDQuant blockwise parallel", 512, False, "parallel"),
        ("SVDQuant blockwise sequential", 512, False, "sequential"),
        ("SVDQuant blockwise sequential", 2048, False, "sequential")]


def to_rgb(images: torch.Tensor) -> np.ndarray:
    """``[B, 1, S, S]`` in [0, 1] -> one uint8 RGB mosaic ``[4 S, 4 S * B, 3]``."""
    big = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest")[:, 0]
    mosaic = torch.cat(list(big), dim=1)
    return (mosaic.clamp(0, 1) * 255).round().byte()[..., None].expand(-1, -1, 3).numpy()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two float tensors of the same shape with values in [0, 1]."""
    mse = float((a - b).pow(2).mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def draw(model: DigitFlux) -> torch.Tensor:
    """The benchmark's images: ``NUM_IMAGES`` classes in turn, seed 7 -> float32 ``[NUM_IMAGES, 1, S, S]``."""
    return sample_digits(model, torch.arange(NUM_IMAGES) % model.num_classes, steps=25, seed=7)


def quantize(model: DigitFlux, search_tokens: int, naive: bool = False, blockwise: str | None = None,
             calibration_steps: int = 8) -> None:
    """Quantize ``model.transformer`` in place to INT4 W4A4: naive (RTN: no smoothing, no low-rank branch) or
    SVDQuant rank ``RANK``, whole-model or block by block (``blockwise`` = "parallel" / "sequential"), calibrated on
    ``calibration_steps`` sampling steps of one image per class."""
    samples = calibration_samples(model, steps=calibration_steps)
    extra = dict(smooth=False, rank=0, lowrank_iters=1) if naive else dict(rank=RANK)
    config = quantization_config(model.transformer, search_tokens=search_tokens, **extra)
    if blockwise is None:
        quantize_transformer(model.transformer, samples, config, progress=False)
        return
    with tempfile.TemporaryDirectory() as work:
        quantize_transformer_blockwise(model.transformer, samples, work, config,
                                       sequential=blockwise == "sequential", progress=False)


def run(name: str, reference: torch.Tensor, label: str, search_tokens: int, naive: bool,
        blockwise: str | None) -> str:
    """One table row: quantize a fresh copy of model ``name``, draw, compare with ``reference``."""
    model = load_tiny_dit(name=name)
    start = time.perf_counter()
    quantize(model, search_tokens, naive, blockwise)
    seconds = time.perf_counter() - start
    images = draw(model)
    distance = feature_distance(to_rgb(images), to_rgb(reference))
    return f"| {label} | {search_tokens} | {psnr(images, reference):.2f} | {distance:.5f} | {seconds:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["digits", "shapes"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name in args.models:
        reference = draw(load_tiny_dit(name=name))
        print(f"\n{name}\n\n| quantizer | search rows | PSNR dB | feature distance | quantize s |\n"
              "| --- | --- | --- | --- | --- |")
        for row in ROWS:
            print(run(name, reference, *row), flush=True)


if __name__ == "__main__":
    main()
