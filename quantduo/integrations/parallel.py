"""What diffusers' context parallelism configured on a model or attention processor (``enable_parallelism`` sets
``_parallel_config`` on both)."""
from __future__ import annotations

from typing import Any

__all__ = ["context_parallel_config"]


def context_parallel_config(obj: Any) -> Any:
    """The ``ContextParallelConfig`` diffusers set on ``obj`` (a model or an attention processor), or None when
    ``obj`` runs without context parallelism."""
    return getattr(getattr(obj, "_parallel_config", None), "context_parallel_config", None)
