// Run-time properties of the operators: no heap allocation on any forward or backward, the fused
// Coefficients + PreMix forward included (EIGEN_RUNTIME_NO_MALLOC, with a positive control), and
// bitwise-identical results on 1, 2, 3 and 7 OpenMP threads (sizes large enough that the
// parallel path is taken).
#include "support/eigen_assert_counter.hpp"  // first: counts Eigen's malloc check

#include <cstring>

#include "support/catch.hpp"
#include "support/ops_testing.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace mhc_test;
using mhc::Index;

namespace {

/// Every operator's inputs and outputs for one (Scalar, N) configuration.
template <typename S, int N>
struct Workload {
  using R = mhc::compute_t<S>;
  int n;
  Index C, T, M;
  CoefParamsD pd;
  RowMat<S> X, y, G, Gu, X_out, u, dX, dXu, dy, fu;  // f*: the fused Coefficients + PreMix
  RowMat<R> hp, hq, H, r, z, dhp, dhq, dH, Gp, Gq, GH, dW, fhp, fhq, fH, fr, fz;
  Eigen::Matrix<R, Eigen::Dynamic, 1> da, dbp, dbq, dbr, ws;

  Workload(int n_, Index C_, Index T_, std::uint64_t seed)
      : n(n_), C(C_), T(T_), M(Index(n_) * n_ + 2 * n_) {
    Rng rng(seed);
    pd = random_coef_params(rng, n, C);
    X = random_matrix(rng, T * n, C).cast<S>();
    y = random_matrix(rng, T, C).cast<S>();
    G = random_matrix(rng, T * n, C).cast<S>();
    Gu = random_matrix(rng, T, C).cast<S>();
    Gp = random_matrix(rng, T, n).cast<R>();
    Gq = random_matrix(rng, T, n).cast<R>();
    GH = random_matrix(rng, T, Index(n) * n).cast<R>();
    X_out.resize(T * n, C), u.resize(T, C), dXu.resize(T * n, C), dy.resize(T, C);
    dX = RowMat<S>::Zero(T * n, C);
    hp.resize(T, n), hq.resize(T, n), H.resize(T, Index(n) * n), r.resize(T, 1), z.resize(T, M);
    fhp.resize(T, n), fhq.resize(T, n), fH.resize(T, Index(n) * n), fr.resize(T, 1);
    fz.resize(T, M), fu.resize(T, C);
    dhp.resize(T, n), dhq.resize(T, n), dH.resize(T, Index(n) * n), dW.resize(Index(n) * C, M);
    da.resize(3), dbp.resize(n), dbq.resize(n), dbr.resize(Index(n) * n);
    ws.resize(mhc::Coefficients<S, N>::workspace_size(T, n, C));
  }

  /// All six operator calls and the fused forward; `params` is built by the caller (binding views
  /// allocates nothing).
  void run(const mhc::CoefficientParams<R>& params) {
    mhc::Coefficients<S, N>::forward(X, params, hp, hq, H, r, z);
    mhc::Coefficients<S, N>::forward(X, params, fhp, fhq, fH, fr, fz, fu);
    mhc::PreMix<S, N>::forward(X, hp, u);
    mhc::Update<S, N>::forward(X, H, hq, y, X_out);
    mhc::Update<S, N>::backward(X, H, hq, y, G, dXu, dH, dhq, dy);
    mhc::PreMix<S, N>::backward(X, hp, Gu, dX, dhp);
    mhc::Coefficients<S, N>::backward(X, params, r, z, Gp, Gq, GH, dX, {dW, da, dbp, dbq, dbr}, ws);
  }

