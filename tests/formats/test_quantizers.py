"""Quantizers: pack/unpack round trips, error bounds (property tests) and brute-force references."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantduo.formats import quantizers as qz

shapes = st.tuples(st.integers(1, 5), st.integers(1, 4))  # rows, groups


def _tensor(seed: int, rows: int, cols: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * scale
    outliers = torch.rand(rows, cols, generator=g) < 0.05
    return torch.where(outliers, x * 50, x)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e3))
def test_int4_round_trip_error_bound(shape, seed, scale):
    rows, groups = shape
    x = _tensor(seed, rows, groups * 64, scale)
    q, scales = qz.quantize_int4(x, 64)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 7
    assert torch.equal(qz.unpack_int4(qz.pack_int4(q)), q)
    err = (qz.dequantize_groups(q, scales) - x).abs().reshape(rows, groups, 64)
    assert bool((err <= scales.unsqueeze(-1) / 2 * (1 + 1e-5)).all())
    assert torch.allclose(scales, x.abs().reshape(rows, groups, 64).amax(-1) / 7)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_uint4_round_trip_error_bound(shape, seed):
    rows, groups = shape
    x = _tensor(seed, rows, groups * 64, 1.0).abs()
    q, scales = qz.quantize_uint4(x, 64)
    assert int(q.max()) <= 15
    assert torch.equal(qz.unpack_uint4(qz.pack_uint4(q)), q)
    err = (qz.dequantize_groups(q, scales) - x).abs().reshape(rows, groups, 64)
    assert bool((err <= scales.unsqueeze(-1) / 2 * (1 + 1e-5)).all())


def test_int4_matches_brute_force():
    x = _tensor(1, 8, 128, 2.0)
    q, scales = qz.quantize_int4(x, 64)
    levels = torch.arange(-7, 8, dtype=torch.float32)
    y = (x.reshape(8, 2, 64) / scales.unsqueeze(-1)).unsqueeze(-1)
    brute = levels[(y - levels).abs().argmin(-1)].reshape(8, 128)
    # argmin picks the lower level on exact ties; random data has none
    assert torch.equal(q.float(), brute)


def test_packed_nibble_layout():
    q = torch.tensor([[1, -2, 7, -7]], dtype=torch.int8)
    packed = qz.pack_int4(q)
    assert packed.tolist() == [[0x01 | (0xE << 4), 0x07 | (0x9 << 4)]]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 4), groups=st.integers(1, 4), seed=st.integers(0, 10_000), scale=st.floats(1e-2, 1e2))
def test_nvfp4_matches_brute_force(rows, groups, seed, scale):
    x = _tensor(seed, rows, groups * 16, scale)
    codes, scales, gscale = qz.quantize_nvfp4(x)
    assert scales.dtype == torch.float8_e4m3fn
    assert torch.equal(qz.unpack_nibbles(qz.pack_nibbles(codes)), codes)
    deq = qz.dequantize_nvfp4(codes, scales, gscale)
    # brute force: every element takes the nearest signed grid value at its group's scale
    step = (scales.float() * gscale).unsqueeze(-1)
    grid = torch.cat([-qz.FP4_E2M1_GRID.flip(0), qz.FP4_E2M1_GRID])
    y = x.reshape(rows, groups, 16)
    candidates = grid * step.unsqueeze(-1)  # [rows, groups, 1, 16]
    best = (y.unsqueeze(-1) - candidates).abs().amin(-1)
    assert torch.allclose((deq.reshape(rows, groups, 16) - y).abs(), best, rtol=1e-5, atol=1e-6 * float(x.abs().max()))


def test_nvfp4_relative_error_is_small():
    x = torch.randn(64, 256)
    deq = qz.fake_quant(x, "nvfp4")
    rel = float((deq - x).norm() / x.norm())
    assert 0.03 < rel < 0.15  # E2M1 with per-16 scales: measured ~0.09


def _nunchaku_nvfp4_brute_force(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nunchaku's activation quantizer restated per element: per 16, ``s = min(amax * float32(1/6), 448)``; each
    value takes the signed grid value nearest to ``x * float32(1 / s)`` (ties: even grid index; beyond 6: 6);
    dequantized with ``s`` rounded to fp8 E4M3. Returns (dequantized float32, fp8 scales)."""
    g = x.reshape(x.shape[0], -1, 16)
    s = (g.abs().amax(-1) * torch.tensor(1 / 6, dtype=torch.float32)).clamp(max=448)
    out = torch.zeros_like(g)
    grid = qz.FP4_E2M1_GRID.tolist()
    for idx in torch.cartesian_prod(*[torch.arange(d) for d in g.shape]).tolist():
        r, c, e = idx
        if s[r, c] == 0:
            continue
        y = min(abs(float(g[r, c, e] * torch.reciprocal(s[r, c]))), 6.0)  # float32 product with 1 / s
        dists = [abs(y - v) for v in grid]
        best = min(dists)
        i = min((j for j in range(8) if dists[j] == best), key=lambda j: (j % 2, j))
        out[r, c, e] = (grid[i] if g[r, c, e] >= 0 else -grid[i]) * float(s[r, c].to(torch.float8_e4m3fn))
    return out.reshape(x.shape), s.to(torch.float8_e4m3fn)


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 3), groups=st.integers(1, 3), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e4))
def test_nvfp4_nunchaku_matches_brute_force(rows, groups, seed, scale):
    """Codes from the scale before its fp8 rounding, no tensor scale; scales clamp at 448 (large inputs saturate)."""
    x = _tensor(seed, rows, groups * 16, scale)
    x[0, :16] = 0.0  # an all-zero group
    codes, scales = qz.quantize_nvfp4_nunchaku(x)
    expected, expected_scales = _nunchaku_nvfp4_brute_force(x)
    assert scales.dtype == torch.float8_e4m3fn and torch.equal(scales.float(), expected_scales.float())
    assert torch.equal(qz.dequantize_nvfp4(codes, scales, torch.tensor(1.0)), expected)
    assert torch.equal(qz.fake_quant(x, "nvfp4_nunchaku"), expected)


