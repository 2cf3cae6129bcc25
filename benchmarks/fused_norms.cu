// The trunk's layer norms folded into the matrix products (CUTLASS 3 sm90 GEMMs with epilogue visitor
// trees), for benchmarks/fused_norms.py: what removing the 68 norm passes of a prediction would gain.
//
// A pre-norm linear reads LN(x) = g * (x - mu) * rstd + beta. Folded:
//     LN(x) W^T + b = rstd * (x (g W)^T - mu * c) + b',   c = rowsum(g W),  b' = b + W beta,
// so the product reads the stream x itself, and the epilogue needs each row's mu and rstd. Those come
// from the product that wrote x: a residual linear (x = h W^T + b + r) whose epilogue also adds each
// row's sum and sum of squares into two fp32 vectors (atomics across the N tiles; zero them first).
//
// C entry points (row-major bf16 activations, nn.Linear weights (N, K) row-major, fp32 vectors; 0 = ok):
//   fold_{gelu_ping_64x256, coop_128x256, ping_64x256}(x, w_folded, y, sum, sumsq, c, b', M, N, K, eps,
//                                                      workspace, bytes, stream)
//   stats_{coop_128x256, ping_64x256}(h, w, r, y, bias, sum, sumsq, M, N, K, workspace, bytes, stream)
// Build: nvcc -std=c++17 -arch=sm_90a -O3 --expt-relaxed-constexpr -DNDEBUG -Xcompiler -fPIC -shared
//        -cudart static -I<CUTLASS include> -o fused_norms.so fused_norms.cu   (load libcuda.so.1 globally first)
#include <cuda_runtime.h>
#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/fast_math.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>

using namespace cute;
using namespace cutlass::epilogue::fusion;
using bf16 = cutlass::bfloat16_t;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

struct FoldArgs { float inv_k; float eps; };

CUTLASS_DEVICE float gelu_tanh(float x) {
  float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + cutlass::fast_tanh(u));
}

// y = rstd * (acc - mu * c) + b', mu = sum / K, rstd = rsqrt(sumsq / K - mu^2 + eps); then GELU (tanh) if asked.
template <bool Gelu>
struct LnFoldT {
  template <class T>
  struct Fn {
    using Arguments = FoldArgs;
    template <class A>
    CUTLASS_HOST_DEVICE A operator()(A const& acc, A const& s1, A const& s2, A const& c, A const& b,
                                     Arguments const& p) const {
      A out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < A::kElements; ++i) {
        float mu = s1[i] * p.inv_k;
        float var = fmaxf(s2[i] * p.inv_k - mu * mu, 0.f);
        float y = rsqrtf(var + p.eps) * (acc[i] - mu * c[i]) + b[i];
        if constexpr (Gelu) y = gelu_tanh(y);
        out[i] = y;
      }
      return out;
    }
  };
};
template <class T> using LnFold = LnFoldT<false>::Fn<T>;
template <class T> using LnFoldGelu = LnFoldT<true>::Fn<T>;

template <class T>
struct Add3 {
  template <class A>
  CUTLASS_HOST_DEVICE A operator()(A const& acc, A const& b, A const& r) const {
    A out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < A::kElements; ++i) out[i] = acc[i] + b[i] + r[i];
    return out;
  }
};
template <class T>
struct Square {
  template <class A>
  CUTLASS_HOST_DEVICE A operator()(A const& x) const {
    A out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < A::kElements; ++i) out[i] = x[i] * x[i];
    return out;
  }
};
template <class T>
struct First {
  template <class A, class B>
  CUTLASS_HOST_DEVICE A operator()(A const& a, B const&) const { return a; }
};

template <class Tile> using ColVec = Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>>;
template <class Tile> using RowVec = Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>>;
template <class Tile> using RowVecB = Sm90RowBroadcast<0, Tile, bf16, float, Stride<_0, _1, int64_t>>;

// fold: (acc, sum, sumsq, c, b') -> y
template <class Tile, template <class> class F>
using FoldTree = Sm90EVT<Sm90Compute<F, bf16, float, kRound>, Sm90AccFetch, ColVec<Tile>, ColVec<Tile>,
                         RowVec<Tile>, RowVec<Tile>>;
// stats: x = acc + bias + r (rounded to bf16, stored), sum += x, sumsq += x^2 per row. A tree cannot feed one
// node to two parents (and a reduction passes its input on), so each branch evaluates x itself: a few adds.
template <class Tile>
using XNode = Sm90EVT<Sm90Compute<Add3, bf16, float, kRound>, Sm90AccFetch, RowVecB<Tile>, Sm90SrcFetch<bf16>>;
template <class Tile>
using RowSum = Sm90ColReduction<cutlass::plus, cutlass::plus, cutlass::atomic_add, 0, Tile, float, float, kRound,
                                Stride<_1, _0, int64_t>>;
