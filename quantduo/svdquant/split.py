"""A linear layer stored as two quantized halves of its input: ``y = out_proj(x[..., :Ka]) + mlp_fc2(x[..., Ka:])``.

This is how Nunchaku stores the FLUX single block's ``proj_out`` (``[dim, dim + mlp_dim]``): ``out_proj`` takes
the attention output (signed activations), ``mlp_fc2`` the post-GELU MLP activations (shifted unsigned INT4), and
only ``out_proj`` holds the bias. Both halves are :class:`SVDQuantLinear` children, so executions, LoRA, saving and
the fused single block (:class:`quantduo.integrations.diffusers.FusedFluxSingleBlock`, which calls
:meth:`SplitProjOut.forward_gelu`) work on them unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import SVDQuantLinear


class SplitProjOut(nn.Module):
    """``out_proj`` ``[N, Ka]`` and ``mlp_fc2`` ``[N, Km]`` summed: input ``[..., Ka + Km]``, output ``[..., N]``."""

    def __init__(self, out_proj: SVDQuantLinear, mlp_fc2: SVDQuantLinear):
        super().__init__()
        if out_proj.out_features != mlp_fc2.out_features:
            raise ValueError(f"the halves have {out_proj.out_features} and {mlp_fc2.out_features} outputs")
        self.out_proj, self.mlp_fc2 = out_proj, mlp_fc2

    @property
    def in_features(self) -> int:
        return self.out_proj.in_features + self.mlp_fc2.in_features

    @property
    def out_features(self) -> int:
        return self.out_proj.out_features

    @property
    def weight_format(self) -> str:
        """``"int4"`` if both halves are INT4 (what the fused single block checks), else ``"mixed"``."""
        formats = {self.out_proj.weight_format, self.mlp_fc2.weight_format}
        return formats.pop() if len(formats) == 1 else "mixed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp = x.split([self.out_proj.in_features, self.mlp_fc2.in_features], dim=-1)
        return self.out_proj(attn) + self.mlp_fc2(mlp)

    def forward_gelu(self, gelu_input: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """``self(cat(prefix, gelu_tanh(gelu_input)))``: prefix ``[..., Ka]`` (attention output), gelu_input
        ``[..., Km]``; in fp8 execution the GELU runs inside ``mlp_fc2``'s activation quantization."""
        return self.out_proj(prefix) + self.mlp_fc2.forward_gelu(gelu_input)
