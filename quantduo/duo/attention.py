"""DuoAttention attention math: gated identification attention, causal prefill, decode.

Conventions: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (Hq = rep * Hkv, GQA), absolute positions.
Identification (training) mask of a *streaming* head, as the reference's: position p sees key positions
kp <= p with kp < sink or p - kp < recent (token level), or, with ``block`` = 128, the key blocks
kp // block < ceil(sink / block) or p // block - kp // block < ceil(recent / block) (the reference's block-sparse
kernel, which trained the published patterns). Deployment windows: :mod:`quantduo.duo.cache`.

Masked deployment path (left-padded batches, sliding-window layers, logit soft-capping): keys carry their slot
positions (the sequence axis of the batch, pads included; -1: empty), row b's real tokens start at slot
``pad[b]``, and :func:`visible_mask` states the deployment rule on those positions (:func:`masked_attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from torch.utils.checkpoint import checkpoint

from quantduo.kernels.decode_attention import decode_attention, kernel_supports
from quantduo.formats.reference import decode_attention_ref


def streaming_allowed(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, recent: int,
                      block: int | None = None) -> torch.Tensor:
    """Bool mask [Tq, Tk] of the identification streaming pattern (module docstring) for absolute positions
    q_pos [Tq], k_pos [Tk] (int64); ``block``: block granularity (None: token level)."""
    q, k = q_pos[:, None], k_pos[None, :]
    if block is None:
        return (k <= q) & ((k < sink) | (q - k < recent))
    n_sink, n_recent = -(-sink // block), -(-recent // block)
    return (k <= q) & ((k // block < n_sink) | (q // block - k // block < n_recent))


def _gated_chunk(q, k, v, gate, q_start: int, sink: int, recent: int, scaling: float, block: int | None,
                 window: int | None, softcap: float | None):
    """One query chunk of :func:`_gated_softcapped`; q [B, Hkv, rep, Tc, D], k/v [B, Hkv, 1, Tk, D]."""
    tc, tk = q.shape[-2], k.shape[-2]
    q_pos = torch.arange(q_start, q_start + tc, device=q.device)
    k_pos = torch.arange(tk, device=q.device)
    scores = (q @ k.transpose(-1, -2)).float() * scaling
    scores = torch.tanh(scores / softcap) * softcap
    inside = torch.ones(tc, tk, dtype=torch.bool, device=q.device) if window is None else \
        q_pos[:, None] - k_pos[None, :] < window
    full = scores.masked_fill(~((k_pos[None, :] <= q_pos[:, None]) & inside), float("-inf")).softmax(-1)
    if gate is None:
        return full.to(v.dtype) @ v
    allowed = streaming_allowed(q_pos, k_pos, sink, recent, block) & inside
    stream = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    g = gate.view(1, -1, 1, 1, 1)
    probs = g * full + (1 - g) * stream
    return (probs.to(v.dtype) @ v)


def _window_key_positions(s: int, e: int, sink: int, recent: int, block: int | None, device) -> torch.Tensor:
    """Key positions int64 [n] that some query of positions [s, e) may see under the identification streaming mask
    (:func:`streaming_allowed`): the sinks, then the earliest window key of the chunk's first query up to e - 1."""
    if block is None:
        sink_end, low = sink, s - recent + 1
    else:
        sink_end, low = -(-sink // block) * block, (s // block - -(-recent // block) + 1) * block
    low = max(low, 0)
    return torch.cat([torch.arange(min(sink_end, low), device=device), torch.arange(low, e, device=device)])


def causal_attention(q, k, v, scaling: float, window: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, D] over k/v [B, Hkv, T, D] (positions 0..T-1); ``window``: the layer's
    sliding window (keys with q - k < window), computed per query chunk of ``chunk`` over that chunk's keys.
    Returns [B, Hq, T, D] in q's dtype (SDPA: no [T, T] score matrix is kept)."""
    gqa = q.shape[1] != k.shape[1]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    t, outs = q.shape[2], []
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        low = max(0, s - window + 1)
        q_pos, k_pos = torch.arange(s, e, device=q.device), torch.arange(low, e, device=q.device)
        allowed = (k_pos[None] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None] < window)
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, low:e], v[:, :, low:e], attn_mask=allowed,
                                                   scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


