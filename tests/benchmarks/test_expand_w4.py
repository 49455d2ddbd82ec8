"""The expansion benchmark on the CPU: it stops with a clear message (the timings need a CUDA GPU)."""
import pytest
import torch

from benchmarks import expand_w4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_main_needs_a_gpu(capsys):
    assert expand_w4.main(["--shapes", "64x64"]) == 1
    assert "CUDA" in capsys.readouterr().out
