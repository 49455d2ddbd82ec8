"""A FLUX-style single-stream block as deepcompressor calibrates it. The split proj_out (quantduo.svdquant.split) as
its ``ConcatLinear`` builds it: the first ``Ka`` input columns go to ``out_proj`` (no bias), the rest to ``mlp_fc2``
(the bias), and their sum is the layer; which layers are split (single-stream blocks only); ``quantize_model``
calibrating the halves as two layers. And its ``splits``: q/k/v and ``proj_mlp`` read one input and share one
smoothing, but q/k/v share one low-rank branch and ``proj_mlp`` has its own (``lowrank.branch_factors``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quantduo.svdquant import SVDQuantConfig, SVDQuantLinear, quantize_model
from quantduo.svdquant.lowrank import branch_factors, lowrank_factors
from quantduo.svdquant.quantize import lowrank_branches
from quantduo.svdquant.split import SplitProjOut, parallel_proj_outs, split_proj_outs


class SingleStreamBlock(nn.Module):
    """A FLUX single block's layers: ``proj_out(cat(attn(x), gelu(proj_mlp(x))))``, the attention stood in by a
    linear map (what matters here is the data flow and the widths)."""

    def __init__(self, dim=64, mlp=256):
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.proj_mlp = nn.Linear(dim, mlp)
        self.proj_out = nn.Linear(dim + mlp, dim)

    def forward(self, x):
        h = torch.cat([self.attn(x), nn.functional.gelu(self.proj_mlp(x), approximate="tanh")], dim=-1)
        return x + self.proj_out(h)


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SingleStreamBlock(), SingleStreamBlock()])
        self.proj_out = nn.Linear(64 + 256, 64)  # no proj_mlp / attn beside it: not a single-stream block

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_from_linear_is_concat_linear():
    """Columns [:Ka] -> out_proj without bias, [Ka:] -> mlp_fc2 with the bias; the sum equals the layer."""
    torch.manual_seed(0)
    linear = nn.Linear(10, 4).double()
    split = SplitProjOut.from_linear(linear, 3)
    assert split.out_proj.bias is None and torch.equal(split.mlp_fc2.bias, linear.bias)
    assert torch.equal(split.out_proj.weight, linear.weight[:, :3]) and torch.equal(split.mlp_fc2.weight,
                                                                                      linear.weight[:, 3:])
    x = torch.randn(5, 10, dtype=torch.float64)
    assert torch.allclose(split(x), linear(x), rtol=0, atol=1e-12)
    assert (split.in_features, split.out_features) == (10, 4)
    meta = SplitProjOut.from_linear(nn.Linear(10, 4, bias=False, device="meta"), 7)
    assert meta.mlp_fc2.weight.is_meta and meta.mlp_fc2.bias is None and meta.mlp_fc2.in_features == 3
    with pytest.raises(ValueError, match="cannot split 10 inputs after 10"):
        SplitProjOut.from_linear(linear, 10)


def test_only_single_stream_blocks_are_split():
    model = Model()
    assert parallel_proj_outs(model) == {"blocks.0.proj_out": 64, "blocks.1.proj_out": 64}
    assert parallel_proj_outs(model.blocks[0]) == {"proj_out": 64}
    x = torch.randn(3, 64)
    expected = model(x)
    assert split_proj_outs(model, keep=lambda name: name == "blocks.1.proj_out") == ["blocks.0.proj_out"]
    assert isinstance(model.blocks[0].proj_out, SplitProjOut) and isinstance(model.blocks[1].proj_out, nn.Linear)
    assert torch.allclose(model(x), expected, atol=1e-5)


def _quantize(model, **config):
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    cfg = SVDQuantConfig(rank=8, search_tokens=64, lowrank_iters=2, dtype="float32", **config)
    return quantize_model(model, lambda m: m(x), cfg, progress=False), x


def test_quantize_model_calibrates_the_halves_as_two_layers():
    """Each half is its own SVDQuantLinear: the attention half signed INT4 without bias, the post-GELU half shifted
    UINT4 with the bias, each with its own smoothing and low-rank branch; the model is closer to the float one
    than with proj_out calibrated as one layer."""
    torch.manual_seed(0)
    model = Model()
    reference = Model()
    reference.load_state_dict(model.state_dict())
    report, x = _quantize(model)
    split = model.blocks[0].proj_out
    assert isinstance(split, SplitProjOut)
    assert isinstance(split.out_proj, SVDQuantLinear) and isinstance(split.mlp_fc2, SVDQuantLinear)
    assert (split.out_proj.act_format, split.mlp_fc2.act_format) == ("int4", "uint4")
    assert split.out_proj.bias is None and split.mlp_fc2.bias is not None
    assert split.out_proj.smooth_factor.shape == (64,) and split.mlp_fc2.smooth_factor.shape == (256,)
    assert split.out_proj.proj_down.shape == (64, 8) and split.mlp_fc2.proj_down.shape == (256, 8)
    names = {r.name for r in report.quantized()}
    assert {"blocks.0.proj_out.out_proj", "blocks.0.proj_out.mlp_fc2"} <= names and "blocks.0.proj_out" not in names
    one_layer = Model()
    one_layer.load_state_dict(reference.state_dict())
    _quantize(one_layer, split_proj_out=False)
    with torch.no_grad():
        target = reference(x) - x  # what the blocks add
        err, err_one = ((m(x) - reference(x)).norm() / target.norm() for m in (model, one_layer))
    assert err < 0.9 * err_one  # the unsigned MLP half and the second low-rank branch pay (0.159 vs 0.190)


@pytest.mark.parametrize("config", [dict(split_proj_out=False), dict(act_format="none"),
                                    dict(skip=["blocks.*.proj_out"]), dict(weight_only=["blocks.0.proj_out"])])
def test_split_off(config):
    """No split with ``split_proj_out=False``, for W4A16 formats, or where a rule names the whole layer (skipped or
    weight-only: the rule keeps meaning the layer it names)."""
    torch.manual_seed(0)
    model = Model()
    _quantize(model, **config)
    proj_out = model.blocks[0].proj_out
    assert not isinstance(proj_out, SplitProjOut)
    assert isinstance(proj_out, nn.Linear if "skip" in config else SVDQuantLinear)


class Attention(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        return torch.softmax(q @ k.T / 8, dim=-1) @ v


class ParallelBlock(SingleStreamBlock):
    """q/k/v and proj_mlp called on the same normalised input, as in diffusers' FluxSingleTransformerBlock."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        h = self.norm(x)
        h = torch.cat([self.attn(h), nn.functional.gelu(self.proj_mlp(h), approximate="tanh")], dim=-1)
        return x + self.proj_out(h)


