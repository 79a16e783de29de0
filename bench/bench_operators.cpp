// The CPU operators at n = 4: Coefficients, PreMix, Update, forward and backward, and the fused
// Coefficients + PreMix forward, float and bf16
// storage, C in {1024, 4096, 7168}, on 1 thread and on all threads. T is chosen so that X alone
// is 128 MiB (4x the 32 MB L3), so every pass streams from DRAM.
//
// Baselines measured in the same binary and the same process:
//  - memcpy: a (multi-threaded, same thread count) memcpy moving the same number of bytes as the
//    operator's minimal traffic (spec section 6); reported as memcpy_GBps, and the operator's
//    achieved bandwidth over it as vs_memcpy (target >= 0.8 for PreMix and Update). One memcpy
//    runs after every timed operator call (timer paused), so both are averaged over the same
//    iterations and the same stretch of time: the machine's bandwidth drifts by 10-20% between
//    seconds, and a baseline taken once before the loop (best of 5) made single-run ratios
//    swing by +-0.1.
//  - FMA peak: independent chains of packet FMAs (Eigen's widest float packet) on the same number
//    of threads, measured like the memcpy after every timed call of a Coefficients operator (best
//    of two ~1 ms measurements); the coefficient projection reports GFLOPs, the iterations' peak
//    as fma_peak_GFLOPs and the ratio as vs_fma_peak. The fma_peak rows give the peak measured
//    once at the start (best of three ~0.3 s measurements).
//  - Roofline (Coefficients rows): per iteration the time the operator needs at least,
//    max(flops / FMA peak, the same-run memcpy time of its minimal bytes), i.e. achieved flop/s
//    over min(FMA peak, flops / minimal bytes x memcpy bandwidth); reported as vs_roofline =
//    roofline time / operator time (the target: >= 0.5 of whichever bound binds).
// Minimal bytes per token (s = storage bytes, n = 4): PreMix fwd (n+1)Cs, bwd (3n+1)Cs (d_X is
// read and written); Update fwd (2n+1)Cs, bwd (3n+2)Cs; Coefficients fwd nCs (X; W stays in
// cache), bwd 3nCs (X, d_X read and written); the fused Coefficients + PreMix forward
// (CoefficientsPreMix rows: Coefficients::forward with u) (n+1)Cs, X read once and u written, as
// spec section 6 counts it. Coefficient flops: 2 nC (n^2+2n) per token forward, twice that
// backward (dX and dW).
//
// Buffers are 64-byte aligned on every target, as a framework's allocator gives them (PyTorch's
// CPU allocator aligns to 64 bytes). Eigen aligns its heap to 32 bytes where the widest packet
// is AVX's, and rows at 32 bytes past a line get no streaming stores (detail::stream_row and
// stream_line_block stream whole 64-byte lines only).
#ifndef EIGEN_MAX_ALIGN_BYTES
#define EIGEN_MAX_ALIGN_BYTES 64
#endif
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <memory>
#include <mhc/coefficients.hpp>
#include <mhc/mixing.hpp>
#include <random>
#include <vector>

#include "fma_peak.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

using mhc::Index;
using mhc_bench::fma_peak;
using mhc_bench::fma_peak_now;
constexpr int kN = 4;
constexpr double kXBytes = 128.0 * 1024 * 1024;

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}
void set_threads(int t) {
#if defined(_OPENMP)
  omp_set_num_threads(t);
#else
  (void)t;
#endif
}

