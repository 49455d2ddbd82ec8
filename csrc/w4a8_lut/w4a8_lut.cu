// INT4-weight GEMMs on Hopper through CUTLASS's mixed-input mainloop (the int4 weights converted in registers, TMA +
// warp-specialized wgmma, the swapped problem: weights as the register operand A, tokens as B, so the kernel's
// D [N, M] column-major is out [M, N] row-major), as a plain C ABI library (no torch headers) loaded with ctypes.
// Built by scripts/build_w4a8_lut.sh for sm_90a.
// * qd_w4a16_*: INT4 x bf16 with bf16 scales per 64 inputs (convert, then scale; 16-deep MMAs, tile K 64): 64 tokens
//   per tile with stream-K (few tokens) or 128, on codes in the plain [N, K] packing quantduo stores (what
//   quantduo/kernels/w4a16_cutlass.py runs) or reordered by qd_w4a16_reorder (benchmarks/w4a8_lut.py times both).
//     out[m, n] = sum_k x[m, k] * bf16(q[n, k] * scale[k / 64, n])     x bf16 [M, K], scales bf16 [K / 64, N]
// * qd_w4a8_*: INT4 x fp8 in the lookup-table mode, an experiment (benchmarks/w4a8_lut.py): the mainloop needs
//   groups of at least 128 inputs for fp8 (its tile K, four 32-deep MMAs, must divide the group); SVDQuant's are 64.
//     out[m, n] = alpha * sum_k x[m, k] * lut[n, k / 128][code[n, k]]  x float8_e4m3fn [M, K]
//   codes in CUTLASS's unified encoding (positive v stored as 8 - v, zero and negatives two's complement),
//   reordered by qd_w4a8_reorder; lut [N, K / 128] x 8 bytes, entry i the e4m3 value of scale * (i - 8); float32
//   accumulation with Hopper's fast fp8 accumulation.
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

using Fp8 = cutlass::float_e4m3_t;
using Bf16 = cutlass::bfloat16_t;
using Int4 = cutlass::int4b_t;
using Table = cutlass::Array<Fp8, 8>;  // the lookup mode's scale type: 8 e4m3 values per row and group
using Out = cutlass::bfloat16_t;
using ClusterShape = Shape<_1, _1, _1>;

// the weights [N, K] K-major (CUTLASS's "transposed B" of the swapped problem), the activations [K, M] column-major
using LayoutW = cutlass::layout::RowMajor;
using LayoutX = cutlass::layout::ColumnMajor;
using LayoutOut = cutlass::layout::ColumnMajor;  // D [N, M] column-major == out [M, N] row-major
using StrideW = cutlass::detail::TagToStrideA_t<LayoutW>;

// the codes in each thread's order for the fp8 mainloop, and for the bf16 one with its value shuffle (0,2,4,6,1,3,5,7)
using ReorderAtom8 = decltype(cutlass::compute_memory_reordering_atom<Fp8>());
using ReorderAtom16 = decltype(cutlass::compute_memory_reordering_atom<
    Bf16, Layout<Shape<_1, _1>>, Layout<Shape<_2, _4>, Stride<_4, _1>>>());
template <class Atom>
using Reordered = decltype(cute::tile_to_shape(Atom{}, Layout<Shape<int, int, int>, StrideW>{}));

// One mixed-input GEMM of the swapped problem: weights (int4 + Scale per row and group of Group inputs) as the
// register operand, Act activations through TMA, float32 accumulation, bf16 out = alpha * acc.
// WeightLayout: LayoutW (plain packing) or Reordered<Atom> (the atom's order).
template <class Act, class Scale, class WeightLayout, class Atom, int Group, class Tile, class Scheduler>
struct MixedGemm {
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, LayoutOut, 8, Out, LayoutOut, 8,
      cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Int4, Scale>, WeightLayout, 32,
      Act, LayoutX, 128 / cutlass::sizeof_bits<Act>::value,
      float, Tile, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kern = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi, Scheduler>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kern>;

  static typename Op::Arguments arguments(const void* codes, const void* scales, const void* x, void* out, int M,
                                          int N, int K, float alpha) {
    auto shape_w = cute::make_shape(N, K, 1);
    auto layout_w = [&] {
      if constexpr (cute::is_same_v<WeightLayout, LayoutW>) return cutlass::make_cute_packed_stride(StrideW{}, shape_w);
      else return cute::tile_to_shape(Atom{}, shape_w);
    }();
    auto stride_x = cutlass::make_cute_packed_stride(typename Kern::StrideB{}, cute::make_shape(M, K, 1));
    auto stride_s = cutlass::make_cute_packed_stride(typename Main::StrideScale{}, cute::make_shape(N, K / Group, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kern::StrideD{}, cute::make_shape(N, M, 1));
    typename Op::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {N, M, K, 1},
        {static_cast<const Int4*>(codes), layout_w, static_cast<const Act*>(x), stride_x,
         static_cast<const Scale*>(scales), stride_s, Group},
        {{alpha, 0.0f}, nullptr, stride_d, static_cast<Out*>(out), stride_d}};
    return args;
  }

