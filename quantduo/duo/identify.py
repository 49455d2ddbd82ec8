"""Retrieval-head identification (DuoAttention, arXiv 2410.10819, section 3.2), as the reference trains it.

A gate alpha in [0, 1] per (layer, KV head) mixes full and streaming (sink + recent) attention. The reference runs
the model "two-way": each batch is duplicated, the first half is the unchanged model (the teacher) and the second
the gated one, and in every layer the gated half's attention output is
``alpha * full(teacher's q, k, v) + (1 - alpha) * streaming(own q, k, v)`` (the full term from the *teacher's*
hidden states of that layer, without gradient). With the model frozen, only the gates train to keep the final
hidden states (after the last norm) of the gated half equal to the teacher's on the question / answer tokens of
passkey-retrieval samples, with an L1 push of the gates towards 0. Gates live in the model's dtype (bfloat16 for
the reference's runs), start at 1 and are clamped to [0, 1] before each step; AdamW, lr 0.02, a schedule that
rises over the first fifth of the steps, holds, and falls over the last fifth, never below 0.1 of the peak.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from quantduo.duo.attention import gated_attention, streaming_only_attention
from quantduo.duo.compat import set_activation_checkpointing
from quantduo.duo.deploy import register_attention
from quantduo.duo.layout import attention_modules, duo_layers, layer_window, mark_windows
from quantduo.duo.patterns import DuoPattern
from quantduo.utils import progress_bar

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids [B, T] int64, target_mask [B, T] bool


class _GateRef:
    """Holds (gates [L, H] parameter, layer index) without registering it as a module parameter."""

    def __init__(self, gates: torch.Tensor, layer: int):
        self.gates, self.layer = gates, layer

    def get(self) -> torch.Tensor:
        return self.gates[self.layer].clamp(0.0, 1.0)


def gated_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    """transformers attention function "duo_gated" (two-way batch, no cache, no padding): query [2B, Hq, T, D],
    key/value [2B, Hkv, T, D], rows ``[:B]`` the teacher and ``[B:]`` the gated model (module docstring); uses
    ``module.duo_gate`` (absent on layers without DuoAttention: full attention for both halves) / ``duo_sink`` /
    ``duo_recent``, the layer's soft-cap and its sliding window where :func:`~quantduo.duo.layout.layer_window`
    keeps it. Returns ([2B, T, Hq, D], None)."""
    if attention_mask is not None:
        raise ValueError("identification takes batches without padding or custom attention masks")
    if query.shape[0] % 2:
        raise ValueError(f"identification runs a two-way batch (teacher + gated rows), got {query.shape[0]} rows")
    scaling = module.scaling if scaling is None else scaling
    options = dict(chunk=module.duo_chunk, block=module.duo_block, window=layer_window(module, sliding_window),
                   softcap=softcap)
    if not hasattr(module, "duo_gate"):  # full attention in both halves
        out = gated_attention(query, key, value, None, module.duo_sink, module.duo_recent, scaling, **options)
        return out.transpose(1, 2).contiguous(), None
    half = query.shape[0] // 2
    with torch.no_grad():
        teacher = gated_attention(query[:half], key[:half], value[:half], None, module.duo_sink, module.duo_recent,
                                  scaling, **options)
    stream = streaming_only_attention(query[half:], key[half:], value[half:], module.duo_sink, module.duo_recent,
                                      scaling, **options)
    b, hq, t, d = stream.shape
    g = module.duo_gate.get().to(query.dtype).view(1, -1, 1, 1, 1)
    hkv = g.shape[1]
    gated = (g * teacher.view(b, hkv, hq // hkv, t, d) + (1 - g) * stream.view(b, hkv, hq // hkv, t, d))
    return torch.cat([teacher, gated.reshape(b, hq, t, d)]).transpose(1, 2).contiguous(), None


register_attention("duo_gated", gated_attention_forward)


@contextlib.contextmanager
def attn_implementation(model, name: str) -> Iterator[None]:
    """Temporarily switch the transformers attention function of ``model``."""
    old = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = old


@contextlib.contextmanager
def gated_model(model, gates: torch.Tensor, sink: int, recent: int, chunk: int = 1024,
                block: int | None = None, respect_sliding_window: bool = False) -> Iterator[None]:
    """Within the context the model runs gated attention with ``gates`` [DuoAttention layers, H_kv] (clamped to
    [0, 1]; layers without DuoAttention run full attention);
    ``block``: streaming mask in blocks of that many tokens (None: token level); ``respect_sliding_window``: apply
    the model's sliding window on DuoAttention layers (default: ignored, as the reference;
    :mod:`quantduo.duo.layout`)."""
    mods, layers = attention_modules(model), duo_layers(model.config)
    if tuple(gates.shape) != (len(layers), model.config.num_key_value_heads):
        raise ValueError(f"gates shape {tuple(gates.shape)} != (DuoAttention layers, kv_heads) "
                         f"{(len(layers), model.config.num_key_value_heads)}")
    for i, layer in enumerate(layers):
        mods[layer].duo_gate = _GateRef(gates, i)
    for m in mods:
        m.duo_sink, m.duo_recent, m.duo_chunk, m.duo_block = sink, recent, chunk, block
    mark_windows(model, respect_sliding_window)
    try:
        with attn_implementation(model, "duo_gated"):
            yield
    finally:
        for m in mods:
            if hasattr(m, "duo_gate"):
                del m.duo_gate
            del m.duo_chunk, m.duo_block
            if not hasattr(m, "duo_n_full"):
                del m.duo_sink, m.duo_recent, m.duo_keep_window


@dataclass
class IdentifyConfig:
    """Gate-training hyper-parameters (the reference's defaults: lr 0.02, reg 0.05, sink 128, recent 256, the
    block-sparse streaming mask). ``block``: 128 trains with the reference's block-sparse streaming mask (its
    default, the published patterns' setting), None with the token-level sink + recent window (its "sdpa"
    option). ``respect_sliding_window``: apply the model's sliding window on DuoAttention layers (the reference
    ignores it, :mod:`quantduo.duo.layout`)."""

    steps: int = 2000
    lr: float = 0.02
    reg_weight: float = 0.05
    sink: int = 128
    recent: int = 256
    chunk: int = 1024
    activation_checkpointing: bool = True
    block: int | None = 128
    respect_sliding_window: bool = False


def lr_factor(step: int, steps: int) -> float:
    """The reference's learning-rate multiplier at optimizer step ``step`` of ``steps``:
    ``min(1, max((step + 1) / (steps // 5), 0.1), max((steps - step) / (steps // 5), 0.1))`` (a fifth of the
    steps rising, a fifth falling, never below 0.1; ``steps // 5`` taken as at least 1)."""
    ramp = max(1, steps // 5)
    return min(1.0, max((step + 1) / ramp, 0.1), max((steps - step) / ramp, 0.1))


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    return model.model(input_ids=ids, use_cache=False).last_hidden_state


def distill_loss(model, gates: torch.Tensor, batch: Batch, cfg: IdentifyConfig) -> torch.Tensor:
    """MSE of final hidden states (teacher vs gated half of the two-way batch, float32) over the target positions
    (every token of the question / answer section, as the reference's labels) + reg * mean |gates| (float32).

    Call inside ``gated_model(model, gates, ...)`` (and run backward there too: activation checkpointing recomputes
    the forward).
    """
    ids, target = batch
    if not target.any():
        raise ValueError("batch has no answer tokens (target_mask is all False)")
    hidden = _final_hidden(model, torch.cat([ids, ids]))
    teacher, gated = hidden[:ids.shape[0]][target], hidden[ids.shape[0]:][target]
    return F.mse_loss(gated.float(), teacher.detach().float()) + cfg.reg_weight * gates.float().abs().mean()


def identify(model, batches: Callable[[int], Batch], cfg: IdentifyConfig, progress: bool = True) -> DuoPattern:
    """Train the gates of a frozen ``model``; ``batches(step)`` gives (input_ids, target_mask) on the
    model's device. Returns the continuous gates as left by the last optimizer step, as the reference saves them
    (possibly slightly outside [0, 1]; loading and binarizing clip them), as a DuoPattern (save it with
    save_pattern).

    Ctrl-C propagates as KeyboardInterrupt before anything is returned (nothing half-written).
    """
    if cfg.steps < 1:
        raise ValueError(f"identification needs steps >= 1, got {cfg.steps}")
    for p in model.parameters():
        p.requires_grad_(False)
    n_layers, n_kv = len(duo_layers(model.config)), model.config.num_key_value_heads
    gates = torch.ones(n_layers, n_kv, device=model.device, dtype=model.dtype, requires_grad=True)
    opt = torch.optim.AdamW([gates], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps))
    was_training = model.training
    ckpt = cfg.activation_checkpointing and model.supports_gradient_checkpointing
    if ckpt:
        set_activation_checkpointing(model, True)
        model.train()  # transformers only checkpoints in train mode; attention dropout stays 0 here
    try:
        bar = progress_bar(range(cfg.steps), desc="duo identify", progress=progress)
        for step in bar:
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            with gated_model(model, gates, cfg.sink, cfg.recent, cfg.chunk, cfg.block, cfg.respect_sliding_window):
                loss = distill_loss(model, gates, batches(step), cfg)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at step {step}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", mean_gate=f"{gates.mean().item():.3f}")
    finally:
        if ckpt:
            set_activation_checkpointing(model, False)
        model.train(was_training)
    extra = {"lr": cfg.lr, "num_steps": cfg.steps, "reg_weight": cfg.reg_weight, "supervision": "distill",
             "streaming_attn_implementation": _mask_name(cfg.block)}
    # as the reference, the gates as left by the last optimizer step (unclamped: loading and binarize clip them)
    return DuoPattern(gates.detach().float().cpu().numpy(), cfg.sink, cfg.recent, extra)


def _mask_name(block: int | None) -> str:
    """The reference's ``streaming_attn_implementation`` value for a streaming mask of ``block``-token blocks."""
    if block is None:
        return "sdpa"
    return "blocksparse" if block == 128 else f"blocksparse{block}"
