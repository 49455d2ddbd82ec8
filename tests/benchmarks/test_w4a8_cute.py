"""benchmarks/w4a8_cute.py on a Hopper GPU with CUTLASS's CuTe DSL installed: one small table row, its kernel checked."""
import json
import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(importlib.util.find_spec("cutlass") is None, reason="nvidia-cutlass-dsl not installed"),
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                       reason="needs a Hopper GPU"),
]


def test_one_row(tmp_path):
    from benchmarks import w4a8_cute  # noqa: PLC0415  (imports the optional DSL)
    assert w4a8_cute.main(["--tokens", "128", "--shapes", "256x256", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "w4a8_cute.json").read_text())
    assert row["promoted_rel_err"] < 4e-3 and row["folded_rel_err"] < 4e-3 and row["folded128_us"] > 0