  static size_t workspace(int M, int N, int K) {
    return Op::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, M, N, K, 1.0f));
  }

  // 0 on success, 1 when CUTLASS cannot run the problem (alignment, K), 2 when initialization or launch fails
  static int run(const void* codes, const void* scales, const void* x, void* out, int M, int N, int K, float alpha,
                 void* ws, cudaStream_t stream) {
    Op gemm;
    auto args = arguments(codes, scales, x, out, M, N, K, alpha);
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (gemm.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 2;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 2;
  }
};

// INT4 x fp8, lookup tables per 128 inputs: the tile's K must divide the group and hold >= 4 fp8 MMAs (32 deep)
using LookupGemm = MixedGemm<Fp8, Table, Reordered<ReorderAtom8>, ReorderAtom8, 128, Shape<_128, _128, _128>, void>;

// INT4 x bf16, bf16 scales per 64 inputs (16-deep MMAs: tile K 64); 64 tokens per tile with stream-K, or 128
template <bool Shuffled, int TokensTile, class Scheduler>
using W4A16 = MixedGemm<Bf16, Bf16, cute::conditional_t<Shuffled, Reordered<ReorderAtom16>, LayoutW>, ReorderAtom16,
                        64, Shape<_128, Int<TokensTile>, _64>, Scheduler>;

template <bool Shuffled>
size_t w4a16_workspace(int M, int N, int K, int tokens_tile) {
  return tokens_tile == 64 ? W4A16<Shuffled, 64, cutlass::gemm::StreamKScheduler>::workspace(M, N, K)
                           : W4A16<Shuffled, 128, void>::workspace(M, N, K);
}

template <bool Shuffled>
int w4a16_run(const void* codes, const void* scales, const void* x, void* out, int M, int N, int K, int tokens_tile,
              void* ws, cudaStream_t stream) {
  if (tokens_tile == 64)
    return W4A16<Shuffled, 64, cutlass::gemm::StreamKScheduler>::run(codes, scales, x, out, M, N, K, 1.0f, ws, stream);
  if (tokens_tile == 128) return W4A16<Shuffled, 128, void>::run(codes, scales, x, out, M, N, K, 1.0f, ws, stream);
  return 1;
}

// Reorder int4 codes [N, K] (K-major) into an atom's order: src and dst distinct device buffers of N * K / 2 bytes;
// synchronizes the device.
template <class Atom>
int reorder(const void* src, void* dst, int N, int K) {
  auto shape_w = cute::make_shape(N, K, 1);
  auto layout_src = cute::make_layout(shape_w, cutlass::make_cute_packed_stride(StrideW{}, shape_w));
  cutlass::reorder_tensor(static_cast<const Int4*>(src), layout_src, static_cast<Int4*>(dst),
                          cute::tile_to_shape(Atom{}, shape_w));
  return cudaGetLastError() == cudaSuccess ? 0 : 2;
}

}  // namespace

extern "C" {

// Bytes of workspace qd_w4a8_gemm needs for this problem.
size_t qd_w4a8_workspace(int M, int N, int K) { return LookupGemm::workspace(M, N, K); }

// The lookup-table GEMM (codes unified and reordered by qd_w4a8_reorder, tables [N, K / 128] x 8 bytes); returns as
// MixedGemm::run.
int qd_w4a8_gemm(const void* codes, const void* lut, const void* x, void* out, int M, int N, int K, float alpha,
                 void* workspace, cudaStream_t stream) {
  return LookupGemm::run(codes, lut, x, out, M, N, K, alpha, workspace, stream);
}

int qd_w4a8_reorder(const void* src, void* dst, int N, int K, cudaStream_t) {
  return reorder<ReorderAtom8>(src, dst, N, K);
}

// The INT4 x bf16 GEMM; tokens_tile 64 (stream-K, for few tokens) or 128; shuffled: codes from qd_w4a16_reorder,
// else the plain packing. Returns as MixedGemm::run.
size_t qd_w4a16_workspace(int M, int N, int K, int tokens_tile, int shuffled) {
  return shuffled ? w4a16_workspace<true>(M, N, K, tokens_tile) : w4a16_workspace<false>(M, N, K, tokens_tile);
}

int qd_w4a16_gemm(const void* codes, const void* scales, const void* x, void* out, int M, int N, int K,
                  int tokens_tile, int shuffled, void* workspace, cudaStream_t stream) {
  return shuffled ? w4a16_run<true>(codes, scales, x, out, M, N, K, tokens_tile, workspace, stream)
                  : w4a16_run<false>(codes, scales, x, out, M, N, K, tokens_tile, workspace, stream);
}

int qd_w4a16_reorder(const void* src, void* dst, int N, int K, cudaStream_t) {
  return reorder<ReorderAtom16>(src, dst, N, K);
}

}
