"""``quantize_model``: SVDQuant every eligible ``nn.Linear`` of any torch model."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from quantduo.formats import quantizers as qz
from quantduo.utils import progress_bar, relative_error

from .calibration import ActivationRecorder, CalibrationError, InputStats
from .config import SVDQuantConfig, matches
from .dataflow import StreamTracker
from .linear import SVDQuantLinear, padded_features
from .lowrank import GroupSolution, solve_group
from .phases import phase
from .split import split_proj_outs

# post-GELU inputs never go below GELU's minimum (-0.17); anything at or above this is treated as shifted-unsigned
_UNSIGNED_MIN = -0.2
# Calibration calls whose data flow is tracked (the rest are only recorded): the first shows the structure, the
# second would catch a model whose first call takes another path.
TRACKED_CALLS = 2


@dataclass
class LayerReport:
    """One module's fate. ``naive_error`` / ``error``: relative output error on calibration rows of plain
    W4A4 (same formats, no smoothing, no low-rank) and of the final layer (``None`` when not quantized)."""

    name: str
    status: str  # "svdquant" | "w4a16" | "skipped"
    reason: str = ""
    shape: tuple[int, int] = (0, 0)
    group: list[str] = field(default_factory=list)
    act_format: str = ""
    smooth_ab: tuple[float, float] | None = None
    refine_iters: int = 0
    naive_error: float | None = None
    error: float | None = None


@dataclass
class QuantizationReport:
    layers: list[LayerReport]

    def quantized(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status != "skipped"]

    def skipped(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]

    def to_json(self) -> str:
        return json.dumps([asdict(r) for r in self.layers], indent=1)

    def summary(self) -> str:
        """A text table: one line per layer."""
        lines = [f"{'layer':48s} {'status':9s} {'act':5s} {'naive':>9s} {'svdquant':>9s}  note"]
        for r in self.layers:
            naive = f"{r.naive_error:9.4f}" if r.naive_error is not None else " " * 9
            err = f"{r.error:9.4f}" if r.error is not None else " " * 9
            note = r.reason or (f"a,b={r.smooth_ab} iters={r.refine_iters}" if r.smooth_ab else "")
            lines.append(f"{r.name[-48:]:48s} {r.status:9s} {r.act_format:5s} {naive} {err}  {note}")
        return "\n".join(lines)


def naive_w4a4_error(x: torch.Tensor, w: torch.Tensor, cfg: SVDQuantConfig, act_format: str) -> float:
    """Relative output error of plain round-to-nearest W4A4 (no smoothing, no low-rank) on rows ``x [T, K]``."""
    group = qz.NVFP4_GROUP if cfg.weight_format == "nvfp4" else cfg.group_size
    act_group = qz.NVFP4_GROUP if act_format == "nvfp4" else cfg.group_size
    if act_format == "uint4":  # plain W4A4 has no shift: signed activations
        act_format = "int4"
    xp, wp = qz.pad_to_multiple(x.float(), group), qz.pad_to_multiple(w.float(), group)
    y = qz.fake_quant(xp, act_format, act_group) @ qz.fake_quant(wp, cfg.weight_format, group, cfg.torch_dtype).T
    return relative_error(y, x.float() @ w.float().T)


# ---------------------------------------------------------------------------------------------
# building modules
# ---------------------------------------------------------------------------------------------
def pack_residual(module: SVDQuantLinear, residual: torch.Tensor) -> None:
    """Quantize a float residual ``[N, K_padded]`` into ``module.qweight`` / ``wscales`` / ``wscale_global``."""
    if module.weight_format == "nvfp4":
        codes, scales, global_scale = qz.quantize_nvfp4(residual)
        module.qweight.copy_(qz.pack_nibbles(codes))
        module.wscales.copy_(scales)
        module.wscale_global.copy_(global_scale)
    else:
        q, scales = qz.quantize_int4(residual, module.group_size, module.dtype)
        module.qweight.copy_(qz.pack_int4(q))
        module.wscales.copy_(scales)


def shifted_bias(linear: nn.Linear, module: SVDQuantLinear) -> torch.Tensor:
    """The bias ``module`` stores for ``linear``, float64 ``[N]``: deepcompressor's for a layer run on shifted inputs
    ``x + act_shift``: ``b - W @ act_shift`` with the original weight (its ``ShiftedLinear.from_linear``), plus the
    low-rank branch's share ``proj_up @ proj_down^T @ (act_shift / smooth)`` (its Nunchaku converter), from the stored
    ``act_shift``, ``smooth_factor`` and factors; net ``b - R @ (act_shift / smooth)`` with ``R`` the unquantized
    residual. ``b`` for signed layers (zero shift)."""
    k = linear.in_features
    shift = module.act_shift[:k].double()
    lowrank = module.proj_up.double() @ (module.proj_down[:k].double().T @ (shift / module.smooth_factor[:k].double()))
    return linear.bias.double() - linear.weight.double() @ shift + lowrank


def build_module(
    linear: nn.Linear, sol: GroupSolution, rows: slice, act_format: str, cfg: SVDQuantConfig
) -> SVDQuantLinear:
    """An :class:`SVDQuantLinear` for ``linear`` from its rows ``rows`` of a group solution (and its low-rank
    branch's factors)."""
    n, k_in = linear.out_features, linear.in_features
    down, up = sol.lowrank_of(rows)
    module = SVDQuantLinear(
        k_in, n, rank=down.shape[1], bias=linear.bias is not None,
        weight_format=cfg.weight_format, act_format=act_format, group_size=cfg.group_size,
        dtype=cfg.torch_dtype, device=linear.weight.device,
    )
    with torch.no_grad():
        pack_residual(module, sol.residual[rows])
        module.smooth_factor.copy_(sol.smooth)
        module.act_shift.copy_(sol.input_shift)
        module.proj_down.copy_(down)
        module.proj_up.copy_(up)
        if linear.bias is not None:
            module.bias.copy_(shifted_bias(linear, module))
        elif bool((sol.input_shift != 0).any()):
            raise ValueError("unsigned activations need a bias to fold the shift into")
    module.refresh_derived()
    return module


# ---------------------------------------------------------------------------------------------
# quantize_model
# ---------------------------------------------------------------------------------------------
def _unsupported_reason(module: nn.Module) -> str | None:
    """Leaf modules holding a matrix weight that SVDQuant does not handle."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, nn.Linear):
        return f"unsupported module type {type(module).__name__} (kept in full precision)"
    return None


def _select_layers(model: nn.Module, cfg: SVDQuantConfig) -> tuple[dict[str, nn.Linear], list[LayerReport]]:
    candidates, skipped = {}, []
    for name, module in model.named_modules():
        if isinstance(module, SVDQuantLinear):
            skipped.append(LayerReport(name, "skipped", "already quantized"))
        elif isinstance(module, nn.Linear):
            shape = (module.out_features, module.in_features)
            if matches(name, cfg.skip):
                skipped.append(LayerReport(name, "skipped", "matches a skip rule", shape))
            elif module.weight.numel() == 0:
                skipped.append(LayerReport(name, "skipped", "zero-size layer", shape))
            elif not torch.isfinite(module.weight).all():
                raise ValueError(f"layer {name!r} has NaN/inf weights")
            else:
                candidates[name] = module
        elif (reason := _unsupported_reason(module)) and not any(True for _ in module.children()):
            skipped.append(LayerReport(name, "skipped", reason))
    return candidates, skipped


def max_rank(model: nn.Module, cfg: SVDQuantConfig) -> int:
    """The largest ``rank`` :func:`quantize_model` accepts for ``model`` under ``cfg``'s skip / weight-only rules:
    the smallest dimension of a layer that gets a low-rank branch (0 when none would). Reads only the layers' shapes,
    so a skeleton on the meta device does."""
    sizes = [min(m.out_features, m.in_features) for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, SVDQuantLinear) and m.weight.numel() > 0
             and not matches(name, cfg.skip)
             and (cfg.w4a16_svdquant or (cfg.act_format != "none" and not matches(name, cfg.weight_only)))]
    return min(sizes, default=0)


def _act_format_for(name: str, stats: InputStats, cfg: SVDQuantConfig, conditioning: set[str]) -> str:
    if cfg.act_format == "none" or matches(name, cfg.weight_only) or name in conditioning:
        return "none"
    if cfg.act_format == "int4":
        auto = "auto" in cfg.unsigned_act
        lo, hi = float(stats.minimum.min()), float(stats.absmax.max())
        if matches(name, cfg.unsigned_act) or (auto and lo >= _UNSIGNED_MIN and hi > 4 * abs(lo)):
            return "uint4"
    return cfg.act_format


def unsigned_input_shift(stats: InputStats) -> float:
    """The constant added to every input channel of an unsigned-INT4 layer before smoothing (its ``act_shift``, in
    input space): deepcompressor's :data:`~quantduo.formats.quantizers.GELU_SHIFT` (0.171875, the tanh GELU's lower
    bound), which covers any post-GELU input, not only the calibration's minimum; larger where the calibration saw
    values below it (layers :data:`_UNSIGNED_MIN` admits that are not post-GELU)."""
    return max(qz.GELU_SHIFT, -float(stats.minimum.min()))


def _split_by_format(group: list[str], formats: dict[str, str]) -> list[list[str]]:
    by_format: dict[str, list[str]] = {}
    for name in group:
        by_format.setdefault(formats[name], []).append(name)
    return list(by_format.values())


def lowrank_branches(names: list[str]) -> list[list[str]]:
    """The members of a shared-input group that share a low-rank branch: those of one parent module (q/k/v of an
    attention, as one fused projection would), in order of first appearance. Members of other modules (a FLUX
    single block's ``proj_mlp`` beside its attention's q/k/v) share the group's smoothing but get a branch each, as
    deepcompressor calibrates them (its ``splits``) and Nunchaku stores them (``qkv_proj``, ``mlp_fc1``)."""
    branches: dict[str, list[str]] = {}
    for name in names:
        branches.setdefault(name.rpartition(".")[0], []).append(name)
    return list(branches.values())


def _quantize_group(
    model: nn.Module, names: list[str], layers: dict[str, nn.Linear], stats: InputStats, act_format: str,
    cfg: SVDQuantConfig,
) -> list[LayerReport]:
    """Solve one shared-input group, swap its modules into ``model`` and report per member."""
    branches = lowrank_branches(names)
    names = [n for branch in branches for n in branch]  # each branch's rows contiguous
    members = [layers[n] for n in names]
    device = members[0].weight.device
    group = qz.NVFP4_GROUP if cfg.weight_format == "nvfp4" else cfg.group_size
    k_pad = padded_features(members[0].in_features, group)
    w = qz.pad_to_multiple(torch.cat([m.weight.detach().float() for m in members]), k_pad)
    rows = stats.rows[: cfg.search_tokens].to(device)
    weight_only = act_format == "none"
    if act_format == "uint4" and any(m.bias is None for m in members):
        act_format = "int4"  # nowhere to fold the shift
    shift = unsigned_input_shift(stats) if act_format == "uint4" else 0.0
    sol = solve_group(
        w, qz.pad_to_multiple(rows, k_pad), stats.shifted_absmax(shift).to(device), cfg,
        act_format=act_format, rank=0 if weight_only and not cfg.w4a16_svdquant else cfg.rank,
        smooth=cfg.smooth and (not weight_only or cfg.w4a16_svdquant),
        input_shift=torch.full((k_pad,), shift, device=device) if act_format == "uint4" else None,
        branches=[sum(layers[n].out_features for n in branch) for branch in branches],
    )
    with phase("pack"):
        return _build_members(model, names, members, sol, rows, act_format, weight_only, cfg)


def _build_members(model: nn.Module, names: list[str], members: list[nn.Linear], sol: GroupSolution,
                   rows: torch.Tensor, act_format: str, weight_only: bool, cfg: SVDQuantConfig) -> list[LayerReport]:
    """Build each member's :class:`SVDQuantLinear` from its rows of ``sol``, swap it into ``model``, report it."""
    reports, start = [], 0
    for name, linear in zip(names, members):
        sl = slice(start, start + linear.out_features)
        start += linear.out_features
        module = build_module(linear, sol, sl, act_format, cfg)
        reports.append(LayerReport(
            name, "w4a16" if weight_only else "svdquant", shape=(linear.out_features, linear.in_features),
            group=list(names), act_format=act_format, smooth_ab=None if weight_only else sol.smooth_ab,
            refine_iters=sol.refine_iters, naive_error=naive_w4a4_error(rows, linear.weight, cfg, act_format),
            error=layer_error(module, linear, rows),
        ))
        model.set_submodule(name, module)
    return reports


