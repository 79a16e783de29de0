// Tests of the batched Sinkhorn-Knopp projection (include/mhc/sinkhorn.hpp).
#include "support/eigen_assert_counter.hpp"  // first: counts Eigen's malloc check
#include <mhc/sinkhorn.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "support/testing.hpp"

using mhc::Index;
using mhc::RowMatrix;
using mhc_test::fresh_seed;
using mhc_test::Rng;

namespace {

/// Independent reference, straight from spec section 2.5 in long double: global max shift, then
/// t_max rounds of column then row division (no clamp: only used on moderate logits).
RowMatrix<double> reference_sinkhorn(const RowMatrix<double>& logits, int n, int iterations) {
  RowMatrix<double> out(logits.rows(), logits.cols());
  for (Index t = 0; t < logits.rows(); ++t) {
    std::vector<long double> M(n * n);
    long double mx = logits.row(t).maxCoeff();
    for (int k = 0; k < n * n; ++k) M[k] = std::exp(static_cast<long double>(logits(t, k)) - mx);
    for (int it = 0; it < iterations; ++it) {
      for (int j = 0; j < n; ++j) {
        long double s = 0;
        for (int i = 0; i < n; ++i) s += M[i * n + j];
        for (int i = 0; i < n; ++i) M[i * n + j] /= s;
      }
      for (int i = 0; i < n; ++i) {
        long double s = 0;
        for (int j = 0; j < n; ++j) s += M[i * n + j];
        for (int j = 0; j < n; ++j) M[i * n + j] /= s;
      }
    }
    for (int k = 0; k < n * n; ++k) out(t, k) = static_cast<double>(M[k]);
  }
  return out;
}

template <typename S>
RowMatrix<S> random_logits(Index T, int n, Rng& rng, double scale = 2.0) {
  RowMatrix<S> A(T, n * n);
  mhc_test::fill_uniform(A, rng, -scale, scale);
  return A;
}

/// Logits near a random permutation: the ill-conditioned regime (large margins, tiny entries).
RowMatrix<double> near_permutation_logits(Index T, int n, Rng& rng, double margin) {
  RowMatrix<double> A(T, n * n);
  mhc_test::fill_uniform(A, rng, -0.3, 0.3);
  std::vector<int> perm(n);
  for (Index t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int i = 0; i < n; ++i) A(t, i * n + perm[i]) += margin;
  }
  return A;
}

template <typename S>
RowMatrix<S> project(const RowMatrix<S>& A, int n, int iterations = 20,
                     mhc::SinkhornReport* report = nullptr) {
  RowMatrix<S> out(A.rows(), A.cols());
  mhc::Sinkhorn<S, mhc::Dynamic>::forward(A, out, {iterations}, report);
  (void)n;
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("Sinkhorn output is doubly stochastic and nonnegative", "[sinkhorn]", float,
                   double) {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int n : {1, 2, 3, 4, 5, 8, 11}) {
    for (Index T : {Index(1), Index(7), Index(64), Index(100)}) {
      CAPTURE(n, T);
      const RowMatrix<TestType> A = random_logits<TestType>(T, n, rng);
      mhc::SinkhornReport report;
      const RowMatrix<TestType> M = project(A, n, 20, &report);
      const double eps = std::numeric_limits<TestType>::epsilon();
      double worst_row = 0, worst_col = 0;
      for (Index t = 0; t < T; ++t) {
        for (int i = 0; i < n; ++i) {
          double row = 0, col = 0;
          for (int j = 0; j < n; ++j) {
            REQUIRE(M(t, i * n + j) >= 0);
            row += M(t, i * n + j);
            col += M(t, j * n + i);
          }
          worst_row = std::max(worst_row, std::abs(row - 1));
          worst_col = std::max(worst_col, std::abs(col - 1));
        }
      }
      CHECK(worst_row <= 4 * n * eps);
      CHECK(worst_col <= 3e-2);  // truncation after 20 rounds on logits in [-2, 2]
      CHECK(report.max_row_error <= 4 * n * eps);
      CHECK(report.max_column_error <= 3e-2);
      // The report is computed in the compute type before storage: it agrees with what we see.
      CHECK(std::abs(report.max_column_error - worst_col) <= 4 * n * eps + 1e-12);
    }
  }
}

TEST_CASE("Sinkhorn matches an independent long-double reference", "[sinkhorn]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int n : {1, 2, 3, 4, 6, 8, 9, 16}) {
    for (int iterations : {1, 3, 20, 45}) {
      CAPTURE(n, iterations);
      const RowMatrix<double> A = random_logits<double>(9, n, rng, 3.0);
      const RowMatrix<double> ref = reference_sinkhorn(A, n, iterations);
      CHECK((project(A, n, iterations) - ref).cwiseAbs().maxCoeff() <= 1e-13);
      const RowMatrix<float> Af = A.cast<float>();
      CHECK((project(Af, n, iterations).cast<double>() - ref).cwiseAbs().maxCoeff() <= 2e-6);
    }
  }
}

