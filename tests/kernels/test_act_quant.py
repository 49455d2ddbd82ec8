"""Kernel 1 (quantduo.kernels.act_quant) vs its reference (quantduo.formats.reference.act_quant_ref).

On CPU the kernel runs in the Triton interpreter (tests/conftest.py) in float16 / float32 (bf16 tl.dot is wrong in the
interpreter); outputs are poisoned (NaN / sentinel bytes) before each kernel so unwritten elements fail.
"""
from __future__ import annotations

import pytest
import torch

from quantduo.formats import quantizers as qz
from quantduo.formats import reference as ref
from quantduo.kernels.act_quant import MAX_LX_PARTIALS, act_quant

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten kernel outputs show (tests/conftest.py)


@pytest.mark.parametrize("mode", ref.ACT_MODES)
@pytest.mark.parametrize("dtype,splits,bk", [(torch.float16, 2, 64), (torch.float32, 1, 64), (torch.float16, 32, 64)])
def test_act_quant(mode, dtype, splits, bk, inputs):
    """Kernel 1 vs its reference; 32 slices (> MAX_LX_PARTIALS) add their low-rank partials atomically into one."""
    M, K, r = (17, 2048, 16) if splits > 16 else (40, 256, 16)
    x, smooth, shift, ld, _, _ = inputs(M, 8, K, r, dtype)
    x[5] = 0  # an all-zero token (scale 1)
    q, qs, lxp = act_quant(x, smooth, shift, ld, mode, config=(16, bk, splits))
    rq, rqs, rlx = ref.act_quant_ref(x, smooth, shift, ld, mode)
    if q is not None or rq is not None:
        assert q.dtype == rq.dtype and torch.equal(q, rq)
    if qs is not None or rqs is not None:
        assert torch.equal(qs, rqs)
    n_partials = 1 if splits > MAX_LX_PARTIALS else splits
    assert lxp.shape == (n_partials, M, r)
    torch.testing.assert_close(lxp.sum(0), rlx, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["none", "int4"])
def test_act_quant_default_config_no_lowrank(mode, inputs):
    """The default tiling (few tokens: one step per program) and no low-rank branch: no partials."""
    x, smooth, shift, _, _, _ = inputs(5, 8, 192, 1, torch.float16)
    q, qs, lxp = act_quant(x, smooth, shift, None, mode)
    assert lxp is None
    rq, rqs, _ = ref.act_quant_ref(x, smooth, shift, None, mode)
    assert (q is None) == (rq is None) and (q is None or torch.equal(q, rq))
    assert (qs is None) == (rqs is None) and (qs is None or torch.equal(qs, rqs))


def test_act_quant_bad_config(inputs):
    x, smooth, shift, ld, _, _ = inputs(4, 8, 256, 16, torch.float16)
    with pytest.raises(ValueError, match="multiple of splits \\* BK"):
        act_quant(x, smooth, shift, ld, "none", config=(16, 64, 3))
    with pytest.raises(ValueError, match="unknown activation mode 'int8'"):
        act_quant(x, smooth, shift, ld, "int8")
    with pytest.raises(ValueError, match="need the shift"):
        act_quant(x, smooth, None, ld, "uint4")
    with pytest.raises(ValueError, match="group size 64"):
        act_quant(x, smooth, shift, ld, "int4", group_size=128)
    with pytest.raises(ValueError, match="K % 64 == 0"):
        act_quant(x[:, :100], smooth[:100], shift[:100], None, "none")


def _nunchaku_groups(act: torch.Tensor, dtype, unsigned: bool = True):
    """Hand-written 4-bit groups of 64 of float32 ``act [M, K]`` by Nunchaku's rule (``quantize_w4a4_from_fpsum_warp``):
    ``s = amax * float32(1 / qmax)``, codes ``round(act * float32(1 / s))`` clamped, the scale kept in ``dtype``.
    Returns (codes float32 ``[M, K]``, scales float32 ``[M, K / 64]``; 1 for an all-zero group)."""
    qmax, low = (15, 0) if unsigned else (7, -7)
    g = act.reshape(act.shape[0], -1, 64)
    amax = g.abs().amax(-1)  # the largest magnitude, unsigned groups too (``__habs2``); negatives then code 0
    s = torch.where(amax > 0, amax * torch.tensor(1 / qmax, dtype=torch.float32), torch.ones_like(amax))
    codes = torch.round(g * (1 / s)[..., None]).clamp(low, qmax)
    return codes.reshape(act.shape), s.to(dtype).float()


