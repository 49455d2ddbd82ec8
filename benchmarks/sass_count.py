"""Instruction counts of the INT4 -> fp8 weight expansion, of FLUX's Q / K preparation and of the GELU row
quantization, compiled for Hopper (sm_90a) on any machine: no GPU needed.

    PYTHONPATH=. python benchmarks/sass_count.py [--expansion BNxBK ...] [--qk-norm-rope ROWSxWARPS ...]
        [--gelu-quant WARPS ...]

Triton compiles a kernel for a target it does not run on, and its bundled ``nvdisasm`` / ``cuobjdump`` list the
machine code (SASS) and the registers. The fp8 expansion (:mod:`quantduo.kernels.dequant_w4`'s kernel as
:func:`quantduo.kernels.fp8_linear.expand_w4_fp8` launches it: rank-32 branch and 1 / smooth, as FLUX's layers)
is counted whole, one tile per program, per weight and thread. The launch's specializations are given as the JIT
sees them at FLUX shapes (16-byte-divisible pointers, sizes and row strides; the group scales' unit column stride a
constant): without them every load compiles to single bytes. These are predictions to set beside device timings
(docs/kernel-notes.md, item 30), not timings.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

import triton
import triton.backends.nvidia as nvidia_backend
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# the module (quantduo.kernels re-exports the function of the same name)
dequant_module = importlib.import_module("quantduo.kernels.dequant_w4")
qk_module = importlib.import_module("quantduo.kernels.qk_norm_rope")
fp8_module = importlib.import_module("quantduo.kernels.fp8_linear")
ln_module = importlib.import_module("quantduo.kernels.layer_norm_fp8")
row_segments = importlib.import_module("quantduo.kernels.common").row_segments

HOPPER = GPUTarget("cuda", 90, 32)
# argument types of the kernel (pointers as the FLUX layers pass them; every integer 32-bit)
EXPANSION_TYPES = {"W": "*u8", "WS": "*bf16", "LD": "*bf16", "LU": "*bf16", "SMOOTH": "*fp32", "ROW_SCALE": "*fp32",
                   "OUT": "*fp8e4nv"}
DIVISIBLE = ("N", "K", "R", "stride_wsn")  # multiples of 16 at FLUX shapes
# float scalars as Inductor types them in compiled graphs (float64; eager launches pass float32)
QK_TYPES = {"X0": "*bf16", "X1": "*bf16", "W0": "*bf16", "W1": "*bf16", "COS": "*fp32", "SIN": "*fp32",
            "OUT": "*fp8e4nv", "eps": "fp64", "inv_scale": "fp64"}
QK_DIVISIBLE = ("s0_b", "s0_s", "s0_h", "s1_b", "s1_s", "s1_h")  # the head rows' strides (head dim 128)
GELU_QUANT_TYPES = {"X": "*bf16", "G": "*bf16", "Q": "*fp8e4nv", "SCALE": "*fp32"}
GELU_QUANT_DIVISIBLE = ("KX", "KG", "stride_xm", "stride_gm", "stride_qm")
FLUX_SINGLE_ROW = (3072, 12288)  # proj_out's input: cat(attention, gelu_tanh(mlp))
LAYER_NORM_TYPES = {"X0": "*bf16", "X1": "*bf16", "SHIFT": "*bf16", "SCALE": "*bf16", "Q": "*fp8e4nv",
                    "QSCALE": "*fp32", "R": "*bf16", "GATE": "*bf16", "X_OUT": "*bf16", "eps": "fp64"}
LAYER_NORM_DIVISIBLE = ("K", "x0_b", "x0_s", "x1_b", "x1_s", "shift_b", "scale_b", "r_b", "r_s", "gate_b")
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/")


def _tool(name: str) -> str:
    """Path of a CUDA binary shipped inside Triton's NVIDIA backend."""
    path = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not bundled with this Triton ({path})")
    return path