TEST_CASE("Sinkhorn columns converge as t_max grows", "[sinkhorn]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int n : {2, 4, 8}) {
    CAPTURE(n);
    const RowMatrix<double> A = random_logits<double>(32, n, rng, 1.0);
    double previous = std::numeric_limits<double>::infinity();
    for (int iterations : {1, 2, 5, 10, 20, 50, 200}) {
      mhc::SinkhornReport report;
      project(A, n, iterations, &report);
      CAPTURE(iterations, report.max_column_error);
      CHECK(report.max_column_error <= previous * (1 + 1e-9) + 1e-15);
      CHECK(report.max_row_error <= 1e-14);
      previous = report.max_column_error;
    }
    CHECK(previous <= 1e-10);
  }
}

TEST_CASE("Sinkhorn invariances and equivariances", "[sinkhorn]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int n : {2, 3, 4, 8, 12}) {
    CAPTURE(n);
    const RowMatrix<double> A = random_logits<double>(5, n, rng, 2.0);
    const RowMatrix<double> M = project(A, n);
    // Adding a constant to a whole matrix, or to one column, changes nothing (exact for t_max >= 1).
    RowMatrix<double> shifted = A;
    for (Index t = 0; t < A.rows(); ++t) {
      shifted.row(t).array() += mhc_test::uniform(rng, -50, 50);
      for (int j = 0; j < n; ++j) {
        const double c = mhc_test::uniform(rng, -5, 5);
        for (int i = 0; i < n; ++i) shifted(t, i * n + j) += c;
      }
    }
    CHECK((project(shifted, n) - M).cwiseAbs().maxCoeff() <= 1e-12);
    // SK(P A Q) = P SK(A) Q for permutations P (rows) and Q (columns).
    std::vector<int> p(n), q(n);
    std::iota(p.begin(), p.end(), 0);
    std::iota(q.begin(), q.end(), 0);
    std::shuffle(p.begin(), p.end(), rng);
    std::shuffle(q.begin(), q.end(), rng);
    RowMatrix<double> PAQ(A.rows(), A.cols()), PMQ(A.rows(), A.cols());
    for (Index t = 0; t < A.rows(); ++t)
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
          PAQ(t, i * n + j) = A(t, p[i] * n + q[j]);
          PMQ(t, i * n + j) = M(t, p[i] * n + q[j]);
        }
    CHECK((project(PAQ, n) - PMQ).cwiseAbs().maxCoeff() <= 1e-12);
  }
}

TEST_CASE("A strongly diagonal input projects to near identity", "[sinkhorn]") {
  for (int n : {2, 4, 8}) {
    RowMatrix<float> A = RowMatrix<float>::Zero(3, n * n);
    for (int i = 0; i < n; ++i) A.col(i * n + i).setConstant(12.0f);
    const RowMatrix<float> M = project(A, n);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        if (i == j)
          CHECK(M(1, i * n + j) >= 0.999f);
        else
          CHECK(M(1, i * n + j) <= 1e-4f);
      }
  }
}

TEST_CASE("Huge logits stay finite; NaN poisons only its own matrix", "[sinkhorn]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int n : {2, 4, 8, 10}) {
    CAPTURE(n);
    RowMatrix<float> A = random_logits<float>(40, n, rng, 1e4);
    // Rows and columns that are entirely far below the others: exp underflows everywhere there.
    for (int j = 0; j < n; ++j) A(3, j) = -1e4f, A(3, n + j) = 1e4f;
    RowMatrix<float> M = project(A, n);
    CHECK(M.allFinite());
    CHECK((M.array() >= 0).all());
    RowMatrix<float> G = RowMatrix<float>::Ones(40, n * n), dA(40, n * n);
    G.row(5).setRandom();
    mhc::SinkhornXf::backward(A, G, dA);
    CHECK(dA.allFinite());

    A(7, n + 1) = std::numeric_limits<float>::quiet_NaN();
    M = project(A, n);
    for (Index t = 0; t < A.rows(); ++t) {
      CAPTURE(t);
      if (t == 7)
        CHECK(M.row(t).array().isNaN().all());
      else
        CHECK(M.row(t).allFinite());
    }
  }
}

