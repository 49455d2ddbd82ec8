"""Triton (and two Gluon) kernels on plain tensors, one job each, with a pure-PyTorch reference beside each in
:mod:`quantduo.formats.reference` / :mod:`quantduo.formats.fp8`. Which kernel runs a layer is the engine's choice
(:mod:`quantduo.engine.linear`).

* :func:`act_quant` — one pass over the activations: smoothing, 4-bit quantization (INT4 / shifted UINT4) and the
  low-rank down-projection;
* :func:`w4_skinny_gemm` — up to 64 tokens: INT4 weights as the wide tensor-core operand, 16-bit or 4-bit
  activations, split-K, low-rank + bias epilogue;
* :func:`w4a16_mma_gemm` — up to 64 tokens of 16-bit activations: the INT4 weights decoded straight into
  ``mma.sync`` operand registers (Gluon), split-K, low-rank + bias epilogue;
* :func:`w4_gemv` — one token of 16-bit activations times INT4 weights (CUDA cores);
* :func:`dequant_w4` — the whole weight of an INT4 layer (residual, low-rank branch, smoothing) reconstructed into a
  16-bit or fp8 buffer;
* :func:`quantize_fp8_per_token`, :func:`expand_w4_fp8`, :func:`fp8_rowwise_gemm` — the fp8 execution (the
  expansion on CUDA: :func:`expand_w4_fp8_mma`, the weights decoded straight into ``mma.sync`` accumulator registers
  in Gluon, where it serves the operands);
* :func:`nvfp4_dequant` — NVFP4 weights to float32;
* :func:`rms_norm`, :func:`decode_attention`, the KV-cache writers — DuoAttention's decoding.
"""
from .act_quant import act_quant
from .dequant_w4 import dequant_w4
from .expand_w4_mma import expand_w4_fp8_mma
from .fp8_linear import expand_w4_fp8, fp8_rowwise_gemm, quantize_fp8_per_token
from .gemm_w4_mma import w4a16_mma_gemm
from .gemm_w4_skinny import w4_skinny_gemm
from .gemv_w4 import w4_gemv
from .nvfp4 import nvfp4_dequant

__all__ = ["act_quant", "dequant_w4", "expand_w4_fp8", "expand_w4_fp8_mma", "fp8_rowwise_gemm", "nvfp4_dequant",
           "quantize_fp8_per_token", "w4_gemv", "w4_skinny_gemm", "w4a16_mma_gemm"]