def test_nvfp4_nunchaku_differs_from_two_level_nvfp4():
    """Dividing by the unrounded scale is not quantduo's two-level NVFP4 (which divides by the fp8 scale under a
    tensor scale): on this group the codes differ."""
    x = torch.tensor([[5.2, 2.18] + [0.9] * 14])  # s = 5.2 / 6 = 0.8667, fp8(s) = 0.875
    # 2.18 / 0.8667 = 2.515 -> 3 (Nunchaku); 2.18 / 0.875 = 2.491 -> 2 (two-level NVFP4 with a unit tensor scale)
    nunchaku = qz.fake_quant(x, "nvfp4_nunchaku")
    assert float(nunchaku[0, 1]) == 3.0 * 0.875
    assert float(qz.dequantize_nvfp4(*qz.quantize_nvfp4(x, torch.tensor(1.0)))[0, 1]) == 2.0 * 0.875


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="not divisible by group_size 64"):
        qz.quantize_int4(torch.randn(4, 100), 64)
    assert qz.pad_to_multiple(torch.randn(4, 100), 64).shape == (4, 128)


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown 4-bit format"):
        qz.fake_quant(torch.randn(2, 64), "int3")


def test_int4_and_uint4_round_ties_to_even():
    """deepcompressor's (and the GPU kernels') round: ties to even. A group whose max is 7 (scale 1 for INT4) or 15
    (scale 1 for UINT4) puts exact .5 multiples of the scale on ties: 2.5 -> 2, -2.5 -> -2, 3.5 -> 4, 0.5 -> 0."""
    x = torch.zeros(64)
    x[:6] = torch.tensor([7.0, 2.5, -2.5, 3.5, 0.5, -0.5])
    q, s = qz.quantize_int4(x[None], 64)
    assert s.item() == 1.0
    assert q[0, :6].tolist() == [7, 2, -2, 4, 0, 0]
    u = torch.zeros(64)
    u[:5] = torch.tensor([15.0, 2.5, 3.5, 0.5, 14.5])
    qu, su = qz.quantize_uint4(u[None], 64)
    assert su.item() == 1.0
    assert qu[0, :5].tolist() == [15, 2, 4, 0, 14]