template <class Tile>
using StatsTree = Sm90EVT<Sm90Compute<First, bf16, float, kRound>,
                          Sm90EVT<RowSum<Tile>, XNode<Tile>>,
                          Sm90EVT<RowSum<Tile>, Sm90EVT<Sm90Compute<Square, float, float, kRound>, XNode<Tile>>>>;

template <class Tile, class Cluster, class KSched, class ESched, class ElemC, class Fusion>
struct Gemm {
  using Layout = cutlass::layout::RowMajor;
  using Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      ElemC, Layout, 8, bf16, Layout, 8, ESched, Fusion>::CollectiveOp;
  using Main = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, bf16, Layout, 8, bf16, cutlass::layout::ColumnMajor, 8,
      float, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epi::SharedStorage))>,
      KSched>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Main, Epi>;
  using Op = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using ElemCPtr = std::conditional_t<std::is_void_v<ElemC>, void const*, ElemC const*>;

  static int run(void const* a, void const* w, void const* c, void* d, typename Epi::FusionCallbacks::Arguments fa,
                 int M, int N, int K, void* ws, size_t ws_size, cudaStream_t stream) {
    typename Kernel::StrideA sa = make_stride(int64_t(K), _1{}, int64_t(M) * K);
    typename Kernel::StrideB sb = make_stride(int64_t(K), _1{}, int64_t(N) * K);
    typename Kernel::StrideC sc = make_stride(int64_t(N), _1{}, int64_t(M) * N);
    typename Kernel::StrideD sd = make_stride(int64_t(N), _1{}, int64_t(M) * N);
    typename Op::Arguments args{cutlass::gemm::GemmUniversalMode::kGemm, {M, N, K, 1},
                                {static_cast<bf16 const*>(a), sa, static_cast<bf16 const*>(w), sb},
                                {fa, static_cast<ElemCPtr>(c), sc, static_cast<bf16*>(d), sd}};
    Op op;
    if (op.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Op::get_workspace_size(args) > ws_size) return 2;
    if (op.initialize(args, ws, stream) != cutlass::Status::kSuccess) return 3;
    if (op.run(stream) != cutlass::Status::kSuccess) return 4;
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopE = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingE = cutlass::epilogue::TmaWarpSpecialized;

#define FOLD(NAME, TM, TN, KS, ES, F)                                                                        \
  extern "C" int NAME(void const* a, void const* w, void* d, float const* s1, float const* s2,               \
                      float const* c, float const* b, int M, int N, int K, float eps, void* ws, size_t wss,   \
                      cudaStream_t st) {                                                                      \
    using T = Shape<_##TM, _##TN, _64>;                                                                       \
    using G = Gemm<T, Shape<_2, _1, _1>, KS, ES, void, FoldTree<T, F>>;                                       \
    typename G::Epi::FusionCallbacks::Arguments fa{{}, {s1}, {s2}, {c}, {b}, {1.f / K, eps}};                 \
    return G::run(a, w, nullptr, d, fa, M, N, K, ws, wss, st);                                                \
  }

#define STATS(NAME, TM, TN, KS, ES)                                                                         \
  extern "C" int NAME(void const* a, void const* w, void const* r, void* d, void const* bias, float* s1,     \
                      float* s2, int M, int N, int K, void* ws, size_t wss, cudaStream_t st) {               \
    using T = Shape<_##TM, _##TN, _64>;                                                                       \
    using G = Gemm<T, Shape<_2, _1, _1>, KS, ES, bf16, StatsTree<T>>;                                         \
    auto const* bb = static_cast<bf16 const*>(bias);                                                          \
    typename G::Epi::FusionCallbacks::Arguments fa{                                                            \
        {{{}, {bb}, {}, {}}, {s1}}, {{{{}, {bb}, {}, {}}, {}}, {s2}}, {}};                                      \
    return G::run(a, w, r, d, fa, M, N, K, ws, wss, st);                                                       \
  }

// the fastest of the tile shapes tried on an H100 for each product (fused_norms.py's docstring)
FOLD(fold_gelu_ping_64x256, 64, 256, Ping, PingE, LnFoldGelu)  // fc1: K 768 -> N 3072, GELU
FOLD(fold_coop_128x256, 128, 256, Coop, CoopE, LnFold)         // qkv: N 2304
FOLD(fold_ping_64x256, 64, 256, Ping, PingE, LnFold)           // cross-attention q: N 768
STATS(stats_coop_128x256, 128, 256, Coop, CoopE)               // fc2: K 3072 -> 768
STATS(stats_ping_64x256, 64, 256, Ping, PingE)                 // output projections: K 768 -> 768
