"""Pure-PyTorch references of each Triton kernel's exact job, in the kernels' own tensor layouts.

Layouts shared with the kernels (``M`` tokens, ``N`` out features, ``K`` padded in features, ``G`` group,
``r`` rank):

* 4-bit activations: packed uint8 ``[M, K // 2]`` (nibble layout of :mod:`quantduo.svdquant.quantizers`),
  float32 scales stored transposed ``[K // G, M]``.
* 8-bit activations (W4A8): int8 ``[M, K]`` in *pair-split* order: inside every group of ``G`` channels the
  even channels come first, then the odd ones (so they line up with the low / high nibbles of the packed
  weights), or float8_e4m3fn ``[M, K]`` in natural order; float32 scales ``[M]``.
* low-rank down-projection: float32 partial sums ``[S, M, r]`` over ``S`` slices of K; consumers sum them
  and round to the module dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from quantduo.formats.kv import QuantizedKV, dequantize_kv
from quantduo.svdquant import hopper_formats as hf
from quantduo.svdquant import quantizers as qz

ACT_MODES = ("int4", "uint4", "int8", "fp8", "none", "smooth", "amax", "int4_deq", "uint4_deq")


def pair_split(x: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """Reorder the last dim of ``x [..., K]`` so each group of ``group_size`` lists evens then odds."""
    g = x.reshape(*x.shape[:-1], -1, group_size // 2, 2)
    return torch.cat([g[..., 0], g[..., 1]], dim=-1).reshape(x.shape)


def pair_merge(x: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """Inverse of :func:`pair_split`."""
    g = x.reshape(*x.shape[:-1], -1, 2, group_size // 2)
    return g.transpose(-1, -2).reshape(x.shape)


def smooth_input(x: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """``x / smooth`` rounded to ``x.dtype`` (as the module does)."""
    return x / smooth.to(x.dtype)


def lowrank_down(x_smooth: torch.Tensor, lora_down: torch.Tensor) -> torch.Tensor:
    """``x_smooth @ lora_down`` with operands in the lora dtype, float32 result ``[M, r]`` (not rounded)."""
    return x_smooth.to(lora_down.dtype).float() @ lora_down.float()


def act_quant_ref(x, smooth, shift, lora_down, mode: str, group_size: int = 64):
    """Reference of kernel 1 (:func:`quantduo.kernels.act_quant.act_quant`).

    Args: x ``[M, K]`` float16/bfloat16/float32; smooth, shift ``[K]``; lora_down ``[K, r]`` or None;
    mode in :data:`ACT_MODES`.
    Returns (q, scales, lx): see the module docstring for the layouts; q is None for modes ``"none"`` and
    ``"amax"`` (whose scales are the row absmax ``[M]`` of the smoothed x: the max over the kernel's
    partials), ``"smooth"`` returns q = x / smooth, ``"int4_deq"`` / ``"uint4_deq"`` the dequantized 4-bit
    activations in x's dtype; lx float32 ``[M, r]`` or None.
    """
    xs = smooth_input(x, smooth)
    lx = lowrank_down(xs, lora_down) if lora_down is not None and lora_down.shape[1] > 0 else None
    if mode == "none":
        return None, None, lx
    if mode == "smooth":
        return xs, None, lx
    if mode == "amax":
        return None, xs.float().abs().amax(dim=-1), lx
    if mode == "int8":
        q, scales = hf.quantize_int8_tokens(xs)
        return pair_split(q, group_size), scales, lx
    if mode == "fp8":
        return (*hf.quantize_fp8_tokens(xs), lx)
    act = xs.float() + shift.float()
    if mode.endswith("_deq"):
        return qz.fake_quant(act, mode[:-4], group_size).to(x.dtype), None, lx
    quant = qz.quantize_int4 if mode == "int4" else qz.quantize_uint4
    q, scales = quant(act, group_size)
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
    """Reference of the W4A4 group-scaled GEMM (:func:`quantduo.kernels.gemm_w4a4.w4_gemm`).

    mode ``"int4"`` / ``"uint4"``: ``a`` packed ``[M, K // 2]`` with ``a_scales`` ``[K // G, M]``.
    qweight uint8 ``[N, K // 2]`` (signed INT4), wscales ``[N, K // G]``. Returns ``[M, N]`` in out_dtype.
    """
    w = qz.dequantize_groups(qz.unpack_int4(qweight), wscales)
    codes = qz.unpack_int4(a) if mode == "int4" else qz.unpack_uint4(a)
    act = qz.dequantize_groups(codes, a_scales.T)
    return epilogue_ref(act @ w.T, lx, lora_up, bias, out_dtype, gelu)


def w4_dequant_gemm_ref(x, qweight, wfactor, lx, lora_up, bias, out_dtype, smooth=None, act="none", amax=None,
                        wrow=None, gelu=False):
    """Reference of the weight-streaming GEMM (:func:`quantduo.kernels.gemm_w4_dequant.w4_dequant_gemm`).

    x 16-bit ``[M, K]`` (divided by ``smooth`` when given); act ``"none"`` or ``"int8"`` / ``"fp8"``: x
    fake-quantized per token with scale ``amax [M] / (127 | 448)`` (as ``hopper_formats``); weights
    ``q * wfactor [N, K // G]`` (times ``wrow [N]`` when given), the dequantized tile rounded to x.dtype.
    """
    xs = smooth_input(x, smooth) if smooth is not None else x
    w = qz.dequantize_groups(qz.unpack_int4(qweight), wfactor.float())
    if act == "none":
        a = xs.float()
        w = w.to(x.dtype).float()
    else:
        qmax = hf.INT8_MAX if act == "int8" else qz.FP8_E4M3_MAX
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        y = (xs.float() / scale[:, None]).clamp(-qmax, qmax)
        a = (torch.round(y) if act == "int8" else y.to(torch.float8_e4m3fn).float()) * scale[:, None]
    if wrow is not None:
        w = w * wrow.float()[:, None]
    return epilogue_ref(a @ w.T, lx, lora_up, bias, out_dtype, gelu)


def w4_gemv_ref(x, qweight, wscales, lx, lora_up, bias, out_dtype):
    """Reference of the one-token GEMV (:func:`quantduo.kernels.gemv_w4.w4_gemv`): x ``[M, K]`` times the exact
    float32 INT4 group-64 weights, float32 products; then the shared epilogue (low-rank ``lx`` float32
    ``[M, r]``, bias)."""
    w = qz.dequantize_groups(qz.unpack_int4(qweight), wscales.float())
    return epilogue_ref(x.float() @ w.T, lx, lora_up, bias, out_dtype)


def rms_norm_ref(x, weight, eps: float):
    """Reference of :func:`quantduo.kernels.rms_norm.rms_norm` (transformers' Llama RMSNorm formula)."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def quant_next_ref(h, smooth, shift, lora_down, mode: str, group_size: int = 64):
    """What the MLP fc1 epilogue produces for fc2 from fc1's output ``h [M, N1]``: kernel 1's job on ``h``."""
    return act_quant_ref(h, smooth, shift, lora_down, mode, group_size)


def w4a8_gemm_ref(a, a_scales, qweight, wmult, wrow, lx, lora_up, bias, out_dtype, gelu=False, group_size=64):
    """Reference of the W4A8 GEMM (:mod:`quantduo.kernels.gemm_w4a8`): ``a`` int8 pair-split ``[M, K]`` or
    float8_e4m3fn natural order, a_scales float32 ``[M]``; weights in a format of
    :mod:`quantduo.svdquant.hopper_formats`."""
    codes = pair_merge(a, group_size) if a.dtype == torch.int8 else a
    act = codes.float() * a_scales[:, None]
    w = hf.dequantize_int4_int8exact(qz.unpack_int4(qweight), wmult, wrow)
    return epilogue_ref(act @ w.T, lx, lora_up, bias, out_dtype, gelu)


def w4_expand_ref(qweight, wmult, fp8: bool, group_size: int = 64):
    """Reference of the weight expansion kernel: ``q * mult`` ``[N, K]``, float8_e4m3fn in natural order
    (fp8) or int8 in pair-split order."""
    q = qz.unpack_int4(qweight).to(torch.int16)
    m = wmult.to(torch.int16).repeat_interleave(group_size, dim=1)
    if fp8:
        return (q * m).float().to(torch.float8_e4m3fn)
    return pair_split((q * m).to(torch.int8), group_size)


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