def test_int4_codes_use_the_stored_scale():
    """The scale is rounded to its storage dtype (bf16) *before* the codes are computed (deepcompressor's order):
    amax 7.0625 -> amax / 7 = 1.008929, stored as bf16 1.0078125; 2.521 is then 2.5014 scales (code 3), while the
    unrounded scale would give 2.4987 (code 2)."""
    x = torch.zeros(64)
    x[0], x[1] = 7.0625, 2.521
    q, s = qz.quantize_int4(x[None], 64, scale_dtype=torch.bfloat16)
    assert s.item() == 1.0078125
    assert q[0, 1].item() == 3
    assert torch.round(torch.tensor(2.521) / (7.0625 / 7)).item() == 2  # what the other order would give


def test_nvfp4_nunchaku_multiplies_by_the_reciprocal():
    """Nunchaku's codes come from ``x * rcp(s)``: with amax 1.0234375 (s = amax * float32(1/6)) the value 0.1279296875
    is exactly 0.75 scales by division (a tie, to grid index 2: 1.0) but 0.74999994 by the reciprocal (index 1: 0.5)."""
    x = torch.zeros(1, 16)
    x[0, 0], x[0, 1] = 1.0234375, 0.1279296875
    s = torch.tensor(1.0234375) * torch.tensor(1 / 6)
    assert float(x[0, 1] / s) == 0.75 and float(x[0, 1] * torch.reciprocal(s)) < 0.75
    codes, _ = qz.quantize_nvfp4_nunchaku(x)
    assert int(codes[0, 1]) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_activations_4bit_follow_nunchaku(dtype):
    """Run-time 4-bit activations (Nunchaku's ``quantize_w4a4_from_fpsum_warp``): ``s = amax * float32(1 / qmax)``,
    codes ``round(x * float32(1 / s))``, the scale kept in the activation dtype. Groups built on ties: amax 1.03125
    and x = amax / 2 are 3.5 (signed) / 7.5 (unsigned) scales by division but just below by the reciprocal (codes 3
    / 7); with amax 1.1875 (signed) / 1.125 (unsigned) division lands just below and the reciprocal on the tie
    (codes 4 / 8). The weights' quantizer (deepcompressor's division) keeps 4 / 8 on the first."""
    for unsigned, qmax, amax1, expected in ((False, 7, 1.1875, [3, 4]), (True, 15, 1.125, [7, 8])):
        x = torch.zeros(1, 128)
        x[0, 0], x[0, 1], x[0, 64], x[0, 65] = 1.03125, 0.515625, amax1, amax1 / 2
        x[0, 2] = 0.3 if unsigned else -0.3
        q, scales = qz.quantize_activations_4bit(x.to(dtype), 64, unsigned, dtype)
        assert q.dtype == (torch.uint8 if unsigned else torch.int8)
        assert q[0, [1, 65]].tolist() == expected
        s = torch.tensor([1.03125, amax1]) * torch.tensor(1 / qmax)
        assert torch.equal(scales[0], s.to(dtype).float())
        weights_rule = (qz.quantize_uint4 if unsigned else qz.quantize_int4)(x, 64)[0]
        assert weights_rule[0, 1].item() == expected[0] + 1
        deq = qz.fake_quant_activations(x.to(dtype), "uint4" if unsigned else "int4", 64, dtype)
        assert torch.equal(deq, (q.float().reshape(1, 2, 64) * scales[..., None]).reshape(1, 128))


def test_activations_4bit_all_zero_group():
    """An all-zero group: scale 1, codes 0 (Nunchaku's 0 * rcp(0) is NaN, which its conversion takes to 0)."""
    q, scales = qz.quantize_activations_4bit(torch.zeros(2, 64), 64, False, torch.bfloat16)
    assert torch.equal(q, torch.zeros(2, 64, dtype=torch.int8)) and torch.equal(scales, torch.ones(2, 1))
