"""FP8 attention: the quantization semantics, as plain PyTorch (the reference of
:mod:`quantduo.kernels.attention_fp8`).

Layout ``[B, H, S, D]`` as ``F.scaled_dot_product_attention``. No mask, no dropout, not causal (DiT attention).

* Q, K and V are quantized to FP8 E4M3 per (batch, head, block of tokens): ``q_block`` rows of Q, ``kv_block``
  rows of K and V share one float32 scale ``absmax * (1 / 448)`` (1.0 for an all-zero block); codes
  ``e4m3(clamp(x * (1 / scale), +-448))``, round to nearest even.
* Scores ``S = (q8 @ k8^T) * s_q * s_k * sm_scale`` in float32, walked over key blocks of ``kv_block`` with an
  online softmax (running row max ``m`` and row sum ``l`` in float32, base-2 exponentials as the kernel).
* P is quantized for the PV product as FlashAttention-3 does: ``p = exp2(S * log2(e) - m)`` lies in [0, 1] and is
  stored as ``e4m3(p * P_SCALE)`` (``P_SCALE = 256``, a power of two, so the rescale is exact); the row sum ``l``
  adds the unquantized float32 ``p``. ``acc = acc * exp2(m_old - m) + (p8 @ v8) * s_v / P_SCALE``.
* Output ``acc / l`` in the dtype of q.

FlashAttention-3's fp8 kernel (:mod:`quantduo.kernels.attention_fa3`) takes one scale per (batch, head) instead:
:func:`quantize_heads_e4m3` (optionally from a static magnitude bound), the same scores, P quantization and output
(:func:`fp8_attention_heads_reference`). :func:`rms_norm_rope_e4m3_ref` gives its Q / K codes straight from a
FLUX-style projection (per-head RMSNorm, text + image concatenation, rotary embedding; kernel
:mod:`quantduo.kernels.qk_norm_rope`).
"""
from __future__ import annotations

import math

import torch

__all__ = ["DEFAULT_KV_BLOCK", "DEFAULT_Q_BLOCK", "E4M3_MAX", "P_SCALE", "attention_on_codes_reference",
           "attention_on_head_codes", "check_attention_inputs", "fp8_attention_heads_reference",
           "fp8_attention_reference", "quantize_blocks_e4m3", "quantize_heads_e4m3", "quantize_token_heads_e4m3_ref",
           "rms_norm_rope_e4m3_ref"]

E4M3_MAX = 448.0
P_SCALE = 256.0
DEFAULT_Q_BLOCK = 64  # tokens of Q per scale: the Triton kernel's fastest query tile on an H100 (BENCHMARKS.md)
DEFAULT_KV_BLOCK = 128  # tokens of K and of V per scale (the kernel's key tile)
LOG2E = 1.4426950408889634


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q ``[B, H, Sq, D]``, k and v ``[B, H, Skv, D]`` are floating point and agree."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 4-D floating-point tensor [B, H, S, D], got {t.dtype} "
                             f"{tuple(t.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError("empty sequence")


