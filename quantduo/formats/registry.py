"""The one registry of storage formats and executions.

A **storage format** says how a quantized linear layer is stored (what is packed, with which scales, whether it
has SVDQuant's smoothing and low-rank branch) and what its activations mean; an **execution** says how a stored
layer is run. They are independent choices: the same stored INT4 weights run as W4A4 (``exact``), with 16-bit
activations (``a16``) or with fp8 activations (``fp8``). The config, the CLI, the integrations and the loaders all
read this table.

Executions:

* ``"auto"`` — the measured fastest exact-enough execution for the device and token count, chosen per call by
  :func:`quantduo.engine.linear.resolve_execution` (CPU: ``reference``; CUDA with fp8 tensor cores and INT4
  weights: ``fp8``, whose few-token calls run the ``a16`` kernels; other CUDA: ``exact``);
* ``"reference"`` — pure PyTorch, the stored format's own arithmetic (the ground truth of the kernels);
* ``"exact"`` — the stored format's own arithmetic through the Triton kernels;
* ``"a16"`` — the stored weights with 16-bit activations (no activation quantizer; NVFP4 weights dequantized);
* ``"fp8"`` — INT4 weights with per-token FP8 E4M3 activations: the whole layer weight (residual, low-rank
  branch and smoothing) expanded into fp8 per call for one fp8 GEMM; few tokens run ``a16``.
"""
from __future__ import annotations

from dataclasses import dataclass

EXECUTIONS = ("auto", "reference", "exact", "a16", "fp8")
INT4_EXECUTIONS = EXECUTIONS
NVFP4_EXECUTIONS = ("auto", "reference", "exact", "a16")
# per-layer activation variants -> the format family they belong to
_ACT_FAMILIES = {"uint4": "int4", "nvfp4_nunchaku": "nvfp4"}


def act_family(act_format: str) -> str:
    """The format family of a layer's activation format: ``"uint4"`` (shifted post-GELU layers of a W4A4 model)
    belongs to ``"int4"``, ``"nvfp4_nunchaku"`` (Nunchaku's NVFP4 activations: FP8 scales per 16, no tensor scale;
    layers loaded from published NVFP4 checkpoints) to ``"nvfp4"``; the others are their own family."""
    return _ACT_FAMILIES.get(act_format, act_format)


@dataclass(frozen=True)
class StorageFormat:
    """A storage format of quantized linear layers.

    Attributes:
        name: the name used by the config, the CLI and saved checkpoints.
        weight_format: packing of the residual weight: ``"int4"`` (signed INT4, nibble-packed, one scale per
            ``group_size`` inputs) or ``"nvfp4"`` (E2M1 codes, an FP8 scale per 16 inputs, a per-tensor and a
            per-output-channel float32 scale; the channel scales are 1 unless loaded from a Nunchaku file).
        act_format: activations as stored semantics: ``"int4"`` (per-token groups of 64; post-GELU inputs shifted
            UINT4), ``"nvfp4"`` (layers loaded from Nunchaku files: its variant without a tensor scale, see
            :func:`act_family`) or ``"none"`` (16-bit).
        group_size: inputs per weight scale.
        low_rank: SVDQuant's smoothing and 16-bit low-rank branch are part of the format.
        executions: the executions that can run it.
        description: one line for help texts.
    """

    name: str
    weight_format: str
    act_format: str
    group_size: int
    low_rank: bool
    executions: tuple[str, ...]
    description: str

    def config_fields(self) -> dict:
        """The ``SVDQuantConfig`` fields that select this format."""
        return dict(weight_format=self.weight_format, act_format=self.act_format,
                    w4a16_svdquant=self.low_rank and self.act_format == "none")

    def bits_per_weight(self, in_features: int, out_features: int, rank: int, lowrank_bits: int = 16) -> float:
        """Stored bits per original weight of an ``out_features x in_features`` layer at ``rank``: 4-bit codes,
        the group scales (16-bit, or 8-bit NVFP4 scales plus a 32-bit tensor scale and 32-bit channel scales) and
        the low-rank factors."""
        scale_bits = 8 if self.weight_format == "nvfp4" else 16
        bits = 4 + scale_bits / self.group_size
        if self.weight_format == "nvfp4":
            bits += 32 * (1 + out_features) / (in_features * out_features)
        if self.low_rank:
            bits += lowrank_bits * rank * (in_features + out_features) / (in_features * out_features)
        return bits


_REGISTRY: dict[str, StorageFormat] = {}


def register_format(fmt: StorageFormat) -> StorageFormat:
    """Add ``fmt`` to the registry (``ValueError`` if the name is taken or an execution is unknown)."""
    if fmt.name in _REGISTRY:
        raise ValueError(f"storage format {fmt.name!r} is already registered")
    unknown = set(fmt.executions) - set(EXECUTIONS)
    if unknown:
        raise ValueError(f"format {fmt.name!r} names unknown executions {sorted(unknown)}; known: {EXECUTIONS}")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> StorageFormat:
    """The registered format ``name``; ``ValueError`` naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown storage format {name!r}; known formats: {', '.join(format_names())}")
    return _REGISTRY[name]


def format_names() -> tuple[str, ...]:
    """Registered format names, in registration order."""
    return tuple(_REGISTRY)


def find_format(weight_format: str, act_format: str, low_rank: bool) -> StorageFormat:
    """The registered format with this residual packing, activation format and low-rank flag (``act_format``
    counts as its :func:`act_family`)."""
    family = act_family(act_format)
    for fmt in _REGISTRY.values():
        if (fmt.weight_format, fmt.act_format, fmt.low_rank) == (weight_format, family, low_rank):
            return fmt
    raise ValueError(f"no registered format stores {weight_format} weights with {act_format} activations "
                     f"{'with' if low_rank else 'without'} a low-rank branch")


def executions_for(weight_format: str, act_format: str) -> tuple[str, ...]:
    """Executions that can run a layer with this residual packing and activation format."""
    if weight_format == "nvfp4" or act_family(act_format) == "nvfp4":
        return NVFP4_EXECUTIONS
    if weight_format == "int4":
        return INT4_EXECUTIONS
    raise ValueError(f"unknown weight format {weight_format!r}")


def check_execution(execution: str, weight_format: str = "int4", act_format: str = "int4") -> str:
    """``execution`` if a layer of this format can run it; ``ValueError`` naming the valid choices otherwise."""
    valid = executions_for(weight_format, act_format)
    if execution not in valid:
        raise ValueError(f"execution {execution!r} cannot run {weight_format} weights with {act_format} activations; "
                         f"choose one of {', '.join(valid)}")
    return execution


register_format(StorageFormat("int4", "int4", "int4", 64, True, INT4_EXECUTIONS,
                              "SVDQuant W4A4: INT4 weights and activations (groups of 64), 16-bit low-rank branch"))
register_format(StorageFormat("nvfp4", "nvfp4", "nvfp4", 16, True, NVFP4_EXECUTIONS,
                              "SVDQuant NVFP4: FP4 weights and activations (FP8 scale per 16), low-rank branch"))
register_format(StorageFormat("w4a16", "int4", "none", 64, False, INT4_EXECUTIONS,
                              "INT4 weight-only (groups of 64), 16-bit activations: the weight-only baseline"))
register_format(StorageFormat("svdq-w4a16", "int4", "none", 64, True, INT4_EXECUTIONS,
                              "INT4 weights with SVDQuant's smoothing and low-rank branch, 16-bit activations"))
