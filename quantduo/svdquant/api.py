"""One entry point for any torch model, in the style of torchao's ``quantize_(model, config, filter_fn)``.

    report = quantize_(model, "int4", calib_fn=lambda m: [m(b) for b in batches])
    set_execution(model, "fp8")          # how the stored layers run; no weight changes

Works on diffusers and transformers models alike: every ``nn.Linear`` that ``filter_fn(module, name)`` accepts (all
by default) and the config does not skip becomes an :class:`~quantduo.svdquant.SVDQuantLinear` in the storage
format named by the config (:mod:`quantduo.formats.registry`).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from quantduo.formats.registry import get_format

from .config import SVDQuantConfig
from .linear import set_execution
from .quantize import QuantizationReport, quantize_model

FilterFn = Callable[[nn.Module, str], bool]


def config_for(config: SVDQuantConfig | str) -> SVDQuantConfig:
    """``config`` itself, or the default :class:`SVDQuantConfig` of the registered format named ``config``."""
    if isinstance(config, SVDQuantConfig):
        return config
    return SVDQuantConfig(**get_format(config).config_fields())


def _filtered(model: nn.Module, config: SVDQuantConfig, filter_fn: FilterFn | None) -> SVDQuantConfig:
    """``config`` with the linears that ``filter_fn`` rejects added to ``skip`` (by exact name)."""
    if filter_fn is None:
        return config
    rejected = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not filter_fn(m, name)]
    return SVDQuantConfig.from_dict({**config.to_dict(), "skip": list(config.skip) + rejected})


def quantize_(model: nn.Module, config: SVDQuantConfig | str = "int4", *, calib_fn: Callable[[nn.Module], None],
              filter_fn: FilterFn | None = None, execution: str = "auto", progress: bool = True
              ) -> QuantizationReport:
    """Quantize ``model`` in place and set how its quantized layers run.

    Args:
        config: an :class:`SVDQuantConfig`, or a registered format name (``"int4"``, ``"nvfp4"``, ``"w4a16"``,
            ``"svdq-w4a16"``) for its defaults.
        calib_fn: runs the calibration forward passes, ``calib_fn(model)`` (once, under ``no_grad``).
        filter_fn: ``filter_fn(module, name) -> bool``; linears it rejects stay in full precision.
        execution: the execution of every quantized layer (:func:`~quantduo.svdquant.linear.set_execution`).
    Returns:
        The per-layer :class:`QuantizationReport`.
    """
    report = quantize_model(model, calib_fn, _filtered(model, config_for(config), filter_fn), progress=progress)
    set_execution(model, execution)
    return report
