"""Which linears read the token streams, and which only the per-sample conditioning path.

A model call's *token streams* are its floating-point tensor arguments with a token axis (3 or more dims:
``[B, N, C]`` tokens, ``[B, C, H, W]`` images, ``[B, C, F, H, W]`` videos, nested lists of them). Everything else
(timesteps ``[B]``, pooled embeddings ``[B, D]``, position ids ``[N, 3]``) is conditioning. :class:`StreamTracker`
follows data dependencies through every torch call (a ``TorchFunctionMode``, works under ``no_grad`` and costs no
memory) and records, for each hooked ``nn.Linear``, whether its input depends on a token stream. A linear that
never does — a diffusion model's adaLN modulation ``Linear(SiLU(temb))``, a UNet's ``time_emb_proj`` — sees one
row per sample: 4-bit activations buy nothing there, so it is quantized weight-only.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

# ops whose output holds none of a tensor argument's data (fresh tensors shaped / typed like it)
_NO_DATA = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
            "new_zeros", "new_ones", "new_empty", "new_full"}
# ops whose output holds only ``self``'s data (the other tensor gives a dtype / shape)
_SELF_ONLY = {"type_as", "to", "expand_as", "view_as", "reshape_as"}


def stream_tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The token-stream tensors among a call's arguments: floating point with 3 or more dims."""
    leaves = pytree.tree_leaves((args, kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 3]


def _tensors(obj, found: list) -> list:
    """The tensors in ``obj`` (nested tuples / lists / dicts), appended to ``found``: a plain walk, several times
    cheaper than ``pytree.tree_leaves`` on the per-op path of :class:`_Taint`."""
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _tensors(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, found)
    return found


class _Taint(TorchFunctionMode):
    """Marks the outputs (and in-place targets) of every torch call that reads a marked tensor."""

    def __init__(self):
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}

    def mark(self, t: torch.Tensor) -> None:
        key = id(t)

        def forget(ref, key=key):
            if self._marked.get(key) is ref:
                del self._marked[key]

        self._marked[key] = weakref.ref(t, forget)

    def is_marked(self, t: torch.Tensor) -> bool:
        ref = self._marked.get(id(t))
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        sources = () if name in _NO_DATA else args[:1] if name in _SELF_ONLY else (args, kwargs)
        if any(self.is_marked(t) for t in _tensors(sources, [])):
            targets = _tensors(out, [])
            if name == "__setitem__" or name.endswith("_") or "out" in kwargs:  # in place: the target now holds it
                targets += _tensors((args[0], kwargs.get("out")), [])
            for t in targets:
                self.mark(t)
        return out


class StreamTracker:
    """Context manager: while active, calls of ``model`` mark their token streams and every linear in ``linears``
    records whether its input depends on one.

    ``reads_stream[name]``: the set of booleans seen over the calls of linear ``name`` (``{True}``: token-stream
    inputs, ``{False}``: conditioning only, both: ambiguous).

    ``max_calls``: track only the first ``max_calls`` calls of ``model`` (``None``: all). The data flow is the
    model's code, the same in every call of one structure, while tracking costs a Python step per torch operation
    (including those of other forward hooks, e.g. calibration statistics): the tracking mode is pushed for a
    tracked call only and popped when the call ends, also when it raises.
    """

    def __init__(self, model: nn.Module, linears: dict[str, nn.Module], max_calls: int | None = None):
        self.model, self.linears, self.max_calls = model, linears, max_calls
        self.reads_stream: dict[str, set[bool]] = {}
        self.calls = 0
        self._mode = _Taint()
        self._tracking = False
        self._depth = 0  # nesting of model calls (a call of the model inside its own forward is part of the outer)
        self._handles: list = []

    def __enter__(self) -> "StreamTracker":
        self._handles.append(self.model.register_forward_pre_hook(self._start_call, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end_call, always_call=True))
        for name, module in self.linears.items():
            self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self._stop_tracking()
        self._depth = 0
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _start_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Model pre-hook: a tracked call marks its token streams and pushes the tracking mode."""
        self._depth += 1
        if self._depth > 1 or (self.max_calls is not None and self.calls >= self.max_calls):
            return
        self.calls += 1
        for t in stream_tensors(args, kwargs):
            self._mode.mark(t)
        self._mode.__enter__()
        self._tracking = True

    def _end_call(self, module: nn.Module, args: tuple, output) -> None:
        """Model post-hook (also when the call raised): the outermost call's end pops the tracking mode."""
        self._depth -= 1
        if self._depth == 0:
            self._stop_tracking()

    def _stop_tracking(self) -> None:
        if self._tracking:
            self._tracking = False
            self._mode.__exit__(None, None, None)

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._tracking:
                self.reads_stream.setdefault(name, set()).add(self._mode.is_marked(args[0]))

        return hook

    def conditioning_only(self) -> set[str]:
        """Linears whose every call read conditioning only."""
        return {name for name, seen in self.reads_stream.items() if seen == {False}}

    def ambiguous(self) -> list[str]:
        """Linears called on a token stream in some calls and on conditioning only in others."""
        return sorted(name for name, seen in self.reads_stream.items() if len(seen) > 1)
