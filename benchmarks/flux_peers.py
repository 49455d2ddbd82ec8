"""The peer and Hopper-feature variants of ``benchmarks/flux.py`` (issue 20).

Variant names (``<name>`` and ``<name>+compile``; each eager and, with ``--cuda-graph``, CUDA-graphed):

* ``torchao-fp8row``: every ``nn.Linear`` of the transformer through torchao's
  ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())`` (fp8 weights per output channel, dynamic fp8
  activations per token: diffusers' ``TorchAoConfig`` recipe an H100 user picks); needs the carried torchao wheel;
* ``torchao-fp8row-qkv``: the same after ``transformer.fuse_qkv_projections()`` (one QKV GEMM per attention);
* ``<svdq variant>-qkv`` (``svdq-fp8-qkv``, ``svdq-auto-qkv``, ...): that variant's quantized model with fused QKV
  (:func:`quantduo.integrations.diffusers.fuse_qkv`: the separately quantized q / k / v concatenated into one
  ``SVDQuantLinear``, one for the text stream's). The fast path gives each of q, k, v its own SVD, so the fused layers
  hold a block-diagonal rank-3x32 branch; calibrated checkpoints share q/k/v's down-projection (rank 32), a little
  less work in the fp8 weight expansion;
* ``<svdq variant>-tritonexp`` (last suffix): that variant with every fp8 weight expansion by the Triton kernel
  of :mod:`quantduo.kernels.dequant_w4` instead of the Gluon kernel of :mod:`quantduo.kernels.expand_w4_mma` (the
  default in eager calls on CUDA and in compiled code traced for CUDA graphs; other compiled code launches the
  Triton kernel): the two in one call; ``<svdq variant>-gluonexp``: compiled models run the Gluon kernel, as an
  opaque operator, without CUDA graphs too (``QUANTDUO_FP8_EXPANSION=gluon``);
* ``svdq-fp8-fa8``: ``svdq-fp8`` with FP8 attention (:mod:`quantduo.integrations.fp8_attention`, Triton backend);
* ``svdq-fp8-fa3fp8``: the same with the ``fa3`` backend (FlashAttention-3's fp8 kernel, one scale per head;
  needs ``flash_attn_3``, docs/fa3.md); ``svdq-fp8-fa3fp8qk``: with FLUX's Q / K prepared by one kernel
  (``fuse_flux_qk=True``);
* ``<variant>-fa3`` (any variant, ``bf16`` and ``torchao-*`` included; last suffix): that variant with diffusers'
  FlashAttention-3 backend (``set_attention_backend("_flash_3")``: bf16 FA3 instead of PyTorch's SDPA);
* ``svdq-fp8-fbc``: ``svdq-fp8`` with the first-block cache (:mod:`quantduo.integrations.first_block_cache`),
  timed over ``--cache-steps`` consecutive steps of a FlowMatchEuler schedule (FLUX's scheduler), the latents
  updated between steps, against the same loop with the cache at threshold 0 (never skips): ms per step, steps
  skipped, and the final latents' error vs the loop without cache.

Weights memory counts tensor subclasses (torchao's fp8 weights) by their inner tensors, and leaves out the
separate q/k/v projections a fused-QKV model no longer calls.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from quantduo.integrations.diffusers import fuse_qkv, unfuse_qkv
from quantduo.integrations.first_block_cache import disable_first_block_cache, enable_first_block_cache
from quantduo.integrations.fp8_attention import disable_fp8_attention, enable_fp8_attention
from quantduo.kernels import fp8_linear
from quantduo.utils import relative_error

TORCHAO = ("torchao-fp8row", "torchao-fp8row-qkv")
QKV = "-qkv"
SPLIT = "-split"
EXPANSIONS = {"-tritonexp": "triton", "-gluonexp": "gluon"}  # suffix -> fp8_linear.EXPANSION
FA3_BF16 = "-fa3"
ADALN16 = "-ln16"
_EXPANSION_DEFAULT = fp8_linear.EXPANSION
_SEPARATE_QKV = (".to_q", ".to_k", ".to_v", ".add_q_proj", ".add_k_proj", ".add_v_proj")


@dataclass(frozen=True)
class VariantOptions:
    """What a variant name asks for: ``modules`` (the linear replacement of ``flux.variant_module``, or
    ``"torchao"``), fused QKV (``fuse_qkv``: diffusers' fusion before the linears are replaced; ``quantized_qkv``:
    quantduo's fusion of the quantized projections after), FP8 attention (``fuse_flux_qk``: FLUX's Q / K by one
    kernel), first-block cache, the single blocks' ``proj_out`` as two quantized halves (``split_proj_out``: what a
    default calibration and Nunchaku files hold), the fp8 expansion's kernel choice (``expansion``: a value of
    ``QUANTDUO_FP8_EXPANSION``, None for the default), the FLUX blocks' adaLN kept in 16 bits instead of fp8 rows
    (``adaln16``)."""

    modules: str
    fuse_qkv: bool = False
    quantized_qkv: bool = False
    fp8_attention: str | None = None
    fuse_flux_qk: bool = False
    first_block_cache: bool = False
    split_proj_out: bool = False
    expansion: str | None = None
    fa3_bf16: bool = False
    adaln16: bool = False


def variant_options(base: str) -> VariantOptions:
    """Options of a variant name without ``+compile``."""
    if base.endswith(FA3_BF16):
        return replace(variant_options(base.removesuffix(FA3_BF16)), fa3_bf16=True)
    if base.startswith("svdq-") and base.endswith(ADALN16):
        return replace(variant_options(base.removesuffix(ADALN16)), adaln16=True)
    if base in TORCHAO:
        return VariantOptions("torchao", fuse_qkv=base.endswith(QKV))
    for suffix, expansion in EXPANSIONS.items():
        if base.startswith("svdq-") and base.endswith(suffix):
            return replace(variant_options(base.removesuffix(suffix)), expansion=expansion)
    if base.startswith("svdq-") and base.endswith(QKV):
        return replace(variant_options(base.removesuffix(QKV)), quantized_qkv=True)
    if base.startswith("svdq-") and base.endswith(SPLIT):
        return replace(variant_options(base.removesuffix(SPLIT)), split_proj_out=True)
    if base == "svdq-fp8-fa8":
        return VariantOptions("svdq-fp8", fp8_attention="triton")
    if base == "svdq-fp8-fa3fp8":
        return VariantOptions("svdq-fp8", fp8_attention="fa3")
    if base == "svdq-fp8-fa3fp8qk":
        return VariantOptions("svdq-fp8", fp8_attention="fa3", fuse_flux_qk=True)
    if base == "svdq-fp8-fbc":
        return VariantOptions("svdq-fp8", first_block_cache=True)
    return VariantOptions(base)


def torchao_fp8_linear(linear: nn.Linear) -> nn.Linear:
    """A new ``nn.Linear`` sharing ``linear``'s parameters, then quantized in place by torchao's fp8 dynamic
    row-wise config (``linear`` itself stays BF16)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    new = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    new.weight, new.bias = linear.weight, linear.bias
    quantize_(new, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False))
    return new


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t``; a traceable tensor subclass (torchao) is counted by its inner tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers of the modules ``model`` calls (separate q/k/v of fused attention left out)."""
    fused = any(getattr(m, "fused_projections", False) for m in model.modules())
    total = 0
    for name, module in model.named_modules():
        if fused and name.endswith(_SEPARATE_QKV):
            continue
        total += sum(tensor_bytes(t) for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)))
    return total


def model_linears(model: nn.Module, fused: bool) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers ``model`` calls (with fused QKV: ``to_qkv`` / ``to_added_qkv``, not the parts)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (fused and n.endswith(_SEPARATE_QKV))}


def enable_features(model: nn.Module, options: VariantOptions) -> None:
    """Fuse the quantized QKV projections, turn on FP8 attention, select the fp8 expansion's kernel (the first-block
    cache is :func:`cache_measurement`'s)."""
    fp8_linear.EXPANSION = options.expansion or _EXPANSION_DEFAULT
    if options.quantized_qkv:
        report = fuse_qkv(model)
        if report.skipped or report.linear:
            raise RuntimeError(f"fuse_qkv left attentions unfused or in 16 bits: {report}")
    if options.fp8_attention:
        enable_fp8_attention(model, backend=options.fp8_attention, fuse_flux_qk=options.fuse_flux_qk)
    if options.fa3_bf16:
        model.set_attention_backend("_flash_3")


