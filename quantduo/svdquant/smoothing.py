"""Per-channel smoothing: migrate activation outliers into the weights.

``smooth_scale[j] = max|X_j|^a / max|W_j|^b`` (deepcompressor's ``get_smooth_scale``, not normalised); the layer
computes ``(X / s) @ (W * s)^T``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def smoothing_grid(num_grids: int = 20) -> list[tuple[float, float]]:
    """The (a, b) pairs searched, deepcompressor's ``SmoothCalibConfig.get_alpha_beta_pairs`` with ``beta=-2``:
    (0, 0), then (a, 0) and (a, 1 - a) for a = i / num_grids, i = 1 .. num_grids - 1 (``num_grids=20``: a = 0.05 ..
    0.95, 39 pairs; 10: 19 pairs)."""
    if num_grids < 1:
        raise ValueError(f"num_grids must be positive, got {num_grids}")
    choices = [i / num_grids for i in range(1, num_grids)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in choices] + [(a, 1 - a) for a in choices]


def smooth_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Smoothing factors ``[K]`` (float32): ``x_absmax^a / w_absmax^b``, as deepcompressor computes them (its
    ``get_smooth_scale``): (0, 0) gives ones; a factor that comes out 0 is replaced by 1; if any factor is NaN or
    inf (a channel with ``w_absmax = 0`` and ``b > 0``), every factor is 1.

    Args:
        x_absmax: ``[K]`` max |activation| per input channel over calibration data.
        w_absmax: ``[K]`` max |weight| per input channel (over all output rows of the group).
    """
    if a == 0 and b == 0:
        return torch.ones_like(x_absmax, dtype=torch.float32)
    if a > 0:
        scale = x_absmax.float().pow(a)
        if b > 0:
            scale = scale / w_absmax.float().pow(b)
    else:
        scale = w_absmax.float().pow(-b)
    ones = torch.ones_like(scale)
    scale = torch.where(scale == 0, ones, scale)
    return torch.where(torch.isfinite(scale).all(), scale, ones)


def candidate_scales(x_absmax: torch.Tensor, w: torch.Tensor, grid: list[tuple[float, float]]) -> torch.Tensor:
    """The smoothing factors of each grid pair, float32 ``[C, K]``, from the statistic ``x_absmax`` ``[K_in]`` and
    the weights ``w`` ``[N, K]`` (``K >= K_in``: the columns beyond ``K_in`` are padding, and get factor 1)."""
    k_in = x_absmax.shape[0]
    w_absmax = w[:, :k_in].abs().amax(dim=0)
    scales = torch.stack([smooth_scale(x_absmax.to(w.device), w_absmax, a, b) for a, b in grid])
    return F.pad(scales, (0, w.shape[1] - k_in), value=1.0)
