// INT4-weight GEMMs on Hopper through CUTLASS's mixed-input mainloop (the int4 weights in registers, TMA +
// warp-specialized wgmma), as a plain C ABI library (no torch headers): benchmarks/w4a8_lut.py loads it with ctypes
// and passes device pointers and the current stream. Built by scripts/build_w4a8_lut.sh for sm_90a. Experiments, not
// executions:
// * qd_w4a8_*: INT4 x fp8 in the lookup-table mode (one 8-entry table of e4m3 values per row and group). The
//   mainloop needs groups of at least 128 inputs for fp8 (its tile K, four 32-deep MMAs, must divide the group);
//   SVDQuant's are 64, so it times what the mainloop reaches with groups of 128.
// * qd_w4a16_*: INT4 x bf16 with bf16 scales per 64 inputs (convert, then scale: 16-deep MMAs, tile K 64), the
//   weight-only GEMM that 16-256 tokens would need, with 64 tokens per tile and stream-K (few tokens) or 128, on
//   codes in the mainloop's order or in the plain [N, K] packing quantduo stores (no second copy of the weights).
//
//   out[m, n] = alpha * sum_k x[m, k] * lut[n, k / 128][code[n, k]]        (bf16 out, float32 accumulation
//                                                                          with Hopper's fast fp8 accumulation)
//
// x: float8_e4m3fn [M, K] row-major; codes: [N, K] int4 in CUTLASS's unified encoding (positive v stored as 8 - v,
// zero and negatives two's complement), reordered by qd_w4a8_reorder; lut: [N, K / 128] x 8 bytes, entry i the e4m3
// value of scale * (i - 8); out: bf16 [M, N] row-major. The kernel runs the swapped problem (weights as the
// register operand A, tokens as B), so its D [N, M] column-major is out [M, N] row-major.
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"

using namespace cute;

namespace {

constexpr int kGroup = 128;  // the mixed-input mainloop needs group % tile K == 0 and tile K >= 128 for fp8
using Fp8 = cutlass::float_e4m3_t;
using Int4 = cutlass::int4b_t;
using Table = cutlass::Array<Fp8, 8>;
using Out = cutlass::bfloat16_t;

// the weights [N, K] K-major (CUTLASS's "transposed B" of the swapped problem), the activations [K, M] column-major
using LayoutW = cutlass::layout::RowMajor;
using LayoutX = cutlass::layout::ColumnMajor;
using LayoutOut = cutlass::layout::ColumnMajor;  // D [N, M] column-major == out [M, N] row-major
using StrideW = cutlass::detail::TagToStrideA_t<LayoutW>;
using ReorderAtom = decltype(cutlass::compute_memory_reordering_atom<Fp8>());
using LayoutWReordered = decltype(cute::tile_to_shape(ReorderAtom{}, Layout<Shape<int, int, int>, StrideW>{}));

using TileShape = Shape<_128, _128, Int<kGroup>>;  // the mainloop reads one table per tile of K (>= 4 fp8 MMAs: 128)
using ClusterShape = Shape<_1, _1, _1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, LayoutOut, 8, Out, LayoutOut, 8,
    cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    cute::tuple<Int4, Table>, LayoutWReordered, 32,
    Fp8, LayoutX, 16,
    float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

Gemm::Arguments arguments(const void* codes, const void* lut, const void* x, void* out, int M, int N, int K,
                          float alpha) {
  auto shape_w = cute::make_shape(N, K, 1);
  auto layout_w = cute::tile_to_shape(ReorderAtom{}, shape_w);
  auto stride_x = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(M, K, 1));
  auto stride_s = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{}, cute::make_shape(N, K / kGroup, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(N, M, 1));
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {N, M, K, 1},
      {static_cast<const Int4*>(codes), layout_w, static_cast<const Fp8*>(x), stride_x,
       static_cast<const Table*>(lut), stride_s, kGroup},
      {{alpha, 0.0f}, nullptr, stride_d, static_cast<Out*>(out), stride_d}};
  return args;
}


// ---- INT4 x bf16, bf16 scales per 64 inputs ------------------------------------------------------------------------
//   out[m, n] = sum_k x[m, k] * bf16(q[n, k] * scale[k / 64, n])     (bf16 x, two's-complement codes [N, K]
//                                                                      reordered by qd_w4a16_reorder, scales bf16
//                                                                      [K / 64, N], bf16 out [M, N])
using Bf16 = cutlass::bfloat16_t;
constexpr int kGroup16 = 64;
using ShuffleAtom16 = decltype(cutlass::compute_memory_reordering_atom<
    Bf16, Layout<Shape<_1, _1>>, Layout<Shape<_2, _4>, Stride<_4, _1>>>());  // values 0,2,4,6,1,3,5,7 per 8
using LayoutW16 = decltype(cute::tile_to_shape(ShuffleAtom16{}, Layout<Shape<int, int, int>, StrideW>{}));

// Shuffled: the codes in the mainloop's order (qd_w4a16_reorder), else the plain [N, K] K-major packing
template <int TokensTile, class Scheduler, bool Shuffled>
struct W4A16 {
  using Tile = Shape<_128, Int<TokensTile>, Int<kGroup16>>;
  using WeightLayout = cute::conditional_t<Shuffled, LayoutW16, LayoutW>;
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutOut, 8, Out, LayoutOut, 8,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Int4, Bf16>, WeightLayout, 32,
      Bf16, LayoutX, 8,
      float, Tile, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kern = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi, Scheduler>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kern>;