def layer_error(module: SVDQuantLinear, linear: nn.Linear, x: torch.Tensor) -> float:
    """Relative output error (bias excluded) of ``module``'s reference forward vs ``linear`` on rows ``x [T, K]``."""
    bias = linear.bias.float() if linear.bias is not None else 0.0
    y_q = module.forward_reference(x.to(module.dtype)).float() - bias
    return relative_error(y_q, x.float() @ linear.weight.float().T)


def _calibrate(model: nn.Module, calib_fn: Callable[[nn.Module], None], recorder: ActivationRecorder,
               layers: dict[str, nn.Linear], cfg: SVDQuantConfig) -> set[str]:
    """Run ``calib_fn(model)`` under ``recorder``; with ``"auto"`` in ``cfg.weight_only`` also track the token streams
    (:mod:`.dataflow`) over the first :data:`TRACKED_CALLS` calls of ``model`` and return the linears that read
    conditioning only (else the empty set).

    Raises:
        CalibrationError: a linear read a token stream in some calls and conditioning only in others.
    """
    if "auto" not in cfg.weight_only:
        with phase("capture"), recorder, torch.no_grad():
            calib_fn(model)
        return set()
    tracker = StreamTracker(model, layers, max_calls=TRACKED_CALLS)
    with phase("capture"), recorder, tracker, torch.no_grad():
        calib_fn(model)
    ambiguous = [n for n in tracker.ambiguous() if not matches(n, cfg.weight_only)]
    if ambiguous:
        raise CalibrationError(f"layer {ambiguous[0]!r} read a token stream in some calls and only per-sample "
                               "conditioning in others: name it in skip or weight_only")
    return tracker.conditioning_only()


