"""Configuration of an SVDQuant run."""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field

import torch


@dataclass
class SVDQuantConfig:
    """What to quantize and how.

    Name patterns are ``fnmatch`` globs over module names (``"transformer_blocks.*.ff.net.2"``).

    Attributes:
        weight_format: ``"int4"`` (scale per ``group_size`` inputs) or ``"nvfp4"`` (FP8 scale per 16).
        act_format: ``"int4"`` or ``"nvfp4"`` dynamic per-token groups; ``"none"`` makes every layer W4A16.
        group_size: input channels per INT4 scale (ignored by NVFP4, which uses 16).
        rank: rank of the 16-bit low-rank branch (0 disables it).
        smooth: run the low-rank-aware smoothing search (else smoothing factors are 1).
        smooth_num_grids: the search's grid, deepcompressor's ``num_grids``: (0, 0), (a, 0) and (a, 1 - a) for
            a = i / smooth_num_grids, i = 1 .. smooth_num_grids - 1 (20: 39 pairs, a = 0.05 .. 0.95; its fast
            configuration's 10: 19 pairs).
        lowrank_iters: max iterations of the low-rank / residual refinement (early stop on no gain).
        svd: ``"randomized"`` (``torch.svd_lowrank``) or ``"exact"`` (float64 full SVD) for the final branch;
            the smoothing search always uses the randomized SVD.
        search_tokens: calibration rows per layer used by the error objectives.
        search_batch_bytes: working memory of the smoothing search: candidates are solved in batches that fit it
            (one batched randomized SVD per batch).
        skip: layers kept in full precision.
        weight_only: layers quantized W4A16 (16-bit activations; no smoothing and no low-rank unless
            ``w4a16_svdquant``); ``"auto"`` in the list adds the linears whose inputs never depend on the
            model call's token streams (:mod:`quantduo.svdquant.dataflow`: adaLN modulation, time projections).
        w4a16_svdquant: W4A16 layers (``act_format="none"`` or ``weight_only``) get SVDQuant's smoothing search
            (activation-aware: salient input channels scaled up before the weights are quantized) and its
            rank-``rank`` low-rank branch. On GPUs both fold into the reconstructed weight above 64 tokens, so
            they cost storage (0.1-0.35 bit per weight at rank 32 on FLUX shapes), not time.
        unsigned_act: layers whose inputs are post-GELU (shifted UINT4 activations); ``"auto"`` in the list
            enables detection from calibration (inputs never below ``-0.2``).
        share_inputs: layers called on the same input tensor share smoothing; those of one module (q/k/v of an
            attention) also share the low-rank branch, the others get one each (``quantize.lowrank_branches``).
        split_proj_out: W4A4 formats calibrate the ``proj_out`` of FLUX-style single-stream blocks as two layers,
            the attention half and the (post-GELU, shifted UINT4) MLP half, each with its own smoothing and
            low-rank branch, as deepcompressor does and Nunchaku stores it (:mod:`quantduo.svdquant.split`);
            False keeps one layer (what the nunchaku_lite layout holds).
        dtype: dtype of the 16-bit parts (scales, smoothing, low-rank, bias).
        seed: seed of the randomized SVD and of calibration-row sampling.
    """

    weight_format: str = "int4"
    act_format: str = "int4"
    group_size: int = 64
    rank: int = 32
    smooth: bool = True
    smooth_num_grids: int = 20
    lowrank_iters: int = 100
    svd: str = "randomized"
    search_tokens: int = 512
    search_batch_bytes: int = 2 << 30
    skip: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    w4a16_svdquant: bool = False
    unsigned_act: list[str] = field(default_factory=lambda: ["auto"])
    share_inputs: bool = True
    split_proj_out: bool = True
    dtype: str = "bfloat16"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weight_format not in ("int4", "nvfp4"):
            raise ValueError(f"weight_format must be 'int4' or 'nvfp4', got {self.weight_format!r}")
        if self.act_format not in ("int4", "nvfp4", "none"):
            raise ValueError(f"act_format must be 'int4', 'nvfp4' or 'none', got {self.act_format!r}")
        if self.svd not in ("randomized", "exact"):
            raise ValueError(f"svd must be 'randomized' or 'exact', got {self.svd!r}")
        if self.smooth_num_grids < 1:
            raise ValueError(f"smooth_num_grids must be positive, got {self.smooth_num_grids}")
        if self.group_size <= 0 or self.rank < 0 or self.search_tokens <= 0 or self.search_batch_bytes <= 0:
            raise ValueError("group_size, search_tokens and search_batch_bytes must be positive and rank non-negative")
        getattr(torch, self.dtype)  # validates the dtype name

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SVDQuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown SVDQuantConfig keys: {sorted(unknown)}")
        return cls(**data)


def matches(name: str, patterns: list[str]) -> bool:
    """True if module ``name`` matches any glob in ``patterns``."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns if p != "auto")
