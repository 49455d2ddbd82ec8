"""Per-channel smoothing: migrate activation outliers into the weights.

``smooth_scale[j] = max|X_j|^a / max|W_j|^b``; the layer computes ``(X / s) @ (W * s)^T``.
"""
from __future__ import annotations

import torch

_EPS = 1e-5


def smoothing_grid(steps: int = 19) -> list[tuple[float, float]]:
    """The (a, b) pairs searched: (0, 0), (a, 0) and (a, 1 - a) for a = 0.05 .. 0.95 (39 pairs)."""
    alphas = [round(0.05 * (i + 1), 2) for i in range(steps)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in alphas] + [(a, round(1.0 - a, 2)) for a in alphas]


def smooth_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Smoothing factors ``[K]`` (float32), normalised to geometric mean 1.

    Args:
        x_absmax: ``[K]`` max |activation| per input channel over calibration data.
        w_absmax: ``[K]`` max |weight| per input channel (over all output rows of the group).
    """
    scale = x_absmax.float().clamp(min=_EPS).pow(a) / w_absmax.float().clamp(min=_EPS).pow(b)
    return scale / scale.log().mean().exp()
