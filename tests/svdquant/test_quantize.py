"""SVDQuant reference path: algorithm ordering, module semantics, model-level API, save/load, bad input."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quantduo.svdquant import (
    ActivationRecorder, CalibrationError, CheckpointError, SVDQuantConfig, SVDQuantLinear, load_quantized, quantize_model,
    save_quantized, solve_group,
)
from quantduo.formats import quantizers as qz
from quantduo.svdquant.lowrank import fake_quant_act
from quantduo.svdquant.report import plot_quality_report, rank_sweep
from quantduo.utils import InputError, relative_error, write_manifest

CFG = SVDQuantConfig(dtype="float32", lowrank_iters=20, search_tokens=256)


def outlier_problem(seed=0, k=256, n=256, t=512):
    """Activations with a few large-magnitude channels; a weight with a decaying spectrum plus noise."""
    g = torch.Generator().manual_seed(seed)
    channel_scale = torch.ones(k)
    channel_scale[torch.randperm(k, generator=g)[:8]] = torch.rand(8, generator=g) * 30 + 20
    x = torch.randn(t, k, generator=g) * channel_scale
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g))
    spectrum = 1.0 / torch.arange(1, min(n, k) + 1).float()
    w = (u[:, : len(spectrum)] * spectrum) @ v[:, : len(spectrum)].T + 0.002 * torch.randn(n, k, generator=g)
    return x, w


def solve(x, w, rank, smooth, cfg=CFG, act="int4"):
    return solve_group(w, x, x.abs().amax(0), cfg, act_format=act, rank=rank, smooth=smooth)


def test_w4a16_smoothing_and_lowrank_on_outliers():
    """With 16-bit activations, smoothing alone (activation-aware scaling) and the low-rank branch each cut the
    W4A16 error several times (measured: 0.0087 -> 0.0012 smoothed, 0.0006 rank 32, ~0 both)."""
    x, w = outlier_problem()
    plain = solve(x, w, 0, False, act="none").rel_error
    assert solve(x, w, 0, True, act="none").rel_error < plain / 3
    assert solve(x, w, 32, True, act="none").rel_error < solve(x, w, 32, False, act="none").rel_error < plain / 3


def test_error_ordering_on_outliers():
    x, w = outlier_problem()
    naive = solve(x, w, 0, False).rel_error
    smooth_only = solve(x, w, 0, True).rel_error
    lowrank_only = solve(x, w, 32, False).rel_error
    svdquant = solve(x, w, 32, True).rel_error
    # measured: naive 0.024, smoothing-only 0.0046, low-rank-only 0.0025, SVDQuant 0.000047
    assert naive > 3 * smooth_only
    assert smooth_only > 1.3 * lowrank_only
    assert lowrank_only > 2 * svdquant


def test_error_decreases_with_rank():
    x, w = outlier_problem(seed=1)
    errors = rank_sweep(w, x, CFG, ranks=(0, 8, 16, 32, 64))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 3 * errors[-1]


def test_randomized_svd_close_to_exact():
    x, w = outlier_problem(seed=2)
    exact = solve(x, w, 32, True, SVDQuantConfig(dtype="float32", lowrank_iters=20, svd="exact")).rel_error
    randomized = solve(x, w, 32, True).rel_error
    assert abs(randomized - exact) / exact < 0.15  # measured 0.9%


def _module_from_solution(x, w, act="int4"):
    from quantduo.svdquant.quantize import build_module

    sol = solve(x, w, 16, True, act=act)
    linear = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        linear.weight.copy_(w)
    return build_module(linear, sol, slice(0, w.shape[0]), act, CFG), linear, sol


def test_forward_matches_integer_brute_force():
    x, w = outlier_problem(seed=3, k=128, n=64, t=32)
    module, linear, _ = _module_from_solution(x, w)
    x_smooth = x / module.smooth_factor
    qx, sx = qz.quantize_int4(x_smooth, 64)
    qw, sw = qz.unpack_int4(module.qweight), module.wscales.float()
    y = torch.zeros(32, 64, dtype=torch.float64)
    for g in range(2):  # integer dot per group, then the two scales
        cols = slice(64 * g, 64 * (g + 1))
        dot = qx[:, cols].long() @ qw[:, cols].long().T
        y += dot.double() * sx[:, g, None].double() * sw[None, :, g].double()
    y += (x_smooth @ module.proj_down @ module.proj_up.T).double() + module.bias.double()
    assert torch.allclose(module.forward_reference(x).double(), y, rtol=1e-4, atol=1e-4)


def test_module_error_matches_solver():
    x, w = outlier_problem(seed=4, k=128, n=64)
    module, linear, sol = _module_from_solution(x, w)
    y = module.forward_reference(x) - linear.bias
    rel = float((y - x @ w.T).detach().pow(2).sum() / (x @ w.T).pow(2).sum())
    assert rel == pytest.approx(sol.rel_error, rel=0.05)


class Block(nn.Module):
    """Attention-like block: q/k/v share an input, then an MLP with GELU."""

    def __init__(self, d=128, hidden=256, in_features=None):
        super().__init__()
        d_in = in_features or d
        self.q, self.k, self.v = nn.Linear(d_in, d), nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.conv = nn.Conv1d(4, 4, 1)
        self.empty = nn.Linear(0, 4)

    def forward(self, x):
        attn = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8, -1) @ self.v(x)
        return attn + self.fc2(torch.nn.functional.gelu(self.fc1(attn)))


def calib_batches(d=128, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d)
    scale[:3] = 25.0
    return [torch.randn(2, 32, d, generator=g) * scale for _ in range(n)]


def quantized_copy(reference: nn.Module, cfg: SVDQuantConfig, batches):
    model = type(reference)()
    model.load_state_dict(reference.state_dict())
    report = quantize_model(model, lambda m: [m(b) for b in batches], cfg, progress=False)
    return model, report


def naive(cfg: SVDQuantConfig) -> SVDQuantConfig:
    """Plain round-to-nearest W4A4 with the same formats: no smoothing, no low-rank branch."""
    return SVDQuantConfig(**{**cfg.to_dict(), "rank": 0, "smooth": False, "unsigned_act": []})


def model_error(model, reference, x) -> float:
    with torch.no_grad():
        return relative_error(model(x), reference(x))


@pytest.fixture(scope="module")
def quantized_block():
    torch.manual_seed(0)
    reference = Block()
    model, report = quantized_copy(reference, CFG, calib_batches())
    return model, reference, report


def test_quantize_model_groups_and_report(quantized_block, tmp_path):
    model, reference, report = quantized_block
    by_name = {r.name: r for r in report.layers}
    assert by_name["q"].group == ["q", "k", "v"] and by_name["fc1"].group == ["fc1"]
    assert torch.equal(model.q.proj_down, model.k.proj_down) and torch.equal(model.q.smooth_factor, model.v.smooth_factor)
    assert by_name["fc2"].act_format == "uint4"  # post-GELU input detected
    assert by_name["conv"].status == "skipped" and "Conv1d" in by_name["conv"].reason
    assert by_name["empty"].reason == "zero-size layer"
    for name in ("q", "k", "v", "fc1", "fc2"):
        assert isinstance(getattr(model, name), SVDQuantLinear)
        assert by_name[name].error < by_name[name].naive_error / 2 ** 0.5  # squared errors: half
    x = calib_batches(seed=9)[0]
    naive_model, _ = quantized_copy(reference, naive(CFG), calib_batches())
    # measured: SVDQuant 0.068, naive W4A4 0.45 (softmax of outlier-heavy scores amplifies layer errors)
    assert model_error(model, reference, x) < 0.1
    assert model_error(model, reference, x) < model_error(naive_model, reference, x) / 4
    png = plot_quality_report(report, tmp_path / "report.png", {"q": ([0, 16], [0.1, 0.01])})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(report.to_json())[0]["name"]


def test_unsigned_activations_help_post_gelu():
    torch.manual_seed(1)
    h = torch.nn.functional.gelu(torch.randn(256, 256) * 2)
    w = torch.randn(128, 256) / 16
    signed = solve_group(w, h, h.abs().amax(0), CFG, act_format="int4", rank=16, smooth=True)
    unsigned = solve_group(w, h, (h + 0.171875).abs().amax(0), CFG, act_format="uint4", rank=16, smooth=True,
                           input_shift=torch.full((256,), 0.171875))
    assert unsigned.rel_error < 0.75 * signed.rel_error  # measured 0.0088 vs 0.0149


def test_post_gelu_shift_is_the_reference_constant(quantized_block):
    """deepcompressor's rule for unsigned INT4 inputs: 0.171875 (the tanh GELU's lower bound) is added to every
    channel before smoothing, so act_shift (input space) = 0.171875 on every channel, whatever the calibration's
    per-channel minimum, and the bias is the reference's: ``b - W @ shift`` with the float weight (``ShiftedLinear``)
    plus ``lora_up @ (lora_down / smooth) @ shift`` (its Nunchaku converter); an input at the GELU's minimum on a
    channel whose calibration never went below zero is then represented, not clipped to zero."""
    model, reference, _ = quantized_block
    fc2 = model.fc2
    k = fc2.in_features
    assert torch.equal(fc2.act_shift, torch.full_like(fc2.act_shift, 0.171875))
    shift = torch.full((k,), 0.171875, dtype=torch.float64)
    shifted_linear_bias = reference.fc2.bias.double() - reference.fc2.weight.double() @ shift
    lora_down = fc2.proj_down[:k].double().T / fc2.smooth_factor[:k].double()  # the converter's, [r, K]
    expected = shifted_linear_bias + fc2.proj_up.double() @ lora_down @ shift
    torch.testing.assert_close(fc2.bias.double(), expected)
    quantized_term = fc2.dequantized_residual()[:, :k].double() @ (shift / fc2.smooth_factor[:k].double())
    assert float((fc2.bias.double() - (reference.fc2.bias.double() - quantized_term)).abs().max()) > 1e-3  # not Q(R)
    x = torch.full((1, k), 0.05)
    x[0, 0] = -0.17  # the GELU's minimum, below any calibration value of most channels
    smooth = fc2.smooth_factor[:k].float()
    q = fake_quant_act(x, smooth, "uint4", 64, fc2.act_shift[:k].float())
    assert float(q[0, 0] * smooth[0]) - 0.171875 == pytest.approx(-0.17, abs=0.02)


def test_fake_quant_act_adds_the_shift_before_smoothing():
    """The calibration's view of the quantized inputs is ``Q((x + shift) / smooth)`` in float32 (the layer's order),
    written out here with the unsigned quantizer."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.gelu(torch.randn(8, 128, generator=g) * 3)
    smooth, shift = torch.rand(128, generator=g) + 0.5, torch.full((128,), 0.171875)
    groups = ((x + shift) / smooth).reshape(8, 2, 64)
    scales = groups.amax(-1, keepdim=True) / 15
    expected = (torch.round(groups / scales).clamp(0, 15) * scales).reshape(8, 128)
    assert torch.equal(fake_quant_act(x, smooth, "uint4", 64, shift), expected)


