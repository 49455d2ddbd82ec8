"""Instruction counts of the INT4 -> fp8 kernels, compiled for Hopper (sm_90a) on any machine: no GPU needed.

    PYTHONPATH=. python benchmarks/sass_count.py [--gemm BMxBNxBK:WARPS:STAGES ...] [--expansion BNxBK ...]

Triton compiles a kernel for a target it does not run on, and its bundled ``nvdisasm`` / ``cuobjdump`` list the
machine code (SASS) and the registers. For the mixed-input fp8 GEMM (:mod:`quantduo.kernels.fp8_w4_gemm`) the main
K loop (the longest backward branch) is counted per weight and thread; for the fp8 expansion
(:mod:`quantduo.kernels.dequant_w4`) the whole kernel, one tile per program. Both with the rank-32 branch and
smoothing, as FLUX's layers. The launch's specializations are given as the JIT sees them at FLUX shapes
(16-byte-divisible pointers, sizes and row strides; the group scales' unit column stride a constant): without them
every load compiles to single bytes. These are predictions to set beside device timings (docs/kernel-notes.md,
item 30), not timings.
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

# the modules (quantduo.kernels re-exports the functions of the same names)
dequant_module = importlib.import_module("quantduo.kernels.dequant_w4")
gemm_module = importlib.import_module("quantduo.kernels.fp8_w4_gemm")

HOPPER = GPUTarget("cuda", 90, 32)
# argument types of the two kernels (pointers as the FLUX layers pass them; every integer 32-bit)
GEMM_TYPES = {"XQ": "*fp8e4nv", "XS": "*fp32", "W": "*u8", "WS": "*bf16", "LD": "*bf16", "LU": "*bf16",
              "INV_SMOOTH": "*fp32", "INV_WSCALE": "*fp32", "WSCALE": "*fp32", "BIAS": "*bf16", "OUT": "*bf16",
              "PART": "*fp32", "COUNTS": "*i32"}
EXPANSION_TYPES = {"W": "*u8", "WS": "*bf16", "LD": "*bf16", "LU": "*bf16", "SMOOTH": "*fp32", "ROW_SCALE": "*fp32",
                   "OUT": "*fp8e4nv"}
DIVISIBLE = ("N", "K", "R", "stride_xm", "stride_wsn")  # multiples of 16 at FLUX shapes
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/")
_BRANCH = re.compile(r"BRA\s+`?\(?\.L_x_(\d+)")


def _tool(name: str) -> str:
    """Path of a CUDA binary shipped inside Triton's NVIDIA backend."""
    path = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not bundled with this Triton ({path})")
    return path


def compile_for_hopper(fn, pointer_types: dict, constexprs: dict, warps: int, stages: int):
    """``fn`` (a @triton.jit kernel) compiled for sm_90a with FLUX-shape specializations."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels defined under TRITON_INTERPRET=1 are interpreted, not compiled: unset it")
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointer_types.get(name, "i32")
            if name in pointer_types or name in DIVISIBLE:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=HOPPER, options=dict(num_warps=warps, num_stages=stages))


def _run(tool: str, *args: str) -> str:
    return subprocess.run([_tool(tool), *args], capture_output=True, text=True, check=True).stdout


def cubin_report(kernel) -> tuple[list[str], dict[str, int], int]:
    """(SASS instruction lines, label -> index of the next instruction, registers per thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = _run("nvdisasm", "-c", path)
        usage = _run("cuobjdump", "--dump-resource-usage", path)
    lines, labels = [], {}
    for raw in sass.splitlines():
        label = re.match(r"\.L_x_(\d+):", raw.strip())
        if label:
            labels[label.group(1)] = len(lines)
        elif _INSTRUCTION.search(raw):
            lines.append(raw)
    return lines, labels, int(re.search(r"REG:(\d+)", usage).group(1))


def main_loop(lines: list[str], labels: dict[str, int]) -> list[str]:
    """The instructions of the longest loop (a branch back to an earlier label)."""
    loops = [(labels[m.group(1)], j) for j, line in enumerate(lines)
             if (m := _BRANCH.search(line)) and m.group(1) in labels and labels[m.group(1)] <= j]
    if not loops:
        raise ValueError("no loop in this kernel")
    start, end = max(loops, key=lambda se: se[1] - se[0])
    return lines[start:end + 1]


def count_gemm(bm: int, bn: int, bk: int, warps: int = 4, stages: int = 3) -> dict:
    """The mixed-input GEMM's main loop at one tile config: registers, shared memory, instructions per weight."""
    kernel = compile_for_hopper(gemm_module._fp8_w4_gemm_kernel, GEMM_TYPES, dict(
        HAS_LR=True, HAS_SMOOTH=True, HAS_BIAS=True, SPLIT_K=4, FAST_ACCUM=True, NATIVE=True, RP=32, BM=bm, BN=bn,
        BK=bk, G=64, PREC="tf32", stride_wsg=1), warps, stages)
    lines, labels, regs = cubin_report(kernel)
    loop = main_loop(lines, labels)
    return dict(kernel=f"fp8_w4_gemm {bm}x{bn}x{bk} w{warps} s{stages}", registers=regs,
                shared_bytes=kernel.metadata.shared, instructions=len(loop),
                per_weight=len(loop) / (bn * bk / (32 * warps)))


def count_expansion(bn: int, bk: int, warps: int = 4) -> dict:
    """The fp8 expansion (one tile per program, rank-32 branch, 1/smooth): the whole kernel per weight and thread."""
    kernel = compile_for_hopper(dequant_module._dequant_w4_kernel, EXPANSION_TYPES, dict(
        HAS_LR=True, HAS_SMOOTH=True, SMOOTH_RECIP=True, FP8=True, NATIVE=True, RP=32, BN=bn, BK=bk, G=64,
        PREC="tf32", stride_wsg=1), warps, 1)
    lines, _, regs = cubin_report(kernel)
    return dict(kernel=f"expansion {bn}x{bk} w{warps}", registers=regs, shared_bytes=kernel.metadata.shared,
                instructions=len(lines), per_weight=len(lines) / (bn * bk / (32 * warps)))


def _gemm_spec(text: str) -> tuple[int, ...]:
    tiles, warps, stages = text.split(":")
    return (*map(int, tiles.split("x")), int(warps), int(stages))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gemm", nargs="*", type=_gemm_spec, default=[
        _gemm_spec(s) for s in ("32x64x128:4:3", "64x64x64:4:3", "64x64x128:4:3", "64x64x256:4:3", "64x64x256:4:2",
                                "64x64x256:8:3")], help="mixed-input GEMM tiles BMxBNxBK:WARPS:STAGES")
    ap.add_argument("--expansion", nargs="*", default=["64x128"], help="expansion tiles BNxBK")
    args = ap.parse_args(argv)
    rows = [count_gemm(*spec) for spec in args.gemm]
    rows += [count_expansion(*map(int, t.split("x"))) for t in args.expansion]
    print("| kernel | registers / thread | shared memory | loop instructions | per weight and thread |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['kernel']} | {r['registers']} | {r['shared_bytes'] / 1024:.0f} KiB | {r['instructions']} | "
              f"{r['per_weight']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
