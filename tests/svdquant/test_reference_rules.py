"""The calibration rules quantduo takes from deepcompressor, checked against those rules written out here from its
source (calib/smooth.py ``get_smooth_scale``, calib/config/smooth.py ``get_alpha_beta_pairs``, nn/patch/lowrank.py
``LowRankBranch.reset_parameters``, calib/lowrank.py ``LowRankCalibrator._tell``), not from quantduo's code."""
import pytest
import torch
from torch import nn

from quantduo.svdquant import SVDQuantConfig, solve_group
from quantduo.svdquant.lowrank import _refine, lowrank_factors
from quantduo.svdquant.quantize import build_module
from quantduo.svdquant.smoothing import candidate_scales, smooth_scale, smoothing_grid
from quantduo.utils import relative_error


def upstream_smooth_scale(x_span: torch.Tensor, w_span: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """deepcompressor's ``SmoothCalibrator._ask`` / ``get_smooth_scale``."""
    if alpha == 0 and beta == 0:
        return torch.ones_like(x_span)
    if alpha > 0:
        scale = x_span.pow(alpha)
        if beta > 0:
            scale = scale.div_(w_span.pow(beta))
    else:
        scale = w_span.pow(-beta)
    scale[scale == 0] = 1
    if scale.isnan().any() or scale.isinf().any():
        scale = scale.fill_(1)
    return scale


def upstream_grid(num_grids: int) -> list[tuple[float, float]]:
    """``get_alpha_beta_pairs`` with alpha > 0, beta = -2 (the SVDQuant configurations)."""
    choices = [i / num_grids for i in range(1, num_grids)]
    return [(0, 0)] + [(alpha, 0) for alpha in choices] + [(alpha, 1 - alpha) for alpha in choices]


def _spans(seed=0, k=256):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, generator=g) * 10 + 0.01, torch.rand(k, generator=g) * 0.1 + 1e-3


@pytest.mark.parametrize("a, b", [(0.0, 0.0), (0.5, 0.5), (0.3, 0.0), (0.8, 0.2), (0.05, 0.95)])
def test_smooth_scale_is_the_references_unnormalised_ratio(a, b):
    xs, ws = _spans()
    assert torch.equal(smooth_scale(xs, ws, a, b), upstream_smooth_scale(xs.clone(), ws, a, b))


def test_smooth_scale_replaces_zeros_by_one_and_any_inf_or_nan_by_all_ones():
    xs, ws = _spans(1)
    xs[3] = 0  # a channel never active: its factor 0 becomes 1, the others are kept
    got = smooth_scale(xs, ws, 0.5, 0.5)
    assert torch.equal(got, upstream_smooth_scale(xs.clone(), ws, 0.5, 0.5)) and float(got[3]) == 1.0
    assert float(got.std()) > 0.1
    ws[5] = 0  # an all-zero weight column: x^a / 0 = inf, so every factor is 1
    assert torch.equal(smooth_scale(xs, ws, 0.5, 0.5), torch.ones(256))
    assert torch.equal(smooth_scale(xs, ws, 0.5, 0.0), upstream_smooth_scale(xs.clone(), ws, 0.5, 0.0))


def test_padding_channels_get_one_and_leave_the_others_as_the_reference():
    """Columns padded up to the group size (zero statistic, zero weights) would be 0 / 0 = NaN, which sets the whole
    vector to 1 under the reference rule: they are not part of the layer, so they get 1 and the real channels keep
    the reference's factors."""
    xs, _ = _spans(2, k=100)
    w = torch.randn(32, 100, generator=torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(w, (0, 28))
    grid = upstream_grid(20)
    scales = candidate_scales(xs, padded, grid)
    assert scales.shape == (39, 128) and torch.equal(scales[:, 100:], torch.ones(39, 28))
    for (a, b), got in zip(grid, scales):
        assert torch.equal(got[:100], upstream_smooth_scale(xs.clone(), w.abs().amax(0), a, b))


@pytest.mark.parametrize("num_grids", [20, 10, 7, 1])
def test_grid_is_the_references(num_grids):
    assert smoothing_grid(num_grids) == upstream_grid(num_grids)
    assert len(smoothing_grid()) == 39 and len(smoothing_grid(10)) == 19


def test_search_uses_the_configured_grid():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(128, 128, generator=g) * (torch.rand(128, generator=g) * 8 + 0.1)
    w = torch.randn(64, 128, generator=g)
    cfg = SVDQuantConfig(dtype="float32", smooth_num_grids=10, lowrank_iters=2)
    sol = solve_group(w, x, x.abs().amax(0), cfg, act_format="int4", rank=8, smooth=True)
    assert sol.smooth_ab in upstream_grid(10)
    with pytest.raises(ValueError, match="smooth_num_grids"):
        SVDQuantConfig(smooth_num_grids=0)


def test_exact_factors_are_the_references_split():
    """``lora_down = Vh[:r]`` (orthonormal rows; ``proj_down`` is its transpose), ``lora_up = U[:, :r] * S[:r]``."""
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w)
    up, down = lowrank_factors(w.float(), 8, "exact")
    torch.testing.assert_close(down.double(), vh[:8].T, rtol=0, atol=1e-6)
    torch.testing.assert_close(up.double(), u[:, :8] * s[:8], rtol=1e-6, atol=1e-5)