def test_save_load_round_trip(quantized_block, tmp_path):
    model, _, _ = quantized_block
    save_quantized(model, tmp_path / "ckpt", CFG)
    fresh = Block()
    load_quantized(fresh, tmp_path / "ckpt")
    x = calib_batches(seed=5)[0]
    assert torch.equal(fresh(x), model(x))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.safetensors", "quantduo_config.json",
                                                                      "quantduo_manifest.json"]


def _rewrite_as_format_2(ckpt, version=2):
    """Make the checkpoint folder ``ckpt`` one that quantduo < 0.3.0 wrote (format_version ``version``): each
    ``act_shift`` in the smoothed space, ``input shift / smooth_factor`` (the rule those versions stored), and the
    config and manifest rewritten to match."""
    state = load_file(ckpt / "model.safetensors")
    for key in [k for k in state if k.endswith(".act_shift")]:
        smooth = state[key.removesuffix("act_shift") + "smooth_factor"]
        state[key] = (state[key].float() / smooth.float()).to(state[key].dtype)
    save_file(state, ckpt / "model.safetensors", metadata={"format": "pt", "quantduo": str(version)})
    meta = json.loads((ckpt / "quantduo_config.json").read_text())
    (ckpt / "quantduo_config.json").write_text(json.dumps(dict(meta, format_version=version), indent=1))
    write_manifest(ckpt)


