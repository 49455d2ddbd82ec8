"""The cache argument of the installed transformers: ``cache=`` in current releases, ``past_key_values=`` in older
ones (which silently ignore an unknown ``cache=``)."""
from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def cache_argument(model_class: type) -> str:
    """``"cache"`` if ``model_class.forward`` takes it, else ``"past_key_values"``."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` with the name ``model``'s forward (and ``generate``) expects."""
    return {cache_argument(type(model)): cache}


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn transformers' activation checkpointing on (non-reentrant) or off, under the method names of the installed
    release (``activation_checkpointing_*`` in current releases, ``gradient_checkpointing_*`` before)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enabled:
        getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()
