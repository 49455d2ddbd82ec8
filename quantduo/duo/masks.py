"""Attention masks DuoAttention honours: none, a 2-D padding mask with left padding, and a 4-D mask (boolean, or
additive with 0 where allowed) equal to causal + left padding on the real queries. Anything else raises
ValueError: the streaming windows are defined on each row's real tokens, so a mask the deployment rules cannot
express is refused rather than ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantduo.duo.attention import visible_mask


@dataclass
class DuoMask:
    """What the "duo" mask function hands the attention function: pad int64 [B], the first real slot per row."""

    pad: torch.Tensor


def _left_padding(mask2d: torch.Tensor) -> torch.Tensor | None:
    """pad int64 [B] of a 2-D mask [B, L] (nonzero = real token) or None without padding; ValueError unless every
    row is padding followed by real tokens."""
    m = mask2d.bool()
    if bool(m.all()):
        return None
    if bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise ValueError("DuoAttention supports left padding only (a padding token after a real token in "
                         "attention_mask)")
    return (~m).sum(1)


def _four_d_padding(mask: torch.Tensor, q_len: int, window: int | None) -> torch.Tensor | None:
    """pad of a 4-D mask [B | 1, H | 1, Tq, Tk] equal to causal + left padding on the real queries (padding
    queries: fully masked, or fully unmasked as transformers' SDPA masks leave them), else ValueError."""
    if window is not None:
        raise ValueError("4-D attention masks are not supported on sliding-window models with DuoAttention "
                         "(pass the 2-D padding mask)")
    if mask.shape[-2] != q_len:
        raise ValueError(f"4-D attention mask has {mask.shape[-2]} query rows for {q_len} queries")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    tq, tk = allowed.shape[-2:]
    last = allowed[:, 0, -1]  # the last query sees every real key: its leading masked keys are the padding
    pad = (~last).long().cumprod(1).sum(1)
    q_pos = torch.arange(tk - tq, tk, device=mask.device)
    expect = visible_mask(q_pos, torch.arange(tk, device=mask.device)[None], pad)
    real_rows = (q_pos[None, :] >= pad[:, None])[:, None, :, None]
    pad_rows_ok = allowed.all(-1, keepdim=True) | ~allowed.any(-1, keepdim=True)  # fully masked (or unmasked)
    if bool((((allowed != expect) & real_rows) | (~pad_rows_ok & ~real_rows)).any()):
        raise ValueError("DuoAttention honours 4-D attention masks only when they equal causal + left padding; "
                         "pass a 2-D padding mask instead")
    return pad if bool(pad.any()) else None


def padding_of(mask, q_len: int, window: int | None = None) -> torch.Tensor | None:
    """Left padding (int64 [B] first real slot per row, or None) of an attention mask: None, a :class:`DuoMask`,
    a 2-D mask [B, past + q_len] or a 4-D mask (module docstring) for ``q_len`` new queries; ``window``: the
    layer's sliding window (4-D masks are then refused)."""
    if mask is None:
        return None
    if isinstance(mask, DuoMask):
        return mask.pad
    if not torch.is_tensor(mask) or mask.ndim not in (2, 4):
        raise ValueError(f"DuoAttention takes no attention mask of type {type(mask).__name__} / this shape")
    return _left_padding(mask) if mask.ndim == 2 else _four_d_padding(mask, q_len, window)


def duo_mask_function(*args, attention_mask=None, **kwargs) -> DuoMask | None:
    """transformers mask function of the DuoAttention implementations: the attention builds its own windows, so
    only the left padding of a 2-D mask is handed over (4-D masks never reach here: transformers passes them
    through untouched)."""
    pad = padding_of(attention_mask, 0) if torch.is_tensor(attention_mask) and attention_mask.ndim == 2 else None
    return None if pad is None else DuoMask(pad)
