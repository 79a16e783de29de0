// Coefficients (X -> r, z, h_pre, h_post, H_res): forward against the definition of spec 2.1-2.5
// written independently in double, backward against central finite differences in double for X,
// W, alpha (3), b_pre, b_post and b_res; static-only mode; argument errors. The same for the HC
// and mHC-lite mappings (Coefficients<S, N, HcVariant / MhcLiteVariant>), whose forward is also
// checked in float storage against the double reference. Where the AVX2 kernels compile in, the
// AVX2 projection tile against a chain of std::fma over its rows, bit for bit.
#include <algorithm>
#include <numeric>
#include <vector>

#include "support/catch.hpp"
#include "support/ops_testing.hpp"

using namespace mhc_test;
using mhc::Index;

namespace {

struct Shape {
  int n;
  Index C, T;
};
const Shape kShapes[] = {{1, 1, 1},   {1, 257, 5}, {2, 3, 33}, {2, 64, 1},  {4, 1, 5},
                         {4, 64, 33}, {4, 257, 1}, {8, 3, 5},  {8, 257, 5}, {8, 64, 1}};

/// The library's forward in double for the given inputs (loss evaluations use the reference).
struct Run {
  RowMat<double> h_pre, h_post, H_res, r, z;
};
template <int N>
Run run_forward(const RowMat<double>& X, const CoefParamsD& pd, int n, Index pad = 0) {
  const bool is_static = pd.W.rows() == 0;
  const Index T = X.rows() / n, R = is_static ? 1 : T;
  CoefParamsView<double> pv(pd);
  Padded<double> Xp(X.rows(), X.cols(), pad);
  Xp.assign(X);
  Run o;
  o.h_pre.resize(R, n);
  o.h_post.resize(R, n);
  o.H_res.resize(R, Index(n) * n);
  o.r.resize(is_static ? 0 : T, 1);
  o.z.resize(is_static ? 0 : T, Index(n) * n + 2 * n);
  mhc::Coefficients<double, N>::forward(Xp.cview(), pv.params, o.h_pre, o.h_post, o.H_res, o.r,
                                        o.z);
  return o;
}

template <int N>
void gradient_case(const Shape& s, bool is_static, bool near_identity) {
  const int n = s.n;
  const auto seed = fresh_seed();
  CAPTURE(seed, n, s.C, s.T, N, is_static, near_identity);
  Rng rng(seed);
  const Index M = Index(n) * n + 2 * n;
  const RowMat<double> X = random_matrix(rng, s.T * n, s.C);
  CoefParamsD p = random_coef_params(rng, n, s.C, is_static);
  if (near_identity)  // the documented fresh-block init: H_res close to the identity
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) p.b_res[i * n + j] = i == j ? 3.0 : -3.0;