/// Every buffer one (Scalar, C) configuration needs; one configuration is alive at a time.
template <typename S>
struct Data {
  using R = mhc::compute_t<S>;
  Index T, C;
  mhc::RowMatrix<S> X, A, B, y, dy;  // A: X_out / G / d_X_out, B: d_X
  mhc::RowMatrix<R> h_pre, h_post, H_res, d_h_pre, d_h_post, d_H_res, r, z, W, dW;
  Eigen::Matrix<R, Eigen::Dynamic, 1> b_pre, b_post, b_res, d_alpha, d_b_pre, d_b_post, d_b_res, ws;
  Data(Index C_) : C(C_) {
    T = static_cast<Index>(std::ceil(kXBytes / (double(kN) * C * sizeof(S))));
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    const auto fill = [&](auto& m) {
      using V = typename std::decay_t<decltype(m)>::Scalar;
      for (Index k = 0; k < m.size(); ++k) m.data()[k] = V(u(rng));
    };
    X.resize(T * kN, C), A.resize(T * kN, C), B.resize(T * kN, C), y.resize(T, C), dy.resize(T, C);
    fill(X), fill(A), fill(B), fill(y), fill(dy);
    const Index M = kN * kN + 2 * kN;
    h_pre.resize(T, kN), h_post.resize(T, kN), H_res.resize(T, kN * kN);
    d_h_pre.resize(T, kN), d_h_post.resize(T, kN), d_H_res.resize(T, kN * kN);
    r.resize(T, 1), z.resize(T, M), W.resize(kN * C, M), dW.resize(kN * C, M);
    fill(h_pre), fill(h_post), fill(H_res), fill(d_h_pre), fill(d_h_post), fill(d_H_res), fill(W);
    W *= R(1) / std::sqrt(R(kN * C));
    b_pre = Eigen::Matrix<R, Eigen::Dynamic, 1>::Zero(kN);
    b_post = b_pre, d_b_pre = b_pre, d_b_post = b_pre;
    b_res = Eigen::Matrix<R, Eigen::Dynamic, 1>::Zero(kN * kN), d_b_res = b_res;
    d_alpha.resize(3);
    ws.resize(mhc::Coefficients<S, kN>::workspace_size(T, kN, C));
  }
  mhc::CoefficientParams<R> params() const {
    return {W, Eigen::Matrix<R, 3, 1>::Constant(R(0.01)), b_pre, b_post, b_res, 20, R(1e-6)};
  }
};

template <typename S>
Data<S>& data(Index C) {
  static std::unique_ptr<Data<S>> d;
  if (!d || d->C != C) {
    d.reset();
    d = std::make_unique<Data<S>>(C);
  }
  return *d;
}

/// Seconds for one memcpy of `bytes` total traffic (bytes / 2 read, bytes / 2 written), split in
/// contiguous halves over the current thread count (as the operators split their tokens).
double memcpy_seconds(double bytes) {
  // Sized once for the largest operator (Update backward: (3n+2) C s per token, X = n C s per
  // token), so that they are not freed and re-mapped between benchmarks.
  static std::vector<char> src(static_cast<size_t>((3 * kN + 2) * kXBytes / kN / 2) + 64, 1),
      dst(src.size(), 2);
  const size_t half = static_cast<size_t>(bytes / 2);
  if (src.size() < half) {
    src.assign(half, 1);
    dst.assign(half, 2);
  }
  {
    const auto t0 = std::chrono::steady_clock::now();
#if defined(_OPENMP)
#pragma omp parallel
    {
      const size_t nt = static_cast<size_t>(omp_get_num_threads()),
                   id = static_cast<size_t>(omp_get_thread_num());
      const size_t chunk = (half + nt - 1) / nt, b = std::min(half, id * chunk),
                   e = std::min(half, b + chunk);
      std::memcpy(dst.data() + b, src.data() + b, e - b);
    }
#else
    std::memcpy(dst.data(), src.data(), half);
#endif
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
}

enum class Op { PreMixFwd, PreMixBwd, UpdateFwd, UpdateBwd, CoefFwd, CoefBwd, CoefPreMixFwd };

template <typename S, Op op>
void BM_op(benchmark::State& state) {
  const Index C = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  Data<S>& d = data<S>(C);
  const Index T = d.T;
  const double s = sizeof(S), tok = double(T) * C * s;
  double bytes = 0, flops = 0;
  const double proj = 2.0 * kN * C * (kN * kN + 2 * kN) * double(T);
  switch (op) {
    case Op::PreMixFwd:
      bytes = (kN + 1) * tok;
      break;
    case Op::PreMixBwd:
      bytes = (3 * kN + 1) * tok;
      break;
    case Op::UpdateFwd:
      bytes = (2 * kN + 1) * tok;
      break;
    case Op::UpdateBwd:
      bytes = (3 * kN + 2) * tok;
      break;
    case Op::CoefFwd:
      bytes = kN * tok, flops = proj;
      break;
    case Op::CoefBwd:
      bytes = 3 * kN * tok, flops = 2 * proj;
      break;
    case Op::CoefPreMixFwd:
      bytes = (kN + 1) * tok, flops = proj;
      break;
  }
  const auto params = d.params();
  const auto run = [&] {
    switch (op) {
      case Op::PreMixFwd:
        mhc::PreMix<S, kN>::forward(d.X, d.h_pre, d.y);
        break;
      case Op::PreMixBwd:
        mhc::PreMix<S, kN>::backward(d.X, d.h_pre, d.dy, d.B, d.d_h_pre);
        break;
      case Op::UpdateFwd:
        mhc::Update<S, kN>::forward(d.X, d.H_res, d.h_post, d.y, d.A);
        break;
      case Op::UpdateBwd:
        mhc::Update<S, kN>::backward(d.X, d.H_res, d.h_post, d.y, d.A, d.B, d.d_H_res, d.d_h_post,
                                     d.dy);
        break;
      case Op::CoefFwd:
        mhc::Coefficients<S, kN>::forward(d.X, params, d.h_pre, d.h_post, d.H_res, d.r, d.z);
        break;
      case Op::CoefPreMixFwd:
        mhc::Coefficients<S, kN>::forward(d.X, params, d.h_pre, d.h_post, d.H_res, d.r, d.z, d.y);
        break;
      case Op::CoefBwd:
        mhc::Coefficients<S, kN>::backward(d.X, params, d.r, d.z, d.d_h_pre, d.d_h_post, d.d_H_res,
                                           d.B, {d.dW, d.d_alpha, d.d_b_pre, d.d_b_post, d.d_b_res},
                                           d.ws);
        break;
    }
  };
  // One untimed call first: the first touch of freshly (re)mapped buffers costs this VM about
  // 5 us per 4 KB page outside the guest (docs/performance_log.md), 0.5 s for an Update backward.
  for (int warm = 0; warm < 2; ++warm) {
    run();
    memcpy_seconds(bytes);
  }
  double copy_s = 0;  // total over the iterations
  double peak_s = 0;  // sum over the iterations of flops / (that iteration's FMA peak)
  double roof_s = 0;  // sum over the iterations of max(flops / peak, that iteration's memcpy)
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
    state.PauseTiming();
    const double c = memcpy_seconds(bytes);
    const double p = flops > 0 ? flops / fma_peak_now(threads) : 0;
    copy_s += c;
    peak_s += p;
    roof_s += std::max(p, c);
    state.ResumeTiming();
  }
  const double it = double(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(it * bytes));
  state.SetItemsProcessed(static_cast<int64_t>(it * T));
  state.counters["T"] = double(T);
  state.counters["memcpy_GBps"] = it * bytes / copy_s / 1e9;
  // rate counter: (memcpy time for the same bytes) / (operator time) = op bandwidth / memcpy's
  state.counters["vs_memcpy"] = benchmark::Counter(copy_s, benchmark::Counter::kIsRate);
  if (flops > 0) {
    state.counters["GFLOPs"] = benchmark::Counter(it * flops / 1e9, benchmark::Counter::kIsRate);
    state.counters["fma_peak_GFLOPs"] = it * flops / peak_s / 1e9;
    // rate counter: (time at that iteration's FMA peak) / (operator time)
    state.counters["vs_fma_peak"] = benchmark::Counter(peak_s, benchmark::Counter::kIsRate);
    // rate counter: (roofline time) / (operator time)
    state.counters["vs_roofline"] = benchmark::Counter(roof_s, benchmark::Counter::kIsRate);
  }
}

