"""DuoAttention head patterns: load/save in the reference format, validate, binarize.

On disk (reference mit-han-lab/duo-attention format), a pattern directory holds
``full_attention_heads.tsv`` (one row per layer, one tab-separated gate per KV head; the gate
is continuous; the reference saves its gates as trained after the last optimizer step, so published files hold
values slightly outside [0, 1], e.g. -0.0014, which loading clips to [0, 1] as the reference's
``load_attn_pattern`` does; lines starting with ``#`` are comments, as for its ``np.loadtxt``) and ``config.json``
(training arguments; we use ``sink_size`` and ``recent_size``, whole numbers, and keep every other key as-is; a
missing one raises :class:`PatternKeyError`, a KeyError as the reference's). quantduo writes
the folder atomically with a ``quantduo_manifest.json`` (SHA-256 of both files, how it was made),
checked on load where present (the reference's folders have none).
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantduo.duo.layout import duo_layers
from quantduo.utils import atomic_folder, verify_manifest, write_manifest

TSV_NAME = "full_attention_heads.tsv"
CONFIG_NAME = "config.json"


class PatternKeyError(KeyError, ValueError):
    """A pattern's config.json lacks ``sink_size`` / ``recent_size``: a KeyError, as the reference's
    ``config["sink_size"]`` raises, and a ValueError (a malformed pattern file), with a readable message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class DuoPattern:
    """Gates [num_layers, num_kv_heads] float64 (1 = retrieval / full attention head): in [0, 1] once loaded
    (:func:`load_pattern` clips), possibly slightly outside as trained (:func:`~quantduo.duo.identify.identify`
    keeps the last step's values, as the reference saves them; :func:`binarize` clips first)."""

    gates: np.ndarray
    sink_size: int = 128
    recent_size: int = 256
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        g = np.asarray(self.gates, dtype=np.float64)
        if g.ndim != 2 or g.size == 0:
            raise ValueError(f"gates must be a non-empty 2-D [layers, kv_heads] array, got shape {g.shape}")
        if not np.isfinite(g).all():
            raise ValueError("gates contain NaN or infinite values")
        if self.sink_size < 0 or self.recent_size < 1:
            raise ValueError(f"need sink_size >= 0 and recent_size >= 1, got {self.sink_size}, {self.recent_size}")
        self.gates = g

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.gates.shape)

    def binarize(self, sparsity: float, seed: int = 42) -> np.ndarray:
        """Boolean [layers, kv_heads] retrieval mask: the heads under the global ``sparsity`` quantile of the
        gates become streaming heads (False); see :func:`binarize`."""
        return binarize(self.gates, sparsity, seed)

    def validate_for(self, config) -> None:
        """Raise ValueError unless the gate shape matches a transformers config's DuoAttention layers
        (:func:`~quantduo.duo.layout.duo_layers`: the global layers of a model mixing sliding-window layers) x KV
        heads."""
        expected = (len(duo_layers(config)), getattr(config, "num_key_value_heads", None)
                    or config.num_attention_heads)
        if self.shape != expected:
            raise ValueError(f"pattern has shape {self.shape} (layers, kv_heads) but the model has {expected}")


def binarize(gates: np.ndarray, sparsity: float, seed: int = 42) -> np.ndarray:
    """[L, H] gates -> [L, H] bool retrieval mask by the reference's rule (one quantile over all heads).

    The gates are clipped to [0, 1] first (the reference binarizes the gates its loader clipped), then U(0, 1e-6)
    noise from ``np.random.RandomState(seed)`` (the reference seeds NumPy's global state, default 42) is added,
    the threshold is ``np.quantile(noisy, sparsity)`` and heads with noisy gate >= threshold are retrieval heads;
    sparsity 0 keeps every head, 1 none. Heads tied at the cut are thus chosen at random (seeded), not by
    position.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    g = np.clip(np.asarray(gates, dtype=np.float64), 0.0, 1.0)
    if sparsity <= 0:
        return np.ones(g.shape, dtype=bool)
    if sparsity >= 1:
        return np.zeros(g.shape, dtype=bool)
    noisy = g + np.random.RandomState(seed).uniform(0, 1e-6, g.shape)
    return noisy >= np.quantile(noisy, sparsity)


def load_pattern(path: str | Path) -> DuoPattern:
    """Load a pattern directory (or the path of its .tsv); its config.json (sink_size, recent_size) is required,
    as in the reference: a missing one raises FileNotFoundError, missing keys :class:`PatternKeyError`,
    unparsable files, non-integer sizes or non-finite gates ValueError naming the file. Gates are read as the
    reference's ``load_attn_pattern`` reads them (``np.loadtxt``, tab-separated, ``#`` comments skipped, float64)
    and clipped to [0, 1]. A folder quantduo wrote is then checked against its manifest."""
    path = Path(path)
    tsv = path / TSV_NAME if path.is_dir() else path
    if not tsv.exists():
        raise FileNotFoundError(f"no {TSV_NAME} at {path}")
    cfg_path = tsv.parent / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"pattern {tsv.parent} has no {CONFIG_NAME} (it gives sink_size and recent_size)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{cfg_path} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict) or not {"sink_size", "recent_size"} <= cfg.keys():
        raise PatternKeyError(f"{cfg_path} lacks sink_size / recent_size")
    gates = _read_gates(tsv)
    try:
        sizes = [_window_size(cfg[k], k) for k in ("sink_size", "recent_size")]
        pattern = DuoPattern(np.clip(gates, 0.0, 1.0), *sizes, cfg)
    except ValueError as err:
        raise ValueError(f"{tsv}: {err}") from None
    verify_manifest(tsv.parent, required=False)
    return pattern


def _read_gates(tsv: Path) -> np.ndarray:
    """Gates float64 [layers, heads] of a TSV as the reference reads it (``np.loadtxt(delimiter="\\t")``: ``#``
    comments and blank lines skipped; one row or one column stays 2-D); ValueError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file: DuoPattern names the problem
            return np.loadtxt(tsv, dtype=np.float64, delimiter="\t", ndmin=2)
    except UnicodeDecodeError:
        raise ValueError(f"{tsv} is not a text file") from None
    except ValueError as err:
        raise ValueError(f"{tsv}: unreadable gates (non-numeric value or rows with different numbers of heads: "
                         f"{err})") from None


def _window_size(value, key: str) -> int:
    """A config.json window size as an int: a whole number (64 or 64.0); ValueError otherwise (the reference
    would slice its cache with it, which needs an integer)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ValueError(f"{key} must be a whole number of tokens, got {value!r}")
    return int(value)


def save_pattern(pattern: DuoPattern, out_dir: str | Path, made_by: dict | None = None) -> Path:
    """Write ``full_attention_heads.tsv``, ``config.json`` and the manifest (``made_by``: e.g. the command line)
    atomically as a folder: an old pattern at ``out_dir`` stays intact until the new one is complete."""
    tsv = "\n".join("\t".join(f"{x:.18e}" for x in row) for row in pattern.gates) + "\n"
    cfg = {**pattern.extra, "sink_size": pattern.sink_size, "recent_size": pattern.recent_size}
    with atomic_folder(out_dir) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=1))
        (tmp / TSV_NAME).write_text(tsv)
        write_manifest(tmp, {"kind": "duo pattern", "shape": list(pattern.shape), **(made_by or {})})
    return Path(out_dir)
