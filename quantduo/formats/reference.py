"""Pure-PyTorch references of each Triton kernel's exact job, in the kernels' own tensor layouts.

Layouts shared with the kernels (``M`` tokens, ``N`` out features, ``K`` padded in features, ``G`` group,
``r`` rank):

* 4-bit activations: packed uint8 ``[M, K // 2]`` (nibble layout of :mod:`quantduo.formats.quantizers`),
  float32 scales (values of the activation dtype: :func:`~quantduo.formats.quantizers.quantize_activations_4bit`)
  stored transposed ``[K // G, M]``.
* low-rank down-projection: float32 partial sums ``[S, M, r]`` over ``S`` slices of K; consumers sum them
  and round to the module dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quantduo.formats import quantizers as qz
from quantduo.formats.kv import QuantizedKV, dequantize_kv

ACT_MODES = ("int4", "uint4", "none", "smooth", "int4_deq", "uint4_deq")


def smooth_input(x: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """``x / smooth`` rounded to ``x.dtype`` (as the module does)."""
    return x / smooth.to(x.dtype)


def shift_smooth_input(x: torch.Tensor, smooth: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``(x + shift) / smooth`` (``x [..., K]``, ``smooth`` / ``shift`` ``[K]``): ``shift`` rounded to ``x.dtype``,
    the sum rounded to it, then :func:`smooth_input`: what the 4-bit activation modes quantize (Nunchaku's order for
    shifted unsigned activations; the values of ``x / smooth`` for a zero shift)."""
    return smooth_input(x + shift.to(x.dtype), smooth)


def lowrank_down(x_smooth: torch.Tensor, lora_down: torch.Tensor) -> torch.Tensor:
    """``x_smooth @ lora_down`` with operands in the lora dtype, float32 result ``[M, r]`` (not rounded)."""
    return x_smooth.to(lora_down.dtype).float() @ lora_down.float()


def act_quant_ref(x, smooth, shift, lora_down, mode: str, group_size: int = 64):
    """Reference of kernel 1 (:func:`quantduo.kernels.act_quant.act_quant`).

    Args: x ``[M, K]`` float16/bfloat16/float32; smooth, shift ``[K]``; lora_down ``[K, r]`` or None;
    mode in :data:`ACT_MODES`. The unsigned 4-bit modes quantize :func:`shift_smooth_input` (``(x + shift) /
    smooth``); the signed ones and the low-rank branch read :func:`smooth_input` (``x / smooth``; ``shift`` unread);
    4-bit groups by Nunchaku's rule, scales in x's dtype
    (:func:`~quantduo.formats.quantizers.quantize_activations_4bit`).
    Returns (q, scales, lx): see the module docstring for the layouts; q is None for mode ``"none"``, ``"smooth"``
    returns q = x / smooth, ``"int4_deq"`` / ``"uint4_deq"`` the dequantized 4-bit activations in x's dtype; lx
    float32 ``[M, r]`` or None.
    """
    xs = smooth_input(x, smooth)
    lx = lowrank_down(xs, lora_down) if lora_down is not None and lora_down.shape[1] > 0 else None
    if mode == "none":
        return None, None, lx
    if mode == "smooth":
        return xs, None, lx
    act = (shift_smooth_input(x, smooth, shift) if mode.startswith("uint4") else xs).float()
    if mode.endswith("_deq"):
        return qz.fake_quant_activations(act, mode[:-4], group_size, x.dtype).to(x.dtype), None, lx
    q, scales = qz.quantize_activations_4bit(act, group_size, mode == "uint4", x.dtype)
    return qz.pack_nibbles(q), scales.T.contiguous(), lx


def epilogue_ref(acc, lx, lora_up, bias, out_dtype, gelu: bool = False):
    """Shared GEMM epilogue: ``acc`` float32 ``[M, N]`` + low-rank up (``lx`` float32 ``[M, r]`` rounded to
    the lora dtype, product rounded to it too) + bias, cast to ``out_dtype``; then optionally GELU (tanh)."""
    if lx is not None:
        acc = acc + (lx.to(lora_up.dtype) @ lora_up.T).float()
    if bias is not None:
        acc = acc + bias.float()
    y = acc.to(out_dtype)
    if gelu:
        y = F.gelu(y.float(), approximate="tanh").to(out_dtype)
    return y


def w4_gemm_ref(a, a_scales, qweight, wscales, lx, lora_up, bias, mode: str, out_dtype, gelu=False):
    """Reference of the GEMM of 4-bit activations and INT4 weights with per-group scales (the 4-bit mode of
    :func:`quantduo.kernels.gemm_w4_skinny.w4_skinny_gemm`).

    mode ``"int4"`` / ``"uint4"``: ``a`` packed ``[M, K // 2]`` with ``a_scales`` ``[K // G, M]``.
    qweight uint8 ``[N, K // 2]`` (signed INT4), wscales ``[N, K // G]``. Returns ``[M, N]`` in out_dtype.
    """
    w = qz.dequantize_groups(qz.unpack_int4(qweight), wscales)
    codes = qz.unpack_int4(a) if mode == "int4" else qz.unpack_uint4(a)
    act = qz.dequantize_groups(codes, a_scales.T)
    return epilogue_ref(act @ w.T, lx, lora_up, bias, out_dtype, gelu)


def w4_gemv_ref(x, qweight, wscales, lx, lora_up, bias, out_dtype):
    """Reference of the one-token GEMV (:func:`quantduo.kernels.gemv_w4.w4_gemv`): x ``[M, K]`` times the exact
    float32 INT4 group-64 weights, float32 products; then the shared epilogue (low-rank ``lx`` float32
    ``[M, r]``, bias)."""
    w = qz.dequantize_groups(qz.unpack_int4(qweight), wscales.float())
    return epilogue_ref(x.float() @ w.T, lx, lora_up, bias, out_dtype)


