"""Kernel tests: kernel outputs are poisoned (unwritten elements fail) and share one input generator."""
from __future__ import annotations

import pytest
import torch


def make_inputs(M, N, K, r, dtype, device="cpu", seed=0):
    """x ``[M, K]`` (channel 3 an outlier), smooth and shift ``[K]``, proj_down ``[K, r]``, proj_up ``[N, r]``,
    bias ``[N]``."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x = t(M, K, scale=2.0)
    x[:, 3] *= 20  # an outlier channel
    smooth = (torch.rand(K, generator=g) + 0.5).to(dtype).to(device)
    shift = (torch.rand(K, generator=g) * 0.3).to(dtype).to(device)
    return x, smooth, shift, t(K, r, scale=0.1), t(N, r, scale=0.1), t(N)


@pytest.fixture
def inputs():
    """:func:`make_inputs`."""
    return make_inputs
