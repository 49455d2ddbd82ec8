"""benchmarks/sass_count.py: the instruction filter on a listing written by hand, and real compiles of the fp8
expansion, of FLUX's Q / K preparation and of the GELU row quantization for sm_90a on the CPU (in a subprocess: the test session's kernels are
interpreted)."""
import os
import subprocess
import sys

import pytest

from benchmarks import sass_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LISTING = """
        .text._dequant_w4_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
.L_x_0:
        // a comment
        /*0020*/              @P0 BRA `(.L_x_0) ;
        /*0030*/                   EXIT ;
"""


def test_instructions_keeps_the_instruction_lines_only():
    lines = sass_count.instructions(LISTING)
    assert [line.split()[1] for line in lines] == ["LDC", "S2R", "@P0", "EXIT"]


def test_counts_the_expansion():
    """Two expansion tiles (64 x 128, the default of the rank-32 layers, and 32 x 256) compile for sm_90a here; their
    counts are a few to a few tens of instructions per weight and thread, within the register file."""
    try:
        sass_count._tool("nvdisasm")
    except FileNotFoundError as ex:  # a Triton build without the CUDA binaries
        pytest.skip(str(ex))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "benchmarks/sass_count.py", "--expansion", "64x128", "32x256",
                          "--qk-norm-rope", "32x4", "--gelu-quant", "8", "--layer-norm-fp8", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| expansion")]
    assert [kernel.strip() for kernel, *_ in rows] == ["expansion 64x128 w4", "expansion 32x256 w4"]
    for kernel, registers, shared, instructions, per_weight, *_ in rows:
        assert 0 < int(registers) <= 255 and 4 < float(per_weight) < 40, kernel
        assert int(instructions) > 100
    (qk,) = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| qk_norm_rope")]
    wide, _, loads = qk[5].split()
    # compiled with Inductor's float64 scalars (Triton type-checks the interpreter's E4M3 branch too, which needs
    # float32), the rows' and tables' global loads 128 bits wide (8 bf16 / 4 float32)
    assert int(qk[1]) <= 128 and int(wide) >= int(loads) - 1 > 0  # the norm weight's [128] load may be narrower
    assert int(qk[6]) == 0  # no subroutine calls: its row indices in 32 bits (64-bit divisions are calls)
    (gelu,) = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| gelu_quant")]
    # FLUX's row in two power-of-two segments per input (no padded lanes) at ~15 instructions per element and
    # thread (the one-block kernel before it: ~37)
    assert gelu[0].strip() == "gelu_quant 3072+12288 w8" and float(gelu[4]) < 20
    (norm,) = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| layer_norm_fp8")]
    wide, _, loads = norm[5].split()
    # the adaLN row kernel: every global load 128 bits wide (rows, shift, scale), only the division's call; ~34
    # instructions per element and thread with its four bf16 roundings kept (29 when the compiler fused the
    # product with the sum into one bf16 FMA, dropping the product's rounding)
    assert wide == loads and int(norm[6]) <= 1 and 32 < float(norm[4]) < 48
    assert int(norm[7]) == 0 and int(qk[7]) == 0  # no product fused with a sum in bf16 (a rounding dropped)