def streaming_attention(q, k, v, sink: int, recent: int, scaling: float, chunk: int = 1024,
                        block: int | None = None, window: int | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, T, D] over k/v [B, Hkv, T, D] (positions 0..T-1) under the identification streaming
    mask (:func:`streaming_allowed`, within the layer's sliding ``window``), per query chunk of ``chunk`` over only
    the keys that chunk may see (sinks + window): O(T * (sink + recent + chunk)) work. Returns [B, Hq, T, D]."""
    t, outs = q.shape[2], []
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        q_pos = torch.arange(s, e, device=q.device)
        k_pos = _window_key_positions(s, e, sink, recent, block, q.device)
        allowed = streaming_allowed(q_pos, k_pos, sink, recent, block)
        if window is not None:
            allowed &= q_pos[:, None] - k_pos[None] < window
        outs.append(F.scaled_dot_product_attention(q[:, :, s:e], k.index_select(2, k_pos), v.index_select(2, k_pos),
                                                   attn_mask=allowed, scale=scaling,
                                                   enable_gqa=q.shape[1] != k.shape[1]))
    return torch.cat(outs, dim=2)


def gated_attention(q, k, v, gate, sink: int, recent: int, scaling: float, chunk: int = 1024,
                    checkpointed: bool = True, block: int | None = None, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Identification-time attention: gate * full + (1 - gate) * streaming, per KV head (the mix of attention
    outputs, as the reference; equal to mixing the probabilities).

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (no cache, positions 0..T-1), gate [Hkv] in [0, 1] (any float dtype)
    (differentiable; None: full attention only); ``block``: streaming mask granularity (module docstring);
    ``window``: the layer's sliding window (both patterns keep keys with q - k < window); ``softcap``: scores
    soft-capped as Gemma 2's. Full and streaming attention run as SDPA (:func:`causal_attention`,
    :func:`streaming_attention`); with ``softcap`` (which SDPA cannot apply) queries are processed in chunks of
    ``chunk`` with explicit float32 scores under activation checkpointing (``checkpointed``), so memory stays
    O(chunk * T) per head. Returns [B, Hq, T, D] in q's dtype.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if softcap is not None:
        return _gated_softcapped(q, k, v, gate, sink, recent, scaling, chunk, checkpointed, block, window, softcap)
    full = causal_attention(q, k, v, scaling, window, chunk)
    if gate is None:
        return full
    stream = streaming_attention(q, k, v, sink, recent, scaling, chunk, block, window)
    g = gate.to(q.dtype).view(1, hkv, 1, 1, 1)
    mixed = g * full.view(b, hkv, hq // hkv, t, d) + (1 - g) * stream.view(b, hkv, hq // hkv, t, d)
    return mixed.reshape(b, hq, t, d)


def streaming_only_attention(q, k, v, sink: int, recent: int, scaling: float, chunk: int = 1024,
                             block: int | None = None, window: int | None = None,
                             softcap: float | None = None) -> torch.Tensor:
    """The streaming pattern's attention alone (:func:`gated_attention` at gate 0, without its full-attention
    half where SDPA serves): q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D] in q's dtype."""
    if softcap is None:
        return streaming_attention(q, k, v, sink, recent, scaling, chunk, block, window)
    zero = torch.zeros(k.shape[1], dtype=q.dtype, device=q.device)
    return _gated_softcapped(q, k, v, zero, sink, recent, scaling, chunk, True, block, window, softcap)


