"""Compiling a Gluon kernel for Hopper without a GPU (Gluon has no interpreter: CPU tests compile and read the PTX)."""
from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource


def compile_for_hopper(fn, pointers: dict, divisible: tuple, num_warps: int, **constexprs):
    """``fn`` compiled for sm_90a: ``pointers`` maps argument names to pointer types (16-byte aligned), the integer
    arguments named in ``divisible`` are specialized as multiples of 16 (as FLUX shapes launch them), the rest are
    int32 or the given constexprs."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "i32")
        if name in pointers or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = GluonASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
