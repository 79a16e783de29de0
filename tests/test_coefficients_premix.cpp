// Coefficients::forward with the pre-mix fused in (the overload with u): every output bit for bit
// what Coefficients::forward followed by PreMix::forward gives, for float, double and bf16
// storage, compile-time and run-time n, the mHC / HC / mHC-lite mappings, padded row strides,
// static-only mode, and token counts around the fused steps (16) and the jobs (48); bad
// arguments rejected before anything is written. (No-allocation and thread-count checks of the
// fused call are in test_operators_runtime.cpp.)
#include <cstring>

#include "support/catch.hpp"
#include "support/ops_testing.hpp"

using namespace mhc_test;
using mhc::Index;

namespace {

template <typename S, int N, typename Mapping = mhc::MhcVariant>
void fused_case(int n, Index C, Index T, bool is_static, Index pad) {
  using R = mhc::compute_t<S>;
  using Op = mhc::Coefficients<S, N, Mapping>;
  const auto seed = fresh_seed();
  CAPTURE(seed, n, C, T, N, sizeof(S), is_static, pad, Mapping::name);
  Rng rng(seed);
  CoefParamsD pd = random_coef_params(rng, n, C);
  pd.W = random_matrix(rng, is_static ? 0 : n * C, Op::projection_size(n), -0.5, 0.5);
  pd.b_res = random_matrix(rng, Op::res_size(n), 1);
  CoefParamsView<R> pv(pd);
  const Index M = Op::projection_size(n), rows = is_static ? 1 : T;
  Padded<S> X(T * n, C, pad);
  X.assign(random_matrix(rng, T * n, C));
  // two sets of outputs, filled with different sentinels so that untouched padding differs too
  struct Outs {
    Padded<R> hp, hq, H, r, z;
    Padded<S> u;
    Outs(Index rows_, Index T_, int n_, Index C_, Index M_, Index pad_)
        : hp(rows_, n_, pad_),
          hq(rows_, n_, pad_),
          H(rows_, Index(n_) * n_, pad_),
          r(T_, 1, pad_),
          z(T_, M_, pad_),
          u(T_, C_, pad_) {}
  };
  Outs a(rows, T, n, C, M, pad), b(rows, T, n, C, M, pad);
  Op::forward(X.cview(), pv.params, a.hp.view(), a.hq.view(), a.H.view(), a.r.view(), a.z.view());
  mhc::PreMix<S, N>::forward(X.cview(), a.hp.cview(), a.u.view());
  Op::forward(X.cview(), pv.params, b.hp.view(), b.hq.view(), b.H.view(), b.r.view(), b.z.view(),
              b.u.view());
  CHECK(a.hp.same_bytes(b.hp));
  CHECK(a.hq.same_bytes(b.hq));
  CHECK(a.H.same_bytes(b.H));
  CHECK(a.r.same_bytes(b.r));  // static-only: neither call touches r, z
  CHECK(a.z.same_bytes(b.z));
  CHECK(a.u.same_bytes(b.u));
  // and u is the pre-mix of the coefficients (so the comparison above is not vacuous)
  const RowMat<double> u_ref = premix_ref(X.to_double(), a.hp.to_double(), n);
  CHECK((b.u.to_double() - u_ref).cwiseAbs().maxCoeff() <=
        (std::is_same<S, mhc::bf16>::value ? 1e-2 : 1e-4) * (1 + u_ref.cwiseAbs().maxCoeff()));
}

template <typename S>
void storage_cases() {
  for (const Index T : {1, 5, 16, 17, 33, 48, 49, 100})
    for (const Index C : {1, 3, 64, 257}) {
      fused_case<S, 4>(4, C, T, false, 0);
      fused_case<S, mhc::Dynamic>(3, C, T, false, 0);
    }
  for (const int n : {1, 2, 8}) {
    fused_case<S, mhc::Dynamic>(n, 65, 50, false, 0);
    fused_case<S, mhc::Dynamic>(n, 65, 7, true, 0);
  }
  fused_case<S, 1>(1, 130, 40, false, 5);
  fused_case<S, 2>(2, 64, 97, false, 0);
  fused_case<S, 8>(8, 33, 21, false, 3);
  fused_case<S, 4>(4, 1088, 50, false, 0);  // 17 whole column blocks (bf16: the pre-mix row walk)
  fused_case<S, 4>(4, 257, 33, false, 7);   // padded row strides everywhere
  fused_case<S, 4>(4, 64, 9, true, 2);      // static-only
}

}  // namespace

TEST_CASE("Fused Coefficients + PreMix forward equals the two calls bit for bit (float)",
          "[coefficients][premix][fused]") {
  storage_cases<float>();
}

TEST_CASE("Fused Coefficients + PreMix forward equals the two calls bit for bit (double, bf16)",
          "[coefficients][premix][fused]") {
  storage_cases<double>();
  storage_cases<mhc::bf16>();
}

