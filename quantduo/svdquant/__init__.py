"""SVDQuant: 4-bit weights and activations with a 16-bit low-rank branch (pure-PyTorch reference path)."""
from .calibration import ActivationRecorder, CalibrationError
from .config import SVDQuantConfig
from .linear import LowRankQuantLinear, SVDQuantLinear
from .lowrank import lowrank_factors, solve_group
from .quantize import LayerReport, QuantizationReport, quantize_model
from .serialization import CheckpointError, load_quantized, save_quantized

__all__ = [
    "ActivationRecorder", "CalibrationError", "CheckpointError", "LayerReport", "LowRankQuantLinear", "QuantizationReport",
    "SVDQuantConfig", "SVDQuantLinear", "load_quantized", "lowrank_factors", "quantize_model",
    "save_quantized", "solve_group",
]
