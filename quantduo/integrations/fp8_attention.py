"""Opt-in FP8 attention for diffusers DiTs (FLUX, SD3, PixArt): :func:`enable_fp8_attention` /
:func:`disable_fp8_attention`.

Every attention module of the model (anything with ``processor`` and ``set_processor``: diffusers ``Attention``,
``FluxAttention``) gets a :class:`FP8AttentionProcessor` wrapping its current processor. The wrapper runs the
original processor unchanged (projections, norms, RoPE, output projection) while its calls to
``F.scaled_dot_product_attention`` (diffusers' native backend, SD3 / PixArt processors) go to FP8 attention:
one of two backends on CUDA, the pure-PyTorch reference of the backend's quantization
(:mod:`quantduo.formats.attention_fp8`) elsewhere:

* ``"triton"`` (default): :func:`quantduo.kernels.attention_fp8.fp8_attention`, one scale per block of ``q_block``
  query / ``kv_block`` key tokens per head;
* ``"fa3"``: :func:`quantduo.kernels.attention_fa3.fa3_fp8_attention`, FlashAttention-3's Hopper kernel (an
  optional dependency built from source, docs/fa3.md), one scale per head. Where the processor is one that feeds
  SDPA with Q / K straight from bias-free RMSNorms and a rotary embedding (:data:`NORM_BOUNDED_PROCESSORS`: FLUX,
  SD3), their magnitude is bounded by ``sqrt(head_dim) * max|norm weight|`` (an RMSNorm output has L2 norm
  ``sqrt(D)`` before its weight, a rotation keeps each pair's norm): :func:`norm_bounds` gives those static bounds
  and Q / K are quantized by them, a pointwise operation ``torch.compile`` fuses into the rotary embedding, instead
  of a per-head absmax over the whole sequence (V always uses its absmax). Calls of diffusers' plain FLUX processor
  (``FluxAttnProcessor``) skip the processor (``fuse_flux_qk``, on by default with this backend):
  :func:`quantduo.integrations.diffusers.flux_fa3.flux_fa3_attention` computes the same with Q / K normalized,
  concatenated, rotated and quantized by one kernel (see docs/fa3.md); ``fuse_flux_qk=False`` keeps the processor.

Calls a backend cannot serve (a mask, dropout, causal, grouped-query heads, a head dim the backend lacks: not a power
of two >= 16 for Triton, not 64 / 96 / 128 / 192 / 256 for FlashAttention-3) go to SDPA unchanged. The
redirection is a hook that the wrapper installs as ``F.scaled_dot_product_attention`` for the duration of the
original processor's call and then removes: a plain function that ``torch.compile`` traces into the model's graph
(a ``TorchFunctionMode`` broke the graph at every attention module), and nothing outside the call sees it (code that
compares functions with ``F.scaled_dot_product_attention``, as PyTorch's ``CausalBias`` does, keeps working). SDPA
calls made by other threads while a wrapper runs would see it too: run FP8-attention models from one thread.

Under diffusers' context parallelism (``enable_parallelism``) the attributes diffusers sets on processors
(``_parallel_config``, ``_attention_backend``) reach the wrapped processor. Ulysses works (after its all-to-all each
rank holds the whole sequence of its heads, which is what FP8 attention quantizes); ring attention does not (it
merges per-KV-shard results by their log-sum-exp, which FP8 attention does not return): a ``ValueError`` at the
call.

Off by default: see BENCHMARKS.md for the error vs 16-bit attention and the tiny-DiT PSNR change.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from quantduo.formats.attention_fp8 import (DEFAULT_KV_BLOCK, DEFAULT_Q_BLOCK, fp8_attention_heads_reference,
                                            fp8_attention_reference)
from quantduo.kernels.attention_fa3 import FA3_AVAILABLE, FA3_HEAD_DIMS, fa3_fp8_attention
from quantduo.kernels.attention_fp8 import fp8_attention

from .diffusers.flux_fa3 import flux_fa3_attention, serves
from .parallel import context_parallel_config

__all__ = ["BACKENDS", "FP8AttentionProcessor", "NORM_BOUNDED_PROCESSORS", "enable_fp8_attention",
           "disable_fp8_attention", "fp8_attention_enabled", "norm_bounds"]

BACKENDS = ("triton", "fa3")
# processors whose SDPA q / k are RMSNorm outputs, then at most a rotary embedding (diffusers' FLUX and SD3 ones)
NORM_BOUNDED_PROCESSORS = ("FluxAttnProcessor", "FluxAttnProcessor2_0", "JointAttnProcessor2_0")
NORM_BOUND_MARGIN = 1.02  # bf16 rounding of the normalized values and of the rotation

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = dict(attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)


def _sdpa_call(args: tuple, kwargs: dict) -> dict:
    """The arguments of an ``F.scaled_dot_product_attention`` call by name (defaults filled in)."""
    call = dict(_SDPA_DEFAULTS)
    call.update(zip(_SDPA_ARGS, args))
    call.update(kwargs)
    return call


def _servable(call: dict, backend: str) -> bool:
    """Whether ``backend`` computes this SDPA call (no mask / dropout / causal / GQA; a head dim it has)."""
    q, k = call["query"], call["key"]
    d = q.shape[-1]
    plain = call["attn_mask"] is None and not call["dropout_p"] and not call["is_causal"] and not call["enable_gqa"]
    head_dim_ok = d in FA3_HEAD_DIMS if backend == "fa3" else d >= 16 and d & (d - 1) == 0
    return plain and q.dim() == 4 and k.shape[:2] == q.shape[:2] and head_dim_ok


def run_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None,
                      q_block: int, kv_block: int, backend: str = "triton",
                      bounds: tuple[float, float] | None = None) -> torch.Tensor:
    """FP8 attention of ``[B, H, S, D]`` tensors by ``backend`` on CUDA, the reference of its quantization
    elsewhere (``"fa3"``: one scale per head, from the static ``bounds`` of q / k where given; ``q_block`` /
    ``kv_block`` unused)."""
    if backend == "fa3":
        q_bound, k_bound = (None, None) if bounds is None else bounds
        if q.is_cuda:
            return fa3_fp8_attention(q, k, v, sm_scale, q_bound, k_bound)
        return fp8_attention_heads_reference(q, k, v, sm_scale, q_bound, k_bound)
    if q.is_cuda:
        return fp8_attention(q, k, v, sm_scale, block_m=q_block, block_n=kv_block)
    return fp8_attention_reference(q, k, v, sm_scale, q_block=q_block, kv_block=kv_block)


_active: tuple | None = None  # (q_block, kv_block, backend, bounds) while an FP8AttentionProcessor runs
_sdpa = F.scaled_dot_product_attention  # the SDPA the hook replaced while a wrapper runs


def _fp8_sdpa(*args, **kwargs) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` while an :class:`FP8AttentionProcessor` runs its processor: servable calls
    go to :func:`run_fp8_attention`, others to the SDPA it replaced. A plain function reading module globals, so
    ``torch.compile`` traces through it without a graph break."""
    if _active is not None:
        call = _sdpa_call(args, kwargs)
        if _servable(call, _active[2]):
            return run_fp8_attention(call["query"], call["key"], call["value"], call["scale"], *_active)
    return _sdpa(*args, **kwargs)


