"""CUTLASS's INT4 x fp8 lookup-table GEMM (``csrc/w4a8_lut``) against cuBLAS's fp8 GEMM and the expansion + fp8
GEMM path at FLUX shapes: what a library mixed-input mainloop reaches on Hopper (docs/kernel-notes.md, item 75).

The library kernel needs groups of at least 128 inputs with fp8 (SVDQuant's are 64), so this times its mainloop with
groups of 128 and no low-rank branch: an upper bound on what a group-64 variant of it could reach, not an execution.

    scripts/build_w4a8_lut.sh                      (any x86-64 machine, no GPU; after scripts/build_fa3.sh's toolchain)
    PYTHONPATH=. python3 benchmarks/w4a8_lut.py [--lib build/w4a8_lut/libqd_w4a8_lut.so] [--tokens 4096] [--out DIR]

Writes ``w4a8_lut.json`` to DIR: per shape the median us of each path (CUDA-graph replays over buffers past L2) and
the lookup GEMM's relative error against its exact float32 product.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear as L  # noqa: E402  (benchmarks/linear.py: random layers, time_graph, v_scaled_mm)
from expand_w4 import gluon_expansion  # noqa: E402

from quantduo.utils import atomic_write  # noqa: E402

GROUP = 128
SHAPES = ("3072x3072", "9216x3072", "12288x3072", "3072x12288", "3072x15360")
DEFAULT_LIB = "build/w4a8_lut/libqd_w4a8_lut.so"


def unified_codes(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` in [-8, 7] -> uint8 ``[N, K / 2]`` in CUTLASS's unified encoding (element ``2j`` in the low
    nibble of byte ``j``): a positive ``v`` is stored as ``8 - v`` (the low three bits of ``-v``), zero and the
    negatives as two's complement, so the low three bits index a table and bit 3 says which sign."""
    nib = torch.where(q > 0, 8 - q, q).to(torch.int16) & 0xF
    nib = nib.to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def lookup_tables(scales: torch.Tensor) -> torch.Tensor:
    """float ``[N, K / GROUP]`` scales -> uint8 ``[N, K / GROUP, 8]``: entry ``i`` the float8_e4m3fn bits of
    ``scale * (i - 8)``, each product rounded once (CUTLASS's ``packed_scale_t`` builds the same table from an E4M3
    scale; here the scale keeps its precision)."""
    steps = torch.arange(-8, 0, dtype=torch.float32, device=scales.device)
    return (scales.float()[..., None] * steps).to(torch.float8_e4m3fn).view(torch.uint8)


