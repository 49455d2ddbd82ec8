"""Inference-time fusions of diffusers blocks around quantized layers.

In fp8 execution (:mod:`quantduo.engine.linear`) a layer can form its own input inside the per-token activation
quantization: ``gelu_tanh(h)`` for a GELU MLP's down-projection, ``cat(attention, gelu_tanh(h))`` for the FLUX
single block's ``proj_out``. The fused modules below route those calls through
:meth:`~quantduo.svdquant.SVDQuantLinear.forward_gelu`; in any other execution it computes the same
thing unfused, so a fused model is correct whatever execution runs it. Submodules (state-dict keys, LoRA targets)
are unchanged.

The FLUX blocks' adaLN outputs (``layer_norm(x) * (1 + scale) + shift``) are read only by quantized layers: the
attention's projections, ``proj_mlp``, the MLPs' up-projections. Where every reader takes per-token fp8 rows
(:func:`~quantduo.engine.linear.takes_fp8_rows`) and the attention runs diffusers' plain ``FluxAttnProcessor``
(which only hands its input to the projections; also under quantduo's FP8-attention wrapper), the fused blocks
compute the norm, the modulation and the quantization in one pass
(:func:`~quantduo.engine.linear.layer_norm_fp8_rows`) and pass the codes on: no 16-bit norm output, one
quantization for all readers. Elsewhere they compute diffusers' norms.

:func:`fuse_qkv` is diffusers' ``fuse_qkv_projections`` for quantized attention: one GEMM for q, k and v (one for the
added text-stream projections). Like diffusers, it adds ``to_qkv`` / ``to_kv`` / ``to_added_qkv`` next to the
separate projections (which stay, for :func:`unfuse_qkv`, LoRAs and saving) and sets ``fused_projections``; the
attention processors then call the fused layers. It composes with :func:`enable_fusions` in either order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.transformers import transformer_flux
from torch import nn

from quantduo.engine.linear import gated_residual_fp8_rows, layer_norm_fp8_rows, takes_fp8_rows
from quantduo.svdquant import SVDQuantLinear, concat_output_features
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


def _plain_flux_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` runs diffusers' plain ``FluxAttnProcessor`` (itself, or as the ``original`` of a wrapper
    such as quantduo's FP8-attention processor, which hands it its inputs unchanged), without context parallelism:
    the processor that only hands its inputs to the projections."""
    processor = getattr(attn.processor, "original", attn.processor)
    return type(processor) is transformer_flux.FluxAttnProcessor and processor._parallel_config is None


def _attention_readers(attn: nn.Module, stream: str) -> list[nn.Module]:
    """The projections that read ``attn``'s ``"image"`` (hidden_states) or ``"text"`` (encoder_hidden_states)
    input, fused or not (diffusers' ``_get_qkv_projections``)."""
    fused = getattr(attn, "fused_projections", False)
    if stream == "image":
        return [attn.to_qkv] if fused else [attn.to_q, attn.to_k, attn.to_v]
    return [attn.to_added_qkv] if fused else [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]


def _all_take_rows(readers: list[nn.Module], x: torch.Tensor) -> bool:
    return all(isinstance(layer, SVDQuantLinear) and takes_fp8_rows(layer, x) for layer in readers)


def _adaln(norm: nn.LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, readers: list[nn.Module],
           rows: bool, streams: tuple[torch.Tensor, torch.Tensor] | None = None):
    """``norm(x) * (1 + scale[:, None]) + shift[:, None]`` (x ``[B, S, C]``, shift / scale ``[B, C]``): fp8 rows
    where ``rows`` and every one of ``readers`` takes them, else the 16-bit tensor. ``streams``: x's two parts
    (``x = cat(streams, 1)``), which the rows' kernel reads directly."""
    if rows and _all_take_rows(readers, x):
        x0, x1 = streams if streams is not None else (x, None)
        return layer_norm_fp8_rows(x0, shift, scale, norm.eps, x1)
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def _updated_adaln(norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor,
                   shift: torch.Tensor, scale: torch.Tensor, readers: list[nn.Module], rows: bool):
    """``(u, _adaln(norm, u, shift, scale, readers, rows))`` for the residual update ``u = x + gate[:, None] *
    residual`` (x, residual ``[B, S, C]``; gate / shift / scale ``[B, C]``): as fp8 rows in one pass that also
    writes u (:func:`~quantduo.engine.linear.gated_residual_fp8_rows`) where the readers take them."""
    if rows and _all_take_rows(readers, x):
        return gated_residual_fp8_rows(x, residual, gate, shift, scale, norm.eps)
    updated = x + gate.unsqueeze(1) * residual
    return updated, _adaln(norm, updated, shift, scale, readers, rows=False)


