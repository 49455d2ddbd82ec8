#!/usr/bin/env bash
# Build FlashAttention-3's Hopper forward kernels (head dim 128; bf16 and fp8 e4m3 inputs) into a folder that
# Python imports as `flash_attn_3` / `flash_attn_interface`, on any x86-64 Linux machine (no GPU needed), with the
# CUDA 13.0 compiler from PyPI wheels. See docs/fa3.md.
#
#   scripts/build_fa3.sh [OUT_DIR]          (default build/fa3site; then PYTHONPATH=OUT_DIR)
#
# Environment:
#   FA_DIR     a flash-attention checkout with csrc/cutlass populated (default: cloned at FA_COMMIT into WORK)
#   WORK       scratch folder (default build/fa3-work)
#   WHEELS     where the CUDA / torch wheels are downloaded or already lie (default WORK/wheels)
#   TORCH_VERSION  the torch (>= 2.9, CUDA 13.0 build) whose headers and libraries the extension builds against
#              (default: the installed torch's version); the extension uses torch's stable ABI, so it loads in any
#              torch >= 2.9 with CUDA 13 and any Python >= 3.9
set -euo pipefail

OUT=${1:-build/fa3site}
WORK=${WORK:-build/fa3-work}
WHEELS=${WHEELS:-$WORK/wheels}
FA_COMMIT=0251105a2fb19d2957484b7f023cd8c115286ced  # flash-attention main, 2026-08-15 (cutlass 7127592)
TORCH_VERSION=${TORCH_VERSION:-$(python3 -c "import torch; print(torch.__version__.split('+')[0])")}
JOBS=${JOBS:-2}
mkdir -p "$WORK" "$WHEELS" "$OUT/flash_attn_3"
WORK=$(cd "$WORK" && pwd); OUT=$(cd "$OUT" && pwd); WHEELS=$(cd "$WHEELS" && pwd)

if [ -z "${FA_DIR:-}" ]; then
  FA_DIR=$WORK/flash-attention
  if [ ! -d "$FA_DIR" ]; then
    git clone --filter=blob:none https://github.com/Dao-AILab/flash-attention "$FA_DIR"
    git -C "$FA_DIR" checkout -q $FA_COMMIT
    git -C "$FA_DIR" submodule update --init csrc/cutlass
  fi
fi
HOPPER=$FA_DIR/hopper
CUTLASS=$FA_DIR/csrc/cutlass/include
[ -f "$HOPPER/flash_api_stable.cpp" ] && [ -d "$CUTLASS/cute" ] || { echo "FA_DIR=$FA_DIR lacks hopper/ or csrc/cutlass" >&2; exit 1; }

echo "== CUDA 13.0 compiler and torch $TORCH_VERSION (cu130) headers from PyPI wheels"
pip download -q --no-deps -d "$WHEELS" --find-links "$WHEELS" nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
pip download -q --no-deps -d "$WHEELS" --find-links "$WHEELS" --only-binary=:all: "torch==$TORCH_VERSION"
TC=$WORK/toolchain
if [ ! -x "$TC/nvidia/cu13/bin/nvcc" ]; then
  mkdir -p "$TC"
  for w in "$WHEELS"/nvidia_*.whl; do unzip -q -o "$w" -d "$TC"; done
  ln -sf libcudart.so.13 "$TC/nvidia/cu13/lib/libcudart.so"
fi
if [ ! -f "$TC/torch/version.py" ]; then
  unzip -q -o "$(ls "$WHEELS"/torch-"$TORCH_VERSION"-*.whl | head -1)" 'torch/include/*' 'torch/lib/libc10*.so' \
    'torch/lib/libtorch*.so' 'torch/version.py' -d "$TC"
fi
grep -q "cuda.*'13" "$TC/torch/version.py" || { echo "torch $TORCH_VERSION on PyPI is not a CUDA 13 build" >&2; exit 1; }
export PATH=$TC/nvidia/cu13/bin:$PATH