def quantize_blocks_e4m3(x: torch.Tensor, block: int, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 per (batch, head, block of ``block`` tokens) of ``x [B, H, S, D]``:
    (codes float8_e4m3fn ``[B, H, S, D]``, scales float32 ``[B, H, ceil(S / block)]``). ``padded``: the codes
    ``[B, H, ceil(S / block) * block, D]`` (contiguous, zeros past S), the layout the kernel reads."""
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    b, h, s, d = x.shape
    nblocks = -(-s // block)
    xf = torch.nn.functional.pad(x.float(), (0, 0, 0, nblocks * block - s)).reshape(b, h, nblocks, block * d)
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax * (1.0 / E4M3_MAX), torch.ones_like(amax))
    codes = (xf * (1.0 / scale)[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    codes = codes.reshape(b, h, nblocks * block, d)
    return (codes if padded else codes[:, :, :s]), scale


def _expand_scales(scale: torch.Tensor, block: int, length: int) -> torch.Tensor:
    """Per-block scales ``[B, H, n]`` -> per-token ``[B, H, length, 1]``."""
    return scale.repeat_interleave(block, dim=-1)[..., :length, None]


def fp8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                            q_block: int = DEFAULT_Q_BLOCK, kv_block: int = DEFAULT_KV_BLOCK) -> torch.Tensor:
    """Attention of q ``[B, H, Sq, D]`` over k, v ``[B, H, Skv, D]`` with the FP8 semantics of this module:
    ``[B, H, Sq, D]`` in q's dtype. ``sm_scale`` defaults to ``1 / sqrt(D)``."""
    check_attention_inputs(q, k, v)
    q8, sq = quantize_blocks_e4m3(q, q_block)
    k8, sk = quantize_blocks_e4m3(k, kv_block)
    v8, sv = quantize_blocks_e4m3(v, kv_block)
    return attention_on_codes_reference(q8, _expand_scales(sq, q_block, q.shape[2]), k8, sk, v8, sv, sm_scale,
                                        kv_block, q.dtype)


def attention_on_codes_reference(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                                 v8: torch.Tensor, v_scale: torch.Tensor, sm_scale: float | None, kv_block: int,
                                 dtype: torch.dtype) -> torch.Tensor:
    """The attention part of :func:`fp8_attention_reference` on E4M3 codes: q8 ``[B, H, Sq, D]`` with float32
    per-token scales ``q_scale [B, H, Sq, 1]``, k8 / v8 ``[B, H, Skv, D]`` with float32 scales per block of
    ``kv_block`` keys ``[B, H, ceil(Skv / kv_block)]``, walked block by block with the online softmax and the P
    quantization of the module docstring: ``[B, H, Sq, D]`` in ``dtype``."""
    sm_scale = 1.0 / math.sqrt(q8.shape[-1]) if sm_scale is None else sm_scale
    qf = q8.float() * (q_scale * (sm_scale * LOG2E))
    b, h, sq_len, d = q8.shape
    m = torch.full((b, h, sq_len, 1), -math.inf, device=q8.device)
    l = torch.zeros(b, h, sq_len, 1, device=q8.device)
    acc = torch.zeros(b, h, sq_len, d, device=q8.device)
    for j, start in enumerate(range(0, k8.shape[2], kv_block)):
        kj, vj = k8[:, :, start:start + kv_block].float(), v8[:, :, start:start + kv_block].float()
        s = (qf @ kj.transpose(-1, -2)) * k_scale[:, :, j, None, None]
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new)
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        p8 = (p * P_SCALE).to(torch.float8_e4m3fn).float()
        acc = acc * alpha + (p8 @ vj) * (v_scale[:, :, j, None, None] * (1.0 / P_SCALE))
        m = m_new
    return (acc / l).to(dtype)


def quantize_heads_e4m3(x: torch.Tensor, bound: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 with one scale per (batch, head) of ``x [B, H, S, D]`` (FlashAttention-3's fp8 operands): (codes
    float8_e4m3fn ``[B, H, S, D]``, scales float32 ``[B, H]``). The scale is the head's ``absmax / 448`` (1.0 for an
    all-zero head), or ``bound / 448`` for every head when a static magnitude bound ``bound > 0`` is given; codes
    ``e4m3(clamp(x * (1 / scale), +-448))``."""
    if bound is None:
        codes, scale = quantize_blocks_e4m3(x, x.shape[2])
        return codes, scale[..., 0]
    if not bound > 0:
        raise ValueError(f"bound must be positive, got {bound}")
    scale = bound / E4M3_MAX
    codes = (x.float() * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, torch.full(x.shape[:2], scale, dtype=torch.float32, device=x.device)


def quantize_token_heads_e4m3_ref(x0: torch.Tensor, x1: torch.Tensor | None = None
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_heads_e4m3` (one absmax scale per (batch, head)) of the token-major ``cat([x0, x1], dim=1)``,
    x0 ``[B, S0, H, D]``, x1 ``[B, S1, H, D]`` or None (projection outputs split into heads, text rows first):
    (codes float8_e4m3fn ``[B, S0 + S1, H, D]`` contiguous, FlashAttention-3's layout; scales float32 ``[B, H]``)."""
    x = x0 if x1 is None else torch.cat([x0, x1], dim=1)
    codes, scale = quantize_heads_e4m3(x.transpose(1, 2))
    return codes.transpose(1, 2).contiguous(), scale