def _mlp_readers(feed_forward: nn.Module) -> list[nn.Module]:
    """The up-projection of a diffusers GELU ``FeedForward`` (the only layer that reads its input)."""
    first = feed_forward.net[0]
    return [first.proj] if type(first).__name__ == "GELU" else [None]


class FusedFluxSingleBlock(nn.Module):
    """A diffusers ``FluxSingleTransformerBlock`` whose ``proj_out`` is an INT4 :class:`SVDQuantLinear`: the MLP
    branch's GELU and its concatenation with the attention output happen inside proj_out's activation quantization,
    so the ``[tokens, 15360]`` 16-bit input is never written; the adaLN output goes to ``proj_mlp`` and the
    attention as fp8 rows where they take them (module docstring; ``adaln_rows=False``: always the 16-bit norm).
    Same call as the block:
    ``(hidden_states [B, S_img, dim], encoder_hidden_states [B, S_txt, dim], temb [B, dim])`` ->
    ``(encoder_hidden_states, hidden_states)``.
    """

    def __init__(self, block: nn.Module, adaln_rows: bool = True):
        super().__init__()
        self.mlp_hidden_dim, self.adaln_rows = block.mlp_hidden_dim, adaln_rows
        for name, child in block.named_children():  # norm, proj_mlp, act_mlp, proj_out, attn, in the block's order
            self.add_module(name, child)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb=None, joint_attention_kwargs: dict | None = None):
        text_seq_len = encoder_hidden_states.shape[1]
        residual = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        shift, scale, gate = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)
        readers = [self.proj_mlp] + _attention_readers(self.attn, "image") if _plain_flux_attention(self.attn) \
            else [None]
        norm_hidden_states = _adaln(self.norm.norm, residual, shift, scale, readers, self.adaln_rows,
                                    streams=(encoder_hidden_states, hidden_states))
        mlp_pre_activation = self.proj_mlp(norm_hidden_states)
        attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                **(joint_attention_kwargs or {}))
        hidden_states = residual + gate.unsqueeze(1) * self.proj_out.forward_gelu(mlp_pre_activation, attn_output)
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _fusable_flux_single_block(module: nn.Module) -> bool:
    proj_out = getattr(module, "proj_out", None)
    norm = getattr(module, "norm", None)
    return (type(module).__name__ == "FluxSingleTransformerBlock"
            and type(norm).__name__ == "AdaLayerNormZeroSingle" and _plain_layer_norm(norm.norm)
            and getattr(getattr(module, "act_mlp", None), "approximate", None) == "tanh"
            and (_int4_layer(proj_out) or isinstance(proj_out, SplitProjOut) and proj_out.weight_format == "int4"))


