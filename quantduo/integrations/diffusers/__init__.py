"""SVDQuant for diffusers: model rules, calibration capture, the quantizer backend, pipelines and fusions.

Importing this package registers ``quant_method: "quantduo"`` with diffusers (:mod:`.backend`).

* :mod:`.rules` — which layers of a denoiser stay 16-bit, become W4A16 or W4A4;
* :mod:`.calibration` — capture the denoiser's inputs inside the pipeline, quantize on them;
* :mod:`.backend` — ``QuantDuoConfig`` / ``QuantDuoQuantizer`` (``from_pretrained`` / ``save_pretrained``);
* :mod:`.pipeline` — save / load quantized denoisers and pipelines, compute dtype;
* :mod:`.fusions` — GELU and concatenation inside the fp8 activation quantization.
"""
from .backend import QuantDuoConfig, QuantDuoQuantizer, QuantizationConfigError, mark_quantized
from .calibration import CalibrationSample, capture_calibration_inputs, quantize_transformer, replay_fn
from .fusions import FusedFluxSingleBlock, FusedGeluMLP, enable_fusions
from .pipeline import (cast_denoiser, denoiser_skeleton, is_quantized_pipeline, load_into_pipeline, load_pipeline,
                       load_quantized_transformer, quantduo_config_for, read_denoiser_config, save_pipeline,
                       save_quantized_transformer)
from .rules import MODEL_RULES, ModelRules, denoiser_of, quantization_config, rules_for

__all__ = ["MODEL_RULES", "CalibrationSample", "FusedFluxSingleBlock", "FusedGeluMLP", "ModelRules", "QuantDuoConfig",
           "QuantDuoQuantizer", "QuantizationConfigError", "capture_calibration_inputs", "cast_denoiser",
           "denoiser_of", "denoiser_skeleton", "enable_fusions", "is_quantized_pipeline", "load_into_pipeline",
           "load_pipeline", "load_quantized_transformer", "mark_quantized", "quantduo_config_for",
           "quantization_config", "quantize_transformer", "read_denoiser_config", "replay_fn",
           "rules_for", "save_pipeline", "save_quantized_transformer"]