def test_format_2_checkpoint_loads_with_the_input_space_shift(quantized_block, tmp_path):
    """A checkpoint of format_version 2 (act_shift = shift / smooth) loads as the same layers: act_shift back in the
    input space (0.171875 on the post-GELU layer, 0 on the signed ones), the same outputs; versions this quantduo
    does not know are refused."""
    model, _, _ = quantized_block
    ckpt = save_quantized(model, tmp_path / "ckpt", CFG)
    assert json.loads((ckpt / "quantduo_config.json").read_text())["format_version"] == 3
    _rewrite_as_format_2(ckpt)
    assert not torch.allclose(load_file(ckpt / "model.safetensors")["fc2.act_shift"], model.fc2.act_shift)
    fresh = Block()
    assert load_quantized(fresh, ckpt)["format_version"] == 2
    torch.testing.assert_close(fresh.fc2.act_shift, torch.full_like(fresh.fc2.act_shift, 0.171875), rtol=1e-6, atol=0)
    assert not any(getattr(fresh, name).act_shift.any() for name in ("q", "k", "v", "fc1"))
    x = calib_batches(seed=5)[0]
    assert relative_error(fresh(x), model(x)) < 1e-5
    _rewrite_as_format_2(save_quantized(model, tmp_path / "v1", CFG), version=1)
    with pytest.raises(CheckpointError, match="unsupported format_version 1"):
        load_quantized(Block(), tmp_path / "v1")