class FusedFluxDoubleBlock(nn.Module):
    """A diffusers ``FluxTransformerBlock`` whose four adaLN outputs (image and text, before the attention and
    before the MLPs) go to their quantized readers as fp8 rows where they take them (module docstring), and whose
    GELU MLPs are :class:`FusedGeluMLP` where their down-projections are INT4 (``adaln_rows=False``: only the
    latter). Attention processors other than FLUX's plain one run the block's own forward. Same call and outputs as
    the block."""

    def __init__(self, block: nn.Module, adaln_rows: bool = True):
        super().__init__()
        self.adaln_rows = adaln_rows
        for name, child in block.named_children():  # norm1, norm1_context, attn, norm2, ff, norm2_context, ff_context
            self.add_module(name, FusedGeluMLP(child) if name.startswith("ff") and _fusable_feed_forward(child)
                            else child)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                image_rotary_emb=None, joint_attention_kwargs: dict | None = None):
        if not _plain_flux_attention(self.attn):
            return transformer_flux.FluxTransformerBlock.forward(self, hidden_states, encoder_hidden_states, temb,
                                                                 image_rotary_emb, joint_attention_kwargs)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.norm1.linear(self.norm1.silu(temb)).chunk(6, dim=1)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = \
            self.norm1_context.linear(self.norm1_context.silu(temb)).chunk(6, dim=1)
        attn_output, context_attn_output = self.attn(
            hidden_states=_adaln(self.norm1.norm, hidden_states, shift_msa, scale_msa,
                                 _attention_readers(self.attn, "image"), self.adaln_rows),
            encoder_hidden_states=_adaln(self.norm1_context.norm, encoder_hidden_states, c_shift_msa, c_scale_msa,
                                         _attention_readers(self.attn, "text"), self.adaln_rows),
            image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
        hidden_states, ff_input = _updated_adaln(self.norm2, hidden_states, attn_output, gate_msa, shift_mlp,
                                                 scale_mlp, _mlp_readers(self.ff), self.adaln_rows)
        hidden_states = hidden_states + gate_mlp.unsqueeze(1) * self.ff(ff_input)
        encoder_hidden_states, ff_input = _updated_adaln(
            self.norm2_context, encoder_hidden_states, context_attn_output, c_gate_msa, c_shift_mlp, c_scale_mlp,
            _mlp_readers(self.ff_context), self.adaln_rows)
        encoder_hidden_states = encoder_hidden_states + c_gate_mlp.unsqueeze(1) * self.ff_context(ff_input)
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


def _plain_layer_norm(norm: nn.Module) -> bool:
    return type(norm) is nn.LayerNorm and norm.weight is None and norm.bias is None


def _fusable_flux_double_block(module: nn.Module) -> bool:
    """A diffusers FLUX double block with diffusers' adaLN (affine-free LayerNorms, no label embedding) and some
    quantized layer."""
    if type(module).__name__ != "FluxTransformerBlock":
        return False
    ada = [getattr(module, name, None) for name in ("norm1", "norm1_context")]
    if not all(type(norm).__name__ == "AdaLayerNormZero" and norm.emb is None and _plain_layer_norm(norm.norm)
               for norm in ada):
        return False
    return (all(_plain_layer_norm(getattr(module, name, None)) for name in ("norm2", "norm2_context"))
            and any(isinstance(m, SVDQuantLinear) for m in module.modules()))


FUSIONS = ((_fusable_flux_double_block, FusedFluxDoubleBlock), (_fusable_feed_forward, FusedGeluMLP),
           (_fusable_flux_single_block, FusedFluxSingleBlock))


def enable_fusions(model: nn.Module, adaln_rows: bool = True) -> dict[str, nn.Module]:
    """Replace, in place, every FLUX double block with quantized layers by :class:`FusedFluxDoubleBlock`, every
    other GELU(tanh) ``FeedForward`` whose down-projection is an INT4 quantized layer by :class:`FusedGeluMLP`, and
    every FLUX single block whose ``proj_out`` is one by :class:`FusedFluxSingleBlock`. ``adaln_rows=False``: the
    FLUX blocks keep their 16-bit adaLN outputs (the other fusions only).

    A fused block takes its original's place among the model's ``_repeated_blocks`` (diffusers' regional
    compilation, ``model.compile_repeated_blocks()``, compiles it as it would the original).

    Returns ``{name: original module}`` so the change can be undone with ``model.set_submodule``.
    """
    originals = {}
    repeated = list(getattr(model, "_repeated_blocks", None) or [])
    for name, module in list(model.named_modules()):
        if any(name.startswith(done + ".") for done in originals):
            continue
        fused = next((fused for fusable, fused in FUSIONS if fusable(module)), None)
        if fused is not None:
            originals[name] = module
            kwargs = {"adaln_rows": adaln_rows} if fused in (FusedFluxDoubleBlock, FusedFluxSingleBlock) else {}
            model.set_submodule(name, fused(module, **kwargs))
            if type(module).__name__ in repeated and fused.__name__ not in repeated:
                repeated.append(fused.__name__)
    if repeated:
        model._repeated_blocks = repeated  # on the instance: the class's list stays diffusers'
    return originals


# ---------------------------------------------------------------------------------------------
# fused QKV projections
# ---------------------------------------------------------------------------------------------
# diffusers' fused projections (AttentionModuleMixin.fuse_projections): fused name -> the projections it concatenates
SELF_QKV = ("to_qkv", ("to_q", "to_k", "to_v"))
CROSS_KV = ("to_kv", ("to_k", "to_v"))
ADDED_QKV = ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj"))
FUSED_NAMES = tuple(fused for fused, _ in (SELF_QKV, CROSS_KV, ADDED_QKV))


@dataclass
class QKVFusion:
    """What :func:`fuse_qkv` did, by attention module name: ``quantized`` (fused into :class:`SVDQuantLinear`
    layers), ``linear`` (all ``nn.Linear``: fused by diffusers' own ``fuse_projections``), ``skipped`` (name ->
    why: mixed quantized / full-precision projections, layers that cannot be concatenated, already fused)."""

    quantized: list[str] = field(default_factory=list)
    linear: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def _projection_groups(attn: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """``[(fused name, [projections])]`` that diffusers' ``fuse_projections`` would fuse in ``attn``: q/k/v (k/v of
    cross-attention), and the added q/k/v projections where all three exist."""
    groups = [CROSS_KV if getattr(attn, "is_cross_attention", False) else SELF_QKV]
    if all(getattr(attn, name, None) is not None for name in ADDED_QKV[1]):
        groups.append(ADDED_QKV)
    return [(fused, [getattr(attn, name) for name in parts]) for fused, parts in groups]


def _fuse_quantized(attn: nn.Module, groups: list[tuple[str, list[nn.Module]]]) -> None:
    """Concatenate each group's :class:`SVDQuantLinear` projections into its fused layer (all or none: a
    ``ValueError`` of :func:`concat_output_features` leaves ``attn`` unchanged)."""
    fused = {name: concat_output_features(layers) for name, layers in groups}
    for name, layer in fused.items():
        setattr(attn, name, layer)
    attn.fused_projections = True


def _fuse_attention(attn: nn.Module) -> tuple[str, str]:
    """Fuse one attention module's projections: ``("quantized" | "linear" | "skipped", why skipped)``."""
    if getattr(attn, "fused_projections", False):
        return "skipped", "already fused"
    groups = _projection_groups(attn)
    layers = [layer for _, group in groups for layer in group]
    if all(isinstance(layer, SVDQuantLinear) for layer in layers):
        try:
            _fuse_quantized(attn, groups)
        except ValueError as error:
            return "skipped", str(error)
        return "quantized", ""
    if all(type(layer) is nn.Linear for layer in layers):
        attn.fuse_projections()
        return "linear", ""
    kinds = sorted({type(layer).__name__ for layer in layers})
    return "skipped", f"its q/k/v projections mix {', '.join(kinds)}"


def _fusable_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, AttentionModuleMixin) and m._supports_qkv_fusion]