  static typename Op::Arguments arguments(const void* codes, const void* scales, const void* x, void* out, int M,
                                          int N, int K) {
    auto shape_w = cute::make_shape(N, K, 1);
    auto layout_w = [&] {
      if constexpr (Shuffled) return cute::tile_to_shape(ShuffleAtom16{}, shape_w);
      else return cutlass::make_cute_packed_stride(StrideW{}, shape_w);
    }();
    auto stride_x = cutlass::make_cute_packed_stride(typename Kern::StrideB{}, cute::make_shape(M, K, 1));
    auto stride_s = cutlass::make_cute_packed_stride(typename Main::StrideScale{},
                                                     cute::make_shape(N, K / kGroup16, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kern::StrideD{}, cute::make_shape(N, M, 1));
    typename Op::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {N, M, K, 1},
        {static_cast<const Int4*>(codes), layout_w, static_cast<const Bf16*>(x), stride_x,
         static_cast<const Bf16*>(scales), stride_s, kGroup16},
        {{1.0f, 0.0f}, nullptr, stride_d, static_cast<Out*>(out), stride_d}};
    return args;
  }

  static size_t workspace(int M, int N, int K) {
    return Op::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, M, N, K));
  }

  static int run(const void* codes, const void* scales, const void* x, void* out, int M, int N, int K,
                 void* ws, cudaStream_t stream) {
    Op gemm;
    auto args = arguments(codes, scales, x, out, M, N, K);
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 2;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 2;
  }
};

template <bool Shuffled>
size_t w4a16_workspace(int M, int N, int K, int tokens_tile) {
  return tokens_tile == 64 ? W4A16<64, cutlass::gemm::StreamKScheduler, Shuffled>::workspace(M, N, K)
                           : W4A16<128, void, Shuffled>::workspace(M, N, K);
}

template <bool Shuffled>
int w4a16_run(const void* codes, const void* scales, const void* x, void* out, int M, int N, int K, int tokens_tile,
              void* ws, cudaStream_t stream) {
  if (tokens_tile == 64)
    return W4A16<64, cutlass::gemm::StreamKScheduler, Shuffled>::run(codes, scales, x, out, M, N, K, ws, stream);
  if (tokens_tile == 128) return W4A16<128, void, Shuffled>::run(codes, scales, x, out, M, N, K, ws, stream);
  return 1;
}

}  // namespace

extern "C" {

// Bytes of workspace the GEMM needs for this problem (pass a device buffer at least this large to qd_w4a8_gemm).
size_t qd_w4a8_workspace(int M, int N, int K) {
  return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, M, N, K, 1.0f));
}

// 0 on success, 1 when CUTLASS cannot run the problem (K % 128, alignment), 2 when initialization or launch fails.
int qd_w4a8_gemm(const void* codes, const void* lut, const void* x, void* out, int M, int N, int K, float alpha,
                 void* workspace, cudaStream_t stream) {
  Gemm gemm;
  auto args = arguments(codes, lut, x, out, M, N, K, alpha);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
  return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 2;
}

// Reorder unified-encoded int4 codes [N, K] (K-major) into the layout the mainloop reads (each thread's values
// contiguous): src and dst distinct device buffers of N * K / 2 bytes.
int qd_w4a8_reorder(const void* src, void* dst, int N, int K, cudaStream_t stream) {
  auto shape_w = cute::make_shape(N, K, 1);
  auto layout_src = cute::make_layout(shape_w, cutlass::make_cute_packed_stride(StrideW{}, shape_w));
  auto layout_dst = cute::tile_to_shape(ReorderAtom{}, shape_w);
  cutlass::reorder_tensor(static_cast<const Int4*>(src), layout_src, static_cast<Int4*>(dst), layout_dst);
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

// The INT4 x bf16 GEMM; tokens_tile 64 (stream-K, for few tokens) or 128; shuffled: codes from qd_w4a16_reorder,
// else the plain packing. Returns as qd_w4a8_gemm.
size_t qd_w4a16_workspace(int M, int N, int K, int tokens_tile, int shuffled) {
  return shuffled ? w4a16_workspace<true>(M, N, K, tokens_tile) : w4a16_workspace<false>(M, N, K, tokens_tile);
}

int qd_w4a16_gemm(const void* codes, const void* scales, const void* x, void* out, int M, int N, int K,
                  int tokens_tile, int shuffled, void* workspace, cudaStream_t stream) {
  return shuffled ? w4a16_run<true>(codes, scales, x, out, M, N, K, tokens_tile, workspace, stream)
                  : w4a16_run<false>(codes, scales, x, out, M, N, K, tokens_tile, workspace, stream);
}

// Reorder two's-complement int4 codes [N, K] (K-major) into the bf16 mainloop's layout (its value shuffle included).
int qd_w4a16_reorder(const void* src, void* dst, int N, int K, cudaStream_t stream) {
  auto shape_w = cute::make_shape(N, K, 1);
  auto layout_src = cute::make_layout(shape_w, cutlass::make_cute_packed_stride(StrideW{}, shape_w));
  auto layout_dst = cute::tile_to_shape(ShuffleAtom16{}, shape_w);
  cutlass::reorder_tensor(static_cast<const Int4*>(src), layout_src, static_cast<Int4*>(dst), layout_dst);
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

}
