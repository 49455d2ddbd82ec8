"""Opt-in first-block cache for diffusers DiTs (FLUX, SD3; FLUX-structured models such as the bundled tiny DiT):
:func:`enable_first_block_cache` / :func:`disable_first_block_cache`.

Each denoising step runs the first transformer block. When the relative L1 change of that block's residual
(``block output - block input`` of the image stream) against the one of the last fully computed step is below
``threshold``, the remaining blocks are skipped and their cached residual (output of the last block minus output
of the first, for both streams) is added instead; otherwise they run and the caches are refreshed.

Mechanics: the transformer's ``transformer_blocks`` becomes a one-element ``ModuleList`` holding a
:class:`FirstBlockCachedBlocks` that owns every block (``single_transformer_blocks``, where present, becomes
empty), so the model's own forward (embeddings, RoPE, final norm) is unchanged. Blocks must take keyword arguments
``hidden_states``, ``encoder_hidden_states`` (+ the model's others) and return ``(encoder_hidden_states,
hidden_states)``, as FLUX and SD3 blocks do. ControlNet residuals (which index blocks) are not supported while
enabled. The cache resets itself when a call's timestep is not below the previous call's (a new generation) or
the shapes change; it assumes one transformer call per step (guidance batched, as FLUX-dev and the tiny DiT).

Under diffusers' context parallelism (``enable_parallelism``: each rank holds a shard of the sequence) the relative
change is all-reduced over the ranks holding the shards, so it is the whole sequence's and every rank takes the same
decision (a rank skipping the blocks while another runs their attention collectives would hang).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .parallel import context_parallel_config

__all__ = ["CacheStats", "FirstBlockCachedBlocks", "enable_first_block_cache", "disable_first_block_cache",
           "first_block_cache_of", "relative_l1_change"]


def relative_l1_change(new: torch.Tensor, old: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``mean |new - old| / mean |old|`` as a float32 0-d tensor (same-shape inputs); with ``group``, of the
    concatenation of every rank's ``new`` / ``old`` (sums and element counts all-reduced over ``group``)."""
    old = old.float()
    if group is None:
        return (new.float() - old).abs().mean() / old.abs().mean().clamp(min=1e-12)
    totals = torch.stack([(new.float() - old).abs().sum(), old.abs().sum(),
                          torch.tensor(float(old.numel()), device=old.device)])
    dist.all_reduce(totals, group=group)
    return totals[0] / totals[2] / (totals[1] / totals[2]).clamp(min=1e-12)


