"""``quantduo demo``: both systems on the bundled tiny models, in a few minutes on a CPU.

1. SVDQuant: the tiny digits FLUX model is quantized W4A4 with SVDQuant INT4 and with naive INT4; a PNG grid
   shows BF16 | naive W4A4 | SVDQuant W4A4 digits with the PSNR of each column against BF16, and a quality
   report PNG shows per-layer errors and error vs rank.
2. DuoAttention: the tiny retrieval LM's heads are identified; passkey accuracy and KV-cache memory are
   printed for full attention, DuoAttention (50% streaming heads) and streaming-only, and a gate heatmap saved.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch

from quantduo.cli.validate import device, output_folder
from quantduo.duo.demo import run_duo_demo
from quantduo.integrations.diffusers import quantization_config
from quantduo.models.tiny_dit import load_tiny_dit, sample_digits
from quantduo.svdquant import ActivationRecorder, SVDQuantConfig, quantize_model
from quantduo.svdquant.report import plot_quality_report, rank_sweep
from quantduo.utils import atomic_folder, atomic_write, write_manifest

matplotlib.use("Agg")

DIGITS_PER_CLASS = 2
SAMPLING_STEPS = 20
RANK_CURVE_LAYERS = ("transformer_blocks.1.attn.to_out.0", "transformer_blocks.0.ff.net.0.proj", "single_transformer_blocks.1.proj_out")


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (``[B, C, H, W]``) against ``reference``."""
    mse = float((images.float() - reference.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _labels() -> torch.Tensor:
    return torch.arange(10).repeat_interleave(DIGITS_PER_CLASS)


def _quantized_dit(reference, config, device):
    """A copy of the tiny DiT whose transformer is quantized with ``config``, calibrated on its own sampling."""
    model = copy.deepcopy(reference)
    calib_labels = torch.arange(10, device=device)

    def calibrate(_transformer):
        sample_digits(model, calib_labels, steps=SAMPLING_STEPS, seed=1234)

    report = quantize_model(model.transformer, calibrate, config)
    return model, report


def _panel(images: torch.Tensor) -> torch.Tensor:
    """Tile ``[10 * DIGITS_PER_CLASS, 1, H, W]`` (class-major) into ``[DIGITS_PER_CLASS * H, 10 * W]``."""
    _, _, h, w = images.shape
    tiles = images[:, 0].reshape(10, DIGITS_PER_CLASS, h, w).permute(1, 2, 0, 3)
    return tiles.reshape(DIGITS_PER_CLASS * h, 10 * w)


def _save_comparison(columns: dict[str, torch.Tensor], scores: dict[str, float], path: Path) -> Path:
    """PNG with one panel per method (digits 0-9 across, samples down); titles carry the PSNR vs BF16."""
    fig, axes = plt.subplots(1, len(columns), figsize=(4.4 * len(columns), 1.4), gridspec_kw={"wspace": 0.08})
    for ax, (name, images) in zip(axes, columns.items()):
        ax.imshow(_panel(images), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.axis("off")
        ax.set_title(name if math.isinf(scores[name]) else f"{name}: PSNR {scores[name]:.1f} dB", fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _rank_curves(reference, names: tuple[str, ...], ranks=(0, 4, 8, 16, 32, 64)) -> dict:
    """Error vs rank of SVDQuant for a few layers of the BF16 model, on rows captured while sampling."""
    layers = {name: reference.transformer.get_submodule(name) for name in names}
    recorder = ActivationRecorder(layers, max_rows=256)
    with recorder, torch.no_grad():
        sample_digits(reference, torch.arange(10), steps=SAMPLING_STEPS, seed=1234)
    cfg = SVDQuantConfig(dtype="float32", lowrank_iters=10)
    return {
        name: (list(ranks), rank_sweep(layers[name].weight.float(), recorder.stats[name].rows, cfg, ranks))
        for name in names
    }


def svdquant_demo(out_dir: Path, device: str) -> dict:
    """Quantize the tiny digits DiT (SVDQuant INT4 vs naive INT4), save the grid and the quality report."""
    reference = load_tiny_dit(device=device, dtype=torch.bfloat16)
    svdq_cfg = quantization_config(reference.transformer, "int4", rank=32, lowrank_iters=20, search_tokens=256)
    naive_cfg = quantization_config(reference.transformer, "int4", rank=0, smooth=False, unsigned_act=[])
    images = {"BF16": sample_digits(reference, _labels(), steps=SAMPLING_STEPS, seed=0)}
    reports = {}
    for name, cfg in (("naive W4A4", naive_cfg), ("SVDQuant W4A4", svdq_cfg)):
        print(f"[svdquant] quantizing the tiny DiT: {name}")
        model, reports[name] = _quantized_dit(reference, cfg, device)
        images[name] = sample_digits(model, _labels(), steps=SAMPLING_STEPS, seed=0)
    scores = {name: psnr(img, images["BF16"]) for name, img in images.items()}
    grid = _save_comparison(images, scores, out_dir / "digits_bf16_naive_svdquant.png")
    report = reports["SVDQuant W4A4"]
    curves = _rank_curves(reference, RANK_CURVE_LAYERS)
    plot_quality_report(report, out_dir / "svdquant_quality_report.png", curves)
    print(report.summary())
    return {
        "psnr_db": {k: v for k, v in scores.items() if not math.isinf(v)},
        "quantized_layers": len(report.quantized()),
        "error_vs_rank": {name: dict(zip(*curve)) for name, curve in curves.items()},
        "grid_png": grid.name,
    }


def run_demo(out_dir: Path, device: str | None = None, skip_duo: bool = False, made_by: dict | None = None) -> dict:
    """Run both halves of the demo; returns (and writes ``summary.json``) the headline numbers. ``out_dir`` is
    written atomically as a folder, with a manifest (``made_by``: e.g. the command line)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    with atomic_folder(out_dir) as tmp:
        summary = {"device": device, "svdquant": svdquant_demo(tmp, device)}
        if not skip_duo:
            summary["duo"] = run_duo_demo(tmp, device)
        summary["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
        write_manifest(tmp, {"kind": "demo", "device": device, **(made_by or {})})
    psnrs = summary["svdquant"]["psnr_db"]
    print("\n== quantduo demo ==")
    print("SVDQuant digits, PSNR vs BF16: " + ", ".join(f"{k} {v:.1f} dB" for k, v in psnrs.items()))
    for mode in ("full", "duo", "streaming") if "duo" in summary else ():
        res = summary["duo"][mode]
        print(f"DuoAttention {mode:>9}: passkey accuracy {res['accuracy']:.3f}, KV cache {res['kv_bytes']:,} bytes")
    print(f"pictures and numbers in {out_dir}/ ({summary['seconds']} s on {device})")
    return summary


def _cmd_demo(args: argparse.Namespace) -> int:
    """Check --out, then run the demo into it."""
    out = output_folder(args.out, "--out")
    run_demo(out, args.device, args.skip_duo, made_by={"command": args.command_line})
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run both systems on the bundled tiny models")
    parser.add_argument("--out", default="out/demo", help="output folder for PNGs and summary.json (new, empty, or "
                                                          "written by quantduo)")
    parser.add_argument("--device", type=device, default=None, help="cpu, cuda or cuda:N (default: cuda when "
                                                                    "available)")
    parser.add_argument("--skip-duo", action="store_true", help="only the SVDQuant half")
    parser.set_defaults(func=_cmd_demo)
