"""``SVDQuantLinear``: a 4-bit linear layer with a 16-bit low-rank branch.

Computes ``y = Q_a(x / smooth_factor + act_shift) @ Q_w(R)^T + (x / smooth_factor) @ lora_down @ lora_up^T + bias``
where ``R = W * smooth_factor - lora_up @ lora_down^T`` is the quantized residual. With
``act_format="none"`` it is a weight-only (W4A16) layer. Buffers (``N = out_features``,
``K = padded in_features``, ``G = group_size``, ``r = rank``):

* ``qweight``       uint8 ``[N, K // 2]``           packed residual (layout in :mod:`.quantizers`)
* ``wscales``       ``[N, K // G]`` (module dtype)  INT4 group scales, or float8_e4m3fn ``[N, K // 16]`` for NVFP4
* ``wscale_global`` float32 ``[]``                  NVFP4 per-tensor scale (1.0 for INT4)
* ``smooth_factor`` ``[K]`` (module dtype)           inputs are divided by it
* ``act_shift``     ``[K]`` (module dtype)           added before unsigned activation quantization (zeros otherwise);
  its effect ``-Q_w(R) @ act_shift`` is already folded into ``bias``
* ``lora_down``     ``[K, r]``, ``lora_up`` ``[N, r]`` (module dtype)  the low-rank branch
* ``bias``          ``[N]`` (module dtype) or absent
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import quantizers as qz

WEIGHT_FORMATS = ("int4", "nvfp4")
ACT_FORMATS = ("int4", "uint4", "nvfp4", "none")


def padded_features(in_features: int, group_size: int) -> int:
    """``in_features`` rounded up to a multiple of ``group_size``."""
    return in_features + (-in_features) % group_size


class LowRankQuantLinear(nn.Module):
    """Skeleton shared by the 4-bit layers: smoothing, the 16-bit low-rank branch, bias and input padding.

    ``y = A(x / smooth_factor) @ R^T + (x / smooth_factor) @ lora_down @ lora_up^T + bias`` where subclasses
    define the packed residual ``R`` (:meth:`dequantized_residual`, :meth:`packed_buffers`), what the
    4-bit GEMM sees of the activations ``A`` (:meth:`quantized_activation`) and the kernel path
    (:meth:`kernel_forward`). ``backend``: ``"reference"``, ``"triton"`` or ``"auto"`` (kernels on CUDA).
    """

    def __init__(self, in_features: int, out_features: int, padded_in: int, rank: int, bias: bool,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"zero-size layer ({out_features}x{in_features}) cannot be quantized")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.backend = "auto"
        fp = dict(dtype=dtype, device=device)
        self.register_buffer("smooth_factor", torch.ones(padded_in, **fp))
        self.register_buffer("lora_down", torch.zeros(padded_in, rank, **fp))
        self.register_buffer("lora_up", torch.zeros(out_features, rank, **fp))
        self.register_buffer("bias", torch.zeros(out_features, **fp) if bias else None)
        self._identity_smooth = (None, False)  # ((data_ptr, version) of smooth_factor, all ones)

    # ------------------------------------------------------------------------------------------
    # what subclasses provide
    def dequantized_residual(self) -> torch.Tensor:
        """The 4-bit residual as float32 ``[N, K_padded]`` (smoothed space)."""
        raise NotImplementedError

    def quantized_activation(self, x_smooth: torch.Tensor) -> torch.Tensor:
        """What the 4-bit GEMM sees of the smoothed inputs ``[..., K_padded]``, float32."""
        raise NotImplementedError

    def packed_buffers(self) -> tuple[torch.Tensor, ...]:
        """The buffers holding the quantized residual (values and scales)."""
        raise NotImplementedError

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def low_rank_updated(self) -> None:
        """Called after ``lora_down`` / ``lora_up`` change (LoRA attachment); layers with state derived from them
        recompute it."""

    def compute_dtype_buffers(self) -> tuple[str, ...]:
        """Names of the buffers held in the compute dtype (:attr:`dtype`)."""
        return ("smooth_factor", "lora_down", "lora_up", "bias")

    def to_compute_dtype(self, dtype: torch.dtype) -> "LowRankQuantLinear":
        """Cast the compute-dtype buffers (:meth:`compute_dtype_buffers`) to ``dtype`` in place; packed codes and
        their own-format scales (uint8, fp8, float32) keep theirs. Returns self."""
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"compute dtype must be float16, bfloat16 or float32, got {dtype}")
        for name in self.compute_dtype_buffers():
            if self._buffers.get(name) is not None:
                self._buffers[name] = self._buffers[name].to(dtype)
        self.low_rank_updated()  # state derived from the low-rank branch (fp8 execution's weight scales)
        return self

    # ------------------------------------------------------------------------------------------
    @property
    def padded_in_features(self) -> int:
        return self.smooth_factor.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.smooth_factor.dtype

    def smoothing_is_identity(self) -> bool:
        """Whether ``smooth_factor`` is all ones (e.g. weight-only formats), so kernels may skip ``x / smooth``.

        Cached per version of the buffer (in-place writes such as ``load_state_dict`` invalidate it); checking
        syncs with the device once per change, and during CUDA-graph capture an unchecked buffer counts as
        not identity (correct, only slower).
        """
        key = (self.smooth_factor.data_ptr(), self.smooth_factor._version)
        if self._identity_smooth[0] != key:
            if self.smooth_factor.is_cuda and torch.cuda.is_current_stream_capturing():
                return False
            self._identity_smooth = (key, bool((self.smooth_factor == 1).all()))
        return self._identity_smooth[1]

    def dequantized_weight(self) -> torch.Tensor:
        """Effective weight in the original (unsmoothed) input space, float32 ``[N, in_features]``.

        Excludes activation quantization; useful for weight-only comparisons and LoRA merging.
        """
        w_hat = self.dequantized_residual() + self.lora_up.float() @ self.lora_down.float().T
        return (w_hat / self.smooth_factor.float())[:, : self.in_features]

    def storage_bits_per_weight(self) -> float:
        """Bits stored per original weight, counting packed values, scales and the low-rank factors."""
        buffers = (*self.packed_buffers(), self.lora_down, self.lora_up)
        return sum(b.numel() * b.element_size() * 8 for b in buffers) / (self.in_features * self.out_features)

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs with last dim {self.in_features}, got shape {tuple(x.shape)}"
            )
        extra = self.padded_in_features - self.in_features
        return F.pad(x, (0, extra)) if extra else x

    def forward_reference(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Pure-PyTorch forward with exact quantization semantics (float32 accumulation of the 4-bit GEMM;
        the low-rank branch runs in the module dtype like the fused engine).

        ``residual``: the dequantized residual float32 ``[N, K_padded]`` if already at hand (e.g. from a
        Triton dequantization kernel); by default :meth:`dequantized_residual`.
        """
        x_smooth = self._pad_input(x) / self.smooth_factor.to(x.dtype)
        low_rank = (x_smooth.to(self.dtype) @ self.lora_down) @ self.lora_up.T
        residual = self.dequantized_residual() if residual is None else residual
        y = self.quantized_activation(x_smooth) @ residual.T + low_rank.float()
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" or (self.backend == "auto" and x.is_cuda):
            return self.kernel_forward(x)
        return self.forward_reference(x)


