"""Block-by-block SVDQuant calibration at full size: FLUX.1 (and a Wan-size video block stack), one device call.

Usage (one GPU):
    PYTHONPATH=. python benchmarks/calibrate.py [--samples 128] [--gpu-gb 16] [--wan-blocks 8] [--wan-samples 16] [--activations auto|device|host|disk]
    PYTHONPATH=. python benchmarks/calibrate.py --small --samples 2 --wan-samples 2   # CPU smoke test: 2 heads, 1-2 blocks

Random-weight BF16 models of the real configs, synthetic calibration calls of the real shapes (FLUX.1-dev: 4096
image + 512 text tokens per sample; Wan 2.1 14B: 5 latent frames of 60x104 = 7800 video tokens + 512 text tokens),
quantized by :func:`quantduo.integrations.diffusers.quantize_transformer_blockwise` (INT4 W4A4, rank 32, default
search settings, full-precision block inputs). The GPU is capped with ``torch.cuda.set_per_process_memory_fraction``
at ``--gpu-gb``: the run fails if it needs more. Prints per block the elapsed time, then wall time by phase
(capture: moving / running blocks on calibration calls and collecting statistics; search: the smoothing search;
svd: the low-rank refinement; pack: building the 4-bit layers; save: writing each finished block, fsynced), peak
GPU memory (``max_memory_allocated``) and peak host memory: ``peak_host_gib`` the process's max RSS, and
``peak_host_gib_calibrating`` the RSS sampled during the calibration alone (with ``--weights disk``, the default,
the model is written to safetensors files one block at a time and read back one block at a time, as ``quantduo
quantize --blockwise`` reads a model folder; with ``--weights memory`` the BF16 model stays in host memory).
Writes ``calibrate.json`` to ``--out``. ``--flux-blocks 3 6 --quick --samples 1 --device cpu`` compares the two
``--weights`` on the CPU at full width.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

from benchmarks.flux import FLUX_DEV, build_model
from quantduo.integrations.diffusers import (CalibrationSample, block_names, lazy_denoiser, quantization_config,
                                             quantize_transformer_blockwise)
from quantduo.svdquant.blockwise import ACTIVATIONS, LazyWeights
from quantduo.svdquant.phases import PHASE_SECONDS, reset_phases

WAN_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, cross_attn_norm=True, qk_norm="rms_norm_across_heads")


def to_host(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` moved to the CPU (the GPU's cache emptied)."""
    model = model.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def on_disk(model: torch.nn.Module, folder: Path) -> tuple[torch.nn.Module, LazyWeights]:
    """Write ``model``'s tensors to ``folder`` (one safetensors file per block, so host memory holds one block at a
    time) and return a meta-device skeleton of it with the :class:`LazyWeights` of those files, as
    ``quantduo quantize --blockwise`` sees a model folder; ``model`` is emptied (its tensors moved to meta)."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict] = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")  # "transformer_blocks.3.attn..." -> file "transformer_blocks.3"
        group = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else "rest"
        groups.setdefault(group, {})[key] = tensor
    files = []
    for group, tensors in groups.items():
        files.append(folder / f"{group}.safetensors")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, files[-1])
    skeleton = lazy_denoiser({**model.config, "_class_name": type(model).__name__}, "benchmark", torch.bfloat16)
    model.to("meta")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return skeleton, LazyWeights(files, torch.bfloat16)


def flux_samples(n: int) -> list[CalibrationSample]:
    """FLUX.1-dev calls at 1024x1024: latents ``[1, 4096, 64]``, T5 ``[1, 512, 4096]``, pooled CLIP ``[1, 768]``."""
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    samples = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        kwargs = dict(hidden_states=torch.randn(1, 4096, 64, generator=g).bfloat16(),
                      encoder_hidden_states=torch.randn(1, 512, 4096, generator=g).bfloat16(),
                      pooled_projections=torch.randn(1, 768, generator=g).bfloat16(),
                      timestep=torch.rand(1, generator=g).bfloat16(), guidance=torch.full((1,), 3.5).bfloat16(),
                      img_ids=img_ids, txt_ids=torch.zeros(512, 3), return_dict=False)
        samples.append(CalibrationSample((), kwargs, i, 0))
    return samples


def wan_samples(n: int) -> list[CalibrationSample]:
    """Wan 2.1 calls: latents ``[1, 16, 5, 60, 104]`` (7800 tokens after 1x2x2 patches), UMT5 ``[1, 512, 4096]``."""
    samples = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        kwargs = dict(hidden_states=torch.randn(1, 16, 5, 60, 104, generator=g).bfloat16(),
                      timestep=torch.randint(0, 1000, (1,), generator=g),
                      encoder_hidden_states=torch.randn(1, 512, 4096, generator=g).bfloat16(), return_dict=False)
        samples.append(CalibrationSample((), kwargs, i, 0))
    return samples


class PeakRSS:
    """Context manager sampling this process's resident memory (``/proc/self/status`` VmRSS, Linux) every 20 ms in
    a thread: ``peak`` bytes during the ``with`` (unlike ``ru_maxrss``, not including what was freed before)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> "PeakRSS":
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def calibrate(name: str, model: torch.nn.Module, samples: list, args) -> dict:
    """Quantize ``model`` block by block on ``samples`` (``--weights disk``: from its files, one block read at a
    time); wall time by phase, peak memory."""
    weights, folder = None, Path(args.work or tempfile.gettempdir()) / f"{name.split()[0]}-weights"
    if args.weights == "disk":
        t0 = time.perf_counter()
        model, weights = on_disk(model, folder)
        print(f"{name}: written to disk in {time.perf_counter() - t0:.0f} s", flush=True)
    quick = dict(smooth=False, lowrank_iters=1, search_tokens=64) if args.quick else {}
    config = quantization_config(model, **quick)
    cuda = args.device == "cuda"
    if cuda:  # the model was built on the GPU without the cap, then moved to the CPU
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gb * 2**30 / total))
        print(f"{name}: {torch.cuda.get_device_name()}, GPU cap {args.gpu_gb} GiB of {total / 2**30:.0f}", flush=True)
        torch.cuda.reset_peak_memory_stats()
    reset_phases()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work) as work, PeakRSS() as rss:
        report = quantize_transformer_blockwise(model, samples, work, config, activations=args.activations,
                                                device=args.device, weights=weights)
    total = time.perf_counter() - start
    result = dict(model=name, blocks=len(block_names(model)), samples=len(samples), seconds=round(total, 1),
                  phases_s={k: round(v, 1) for k, v in PHASE_SECONDS.items()},
                  peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                  peak_host_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  peak_host_gib_calibrating=round(rss.peak / 2**30, 2),
                  layers_quantized=len(report.quantized()))
    print(json.dumps(result), flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    if cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="FLUX calibration calls")
    parser.add_argument("--wan-blocks", type=int, default=8, help="Wan 14B blocks (0: skip Wan)")
    parser.add_argument("--wan-samples", type=int, default=16)
    parser.add_argument("--gpu-gb", type=float, default=16.0, help="GPU memory cap (set_per_process_memory_fraction)")
    parser.add_argument("--activations", choices=ACTIVATIONS, default="auto",
                        help="where calibration activations live between blocks")
    parser.add_argument("--work", default=None, help="parent folder of the work dirs (default: the system temp)")
    parser.add_argument("--weights", choices=("disk", "memory"), default="disk",
                        help="disk: the model is written to safetensors files and read back one block at a time (as "
                             "`quantduo quantize --blockwise` reads a model folder; host memory: one block); memory: "
                             "the BF16 model stays in host memory")
    parser.add_argument("--out", default="out/calibrate")
    parser.add_argument("--small", action="store_true", help="2-head, 1-2 block configs (smoke test)")
    parser.add_argument("--flux-blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), default=None,
                        help="FLUX.1 at full width with this many double and single blocks (default: 19 38)")
    parser.add_argument("--quick", action="store_true",
                        help="no smoothing search, one refinement, 64 rows (memory measurements on the CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    small = dict(num_attention_heads=2) if args.small else {}
    results = []
    t0 = time.perf_counter()
    blocks = dict(num_layers=1, num_single_layers=1) if args.small else {}
    if args.flux_blocks:
        blocks = dict(num_layers=args.flux_blocks[0], num_single_layers=args.flux_blocks[1])
    flux = build_model(dict(FLUX_DEV, **small, **blocks), args.device)
    if args.weights == "memory":
        flux = to_host(flux)
    print(f"FLUX.1 built in {time.perf_counter() - t0:.0f} s", flush=True)
    results.append(calibrate("FLUX.1-dev", flux, flux_samples(args.samples), args))
    del flux
    if args.wan_blocks:
        wan = build_model(dict(WAN_14B, num_layers=args.wan_blocks, **small), args.device, WanTransformer3DModel)
        if args.weights == "memory":
            wan = to_host(wan)
        results.append(calibrate(f"Wan2.1-14B ({args.wan_blocks} of 40 blocks)", wan, wan_samples(args.wan_samples), args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibrate.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
