"""Whole-forward CUDA graphs for a denoiser (or any module called repeatedly with the same input shapes).

A diffusion pipeline calls its transformer once per step with tensors of identical shapes. Launching the ~2000
kernels of a FLUX step from Python costs more host time than the GPU needs for them once the linears are
fast (BENCHMARKS.md: the fp8 step was host-bound), so :func:`enable_cuda_graph` captures the forward once per
input signature and replays it: new inputs are copied into the captured (static) tensors, the graph replays,
and the outputs are returned as fresh tensors. Works with eager modules and ``torch.compile`` (default mode).
Warm-ups and captures run inside :func:`quantduo.kernels.fp8_linear.for_cuda_graphs`: code that torch.compile traces
there uses the kernels that win under graph replay (fp8 execution's Gluon weight expansion), and is kept apart from
the code traced for plain calls.

Constraints of capture (as ``torch.cuda.graphs``): the forward must not synchronize with the host or take
data-dependent Python branches (the branch taken during capture is replayed). Calls with gradients enabled,
non-CUDA tensors or unhashable non-tensor arguments run eagerly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from quantduo.kernels.fp8_linear import for_cuda_graphs


class GraphedForward:
    """``module.forward`` replayed from one CUDA graph per input signature (shapes, dtypes, devices, and the
    values of non-tensor arguments). ``warmup``: eager calls on a side stream before each capture."""

    def __init__(self, forward, warmup: int = 2):
        self.forward, self.warmup = forward, warmup
        self.previous = None  # the module's instance-attribute forward this replaced (enable_cuda_graph)
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = {}
        self.pool = None

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        key = self._signature(leaves, spec)
        if key is None or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return self.forward(*args, **kwargs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(leaves, spec)
        graph, static_inputs, static_out = self.graphs[key]
        for dst, src in zip(static_inputs, tensors):
            dst.copy_(src)
        graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, static_out)

    @staticmethod
    def _signature(leaves: list, spec) -> tuple | None:
        """Hashable description of a call, or None if it cannot be graphed."""
        parts = []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                if not x.is_cuda or x.requires_grad:
                    return None
                parts.append((tuple(x.shape), x.dtype, x.device, x.stride()))
            else:
                try:
                    hash(x)
                except TypeError:
                    return None
                parts.append((type(x), x))
        return (str(spec), tuple(parts)) if any(isinstance(x, torch.Tensor) for x in leaves) else None

    def _capture(self, leaves: list, spec):
        static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with for_cuda_graphs():  # compiled code traced here picks its kernels for graph replay
            with torch.cuda.stream(stream):
                for _ in range(self.warmup):
                    self.forward(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(stream)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.forward(*args, **kwargs)
        return graph, [x for x in static if isinstance(x, torch.Tensor)], out


def enable_cuda_graph(module: nn.Module, warmup: int = 2, compile: bool = False) -> nn.Module:
    """Make ``module(...)`` replay CUDA graphs of its forward (see :class:`GraphedForward`); returns ``module``.

    compile: capture ``torch.compile(module.forward)`` (the graph must wrap the compiled code, not the other way
    round, so use this rather than ``module.compile()``). Undo with :func:`disable_cuda_graph`. ``module.forward``
    may itself be an instance attribute (diffusers' hooks, e.g. those of ``enable_parallelism``: the graph then
    holds the context-parallel forward); disabling puts it back. Call after
    quantization / LoRA attachment: a graph replays the weights and code paths it captured (re-enable to capture
    afresh)."""
    disable_cuda_graph(module)
    forward = torch.compile(module.forward) if compile else module.forward
    graphed = GraphedForward(forward, warmup)
    graphed.previous = module.__dict__.get("forward")
    module.forward = graphed
    return module


def disable_cuda_graph(module: nn.Module) -> nn.Module:
    """Drop the captured graphs and restore the module's own forward."""
    graphed = module.__dict__.get("forward")
    if isinstance(graphed, GraphedForward):
        del module.forward
        if graphed.previous is not None:
            module.forward = graphed.previous
    return module
