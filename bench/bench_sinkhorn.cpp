// Sinkhorn-Knopp projection: mhc's batched SIMD path against a naive per-matrix Eigen loop
// (fixed-size Eigen::Matrix<float, n, n>, one token at a time), measured in the same binary.
//
// Counters: ns_per_matrix (mhc), naive_ns_per_matrix, speedup = naive / mhc, matrices/s
// (items_per_second) and bytes/s of logits read + matrices written (+ gradients for backward).
// Args: n, T, threads (OpenMP; 1 = the single-thread target), iterations fixed at t_max = 20.
#include <benchmark/benchmark.h>
#include <mhc/sinkhorn.hpp>

#include <chrono>
#include <map>
#include <random>
#include <tuple>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

constexpr int kIterations = 20;

mhc::RowMatrix<float> random_batch(mhc::Index T, int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  mhc::RowMatrix<float> m(T, n * n);
  for (mhc::Index k = 0; k < m.size(); ++k) m.data()[k] = u(rng);
  return m;
}

/// The naive baseline: what a straightforward Eigen user writes for one matrix.
template <int N>
struct NaiveSinkhorn {
  using Mat = Eigen::Matrix<float, N, N, Eigen::RowMajor>;
  static void forward(const float* a, float* out) {
    Mat M = (Eigen::Map<const Mat>(a).array() - Eigen::Map<const Mat>(a).maxCoeff()).exp().matrix();
    for (int k = 0; k < kIterations; ++k) {
      M.array().rowwise() /= M.colwise().sum().array();
      M.array().colwise() /= M.rowwise().sum().array();
    }
    Eigen::Map<Mat> result(out);
    result = M;
  }
  // Backward by storing every iterate of this one matrix, then reversing the steps.
  static void backward(const float* a, const float* g, float* da) {
    Mat iterates[2 * kIterations + 1];
    Mat M = (Eigen::Map<const Mat>(a).array() - Eigen::Map<const Mat>(a).maxCoeff()).exp().matrix();
    iterates[0] = M;
    for (int k = 0; k < kIterations; ++k) {
      M.array().rowwise() /= M.colwise().sum().array();
      iterates[2 * k + 1] = M;
      M.array().colwise() /= M.rowwise().sum().array();
      iterates[2 * k + 2] = M;
    }
    Mat G = Eigen::Map<const Mat>(g);
    for (int s = 2 * kIterations; s >= 1; --s) {
      const Mat& out = iterates[s];
      const Mat& in = iterates[s - 1];
      if (s % 2 == 0) {  // row step: out = in / rowsum(in)
        const auto dots = (G.cwiseProduct(out)).rowwise().sum().eval();
        const auto sums = in.rowwise().sum().eval();
        G = ((G.colwise() - dots).array().colwise() / sums.array()).matrix();
      } else {  // column step
        const auto dots = (G.cwiseProduct(out)).colwise().sum().eval();
        const auto sums = in.colwise().sum().eval();
        G = ((G.rowwise() - dots).array().rowwise() / sums.array()).matrix();
      }
    }
    Eigen::Map<Mat> result(da);
    result = G.cwiseProduct(iterates[0]);
  }
};

template <int N>
double naive_ns_per_matrix(const mhc::RowMatrix<float>& A, const mhc::RowMatrix<float>& G,
                           bool with_backward) {
  static std::map<std::tuple<mhc::Index, bool>, double> cache;
  const auto key = std::make_tuple(A.rows(), with_backward);
  if (auto it = cache.find(key); it != cache.end()) return it->second;
  mhc::RowMatrix<float> out(A.rows(), A.cols()), dA(A.rows(), A.cols());
  using clock = std::chrono::steady_clock;
  long long matrices = 0;
  const auto start = clock::now();
  double elapsed = 0;
  do {
    for (mhc::Index t = 0; t < A.rows(); ++t) {
      NaiveSinkhorn<N>::forward(A.row(t).data(), out.row(t).data());
      if (with_backward) NaiveSinkhorn<N>::backward(A.row(t).data(), G.row(t).data(), dA.row(t).data());
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(dA.data());
    matrices += A.rows();
    elapsed = std::chrono::duration<double, std::nano>(clock::now() - start).count();
  } while (elapsed < 2e8);
  return cache[key] = elapsed / static_cast<double>(matrices);
}

void set_threads(int threads) {
#if defined(_OPENMP)
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

template <int N>
void report(benchmark::State& state, mhc::Index T, double naive_ns, double bytes_per_matrix) {
  using benchmark::Counter;
  const double Td = static_cast<double>(T);
  state.SetItemsProcessed(state.iterations() * T);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * Td * bytes_per_matrix));
  state.counters["ns_per_matrix"] = Counter(Td * 1e-9, Counter::kIsIterationInvariantRate | Counter::kInvert);
  state.counters["naive_ns_per_matrix"] = naive_ns;
  state.counters["speedup_vs_naive"] = Counter(naive_ns * Td * 1e-9, Counter::kIsIterationInvariantRate);
}

template <int N>
void BM_SinkhornForward(benchmark::State& state) {
  const mhc::Index T = state.range(0);
  set_threads(static_cast<int>(state.range(1)));
  const auto A = random_batch(T, N, 42);
  mhc::RowMatrix<float> out(T, N * N);
  const double naive = naive_ns_per_matrix<N>(A, A, false);
  for (auto _ : state) {
    mhc::Sinkhorn<float, N>::forward(A, out, {kIterations});
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  report<N>(state, T, naive, 2.0 * N * N * sizeof(float));
}

template <int N>
void BM_SinkhornForwardBackward(benchmark::State& state) {
  const mhc::Index T = state.range(0);
  set_threads(static_cast<int>(state.range(1)));
  const auto A = random_batch(T, N, 42);
  const auto G = random_batch(T, N, 43);
  mhc::RowMatrix<float> out(T, N * N), dA(T, N * N);
  const double naive = naive_ns_per_matrix<N>(A, G, true);
  for (auto _ : state) {
    mhc::Sinkhorn<float, N>::forward(A, out, {kIterations});
    mhc::Sinkhorn<float, N>::backward(A, G, dA, {kIterations});
    benchmark::DoNotOptimize(out.data());
    benchmark::DoNotOptimize(dA.data());
    benchmark::ClobberMemory();
  }
  report<N>(state, T, naive, 5.0 * N * N * sizeof(float));
}

void args(benchmark::internal::Benchmark* b) {
  for (int threads : {1, 2})
    for (int T : {1, 256, 65536}) b->Args({T, threads});
  b->ArgNames({"T", "threads"})->UseRealTime();
}

}  // namespace

BENCHMARK_TEMPLATE(BM_SinkhornForward, 4)->Apply(args);
BENCHMARK_TEMPLATE(BM_SinkhornForwardBackward, 4)->Apply(args);
BENCHMARK_TEMPLATE(BM_SinkhornForward, 8)->Apply(args);
BENCHMARK_TEMPLATE(BM_SinkhornForwardBackward, 8)->Apply(args);

BENCHMARK_MAIN();
