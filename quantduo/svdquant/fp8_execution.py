"""FP8 execution of INT4 SVDQuant layers: the stored 4-bit weights, FP8 E4M3 activations per token (Hopper).

Hopper has fp8 tensor cores (twice the bf16 rate) and no 4-bit ones. :func:`to_fp8_execution` turns a stored INT4
layer (any activation format: W4A4, W4A16, ``svdq-w4a16``) into an :class:`SVDQuantFP8Linear` that keeps the
same buffers and computes, above :data:`quantduo.kernels.SKINNY_MAX_TOKENS` tokens,

    y = fp8_tok(x) @ fp8_chan(W)^T + bias,     W = (q * scale + lora_up @ lora_down^T) / smooth_factor

* ``fp8_tok``: symmetric FP8 E4M3 per token (``absmax * (1 / 448)``, round to nearest even);
* ``fp8_chan``: ``W`` (the layer's whole weight: 4-bit residual, 16-bit low-rank branch, smoothing) rounded to
  FP8 E4M3 with the per-output-channel scale ``wscale_fp8 = absmax_k |W[n, k]| / 448``, computed once
  (:meth:`SVDQuantFP8Linear.refresh_fp8_scale`; LoRA attachment calls it).

Memory stays that of the INT4 layer (plus 8 bytes per output channel); the fp8 weight exists only while its GEMM
runs. The activations need no smoothing and no low-rank down-projection, so under ``torch.compile`` their
quantization fuses into the op that produces them. Few tokens (memory-bound) run the W4A16 kernels with 16-bit
activations. Kernels: :mod:`quantduo.kernels.fp8_linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .hopper_formats import to_w4a16
from .linear import SVDQuantLinear
from .quantizers import FP8_E4M3_MAX


class SVDQuantFP8Linear(SVDQuantLinear):
    """An INT4 :class:`SVDQuantLinear` (16-bit activation semantics: no shift, bias as stored) run with FP8
    activations. Extra buffers: ``wscale_fp8`` / ``inv_wscale_fp8`` float32 ``[N]``, ``inv_smooth_fp8`` float32
    ``[K]`` (``1 / smooth_factor``); ``smoothing_folded_out``: all smoothing factors are 1 (the expansion skips
    them); ``fast_accum``: the fp8 GEMM accumulates without float32 promotion along K (Hopper; 1.2-1.3x faster
    GEMMs, ~1e-3 relative error added to fp8's ~3e-2). Input ``[..., in_features]`` float, output
    ``[..., out_features]`` in x.dtype."""

    def __init__(self, in_features: int, out_features: int, rank: int = 32, bias: bool = True, group_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 fast_accum: bool = True) -> None:
        super().__init__(in_features, out_features, rank, bias, "int4", "none", group_size, dtype, device)
        self.act_format = "fp8"
        self.fast_accum = fast_accum
        self.register_buffer("wscale_fp8", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("inv_wscale_fp8", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("inv_smooth_fp8", torch.ones(self.padded_in_features, dtype=torch.float32, device=device))
        self.smoothing_folded_out = True

    def refresh_fp8_scale(self) -> None:
        """Recompute the fp8 weight scales and smoothing reciprocals from the current buffers (call it after
        changing them; LoRA attachment does)."""
        with torch.no_grad():
            self.inv_smooth_fp8.copy_(1.0 / self.smooth_factor.float())
            self.smoothing_folded_out = bool((self.smooth_factor == 1).all())
            amax = self.reconstructed_weight().abs().amax(dim=1)
            scale = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
            self.wscale_fp8.copy_(scale)
            self.inv_wscale_fp8.copy_(1.0 / scale)

    def low_rank_updated(self) -> None:
        self.refresh_fp8_scale()

    def reconstructed_weight(self) -> torch.Tensor:
        """``W`` float32 ``[N, K_padded]`` (padded input channels included)."""
        w_hat = self.dequantized_residual() + self.lora_up.float() @ self.lora_down.float().T
        return w_hat * self.inv_smooth_fp8[None, :]

    def fp8_weight(self) -> torch.Tensor:
        """``fp8_chan(W)`` as float32 codes ``[N, K_padded]`` (multiply by ``wscale_fp8[:, None]`` for W)."""
        w = self.reconstructed_weight() * self.inv_wscale_fp8[:, None]
        return w.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()

    def forward_reference(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Pure PyTorch, float32 products of the fp8 operands (``residual`` is not used)."""
        from quantduo.kernels.fp8_linear import quantize_fp8_per_token_ref

        x2 = self._pad_input(x).reshape(-1, self.padded_in_features)
        xq, x_scale = quantize_fp8_per_token_ref(x2)
        y = (xq.float() @ self.fp8_weight().T) * x_scale[:, None] * self.wscale_fp8[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from quantduo.kernels.fp8_linear import fp8_linear_forward

        if self._few_tokens(x):  # memory-bound: the W4A16 kernels, 16-bit activations
            return super().kernel_forward(x)
        return fp8_linear_forward(self, x)

    def forward_gelu(self, gelu_input: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``self(torch.cat([prefix, F.gelu(gelu_input, approximate="tanh")], dim=-1))`` (prefix optional).

        gelu_input ``[..., Kg]`` and prefix ``[..., in_features - Kg]`` float. Through the fp8 kernels the GELU and the
        concatenation happen inside the per-token activation quantization (one pass, no 16-bit copy of the layer
        input; the GELU stays in float32 up to the fp8 rounding); otherwise as written above.
        """
        from quantduo.kernels.fp8_linear import fp8_linear_forward

        width = gelu_input.shape[-1] + (0 if prefix is None else prefix.shape[-1])
        if width != self.in_features or (prefix is not None and prefix.shape[:-1] != gelu_input.shape[:-1]):
            raise ValueError(f"the layer takes {self.in_features} input channels, got gelu_input "
                             f"{tuple(gelu_input.shape)} and prefix {None if prefix is None else tuple(prefix.shape)}")
        kernels = self.backend == "triton" or (self.backend == "auto" and gelu_input.is_cuda)
        if not kernels or self._few_tokens(gelu_input) or self.padded_in_features != self.in_features:
            x = F.gelu(gelu_input, approximate="tanh")
            return self(x if prefix is None else torch.cat([prefix, x], dim=-1))
        return fp8_linear_forward(self, prefix, gelu_input)

    @staticmethod
    def _few_tokens(x: torch.Tensor) -> bool:
        from quantduo.kernels import SKINNY_MAX_TOKENS

        return x.numel() // x.shape[-1] <= SKINNY_MAX_TOKENS


def to_fp8_execution(module: SVDQuantLinear, fast_accum: bool = True) -> SVDQuantFP8Linear:
    """:class:`SVDQuantFP8Linear` with ``module``'s stored INT4 weights (W4A4 layers: the unsigned shift's bias
    term unfolded first, as :func:`~quantduo.svdquant.hopper_formats.to_w4a16`); ``fast_accum`` as there."""
    if not isinstance(module, SVDQuantLinear) or module.weight_format != "int4":
        raise ValueError(f"fp8 execution needs an INT4 SVDQuantLinear, got {type(module).__name__}"
                         f"{'' if not isinstance(module, SVDQuantLinear) else ' with ' + module.weight_format}")
    if isinstance(module, SVDQuantFP8Linear):
        return module
    a16 = module if module.act_format == "none" else to_w4a16(module)
    with torch.no_grad():
        out = SVDQuantFP8Linear(module.in_features, module.out_features, module.rank, module.bias is not None,
                                module.group_size, module.dtype, module.qweight.device, fast_accum)
        out.load_state_dict(a16.state_dict(), strict=False)
        out.refresh_fp8_scale()
    out.backend = module.backend
    return out
