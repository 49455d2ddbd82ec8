"""quantduo: SVDQuant 4-bit diffusion models and DuoAttention long-context LLMs.

The entry points: :func:`quantize_` (any torch model), :func:`set_execution` (how quantized layers run),
:class:`SVDQuantConfig`; ``quantduo.integrations.diffusers`` (importing it registers ``quant_method: "quantduo"``
with diffusers), ``quantduo.duo`` (DuoAttention).
"""
from ._version import __version__
from .svdquant import SVDQuantConfig, SVDQuantLinear, quantize_, set_execution

__all__ = ["SVDQuantConfig", "SVDQuantLinear", "__version__", "quantize_", "set_execution"]
