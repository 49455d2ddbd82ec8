"""CUTLASS's mixed-input Hopper GEMMs (``csrc/w4a8_lut``) at FLUX shapes: what a library mainloop that reads INT4
weights reaches on Hopper (docs/kernel-notes.md, item 75). Two tables:

* many tokens (``--tokens``, default 4096): the INT4 x fp8 lookup-table GEMM against cuBLAS's fp8 GEMM and the
  expansion + fp8 GEMM path. The library kernel needs groups of at least 128 inputs with fp8 (SVDQuant's are 64), so
  this times its mainloop with groups of 128 and no low-rank branch: an upper bound for a group-64 variant.
* few tokens (``--few``, default 16-256): the INT4 x bf16 GEMM (bf16 scales per 64, tiles of 64 tokens with
  stream-K, or 128) against bf16 ``F.linear`` and quantduo's own layers (weight-only ``w4a16``; ``a16`` and ``fp8``
  with the rank-32 branch and smoothing, without the library), and quantduo's ``a16`` layer on the library GEMM
  (what its dispatch takes at 65-256 tokens while ``QUANTDUO_CUTLASS_LIB`` names the library).

    scripts/build_w4a8_lut.sh                      (any x86-64 machine, no GPU; after scripts/build_fa3.sh's toolchain)
    PYTHONPATH=. python3 benchmarks/w4a8_lut.py [--lib build/w4a8_lut/libqd_w4a8_lut.so] [--tokens 4096]
        [--few 16 32 64 128 256] [--out DIR]

Writes ``w4a8_lut.json`` to DIR: per shape and token count the median us of each path (CUDA-graph replays over
buffers past L2) and each library GEMM's relative error against its exact float32 product.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linear as L  # noqa: E402  (benchmarks/linear.py: random layers, time_graph, v_scaled_mm)
from expand_w4 import gluon_expansion  # noqa: E402

from quantduo.engine import linear as engine  # noqa: E402
from quantduo.engine.linear import a16_reference_forward  # noqa: E402
from quantduo.formats import quantizers as qz  # noqa: E402
from quantduo.kernels import w4a16_cutlass  # noqa: E402
from quantduo.utils import atomic_write  # noqa: E402

GROUP = 128
SHAPES = ("3072x3072", "9216x3072", "12288x3072", "3072x12288", "3072x15360")
DEFAULT_LIB = "build/w4a8_lut/libqd_w4a8_lut.so"


def unified_codes(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` in [-8, 7] -> uint8 ``[N, K / 2]`` in CUTLASS's unified encoding (element ``2j`` in the low
    nibble of byte ``j``): a positive ``v`` is stored as ``8 - v`` (the low three bits of ``-v``), zero and the
    negatives as two's complement, so the low three bits index a table and bit 3 says which sign."""
    return qz.pack_nibbles(torch.where(q > 0, 8 - q, q))


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
    """ctypes binding of the lookup-table GEMM and the reorders of ``libqd_w4a8_lut.so`` (its INT4 x bf16 GEMM runs
    through :mod:`quantduo.kernels.w4a16_cutlass`, which this points at the same file): device pointers and the
    current stream."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.qd_w4a8_workspace.restype = ctypes.c_size_t
        self.lib.qd_w4a8_workspace.argtypes = [ctypes.c_int] * 3
        self.lib.qd_w4a8_gemm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3 + [ctypes.c_float] + \
            [ctypes.c_void_p] * 2
        for name in ("qd_w4a8_reorder", "qd_w4a16_reorder"):
            getattr(self.lib, name).argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [ctypes.c_void_p]
        os.environ[w4a16_cutlass.LIBRARY_ENV] = path  # for the bf16 GEMM and the layers made while it is set
        w4a16_cutlass._library.cache_clear()

    def reorder(self, codes: torch.Tensor, fp8: bool = True) -> torch.Tensor:
        """Codes ``[N, K / 2]`` (unified for fp8, two's complement for bf16) -> that mainloop's layout (same size);
        synchronizes the device."""
        out = torch.empty_like(codes)
        fn = self.lib.qd_w4a8_reorder if fp8 else self.lib.qd_w4a16_reorder
        rc = fn(codes.data_ptr(), out.data_ptr(), codes.shape[0], 2 * codes.shape[1],
                torch.cuda.current_stream().cuda_stream)
        if rc:
            raise RuntimeError(f"reorder failed ({rc})")
        return out

    @staticmethod
    def gemm_w4a16(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, tokens_tile: int,
                   shuffled: bool = True):
        """Returns a call of :func:`quantduo.kernels.w4a16_cutlass.w4a16_gemm` with these operands (codes reordered
        by :meth:`reorder` where ``shuffled``, else the plain packing; scales bf16 ``[K / 64, N]``)."""
        return lambda: w4a16_cutlass.w4a16_gemm(x, codes, scales, tokens_tile, shuffled)

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


def random_operands(lib: LookupGemm, M: int, N: int, K: int, exact: bool = True):
    """fp8 activations ``[M, K]``, reordered codes, tables and the exact weight float32 ``[N, K]`` (None unless
    ``exact``)."""
    q = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
    scales = torch.rand(N, K // GROUP, device="cuda") * 0.02 + 0.01
    tables = lookup_tables(scales)
    codes = unified_codes(q)
    x8 = (torch.randn(M, K, device="cuda") * 4).to(torch.float8_e4m3fn)
    return x8, lib.reorder(codes), tables, decoded_weight(codes, tables) if exact else None


def w4a16_operands(lib: LookupGemm, M: int, N: int, K: int, shuffled: bool = True, exact: bool = True):
    """bf16 activations ``[M, K]``, two's-complement codes (reordered where ``shuffled``, else the plain packing),
    scales bf16 ``[K / 64, N]`` and the exact weight float32 ``[N, K]`` (``bf16(q * scale)``, what the
    convert-then-scale mainloop multiplies by; None unless ``exact``)."""
    q = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
    scales = (torch.rand(K // 64, N, device="cuda") * 0.02 + 0.01).to(torch.bfloat16)
    codes = qz.pack_int4(q)
    weight = (q.float() * scales.float().T.repeat_interleave(64, dim=1)).to(torch.bfloat16).float() if exact else None
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    return x, lib.reorder(codes, fp8=False) if shuffled else codes, scales, weight


@contextlib.contextmanager
def library_off():
    """Layers made inside keep no ``library_scales``, so they run quantduo's own paths (the baselines)."""
    saved = os.environ.pop(w4a16_cutlass.LIBRARY_ENV, None)
    w4a16_cutlass._library.cache_clear()
    try:
        yield
    finally:
        if saved is not None:
            os.environ[w4a16_cutlass.LIBRARY_ENV] = saved
        w4a16_cutlass._library.cache_clear()


def library_a16_layer(m):
    """quantduo's ``a16`` layer ``m`` (made while the library is named) on the library GEMM at any token count:
    the engine's :func:`~quantduo.engine.linear._library_a16` (which its dispatch takes at 65-256 tokens). Returns
    ``x [M, K] -> [M, N]``."""
    return lambda x: engine._library_a16(m, x, m.bias_a16)


def measure_few(lib: LookupGemm, M: int, N: int, K: int) -> dict:
    """The INT4 x bf16 GEMM at ``M`` tokens against bf16 ``F.linear`` and quantduo's layers, alone and as the weight
    GEMM of quantduo's ``a16`` layer (:func:`library_a16_layer`, checked against the layer's reference)."""
    row = dict(M=M, N=N, K=K)
    for shuffled in (True, False):
        x, codes, scales, weight = w4a16_operands(lib, M, N, K, shuffled)
        exact = x.float() @ weight.T
        for tile in (64, 128):
            name = f"tile{tile}" + ("" if shuffled else "_plain")
            out = lib.gemm_w4a16(x, codes, scales, tile, shuffled)()
            row[f"rel_err_{name}"] = float((out.float() - exact).norm() / exact.norm())

            def library(tile=tile, shuffled=shuffled):
                ops = w4a16_operands(lib, M, N, K, shuffled, exact=False)
                return lib.gemm_w4a16(*ops[:3], tile, shuffled)
            row[f"w4a16_{name}_us"] = L.time_graph(library, 2 * M * K + N * K * 0.53 + 2 * M * N)
    m = L.random_module(N, K, execution="a16")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    expected = a16_reference_forward(m, x).float()
    got = library_a16_layer(m)(x).float()
    row["layer_rel_err"] = float((got - expected).norm() / expected.norm())

    def layer():
        forward = library_a16_layer(L.random_module(N, K, execution="a16"))
        xi = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        return lambda: forward(xi)
    row["library_a16_layer_us"] = L.time_graph(layer, 2 * M * K + N * K * 0.53 + 2 * M * N)
    make, nbytes = L.v_bf16(M, N, K)
    row["bf16_us"] = L.time_graph(make, nbytes)
    with library_off():
        for kind in ("w4a16", "a16", "fp8"):
            make, nbytes = L.v_module(M, N, K, kind)
            row[f"quantduo_{kind}_us"] = L.time_graph(make, nbytes)
    return row


def measure(lib: LookupGemm, M: int, N: int, K: int) -> dict:
    """The INT4 x fp8 lookup GEMM at ``M`` tokens (checked against its exact product) against cuBLAS's fp8 GEMM with
    fast and with exact accumulation, and against the Gluon expansion + cuBLAS of a quantduo fp8 layer."""
    x8, codes, tables, weight = random_operands(lib, M, N, K)
    out = lib.gemm(x8, codes, tables)()
    exact = x8.float() @ weight.T
    rel_err = float((out.float() - exact).norm() / exact.norm())

    def lookup():
        ops = random_operands(lib, M, N, K, exact=False)
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


MANY_HEADER = ("M", "N x K", "lookup GEMM us", "cuBLAS fp8 fast-accum us", "lookup / cuBLAS", "cuBLAS fp8 us",
               "expansion + cuBLAS us", "rel. err")
FEW_HEADER = ("M", "N x K", "bf16 us", "CUTLASS W4A16 tile 64 / 128 us (x of bf16), shuffled codes", "plain codes",
              "a16 layer on it (plain) us (x of bf16), rel. err vs reference",
              "quantduo w4a16 / a16 / fp8 us (x of bf16)", "GEMM rel. err (max)")


def many_line(r: dict) -> list[str]:
    return [f"{r['lookup_us']:.1f}", f"{r['cublas_fast_us']:.1f}", f"{r['lookup_us'] / r['cublas_fast_us']:.3f}",
            f"{r['cublas_us']:.1f}", f"{r['expansion_cublas_us']:.1f}", f"{r['rel_err']:.1e}"]


def few_line(r: dict) -> list[str]:
    x = lambda key: f"{r[key]:.1f} ({r['bf16_us'] / r[key]:.2f}x)"  # noqa: E731
    return [f"{r['bf16_us']:.1f}", f"{x('w4a16_tile64_us')} / {x('w4a16_tile128_us')}",
            f"{x('w4a16_tile64_plain_us')} / {x('w4a16_tile128_plain_us')}",
            f"{x('library_a16_layer_us')}, {r['layer_rel_err']:.1e}",
            f"{x('quantduo_w4a16_us')} / {x('quantduo_a16_us')} / {x('quantduo_fp8_us')}",
            f"{max(v for k, v in r.items() if k.startswith('rel_err_')):.1e}"]


def table(lib: LookupGemm, measure_one, tokens: list[int], shapes: list[str], header, line) -> list[dict]:
    """Prints a markdown table of ``measure_one(lib, M, N, K)`` rows (``line`` formats the cells after M and N x K)
    and returns the rows."""
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    rows = []
    for M in tokens:
        for shape in shapes:
            N, K = map(int, shape.split("x"))
            rows.append(measure_one(lib, M, N, K))
            print(f"| {M} | {N}x{K} | " + " | ".join(line(rows[-1])) + " |", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", default=os.environ.get(w4a16_cutlass.LIBRARY_ENV, DEFAULT_LIB))
    parser.add_argument("--tokens", type=int, nargs="*", default=[4096], help="token counts of the fp8 table")
    parser.add_argument("--few", type=int, nargs="*", default=[16, 32, 64, 128, 256],
                        help="token counts of the INT4 x bf16 table")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="NxK layers")
    parser.add_argument("--out", default=".", help="directory of w4a8_lut.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    lib = LookupGemm(args.lib)
    many = table(lib, measure, args.tokens, args.shapes, MANY_HEADER, many_line)
    few = table(lib, measure_few, args.few, args.shapes, FEW_HEADER, few_line)
    atomic_write(os.path.join(args.out, "w4a8_lut.json"),
                 lambda tmp: Path(tmp).write_text(json.dumps(dict(many=many, few=few), indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