TEST_CASE("Sinkhorn backward matches central finite differences in double", "[sinkhorn][grad]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  struct Case {
    int n;
    Index T;
    int iterations;
    double margin;  // 0: random logits; > 0: near a permutation (ill-conditioned)
  };
  std::vector<Case> cases;
  for (int n : {1, 2, 3, 4, 8})
    for (Index T : {Index(1), Index(7), Index(64)}) cases.push_back({n, T, 20, 0.0});
  for (int n : {2, 4, 8}) cases.push_back({n, 7, 20, 6.0});   // near-permutation
  for (int n : {3, 4}) cases.push_back({n, 5, 70, 0.0});     // chunked recomputation (> 32 rounds)
  cases.push_back({10, 3, 20, 0.0});                          // runtime-n path (n > 8)
  cases.push_back({4, 33, 1, 0.0});                           // a single round
  for (const Case& c : cases) {
    CAPTURE(c.n, c.T, c.iterations, c.margin);
    const int n = c.n;
    const RowMatrix<double> A = c.margin > 0 ? near_permutation_logits(c.T, n, rng, c.margin)
                                             : random_logits<double>(c.T, n, rng, 2.0);
    RowMatrix<double> G(c.T, n * n);
    mhc_test::fill_uniform(G, rng);
    RowMatrix<double> dA(c.T, n * n);
    mhc::SinkhornXd::backward(A, G, dA, {c.iterations});

    auto loss = [&](const Eigen::VectorXd& x) {
      const RowMatrix<double> X = Eigen::Map<const RowMatrix<double>>(x.data(), c.T, n * n);
      return project(X, n, c.iterations).cwiseProduct(G).sum();
    };
    const Eigen::VectorXd x = Eigen::Map<const Eigen::VectorXd>(A.data(), A.size());
    const Eigen::VectorXd g = Eigen::Map<const Eigen::VectorXd>(dA.data(), dA.size());
    const auto check = mhc_test::check_gradient(loss, x, g, rng, 1e-5);
    CAPTURE(check.worst, check.analytic, check.numeric);
    CHECK(check.max_error <= 1e-7);
  }
}

TEST_CASE("Sinkhorn backward: compile-time N equals runtime n; float agrees with double",
          "[sinkhorn][grad]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const RowMatrix<double> A = random_logits<double>(77, 4, rng);
  RowMatrix<double> G(77, 16);
  mhc_test::fill_uniform(G, rng);
  RowMatrix<double> d_fixed(77, 16), d_dyn(77, 16);
  mhc::Sinkhorn4d::backward(A, G, d_fixed);
  mhc::SinkhornXd::backward(A, G, d_dyn);
  CHECK(d_fixed == d_dyn);
  RowMatrix<float> d_float(77, 16);
  mhc::Sinkhorn4f::backward(A.cast<float>(), G.cast<float>(), d_float);
  CHECK((d_float.cast<double>() - d_fixed).cwiseAbs().maxCoeff() <=
        1e-5 * std::max(1.0, d_fixed.cwiseAbs().maxCoeff()));
  // bfloat16 storage: same maths in float, inputs and outputs rounded to 8 bits of mantissa.
  RowMatrix<mhc::bf16> out_bf(77, 16);
  mhc::Sinkhorn<mhc::bf16, 4>::forward(A.cast<mhc::bf16>(), out_bf);
  const RowMatrix<double> ref = project<double>(A.cast<mhc::bf16>().cast<double>(), 4);
  CHECK((out_bf.cast<double>() - ref).cwiseAbs().maxCoeff() <= 4e-3);
  // bf16 backward against the double backward of the same (bf16-rounded) inputs: each entry
  // within 2^-8 of its own size (the output's rounding to 8 significant bits) plus 1e-4 of the
  // largest (the float computation).
  const RowMatrix<mhc::bf16> A_bf = A.cast<mhc::bf16>(), G_bf = G.cast<mhc::bf16>();
  RowMatrix<mhc::bf16> d_bf(77, 16);
  mhc::Sinkhorn<mhc::bf16, 4>::backward(A_bf, G_bf, d_bf);
  RowMatrix<double> d_ref(77, 16);
  mhc::Sinkhorn4d::backward(A_bf.cast<double>(), G_bf.cast<double>(), d_ref);
  const double d_max = d_ref.cwiseAbs().maxCoeff();
  CHECK(((d_bf.cast<double>() - d_ref).array().abs() <=
         std::ldexp(1.0, -8) * d_ref.array().abs() + 1e-4 * d_max)
            .all());
}

TEST_CASE("Sinkhorn results do not depend on batch position or thread count", "[sinkhorn]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (int n : {3, 4, 9}) {
    CAPTURE(n);
    const RowMatrix<float> A = random_logits<float>(1001, n, rng, 4.0);
    const RowMatrix<float> all = project(A, n);
    for (Index t : {Index(0), Index(33), Index(1000)}) {
      const RowMatrix<float> one = project<float>(A.row(t), n);
      CHECK(one == all.row(t));
    }
    RowMatrix<float> G(1001, n * n), d1(1001, n * n), d2(1001, n * n);
    mhc_test::fill_uniform(G, rng);
#if defined(_OPENMP)
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    const RowMatrix<float> serial = project(A, n);
    mhc::SinkhornXf::backward(A, G, d1);
    CHECK(serial == all);
#if defined(_OPENMP)
    for (const int threads : {2, 3, 7}) {  // 1001 tokens: uneven for 2 and 3 threads
      CAPTURE(threads);
      omp_set_num_threads(threads);
      CHECK(project(A, n) == serial);
      mhc::SinkhornXf::backward(A, G, d2);
      CHECK(d1 == d2);
    }
    omp_set_num_threads(saved);
#endif
  }
}