def fuse_qkv(model: nn.Module) -> QKVFusion:
    """Fuse the q/k/v projections of every diffusers attention module of ``model`` (``FluxAttention`` and the other
    :class:`AttentionModuleMixin` attentions whose processors read ``fused_projections``), in place, as diffusers'
    ``fuse_qkv_projections`` does: ``to_qkv [.., 3 * inner]`` (``to_kv`` for cross-attention) and ``to_added_qkv``
    for the text stream. Quantized projections become one :class:`SVDQuantLinear` each
    (:func:`~quantduo.svdquant.concat.concat_output_features`: same outputs in every execution), full-precision
    ones one ``nn.Linear`` (diffusers' ``fuse_projections``); attention modules mixing the two, or whose quantized
    projections cannot be concatenated (different smoothing, formats, ...), are left unfused and reported.

    The separate projections stay in the model (their weights are what is saved; LoRAs attach to them): attach
    LoRAs before fusing, and :func:`unfuse_qkv` before saving. Returns the :class:`QKVFusion` report; ``ValueError``
    if ``model`` has no attention module that supports fused projections.
    """
    attentions = _fusable_attentions(model)
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no diffusers attention modules with fusable q/k/v projections")
    report = QKVFusion()
    for name, attn in attentions:
        kind, why = _fuse_attention(attn)
        if kind == "skipped":
            report.skipped[name] = why
        else:
            getattr(report, kind).append(name)
    return report


def unfuse_qkv(model: nn.Module) -> int:
    """Undo :func:`fuse_qkv` (or diffusers' ``fuse_qkv_projections``) in place: the fused layers are dropped, the
    separate projections run again. Returns the number of attention modules unfused."""
    fused = [attn for _, attn in _fusable_attentions(model) if getattr(attn, "fused_projections", False)]
    for attn in fused:
        attn.unfuse_projections()
    return len(fused)


def fused_attentions(model: nn.Module) -> list[str]:
    """Names of the attention modules of ``model`` whose projections are fused."""
    return [name for name, m in model.named_modules() if getattr(m, "fused_projections", False)]
