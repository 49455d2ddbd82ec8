"""First-block cache on the bundled tiny DiT (a real diffusers FluxTransformer2DModel)."""
import pytest
import torch

pytest.importorskip("diffusers")

from quantduo.demo import psnr  # noqa: E402
from quantduo.integrations.first_block_cache import (disable_first_block_cache, enable_first_block_cache,  # noqa: E402
                                                     first_block_cache_of)
from quantduo.models.tiny_dit import load_tiny_dit, sample_digits  # noqa: E402
from quantduo.utils import relative_error  # noqa: E402

LABELS = torch.arange(10)


@pytest.fixture(scope="module")
def dit():
    return load_tiny_dit()


def _step(dit, x, t):
    with torch.no_grad():
        return dit(x, torch.full((x.shape[0],), t), torch.arange(x.shape[0]) % 10)


def test_threshold_zero_never_skips_and_is_exact(dit):
    ref = sample_digits(dit, LABELS, steps=8, seed=0)
    cache = enable_first_block_cache(dit.transformer, threshold=0.0)
    out = sample_digits(dit, LABELS, steps=8, seed=0)
    stats = disable_first_block_cache(dit.transformer)
    assert (stats.computed, stats.skipped) == (8, 0) and cache.stats is stats
    assert torch.equal(out, ref)


def test_skips_and_stays_close(dit):
    keys = set(dit.transformer.state_dict())
    ref = sample_digits(dit, LABELS, steps=20, seed=0)
    enable_first_block_cache(dit.transformer, threshold=0.2)
    out = sample_digits(dit, LABELS, steps=20, seed=0)
    stats = disable_first_block_cache(dit.transformer)
    assert stats.skipped >= 5 and stats.calls == 20
    assert 30 < psnr(out, ref) < float("inf")
    assert set(dit.transformer.state_dict()) == keys and first_block_cache_of(dit.transformer) is None
    assert torch.equal(sample_digits(dit, LABELS, steps=4, seed=0), sample_digits(dit, LABELS, steps=4, seed=0))


def test_skip_decision(dit):
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(4, 1, 8, 8, generator=g), 3 * torch.randn(4, 1, 8, 8, generator=g)
    exact = _step(dit, x, 0.47)
    cache = enable_first_block_cache(dit.transformer, threshold=0.05)
    try:
        _step(dit, x, 0.50)
        assert (cache.stats.computed, cache.stats.skipped) == (1, 0)
        _step(dit, other, 0.49)  # a very different input: must not skip
        assert (cache.stats.computed, cache.stats.skipped) == (2, 0)
        _step(dit, x, 0.48)
        reused = _step(dit, x, 0.47)  # the same input a step later: must skip, reusing the cached residual
        assert (cache.stats.computed, cache.stats.skipped) == (3, 1)
        assert 0 < relative_error(reused, exact) < 0.05
        _step(dit, x, 0.9)  # timestep went up: a new generation, the cache resets and computes
        assert (cache.stats.computed, cache.stats.resets) == (4, 1)
    finally:
        disable_first_block_cache(dit.transformer)


def test_invalid(dit):
    with pytest.raises(ValueError, match="threshold"):
        enable_first_block_cache(dit.transformer, threshold=-1)
    with pytest.raises(ValueError, match="transformer_blocks"):
        enable_first_block_cache(torch.nn.Linear(2, 2))
    assert first_block_cache_of(dit.transformer) is None