def _gated_softcapped(q, k, v, gate, sink, recent, scaling, chunk, checkpointed, block, window, softcap):
    """:func:`gated_attention` with soft-capped scores, chunk by chunk (:func:`_gated_chunk`)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, hq // hkv, t, d)
    outs = []
    for s in range(0, t, chunk):
        e = min(t, s + chunk)
        args = (qg[..., s:e, :], k[:, :, None, :e], v[:, :, None, :e], gate, s, sink, recent, scaling, block,
                window, softcap)
        use_ckpt = checkpointed and torch.is_grad_enabled()
        outs.append(checkpoint(_gated_chunk, *args, use_reentrant=False) if use_ckpt else _gated_chunk(*args))
    return torch.cat(outs, dim=-2).reshape(b, hq, t, d)


def visible_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, pad: torch.Tensor, window: int | None = None,
                 stream: tuple[int, int, int, bool] | None = None) -> torch.Tensor:
    """Bool [B, 1, Tq, Tk]: which keys each query of a chunk sees (deployment rule, on slot positions).

    q_pos [Tq] int64 slots of the queries; k_pos [B or 1, Tk] int64 slots of the keys (-1: empty); pad [B] int64
    first real slot per row. A key is visible when it is real (slot >= pad), causal, inside the sliding ``window``
    (q - k < window, as transformers' sliding-window masks) and, for a streaming head (``stream`` = (sink, recent,
    chunk start slot s, per_token)), a sink of its row (k < pad + sink) or at most ``recent`` before the chunk
    (k >= s - recent): the reference's chunk-level window, per row; with ``per_token`` one of the last ``recent``
    keys up to the query instead (q - k < recent). A query always sees itself, so padding queries get a finite
    (unused) output.
    """
    q, k, p = q_pos[None, None, :, None], k_pos[:, None, None, :], pad[:, None, None, None]
    ok = (k >= p) & (k <= q)
    if window is not None:
        ok &= q - k < window
    if stream is not None:
        sink, recent, start, per_token = stream
        ok &= (k < p + sink) | ((q - k < recent) if per_token else (k >= start - recent))
    return ok | (k == q)


def masked_attention(q, k, v, allowed: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of q [B, Hq, Tq, D] over k/v [B, Hkv, Tk, D] where ``allowed`` (bool, broadcastable to
    [B, 1, Tq, Tk]) holds. Without ``softcap`` SDPA with the boolean mask; with it, float32 math with scores
    ``softcap * tanh(scores / softcap)`` (Gemma 2). Returns [B, Hq, Tq, D] in q's dtype."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scaling,
                                              enable_gqa=q.shape[1] != k.shape[1])
    rep = q.shape[1] // k.shape[1]
    scores = (q.float() @ k.repeat_interleave(rep, 1).float().transpose(-1, -2)) * scaling
    scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v.repeat_interleave(rep, 1).float()).to(q.dtype)


def cudnn_attention_supported(q: torch.Tensor) -> bool:
    """Whether :func:`attention_lse` runs PyTorch's cuDNN attention op for queries ``q`` (CUDA, 16-bit,
    head_dim a multiple of 8 and at most 128)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def attention_lse(q, k, v, causal: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, Hq, Tq, D] over k/v [B, Hkv, Tk, D] and its log-sum-exp of scaled scores.

    ``causal`` needs Tq == Tk. On CUDA (16-bit, D % 8 == 0, D <= 128) PyTorch's cuDNN attention op (KV heads
    repeated for GQA if the op refuses them); elsewhere math in :func:`accumulation_dtype` (float32, float64 for
    float64 inputs). Returns (out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] float32, or float64 for float64 q).
    """
    rep = q.shape[1] // k.shape[1]
    if cudnn_attention_supported(q):
        def cudnn(k, v):
            return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                     scale=scaling)
        try:
            res = cudnn(k, v)
        except RuntimeError:
            if rep == 1:
                raise
            res = cudnn(k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        return res[0], res[1].reshape(q.shape[:3])
    acc = accumulation_dtype(q.dtype)
    kr, vr = k.repeat_interleave(rep, 1).to(acc), v.repeat_interleave(rep, 1).to(acc)
    scores = (q.to(acc) @ kr.transpose(-1, -2)) * scaling
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ vr).to(q.dtype), lse


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 tensors, float64 for float64 ones (softmax statistics and merges)."""
    return torch.promote_types(dtype, torch.float32)


