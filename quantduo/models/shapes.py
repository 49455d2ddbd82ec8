"""Procedurally generated class-conditional data set of small grey-scale shapes (numpy only, no downloads).

Six classes (:data:`SHAPE_CLASSES`): disk, square, triangle, cross (plus sign), ring and horizontal bar. Each image is
``size`` x ``size`` (default 12) with one shape of random centre (up to ``jitter`` pixels from the middle), random
size (outer radius 3-4.5 px at 12x12, scaled with ``size``) and random ink intensity (0.7-1.0) on a black (0)
background. Shapes are rendered at 4x resolution and box-filtered down, so edges are anti-aliased. The same ``seed``
gives the same images on every platform (one ``numpy.random.Generator``, float64 geometry).

The data set trains the second tiny DiT (``scripts/train_tiny_dit.py --dataset shapes``); :func:`class_means` and
:func:`nearest_class_mean` give the objective check that generated images of class ``c`` look like class ``c``:
they must be closer (Euclidean, pixel space) to the data set's class-``c`` mean image than to any other class mean.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["SHAPE_CLASSES", "class_means", "make_shapes", "nearest_class_mean"]

SHAPE_CLASSES = ("disk", "square", "triangle", "cross", "ring", "bar")
SUPERSAMPLE = 4  # rendering resolution factor (anti-aliasing)


def shape_masks(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
    """Ink masks of every class, in the order of :data:`SHAPE_CLASSES`.

    Args:
        u, v: float64 ``[N, H, W]`` horizontal / vertical offsets from each shape's centre (pixels, v points down).
        r: float64 ``[N, 1, 1]`` outer radius of each shape (pixels).
    Returns:
        six bool ``[N, H, W]`` masks.
    """
    d2, w = u**2 + v**2, np.maximum(0.6, 0.25 * r)  # w: half-width of cross arms and bars
    return [
        d2 <= r**2,
        (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r),
        (v <= 0.8 * r) & (np.abs(u) <= (v + r) / 1.8),  # apex up at (0, -r), base corners at (+-r, 0.8 r)
        ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r)),
        (d2 <= r**2) & (d2 >= (r - np.maximum(1.0, 0.35 * r)) ** 2),
        (np.abs(u) <= r) & (np.abs(v) <= w),
    ]


def make_shapes(n: int, size: int = 12, seed: int = 0, jitter: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``n`` shape images, classes balanced (``labels = arange(n) % 6``).

    Args:
        n: number of images.
        size: image height = width in pixels.
        seed: seed of the ``numpy.random.Generator`` drawing centres, sizes and intensities.
        jitter: largest offset of a shape's centre from the image centre, pixels (uniform per axis).
    Returns:
        (images float32 ``[n, 1, size, size]`` in [0, 1] (1 = ink, like ``sample_digits``' output),
        labels long ``[n]`` in ``0..5`` indexing :data:`SHAPE_CLASSES`).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(SHAPE_CLASSES)
    scale = size / 12.0
    centre = size / 2 + rng.uniform(-jitter, jitter, size=(2, n, 1, 1)) * scale
    radius = rng.uniform(3.0, 4.5, size=(n, 1, 1)) * scale
    intensity = rng.uniform(0.7, 1.0, size=n).astype(np.float32)
    grid = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sub-pixel centres, pixel units
    u, v = grid[None, None, :] - centre[0], grid[None, :, None] - centre[1]
    masks = shape_masks(u, v, radius)
    ink = np.choose(labels[:, None, None], masks).astype(np.float32)
    ink = ink.reshape(n, size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(2, 4))
    images = torch.from_numpy(ink * intensity[:, None, None]).unsqueeze(1)
    return images, torch.from_numpy(labels).long()


def class_means(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean image of each class: ``images`` float ``[N, 1, H, W]``, ``labels`` long ``[N]`` ->
    float32 ``[num_classes, 1, H, W]``."""
    return torch.stack([images[labels == c].float().mean(0) for c in range(num_classes)])


def nearest_class_mean(images: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Class of the nearest mean image (Euclidean): ``images`` float ``[B, 1, H, W]``, ``means`` float
    ``[C, 1, H, W]`` -> long ``[B]``."""
    return torch.cdist(images.flatten(1).float(), means.flatten(1).float()).argmin(dim=1)
