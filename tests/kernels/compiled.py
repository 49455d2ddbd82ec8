"""Test helper: a kernel call under ``torch.compile`` against the same call eager."""
from __future__ import annotations

import torch


def assert_compiled_matches_eager(fn, *args):
    """``fn(*args)`` traced by ``torch.compile(fullgraph=True)`` (one graph, its kernels' operators opaque under the
    interpreter) gives the eager outputs (a tuple of codes, scales), bit for bit."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    torch._dynamo.reset()
    eager = fn(*args)
    for got, want in zip(compiled, eager, strict=True):
        assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                           want.view(torch.uint8) if want.dtype == torch.float8_e4m3fn else want)