def test_randomized_factors_have_the_same_split():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(5))
    up, down = lowrank_factors(w, 16, "randomized")
    torch.testing.assert_close(down.T @ down, torch.eye(16), rtol=0, atol=1e-5)  # orthonormal V
    gram = up.T @ up  # U S: orthogonal columns of norms S
    torch.testing.assert_close(gram - torch.diag(gram.diagonal()), torch.zeros(16, 16), rtol=0, atol=1e-3)
    assert bool((gram.diagonal()[:-1] >= gram.diagonal()[1:]).all())


class _ScriptedObjective:
    """An objective whose errors are given in advance (one per refinement step)."""

    def __init__(self, errors, k):
        self.errors, self.input_shift = list(errors), torch.zeros(k)

    def smoothed_inputs(self, smooth):
        return None, None

    def __call__(self, *args):
        return self.errors.pop(0)


def _run_refine(errors):
    """``_refine`` on scripted errors, with a residual quantizer that never repeats itself; returns the solution and
    the residual of each step."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    seen = []

    def quant_residual(residual):
        seen.append(residual)
        return residual + 0.01 * len(seen)

    cfg = SVDQuantConfig(dtype="float32", svd="exact", lowrank_iters=100)
    sol = _refine(w, torch.ones(64), (0.0, 0.0), _ScriptedObjective(errors, 64), quant_residual, 4, (16,), cfg)
    return sol, seen


def test_refinement_keeps_ties_and_tiny_gains_and_stops_at_the_first_worse_step():
    """deepcompressor keeps a step whose error is <= the best (a tie keeps the newer one) and stops at the first
    worse one: [1, 1 - 1e-6 (kept), same (kept, newer), 1.2 (stop)] runs 4 steps and returns the third."""
    sol, seen = _run_refine([1.0, 1.0 - 1e-6, 1.0 - 1e-6, 1.2, 0.5])
    assert sol.refine_iters == 4 and sol.rel_error == 1.0 - 1e-6
    assert torch.equal(sol.residual, seen[2])


def test_refinement_runs_up_to_lowrank_iters():
    sol, _ = _run_refine([1.0 - 1e-3 * i for i in range(100)])
    assert sol.refine_iters == 100 and sol.rel_error == pytest.approx(1.0 - 0.099)


def test_shifted_layer_error_is_the_objectives():
    """The search scores a post-GELU layer as the reference does (inputs ``x + shift``, target ``(x + shift) W^T``,
    the shift's term ``W @ shift`` in the bias in full precision): the stored layer, whose bias holds
    ``b - R @ (shift / smooth)``, has exactly the error the search minimised."""
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.gelu(torch.randn(256, 128, generator=g) * 2, approximate="tanh")
    linear = nn.Linear(128, 64)
    cfg = SVDQuantConfig(dtype="float32", lowrank_iters=5)
    shift = torch.full((128,), 0.171875)
    sol = solve_group(linear.weight.detach(), x, (x + shift).abs().amax(0), cfg, act_format="uint4", rank=8,
                      smooth=True, input_shift=shift)
    module = build_module(linear, sol, slice(0, 64), "uint4", cfg)
    with torch.no_grad():
        error = relative_error(module.forward_reference(x) - linear.bias, x @ linear.weight.T)
    assert error == pytest.approx(sol.rel_error ** 0.5, rel=1e-4)
