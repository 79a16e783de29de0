// The coefficient kernels with their data in cache, one thread, against the FMA peak measured in
// the same process: how much of the peak each kernel's own instruction mix reaches before any
// DRAM traffic. bench_operators measures the whole operators from DRAM; the gap between the two
// is the memory walk, and a kernel's rate here bounds its operator's vs_fma_peak there.
//  - float/ProjectionTile/L1 (AVX-512 or AVX2 + FMA targets): the forward's register tile
//    (detail/projection_avx512.hpp or detail/projection_avx2.hpp, 8 tokens x 24 outputs, n = 4)
//    over 64 columns of its 8 rows of X and the 64 rows of W it reads (2 KB + 6 KB), 4096 times
//    per iteration; 2 x 8 x 64 x (24 + 1) flops per call (product and sum of squares).
//  - {float,bf16}/CoefficientProjection/L2: the whole forward projection of Coefficients::forward
//    (forward_tile: the tile above over every block of the tokens' rows, with its X prefetches
//    (and W's with AVX-512), the bf16 conversion and r, z) for two tiles of tokens (16) at
//    C = 1024 (X: 256 KB float, 128 KB bf16; W: 384 KB, read once per tile), 16 times per
//    iteration; 2 n C (M + 1) flops per token. Between the L1 tile and bench_operators' DRAM
//    rows: what walking the blocks and streaming W from L2 cost.
//  - {float,bf16}/CoefficientGrad/L2: the backward's fused d_X / d_W pass (grad_block, the
//    kernel of Coefficients::backward after the per-token mapping) over all four stream rows of
//    T = 128 tokens at C = 128 (X and d_X: 512 KB float, 256 KB bf16), 8 times per iteration;
//    4 n C M T flops each.
// Each iteration is followed (timer paused) by an FMA-peak measurement of about 1 ms
// (mhc_bench::fma_peak_now); vs_fma_peak is the time those flops take at that peak over the
// kernel's time. Items: token rows of 64 columns (tile), tokens (projection, grad); bytes: what
// the kernel reads and writes in cache. Inputs are fixed-seed uniform values; every output feeds
// DoNotOptimize. The kernels run on the calling thread (no OpenMP inside them).
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <mhc/coefficients.hpp>
#include <random>
#include <vector>

#include "fma_peak.hpp"

namespace {

using mhc::Index;
constexpr int kN = 4;
constexpr int kM = kN * kN + 2 * kN;  // mHC coefficients per token

void fill(float* p, Index count, unsigned seed, float scale) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  for (Index k = 0; k < count; ++k) p[k] = u(rng);
}

/// Runs `kernel` per iteration, then the FMA peak with the timer paused; reports GFLOPs,
/// fma_peak_GFLOPs and vs_fma_peak for `flops` per call, bytes and items as given.
template <typename Kernel>
void time_against_peak(benchmark::State& state, double flops, double bytes, double items,
                       Kernel&& kernel) {
  kernel();  // warm the caches
  double peak_s = 0;
  for (auto _ : state) {
    kernel();
    benchmark::ClobberMemory();
    state.PauseTiming();
    peak_s += flops / mhc_bench::fma_peak_now(1);
    state.ResumeTiming();
  }
  const double it = double(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(it * bytes));
  state.SetItemsProcessed(static_cast<int64_t>(it * items));
  state.counters["GFLOPs"] = benchmark::Counter(it * flops / 1e9, benchmark::Counter::kIsRate);
  state.counters["fma_peak_GFLOPs"] = it * flops / peak_s / 1e9;
  // rate counter: (time at that iteration's FMA peak) / (kernel time)
  state.counters["vs_fma_peak"] = benchmark::Counter(peak_s, benchmark::Counter::kIsRate);
}

#if defined(MHC_HAVE_AVX512_KERNELS) || defined(MHC_HAVE_AVX2_KERNELS)
void BM_projection_tile(benchmark::State& state) {
  constexpr int kTokens = 8, kColumns = 64, kCalls = 4096;
#if defined(MHC_HAVE_AVX512_KERNELS)
  using Tile = mhc::detail::ProjectionTileAvx512<kTokens, kM>;
#else
  using Tile = mhc::detail::ProjectionTileAvx2<kTokens, kM>;
#endif
  alignas(64) float x[kTokens][kColumns];
  alignas(64) float w[kColumns * kM];
  fill(&x[0][0], kTokens * kColumns, 1, 1.f);
  fill(w, kColumns * kM, 2, 0.1f);
  const float* rows[kTokens];
  for (int t = 0; t < kTokens; ++t) rows[t] = x[t];
  const auto kernel = [&] {
    Tile tile;
    tile.set_zero();
    for (int call = 0; call < kCalls; ++call) {
      benchmark::DoNotOptimize(rows);  // the compiler may not fold calls on the same data
      tile.accumulate(w, kM, rows, kColumns);
    }
    alignas(64) float out[kM];
    for (int t = 0; t < kTokens; ++t) {
      benchmark::DoNotOptimize(tile.finish(t, out));
      benchmark::DoNotOptimize(out);
    }
  };
  // bytes: X and W once per call (the AVX2 tile reads W once per sub-tile of 4 tokens, i.e.
  // twice, from L1)
  time_against_peak(state, 2.0 * kTokens * kColumns * (kM + 1) * kCalls,
                    double(kCalls) * (sizeof(x) + sizeof(w)), double(kTokens) * kCalls, kernel);
}
#endif

