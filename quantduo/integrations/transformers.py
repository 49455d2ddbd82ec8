"""SVDQuant 4-bit weights for transformers causal LMs (Llama / Mistral / Qwen), e.g. under DuoAttention, and
one-launch RMSNorms for their decode steps (:func:`fuse_rms_norms`).

``w4a16`` (weight-only INT4, scale per 64 inputs, no low-rank branch) is the long-context setting: decoding is
bound by reading weights and KV, not by arithmetic. ``int4`` is full SVDQuant W4A4 with the low-rank branch.
Embeddings and ``lm_head`` (often tied to the embeddings) stay in 16 bits. Apply DuoAttention's head
reordering (:func:`quantduo.duo.deploy.apply_duo`) *before* quantizing: it permutes the linears' rows.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantduo.formats.reference import rms_norm_ref
from quantduo.formats.registry import get_format
from quantduo.kernels.rms_norm import rms_norm
from quantduo.svdquant import QuantizationReport, SVDQuantConfig, quantize_model

LLM_SKIP = ["lm_head", "*embed_tokens*"]
# LLM choices on top of the registry's formats: weight-only layers need no smoothing, and a smoothed W4A16 layer
# would divide its input in a separate op per decode step
LLM_OVERRIDES: dict[str, dict[str, Any]] = {"w4a16": dict(rank=0, smooth=False), "svdq-w4a16": dict(smooth=False)}


def llm_quantization_config(fmt: str = "w4a16", **overrides: Any) -> SVDQuantConfig:
    """An :class:`SVDQuantConfig` for a causal LM in storage format ``fmt`` (:mod:`quantduo.formats.registry`);
    ``overrides`` set any other field (rank, dtype, ...)."""
    fields = {"skip": list(LLM_SKIP), **get_format(fmt).config_fields(), **LLM_OVERRIDES.get(fmt, {})}
    return SVDQuantConfig(**{**fields, **overrides})


def quantize_causal_lm(
    model: nn.Module, calibration_ids: torch.Tensor, fmt: str = "w4a16", progress: bool = True, **overrides: Any
) -> QuantizationReport:
    """Quantize the decoder linears of ``model`` in place.

    Args:
        calibration_ids: long ``[B, T]`` token ids run through the model once to calibrate.
    """
    if calibration_ids.dtype != torch.long or calibration_ids.dim() != 2:
        raise ValueError(f"calibration_ids must be a long [B, T] tensor, got {calibration_ids.dtype} "
                         f"{tuple(calibration_ids.shape)}")
    config = llm_quantization_config(fmt, **overrides)
    device = next(model.parameters()).device
    return quantize_model(model, lambda m: m(calibration_ids.to(device), use_cache=False), config, progress=progress)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


FUSABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class FusedRMSNorm(nn.Module):
    """Drop-in for the RMSNorms in :data:`FUSABLE_NORMS` (same formula, shares their ``weight``): one Triton
    launch on CUDA (:mod:`quantduo.kernels.rms_norm`), the PyTorch formula elsewhere (``backend``: ``"auto"``,
    ``"triton"``, ``"reference"``)."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight, self.variance_epsilon, self.backend = weight, eps, "auto"

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" or (self.backend == "auto" and hidden_states.is_cuda):
            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return rms_norm_ref(hidden_states, self.weight, self.variance_epsilon)


def fuse_rms_norms(model: nn.Module) -> int:
    """Replace every RMSNorm of ``model`` whose class is in :data:`FUSABLE_NORMS` by :class:`FusedRMSNorm`
    (in place, same parameters and state-dict keys); returns how many were replaced."""
    names = [name for name, module in model.named_modules() if type(module).__name__ in FUSABLE_NORMS]
    for name in names:
        norm = model.get_submodule(name)
        model.set_submodule(name, FusedRMSNorm(norm.weight, norm.variance_epsilon))
    return len(names)
