"""Per-model SVDQuant rules for diffusers denoisers.

Supported denoisers (class name -> rules in :data:`MODEL_RULES`): ``FluxTransformer2DModel``,
``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` and SDXL's ``UNet2DConditionModel``. Rules follow the
SVDQuant reference: embedders and the final norm / projection stay in 16 bits, adaLN modulation linears
(and the UNet's ``time_emb_proj``) are W4A16, everything else is W4A4 with a 16-bit low-rank branch. Layers
called on the same input (q/k/v, FLUX single-block q/k/v + ``proj_mlp``) share smoothing and the low-rank
down-projection: :func:`quantduo.svdquant.quantize_model` detects them during calibration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from quantduo.formats.registry import get_format
from quantduo.svdquant import SVDQuantConfig

DENOISER_ATTRS = ("transformer", "unet")


@dataclass(frozen=True)
class ModelRules:
    """Glob rules (over module names of the denoiser) handed to :class:`SVDQuantConfig`."""

    skip: list[str]
    weight_only: list[str]
    unsigned_act: list[str] = field(default_factory=lambda: ["auto"])


_DIT_SKIP = ["x_embedder", "context_embedder", "pos_embed.*", "time_text_embed.*", "norm_out.*", "proj_out"]
_DIT_MODULATION = ["*.norm1.linear", "*.norm1_context.linear", "*.norm.linear"]
_GELU_DOWN = ["auto", "*.ff.net.2", "*.ff_context.net.2"]

MODEL_RULES: dict[str, ModelRules] = {
    "FluxTransformer2DModel": ModelRules(_DIT_SKIP, _DIT_MODULATION, _GELU_DOWN),
    "SD3Transformer2DModel": ModelRules(_DIT_SKIP, _DIT_MODULATION, _GELU_DOWN),
    "PixArtTransformer2DModel": ModelRules(
        ["pos_embed.*", "adaln_single.emb.*", "caption_projection.*", "proj_out"], ["adaln_single.linear"],
        ["auto", "*.ff.net.2"],
    ),
    # SDXL feed-forwards are GEGLU (signed inputs to ff.net.2): leave unsigned detection to calibration
    "UNet2DConditionModel": ModelRules(["time_embedding.*", "add_embedding.*"], ["*.time_emb_proj"]),
}

def rules_for(model: nn.Module) -> ModelRules:
    """The :class:`ModelRules` of ``model``'s class; ``ValueError`` for an unsupported class."""
    name = type(model).__name__
    if name not in MODEL_RULES:
        raise ValueError(f"unsupported model class {name!r}; SVDQuant rules exist for {sorted(MODEL_RULES)}")
    return MODEL_RULES[name]


def quantization_config(model: nn.Module, fmt: str = "int4", **overrides: Any) -> SVDQuantConfig:
    """An :class:`SVDQuantConfig` with ``model``'s skip / W4A16 / unsigned rules and format ``fmt``.

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