def disable_features(model: nn.Module, options: VariantOptions) -> None:
    """Undo :func:`enable_features` and :func:`cache_measurement` (no-ops where they were off)."""
    fp8_linear.EXPANSION = _EXPANSION_DEFAULT
    disable_fp8_attention(model)
    if options.fa3_bf16:
        model.reset_attention_backend()
    disable_first_block_cache(model)
    if options.quantized_qkv:
        unfuse_qkv(model)


def _scheduler(device: str, steps: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps, device=device)
    return scheduler


def denoise_loop(runner, inputs: dict, start: int, steps: int, schedule: int = 28) -> tuple[torch.Tensor, list[float]]:
    """Steps ``start .. start + steps`` of a ``schedule``-step FlowMatchEuler schedule from ``inputs``' latents:
    (final latents float32, ms of each step). Host clock around each synchronized step."""
    device = inputs["hidden_states"].device.type
    scheduler = _scheduler(device, schedule)
    scheduler.set_begin_index(start)
    latents, times = inputs["hidden_states"].clone(), []
    for t in scheduler.timesteps[start:start + steps]:
        step_inputs = dict(inputs, hidden_states=latents, timestep=(t / 1000).expand(1).to(latents.dtype))
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        velocity = runner(**step_inputs)[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return latents.float(), times


def cache_measurement(runner, model: nn.Module, inputs: dict, args) -> dict:
    """The first-block cache over ``args.cache_steps`` steps (after warm-up loops): ms per step with the
    cache at ``args.cache_threshold`` and at 0 (no skipping), steps skipped, error of the final latents."""
    cache = enable_first_block_cache(model, 0.0)
    for _ in range(2):  # warm-up (compilation, recompilations)
        denoise_loop(runner, inputs, args.cache_start, args.cache_steps)
    ref, plain_ms = denoise_loop(runner, inputs, args.cache_start, args.cache_steps)
    cache.threshold = args.cache_threshold
    denoise_loop(runner, inputs, args.cache_start, args.cache_steps)
    before = cache.stats.skipped
    out, cached_ms = denoise_loop(runner, inputs, args.cache_start, args.cache_steps)
    return dict(median_ms=statistics.mean(cached_ms), min_ms=min(cached_ms), max_ms=max(cached_ms),
                no_cache_ms_per_step=statistics.mean(plain_ms), steps_skipped=cache.stats.skipped - before,
                steps=args.cache_steps, rel_err_vs_no_cache=relative_error(out, ref),
                first_block_changes=[round(c, 4) for c in cache.stats.changes[-args.cache_steps:]])


def add_arguments(parser) -> None:
    """The options of these variants on ``flux.py``'s parser."""
    parser.add_argument("--cache-threshold", type=float, default=0.08,
                        help="first-block cache threshold of the svdq-fp8-fbc variant")
    parser.add_argument("--cache-steps", type=int, default=10, help="consecutive scheduler steps timed with the cache")
    parser.add_argument("--cache-start", type=int, default=4, help="first step (of 28) of the cache measurement")
