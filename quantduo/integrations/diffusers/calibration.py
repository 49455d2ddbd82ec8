"""Calibration inputs of a diffusers denoiser: capture its calls inside the pipeline, replay them for
:func:`quantduo.svdquant.quantize_model`.

Typical use::

    samples = capture_calibration_inputs(pipe, prompts, num_samples=64, num_inference_steps=20)
    report = quantize_transformer(pipe.transformer, samples, quantization_config(pipe.transformer))
"""
from __future__ import annotations

import heapq
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from quantduo.svdquant import QuantizationReport, SVDQuantConfig, quantize_model
from quantduo.svdquant.blockwise import LazyWeights, blocks_offloaded, quantize_blockwise
from quantduo.utils import progress_bar

from .rules import denoiser_of, quantization_config, rules_for


def _map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples / lists / dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@dataclass
class CalibrationSample:
    """One captured denoiser call: positional and keyword arguments (tensors detached, on the CPU)."""

    args: tuple
    kwargs: dict
    prompt_index: int
    step: int

    def to(self, device: torch.device) -> tuple[tuple, dict]:
        move = lambda t: t.to(device)  # noqa: E731
        return _map_tensors(self.args, move), _map_tensors(self.kwargs, move)


class _StepSampler:
    """Forward pre-hook that keeps a uniform random subset (bottom-k priorities) of all denoiser calls."""

    def __init__(self, num_samples: int, generator: torch.Generator):
        self.num_samples, self.generator = num_samples, generator
        self.heap: list[tuple[float, int, CalibrationSample]] = []  # max-heap on priority via negation
        self.prompt_index, self.step, self.calls = 0, 0, 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        priority = float(torch.rand((), generator=self.generator))
        self.calls += 1
        step = self.step
        self.step += 1
        if len(self.heap) >= self.num_samples and priority >= -self.heap[0][0]:
            return
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        sample = CalibrationSample(_map_tensors(args, cpu), _map_tensors(kwargs, cpu), self.prompt_index, step)
        heapq.heappush(self.heap, (-priority, self.calls, sample))
        if len(self.heap) > self.num_samples:
            heapq.heappop(self.heap)

    def samples(self) -> list[CalibrationSample]:
        return sorted((s for _, _, s in self.heap), key=lambda s: (s.prompt_index, s.step))


def capture_calibration_inputs(
    pipe: Any,
    prompts: Iterable[str],
    num_samples: int = 128,
    num_inference_steps: int = 20,
    seed: int = 0,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> list[CalibrationSample]:
    """Run ``pipe`` over ``prompts`` and capture the denoiser's inputs at every denoising step.

    A uniform random subset of ``num_samples`` (prompt, step) calls is kept (seeded), stored on the CPU.
    ``pipe_kwargs`` go to the pipeline call (``height``, ``width``, ``guidance_scale``, ...); the output is
    requested as latents so the VAE never runs.
    """
    prompts = list(prompts)
    if not prompts or num_samples <= 0:
        raise ValueError("calibration needs at least one prompt and num_samples > 0")
    _, denoiser = denoiser_of(pipe)
    sampler = _StepSampler(num_samples, torch.Generator().manual_seed(seed))
    handle = denoiser.register_forward_pre_hook(sampler, with_kwargs=True)
    try:
        for i, prompt in enumerate(progress_bar(prompts, desc="calibration prompts", progress=progress)):
            sampler.prompt_index, sampler.step = i, 0
            pipe(  # prompt by keyword: FluxKontextPipeline's first parameter is the image
                prompt=prompt, num_inference_steps=num_inference_steps, output_type="latent",
                generator=torch.Generator().manual_seed(seed + i), **pipe_kwargs,
            )
    finally:
        handle.remove()
    if sampler.calls == 0:
        raise RuntimeError(f"the pipeline never called its denoiser {type(denoiser).__name__}")
    return sampler.samples()


@contextmanager
def denoiser_offloaded(pipe: Any, device: torch.device | str, weights: LazyWeights | None = None) -> Iterator[None]:
    """Run ``pipe`` on ``device`` while its denoiser's blocks stay where they are (the CPU) and move to ``device``
    one at a time, only while they run (:func:`~quantduo.svdquant.blockwise.blocks_offloaded`); the pipeline's other
    models (text encoders, VAE) move to ``device`` for the ``with`` and back afterwards. Device memory: the other
    models, the denoiser without its blocks and one block, so a denoiser larger than the GPU can be calibrated.
    ``weights``: the denoiser is a meta-device skeleton (:func:`~.pipeline.load_pipeline_lazily`) whose blocks are
    read from these files for each run, so host memory holds one block of it too."""
    _, denoiser = denoiser_of(pipe)
    others = [m for m in pipe.components.values() if isinstance(m, nn.Module) and m is not denoiser]
    homes = [getattr(next(m.parameters(), None), "device", None) for m in others]  # None: no parameters
    for module in others:
        module.to(device)
    try:
        with blocks_offloaded(denoiser, block_names(denoiser), device, weights):
            yield
    finally:
        for module, home in zip(others, homes):
            if home is not None:
                module.to(home)


def replay_fn(samples: list[CalibrationSample], progress: bool = True):
    """A ``calib_fn(model)`` for :func:`quantize_model` that re-runs the captured calls on ``model``."""

    def calib_fn(model: nn.Module) -> None:
        device = next(model.parameters()).device
        for sample in progress_bar(samples, desc="calibration replay", progress=progress):
            args, kwargs = sample.to(device)
            model(*args, **kwargs)

    return calib_fn


def quantize_transformer(
    model: nn.Module,
    samples: list[CalibrationSample],
    config: SVDQuantConfig | None = None,
    progress: bool = True,
) -> QuantizationReport:
    """SVDQuant ``model`` (a supported diffusers denoiser) in place on captured calibration ``samples``.

    ``config`` defaults to :func:`quantization_config` (INT4, rank 32) of the model's class.
    """
    if not samples:
        raise ValueError("no calibration samples: run capture_calibration_inputs first")
    config = config or quantization_config(model)
    rules_for(model)  # clear error for unsupported classes even with an explicit config
    return quantize_model(model, replay_fn(samples, progress), config, progress=progress)


def block_names(model: nn.Module) -> list[str]:
    """The blocks of a diffusers denoiser (every element of its block lists, :func:`~.rules.rules_for`) in order."""
    return [f"{lst}.{i}" for lst in rules_for(model).blocks for i in range(len(model.get_submodule(lst)))]


def quantize_transformer_blockwise(
    model: nn.Module,
    samples: list[CalibrationSample],
    work_dir: str,
    config: SVDQuantConfig | None = None,
    **options: Any,
) -> QuantizationReport:
    """:func:`quantize_transformer` one block at a time (:func:`quantduo.svdquant.blockwise.quantize_blockwise`:
    one block on the device at a time, kill-safe, ``resume=True`` continues a run in ``work_dir``).

    ``options``: ``resume``, ``sequential``, ``activations``, ``device``, ``progress``, ``weights`` of
    ``quantize_blockwise``.
    """
    if not samples:
        raise ValueError("no calibration samples: run capture_calibration_inputs first")
    config = config or quantization_config(model)
    calls = [(s.args, s.kwargs) for s in samples]
    return quantize_blockwise(model, block_names(model), calls, config, work_dir, **options)