def w4a16_convert_scale_ref(x, qweight, scales_t):
    """Reference of the CUTLASS INT4 x bf16 GEMM (:func:`quantduo.kernels.w4a16_cutlass.w4a16_gemm`): x bfloat16
    ``[M, K]`` times the weights it converts, ``bf16(q * scale)`` (qweight uint8 ``[N, K / 2]``, scales_t
    ``[K / 64, N]``), float32 products; bfloat16 ``[M, N]``."""
    scales = scales_t.float().T.repeat_interleave(64, dim=1)
    w = (qz.unpack_int4(qweight).float() * scales).to(torch.bfloat16).float()
    return (x.float() @ w.T).to(torch.bfloat16)


def w4a8_group_gemm_ref(codes, scales_t, xq, xs, lx, up, bias):
    """Reference of the INT4 x fp8 group GEMM (:mod:`quantduo.kernels.w4a8_cute`): per group of 64 inputs the exact
    integer-times-E4M3 sum, times the group's scale of each output (scales_t ``[K / 64, N]``), summed over groups,
    times the per-token scale xs float32 ``[T]``; plus ``lx @ up^T`` (bf16 ``[T, R]`` x ``[N, R]``) and bias
    ``[N]``, all in float32; bfloat16 ``[T, N]``. codes uint8 ``[N, K / 2]``, xq float8_e4m3fn ``[T, K]``."""
    q = qz.unpack_int4(codes).float()
    x = xq.float()
    width = q.shape[1] // scales_t.shape[0]
    acc = torch.zeros(x.shape[0], q.shape[0], device=x.device)
    for g, scale in enumerate(scales_t.float()):
        acc += (x[:, g * width:(g + 1) * width] @ q[:, g * width:(g + 1) * width].T) * scale
    return _float32_epilogue(acc * xs.float()[:, None], lx, up, bias)


def w4a8_folded_gemm_ref(codes, folded_t, row_scale, xq, xs, lx, up, bias):
    """Reference of the folded INT4 x fp8 GEMM (:func:`quantduo.kernels.w4a8_cute.w4a8_folded_gemm`): each weight
    ``e4m3(float16(q * float16(folded)))`` (folded_t float32 ``[K / 64, N]`` rounded to float16, the product rounded
    to float16, then to E4M3 by round-half-even), the exact fp8 products summed in float32, times ``xs[t] *
    row_scale[n]``; plus ``lx @ up^T`` and bias in float32; bfloat16 ``[T, N]``."""
    q = qz.unpack_int4(codes).half()
    folded = folded_t.T.half().repeat_interleave(q.shape[1] // folded_t.shape[0], dim=1)
    w8 = (q * folded).to(torch.float8_e4m3fn).float()
    return _float32_epilogue((xq.float() @ w8.T) * xs.float()[:, None] * row_scale.float()[None], lx, up, bias)


def _float32_epilogue(acc, lx, up, bias):
    """The INT4 x fp8 GEMMs' epilogue: ``acc`` float32 ``[T, N]`` + ``lx @ up^T`` (products summed in float32, as
    its bf16 ``wgmma`` does, unlike :func:`epilogue_ref`) + bias, rounded once to bfloat16."""
    acc = acc + lx.float() @ up.float().T
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(torch.bfloat16)


def rms_norm_ref(x, weight, eps: float):
    """Reference of :func:`quantduo.kernels.rms_norm.rms_norm` (transformers' Llama RMSNorm formula)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def w4_dequant_ref(qweight, wscales, dtype: torch.dtype, group_size: int = 64, lora_down=None, lora_up=None,
                   smooth=None):
    """Reference of :func:`quantduo.kernels.dequant_w4.dequant_w4`: ``(q * scale + lora_up @ lora_down^T) /
    smooth`` in float32, rounded to dtype, ``[N, K]``."""
    w = qz.unpack_int4(qweight).float() * wscales.float().repeat_interleave(group_size, dim=1)
    if lora_down is not None:
        w = w + lora_up.float() @ lora_down.float().T
    if smooth is not None:
        w = w / smooth.float()
    return w.to(dtype)


def nvfp4_dequant_ref(qweight, wscales, wscale_global):
    """Reference of the NVFP4 weight dequantization kernel: float32 ``[N, K]``."""
    return qz.dequantize_nvfp4(qz.unpack_nibbles(qweight), wscales, wscale_global)


def decode_attention_ref(q, k, v, scaling: float, length=None, key_pos=None):
    """Reference of :func:`quantduo.kernels.decode_attention.decode_attention` (same arguments).

    Quantized caches are dequantized to q's dtype (arithmetic in float32); scores are q * scaling (in q's
    dtype) times K, masked, softmax in float32, probabilities rounded to q's dtype times V.
    """
    k, v = (dequantize_kv(x, q.dtype) if isinstance(x, QuantizedKV) else x for x in (k, v))
    b, hq, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    scores = torch.matmul((q * scaling).reshape(b, hkv, hq // hkv, d), k.transpose(-1, -2))
    if length is not None:
        pos = key_pos if key_pos is not None else torch.arange(t, device=q.device)
        scores = scores.masked_fill(~((pos >= 0) & (pos < length)), float("-inf"))
    elif key_pos is not None:
        scores = scores.masked_fill(key_pos < 0, float("-inf"))
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).reshape(b, hq, 1, d)
