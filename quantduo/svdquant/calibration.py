"""Activation statistics of linear layers, collected with forward hooks over calibration batches."""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
from torch import nn


class CalibrationError(ValueError):
    """Calibration data is unusable (NaN/inf activations, a layer that never ran, ...)."""


@dataclass
class InputStats:
    """Statistics of one linear's input over all calibration calls (``K = in_features``).

    maximum / minimum / absmax: float32 ``[K]``; rows: float32 ``[<= max_rows, K]`` uniformly sampled input rows;
    seen_rows: rows observed in total; call_keys: one key per call identifying the input tensor object (layers with
    identical keys were called on the very same tensor).
    """

    maximum: torch.Tensor
    minimum: torch.Tensor
    rows: torch.Tensor
    seen_rows: int = 0
    priorities: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    call_keys: list[int] = field(default_factory=list)

    @property
    def absmax(self) -> torch.Tensor:
        """Per-channel max |x|, float32 ``[K]``."""
        return self.shifted_absmax(0.0)

    def shifted_absmax(self, shift: float) -> torch.Tensor:
        """Per-channel max |x + shift|, float32 ``[K]`` (the smoothing statistic of shifted unsigned inputs)."""
        return torch.maximum((self.maximum + shift).abs(), (self.minimum + shift).abs())


class ActivationRecorder:
    """Hooks ``nn.Linear`` modules and records :class:`InputStats` for each.

    Row sampling is a reservoir over all calibration rows (seeded per layer: a layer's sample does not depend on
    which other layers are recorded), so memory is bounded by ``max_rows * in_features`` floats per layer whatever
    the calibration size.
    Use as a context manager around the calibration forward passes.
    """

    def __init__(self, modules: dict[str, nn.Linear], max_rows: int = 512, seed: int = 0):
        self.modules, self.max_rows = modules, max_rows
        self.stats: dict[str, InputStats] = {}
        self._seed = seed
        self._generators: dict[tuple[str, torch.device], torch.Generator] = {}
        self._handles: list = []
        self._last_input: torch.Tensor | None = None
        self._next_key = 0

    def __enter__(self) -> "ActivationRecorder":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._last_input = None
        if exc[0] is None:
            self._check_finite()

    def _check_finite(self) -> None:
        """``CalibrationError`` naming the first recorded layer that saw a NaN / inf input (the running maximum and
        minimum propagate them: one check per layer after the passes, no device sync per call)."""
        for name, st in self.stats.items():
            if not (torch.isfinite(st.maximum).all() and torch.isfinite(st.minimum).all()):
                raise CalibrationError(f"non-finite (NaN/inf) calibration activations at the input of layer {name!r}")

    def _input_key(self, x: torch.Tensor) -> int:
        """Same key for consecutive calls on the same tensor object (q/k/v on one input)."""
        if self._last_input is not x:
            self._last_input = x
            self._next_key += 1
        return self._next_key

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = self._input_key(x)
            self._update(name, x.detach().reshape(-1, x.shape[-1]), key)

        return hook

    def _update(self, name: str, rows: torch.Tensor, key: int) -> None:
        """Fold one call's input rows ``[T, K]`` (any float dtype; max and min are exact in it) into ``name``'s
        statistics. Few operations per call (each costs a host-side dispatch, which the device does not hide)."""
        st = self.stats.get(name)
        if st is None:
            k = rows.shape[1]
            st = self.stats[name] = InputStats(
                maximum=torch.full((k,), -float("inf"), device=rows.device),
                minimum=torch.full((k,), float("inf"), device=rows.device),
                rows=torch.zeros(0, k, device=rows.device),
                priorities=torch.zeros(0, device=rows.device),
            )
        low, high = torch.aminmax(rows, dim=0)
        st.maximum = torch.maximum(st.maximum, high)
        st.minimum = torch.minimum(st.minimum, low)
        st.call_keys.append(key)
        st.rows = self._reservoir(st, rows, self._generator(name, rows.device))
        st.seen_rows += rows.shape[0]

    def _generator(self, name: str, device: torch.device) -> torch.Generator:
        """Layer ``name``'s generator of row priorities on ``device`` (no host round trip per call on an
        accelerator), seeded with the run's seed plus the CRC-32 of the name."""
        key = (name, device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device).manual_seed(self._seed + zlib.crc32(name.encode()))
        return self._generators[key]

    def _reservoir(self, st: InputStats, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Keep a uniform sample of at most ``max_rows`` of all rows seen so far, float32 ``[<= max_rows, K]``
        (bottom-k sampling: every row draws a random priority and the ``max_rows`` smallest priorities survive; once
        full, the sample is in increasing priority). Only the new rows that can survive (their own ``max_rows``
        smallest priorities) are gathered and converted to float32."""
        fresh = torch.rand(rows.shape[0], generator=generator, device=rows.device)
        if len(st.priorities) + len(fresh) <= self.max_rows:
            st.priorities = torch.cat([st.priorities, fresh])
            return torch.cat([st.rows, rows.float()])
        if len(fresh) > self.max_rows:
            fresh, pick = fresh.topk(self.max_rows, largest=False)
            rows = rows.index_select(0, pick)
        st.priorities, keep = torch.cat([st.priorities, fresh]).topk(self.max_rows, largest=False)
        return torch.cat([st.rows, rows.float()]).index_select(0, keep)

    def shared_input_groups(self, names: list[str]) -> list[list[str]]:
        """Partition ``names`` into groups of layers that were always called on the same input tensor
        and saw identical statistics; order follows ``names``."""
        groups: dict[tuple, list[str]] = {}
        for name in names:
            st = self.stats[name]
            groups.setdefault((tuple(st.call_keys), st.maximum.shape[0]), []).append(name)
        result = []
        for members in groups.values():
            first = self.stats[members[0]].absmax
            same = [m for m in members if torch.equal(self.stats[m].absmax, first)]
            result.append(same)
            result.extend([m] for m in members if m not in same)
        order = {n: i for i, n in enumerate(names)}
        return sorted(result, key=lambda g: order[g[0]])
