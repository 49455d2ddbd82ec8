"""One :class:`SVDQuantLinear` computing several layers that read the same input: their outputs concatenated.

``concat_output_features([q, k, v])(x) == torch.cat([q(x), k(x), v(x)], dim=-1)`` in every execution, to float
rounding: every stored tensor indexed by output row (``qweight``, ``wscales``, ``bias``, ``proj_up``) is stacked by
rows in the layers' order, and every tensor indexed by input channel (``smooth_factor``, ``act_shift``) must be the
same in all of them (SVDQuant calibration gives linears called on one tensor a shared smoothing,
:mod:`quantduo.integrations.diffusers.rules`). The low-rank branch:

* all ``proj_down`` equal (calibration shares it between such linears): kept, ``proj_up`` ``[N_i, r]`` stacked into
  ``[sum N_i, r]``;
* otherwise (separately made layers, LoRAs attached to one of them): ``proj_down`` ``[K, r_i]`` concatenated along the
  rank into ``[K, sum r_i]`` and ``proj_up`` block-diagonal ``[sum N_i, sum r_i]``, still exact.

The derived state (``bias_a16``, fp8 scales) is per output row too, and is recomputed for the result. The result is
a runtime fusion of layers that stay in the model: its ``fused_parts`` records their ``out_features`` and
checkpoints refuse it (:func:`quantduo.svdquant.serialization.layer_specs`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .linear import SVDQuantLinear

# attributes every concatenated layer must share (the format and how it runs)
_SAME_ATTRIBUTES = ("in_features", "weight_format", "act_format", "group_size", "execution", "fast_accum", "dtype")
# per-input-channel / per-tensor buffers every concatenated layer must hold identically
_SAME_BUFFERS = ("smooth_factor", "act_shift", "wscale_global")


def _check_concatenable(layers: Sequence[SVDQuantLinear]) -> None:
    """``TypeError`` / ``ValueError`` naming what keeps ``layers`` from being one layer."""
    if not layers:
        raise ValueError("concat_output_features needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, SVDQuantLinear):
            raise TypeError(f"layer {i} is a {type(layer).__name__}, not an SVDQuantLinear")
    first = layers[0]
    for name in _SAME_ATTRIBUTES:
        values = [getattr(layer, name) for layer in layers]
        if any(v != values[0] for v in values):
            raise ValueError(f"cannot concatenate the layers' outputs: their {name} differs ({values})")
    if len({layer.bias is None for layer in layers}) > 1:
        raise ValueError(f"cannot concatenate the layers' outputs: some have a bias, some not "
                         f"({[layer.bias is not None for layer in layers]})")
    devices = [str(layer.qweight.device) for layer in layers]
    if len(set(devices)) > 1:
        raise ValueError(f"cannot concatenate layers on different devices ({devices})")
    for name in _SAME_BUFFERS:
        different = [i for i, layer in enumerate(layers) if not torch.equal(getattr(layer, name), getattr(first, name))]
        if different:
            raise ValueError(f"cannot concatenate the layers' outputs: their {name} differs (layers {different} vs "
                             f"layer 0); only layers with one shared {name} compute their outputs from one input")


def _low_rank(layers: Sequence[SVDQuantLinear]) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated layer's ``(proj_down [K, r], proj_up [sum N_i, r])``: shared ``proj_down`` kept and
    ``proj_up`` stacked by rows, or ``proj_down`` concatenated along the rank and ``proj_up`` block-diagonal."""
    downs, ups = [layer.proj_down for layer in layers], [layer.proj_up for layer in layers]
    if all(torch.equal(d, downs[0]) for d in downs):
        return downs[0].clone(), torch.cat(ups, dim=0)
    return torch.cat(downs, dim=1), torch.block_diag(*ups)


def concat_output_features(layers: Sequence[SVDQuantLinear]) -> SVDQuantLinear:
    """A new :class:`SVDQuantLinear` whose output ``[..., sum N_i]`` is the outputs ``[..., N_i]`` of ``layers``
    (same input ``[..., in_features]``) concatenated in order; the layers are left unchanged.

    Raises ``TypeError`` for a layer that is not an :class:`SVDQuantLinear`, ``ValueError`` naming what differs
    when their ``in_features``, formats, group size, execution, ``fast_accum``, dtype, bias presence, device,
    ``smooth_factor``, ``act_shift`` or ``wscale_global`` (NVFP4 per-tensor scale) are not the same.
    """
    _check_concatenable(layers)
    first = layers[0]
    proj_down, proj_up = _low_rank(layers)
    fused = SVDQuantLinear(first.in_features, sum(layer.out_features for layer in layers), rank=proj_down.shape[1],
                           bias=first.bias is not None, weight_format=first.weight_format,
                           act_format=first.act_format, group_size=first.group_size, dtype=first.dtype,
                           device=first.qweight.device, execution=first.execution)
    fused.fast_accum = first.fast_accum
    with torch.no_grad():
        fused.qweight = torch.cat([layer.qweight for layer in layers])
        fused.wscales = torch.cat([layer.wscales for layer in layers])
        fused.wscale_global = first.wscale_global.clone()
        if first.wscale_channel is not None:
            fused.wscale_channel = torch.cat([layer.wscale_channel for layer in layers])
        fused.smooth_factor = first.smooth_factor.clone()
        fused.act_shift = first.act_shift.clone()
        fused.proj_down, fused.proj_up = proj_down, proj_up
        if first.bias is not None:
            fused.bias = torch.cat([layer.bias for layer in layers])
    fused.fused_parts = tuple(layer.out_features for layer in layers)
    fused.refresh_derived()
    return fused