TEST_CASE("Fused Coefficients + PreMix forward with the HC and mHC-lite mappings",
          "[coefficients][premix][fused]") {
  for (const Index T : {5, 33, 49}) {
    fused_case<float, 4, mhc::HcVariant>(4, 70, T, false, 0);
    fused_case<float, 4, mhc::MhcLiteVariant>(4, 70, T, false, 0);
    fused_case<float, 3, mhc::MhcLiteVariant>(3, 64, T, false, 1);
    fused_case<mhc::bf16, 4, mhc::MhcLiteVariant>(4, 64, T, false, 0);
  }
}

TEST_CASE("Fused Coefficients + PreMix forward rejects bad arguments before writing anything",
          "[coefficients][premix][fused][errors]") {
  CoefErrorCase c;
  constexpr int n = CoefErrorCase::n;
  constexpr Index T = CoefErrorCase::T, C = CoefErrorCase::C, M = CoefErrorCase::M;
  using Op = CoefErrorCase::Op;
  const auto& p = c.pv.params;
  RowMat<float> u = RowMat<float>::Constant(T, C, 9.f);
  const RowMat<float> u0 = u;
  // a call with everything valid except the u (or the argument) given
  const auto fused = [&](const auto& X, auto&& z, auto&& u_) {
    Op::forward(X, p, c.hp, c.hq, c.H, c.r, z, u_);
  };

  // u of the wrong shape, null, or with a stride below C
  CHECK_THROWS_AS(fused(c.X, c.z, u.topRows(T - 1)), mhc::invalid_argument);
  CHECK_THROWS_AS(fused(c.X, c.z, u.leftCols(C - 1)), mhc::invalid_argument);
  CHECK_THROWS_AS(fused(c.X, c.z, mhc::map_batch(u.data(), T, C, C - 1)), mhc::invalid_argument);
  CHECK_THROWS_AS(fused(c.X, c.z, mhc::map_batch(static_cast<float*>(nullptr), T, C)),
                  mhc::invalid_argument);
  // u overlapping X, a parameter or another output
  RowMat<float> Xc = c.X;
  CHECK_THROWS_AS(fused(Xc, c.z, mhc::map_batch(Xc.data() + 2, T, C)), mhc::invalid_argument);
  CHECK_THROWS_AS(fused(c.X, c.z, mhc::map_batch(c.pv.W.data(), T, C)), mhc::invalid_argument);
  CHECK_THROWS_AS(fused(c.X, c.z, mhc::map_batch(c.H.data(), T, C, n * n)), mhc::invalid_argument);
  RowMat<float> big = RowMat<float>::Constant(T, 40, 9.f);
  const RowMat<float> big0 = big;
  CHECK_THROWS_AS(fused(c.X, mhc::map_batch(big.data(), T, M, 40),
                        mhc::map_batch(big.data() + 5, T, C, 40)),  // shares rows with z
                  mhc::invalid_argument);
  // the usual forward errors still come first
  CHECK_THROWS_AS(fused(c.X.topRows(T * n - 1), c.z, u), mhc::invalid_argument);
  CHECK_THROWS_AS(fused(c.X, c.z.leftCols(M - 1), u), mhc::invalid_argument);
  CHECK(c.untouched());
  CHECK(u == u0);
  CHECK(big == big0);

  // static-only mode: X is read for u, so its shape is checked against u and n
  RowMat<float> W0(0, M);
  const mhc::CoefficientParams<float> sp{W0, p.alpha, c.pv.b_pre, c.pv.b_post, c.pv.b_res};
  auto hp1 = c.hp.topRows(1), hq1 = c.hq.topRows(1), H1 = c.H.topRows(1);
  CHECK_THROWS_AS(Op::forward(c.X.topRows(T * n - 1), sp, hp1, hq1, H1, c.r, c.z, u),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(Op::forward(c.X.topRows(T * n - n), sp, hp1, hq1, H1, c.r, c.z, u),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(Op::forward(c.X, sp, mhc::map_batch(big.data() + 3, 1, n, n), hq1, H1, c.r, c.z,
                              mhc::map_batch(big.data(), T, C, 40)),
                  mhc::invalid_argument);
  CHECK(c.untouched());
  CHECK(u == u0);
  CHECK(big == big0);
  // and where it is valid it writes the one coefficient row and u
  Op::forward(c.X, sp, hp1, hq1, H1, c.r, c.z, u);
  CHECK(c.r == c.r0);
  CHECK(c.z == c.z0);
  CHECK(c.hp.bottomRows(T - 1) == c.hp0.bottomRows(T - 1));
  const RowMat<double> u_ref = premix_ref(c.X.cast<double>(), hp1.cast<double>(), n);
  CHECK((u.cast<double>() - u_ref).cwiseAbs().maxCoeff() < 1e-5);
}
