"""Quality report figure: per-layer output error (naive W4A4 vs SVDQuant) and error vs low-rank rank."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import SVDQuantConfig
from .lowrank import solve_group
from .quantize import QuantizationReport
from ..utils import atomic_write


def rank_sweep(
    w: torch.Tensor, x: torch.Tensor, cfg: SVDQuantConfig, ranks: tuple[int, ...] = (0, 8, 16, 32, 64)
) -> list[float]:
    """Relative output error of SVDQuant (with smoothing) of weight ``w [N, K]`` on rows ``x [T, K]``
    for each rank in ``ranks``."""
    absmax = x.abs().amax(dim=0)
    return [
        solve_group(w, x, absmax, cfg, act_format=cfg.act_format, rank=r, smooth=cfg.smooth).rel_error
        for r in ranks
    ]


def plot_quality_report(
    report: QuantizationReport, path: str | Path, rank_curves: dict[str, tuple[list[int], list[float]]] | None = None
) -> Path:
    """Save a PNG: left, per-layer relative output error (log scale) of naive W4A4 and SVDQuant;
    right (if ``rank_curves``: name -> (ranks, errors)), error vs rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r for r in report.quantized() if r.error is not None]
    ncols = 2 if rank_curves else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols + max(0, len(layers) * 0.15), 4.5), squeeze=False)
    ax = axes[0, 0]
    pos = range(len(layers))
    ax.bar([p - 0.2 for p in pos], [r.naive_error for r in layers], width=0.4, label="naive W4A4")
    ax.bar([p + 0.2 for p in pos], [r.error for r in layers], width=0.4, label="SVDQuant")
    ax.set_xticks(list(pos), [r.name for r in layers], rotation=90, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("relative output error")
    ax.set_title("per-layer error")
    ax.legend()
    if rank_curves:
        ax = axes[0, 1]
        for name, (ranks, errors) in rank_curves.items():
            ax.plot(ranks, errors, marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("low-rank branch rank")
        ax.set_ylabel("relative output error")
        ax.set_title("error vs rank")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