_FLUX_ARGS = ("attn", "hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")


def _flux_call(args: tuple, kwargs: dict) -> tuple | None:
    """The arguments of a ``FluxAttnProcessor`` call in the order of :data:`_FLUX_ARGS` (None where the call
    passes others)."""
    if len(args) > len(_FLUX_ARGS) or set(kwargs) - set(_FLUX_ARGS[len(args):]):
        return None
    call = dict.fromkeys(_FLUX_ARGS)
    call.update(zip(_FLUX_ARGS, args))
    call.update(kwargs)
    return tuple(call.values()) if call["attn"] is not None and call["hidden_states"] is not None else None


def ring_degree(processor) -> int:
    """The ring degree of the context parallelism diffusers configured on ``processor`` (1 without)."""
    config = context_parallel_config(processor)
    return 1 if config is None else config.ring_degree


def check_no_ring(processor) -> None:
    """``ValueError`` when ``processor`` runs under ring context parallelism (see the module docstring)."""
    degree = ring_degree(processor)
    if degree > 1:
        raise ValueError(f"quantduo FP8 attention cannot run under diffusers' ring context parallelism "
                         f"(ring_degree={degree}): ring attention merges per-shard results by their log-sum-exp, "
                         f"which FP8 attention does not return; use ContextParallelConfig(ulysses_degree=...) or "
                         f"disable_fp8_attention")


