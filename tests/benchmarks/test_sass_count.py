"""benchmarks/sass_count.py: the loop finder on a listing written by hand, and real compiles for sm_90a on the CPU (in
a subprocess: the test session's kernels are interpreted)."""
import os
import subprocess
import sys

import pytest

from benchmarks import sass_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _listing(n: int) -> list[str]:
    return [f"        /*{16 * i:04x}*/                   FMUL R{i}, R{i}, R{i} ;" for i in range(n)]


def test_main_loop_is_the_longest_backward_branch():
    lines = _listing(40)
    lines[9] = "        /*0090*/              @P0 BRA `(.L_x_0) ;"   # a 6-instruction loop: 4 .. 9
    lines[30] = "        /*01e0*/              @P1 BRA `(.L_x_1) ;"  # the 21-instruction loop: 10 .. 30
    lines[35] = "        /*0230*/                  BRA `(.L_x_2) ;"  # a forward branch: not a loop
    labels = {"0": 4, "1": 10, "2": 38}
    loop = sass_count.main_loop(lines, labels)
    assert loop[0] == lines[10] and loop[-1] == lines[30] and len(loop) == 21
    with pytest.raises(ValueError, match="no loop"):
        sass_count.main_loop(_listing(5), {})


def test_counts_the_mixed_input_gemm_and_the_expansion():
    """A 32 x 64 x 128 tile of the mixed-input GEMM and a 64 x 128 expansion tile compile for sm_90a here; their
    counts are a few to a few tens of instructions per weight, within the register file."""
    try:
        sass_count._tool("nvdisasm")
    except FileNotFoundError as ex:  # a Triton build without the CUDA binaries
        pytest.skip(str(ex))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "benchmarks/sass_count.py", "--gemm", "32x64x128:4:3", "--expansion",
                          "64x128"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| fp8_w4_gemm")
            or line.startswith("| expansion")]
    assert len(rows) == 2
    for kernel, registers, shared, instructions, per_weight in rows:
        assert 0 < int(registers) <= 255 and 4 < float(per_weight) < 40, kernel
        assert int(instructions) > 100
