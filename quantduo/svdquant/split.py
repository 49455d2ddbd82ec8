"""A linear layer stored as two quantized halves of its input: ``y = out_proj(x[..., :Ka]) + mlp_fc2(x[..., Ka:])``.

This is how deepcompressor calibrates and Nunchaku stores the FLUX single block's ``proj_out`` (``[dim, dim +
mlp_dim]``): ``out_proj`` takes the attention output (signed activations), ``mlp_fc2`` the post-GELU MLP activations
(shifted unsigned INT4), each half with its own smoothing and low-rank branch. deepcompressor's ``ConcatLinear``
gives the bias to the last half (``mlp_fc2``); published Nunchaku files give it to ``out_proj``: the sum is the same.
Before quantization both halves are ``nn.Linear`` (:meth:`SplitProjOut.from_linear`, :func:`split_proj_outs`),
after it :class:`SVDQuantLinear`, so executions, LoRA, saving and the fused single block
(:class:`quantduo.integrations.diffusers.FusedFluxSingleBlock`, which calls :meth:`SplitProjOut.forward_gelu`) work
on them unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SPLIT_HALVES = ("out_proj", "mlp_fc2")  # child names: the attention half, the MLP half


class SplitProjOut(nn.Module):
    """``out_proj`` ``[N, Ka]`` and ``mlp_fc2`` ``[N, Km]`` summed: input ``[..., Ka + Km]``, output ``[..., N]``.
    The halves are ``nn.Linear`` (before quantization) or :class:`~quantduo.svdquant.SVDQuantLinear`."""

    def __init__(self, out_proj: nn.Module, mlp_fc2: nn.Module):
        super().__init__()
        if out_proj.out_features != mlp_fc2.out_features:
            raise ValueError(f"the halves have {out_proj.out_features} and {mlp_fc2.out_features} outputs")
        self.out_proj, self.mlp_fc2 = out_proj, mlp_fc2

    @classmethod
    def from_linear(cls, linear: nn.Linear, attn_features: int) -> "SplitProjOut":
        """The full-precision halves of ``linear`` ``[N, Ka + Km]`` split after input ``attn_features`` (``Ka``):
        weight columns copied (same device and dtype, meta included), the bias (if any) on ``mlp_fc2``, as
        deepcompressor's ``ConcatLinear.from_linear``."""
        if not 0 < attn_features < linear.in_features:
            raise ValueError(f"cannot split {linear.in_features} inputs after {attn_features}")
        kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        out_proj = nn.Linear(attn_features, linear.out_features, bias=False, **kw)
        mlp_fc2 = nn.Linear(linear.in_features - attn_features, linear.out_features, bias=linear.bias is not None,
                            **kw)
        with torch.no_grad():
            out_proj.weight.copy_(linear.weight[:, :attn_features])
            mlp_fc2.weight.copy_(linear.weight[:, attn_features:])
            if linear.bias is not None:
                mlp_fc2.bias.copy_(linear.bias)
        return cls(out_proj, mlp_fc2)

    @property
    def in_features(self) -> int:
        return self.out_proj.in_features + self.mlp_fc2.in_features

    @property
    def out_features(self) -> int:
        return self.out_proj.out_features

    @property
    def weight_format(self) -> str:
        """``"int4"`` if both halves are INT4 (what the fused single block checks), else ``"mixed"``."""
        formats = {getattr(self.out_proj, "weight_format", None), getattr(self.mlp_fc2, "weight_format", None)}
        return formats.pop() if len(formats) == 1 and None not in formats else "mixed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp = x.split([self.out_proj.in_features, self.mlp_fc2.in_features], dim=-1)
        return self.out_proj(attn) + self.mlp_fc2(mlp)

    def forward_gelu(self, gelu_input: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """``self(cat(prefix, gelu_tanh(gelu_input)))``: prefix ``[..., Ka]`` (attention output), gelu_input
        ``[..., Km]``; in fp8 execution the GELU runs inside ``mlp_fc2``'s activation quantization."""
        return self.out_proj(prefix) + self.mlp_fc2.forward_gelu(gelu_input)


def parallel_proj_outs(model: nn.Module) -> dict[str, int]:
    """``{name: attention width}`` of every ``proj_out`` of a FLUX-style single-stream block in ``model``: a module
    with an ``attn`` child and ``nn.Linear`` children ``proj_mlp`` ``[Km, D]`` and ``proj_out`` ``[N, N + Km]``, whose
    ``proj_out`` reads ``cat(attention output [N], GELU(proj_mlp(x)) [Km])`` (diffusers' ``FluxSingleTransformerBlock``
    and the blocks built like it). The attention width is ``N``, as deepcompressor splits it."""
    found = {}
    for name, block in model.named_modules():
        proj_out, proj_mlp = getattr(block, "proj_out", None), getattr(block, "proj_mlp", None)
        if (isinstance(proj_out, nn.Linear) and isinstance(proj_mlp, nn.Linear) and hasattr(block, "attn")
                and proj_out.in_features == proj_out.out_features + proj_mlp.out_features):
            found[f"{name}.proj_out" if name else "proj_out"] = proj_out.out_features
    return found


def split_proj_outs(model: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Replace (in place) each :func:`parallel_proj_outs` layer of ``model`` for which ``keep(name)`` is false by its
    :meth:`SplitProjOut.from_linear` halves; returns the names replaced."""
    replaced = []
    for name, attn_features in parallel_proj_outs(model).items():
        if not keep(name):
            model.set_submodule(name, SplitProjOut.from_linear(model.get_submodule(name), attn_features))
            replaced.append(name)
    return replaced