def test_corrupt_and_mismatched_checkpoints(quantized_block, tmp_path):
    model, _, _ = quantized_block
    ckpt = save_quantized(model, tmp_path / "ckpt", CFG)
    with pytest.raises(CheckpointError, match="does not match|is 128x128"):
        load_quantized(Block(d=128, in_features=192), ckpt)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt"):
        load_quantized(Block(), ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_quantized(Block(), tmp_path / "nothing")


def test_failed_save_leaves_no_partial_file(quantized_block, tmp_path, monkeypatch):
    import quantduo.svdquant.serialization as ser

    def broken_save(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ser, "save_file", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(quantized_block[0], tmp_path / "ckpt", CFG)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_nan_calibration_is_rejected():
    model = Block()
    bad = calib_batches()[0].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match="NaN/inf"):
        quantize_model(model, lambda m: m(bad), CFG, progress=False)


def test_padding_when_group_does_not_divide():
    torch.manual_seed(2)
    model = Block(in_features=100)
    batches = [torch.randn(2, 16, 100) for _ in range(2)]
    reference = Block(in_features=100)
    reference.load_state_dict(model.state_dict())
    quantize_model(model, lambda m: [m(b) for b in batches], CFG, progress=False)
    assert model.q.padded_in_features == 128
    assert relative_error(model(batches[0]), reference(batches[0])) < 0.1
    with pytest.raises(ValueError, match="last dim 100"):
        model.q(torch.randn(3, 128))


def test_weight_only_and_skip_rules():
    torch.manual_seed(3)
    model = Block()
    cfg = SVDQuantConfig(dtype="float32", lowrank_iters=5, search_tokens=128, skip=["fc2"], weight_only=["fc1"])
    report = quantize_model(model, lambda m: m(calib_batches()[0]), cfg, progress=False)
    by_name = {r.name: r for r in report.layers}
    assert isinstance(model.fc2, nn.Linear) and by_name["fc2"].reason == "matches a skip rule"
    assert by_name["fc1"].status == "w4a16" and model.fc1.act_format == "none" and model.fc1.rank == 0


def test_w4a16_svdquant():
    """``w4a16_svdquant``: W4A16 layers get the smoothing search and the rank-r branch, and with weight outliers
    (a few strong directions) and activation outliers they are far more accurate than plain weight-only ones."""
    torch.manual_seed(5)
    reference = Block()
    with torch.no_grad():
        for lin in (reference.q, reference.k, reference.v, reference.fc1, reference.fc2):
            u = torch.randn(lin.out_features, 4)
            lin.weight.add_(u @ torch.randn(4, lin.in_features) * 0.3)  # a few strong directions
    base = SVDQuantConfig(act_format="none", dtype="float32", lowrank_iters=10, search_tokens=128, rank=16)
    plain, _ = quantized_copy(reference, base, calib_batches()[:1])
    lowrank, report = quantized_copy(reference, dataclasses.replace(base, w4a16_svdquant=True), calib_batches()[:1])
    assert all(r.status == "w4a16" for r in report.quantized())
    assert lowrank.fc1.rank == 16 and lowrank.fc1.act_format == "none" and plain.fc1.rank == 0
    assert plain.fc1.smoothing_folded_out and not lowrank.q.smoothing_folded_out
    x = calib_batches(seed=3)[0]
    assert model_error(lowrank, reference, x) < 0.7 * model_error(plain, reference, x)


def test_nvfp4_model():
    torch.manual_seed(4)
    reference = Block()
    cfg = SVDQuantConfig(weight_format="nvfp4", act_format="nvfp4", dtype="float32", lowrank_iters=5, search_tokens=128)
    model, report = quantized_copy(reference, cfg, calib_batches()[:1])
    naive_model, _ = quantized_copy(reference, naive(cfg), calib_batches()[:1])
    assert model.q.wscales.dtype == torch.float8_e4m3fn
    assert all(r.error < r.naive_error for r in report.quantized())
    x = calib_batches(seed=3)[0]
    # measured: SVDQuant NVFP4 0.052, naive NVFP4 W4A4 0.25
    assert model_error(model, reference, x) < 0.08
    assert model_error(model, reference, x) < model_error(naive_model, reference, x) / 3


def test_storage_bits_per_weight():
    module = SVDQuantLinear(3072, 3072, rank=32, dtype=torch.bfloat16)
    # 4 bits + 16-bit scale per 64 (0.25) + rank-32 bf16 factors (2 * 32 * 16 / 3072 = 0.33)
    assert module.storage_bits_per_weight() == pytest.approx(4 + 0.25 + 1 / 3, rel=1e-6)


@pytest.mark.parametrize("weight_format,act_format", [("int4", "int4"), ("int4", "none"), ("nvfp4", "nvfp4")])
def test_to_compute_dtype(weight_format, act_format):
    """Casting a float32 layer to bfloat16 casts its compute-dtype buffers (INT4 group scales included) and keeps
    the packed codes, the NVFP4 fp8 scales and the float32 global scale; the output stays within bf16 rounding
    (4-bit activations: some codes flip with the bf16 inputs)."""
    x, w = outlier_problem(seed=5, k=128, n=64, t=32)
    module = SVDQuantLinear(128, 64, rank=8, weight_format=weight_format, act_format=act_format, dtype=torch.float32)
    module.qweight.random_(0, 256)
    module.wscales.copy_((torch.rand(64, module.wscales.shape[1]) * 0.02 + 0.01).to(module.wscales.dtype))
    module.proj_down.normal_(0, 0.1), module.proj_up.normal_(0, 0.1), module.bias.normal_()
    before = module(x)
    kept = {name: module._buffers[name].clone() for name in ("qweight", "wscale_global")}
    scale_dtype = module.wscales.dtype
    assert module.to_compute_dtype(torch.bfloat16) is module
    assert module.dtype == torch.bfloat16 and module.proj_up.dtype == module.bias.dtype == torch.bfloat16
    assert module.wscales.dtype == (torch.bfloat16 if weight_format == "int4" else scale_dtype)
    assert all(torch.equal(module._buffers[name], t) for name, t in kept.items())
    assert relative_error(module(x.bfloat16()), before) < (1e-2 if act_format == "none" else 4e-2)
    with pytest.raises(ValueError, match="compute dtype"):
        module.to_compute_dtype(torch.float8_e4m3fn)


def test_non_finite_calibration_activations_name_the_layer():
    """A NaN reaching a linear's input in any calibration call is reported with that layer's name (checked once
    after the passes), and the recorder's hooks are gone afterwards."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    recorder = ActivationRecorder({"0": model[0], "2": model[2]})
    x = torch.randn(3, 8)
    with torch.no_grad():
        with pytest.raises(CalibrationError, match="layer '2'"):
            with recorder:
                model(x)
                model[2](torch.full((1, 8), float("nan")))
                model(x)
        assert not model[2]._forward_pre_hooks
        with ActivationRecorder({"0": model[0], "2": model[2]}):
            model(x)  # finite inputs: no error
