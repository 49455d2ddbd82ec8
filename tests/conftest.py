"""Test set-up: Triton kernels run in the CPU interpreter when no GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import is_fake  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def single_thread():
    """Run a test with one torch thread (restored afterwards): on a small shared CPU, two contending
    BLAS/LAPACK threads were measured several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poison_empty(monkeypatch):
    """Every torch.empty (e.g. a kernel's output) starts as NaN / 0x7F bytes, so unwritten elements show.

    ``torch.device(...)`` contexts recognise constructors through a cached set of the torch functions: it is filled
    here, before the patch, so that it never caches the poisoned function (which left ``torch.empty`` outside every
    later ``with torch.device("meta")`` of the session: the published loader's meta model came out on the CPU).
    Tensors of a graph being traced (fake or functional, e.g. the body of a ``triton_op`` that Inductor decomposes)
    and autograd leaves are left alone: the fill would become part of the compiled graph."""
    torch.utils._device._device_constructors()
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.requires_grad or torch.compiler.is_compiling() or is_fake(t):
            return t
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x7F)
    monkeypatch.setattr(torch, "empty", poisoned)