def context_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group over which diffusers' context parallelism splits ``model``'s sequence (the ring x Ulysses
    mesh, as diffusers' own sharding hooks use); None when ``model`` runs without it."""
    config = context_parallel_config(model)
    return None if config is None else config._flattened_mesh.get_group()


@dataclass
class CacheStats:
    """Counts of transformer calls since enabling: ``computed`` ran every block, ``skipped`` reused the cache;
    ``resets``: new generations detected; ``changes``: the relative L1 change of the first block's residual at each
    call that had a cached one to compare with."""

    computed: int = 0
    skipped: int = 0
    resets: int = 0
    changes: list[float] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return self.computed + self.skipped


class FirstBlockCachedBlocks(nn.Module):
    """All blocks of a DiT behind one block-shaped call (see the module docstring): ``(hidden_states [B, S_img, C],
    encoder_hidden_states [B, S_txt, C], **block kwargs)`` -> ``(encoder_hidden_states, hidden_states)``.

    ``blocks``: the double-stream (or only) blocks, ``single_blocks``: the single-stream ones (may be empty).
    """

    def __init__(self, blocks: nn.ModuleList, single_blocks: nn.ModuleList, threshold: float):
        super().__init__()
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if len(blocks) == 0:
            raise ValueError("need at least one transformer block")
        self.blocks, self.single_blocks, self.threshold = blocks, single_blocks, float(threshold)
        self.stats = CacheStats()
        self.group: dist.ProcessGroup | None = None  # set at each call: see context_parallel_group
        self.last_timestep: float | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the cached residuals (the next call computes every block)."""
        self.first_residual = self.image_residual = self.text_residual = None

    @torch.compiler.disable
    def note_timestep(self, timestep: torch.Tensor | float | None) -> None:
        """Reset the cache when ``timestep`` is not below the previous call's (a new generation starts)."""
        if timestep is None:
            return
        t = float(timestep.float().max()) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.last_timestep is not None and t >= self.last_timestep and self.first_residual is not None:
            self.reset()
            self.stats.resets += 1
        self.last_timestep = t

    @torch.compiler.disable
    def _can_skip(self, first_residual: torch.Tensor) -> bool:
        """Compare with the cached first-block residual; count the call as skipped when under the threshold.
        Outside compiled graphs (a host decision; keeps the counters out of Dynamo's guards)."""
        previous = self.first_residual
        if previous is None or previous.shape != first_residual.shape or self.image_residual is None:
            return False
        change = float(relative_l1_change(first_residual, previous, self.group))
        self.stats.changes.append(change)
        skip = change < self.threshold
        self.stats.skipped += int(skip)
        return skip

    @torch.compiler.disable
    def _store(self, first_residual: torch.Tensor, image_residual: torch.Tensor, text_residual: torch.Tensor) -> None:
        """Cache the residuals of a fully computed call."""
        self.first_residual, self.image_residual, self.text_residual = first_residual, image_residual, text_residual
        self.stats.computed += 1

    @torch.compiler.disable
    def _reuse(self, encoder_first: torch.Tensor, hidden_first: torch.Tensor):
        return encoder_first + self.text_residual, hidden_first + self.image_residual

    def _remaining(self, hidden_states, encoder_hidden_states, kwargs):
        for block in list(self.blocks)[1:] + list(self.single_blocks):
            encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                         encoder_hidden_states=encoder_hidden_states, **kwargs)
        return encoder_hidden_states, hidden_states

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs):
        encoder_first, hidden_first = self.blocks[0](hidden_states=hidden_states,
                                                     encoder_hidden_states=encoder_hidden_states, **kwargs)
        first_residual = hidden_first - hidden_states
        if self._can_skip(first_residual):
            return self._reuse(encoder_first, hidden_first)
        encoder_out, hidden_out = self._remaining(hidden_first, encoder_first, kwargs)
        self._store(first_residual, hidden_out - hidden_first, encoder_out - encoder_first)
        return encoder_out, hidden_out


def _call_hook(cache: FirstBlockCachedBlocks):
    """A forward pre-hook of the model: notes the call's timestep and context-parallel group on ``cache``."""
    def hook(module, args, kwargs):
        cache.group = context_parallel_group(module)
        cache.note_timestep(kwargs.get("timestep", args[3] if len(args) > 3 else None))
    return hook


def first_block_cache_of(model: nn.Module) -> FirstBlockCachedBlocks | None:
    """The cache :func:`enable_first_block_cache` installed on ``model`` (None when not enabled)."""
    blocks = getattr(model, "transformer_blocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) == 1 and isinstance(blocks[0], FirstBlockCachedBlocks):
        return blocks[0]
    return None


def enable_first_block_cache(model: nn.Module, threshold: float = 0.1) -> FirstBlockCachedBlocks:
    """Install the first-block cache on a diffusers DiT with ``transformer_blocks`` (and optionally
    ``single_transformer_blocks``), in place. ``threshold``: the largest relative L1 change of the first block's
    residual that still skips (0 never skips). Returns the cache (``.stats``, ``.reset()``); enabling again only
    sets the threshold."""
    cache = first_block_cache_of(model)
    if cache is not None:
        cache.threshold = float(threshold)
        return cache
    blocks = getattr(model, "transformer_blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no transformer_blocks ModuleList")
    single = getattr(model, "single_transformer_blocks", None)
    cache = FirstBlockCachedBlocks(blocks, single if isinstance(single, nn.ModuleList) else nn.ModuleList(), threshold)
    model.transformer_blocks = nn.ModuleList([cache])
    if isinstance(single, nn.ModuleList):
        model.single_transformer_blocks = nn.ModuleList()
    cache.hook_handle = model.register_forward_pre_hook(_call_hook(cache), with_kwargs=True)
    return cache


def disable_first_block_cache(model: nn.Module) -> CacheStats | None:
    """Put the original blocks back; returns the cache's final stats (None when it was not enabled)."""
    cache = first_block_cache_of(model)
    if cache is None:
        return None
    cache.hook_handle.remove()
    model.transformer_blocks = cache.blocks
    if hasattr(model, "single_transformer_blocks"):
        model.single_transformer_blocks = cache.single_blocks
    return cache.stats
