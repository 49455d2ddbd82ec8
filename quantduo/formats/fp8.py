"""FP8 E4M3 per-token activation quantization and per-channel weight scales (the fp8 execution's arithmetic).

The one definition of the per-token fp8 quantizer: the Triton row kernel
(:func:`quantduo.kernels.fp8_linear.quantize_fp8_per_token`) computes exactly :func:`quantize_fp8_per_token_ref`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantizers import FP8_E4M3_MAX


def quantize_fp8_per_token_ref(x: torch.Tensor | None, gelu_input: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per row of ``cat(x, gelu_tanh(gelu_input))`` (``x [M, Kx]``, ``gelu_input [M, Kg]``, either may be
    None): (codes float8_e4m3fn ``[M, Kx + Kg]``, scale float32 ``[M]``).

    The GELU (tanh approximation) is taken in float32. ``scale = absmax * (1 / 448)`` (1.0 for all-zero rows), codes
    ``e4m3(clamp(row * (1 / scale), +-448))``, round to nearest even. Plain PyTorch ops: the reference, and what
    ``torch.compile`` fuses into the producer of x.
    """
    parts = [] if x is None else [x.float()]
    if gelu_input is not None:
        parts.append(F.gelu(gelu_input.float(), approximate="tanh"))
    if not parts:
        raise ValueError("give x, gelu_input or both")
    xf = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax * (1.0 / FP8_E4M3_MAX), torch.ones_like(amax))
    q = (xf * (1.0 / scale)[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def layer_norm_modulate_fp8_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_fp8_per_token_ref` of a DiT block's adaLN output ``layer_norm(x) * (1 + scale[:, None]) +
    shift[:, None]`` (no affine weight; ``x [B, S, K]``, ``shift`` / ``scale`` ``[B, K]`` in x's dtype, each op
    rounded to it as diffusers' ``AdaLayerNormZero`` computes it): (codes float8_e4m3fn ``[B * S, K]``, scale float32
    ``[B * S]``)."""
    y = F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]
    return quantize_fp8_per_token_ref(y.reshape(-1, x.shape[-1]))


def fp8_channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """Static per-output-channel fp8 scale of ``weight [N, K]``: float32 ``[N]`` = ``absmax_k |W[n, k]| / 448``
    (1.0 for all-zero rows)."""
    amax = weight.float().abs().amax(dim=1)
    return torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))


def quantize_fp8_weight(weight: torch.Tensor, inv_scale: torch.Tensor) -> torch.Tensor:
    """``e4m3(clamp(W * inv_scale[n], +-448))`` of ``weight [N, K]`` as float32 codes ``[N, K]``."""
    w = weight.float() * inv_scale.float()[:, None]
    return w.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def fp8_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values lie between float8_e4m3fn codes ``a`` and ``b`` (same shape), as int32: the
    sign-magnitude codes as signed ordinals, so the step across zero counts once per side and -0 equals +0."""
    def ordinal(codes: torch.Tensor) -> torch.Tensor:
        u = codes.view(torch.uint8).int()
        return torch.where(u >= 128, -(u - 128), u)
    return (ordinal(a) - ordinal(b)).abs()