class FP8AttentionProcessor:
    """Wraps a diffusers attention processor: same call, FP8 attention inside (``q_block`` / ``kv_block`` tokens
    per quantization block of Q / of K and V for the Triton backend; ``backend`` one of :data:`BACKENDS`;
    ``bounds``: static magnitude bounds of q / k for the ``"fa3"`` backend, see :func:`norm_bounds`;
    ``fuse_flux_qk``: FLUX's plain processor calls go to
    :func:`~quantduo.integrations.diffusers.flux_fa3.flux_fa3_attention` where it serves them, ``"fa3"`` only; None:
    on for ``"fa3"``).
    ``original`` is the wrapped processor. Each original processor class
    gets its own subclass whose ``__call__`` reports the original's signature, so diffusers passes it the same
    keyword arguments. Attributes other than its own are read from and written to the original (diffusers sets
    ``_parallel_config`` / ``_attention_backend``). While it runs the original, the SDPA hook sends the original's
    servable ``F.scaled_dot_product_attention`` calls to FP8 attention."""

    _OWN = ("original", "q_block", "kv_block", "backend", "bounds", "fuse_flux_qk")

    def __new__(cls, original=None, *args, **kwargs):  # no arguments: copy / unpickle of a made wrapper
        return object.__new__(cls if original is None else _wrapper_class(type(original)))

    def __init__(self, original, q_block: int = DEFAULT_Q_BLOCK, kv_block: int = DEFAULT_KV_BLOCK,
                 backend: str = "triton", bounds: tuple[float, float] | None = None,
                 fuse_flux_qk: bool | None = None):
        check_backend(backend)
        if fuse_flux_qk is None:
            fuse_flux_qk = backend == "fa3"
        if fuse_flux_qk and backend != "fa3":
            raise ValueError(f"fuse_flux_qk needs the fa3 backend, not {backend!r}")
        for name, blk in (("q_block", q_block), ("kv_block", kv_block)):
            if blk < 16 or blk & (blk - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
        self.original, self.q_block, self.kv_block, self.backend = original, q_block, kv_block, backend
        self.bounds, self.fuse_flux_qk = bounds, fuse_flux_qk

    def _run(self, *args, **kwargs):
        global _active, _sdpa
        check_no_ring(self.original)
        flux_call = _flux_call(args, kwargs) if self.fuse_flux_qk else None
        if flux_call is not None:
            attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb = flux_call
            if serves(self.original, attn, hidden_states, encoder_hidden_states, attention_mask, self.bounds):
                return flux_fa3_attention(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.bounds)
        outer_active, outer_sdpa = _active, F.scaled_dot_product_attention
        _active = (self.q_block, self.kv_block, self.backend, self.bounds)
        if outer_sdpa is not _fp8_sdpa:
            _sdpa, F.scaled_dot_product_attention = outer_sdpa, _fp8_sdpa
        try:
            return self.original(*args, **kwargs)
        finally:
            _active, F.scaled_dot_product_attention = outer_active, outer_sdpa

    def __call__(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    def __getattr__(self, name: str):  # _attention_backend, _parallel_config, ... of the wrapped processor
        if name == "original":
            raise AttributeError(name)
        return getattr(self.original, name)

    def __setattr__(self, name: str, value) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.original, name, value)


@functools.cache
def _wrapper_class(original_class: type) -> type:
    """The :class:`FP8AttentionProcessor` subclass for processors of ``original_class``: a class-level ``__call__``
    carrying ``original_class.__call__``'s signature (``torch.compile`` traces class-level calls)."""
    def __call__(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    __call__.__signature__ = inspect.signature(original_class.__call__)
    return type(f"FP8{original_class.__name__}", (FP8AttentionProcessor,), {"__call__": __call__})


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "set_processor") and getattr(m, "processor", None) is not None]


