"""SVDQuant rules of any diffusers denoiser (transformer or UNet), inferred from its structure.

* **Body vs. the rest.** The body is every *block list*: an ``nn.ModuleList`` some element of which contains an
  attention module (``transformer_blocks``, ``single_transformer_blocks``, ``blocks``, ``layers``, a UNet's
  ``down_blocks`` / ``up_blocks`` / ``mid_block.attentions``, HunyuanVideo's token-refiner blocks, Lumina2's
  refiners). Every ``nn.Linear`` outside the body — patch / text / timestep embedders, caption projections,
  guidance approximators, the final norm and projection — stays 16-bit.
* **Conditioning linears are W4A16.** Inside the body, a linear whose input never depends on the call's token
  streams (adaLN modulation ``Linear(SiLU(temb))`` chunked into shift / scale / gate, a UNet's ``time_emb_proj``)
  is weight-only: found during calibration by data-flow tracking (``"auto"`` in ``weight_only``,
  :mod:`quantduo.svdquant.dataflow`).
* **Everything else is W4A4** with SVDQuant's smoothing and 16-bit low-rank branch. Linears called on one tensor
  (q/k/v, FLUX single-block q/k/v + ``proj_mlp``) share smoothing (q/k/v also the low-rank branch), and inputs that
  never go below GELU's minimum (post-GELU) are shifted UINT4 (``"auto"`` in ``unsigned_act``): both detected during
  calibration by :func:`quantduo.svdquant.quantize_model`, which also calibrates a FLUX single block's ``proj_out``
  as its attention and MLP halves (:mod:`quantduo.svdquant.split`). Attention math is never touched (it has no linears).

A model with no block list defeats these rules: :func:`rules_for` raises, naming the model and its first linear.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
import torch
from torch import nn

from quantduo.formats.registry import get_format
from quantduo.svdquant import SVDQuantConfig
from quantduo.svdquant.dataflow import StreamTracker

DENOISER_ATTRS = ("transformer", "unet")
ATTENTION_TYPES = (Attention, AttentionModuleMixin, nn.MultiheadAttention)


@dataclass(frozen=True)
class ModelRules:
    """Rules handed to :class:`SVDQuantConfig`: exact module names / globs, ``"auto"`` for calibration-time
    detection.

    Attributes:
        blocks: names of the block lists (the quantized body).
        skip: every linear outside the body (16-bit).
        weight_only: W4A16 layers (``"auto"``: conditioning-only inputs).
        unsigned_act: shifted-UINT4 inputs (``"auto"``: post-GELU, detected from calibration ranges).
    """

    blocks: list[str]
    skip: list[str]
    weight_only: list[str] = field(default_factory=lambda: ["auto"])
    unsigned_act: list[str] = field(default_factory=lambda: ["auto"])


def _has_attention(module: nn.Module) -> bool:
    return any(isinstance(m, ATTENTION_TYPES) for m in module.modules())


def block_lists(model: nn.Module) -> list[str]:
    """Names of the outermost ``nn.ModuleList`` s of ``model`` some element of which contains attention."""
    found: list[str] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{b}.") for b in found)
        if not inside and isinstance(module, nn.ModuleList) and any(_has_attention(m) for m in module):
            found.append(name)
    return found


def in_blocks(name: str, blocks: list[str]) -> bool:
    """Whether module ``name`` lies inside one of the block lists ``blocks``."""
    return any(name.startswith(f"{b}.") for b in blocks)


def rules_for(model: nn.Module) -> ModelRules:
    """The :class:`ModelRules` inferred from ``model``'s structure.

    Raises:
        ValueError: ``model`` has linears but no block list (no ``nn.ModuleList`` holding attention), naming it and
            its first linear.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    blocks = block_lists(model)
    if not blocks:
        first = f" (first linear: {linears[0]!r})" if linears else ""
        raise ValueError(f"cannot infer SVDQuant rules for {type(model).__name__}{first}: it has no nn.ModuleList of "
                         "attention blocks to tell its body from its embedders; pass explicit skip / weight_only "
                         "rules in an SVDQuantConfig instead")
    return ModelRules(blocks, [name for name in linears if not in_blocks(name, blocks)])


def resolved_rules(model: nn.Module, *args: Any, **kwargs: Any) -> ModelRules:
    """:func:`rules_for` with ``"auto"`` W4A16 resolved to names by tracking one call ``model(*args, **kwargs)``:
    the body's linears that read conditioning only (for code that swaps layers without calibrating)."""
    rules = rules_for(model)
    body = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and in_blocks(name, rules.blocks)}
    with StreamTracker(model, body) as tracker, torch.no_grad():
        model(*args, **kwargs)
    return ModelRules(rules.blocks, rules.skip, sorted(tracker.conditioning_only()), rules.unsigned_act)


def quantization_config(model: nn.Module, fmt: str = "int4", **overrides: Any) -> SVDQuantConfig:
    """An :class:`SVDQuantConfig` with ``model``'s inferred skip / W4A16 / unsigned rules and format ``fmt``.

    ``overrides``: any other :class:`SVDQuantConfig` field (``rank``, ``search_tokens``, ``dtype``, ...).
    """
    storage = get_format(fmt)
    rules = rules_for(model)
    fields = dict(skip=list(rules.skip), weight_only=list(rules.weight_only), unsigned_act=list(rules.unsigned_act))
    fields.update(storage.config_fields())
    fields.update(overrides)
    return SVDQuantConfig(**fields)


def denoiser_of(pipe: Any) -> tuple[str, nn.Module]:
    """``("transformer", pipe.transformer)`` or ``("unet", pipe.unet)``."""
    for attr in DENOISER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, nn.Module):
            return attr, module
    raise ValueError(f"{type(pipe).__name__} has no transformer or unet component to quantize")
