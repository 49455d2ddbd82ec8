"""The SVDQuant decomposition of one group of linears that share an input.

Given smoothed weights ``W_hat = W * smooth_scale`` (``[N, K]``), find a rank-``r`` branch
``lora_up @ lora_down^T`` and a 4-bit residual ``Q(W_hat - lora_up @ lora_down^T)`` that minimise the
output error of the *quantized* layer on calibration rows, by the low-rank-aware smoothing search and
the iterative residual refinement of the paper.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from quantduo.formats import quantizers as qz
from .config import SVDQuantConfig
from .phases import phase
from .smoothing import candidate_scales, smoothing_grid

_OVERSAMPLE = 8
_POWER_ITERS = 2


def lowrank_factors(
    w: torch.Tensor, rank: int, method: str = "randomized", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation ``w ~= up @ down.T``, of one matrix or a batch, split as deepcompressor's
    ``LowRankBranch`` splits it: the down-projection the right singular vectors (orthonormal columns; its ``lora_down``
    ``Vh[:rank]`` is ``down.T``), the up-projection the left ones times the singular values.

    Args:
        w: float ``[..., N, K]``.
        method: ``"exact"`` (float64 full SVD) or ``"randomized"`` (``torch.svd_lowrank``, seeded).
    Returns:
        up: float32 ``[..., N, rank]`` (``U S``), down: float32 ``[..., K, rank]`` (``V``).
    """
    n, k = w.shape[-2:]
    if rank == 0:
        return w.new_zeros(*w.shape[:-1], 0, dtype=torch.float32), w.new_zeros(*w.shape[:-2], k, 0, dtype=torch.float32)
    if rank > min(n, k):
        raise ValueError(f"rank {rank} exceeds min(out_features, in_features) = {min(n, k)}")
    if method == "exact" or rank + _OVERSAMPLE >= min(n, k):
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        u, s, v = u[..., :rank], s[..., :rank], vh[..., :rank, :].mT
    elif method == "randomized":
        with torch.random.fork_rng(devices=[w.device] if w.is_cuda else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w.float(), q=rank + _OVERSAMPLE, niter=_POWER_ITERS)
        u, s, v = u[..., :rank], s[..., :rank], v[..., :rank]
    else:
        raise ValueError(f"unknown SVD method {method!r}")
    return (u * s.unsqueeze(-2)).float(), v.float()