def fp8_attention_heads_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None,
                                  q_bound: float | None = None, k_bound: float | None = None,
                                  kv_block: int = DEFAULT_KV_BLOCK) -> torch.Tensor:
    """Attention of q ``[B, H, Sq, D]`` over k, v ``[B, H, Skv, D]`` with one E4M3 scale per head
    (:func:`quantize_heads_e4m3`; ``q_bound`` / ``k_bound`` static bounds of q / k, V always by its absmax), keys
    walked in blocks of ``kv_block`` as :func:`attention_on_codes_reference`: ``[B, H, Sq, D]`` in q's dtype."""
    check_attention_inputs(q, k, v)
    (q8, sq), (k8, sk) = quantize_heads_e4m3(q, q_bound), quantize_heads_e4m3(k, k_bound)
    v8, sv = quantize_heads_e4m3(v)
    return attention_on_head_codes(q8, sq, k8, sk, v8, sv, sm_scale, kv_block, q.dtype)


def attention_on_head_codes(q8: torch.Tensor, sq: torch.Tensor, k8: torch.Tensor, sk: torch.Tensor, v8: torch.Tensor,
                            sv: torch.Tensor, sm_scale: float | None, kv_block: int, out_dtype: torch.dtype
                            ) -> torch.Tensor:
    """:func:`attention_on_codes_reference` for one scale per (batch, head): codes float8_e4m3fn ``[B, H, S, D]``,
    scales float32 ``[B, H]`` (:func:`quantize_heads_e4m3`), keys walked in blocks of ``kv_block``:
    ``[B, H, Sq, D]`` in ``out_dtype``."""
    n_blocks = -(-k8.shape[2] // kv_block)
    per_block = lambda scale: scale[..., None].expand(-1, -1, n_blocks)  # noqa: E731
    return attention_on_codes_reference(q8, sq[..., None, None], k8, per_block(sk), v8, per_block(sv), sm_scale,
                                        kv_block, out_dtype)


def rms_norm_rope_e4m3_ref(x0: torch.Tensor, w0: torch.Tensor, eps: float, bound: float,
                           x1: torch.Tensor | None = None, w1: torch.Tensor | None = None,
                           cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                           round_before_weight: bool = False) -> torch.Tensor:
    """Codes float8_e4m3fn ``[B, S0 + S1, H, D]`` of ``cat([x0, x1], dim=1)`` (``[B, S_i, H, D]``) after an eager
    RMSNorm with weight w0 / w1 ``[D]`` (cast to the inputs' dtype first; float32 statistics): PyTorch's
    ``torch.nn.RMSNorm``, which diffusers' FLUX attention uses (the weight applied in float32, one rounding to the
    inputs' dtype), or with ``round_before_weight`` diffusers' own ``RMSNorm`` (the normalized row rounded to the
    inputs' dtype, the product with the weight in it); then ``apply_rotary_emb`` (real form:
    ``x * cos + rot(x) * sin`` in float32 with ``rot(x)[2i] = -x[2i + 1]``, ``rot(x)[2i + 1] = x[2i]``, rounded to
    the inputs' dtype; ``cos`` / ``sin`` ``[S0 + S1, D]``, none: no rotation), quantized by the static ``bound``
    (:func:`quantize_heads_e4m3`)."""
    def rms_norm(x, w):
        normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        if round_before_weight:
            return normalized.to(x.dtype) * w.to(x.dtype)
        return (normalized * w.to(x.dtype).float()).to(x.dtype)

    y = rms_norm(x0, w0) if x1 is None else torch.cat([rms_norm(x0, w0), rms_norm(x1, w1)], dim=1)
    if cos is not None:
        even, odd = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
        rotated = torch.stack([-odd, even], dim=-1).flatten(3)
        y = (y.float() * cos[None, :, None, :].float() + rotated.float() * sin[None, :, None, :].float()).to(y.dtype)
    return quantize_heads_e4m3(y, bound)[0]
