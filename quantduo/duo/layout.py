"""Where DuoAttention lives in a transformers model: the supported architectures, their attention modules, the
layers DuoAttention applies to and the head split recorded on them by :func:`quantduo.duo.deploy.apply_duo`.

Layers: a model that mixes global and sliding-window layers (``config.layer_types``: Gemma 2 / 3, Qwen2 with
``use_sliding_window``) gets DuoAttention on its global ("full_attention") layers only; its sliding-window layers
keep every head full (within their window). A model whose every layer has the same window (Mistral) gets it on
every layer. Patterns have one row per DuoAttention layer (:func:`duo_layers`).

Sliding windows: the reference implementation (its Llama / Mistral patches call flash attention causal, without a
window, in identification and deployment; a missing ``sliding_window`` is set to ``max_position_embeddings``)
never applies the model's sliding window, so DuoAttention layers ignore it by default, in identification and
deployment (:func:`keeps_window`); ``respect_sliding_window=True`` applies it to every head of those layers
instead (retrieval and streaming heads alike). Layers without DuoAttention always keep their window.
"""
from __future__ import annotations

import torch

# model_type -> (query/key/value projections: "separate" q_proj / k_proj / v_proj or "fused" qkv_proj)
SUPPORTED = {"llama": "separate", "mistral": "separate", "qwen2": "separate", "qwen3": "separate",
             "gemma2": "separate", "gemma3_text": "separate", "phi3": "fused"}


def check_supported(config) -> None:
    """ValueError unless ``config`` is a supported decoder with per-KV-head attention."""
    mtype = getattr(config, "model_type", None)
    if mtype not in SUPPORTED:
        raise ValueError(f"DuoAttention needs per-KV-head attention (separate or fused q/k/v projections per head) "
                         f"and supports model types {sorted(SUPPORTED)}, not model_type={mtype!r} (multi-head latent "
                         "attention, e.g. DeepSeek-V2/V3, has no per-KV-head cache to split)")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer; ValueError for unsupported architectures."""
    check_supported(model.config)
    return [layer.self_attn for layer in model.model.layers]


def duo_layers(config) -> list[int]:
    """Indices of the layers DuoAttention applies to (module docstring): the "full_attention" layers of a model
    mixing layer types, else every layer."""
    check_supported(config)
    types = getattr(config, "layer_types", None) or []
    if "full_attention" in types and len(set(types)) > 1:
        return [i for i, t in enumerate(types) if t == "full_attention"]
    return list(range(config.num_hidden_layers))


def duo_modules(model) -> list[torch.nn.Module]:
    """Attention modules of the DuoAttention layers (:func:`duo_layers`), in order."""
    mods = attention_modules(model)
    return [mods[i] for i in duo_layers(model.config)]


def duo_layout(model) -> tuple[list[int], int, int, int]:
    """(retrieval KV heads per layer, every layer; KV heads per layer, sink, recent) of a model after apply_duo."""
    mods = attention_modules(model)
    if not all(hasattr(m, "duo_n_full") for m in mods):
        raise ValueError("call apply_duo(model, ...) before building a DuoCache")
    return [m.duo_n_full for m in mods], model.config.num_key_value_heads, mods[0].duo_sink, mods[0].duo_recent


def keeps_window(config, respect_sliding_window: bool = False) -> list[bool]:
    """Per layer: whether the DuoAttention attention functions apply the sliding window transformers hands them
    (module docstring): layers without DuoAttention always, DuoAttention layers only with
    ``respect_sliding_window``."""
    layers = set(duo_layers(config))
    return [respect_sliding_window or i not in layers for i in range(config.num_hidden_layers)]


def mark_windows(model, respect_sliding_window: bool = False) -> None:
    """Record :func:`keeps_window` on every attention module (``duo_keep_window``, read by :func:`layer_window`)."""
    for attn, keep in zip(attention_modules(model), keeps_window(model.config, respect_sliding_window)):
        attn.duo_keep_window = keep


def layer_window(module, sliding_window: int | None) -> int | None:
    """The sliding window a DuoAttention attention function applies on ``module``'s layer: ``sliding_window`` (the
    layer's, as transformers passes it) where :func:`mark_windows` kept it, else None."""
    return sliding_window if module.duo_keep_window else None