  template <typename A>
  static bool same(const A& a, const A& b) {
    return a.size() == b.size() &&
           std::memcmp(a.data(), b.data(), sizeof(typename A::Scalar) * size_t(a.size())) == 0;
  }
  bool identical(const Workload& o) const {
    return same(X_out, o.X_out) && same(u, o.u) && same(dX, o.dX) && same(dXu, o.dXu) &&
           same(dy, o.dy) && same(hp, o.hp) && same(hq, o.hq) && same(H, o.H) && same(r, o.r) &&
           same(z, o.z) && same(dhp, o.dhp) && same(dhq, o.dhq) && same(dH, o.dH) &&
           same(dW, o.dW) && same(da, o.da) && same(dbp, o.dbp) && same(dbq, o.dbq) &&
           same(dbr, o.dbr) && same(fhp, o.fhp) && same(fhq, o.fhq) && same(fH, o.fH) &&
           same(fr, o.fr) && same(fz, o.fz) && same(fu, o.fu);
  }
};

template <typename S, int N>
void no_malloc_case(int n, Index C, Index T) {
  Workload<S, N> w(n, C, T, fresh_seed());
  CoefParamsView<mhc::compute_t<S>> pv(w.pd);
  const int before = g_eigen_assert_failures;
  Eigen::internal::set_is_malloc_allowed(false);
  w.run(pv.params);
  // Static-only mode as well.
  mhc::RowMatrix<mhc::compute_t<S>> W0(0, w.M), dW0(0, w.M);
  const mhc::CoefficientParams<mhc::compute_t<S>> sp{W0, pv.params.alpha, pv.b_pre, pv.b_post,
                                                     pv.b_res};
  auto hp1 = w.hp.topRows(1), hq1 = w.hq.topRows(1), H1 = w.H.topRows(1);
  mhc::Coefficients<S, N>::forward(w.X, sp, hp1, hq1, H1, w.r, w.z);
  mhc::Coefficients<S, N>::forward(w.X, sp, hp1, hq1, H1, w.r, w.z, w.fu);
  mhc::Coefficients<S, N>::backward(w.X, sp, w.r, w.z, w.Gp, w.Gq, w.GH, w.dX,
                                    {dW0, w.da, w.dbp, w.dbq, w.dbr}, w.ws.head(0));
  Eigen::internal::set_is_malloc_allowed(true);
  CHECK(g_eigen_assert_failures == before);
}

#if defined(_OPENMP)
template <typename S, int N>
void threads_case(int n, Index C, Index T) {
  const auto seed = fresh_seed();
  CAPTURE(seed, n, C, T, N, sizeof(S));
  Workload<S, N> one(n, C, T, seed);
  CoefParamsView<mhc::compute_t<S>> pv(one.pd);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  one.run(pv.params);
  // 2, 3 and 7 threads: token counts that do not divide evenly, more threads than cores
  for (const int threads : {2, 3, 7}) {
    CAPTURE(threads);
    Workload<S, N> many(n, C, T, seed);
    omp_set_num_threads(threads);
    many.run(pv.params);
    omp_set_num_threads(saved);
    CHECK(one.identical(many));
  }
}
#endif

}  // namespace

TEST_CASE("EIGEN_RUNTIME_NO_MALLOC catches a heap allocation (positive control)", "[runtime]") {
  const int before = g_eigen_assert_failures;
  Eigen::internal::set_is_malloc_allowed(false);
  Eigen::VectorXd v(1000);
  Eigen::internal::set_is_malloc_allowed(true);
  v.setZero();
  CHECK(g_eigen_assert_failures == before + 1);
  g_eigen_assert_failures = before;
}

TEST_CASE("No operator allocates on the heap", "[runtime]") {
  no_malloc_case<float, 4>(4, 300, 37);
  no_malloc_case<mhc::bf16, 4>(4, 70, 9);
  no_malloc_case<double, mhc::Dynamic>(3, 65, 11);
}

TEST_CASE("Results are bitwise identical on 1, 2, 3 and 7 threads", "[runtime][threads]") {
#if defined(_OPENMP)
  threads_case<float, 4>(4, 1100, 80);  // > kMinParallelWork for every pass
  threads_case<mhc::bf16, 4>(4, 1100, 80);
  // rows of two jobs of the fused backward pass with the AVX-512 register passes (2048 columns)
  threads_case<float, 4>(4, 2100, 40);
  threads_case<mhc::bf16, 4>(4, 2100, 40);
  threads_case<double, mhc::Dynamic>(3, 1000, 120);
#else
  WARN("built without OpenMP: nothing to compare");
#endif
}