def _near_ties(act: torch.Tensor, unsigned: bool = True) -> torch.Tensor:
    """bool ``[M, K]``: where ``act * float32(1 / s)`` lies within 4 float32 ulps of a half-integer. There the GPU's
    ``rcp.approx`` (one ulp from the correctly rounded reciprocal at most) may round the code the other way."""
    qmax = 15 if unsigned else 7
    g = act.reshape(act.shape[0], -1, 64)
    amax = g.abs().amax(-1)
    s = torch.where(amax > 0, amax * torch.tensor(1 / qmax, dtype=torch.float32), torch.ones_like(amax))
    t = g * (1 / s)[..., None]
    return ((t - t.floor() - 0.5).abs() <= 4 * 2.0 ** -23 * t.abs().clamp(min=1)).reshape(act.shape)


def _assert_codes(packed: torch.Tensor, codes: torch.Tensor, near_tie: torch.Tensor | None):
    """The codes in ``packed`` (uint8 ``[M, K / 2]``) equal ``codes`` (float32 ``[M, K]``), or, where ``near_tie``
    is given and true, differ from them by one."""
    got = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(1).float()
    if near_tie is None:
        assert torch.equal(got, codes)
    else:
        assert ((got == codes) | (near_tie & ((got - codes).abs() == 1))).all()


def _nunchaku_order(x, shift, smooth):
    """``round(round(x + shift) / smooth)``, each step in float32 rounded to x's dtype, as float32."""
    summed = (x.float() + shift.to(x.dtype).float()).to(x.dtype)
    return (summed.float() / smooth.to(x.dtype).float()).to(x.dtype).float()


def _smoothed_then_shifted(x, shift, smooth):
    """The order quantduo used before 0.3.0: ``round(x / smooth) + shift / smooth`` (the shift in the smoothed space,
    rounded to x's dtype, added in float32)."""
    smoothed = (x.float() / smooth.to(x.dtype).float()).to(x.dtype).float()
    return smoothed + (shift.float() / smooth.float()).to(x.dtype).float()