def decoded_weight(codes: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """What the mainloop's lookup gives, float32 ``[N, K]``: nibble ``c`` with bit 3 set reads the negative table
    at ``c & 7``; otherwise the positive table, the negative one with its sign flipped and entry 0 replaced by zero."""
    nib = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(1).long()
    neg = tables.view(torch.float8_e4m3fn).float().repeat_interleave(GROUP, dim=1)  # [N, K, 8]
    value = neg.gather(2, (nib & 7)[..., None])[..., 0]
    positive = torch.where((nib & 7) == 0, torch.zeros_like(value), -value)
    return torch.where(nib >= 8, value, positive)


class LookupGemm:
    """ctypes binding of ``libqd_w4a8_lut.so``: device pointers and the current stream."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.qd_w4a8_workspace.restype = ctypes.c_size_t
        self.lib.qd_w4a8_workspace.argtypes = [ctypes.c_int] * 3
        self.lib.qd_w4a8_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_float] + \
            [ctypes.c_void_p] * 2
        self.lib.qd_w4a8_reorder.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p]

    def reorder(self, codes: torch.Tensor) -> torch.Tensor:
        """Unified codes ``[N, K / 2]`` -> the mainloop's layout (same size)."""
        out = torch.empty_like(codes)
        rc = self.lib.qd_w4a8_reorder(codes.data_ptr(), out.data_ptr(), codes.shape[0], 2 * codes.shape[1],
                                      torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"reorder failed ({rc})")
        return out

    def gemm(self, x8: torch.Tensor, codes: torch.Tensor, tables: torch.Tensor, alpha: float = 1.0):
        """Returns a call computing bf16 ``[M, N] = alpha * x8 @ decoded_weight^T`` into one output buffer."""
        M, K = x8.shape
        N = codes.shape[0]
        out = torch.empty(M, N, device=x8.device, dtype=torch.bfloat16)
        workspace = torch.empty(max(1, self.lib.qd_w4a8_workspace(M, N, K)), device=x8.device, dtype=torch.uint8)

        def call():
            rc = self.lib.qd_w4a8_gemm(codes.data_ptr(), tables.data_ptr(), x8.data_ptr(), out.data_ptr(), M, N, K,
                                       alpha, workspace.data_ptr(), torch.cuda.current_stream().cuda_stream)
            if rc:
                raise RuntimeError(f"CUTLASS GEMM failed ({rc}) at M={M} N={N} K={K}")
            return out
        return call


def random_operands(lib: LookupGemm, M: int, N: int, K: int):
    """fp8 activations ``[M, K]``, reordered codes, tables and the exact weight float32 ``[N, K]``."""
    q = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
    scales = torch.rand(N, K // GROUP, device="cuda") * 0.02 + 0.01
    tables = lookup_tables(scales)
    codes = unified_codes(q)
    x8 = (torch.randn(M, K, device="cuda") * 4).to(torch.float8_e4m3fn)
    return x8, lib.reorder(codes), tables, decoded_weight(codes, tables)


def measure(lib: LookupGemm, M: int, N: int, K: int) -> dict:
    x8, codes, tables, weight = random_operands(lib, M, N, K)
    out = lib.gemm(x8, codes, tables)()
    exact = x8.float() @ weight.T
    rel_err = float((out.float() - exact).norm() / exact.norm())

    def lookup():
        ops = random_operands(lib, M, N, K)
        return lib.gemm(*ops[:3])

    def expansion_then_gemm():
        m = L.random_module(N, K, execution="fp8")
        x = x8.clone()
        sx = torch.ones(M, 1, device="cuda")
        return lambda: torch._scaled_mm(x, gluon_expansion(m).T, scale_a=sx, scale_b=m.fp8_wscale[None, :].float(),
                                        out_dtype=torch.bfloat16, use_fast_accum=True)
    make_fast, nbytes = L.v_scaled_mm(M, N, K, fast_accum=True)
    make_accurate, _ = L.v_scaled_mm(M, N, K, fast_accum=False)
    row = dict(M=M, N=N, K=K, rel_err=rel_err,
               lookup_us=L.time_graph(lookup, M * K + N * K * 0.53 + 2 * M * N),
               cublas_fast_us=L.time_graph(make_fast, nbytes), cublas_us=L.time_graph(make_accurate, nbytes),
               expansion_cublas_us=L.time_graph(expansion_then_gemm, M * K + 2.5 * N * K + 2 * M * N))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", default=os.environ.get("QUANTDUO_W4A8_LUT", DEFAULT_LIB))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK layers")
    parser.add_argument("--out", default=".", help="directory of w4a8_lut.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    lib = LookupGemm(args.lib)
    rows = []
    print("| M | N x K | lookup GEMM us | cuBLAS fp8 fast-accum us | lookup / cuBLAS | cuBLAS fp8 us | "
          "expansion + cuBLAS us | rel. err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for M in args.tokens:
        for shape in args.shapes:
            N, K = map(int, shape.split("x"))
            r = measure(lib, M, N, K)
            rows.append(r)
            print(f"| {M} | {N}x{K} | {r['lookup_us']:.1f} | {r['cublas_fast_us']:.1f} | "
                  f"{r['lookup_us'] / r['cublas_fast_us']:.3f} | {r['cublas_us']:.1f} | {r['expansion_cublas_us']:.1f} | "
                  f"{r['rel_err']:.1e} |", flush=True)
    atomic_write(os.path.join(args.out, "w4a8_lut.json"), lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
