"""RMSNorm in one launch (transformers' Llama / Mistral / Qwen2 / Qwen3 ``*RMSNorm``): a decode step runs about
65 of them, each otherwise 6-7 small PyTorch kernels (cast, square, mean, add, rsqrt, two multiplies).

``y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``: statistics in float32, the normalized row rounded to the
input dtype before the weight multiplies it, result in the dtype PyTorch promotes ``weight * x`` to.

Reference: :func:`quantduo.formats.reference.rms_norm_ref`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, W, OUT, H, eps, BLOCK: tl.constexpr):
    """Program r: row r of X ``[R, H]`` (contiguous) -> OUT ``[R, H]``; W ``[H]``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(X + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * inv_rms).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * H + cols, (w * normed).to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of ``x [..., H]`` (any float dtype) with ``weight [H]``; returns ``[..., H]`` in
    ``torch.result_type(weight, x)``."""
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"weight must be [{H}] for inputs [..., {H}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, H).contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    block = triton.next_power_of_2(H)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, H, eps, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out.reshape(x.shape)
