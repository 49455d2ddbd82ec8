"""SVDQuant for diffusers: model rules, calibration capture, the quantizer backend, pipelines and fusions.

Importing this package registers ``quant_method: "quantduo"`` with diffusers (:mod:`.backend`).

* :mod:`.rules` — which layers of a denoiser stay 16-bit, become W4A16 or W4A4;
* :mod:`.calibration` — capture the denoiser's inputs inside the pipeline, quantize on them;
* :mod:`.backend` — ``QuantDuoConfig`` / ``QuantDuoQuantizer`` (``from_pretrained`` / ``save_pretrained``);
* :mod:`.pipeline` — save / load quantized denoisers and pipelines, compute dtype;
* :mod:`.fusions` — GELU, concatenation and the FLUX blocks' adaLN inside the fp8 activation quantization; fused QKV
  projections.
"""
from .backend import QuantDuoConfig, QuantDuoQuantizer, QuantizationConfigError, mark_quantized
from .calibration import (CalibrationSample, block_names, capture_calibration_inputs, denoiser_offloaded,
                          quantize_transformer, quantize_transformer_blockwise, replay_fn)
from .fusions import (FusedFluxDoubleBlock, FusedFluxSingleBlock, FusedGeluMLP, QKVFusion, enable_fusions, fuse_qkv,
                      fused_attentions, unfuse_qkv)
from .pipeline import (cast_denoiser, denoiser_safetensors, denoiser_skeleton, is_quantized_pipeline, lazy_denoiser,
                       load_into_pipeline, load_pipeline, load_pipeline_lazily, load_quantized_transformer,
                       quantduo_config_for, quantized_by_quantduo, read_denoiser_config, save_pipeline,
                       save_quantized_transformer)
from .rules import ModelRules, block_lists, denoiser_of, quantization_config, resolved_rules, rules_for

__all__ = ["CalibrationSample", "FusedFluxDoubleBlock", "FusedFluxSingleBlock", "FusedGeluMLP", "ModelRules",
           "QuantDuoConfig", "QuantDuoQuantizer", "QuantizationConfigError", "block_lists", "block_names",
           "capture_calibration_inputs",
           "cast_denoiser", "denoiser_of", "denoiser_offloaded", "denoiser_safetensors", "denoiser_skeleton",
           "enable_fusions", "fuse_qkv", "fused_attentions", "is_quantized_pipeline", "lazy_denoiser",
           "load_into_pipeline", "load_pipeline", "load_pipeline_lazily", "load_quantized_transformer",
           "mark_quantized", "QKVFusion", "quantduo_config_for", "quantization_config", "quantize_transformer",
           "quantized_by_quantduo", "quantize_transformer_blockwise", "read_denoiser_config", "replay_fn",
           "resolved_rules", "rules_for", "save_pipeline", "save_quantized_transformer", "unfuse_qkv"]