# Only what a DiT needs: forward, head dim 128, bf16 / e4m3, no split-KV, paging, local, softcap, GQA packing, varlen.
DISABLED="BACKWARD PAGEDKV SPLIT APPENDKV LOCAL SOFTCAP PACKGQA FP16 VARLEN CLUSTER HDIM64 HDIM96 HDIM192 HDIM256 SM8x
          HDIMDIFF64 HDIMDIFF192"
FEATURES=""
for f in $DISABLED; do FEATURES="$FEATURES -DFLASHATTENTION_DISABLE_$f"; done
INCLUDES="-I$HOPPER -I$CUTLASS"
NVCC_FLAGS="-O3 -std=c++17 --use_fast_math -lineinfo -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
  -DCUTLASS_ENABLE_GDC_FOR_SM90 -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG -gencode arch=compute_90a,code=sm_90a
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options -fPIC -D_GLIBCXX_USE_CXX11_ABI=1"
NVCC_FLAGS=$(echo $NVCC_FLAGS)  # one line: xargs hands it to sh -c
OBJ=$WORK/obj; mkdir -p "$OBJ"

echo "== compiling (about 75 s and 4.5 GB per kernel file, $JOBS at a time)"
printf '%s\n' instantiations/flash_fwd_hdim128_e4m3_sm90.cu instantiations/flash_fwd_hdim128_bf16_sm90.cu \
  flash_prepare_scheduler.cu |
  xargs -P "$JOBS" -I{} sh -c "nvcc $NVCC_FLAGS $FEATURES $INCLUDES -c $HOPPER/{} -o $OBJ/\$(basename {} .cu).o"
PY_INCLUDE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
g++ -O3 -std=c++17 -fPIC -DPy_LIMITED_API=0x03090000 -DTORCH_TARGET_VERSION=0x0209000000000000 \
  -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C $FEATURES $INCLUDES -I"$TC/torch/include" \
  -I"$TC/torch/include/torch/csrc/api/include" -I"$PY_INCLUDE" -I"$TC/nvidia/cu13/include" -w \
  -c "$HOPPER/flash_api_stable.cpp" -o "$OBJ/flash_api_stable.o"
g++ -shared -o "$OUT/flash_attn_3/_C.abi3.so" "$OBJ"/*.o -L"$TC/torch/lib" -L"$TC/nvidia/cu13/lib" \
  -lc10 -ltorch -ltorch_cpu -lc10_cuda -ltorch_cuda -lcudart

echo "== the Python package"
cp "$HOPPER/flash_attn_interface.py" "$OUT/"
cp "$HOPPER/flash_attn_3/__init__.py" "$HOPPER/flash_attn_3/flash_attn_interface.py" "$OUT/flash_attn_3/"
python3 - "$OUT" "$DISABLED" <<'EOF'
import pathlib, sys
out, disabled = pathlib.Path(sys.argv[1]), sys.argv[2].split()
names = ["BACKWARD", "SPLIT", "PAGEDKV", "APPENDKV", "LOCAL", "SOFTCAP", "PACKGQA", "FP16", "FP8", "VARLEN", "CLUSTER",
         "HDIM64", "HDIM96", "HDIM128", "HDIM192", "HDIM256", "SM8x"]
flags = {f"FLASHATTENTION_DISABLE_{n}": n in disabled for n in names}
flags.update({f"FLASH_ATTENTION_DISABLE_{n}": n in disabled for n in ("HDIMDIFF64", "HDIMDIFF192")})
flags["FLASHATTENTION_ENABLE_VCOLMAJOR"] = False
(out / "flash_attn_config.py").write_text(f"CONFIG = {{'build_flags': {flags!r}}}\n")
info = out / "flash_attn_3-3.0.0+quantduo.dist-info"  # lets diffusers' backend check find the package
info.mkdir(exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: flash_attn_3\nVersion: 3.0.0+quantduo\n")
(info / "top_level.txt").write_text("flash_attn_3\nflash_attn_interface\nflash_attn_config\n")
EOF
echo "built $OUT (use: PYTHONPATH=$OUT)"
