"""The expansion benchmark's helpers on the CPU (the timings need a CUDA GPU)."""
import pytest
import torch

from benchmarks import expand_w4


def test_codes_apart_counts_fp8_steps_across_zero():
    a = torch.tensor([0.0, 1.0, -1.0, 448.0, -0.0]).to(torch.float8_e4m3fn)
    b = torch.tensor([0.0, 1.125, 1.0, 416.0, 0.0]).to(torch.float8_e4m3fn)
    # 1 -> 1.125 is one step; -1 -> 1 crosses zero (56 steps each side); 448 -> 416 one step; -0 == +0
    assert expand_w4.codes_apart(a, b).tolist() == [0, 1, 112, 1, 0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_main_needs_a_gpu(capsys):
    assert expand_w4.main(["--shapes", "64x64"]) == 1
    assert "CUDA" in capsys.readouterr().out