class SVDQuantLinear(LowRankQuantLinear):
    """Drop-in replacement for ``nn.Linear`` holding an SVDQuant-compressed weight (INT4 or NVFP4).

    Input ``x``: ``[..., in_features]`` float; output ``[..., out_features]`` in ``x.dtype``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 32,
        bias: bool = True,
        weight_format: str = "int4",
        act_format: str = "int4",
        group_size: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        if act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {act_format!r}")
        if weight_format == "nvfp4":
            group_size = qz.NVFP4_GROUP
        k = padded_features(in_features, group_size)
        super().__init__(in_features, out_features, k, rank, bias, dtype, device)
        self.group_size = group_size
        self.weight_format, self.act_format = weight_format, act_format
        scale_dtype = torch.float8_e4m3fn if weight_format == "nvfp4" else dtype
        self.register_buffer("qweight", torch.zeros(out_features, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.ones(out_features, k // group_size, dtype=scale_dtype, device=device))
        self.register_buffer("wscale_global", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("act_shift", torch.zeros(k, dtype=dtype, device=device))

    def compute_dtype_buffers(self) -> tuple[str, ...]:
        int4_scales = ("wscales",) if self.weight_format == "int4" else ()  # NVFP4 scales are fp8
        return super().compute_dtype_buffers() + ("act_shift",) + int4_scales

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"weight={self.weight_format}, act={self.act_format}, group_size={self.group_size}, "
            f"bias={self.bias is not None}"
        )

    def dequantized_residual(self) -> torch.Tensor:
        if self.weight_format == "nvfp4":
            return qz.dequantize_nvfp4(qz.unpack_nibbles(self.qweight), self.wscales, self.wscale_global)
        return qz.dequantize_groups(qz.unpack_int4(self.qweight), self.wscales)

    def quantized_activation(self, x_smooth: torch.Tensor) -> torch.Tensor:
        # the shift's effect -Q(R) @ act_shift is folded into the bias
        return qz.fake_quant(x_smooth.float() + self.act_shift.float(), self.act_format, self.group_size)

    def packed_buffers(self) -> tuple[torch.Tensor, ...]:
        return (self.qweight, self.wscales)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _svdquant_kernels(self, x)


@torch.compiler.disable
def _svdquant_kernels(module: SVDQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """:func:`quantduo.kernels.svdquant_linear_forward`, called as is by ``torch.compile`` (not traced: its kernels
    share scratch buffers and check the smoothing on the host)."""
    from quantduo.kernels import svdquant_linear_forward

    return svdquant_linear_forward(module, x)
