#!/usr/bin/env bash
# Build the CUTLASS INT4-weight GEMM experiments (csrc/w4a8_lut/w4a8_lut.cu: INT4 x fp8 with lookup tables, INT4 x
# bf16) for sm_90a into a plain shared library that benchmarks/w4a8_lut.py loads with ctypes (no torch headers, no GPU
# needed to build), with the CUDA 13.0 compiler of scripts/build_fa3.sh's toolchain.
#
#   scripts/build_w4a8_lut.sh [OUT_DIR]
#
# (default build/w4a8_lut; then QUANTDUO_CUTLASS_LIB=OUT_DIR/libqd_w4a8_lut.so turns on the a16 path that uses it)
#
# Environment:
#   CUTLASS_DIR  a CUTLASS checkout with include/ and tools/util/include/ (default: the one inside build_fa3.sh's
#                flash-attention tree, commit 7127592)
#   TOOLCHAIN    the unpacked CUDA wheels of build_fa3.sh (default build/fa3-work/toolchain)
set -euo pipefail

OUT=${1:-build/w4a8_lut}
CUTLASS_DIR=${CUTLASS_DIR:-build/fa3-work/flash-attention/csrc/cutlass}
TOOLCHAIN=${TOOLCHAIN:-build/fa3-work/toolchain}
NVCC=$TOOLCHAIN/nvidia/cu13/bin/nvcc
[ -x "$NVCC" ] || { echo "no nvcc at $NVCC: run scripts/build_fa3.sh first (it unpacks the CUDA wheels)" >&2; exit 1; }
[ -d "$CUTLASS_DIR/include/cute" ] && [ -d "$CUTLASS_DIR/tools/util/include" ] || {
  echo "CUTLASS_DIR=$CUTLASS_DIR lacks include/cute or tools/util/include" >&2; exit 1; }
if [ ! -f "$TOOLCHAIN/nvidia/cu13/include/curand_kernel.h" ]; then  # CUTLASS's util headers include it
  echo "== cuRAND headers from PyPI"
  WHEELS=$(mktemp -d)
  pip download -q --no-deps -d "$WHEELS" nvidia-curand==10.4.5.25
  unzip -q -o "$WHEELS"/nvidia_curand-*.whl 'nvidia/cu13/include/*' -d "$TOOLCHAIN"
  rm -rf "$WHEELS"
fi
mkdir -p "$OUT"
echo "== compiling (a few minutes on two cores)"
"$NVCC" -O3 -std=c++17 -DNDEBUG -DCUTLASS_DEBUG_TRACE_LEVEL=0 -gencode arch=compute_90a,code=sm_90a \
  --expt-relaxed-constexpr -Xcompiler -fPIC -shared -cudart shared \
  -I"$CUTLASS_DIR/include" -I"$CUTLASS_DIR/tools/util/include" -I"$TOOLCHAIN/nvidia/cu13/include" \
  -L"$TOOLCHAIN/nvidia/cu13/lib" csrc/w4a8_lut/w4a8_lut.cu -o "$OUT/libqd_w4a8_lut.so.tmp"
mv "$OUT/libqd_w4a8_lut.so.tmp" "$OUT/libqd_w4a8_lut.so"
echo "== built $OUT/libqd_w4a8_lut.so"