def _rms_norm_weight_max(norm) -> float | None:
    """``max |weight|`` of a bias-free RMSNorm with a weight (diffusers' or PyTorch's), None for anything else."""
    if type(norm).__name__ != "RMSNorm" or getattr(norm, "bias", None) is not None:
        return None
    weight = getattr(norm, "weight", None)
    return None if weight is None else float(weight.detach().abs().max())


def _head_dim(module: nn.Module) -> int | None:
    """Head dim of a diffusers attention module (``FluxAttention.head_dim``; ``Attention.inner_dim / heads``)."""
    if getattr(module, "head_dim", None) is not None:
        return module.head_dim
    inner, heads = getattr(module, "inner_dim", None), getattr(module, "heads", None)
    return inner // heads if inner and heads else None


def norm_bounds(module: nn.Module, processor) -> tuple[float, float] | None:
    """Static bounds ``(q_bound, k_bound)`` of the q / k that ``processor`` (the original processor of attention
    ``module``) passes to SDPA: ``sqrt(head_dim) * max|w|`` over the weights of the RMSNorms q (``norm_q``,
    ``norm_added_q``) / k (``norm_k``, ``norm_added_k``) pass through, times :data:`NORM_BOUND_MARGIN`. None unless
    the processor is one of :data:`NORM_BOUNDED_PROCESSORS` and every such norm the module has is a bias-free
    RMSNorm with a weight. Computed from the weights at the call: call :func:`enable_fp8_attention` again after
    loading other norm weights."""
    head_dim = _head_dim(module)
    if type(processor).__name__ not in NORM_BOUNDED_PROCESSORS or head_dim is None:
        return None
    bounds = []
    for names in (("norm_q", "norm_added_q"), ("norm_k", "norm_added_k")):
        if getattr(module, names[0], None) is None:
            return None
        maxima = [_rms_norm_weight_max(getattr(module, name)) for name in names
                  if getattr(module, name, None) is not None]
        if None in maxima:
            return None
        bounds.append(math.sqrt(head_dim) * max(maxima) * NORM_BOUND_MARGIN)
    return bounds[0], bounds[1]


def check_backend(backend: str) -> None:
    """ValueError unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 attention backend {backend!r}; choose one of {BACKENDS}")


def _model_on_cuda(model: nn.Module) -> bool:
    return any(p.is_cuda for p in model.parameters())


def enable_fp8_attention(model: nn.Module, q_block: int = DEFAULT_Q_BLOCK, kv_block: int = DEFAULT_KV_BLOCK,
                         backend: str = "triton", fuse_flux_qk: bool | None = None) -> int:
    """Wrap every attention processor of ``model`` (a diffusers transformer, or any module holding some) in
    :class:`FP8AttentionProcessor` with ``backend`` (and ``fuse_flux_qk``, ``"fa3"`` only, on by default there: see
    the module docstring), in place; a wrapped processor gets the new settings. Returns the number of attention
    modules now wrapped. ValueError for an unknown backend, or ``"fa3"`` for a CUDA model where FlashAttention-3 is not
    installed."""
    check_backend(backend)
    if backend == "fa3" and not FA3_AVAILABLE and _model_on_cuda(model):
        raise ValueError("the fa3 backend needs flash_attn_3 (FlashAttention-3), which is not importable: build it "
                         "from source (docs/fa3.md) or use backend='triton'")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no diffusers attention modules (set_processor / processor)")
    for module in modules:
        original = module.processor
        if isinstance(original, FP8AttentionProcessor):
            original = original.original
        bounds = norm_bounds(module, original) if backend == "fa3" else None
        module.set_processor(FP8AttentionProcessor(original, q_block, kv_block, backend, bounds, fuse_flux_qk))
    return len(modules)


def disable_fp8_attention(model: nn.Module) -> int:
    """Restore the processors :func:`enable_fp8_attention` wrapped. Returns the number restored."""
    restored = 0
    for module in _attention_modules(model):
        if isinstance(module.processor, FP8AttentionProcessor):
            module.set_processor(module.processor.original)
            restored += 1
    return restored


def fp8_attention_enabled(model: nn.Module) -> bool:
    """Whether any attention module of ``model`` runs FP8 attention."""
    return any(isinstance(m.processor, FP8AttentionProcessor) for m in _attention_modules(model))
