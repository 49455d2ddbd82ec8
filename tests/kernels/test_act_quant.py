"""Kernel 1 (quantduo.kernels.act_quant) vs its reference (quantduo.formats.reference.act_quant_ref).

On CPU the kernel runs in the Triton interpreter (tests/conftest.py) in float16 / float32 (bf16 tl.dot is wrong in the
interpreter); outputs are poisoned (NaN / sentinel bytes) before each kernel so unwritten elements fail.
"""
from __future__ import annotations

import pytest
import torch

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
