"""Published SVDQuant checkpoints (Nunchaku single file, Nunchaku V2 names, diffusers ``nunchaku_lite`` folders):
read, map onto diffusers models with Nunchaku's exact semantics, and write.

* :mod:`.layouts` — the layouts, their module names and roles, detection;
* :mod:`.reader` — files / folders into a :class:`PublishedCheckpoint`;
* :mod:`.build` — stored modules into :class:`~quantduo.svdquant.SVDQuantLinear` layers;
* :mod:`.loader` — one call to a diffusers transformer / pipeline (:func:`load_published_transformer`);
* :mod:`.export` — a quantduo-quantized FLUX model written in the Nunchaku / nunchaku_lite layouts.
"""
from .build import awq_to_signed, group_keys, modulation_bias_offset, modulation_order
from .export import CALIBRATION_FOR_LAYOUT, EXPORT_LAYOUTS, export_checkpoint
from .layouts import GELU_SHIFT, LAYOUTS, Role, detect_file_layout
from .loader import FLUX_CLASS, LoadReport, is_published, load_published_pipeline, load_published_transformer
from .reader import PublishedCheckpoint, read_checkpoint

__all__ = ["CALIBRATION_FOR_LAYOUT", "EXPORT_LAYOUTS", "FLUX_CLASS", "GELU_SHIFT", "LAYOUTS", "LoadReport", "PublishedCheckpoint", "Role", "awq_to_signed", "detect_file_layout",
           "export_checkpoint", "group_keys", "is_published", "load_published_pipeline", "load_published_transformer",
           "modulation_bias_offset", "modulation_order", "read_checkpoint"]
