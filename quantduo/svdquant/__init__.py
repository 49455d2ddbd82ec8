"""SVDQuant: calibration, smoothing, low-rank refinement, the quantized layer and its save / load."""
from .api import config_for, quantize_
from .calibration import ActivationRecorder, CalibrationError
from .concat import concat_output_features
from .config import SVDQuantConfig
from .linear import SVDQuantLinear, set_execution
from .lowrank import lowrank_factors, solve_group
from .quantize import LayerReport, QuantizationReport, max_rank, quantize_model
from .serialization import CheckpointError, FusedLayersError, load_quantized, refresh_derived, save_quantized

__all__ = [
    "ActivationRecorder", "CalibrationError", "CheckpointError", "FusedLayersError", "LayerReport",
    "QuantizationReport", "SVDQuantConfig", "SVDQuantLinear", "concat_output_features", "config_for",
    "load_quantized", "lowrank_factors", "max_rank", "quantize_", "quantize_model", "refresh_derived",
    "save_quantized", "set_execution", "solve_group",
]