template <typename S>
void BM_coefficient_projection(benchmark::State& state) {
  using K = mhc::detail::CoefficientKernels<S, kN, mhc::MhcVariant>;
  using R = mhc::compute_t<S>;
  constexpr int kTile = K::kTileTokens;
  constexpr Index T = 2 * kTile, C = 1024;
  mhc::RowMatrix<S> X(T * kN, C);
  mhc::RowMatrix<R> W(kN * C, kM), r(T, 1), z(T, kM);
  {
    std::vector<float> v(static_cast<size_t>(X.size()));
    fill(v.data(), X.size(), 6, 1.f);
    for (Index k = 0; k < X.size(); ++k) X.data()[k] = S(v[static_cast<size_t>(k)]);
  }
  fill(W.data(), W.size(), 7, 0.05f);
  const Eigen::Matrix<R, 3, 1> alpha = Eigen::Matrix<R, 3, 1>::Constant(R(0.01));
  const Eigen::Matrix<R, -1, 1> b_gate = Eigen::Matrix<R, -1, 1>::Zero(kN);
  const Eigen::Matrix<R, -1, 1> b_res = Eigen::Matrix<R, -1, 1>::Zero(kN * kN);
  const mhc::CoefficientParams<R> p{W, alpha, b_gate, b_gate, b_res};
  const mhc::ConstBatchRef<S> Xr(X);
  mhc::BatchRef<R> rr(r), zr(z);
  constexpr int kRepeats = 16;
  const auto kernel = [&] {
    for (int repeat = 0; repeat < kRepeats; ++repeat) {
      for (Index t0 = 0; t0 < T; t0 += kTile)
        K::template forward_tile<kTile>(Xr, p, kN, t0, rr, zr);
      benchmark::DoNotOptimize(r.data());
      benchmark::DoNotOptimize(z.data());
    }
  };
  time_against_peak(state, kRepeats * 2.0 * kN * C * (kM + 1) * T,
                    kRepeats * double(kN * C * T * sizeof(S) + W.size() * sizeof(R) * (T / kTile)),
                    double(kRepeats) * T, kernel);
}

template <typename S>
void BM_coefficient_grad(benchmark::State& state) {
  using K = mhc::detail::CoefficientKernels<S, kN, mhc::MhcVariant>;
  using R = mhc::compute_t<S>;
  constexpr Index T = 128, C = 128;
  mhc::RowMatrix<S> X(T * kN, C), d_X(T * kN, C);
  mhc::RowMatrix<R> W(kN * C, kM), d_W(kN * C, kM);
  {
    std::vector<float> v(static_cast<size_t>(X.size()));
    fill(v.data(), X.size(), 3, 1.f);
    for (Index k = 0; k < X.size(); ++k) X.data()[k] = S(v[static_cast<size_t>(k)]);
  }
  d_X.setZero();
  fill(W.data(), W.size(), 4, 0.05f);
  // Workspace as Coefficients::backward lays it out: per token g (M) | da (M) | dalpha (3) |
  // beta (1), then W and the d_W accumulators in strips from the next 64-byte boundary.
  const Index ldg = 2 * kM + 4, Cp = K::padded_columns(C);
  std::vector<R> ws(static_cast<size_t>(T * ldg + 2 * kM * kN * Cp + 64));
  R* g = ws.data();
  fill(g, T * ldg, 5, 1e-3f);
  R* Wp = K::strip_start(g + T * ldg);
  R* dWp = Wp + kM * kN * Cp;
  for (Index strip = 0; strip < kN * (Cp / K::kPacket); ++strip)
    K::pack_strips(W, kN, C, strip, Wp);
  const mhc::ConstBatchRef<S> Xr(X);
  mhc::BatchRef<S> dXr(d_X);
  mhc::BatchRef<R> dWr(d_W);
  constexpr int kRepeats = 8;  // about 1 ms of kernel per iteration, like the peak next to it
  const auto kernel = [&] {
    for (int repeat = 0; repeat < kRepeats; ++repeat) {
      for (int i = 0; i < kN; ++i)
        for (Index c0 = 0; c0 < C; c0 += K::kGradBlock)
          K::grad_block(Xr, kN, i, c0, std::min<Index>(K::kGradBlock, C - c0), Wp, dWp, g, ldg,
                        2 * kM + 3, dXr, dWr);
      benchmark::DoNotOptimize(d_X.data());
      benchmark::DoNotOptimize(d_W.data());
    }
  };
  time_against_peak(state, kRepeats * 4.0 * kN * C * kM * T,
                    kRepeats * 3.0 * kN * C * T * sizeof(S), double(kRepeats) * T, kernel);
}

}  // namespace

int main(int argc, char** argv) {
#if defined(MHC_HAVE_AVX512_KERNELS) || defined(MHC_HAVE_AVX2_KERNELS)
  benchmark::RegisterBenchmark("float/ProjectionTile/L1", BM_projection_tile)->UseRealTime();
#endif
  benchmark::RegisterBenchmark("float/CoefficientProjection/L2", BM_coefficient_projection<float>)
      ->UseRealTime();
  benchmark::RegisterBenchmark("bf16/CoefficientProjection/L2",
                               BM_coefficient_projection<mhc::bf16>)
      ->UseRealTime();
  benchmark::RegisterBenchmark("float/CoefficientGrad/L2", BM_coefficient_grad<float>)
      ->UseRealTime();
  benchmark::RegisterBenchmark("bf16/CoefficientGrad/L2", BM_coefficient_grad<mhc::bf16>)
      ->UseRealTime();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