def merge_attention_lse(o1, lse1, o2, lse2) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from each part's output [B, H, T, D] and log-sum-exp
    [B, H, T] (the online-softmax merge). Returns (out, lse) in :func:`accumulation_dtype` of o1's dtype."""
    acc = accumulation_dtype(o1.dtype)
    lse1, lse2 = lse1.to(acc), lse2.to(acc)
    lse = torch.logaddexp(lse1, lse2)
    out = o1.to(acc) * (lse1 - lse).exp()[..., None]
    return out.addcmul_(o2.to(acc), (lse2 - lse).exp()[..., None]), lse


def merge_attention(o1, lse1, o2, lse2) -> torch.Tensor:
    """:func:`merge_attention_lse`'s output in o1's dtype."""
    return merge_attention_lse(o1, lse1, o2, lse2)[0].to(o1.dtype)


def split_causal_attention(q, k, v, q_start: int, scaling: float) -> torch.Tensor:
    """Causal attention of a chunk q [B, Hq, Tq, D] at positions q_start.. over k/v [B, Hkv, q_start + Tq, D]
    as an unmasked rectangle over the cached keys plus a causal square over the chunk, merged by log-sum-exp
    (:func:`attention_lse`): both parts run the fast square / unmasked kernels."""
    rect = attention_lse(q, k[:, :, :q_start], v[:, :, :q_start], False, scaling)
    square = attention_lse(q, k[:, :, q_start:], v[:, :, q_start:], True, scaling)
    return merge_attention(*rect, *square)


def full_prefill(q, k, v, q_start: int, scaling: float) -> torch.Tensor:
    """Causal attention of q [B, Hq, Tq, D] (positions q_start..) over k/v [B, Hkv, q_start + Tq, D].

    The first chunk is SDPA with ``is_causal``. Later chunks: :func:`split_causal_attention` where cuDNN
    attention serves it (SDPA's lower-right causal bias runs FlashAttention-2 at about half the speed of the
    cuDNN kernel on an H100, BENCHMARKS.md); elsewhere (CPU, float32) SDPA with a lower-right causal bias, which
    keeps no score matrix in memory.
    """
    gqa = q.shape[1] != k.shape[1]
    if not q_start:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    if cudnn_attention_supported(q):
        return split_causal_attention(q, k, v, q_start, scaling)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]),
                                          scale=scaling, enable_gqa=gqa)


def decode(q, k, v, scaling: float, length: torch.Tensor | None = None,
           key_pos: torch.Tensor | None = None) -> torch.Tensor:
    """One new query token q [B, Hq, 1, D] over cached keys k/v: 16-bit [B, Hkv, Tk, D] tensors or
    :class:`~quantduo.formats.kv.QuantizedKV` codes (dequantized on the fly).

    ``length`` (device int64 [1]) masks key positions >= length (static caches attend over a
    preallocated buffer); ``key_pos`` [Tk] or per row [B, Tk] gives each slot's position (-1: empty), else slot j
    holds position j. On CUDA the split-KV Triton kernel (:mod:`quantduo.kernels.decode_attention`; head_dim >=
    32), elsewhere its PyTorch reference. Returns [B, Hq, 1, D].
    """
    if q.is_cuda and kernel_supports(q):
        return decode_attention(q, k, v, scaling, length, key_pos)
    if key_pos is not None and key_pos.ndim == 2:  # the reference masks scores [B, Hkv, R, Tk]
        key_pos = key_pos[0] if key_pos.shape[0] == 1 else key_pos[:, None, None, :]
    return decode_attention_ref(q, k, v, scaling, length, key_pos)