def _shifted_inputs(dtype):
    """Post-GELU-like x ``[24, 256]`` in ``dtype`` (some tokens near GELU's minimum, some large), Nunchaku's shift
    0.171875 and smoothing factors in [0.5, 1.5] ``[256]``."""
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.gelu(torch.randn(24, 256, generator=g) * 3, approximate="tanh")
    x[7] = -0.17
    return x.to(dtype), torch.full((256,), 0.171875, dtype=dtype), (torch.rand(256, generator=g) + 0.5).to(dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_shifted_unsigned_codes_follow_nunchaku_order(dtype, device):
    """The 4-bit modes quantize ``round(round(x + shift) / smooth)`` (Nunchaku's ``EpilogueQuantize``: shift added,
    then divided, in the activation dtype): codes and scales of the kernel and of the reference equal those
    computed by hand (on the device too, where the kernel's approximate reciprocal may move a code by one at a tie);
    on this input the former order (smooth, then add the smoothed shift) gives other codes or scales (float32:
    scales only)."""
    x, shift, smooth = (t.to(device) for t in _shifted_inputs(dtype))
    codes, scales = _nunchaku_groups(_nunchaku_order(x, shift, smooth), dtype)
    old_codes, old_scales = _nunchaku_groups(_smoothed_then_shifted(x, shift, smooth), dtype)
    assert not (torch.equal(codes, old_codes) and torch.equal(scales, old_scales))
    expected_deq = (codes.reshape(24, -1, 64) * scales[..., None]).reshape(24, 256).to(dtype)
    step = scales.repeat_interleave(64, dim=1)
    near_tie = _near_ties(_nunchaku_order(x, shift, smooth)) if device == "cuda" else None
    for q, qs, _, tie in ((*act_quant(x, smooth, shift, None, "uint4"), near_tie),
                          (*ref.act_quant_ref(x, smooth, shift, None, "uint4"), None)):
        _assert_codes(q, codes, tie)
        assert torch.equal(qs, scales.T)
    for deq, _, _, tie in ((*act_quant(x, smooth, shift, None, "uint4_deq"), near_tie),
                           (*ref.act_quant_ref(x, smooth, shift, None, "uint4_deq"), None)):
        assert deq.dtype == dtype
        off = deq != expected_deq
        assert not off.any() if tie is None else not (off & ~tie).any()
        assert ((deq.float() - expected_deq.float()).abs() <= 1.01 * step).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_shifted_layer_low_rank_reads_the_unshifted_smoothed_input(dtype):
    """With a low-rank branch, the 4-bit codes are those of ``(x + shift) / smooth`` and the down-projection is that of
    ``x / smooth`` (no shift), in one pass."""
    x, shift, smooth = _shifted_inputs(dtype)
    ld = (torch.randn(256, 16, generator=torch.Generator().manual_seed(4)) * 0.1).to(dtype)
    q, qs, lxp = act_quant(x, smooth, shift, ld, "uint4", config=(16, 64, 2))
    codes, scales = _nunchaku_groups(_nunchaku_order(x, shift, smooth), dtype)
    assert torch.equal(qs, scales.T)
    assert torch.equal(q, codes[:, 0::2].to(torch.uint8) | (codes[:, 1::2].to(torch.uint8) << 4))
    smoothed = (x.float() / smooth.float()).to(dtype)
    torch.testing.assert_close(lxp.sum(0), smoothed.float() @ ld.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_zero_shift_quantizes_x_over_smooth(dtype):
    """Signed layers (shift 0): the codes and dequantized values are those of ``round(x / smooth)``, as before the
    shift moved to the input space."""
    x, _, smooth = _shifted_inputs(dtype)
    x = x * 2 - 1  # signed
    codes, scales = _nunchaku_groups((x.float() / smooth.float()).to(dtype).float(), dtype, unsigned=False)
    expected = (codes.reshape(24, -1, 64) * scales[..., None]).reshape(24, 256).to(dtype)
    zero = torch.zeros(256, dtype=dtype)
    for deq, _, _ in (act_quant(x, smooth, zero, None, "int4_deq"),
                      ref.act_quant_ref(x, smooth, zero, None, "int4_deq")):
        assert torch.equal(deq, expected)
    for _, qs, _ in (act_quant(x, smooth, zero, None, "int4"), ref.act_quant_ref(x, smooth, zero, None, "int4")):
        assert torch.equal(qs, scales.T)


def _tie_groups(dtype, unsigned: bool):
    """Two groups of 64 whose ``x / s`` lands exactly on a half-integer while ``x * (1 / s)`` does not, in opposite
    directions (found by search over bf16 values; exact in float16 too): group 0 has amax 1.03125 and x =
    amax / 2 (``x / s`` = 3.5 / 7.5, ``x * (1 / s)`` just below it), group 1 amax 1.1875 / 1.125 and x = amax / 2
    (``x / s`` just below, ``x * (1 / s)`` on the tie). Returns x ``[1, 128]`` and the codes of those two entries by
    the reciprocal rule and by division."""
    amax1 = 1.125 if unsigned else 1.1875
    x = torch.zeros(1, 128)
    x[0, :64] = torch.linspace(-0.2 if not unsigned else 0.0, 0.3, 64)
    x[0, 64:] = torch.linspace(-0.2 if not unsigned else 0.0, 0.3, 64)
    x[0, 0], x[0, 1], x[0, 64], x[0, 65] = 1.03125, 0.515625, amax1, amax1 / 2
    rule = (8.0, 7.0) if unsigned else (4.0, 3.0)  # (division, reciprocal) for group 0; group 1 the other way
    return x.to(dtype), torch.tensor([rule[1], rule[0]]), torch.tensor([rule[0], rule[1]])


@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_4bit_codes_multiply_by_the_reciprocal_of_the_float32_scale(dtype, unsigned):
    """Nunchaku multiplies by ``1 / s`` (``s = amax * float32(1 / qmax)``) and keeps ``s`` in the activation dtype:
    on groups built to sit on a tie, kernel and reference give the reciprocal rule's codes, not division's, and the
    scales are 16-bit values."""
    x, by_reciprocal, by_division = _tie_groups(dtype, unsigned)
    assert not torch.equal(by_reciprocal, by_division)
    ones, zero = torch.ones(128, dtype=dtype), torch.zeros(128, dtype=dtype)
    mode = "uint4" if unsigned else "int4"
    codes, scales = _nunchaku_groups(x.float(), dtype, unsigned)
    assert torch.equal(codes[0, [1, 65]], by_reciprocal)
    packed = ((codes[:, 0::2].to(torch.int16) & 15) | ((codes[:, 1::2].to(torch.int16) & 15) << 4)).to(torch.uint8)
    for q, qs, _ in (act_quant(x, ones, zero, None, mode), ref.act_quant_ref(x, ones, zero, None, mode)):
        assert torch.equal(q, packed) and torch.equal(qs, scales.T)
        assert torch.equal(qs.to(dtype).float(), qs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_unsigned_scale_is_the_largest_magnitude(dtype):
    """Nunchaku's unsigned groups take ``__habs2``'s maximum: a group whose most negative input (-3) outweighs its
    largest positive one (1) gets s = 3 / 15 = 0.2, so 1.0 becomes code 5 (clamping first would give s = 1 / 15 and
    code 15) and the negatives code 0; kernel and reference alike."""
    x = torch.zeros(16, 64, dtype=dtype)
    x[:, 0], x[:, 1], x[:, 2] = -3.0, 1.0, -0.5
    ones, zeros = torch.ones(64, dtype=dtype), torch.zeros(64, dtype=dtype)
    for q, qs, _ in (act_quant(x, ones, zeros, None, "uint4"), ref.act_quant_ref(x, ones, zeros, None, "uint4")):
        codes = qz.unpack_uint4(q)
        assert codes[:, :3].tolist() == [[0, 5, 0]] * 16
        expected_scale = torch.tensor(3.0) * torch.tensor(1 / 15, dtype=torch.float32)
        torch.testing.assert_close(qs.float(), torch.full_like(qs.float(), float(expected_scale.to(dtype))))