void BM_fma_peak(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) benchmark::DoNotOptimize(fma_peak(threads));
  state.counters["GFLOPs"] = fma_peak(threads) / 1e9;
}

template <typename S, Op op>
void register_op(const std::string& name, Index C) {
  static std::vector<std::unique_ptr<std::string>> names;  // RegisterBenchmark keeps the pointer
  names.push_back(std::make_unique<std::string>(name));
  std::vector<int> ts{1};
  if (max_threads() > 1) ts.push_back(max_threads());
  for (const int t : ts)
    benchmark::RegisterBenchmark(names.back()->c_str(), BM_op<S, op>)
        ->Args({C, t})
        ->ArgNames({"C", "threads"})
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
}

/// C outermost, so the buffers of one (type, C) serve all six operators (and the fused forward).
template <typename S>
void register_all(const std::string& type) {
  for (const Index C : {1024, 4096, 7168}) {
    register_op<S, Op::PreMixFwd>(type + "/PreMix/forward", C);
    register_op<S, Op::PreMixBwd>(type + "/PreMix/backward", C);
    register_op<S, Op::UpdateFwd>(type + "/Update/forward", C);
    register_op<S, Op::UpdateBwd>(type + "/Update/backward", C);
    register_op<S, Op::CoefFwd>(type + "/Coefficients/forward", C);
    register_op<S, Op::CoefBwd>(type + "/Coefficients/backward", C);
    register_op<S, Op::CoefPreMixFwd>(type + "/CoefficientsPreMix/forward", C);
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("fma_peak", BM_fma_peak)->Arg(1)->Iterations(1);
  if (max_threads() > 1)
    benchmark::RegisterBenchmark("fma_peak", BM_fma_peak)->Arg(max_threads())->Iterations(1);
  register_all<float>("float");
  register_all<mhc::bf16>("bf16");
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