def branch_factors(
    w: torch.Tensor, branches: Sequence[int], rank: int, method: str = "randomized", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of each block of rows of ``w`` ``[..., N, K]`` (``branches``: the blocks' row counts, in
    order, summing to ``N``), as one block-diagonal branch: ``up`` float32 ``[..., N, rank * B]`` (block ``b``'s rows
    use only columns ``[b * rank, (b + 1) * rank)``), ``down`` float32 ``[..., K, rank * B]``. One block is
    :func:`lowrank_factors`."""
    if sum(branches) != w.shape[-2]:
        raise ValueError(f"branches {list(branches)} do not add up to the {w.shape[-2]} rows")
    if len(branches) == 1:
        return lowrank_factors(w, rank, method, seed)
    up = w.new_zeros(*w.shape[:-1], rank * len(branches), dtype=torch.float32)
    downs, start = [], 0
    for b, rows in enumerate(branches):
        u, d = lowrank_factors(w[..., start:start + rows, :], rank, method, seed)
        up[..., start:start + rows, b * rank:(b + 1) * rank] = u
        downs.append(d)
        start += rows
    return up, torch.cat(downs, dim=-1)


def fake_quant_act(x: torch.Tensor, smooth: torch.Tensor, act_format: str, group_size: int,
                   input_shift: torch.Tensor) -> torch.Tensor:
    """What the 4-bit GEMM sees of the shifted, smoothed inputs ``(x + input_shift) / smooth``, float32
    ``[..., T, K]``: ``Q((x + input_shift) / smooth)`` (the layer's order, in float32). ``x`` float ``[T, K]``;
    ``smooth``, ``input_shift`` float32 ``[K]`` or ``[..., 1, K]`` (a batch of candidates)."""
    return qz.fake_quant((x.float() + input_shift) / smooth, act_format, group_size)


@dataclass
class GroupSolution:
    """Result for one group of linears sharing an input (``K`` = padded input channels).

    smooth: float32 ``[K]``; input_shift: float32 ``[K]``, the shift added to the inputs before smoothing (input
    space: the layer's ``act_shift``; zeros for signed activations); lora_down: float32 ``[K, r * B]``;
    lora_up: float32 ``[N_total, r * B]`` (block-diagonal over the ``B`` low-rank branches, :func:`branch_factors`);
    residual: float32 ``[N_total, K]`` (before quantization); branches: rows per low-rank branch;
    smooth_ab: chosen (a, b); rel_error: relative output error on the calibration rows;
    refine_iters: refinement iterations run.
    """

    smooth: torch.Tensor
    input_shift: torch.Tensor
    lora_down: torch.Tensor
    lora_up: torch.Tensor
    residual: torch.Tensor
    smooth_ab: tuple[float, float]
    rel_error: float
    refine_iters: int
    branches: tuple[int, ...]

    def lowrank_of(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down [K, r], up [len(rows), r])``: the low-rank factors of the member whose rows are ``rows`` (inside
        one branch)."""
        rank = self.lora_down.shape[1] // len(self.branches)
        ends = list(itertools.accumulate(self.branches))
        b = next(i for i, end in enumerate(ends) if rows.start < end)
        if rows.stop > ends[b]:
            raise ValueError(f"rows {rows} straddle two low-rank branches (ends {ends})")
        cols = slice(b * rank, (b + 1) * rank)
        return self.lora_down[:, cols], self.lora_up[rows, cols]


class _Objective:
    """Relative output error ``||y_q - y||^2 / ||x W^T||^2`` on fixed calibration rows ``x [T, K]``, where the layer
    is run on the shifted inputs ``x + input_shift`` (zero for signed activations) and ``y = (x + input_shift) W^T``:
    as deepcompressor calibrates a shifted layer (its ``ShiftedLinear``, whose bias takes ``-W @ input_shift`` in full
    precision), which is the error of the stored layer whose bias holds ``b - R @ (input_shift / smooth)`` (``R`` the
    unquantized residual, :func:`quantduo.svdquant.quantize.shifted_bias`)."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, act_format: str, act_group: int,
                 input_shift: torch.Tensor | None):
        """``input_shift`` float ``[K]``: the unsigned activations' shift (used only for ``act_format="uint4"``)."""
        self.x, self.act_format, self.act_group = x.float(), act_format, act_group
        self.input_shift = input_shift.float() if act_format == "uint4" else torch.zeros(x.shape[-1], device=x.device)
        self.ref_energy = (self.x @ w.float().T).pow(2).sum().clamp(min=1e-30)
        self.y_ref = (self.x + self.input_shift) @ w.float().T

    def smoothed_inputs(self, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For smoothing factors ``[..., K]``: the shifted, smoothed rows ``(x + input_shift) / smooth``
        ``[..., T, K]`` and their quantized view (:func:`fake_quant_act`)."""
        if smooth.dim() > 1:
            smooth = smooth.unsqueeze(-2)
        x_quant = fake_quant_act(self.x, smooth, self.act_format, self.act_group, self.input_shift)
        return (self.x + self.input_shift) / smooth, x_quant

    def __call__(self, x_smooth, x_quant, residual_q, up, down) -> float:
        return float(self.errors(x_smooth, x_quant, residual_q, up, down))

    def errors(self, x_smooth, x_quant, residual_q, up, down) -> torch.Tensor:
        """Relative errors ``[...]`` of candidates batched over leading dims: ``x_* [..., T, K]``,
        ``residual_q [..., N, K]``, ``up [..., N, r]``, ``down [..., K, r]``."""
        y = x_quant @ residual_q.mT
        if up.shape[-1]:
            y = y + (x_smooth @ down) @ up.mT
        return (y - self.y_ref).pow(2).sum((-2, -1)) / self.ref_energy


def _candidates_per_batch(w_shape: torch.Size, tokens: int, cfg: SVDQuantConfig) -> int:
    """Smoothing candidates solved in one batch: as many as fit ``cfg.search_batch_bytes`` (float32 working set of
    about four ``[N, K]`` weights and four ``[T, max(N, K)]`` activations per candidate); NVFP4 (per-tensor scales)
    one at a time."""
    if cfg.weight_format == "nvfp4" or cfg.act_format == "nvfp4":
        return 1
    n, k = w_shape
    per_candidate = 4 * (4 * n * k + 4 * tokens * max(n, k))
    return max(1, cfg.search_batch_bytes // per_candidate)


def solve_group(
    w: torch.Tensor,
    x_sample: torch.Tensor,
    x_absmax: torch.Tensor,
    cfg: SVDQuantConfig,
    *,
    act_format: str,
    rank: int,
    smooth: bool,
    input_shift: torch.Tensor | None = None,
    branches: Sequence[int] | None = None,
) -> GroupSolution:
    """Run SVDQuant on the concatenated weights of one shared-input group: one smoothing for the group, one
    rank-``rank`` low-rank branch per block of rows in ``branches`` (default: one for all rows).

    Args:
        w: float ``[N_total, K]`` (rows of all members, K already padded to the group size).
        x_sample: float ``[T, K]`` calibration input rows; x_absmax: ``[K_in]`` per-channel max |x + input_shift| (the
            smoothing statistic) of the ``K_in <= K`` channels before padding (the padding's factors are 1).
        act_format: ``"int4"``, ``"uint4"`` (needs ``input_shift``), ``"nvfp4"`` or ``"none"``.
        input_shift: uint4: ``[K]`` shift added to the inputs before smoothing so that they are non-negative
            (deepcompressor's post-GELU rule: :data:`~quantduo.formats.quantizers.GELU_SHIFT` on every channel);
            the layer's ``act_shift`` (input space, :attr:`GroupSolution.input_shift`).
        branches: row counts of consecutive blocks of ``w`` that get a low-rank branch each (deepcompressor's
            ``splits``: a FLUX single block's q/k/v and its ``proj_mlp`` share the smoothing, not the branch).
    """
    w = w.float()
    branches = tuple(branches or (w.shape[0],))
    weight_group = qz.NVFP4_GROUP if cfg.weight_format == "nvfp4" else cfg.group_size
    act_group = qz.NVFP4_GROUP if act_format == "nvfp4" else cfg.group_size
    if act_format == "uint4" and input_shift is None:
        raise ValueError("unsigned activations need the input shift (input_shift)")
    obj = _Objective(x_sample, w, act_format, act_group, input_shift)

    def quant_residual(residual: torch.Tensor) -> torch.Tensor:
        return qz.fake_quant(residual, cfg.weight_format, weight_group, cfg.torch_dtype)

    def candidate_errors(s: torch.Tensor) -> torch.Tensor:
        """Errors ``[C]`` of smoothing candidates ``s [C, K]``, solved together (one batched randomized SVD)."""
        x_smooth, x_quant = obj.smoothed_inputs(s)
        w_hat = w * s.unsqueeze(-2)
        up, down = branch_factors(w_hat, branches, rank, "randomized", cfg.seed)
        return obj.errors(x_smooth, x_quant, quant_residual(w_hat - up @ down.mT), up, down)

    best_ab, best_smooth = (0.0, 0.0), torch.ones(w.shape[1], device=w.device)
    if smooth:
        with phase("search"):
            grid = smoothing_grid(cfg.smooth_num_grids)
            scales = candidate_scales(x_absmax, w, grid).to(cfg.torch_dtype).float()
            chunk = _candidates_per_batch(w.shape, x_sample.shape[0], cfg)
            errors = torch.cat([candidate_errors(c) for c in scales.split(chunk)])
            best = int(errors.argmin())
            best_ab, best_smooth = grid[best], scales[best]
    with phase("svd"):
        return _refine(w, best_smooth, best_ab, obj, quant_residual, rank, branches, cfg)


def _refine(w: torch.Tensor, best_smooth: torch.Tensor, best_ab: tuple[float, float], obj: _Objective,
            quant_residual: Callable[[torch.Tensor], torch.Tensor], rank: int, branches: tuple[int, ...],
            cfg: SVDQuantConfig) -> GroupSolution:
    """The iterative low-rank / residual refinement of ``w [N, K]`` at the chosen smoothing ``[K]``, one low-rank
    branch per block of rows in ``branches``: as deepcompressor's ``LowRankCalibrator``, a step whose error is at most
    the best so far is kept (a tie keeps the newer one), the first worse step stops the loop (up to
    ``cfg.lowrank_iters`` steps, the rejected one counted; a fixed point, where the quantized residual no longer
    changes, ends it early with the same result)."""
    x_smooth, x_quant = obj.smoothed_inputs(best_smooth)
    w_hat = w * best_smooth
    best, iters = None, 0
    residual_q = torch.zeros_like(w_hat)
    for iters in range(1, max(cfg.lowrank_iters, 1) + 1):
        up, down = branch_factors(w_hat - residual_q, branches, rank, cfg.svd, cfg.seed)
        residual = w_hat - up @ down.T
        step_q = quant_residual(residual)
        err = obj(x_smooth, x_quant, step_q, up, down)
        if best is not None and err > best[0]:
            break
        best = (err, up, down, residual)
        if rank == 0 or torch.equal(step_q, residual_q):
            break  # a fixed point: every further step would repeat this one (ties, kept), so the result is final
        residual_q = step_q
    err, up, down, residual = best
    return GroupSolution(best_smooth, obj.input_shift, down, up, residual, best_ab, err, iters, branches)