def quantize_model(
    model: nn.Module,
    calib_fn: Callable[[nn.Module], None],
    config: SVDQuantConfig | None = None,
    *,
    progress: bool = True,
) -> QuantizationReport:
    """Replace every eligible ``nn.Linear`` of ``model`` (in place) by an :class:`SVDQuantLinear` (the
    single-stream blocks' ``proj_out`` first split in two, ``config.split_proj_out``).

    Args:
        calib_fn: runs the calibration forward passes, ``calib_fn(model)``; called once under ``no_grad``.
        config: formats, rank, skip rules (default :class:`SVDQuantConfig`).
    Returns:
        A :class:`QuantizationReport` with one entry per linear / unsupported module.
    Raises:
        CalibrationError: NaN/inf calibration activations.
    """
    cfg = config or SVDQuantConfig()
    if cfg.split_proj_out and cfg.act_format != "none":
        split_proj_outs(model, keep=lambda name: matches(name, cfg.skip) or matches(name, cfg.weight_only))
    layers, reports = _select_layers(model, cfg)
    recorder = ActivationRecorder(layers, max_rows=cfg.search_tokens, seed=cfg.seed)
    conditioning = _calibrate(model, calib_fn, recorder, layers, cfg)
    for name in [n for n in layers if n not in recorder.stats]:
        reports.append(LayerReport(name, "skipped", "never called during calibration"))
        del layers[name]
    if not layers and not reports:
        raise CalibrationError("the model has no nn.Linear layers to quantize")
    names = list(layers)
    groups = recorder.shared_input_groups(names) if cfg.share_inputs else [[n] for n in names]
    formats = {n: _act_format_for(n, recorder.stats[n], cfg, conditioning) for n in names}
    work = [g for group in groups for g in _split_by_format(group, formats)]
    with torch.no_grad():
        for group in progress_bar(work, desc="SVDQuant", unit="group", progress=progress):
            reports += _quantize_group(model, group, layers, recorder.stats[group[0]], formats[group[0]], cfg)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    reports.sort(key=lambda r: order.get(r.name, len(order)))
    return QuantizationReport(reports)