def compile_for_hopper(fn, arg_types: dict, constexprs: dict, warps: int, stages: int, divisible=DIVISIBLE):
    """``fn`` (a @triton.jit kernel) compiled for sm_90a with FLUX-shape specializations: ``arg_types`` the
    pointers' (and float scalars') types, other arguments 32-bit integers; pointers and the integers named in
    ``divisible`` multiples of 16."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels defined under TRITON_INTERPRET=1 are interpreted, not compiled: unset it")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = arg_types.get(name, "i32")
            if signature[name].startswith("*") or name in divisible:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=HOPPER, options=dict(num_warps=warps, num_stages=stages))


def _run(tool: str, *args: str) -> str:
    return subprocess.run([_tool(tool), *args], capture_output=True, text=True, check=True).stdout


def instructions(sass: str) -> list[str]:
    """The instruction lines of an ``nvdisasm`` listing (labels, directives and comments left out)."""
    return [line for line in sass.splitlines() if _INSTRUCTION.search(line)]


def cubin_report(kernel) -> tuple[list[str], int]:
    """(SASS instruction lines, registers per thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = _run("nvdisasm", "-c", path)
        usage = _run("cuobjdump", "--dump-resource-usage", path)
    return instructions(sass), int(re.search(r"REG:(\d+)", usage).group(1))


def summary(name: str, kernel, elements_per_program: int, warps: int) -> dict:
    """A table row of a compiled kernel: registers, shared memory, static SASS instructions (in all and per element
    and thread), subroutine calls (``CALL``: e.g. 64-bit integer division, whose instructions run per call but
    count once here), its global loads (how many are 128 bits wide) and its 16-bit FMAs in the PTX (a product fused
    with a sum in 16 bits, which drops a rounding the eager modules make: none expected in the norm kernels)."""
    lines, regs = cubin_report(kernel)
    loads = [re.search(r"LDG\S*", line).group(0) for line in lines if "LDG" in line]
    return dict(kernel=name, registers=regs, shared_bytes=kernel.metadata.shared, instructions=len(lines),
                per_weight=len(lines) / (elements_per_program / (32 * warps)),
                calls=sum(" CALL" in line for line in lines), loads=len(loads),
                wide_loads=sum(load.endswith(".128") for load in loads),
                fma16=len(re.findall(r"\bfma\.rn\.b?f16", kernel.asm["ptx"])))


def count_expansion(bn: int, bk: int, warps: int = 4) -> dict:
    """The fp8 expansion (one tile per program, rank-32 branch, 1/smooth): the whole kernel per weight and thread."""
    kernel = compile_for_hopper(dequant_module._dequant_w4_kernel, EXPANSION_TYPES, dict(
        HAS_LR=True, HAS_SMOOTH=True, SMOOTH_RECIP=True, FP8=True, NATIVE=True, RP=32, BN=bn, BK=bk, G=64,
        PREC="tf32", stride_wsg=1), warps, 1)
    return summary(f"expansion {bn}x{bk} w{warps}", kernel, bn * bk, warps)


def count_qk_norm_rope(rows: int, warps: int) -> dict:
    """FLUX's Q / K preparation (:mod:`quantduo.kernels.qk_norm_rope`, head dim 128, rotary on, bf16 inputs with
    16-element-aligned strides, float64 scalars as in a compiled graph): the whole kernel per element and thread, and
    its global load widths."""
    kernel = compile_for_hopper(qk_module._norm_rope_e4m3_kernel, QK_TYPES, dict(
        D=128, ROWS=rows, ROPE=True, ROUND_BEFORE_WEIGHT=False, NATIVE=True), warps, 1, divisible=QK_DIVISIBLE)
    return summary(f"qk_norm_rope {rows}x128 w{warps}", kernel, rows * 128, warps)


def count_gelu_quant(warps: int) -> dict:
    """The GELU row quantization (:func:`quantduo.kernels.fp8_linear.quantize_fp8_per_token` with a GELU part) on
    the FLUX single block's row (:data:`FLUX_SINGLE_ROW`, the launch's segments): the whole kernel per element of
    the row and thread."""
    kx, kg = FLUX_SINGLE_ROW
    (bx0, bx1), (bg0, bg1) = row_segments(kx), row_segments(kg)
    kernel = compile_for_hopper(fp8_module._fp8_token_quant_kernel, GELU_QUANT_TYPES, dict(
        BX0=bx0, BX1=bx1, BG0=bg0, BG1=bg1, NATIVE=True), warps, 1, divisible=GELU_QUANT_DIVISIBLE)
    return summary(f"gelu_quant {kx}+{kg} w{warps}", kernel, kx + kg, warps)


def count_layer_norm_fp8(warps: int) -> dict:
    """The adaLN row kernel (:mod:`quantduo.kernels.layer_norm_fp8`) on FLUX's 3072-wide rows (2048 + 1024), two
    streams, bf16, a float64 eps as in a compiled graph: the whole kernel per element of the row and thread."""
    b0, b1 = row_segments(3072)
    kernel = compile_for_hopper(ln_module._layer_norm_fp8_kernel, LAYER_NORM_TYPES, dict(B0=b0, B1=b1, RESIDUAL=False, NATIVE=True), warps, 1,
                                divisible=LAYER_NORM_DIVISIBLE)
    return summary(f"layer_norm_fp8 3072 w{warps}", kernel, 3072, warps)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--expansion", nargs="*", default=["64x128"], help="expansion tiles BNxBK")
    ap.add_argument("--qk-norm-rope", nargs="*", default=[], help="Q / K preparation: ROWSxWARPS (e.g. 64x8)")
    ap.add_argument("--gelu-quant", nargs="*", type=int, default=[], help="GELU row quantization: WARPS (e.g. 8)")
    ap.add_argument("--layer-norm-fp8", nargs="*", type=int, default=[], help="adaLN row kernel: WARPS (e.g. 4)")
    args = ap.parse_args(argv)
    rows = [count_expansion(*map(int, t.split("x"))) for t in args.expansion]
    rows += [count_qk_norm_rope(*map(int, t.split("x"))) for t in args.qk_norm_rope]
    rows += [count_gelu_quant(w) for w in args.gelu_quant]
    rows += [count_layer_norm_fp8(w) for w in args.layer_norm_fp8]
    print("| kernel | registers / thread | shared memory | instructions | per weight (element) and thread | "
          "128-bit loads | subroutine calls | 16-bit FMAs (PTX) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r['registers']} | {r['shared_bytes'] / 1024:.0f} KiB | {r['instructions']} | "
              f"{r['per_weight']:.2f} | {r['wide_loads']} of {r['loads']} | {r['calls']} | {r['fma16']} |")
    return rows


if __name__ == "__main__":
    main()