  // Forward against the reference.
  const Index pad = s.C % 2 == 1 ? 3 : 0;
  const Run run = run_forward<N>(X, p, n, pad);
  const CoefOutD ref = coefficients_ref(X, p, n);
  CHECK((run.h_pre - ref.h_pre).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((run.h_post - ref.h_post).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((run.H_res - ref.H_res).cwiseAbs().maxCoeff() < 1e-12);
  if (!is_static) {
    CHECK((run.r - ref.r).cwiseAbs().maxCoeff() < 1e-12);
    CHECK((run.z - ref.z).cwiseAbs().maxCoeff() < 1e-11);
  }

  // Backward.
  const RowMat<double> Gp = random_matrix(rng, s.T, n), Gq = random_matrix(rng, s.T, n),
                       GH = random_matrix(rng, s.T, Index(n) * n);
  // Per-token cotangents; with one static row the loss sees the row once per token.
  const auto expand = [&](const RowMat<double>& row) {
    RowMat<double> e(s.T, row.cols());
    for (Index t = 0; t < s.T; ++t) e.row(t) = row.row(row.rows() == 1 ? 0 : t);
    return e;
  };
  const auto loss_of = [&](const RowMat<double>& x, const CoefParamsD& q) {
    const CoefOutD o = coefficients_ref(x, q, n);
    return dot(Gp, expand(o.h_pre)) + dot(Gq, expand(o.h_post)) + dot(GH, expand(o.H_res));
  };
  CoefParamsView<double> pv(p);
  Padded<double> Xp(X.rows(), X.cols(), pad), dXp(X.rows(), X.cols(), pad);
  Xp.assign(X);
  const RowMat<double> D0 = random_matrix(rng, X.rows(), X.cols());
  dXp.assign(D0);
  RowMat<double> dW(p.W.rows(), M);
  Eigen::VectorXd d_alpha(3), db_pre(n), db_post(n), db_res(Index(n) * n);
  using Op = mhc::Coefficients<double, N>;
  Eigen::VectorXd ws(Op::workspace_size(s.T, n, s.C, is_static));
  Op::backward(Xp.cview(), pv.params, run.r, run.z, Gp, Gq, GH, dXp.view(),
               {dW, d_alpha, db_pre, db_post, db_res}, ws);

  if (is_static) {
    CHECK(dXp.to_double() == D0);  // static coefficients do not depend on X
  } else {
    const RowMat<double> dX = dXp.to_double() - D0;
    const auto gX = check_gradient(
        [&](const Eigen::VectorXd& v) { return loss_of(unflat(v, X.rows(), X.cols()), p); },
        flat(X), flat(dX), rng, 1e-6, fd_coords(60));
    CAPTURE(gX.worst, gX.analytic, gX.numeric);
    CHECK(gX.max_error < 1e-6);
  }
  check_parameter_gradients(loss_of, X, p, {dW, d_alpha, db_pre, db_post, db_res}, is_static, rng);
  if (is_static) CHECK(d_alpha.isZero(0));  // z = 0: alpha has no effect
}

template <int N>
void run_shape(const Shape& s) {
  gradient_case<N>(s, false, false);
  gradient_case<N>(s, true, false);
}

// ---- HC and mHC-lite mappings ----------------------------------------------------------------

enum class Mapping { hc, lite };

Index mapping_width(Mapping m, int n) {  // M
  Index f = 1;
  for (int k = 2; k <= n; ++k) f *= k;
  return m == Mapping::hc ? Index(n) * n + 2 * n : f + 2 * n;
}
Index mapping_res(Mapping m, int n) { return mapping_width(m, n) - 2 * n; }  // R

/// HC / mHC-lite coefficients from their definitions (spec section 4), in double:
///   HC:   h_pre = alpha_pre tanh(z_pre) + b_pre, h_post likewise, H_res = alpha_res tanh(z_res) + b_res
///   lite: sigmoid gates as mHC; H_res = sum_k softmax(alpha_res z_res + b_res)_k P_k over the n!
///         permutations in lexicographic order.
CoefOutD mapping_ref(Mapping m, const RowMat<double>& X, const CoefParamsD& p, int n) {
  const Index M = mapping_width(m, n), R = mapping_res(m, n);
  const bool is_static = p.W.rows() == 0;
  const Index T = is_static ? 1 : X.rows() / n;
  CoefOutD o;
  o.h_pre.resize(T, n);
  o.h_post.resize(T, n);
  o.H_res.setZero(T, Index(n) * n);
  o.r.resize(T, 1);
  o.z.resize(T, M);
  for (Index t = 0; t < T; ++t) {
    Eigen::VectorXd z = Eigen::VectorXd::Zero(M);
    if (!is_static) project_ref(X, p, n, t, o.r(t, 0), z), o.z.row(t) = z.transpose();
    if (m == Mapping::hc) {
      for (int i = 0; i < n; ++i) {
        o.h_pre(t, i) = p.alpha[0] * std::tanh(z[i]) + p.b_pre[i];
        o.h_post(t, i) = p.alpha[1] * std::tanh(z[n + i]) + p.b_post[i];
      }
      for (Index k = 0; k < R; ++k) o.H_res(t, k) = p.alpha[2] * std::tanh(z[2 * n + k]) + p.b_res[k];
    } else {
      for (int i = 0; i < n; ++i) {
        o.h_pre(t, i) = sigmoid(p.alpha[0] * z[i] + p.b_pre[i]);
        o.h_post(t, i) = 2 * sigmoid(p.alpha[1] * z[n + i] + p.b_post[i]);
      }
      Eigen::VectorXd w(R);
      for (Index k = 0; k < R; ++k) w[k] = std::exp(p.alpha[2] * z[2 * n + k] + p.b_res[k]);
      w /= w.sum();
      std::vector<int> perm(n);
      std::iota(perm.begin(), perm.end(), 0);
      for (Index k = 0; k < R; ++k, std::next_permutation(perm.begin(), perm.end()))
        for (int i = 0; i < n; ++i) o.H_res(t, i * n + perm[i]) += w[k];
    }
  }
  return o;
}

template <typename Variant, int N>
void mapping_gradient_case(Mapping m, int n, Index C, Index T, bool is_static) {
  const auto seed = fresh_seed();
  CAPTURE(seed, Variant::name, n, C, T, N, is_static);
  Rng rng(seed);
  const Index M = mapping_width(m, n), R = mapping_res(m, n);
  const RowMat<double> X = random_matrix(rng, T * n, C);
  CoefParamsD p = random_coef_params(rng, n, C, is_static);
  p.W = is_static ? RowMat<double>(0, M)
                  : RowMat<double>(random_matrix(rng, Index(n) * C, M) * (1.7 / std::sqrt(double(n * C))));
  p.b_res = Eigen::VectorXd(R);
  for (Index k = 0; k < R; ++k) p.b_res[k] = uniform(rng, -1.5, 1.5);

  using Op = mhc::Coefficients<double, N, Variant>;
  REQUIRE(Op::projection_size(n) == M);
  REQUIRE(Op::res_size(n) == R);
  const Index rows = is_static ? 1 : T;
  const Index pad = C % 2 == 1 ? 3 : 0;
  CoefParamsView<double> pv(p);
  Padded<double> Xp(X.rows(), X.cols(), pad), dXp(X.rows(), X.cols(), pad);
  Xp.assign(X);
  RowMat<double> hp(rows, n), hq(rows, n), H(rows, Index(n) * n), r(is_static ? 0 : T, 1),
      z(is_static ? 0 : T, M);
  Op::forward(Xp.cview(), pv.params, hp, hq, H, r, z);
  const CoefOutD ref = mapping_ref(m, X, p, n);
  CHECK((hp - ref.h_pre).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((hq - ref.h_post).cwiseAbs().maxCoeff() < 1e-12);
  CHECK((H - ref.H_res).cwiseAbs().maxCoeff() < 1e-12);
  if (!is_static) {
    CHECK((r - ref.r).cwiseAbs().maxCoeff() < 1e-12);
    CHECK((z - ref.z).cwiseAbs().maxCoeff() < 1e-11);
    // float storage and compute against the same reference: with AVX-512 and M % 8 == 0 (HC with
    // n = 4: M = 24, mHC-lite with n = 4: M = 32) this runs the register tile of
    // detail/projection_avx512.hpp, elsewhere the portable one.
    CoefParamsView<float> pf(p);
    Padded<float> Xf(X.rows(), X.cols(), pad);
    Xf.assign(X);
    RowMat<float> fp(T, n), fq(T, n), fH(T, Index(n) * n), fr(T, 1), fz(T, M);
    mhc::Coefficients<float, N, Variant>::forward(Xf.cview(), pf.params, fp, fq, fH, fr, fz);
    const double z_scale = 1.0 + ref.z.cwiseAbs().maxCoeff();
    CHECK((fz.cast<double>() - ref.z).cwiseAbs().maxCoeff() < 1e-5 * z_scale);
    CHECK((fr.cast<double>() - ref.r).cwiseAbs().maxCoeff() < 1e-5 * ref.r.cwiseAbs().maxCoeff());
    CHECK((fp.cast<double>() - ref.h_pre).cwiseAbs().maxCoeff() < 1e-5);
    CHECK((fq.cast<double>() - ref.h_post).cwiseAbs().maxCoeff() < 1e-5);
    CHECK((fH.cast<double>() - ref.H_res).cwiseAbs().maxCoeff() < 1e-4);
  }

  const RowMat<double> Gp = random_matrix(rng, T, n), Gq = random_matrix(rng, T, n),
                       GH = random_matrix(rng, T, Index(n) * n);
  const auto expand = [&](const RowMat<double>& row) {
    RowMat<double> e(T, row.cols());
    for (Index t = 0; t < T; ++t) e.row(t) = row.row(row.rows() == 1 ? 0 : t);
    return e;
  };
  const auto loss_of = [&](const RowMat<double>& x, const CoefParamsD& q) {
    const CoefOutD o = mapping_ref(m, x, q, n);
    return dot(Gp, expand(o.h_pre)) + dot(Gq, expand(o.h_post)) + dot(GH, expand(o.H_res));
  };
  const RowMat<double> D0 = random_matrix(rng, X.rows(), X.cols());
  dXp.assign(D0);
  RowMat<double> dW(p.W.rows(), M);
  Eigen::VectorXd d_alpha(3), db_pre(n), db_post(n), db_res(R);
  Eigen::VectorXd ws(Op::workspace_size(T, n, C, is_static));
  Op::backward(Xp.cview(), pv.params, r, z, Gp, Gq, GH, dXp.view(),
               {dW, d_alpha, db_pre, db_post, db_res}, ws);
  if (is_static) {
    CHECK(dXp.to_double() == D0);
  } else {
    const RowMat<double> dX = dXp.to_double() - D0;
    const auto gX = check_gradient(
        [&](const Eigen::VectorXd& v) { return loss_of(unflat(v, X.rows(), X.cols()), p); },
        flat(X), flat(dX), rng, 1e-6, fd_coords(60));
    CAPTURE(gX.worst, gX.analytic, gX.numeric);
    CHECK(gX.max_error < 1e-6);
    // float storage and compute against this double backward (same r, z): with AVX-512 or AVX2
    // + FMA and a compile-time n the fused d_X / d_W pass runs its register passes (at most 12
    // coefficients per pass with AVX-512, 6 with AVX2: HC n = 4, M = 24: two or four passes;
    // mHC-lite n = 4, M = 32: three or six), elsewhere the portable loop.
    CoefParamsView<float> pf(p);
    Padded<float> Xf(X.rows(), X.cols(), pad), dXf(X.rows(), X.cols(), pad);
    Xf.assign(X);
    dXf.assign(D0);
    const RowMat<double> D0f = dXf.to_double();
    RowMat<float> dWf(p.W.rows(), M);
    Eigen::VectorXf fa(3), fbp(n), fbq(n), fbr(R);
    Eigen::VectorXf wsf(mhc::Coefficients<float, N, Variant>::workspace_size(T, n, C));
    const RowMat<float> rf = r.cast<float>(), zf = z.cast<float>();
    mhc::Coefficients<float, N, Variant>::backward(Xf.cview(), pf.params, rf, zf, Gp.cast<float>(),
                                                   Gq.cast<float>(), GH.cast<float>(), dXf.view(),
                                                   {dWf, fa, fbp, fbq, fbr}, wsf);
    const double dx_scale = 1.0 + dX.cwiseAbs().maxCoeff() + D0.cwiseAbs().maxCoeff();
    CHECK((dXf.to_double() - D0f - dX).cwiseAbs().maxCoeff() < 1e-5 * dx_scale);
    CHECK((dWf.cast<double>() - dW).cwiseAbs().maxCoeff() <
          1e-5 * (1.0 + dW.cwiseAbs().maxCoeff()));
  }
  check_parameter_gradients(loss_of, X, p, {dW, d_alpha, db_pre, db_post, db_res}, is_static, rng);
}

template <typename Variant, int N>
void mapping_cases(Mapping m, int n, Index C, Index T) {
  mapping_gradient_case<Variant, N>(m, n, C, T, false);
  mapping_gradient_case<Variant, N>(m, n, C, T, true);
}

}  // namespace

TEST_CASE("Coefficients with the HC and mHC-lite mappings: forward matches the definition, "
          "backward matches finite differences",
          "[coefficients][variants]") {
  using mhc::Dynamic;
  using mhc::HcVariant;
  using mhc::MhcLiteVariant;
  const Mapping hc = Mapping::hc, lite = Mapping::lite;
  // HC: width n^2 + 2n, as mHC.
  mapping_cases<HcVariant, Dynamic>(hc, 1, 5, 3);
  mapping_cases<HcVariant, Dynamic>(hc, 3, 17, 13);
  mapping_cases<HcVariant, 2>(hc, 2, 33, 5);
  mapping_cases<HcVariant, 4>(hc, 4, 64, 13);
  mapping_cases<HcVariant, 4>(hc, 4, 75, 70);  // > 1 chunk of the fused pass, a partial strip
  // mHC-lite: width n! + 2n (smaller than n^2 + 2n for n <= 3, larger for n = 4, 5).
  mapping_cases<MhcLiteVariant, Dynamic>(lite, 1, 5, 3);
  mapping_cases<MhcLiteVariant, Dynamic>(lite, 2, 7, 13);
  mapping_cases<MhcLiteVariant, Dynamic>(lite, 5, 7, 3);
  mapping_cases<MhcLiteVariant, 3>(lite, 3, 17, 13);
  mapping_cases<MhcLiteVariant, 4>(lite, 4, 64, 13);
  mapping_cases<MhcLiteVariant, 5>(lite, 5, 3, 5);
}

TEST_CASE("Coefficients with the mHC-lite mapping reject n > 5 and W of the mHC width",
          "[coefficients][variants][errors]") {
  Rng rng(fresh_seed());
  {
    const int n = 6;
    CoefParamsD pd = random_coef_params(rng, n, 2, true);
    CoefParamsView<float> pv(pd);
    RowMat<float> hp(1, n), hq(1, n), H(1, n * n), r(0, 1), z(0, 1);
    hp.setConstant(7.f);
    CHECK_THROWS_AS((mhc::Coefficients<float, mhc::Dynamic, mhc::MhcLiteVariant>::forward(
                        RowMat<float>(0, 2), pv.params, hp, hq, H, r, z)),
                    mhc::invalid_argument);
    CHECK((hp.array() == 7.f).all());
  }
  {
    const int n = 4;
    const Index C = 3, T = 2;
    CoefParamsD pd = random_coef_params(rng, n, C);  // W is (nC, n^2 + 2n) = 24 columns, not 32
    pd.b_res = Eigen::VectorXd::Zero(24);
    CoefParamsView<float> pv(pd);
    const RowMat<float> X = random_matrix(rng, T * n, C).cast<float>();
    RowMat<float> hp(T, n), hq(T, n), H(T, n * n), r(T, 1), z(T, 32);
    hp.setConstant(7.f);
    CHECK_THROWS_AS((mhc::Coefficients<float, 4, mhc::MhcLiteVariant>::forward(X, pv.params, hp, hq,
                                                                              H, r, z)),
                    mhc::invalid_argument);
    CHECK((hp.array() == 7.f).all());
  }
}

TEST_CASE("Coefficients: forward matches the definition, backward matches finite differences",
          "[coefficients]") {
  for (const Shape& s : kShapes) {
    run_shape<mhc::Dynamic>(s);
    switch (s.n) {
      case 1:
        run_shape<1>(s);
        break;
      case 2:
        run_shape<2>(s);
        break;
      case 4:
        run_shape<4>(s);
        break;
      case 8:
        run_shape<8>(s);
        break;
    }
  }
  gradient_case<4>({4, 64, 5}, false, true);
  // more tokens than two chunks of the fused d_X / d_W pass (64 tokens), with a partial third
  gradient_case<4>({4, 40, 150}, false, false);
}

TEST_CASE("Coefficients: rows of H_res sum to one, h_pre in (0, 1), h_post in (0, 2)",
          "[coefficients]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const int n = 4;
  const RowMat<double> X = random_matrix(rng, 9 * n, 100, -3, 3);
  const CoefParamsD p = random_coef_params(rng, n, 100);
  const Run o = run_forward<4>(X, p, n);
  CHECK(o.h_pre.minCoeff() > 0);
  CHECK(o.h_pre.maxCoeff() < 1);
  CHECK(o.h_post.minCoeff() > 0);
  CHECK(o.h_post.maxCoeff() < 2);
  for (Index t = 0; t < 9; ++t)
    for (int i = 0; i < n; ++i) CHECK(std::abs(o.H_res.row(t).segment(i * n, n).sum() - 1) < 1e-12);
}

TEST_CASE("Coefficients reject bad arguments before writing anything", "[coefficients][errors]") {
  CoefErrorCase c;
  constexpr int n = CoefErrorCase::n;
  constexpr Index T = CoefErrorCase::T, C = CoefErrorCase::C, M = CoefErrorCase::M;
  using Op = CoefErrorCase::Op;
  const RowMat<float>& X = c.X;
  const CoefParamsD& pd = c.pd;
  CoefParamsView<float>& pv = c.pv;
  RowMat<float>& hp = c.hp;
  RowMat<float>& hq = c.hq;
  RowMat<float>& H = c.H;
  RowMat<float>& r = c.r;
  RowMat<float>& z = c.z;
  Rng& rng = c.rng;
  const auto untouched = [&] { return c.untouched(); };
  auto p = pv.params;

  CHECK_THROWS_AS(Op::forward(X.topRows(T * n - 1), p, hp, hq, H, r, z), mhc::invalid_argument);
  CHECK_THROWS_AS(Op::forward(X.leftCols(C - 1), p, hp, hq, H, r, z), mhc::invalid_argument);
  CHECK_THROWS_AS(Op::forward(X, p, hp.topRows(2), hq, H, r, z), mhc::invalid_argument);
  CHECK_THROWS_AS(Op::forward(X, p, hp, hq, H, r, z.leftCols(M - 1)), mhc::invalid_argument);
  CHECK_THROWS_AS(Op::forward(mhc::map_batch(X.data(), T * n, C, C - 2), p, hp, hq, H, r, z),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(
      Op::forward(mhc::map_batch(static_cast<const float*>(nullptr), T * n, C), p, hp, hq, H, r, z),
      mhc::invalid_argument);
  CHECK_THROWS_AS(Op::forward(X, p, hp, hp, H, r, z), mhc::invalid_argument);  // outputs overlap
  {
    auto q = p;
    q.iterations = 0;
    CHECK_THROWS_AS(Op::forward(X, q, hp, hq, H, r, z), mhc::invalid_argument);
  }
  {
    auto q = p;
    q.eps = 0;
    CHECK_THROWS_AS(Op::forward(X, q, hp, hq, H, r, z), mhc::invalid_argument);
  }
  {
    auto q = p;
    q.alpha[1] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(Op::forward(X, q, hp, hq, H, r, z), mhc::invalid_argument);
  }
  {
    Eigen::VectorXf b3 = Eigen::VectorXf::Zero(3);
    mhc::CoefficientParams<float> q{pv.W, pd.alpha.cast<float>(), b3, pv.b_post, pv.b_res};
    CHECK_THROWS_AS(Op::forward(X, q, hp, hq, H, r, z), mhc::invalid_argument);  // n = 3 != 4
    RowMat<float> W_bad = RowMat<float>::Zero(n * C, M - 1);
    mhc::CoefficientParams<float> q2{W_bad, pd.alpha.cast<float>(), pv.b_pre, pv.b_post, pv.b_res};
    CHECK_THROWS_AS(Op::forward(X, q2, hp, hq, H, r, z), mhc::invalid_argument);
    Eigen::VectorXf b17 = Eigen::VectorXf::Zero(17);
    mhc::CoefficientParams<float> q3{pv.W, pd.alpha.cast<float>(), b17, b17, b17};
    CHECK_THROWS_AS((mhc::Coefficients<float, mhc::Dynamic>::forward(X, q3, hp, hq, H, r, z)),
                    mhc::invalid_argument);
  }
  CHECK(untouched());

  // Backward.
  Op::forward(X, p, hp, hq, H, r, z);
  RowMat<float> dX = RowMat<float>::Constant(T * n, C, 5.f),
                dW = RowMat<float>::Constant(n * C, M, 5.f);
  Eigen::VectorXf da = Eigen::VectorXf::Constant(3, 5.f), dbp = Eigen::VectorXf::Constant(n, 5.f),
                  dbq = dbp, dbr = Eigen::VectorXf::Constant(n * n, 5.f);
  const RowMat<float> dX0 = dX, dW0 = dW;
  Eigen::VectorXf ws(Op::workspace_size(T, n, C));
  const RowMat<float> G = random_matrix(rng, T, n).cast<float>(),
                      GH = random_matrix(rng, T, n * n).cast<float>();
  const auto bw_untouched = [&] {
    return dX == dX0 && dW == dW0 && (da.array() == 5.f).all() && (dbp.array() == 5.f).all() &&
           (dbq.array() == 5.f).all() && (dbr.array() == 5.f).all();
  };
  Eigen::VectorXf small_ws(ws.size() - 1);
  CHECK_THROWS_AS(Op::backward(X, p, r, z, G, G, GH, dX, {dW, da, dbp, dbq, dbr}, small_ws),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(Op::backward(X, p, r, z, G, G, GH.leftCols(3), dX, {dW, da, dbp, dbq, dbr}, ws),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(Op::backward(X, p, r, z, G, G, GH, dX, {dW.topRows(3), da, dbp, dbq, dbr}, ws),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(Op::backward(X, p, r, z, G, G, GH, dX, {dW, da, dbp, dbp, dbr}, ws),
                  mhc::invalid_argument);  // d_b_pre and d_b_post are one buffer
  CHECK_THROWS_AS(Op::backward(X, p, r.topRows(2), z, G, G, GH, dX, {dW, da, dbp, dbq, dbr}, ws),
                  mhc::invalid_argument);
  // Misaligned vectors (a parameter, a gradient, the workspace): float data at an odd address.
  alignas(4) unsigned char raw[4 * 64 + 1] = {};
  float* odd = reinterpret_cast<float*>(raw + 1);
  const RowMat<float> hp1 = hp, hq1 = hq, H1 = H, r1 = r, z1 = z;  // the forward just above
  {
    const Eigen::Map<Eigen::VectorXf> odd_b(odd, n);
    mhc::CoefficientParams<float> q{pv.W, pd.alpha.cast<float>(), odd_b, pv.b_post, pv.b_res};
    CHECK_THROWS_AS(Op::forward(X, q, hp, hq, H, r, z), mhc::invalid_argument);
    CHECK_THROWS_AS(Op::check_parameters(q), mhc::invalid_argument);
    Eigen::Map<Eigen::VectorXf> odd_db(odd, n);
    CHECK_THROWS_AS(Op::backward(X, p, r, z, G, G, GH, dX, {dW, da, odd_db, dbq, dbr}, ws),
                    mhc::invalid_argument);
    Eigen::VectorXf big_ws(ws.size() + 1);
    Eigen::Map<Eigen::VectorXf> odd_ws(
        reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(big_ws.data()) + 1), ws.size());
    CHECK_THROWS_AS(Op::backward(X, p, r, z, G, G, GH, dX, {dW, da, dbp, dbq, dbr}, odd_ws),
                    mhc::invalid_argument);
  }
  CHECK(bw_untouched());
  CHECK((hp == hp1 && hq == hq1 && H == H1 && r == r1 && z == z1));
}

#if defined(MHC_HAVE_AVX2_KERNELS)
namespace {

/// The AVX2 projection tile against its definition: every output a chain of fused multiply-adds
/// over the rows in ascending order (std::fma, what the portable tile's SplitAccumulator::fma
/// compiles to where the compiler fuses it), bit for bit; the lane-wise sum of squares against
/// double. Several blocks of w rows per tile, w = 1 .. 64 (the masked rest of the sum of
/// squares), rows of W padded (ldw > M).
template <int TB, int M>
void projection_tile_case(Rng& rng, Index w, Index ldw) {
  CAPTURE(TB, M, w, ldw);
  constexpr int kBlocks = 3;
  std::vector<float> W(static_cast<std::size_t>(kBlocks * w * ldw));
  std::vector<float> X(static_cast<std::size_t>(TB * kBlocks * w));
  for (float& v : W) v = float(uniform(rng));
  for (float& v : X) v = float(uniform(rng, -2, 2));
  mhc::detail::ProjectionTileAvx2<TB, M> tile;
  tile.set_zero();
  for (int b = 0; b < kBlocks; ++b) {
    const float* v[TB];
    for (int t = 0; t < TB; ++t) v[t] = X.data() + (t * kBlocks + b) * w;
    tile.accumulate(W.data() + b * w * ldw, ldw, v, w);
  }
  for (int t = 0; t < TB; ++t) {
    float want[M] = {};
    double ss = 0;
    for (Index c = 0; c < kBlocks * w; ++c) {
      const float x = X[static_cast<std::size_t>(t * kBlocks * w + c)];
      const float* row = W.data() + (c / w) * w * ldw + (c % w) * ldw;
      for (int m = 0; m < M; ++m) want[m] = std::fma(row[m], x, want[m]);
      ss += double(x) * x;
    }
    float got[M];
    const float got_ss = tile.finish(t, got);
    for (int m = 0; m < M; ++m) CHECK(got[m] == want[m]);
    CHECK(std::abs(got_ss - ss) <= 1e-6 * ss);
  }
}

}  // namespace

TEST_CASE("The AVX2 projection tile adds each output's rows as the portable tile does",
          "[coefficients][avx2]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (const Index w : {1, 7, 8, 9, 33, 63, 64}) {
    projection_tile_case<8, 24>(rng, w, 24);   // mHC, n = 4: two sub-tiles of 4 tokens
    projection_tile_case<1, 24>(rng, w, 24);   // the single-token tile after the last full one
    projection_tile_case<12, 8>(rng, w, 8);    // mHC, n = 2: one sub-tile of 12
    projection_tile_case<6, 32>(rng, w, 40);   // mHC-lite, n = 4: two of 3; a padded W
    projection_tile_case<1, 32>(rng, w, 32);
    projection_tile_case<4, 48>(rng, w, 48);   // mHC, n = 6: two sub-tiles of 2
    projection_tile_case<2, 80>(rng, w, 80);   // mHC, n = 8: two sub-tiles of 1
  }
}
#endif