def test_branch_factors_are_each_blocks_own():
    """Block b's rows get its own rank-r factors in columns [b r, (b + 1) r) and zeros elsewhere."""
    w = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(0))
    up, down = branch_factors(w, [30, 10], 4, "exact")
    assert up.shape == (3, 40, 8) and down.shape == (3, 24, 8)
    u0, d0 = lowrank_factors(w[:, :30], 4, "exact")
    u1, d1 = lowrank_factors(w[:, 30:], 4, "exact")
    assert torch.equal(up[:, :30, :4], u0) and torch.equal(up[:, 30:, 4:], u1) and torch.equal(down[..., 4:], d1)
    assert not up[:, :30, 4:].any() and not up[:, 30:, :4].any() and torch.equal(down[..., :4], d0)
    with pytest.raises(ValueError, match="do not add up"):
        branch_factors(w, [30, 9], 4)


def test_branches_are_the_members_modules():
    assert lowrank_branches(["b.proj_mlp", "b.attn.to_q", "b.attn.to_k", "b.attn.to_v"]) == [
        ["b.proj_mlp"], ["b.attn.to_q", "b.attn.to_k", "b.attn.to_v"]]


def test_qkv_and_proj_mlp_share_the_smoothing_not_the_branch():
    torch.manual_seed(0)
    model = nn.ModuleList([ParallelBlock()])
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    cfg = SVDQuantConfig(rank=8, search_tokens=64, lowrank_iters=2, dtype="float32")
    report = quantize_model(model, lambda m: m[0](x), cfg, progress=False)
    block = model[0]
    q, k, v, mlp = block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp
    assert {r.name: len(r.group) for r in report.quantized()}["0.proj_mlp"] == 4  # one shared-input group
    for layer in (k, v, mlp):
        assert torch.equal(layer.smooth_factor, q.smooth_factor)
    assert torch.equal(k.proj_down, q.proj_down) and torch.equal(v.proj_down, q.proj_down)
    assert mlp.rank == q.rank == 8 and not torch.allclose(mlp.proj_down, q.proj_down)
