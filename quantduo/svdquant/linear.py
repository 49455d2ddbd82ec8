"""``SVDQuantLinear``: a 4-bit linear layer with a 16-bit low-rank branch, run by a chosen execution.

Stored arithmetic: ``y = Q_a((x + act_shift) / smooth_factor) @ Q_w(R)^T + (x / smooth_factor) @ proj_down @
proj_up^T + bias`` (the shift is added before the smoothing division, each step rounded to x's dtype, as Nunchaku
computes it) where ``R = W * smooth_factor - proj_up @ proj_down^T`` is the quantized residual (the SVD branch; user
LoRAs are appended to it as extra ranks, :mod:`quantduo.integrations.lora`). With ``act_format="none"`` it is a
weight-only (W4A16) layer; ``act_format="nvfp4_nunchaku"`` quantizes activations as Nunchaku's NVFP4 kernels do
(FP8 scales per 16, no tensor scale: :func:`quantduo.formats.quantizers.quantize_nvfp4_nunchaku`). Persistent
buffers (``N = out_features``, ``K = padded in_features``, ``G = group_size``, ``r = rank``):

* ``qweight``       uint8 ``[N, K // 2]``           packed residual (layout in :mod:`quantduo.formats.quantizers`)
* ``wscales``       ``[N, K // G]`` (module dtype)  INT4 group scales, or float8_e4m3fn ``[N, K // 16]`` for NVFP4
* ``wscale_global`` float32 ``[]``                  NVFP4 per-tensor scale (1.0 for INT4)
* ``wscale_channel`` float32 ``[N]``                NVFP4 per-output-channel scale (1.0 unless loaded from a Nunchaku
  file, whose ``wcscales`` it holds); absent for INT4
* ``smooth_factor`` ``[K]`` (module dtype)           inputs are divided by it
* ``act_shift``     ``[K]`` (module dtype)           added to the inputs (input space, before the division by
  ``smooth_factor``) of unsigned activation quantization (zeros otherwise; post-GELU layers: 0.171875); its effect
  is subtracted from ``bias``: ``R @ (act_shift / smooth_factor)`` with the unquantized residual where quantduo
  calibrated the layer (deepcompressor's bias), Nunchaku's as stored in its files; the a16 execution adds back
  ``Q_w(R) @ (act_shift / smooth_factor)`` (``bias_a16``). Checkpoints of format_version 2
  (quantduo < 0.3.0) held the smoothed-space shift ``act_shift / smooth_factor``: their loaders convert it
  (:func:`quantduo.svdquant.serialization.convert_smoothed_act_shift`)
* ``proj_down``     ``[K, r]``, ``proj_up`` ``[N, r]`` (module dtype)  the low-rank branch
* ``bias``          ``[N]`` (module dtype) or absent

How it runs is ``execution`` (:mod:`quantduo.formats.registry`; dispatch in :mod:`quantduo.engine.linear`), which
changes no stored tensor. Derived, non-persistent buffers kept current from the stored ones: ``bias_a16`` (the bias
for 16-bit / fp8 activations, the shift's term unfolded), ``fp8_wscale`` / ``fp8_inv_wscale`` float32 ``[N]`` (the
per-channel fp8 scale of the reconstructed weight), ``fp8_inv_smooth`` float32 ``[K]`` and, for bf16 INT4 layers
with groups of 64 while ``QUANTDUO_CUTLASS_LIB`` names the CUTLASS library, ``library_scales`` (the group scales
transposed, bf16 ``[K / 64, N]``: :mod:`quantduo.kernels.w4a16_cutlass`).

``fused_parts``: None, or for a layer made by :func:`quantduo.svdquant.concat.concat_output_features` (a runtime
fusion of layers the model keeps, such as a fused QKV projection) the ``out_features`` of those layers; such a
layer is never saved.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from quantduo.engine import linear as engine
from quantduo.formats import quantizers as qz
from quantduo.formats.fp8 import fp8_channel_scale
from quantduo.formats.registry import check_execution, executions_for
from quantduo.kernels import w4a16_cutlass

WEIGHT_FORMATS = ("int4", "nvfp4")
ACT_FORMATS = ("int4", "uint4", "nvfp4", "nvfp4_nunchaku", "none")
# checkpoints written before the SVD branch was renamed
_LEGACY_NAMES = {"lora_down": "proj_down", "lora_up": "proj_up"}
# Layers whose derived state was never computed since construction or the last state-dict load (a deep copy of such
# a layer is pending too, without being listed: its flag says so).
_PENDING_LAYERS: "weakref.WeakSet[SVDQuantLinear]" = weakref.WeakSet()


def _set_pending(layer: "SVDQuantLinear", pending: bool) -> None:
    layer._derived_computed = not pending
    (_PENDING_LAYERS.add if pending else _PENDING_LAYERS.discard)(layer)


@torch.compiler.disable
def _refresh_pending_layers(layer: "SVDQuantLinear") -> None:
    """Compute the derived state of ``layer`` and of every pending layer on its device, eagerly, from inside a
    traced forward: one graph break, which the compiled model keeps (hence the warning: compute it before
    compiling)."""
    device = layer.qweight.device
    pending = {layer, *(other for other in _PENDING_LAYERS if other.qweight.device == device)}
    warnings.warn(f"{len(pending)} SVDQuantLinear layers computed their derived state inside a compiled forward "
                  "(buffers filled or loaded, then compiled before any eager call): the compiled model keeps a "
                  "graph break there; call quantduo.svdquant.refresh_derived(model) before torch.compile",
                  stacklevel=2)
    for other in pending:
        other.refresh_derived()


_SOURCE_BUFFERS = ("qweight", "wscales", "wscale_global", "wscale_channel", "smooth_factor", "act_shift", "proj_down",
                   "proj_up", "bias")


def padded_features(in_features: int, group_size: int) -> int:
    """``in_features`` rounded up to a multiple of ``group_size``."""
    return in_features + (-in_features) % group_size


class SVDQuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding an SVDQuant-compressed weight (INT4 or NVFP4).

    Input ``x``: ``[..., in_features]`` float; output ``[..., out_features]`` in ``x.dtype``.
    ``execution``: ``"auto"`` (default), ``"reference"``, ``"exact"``, ``"a16"`` or ``"fp8"``
    (:mod:`quantduo.formats.registry`); ``fast_accum``: fp8 GEMMs accumulate without float32 promotion along K.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 32, bias: bool = True,
                 weight_format: str = "int4", act_format: str = "int4", group_size: int = 64,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 execution: str = "auto") -> None:
        super().__init__()
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {weight_format!r}")
        if act_format not in ACT_FORMATS:
            raise ValueError(f"act_format must be one of {ACT_FORMATS}, got {act_format!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"zero-size layer ({out_features}x{in_features}) cannot be quantized")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if weight_format == "nvfp4":
            group_size = qz.NVFP4_GROUP
        k = padded_features(in_features, group_size)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight_format, self.act_format, self.group_size = weight_format, act_format, group_size
        self.execution = check_execution(execution, weight_format, act_format)
        self.fast_accum = True
        fp = dict(dtype=dtype, device=device)
        scale_dtype = torch.float8_e4m3fn if weight_format == "nvfp4" else dtype
        self.register_buffer("qweight", torch.zeros(out_features, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.ones(out_features, k // group_size, dtype=scale_dtype, device=device))
        self.register_buffer("wscale_global", torch.ones((), dtype=torch.float32, device=device))
        self.register_buffer("wscale_channel", torch.ones(out_features, dtype=torch.float32, device=device)
                             if weight_format == "nvfp4" else None)
        self.register_buffer("smooth_factor", torch.ones(k, **fp))
        self.register_buffer("act_shift", torch.zeros(k, **fp))
        self.register_buffer("proj_down", torch.zeros(k, rank, **fp))
        self.register_buffer("proj_up", torch.zeros(out_features, rank, **fp))
        self.register_buffer("bias", torch.zeros(out_features, **fp) if bias else None)
        f32 = dict(dtype=torch.float32, device=device)
        self.register_buffer("bias_a16", torch.zeros(out_features, **fp) if bias else None, persistent=False)
        self.register_buffer("fp8_wscale", torch.ones(out_features, **f32), persistent=False)
        self.register_buffer("fp8_inv_wscale", torch.ones(out_features, **f32), persistent=False)
        self.register_buffer("fp8_inv_smooth", torch.ones(k, **f32), persistent=False)
        self.register_buffer("library_scales", None, persistent=False)  # bf16 [K / 64, N] where QUANTDUO_CUTLASS_LIB
        self.smoothing_folded_out = True
        self.fused_parts: tuple[int, ...] | None = None  # out_features of the layers this one concatenates
        self._derived_key = None  # eager staleness check: (data_ptr, version) of the stored buffers
        _set_pending(self, True)

    # ------------------------------------------------------------------------------------------
    @property
    def padded_in_features(self) -> int:
        return self.smooth_factor.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.smooth_factor.dtype

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"weight={self.weight_format}, act={self.act_format}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, execution={self.execution}")

    def set_execution(self, execution: str, fast_accum: bool | None = None) -> "SVDQuantLinear":
        """Run this layer by ``execution`` from now on (``ValueError`` if its format cannot); ``fast_accum``
        (optional): fp8 GEMMs without float32 promotion. Returns self."""
        self.execution = check_execution(execution, self.weight_format, self.act_format)
        if fast_accum is not None:
            self.fast_accum = fast_accum
        self.refresh_derived()
        return self

    # ------------------------------------------------------------------------------------------
    # derived state
    def _source_key(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in (getattr(self, n) for n in _SOURCE_BUFFERS) if t is not None)

    def refresh_derived(self) -> None:
        """Recompute the derived buffers (``bias_a16``, fp8 scales, ``smoothing_folded_out``) from the stored ones.
        Runs by itself when the stored buffers changed since the last time (checked on eager calls); call it
        before capturing a CUDA graph or compiling if the buffers were edited in place since the last call."""
        self.rank = self.proj_down.shape[1]
        if self.qweight.is_meta:
            return
        with torch.no_grad():
            self.smoothing_folded_out = bool((self.smooth_factor == 1).all())
            if self.bias is not None:
                unfolded = self.bias.float() + engine.shift_term(self)
                self.bias_a16 = unfolded.to(self.bias.dtype)
            if self.weight_format == "int4":
                self.fp8_inv_smooth = 1.0 / self.smooth_factor.float()
                scale = fp8_channel_scale(engine.reconstructed_weight(self))
                self.fp8_wscale, self.fp8_inv_wscale = scale, 1.0 / scale
                if self.group_size == w4a16_cutlass.GROUP and self.dtype == torch.bfloat16 and w4a16_cutlass.enabled():
                    self.library_scales = w4a16_cutlass.transposed_scales(self.wscales)
        self._derived_key = self._source_key()
        if not self._derived_computed:
            _set_pending(self, False)

    def low_rank_updated(self) -> None:
        """Called after ``proj_down`` / ``proj_up`` are replaced (LoRA attachment)."""
        self.refresh_derived()

    def _ensure_derived(self) -> None:
        """Refresh the derived state if the stored buffers changed (eager calls). While ``torch.compile`` traces,
        only a boolean is read (the same value in every computed layer: no per-layer recompilation): a layer whose
        derived state was never computed (buffers filled in place after construction or loaded, then compiled
        before any eager call) computes it outside the graph, with every other pending layer on its device. During
        CUDA-graph capture nothing runs (the warm-up calls did)."""
        if torch.compiler.is_compiling():
            if not self._derived_computed:
                _refresh_pending_layers(self)
            return
        if self.qweight.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        if self._derived_key != self._source_key():
            self.refresh_derived()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for old, new in _LEGACY_NAMES.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        if self.wscale_channel is not None and prefix + "qweight" in state_dict \
                and prefix + "wscale_channel" not in state_dict:  # an NVFP4 layer saved before channel scales
            state_dict[prefix + "wscale_channel"] = torch.ones_like(self.wscale_channel)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._derived_key = None
        _set_pending(self, True)

    # ------------------------------------------------------------------------------------------
    def compute_dtype_buffers(self) -> tuple[str, ...]:
        """Names of the buffers held in the compute dtype (:attr:`dtype`)."""
        int4_scales = ("wscales",) if self.weight_format == "int4" else ()  # NVFP4 scales are fp8
        return ("smooth_factor", "act_shift", "proj_down", "proj_up", "bias", "bias_a16") + int4_scales

    def to_compute_dtype(self, dtype: torch.dtype) -> "SVDQuantLinear":
        """Cast the compute-dtype buffers (:meth:`compute_dtype_buffers`) to ``dtype`` in place; packed codes and
        their own-format scales (uint8, fp8, float32) keep theirs. Returns self."""
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"compute dtype must be float16, bfloat16 or float32, got {dtype}")
        for name in self.compute_dtype_buffers():
            if self._buffers.get(name) is not None:
                self._buffers[name] = self._buffers[name].to(dtype)
        self.refresh_derived()
        return self

    def dequantized_residual(self) -> torch.Tensor:
        """The 4-bit residual as float32 ``[N, K_padded]`` (smoothed space)."""
        return engine.dequantized_residual(self)

    def dequantized_weight(self) -> torch.Tensor:
        """Effective weight in the original (unsmoothed) input space, float32 ``[N, in_features]`` (no activation
        quantization)."""
        return engine.reconstructed_weight(self)[:, : self.in_features]

    def storage_bits_per_weight(self) -> float:
        """Bits stored per original weight, counting packed values, scales and the low-rank factors."""
        buffers = (self.qweight, self.wscales, self.proj_down, self.proj_up)
        return sum(b.numel() * b.element_size() * 8 for b in buffers) / (self.in_features * self.out_features)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The stored format's arithmetic in PyTorch (the ground truth of every kernel)."""
        return engine.reference_forward(self, x)

    def forward(self, x: torch.Tensor | engine.Fp8Rows) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]``; in fp8 execution also
        :class:`~quantduo.engine.linear.Fp8Rows` of x (x quantized per token ahead of the layer,
        :func:`~quantduo.engine.linear.takes_fp8_rows`)."""
        self._ensure_derived()
        return engine.linear_forward(self, x)

    def forward_gelu(self, gelu_input: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``self(torch.cat([prefix, F.gelu(gelu_input, approximate="tanh")], dim=-1))`` (prefix optional); in fp8
        execution the GELU and the concatenation happen inside the activation quantization."""
        self._ensure_derived()
        return engine.gelu_linear_forward(self, gelu_input, prefix)


def set_execution(model: nn.Module, execution: str, fast_accum: bool | None = None,
                  filter_fn=None) -> int:
    """Set the execution of every :class:`SVDQuantLinear` of ``model`` (those with ``filter_fn(module, name)``
    if given) that can run it; ``ValueError`` if none can. Returns the number of layers set."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, SVDQuantLinear)
              and (filter_fn is None or filter_fn(m, n))]
    able = [m for _, m in layers if execution in executions_for(m.weight_format, m.act_format)]
    if not layers and execution != "auto":
        raise ValueError(f"the model has no quantized layers to run by execution {execution!r}")
    if layers and not able:
        formats = sorted({f"{m.weight_format}/{m.act_format}" for _, m in layers})
        raise ValueError(f"no quantized layer can run execution {execution!r} (formats: {', '.join(formats)})")
    for module in able:
        module.set_execution(execution, fast_accum)
    return len(able)
