"""Where DuoAttention lives in a transformers model: the supported architectures, their attention modules and
the head split recorded on them by :func:`quantduo.duo.deploy.apply_duo`."""
from __future__ import annotations

import torch

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer; ValueError for unsupported architectures and for
    sliding-window attention (DuoAttention's full heads attend to every token)."""
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED:
        raise ValueError(f"DuoAttention supports model types {SUPPORTED}, not model_type={mtype!r}")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        raise ValueError(f"{mtype} with sliding_window={window} (< max_position_embeddings="
                         f"{cfg.max_position_embeddings}) is not supported: DuoAttention's retrieval heads see every "
                         "token; set config.sliding_window = None for full attention")
    return [layer.self_attn for layer in model.model.layers]


def duo_layout(model) -> tuple[list[int], int, int, int]:
    """(retrieval KV heads per layer, KV heads per layer, sink, recent) of a model after apply_duo."""
    mods = attention_modules(model)
    if not all(hasattr(m, "duo_n_full") for m in mods):
        raise ValueError("call apply_duo(model, ...) before building a DuoCache")
    return [m.duo_n_full for m in mods], model.config.num_key_value_heads, mods[0].duo_sink, mods[0].duo_recent