TEST_CASE("Sinkhorn runs in place and on padded rows without allocating", "[sinkhorn]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  RowMatrix<float> padded = RowMatrix<float>::Constant(50, 20, 7.0f);
  mhc_test::fill_uniform(padded, rng);
  const RowMatrix<float> logits = padded.leftCols(16);
  const RowMatrix<float> expected = project(logits, 4);
  RowMatrix<float> G(50, 16), dA(50, 16), dAx(50, 16);
  mhc_test::fill_uniform(G, rng);
  RowMatrix<float> dA_expected(50, 16);
  mhc::Sinkhorn4f::backward(logits, G, dA_expected);
  const RowMatrix<float> padding_before = padded.rightCols(4);

  const int asserts_before = mhc_test::g_eigen_assert_failures;
  Eigen::internal::set_is_malloc_allowed(false);
  auto view = mhc::map_batch(padded.data(), 50, 16, 20);
  mhc::Sinkhorn4f::backward(view, G, dA);   // padded input
  mhc::SinkhornXf::backward(view, G, dAx);  // the runtime-n entry
  mhc::Sinkhorn4f::forward(view, view);     // in place on padded rows
  mhc::SinkhornXf::forward(view, view);     // the runtime-n entry, in place again
  Eigen::internal::set_is_malloc_allowed(true);
  CHECK(mhc_test::g_eigen_assert_failures == asserts_before);
  Eigen::internal::set_is_malloc_allowed(false);  // positive control: one allocation is counted
  Eigen::VectorXf heap(1000);
  Eigen::internal::set_is_malloc_allowed(true);
  heap.setZero();
  CHECK(mhc_test::g_eigen_assert_failures == asserts_before + 1);
  mhc_test::g_eigen_assert_failures = asserts_before;

  CHECK(dA == dA_expected);
  CHECK(dAx == dA_expected);
  CHECK(padded.rightCols(4) == padding_before);
  CHECK(project(expected, 4) == padded.leftCols(16));
}

TEST_CASE("Sinkhorn rejects bad arguments and leaves outputs untouched", "[sinkhorn][errors]") {
  using S = mhc::Sinkhorn4f;
  RowMatrix<float> A = RowMatrix<float>::Random(6, 16);
  RowMatrix<float> out = RowMatrix<float>::Constant(6, 16, -3.0f);
  const RowMatrix<float> untouched = out;
  auto rejects = [&](auto&& call, const char* fragment) {
    try {
      call();
      FAIL("no exception");
    } catch (const mhc::invalid_argument& e) {
      CAPTURE(e.what());
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
    }
    CHECK(out == untouched);
  };
  // T = 0 is fine.
  RowMatrix<float> empty(0, 16);
  S::forward(empty, empty);
  S::backward(empty, empty, empty);

  rejects([&] { S::forward(RowMatrix<float>::Zero(6, 9), out); }, "expected n*n = 16");
  rejects([&] { mhc::SinkhornXf::forward(RowMatrix<float>::Zero(6, 15), out); }, "not n*n");
  rejects([&] { mhc::SinkhornXf::forward(RowMatrix<float>::Zero(6, 17 * 17), out); },
          "out of range");
  rejects([&] { S::forward(A.topRows(5), out); }, "out has shape (6, 16), expected (5, 16)");
  rejects([&] { S::forward(A, out, {0}); }, "iterations = 0");
  rejects([&] { S::forward(A, out, {mhc::kMaxSinkhornIterations + 1}); }, "iterations");
  rejects([&] { S::forward(mhc::map_batch(static_cast<const float*>(nullptr), 6, 16), out); },
          "logits is null");
  rejects([&] { S::forward(mhc::map_batch(out.data() + 1, 6, 16, 16), out); },
          "partially overlaps");
  rejects([&] { S::forward(mhc::map_batch(static_cast<const float*>(A.data()), 6, 16, 8), out); },
          "row stride 8");
  rejects([&] { S::backward(A, A, out.topRows(4)); }, "d_logits has shape");
  rejects([&] { S::backward(out, A, out); }, "d_logits overlaps logits");
  std::vector<unsigned char> raw(4 * 6 * 16 + 4);
  rejects(
      [&] {
        S::forward(mhc::map_batch(reinterpret_cast<const float*>(raw.data() + 1), 6, 16), out);
      },
      "not aligned");
}
