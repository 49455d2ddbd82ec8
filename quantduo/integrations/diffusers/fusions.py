"""Inference-time fusions of diffusers blocks around quantized layers.

In fp8 execution (:mod:`quantduo.engine.linear`) a layer can form its own input inside the per-token activation
quantization: ``gelu_tanh(h)`` for a GELU MLP's down-projection, ``cat(attention, gelu_tanh(h))`` for the FLUX
single block's ``proj_out``. The fused modules below route those calls through
:meth:`~quantduo.svdquant.SVDQuantLinear.forward_gelu`; in any other execution it computes the same
thing unfused, so a fused model is correct whatever execution runs it. Submodules (state-dict keys, LoRA targets)
are unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from quantduo.svdquant import SVDQuantLinear
from quantduo.svdquant.split import SplitProjOut


class FusedGeluMLP(nn.Module):
    """A diffusers ``FeedForward`` (``net = [GELU(tanh) with proj, Dropout, Linear]``) whose down-projection is an
    INT4 :class:`SVDQuantLinear`: the GELU runs inside its activation quantization. Input / output ``[..., dim]``."""

    def __init__(self, feed_forward: nn.Module):
        super().__init__()
        self.net = feed_forward.net

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.net[-1].forward_gelu(self.net[0].proj(hidden_states))


def _int4_layer(module: nn.Module) -> bool:
    return isinstance(module, SVDQuantLinear) and module.weight_format == "int4"


def _fusable_feed_forward(module: nn.Module) -> bool:
    net = getattr(module, "net", None)
    if type(module).__name__ != "FeedForward" or not isinstance(net, nn.ModuleList) or len(net) != 3:
        return False
    return getattr(net[0], "approximate", None) == "tanh" and hasattr(net[0], "proj") and _int4_layer(net[2])


class FusedFluxSingleBlock(nn.Module):
    """A diffusers ``FluxSingleTransformerBlock`` whose ``proj_out`` is an INT4 :class:`SVDQuantLinear`: the MLP
    branch's GELU and its concatenation with the attention output happen inside proj_out's activation quantization,
    so the ``[tokens, 15360]`` 16-bit input is never written. Same call as the block:
    ``(hidden_states [B, S_img, dim], encoder_hidden_states [B, S_txt, dim], temb [B, dim])`` ->
    ``(encoder_hidden_states, hidden_states)``.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.mlp_hidden_dim = block.mlp_hidden_dim
        for name, child in block.named_children():  # norm, proj_mlp, act_mlp, proj_out, attn, in the block's order
            self.add_module(name, child)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb=None, joint_attention_kwargs: dict | None = None):
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        residual = hidden_states
        norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
        mlp_pre_activation = self.proj_mlp(norm_hidden_states)
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out.forward_gelu(mlp_pre_activation, attn_output)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _fusable_flux_single_block(module: nn.Module) -> bool:
    proj_out = getattr(module, "proj_out", None)
    return (type(module).__name__ == "FluxSingleTransformerBlock"
            and getattr(getattr(module, "act_mlp", None), "approximate", None) == "tanh"
            and (_int4_layer(proj_out) or isinstance(proj_out, SplitProjOut) and proj_out.weight_format == "int4"))


FUSIONS = ((_fusable_feed_forward, FusedGeluMLP), (_fusable_flux_single_block, FusedFluxSingleBlock))


def enable_fusions(model: nn.Module) -> dict[str, nn.Module]:
    """Replace, in place, every GELU(tanh) ``FeedForward`` whose down-projection is an INT4 quantized layer by
    :class:`FusedGeluMLP`, and every FLUX single block whose ``proj_out`` is one by :class:`FusedFluxSingleBlock`.

    Returns ``{name: original module}`` so the change can be undone with ``model.set_submodule``.
    """
    originals = {}
    for name, module in list(model.named_modules()):
        if any(name.startswith(done + ".") for done in originals):
            continue
        fused = next((fused for fusable, fused in FUSIONS if fusable(module)), None)
        if fused is not None:
            originals[name] = module
            model.set_submodule(name, fused(module))
    return originals
