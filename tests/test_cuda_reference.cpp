// The double-precision reference of the CUDA tests (tests/cuda/reference.hpp) against the CPU
// operators (mhc::Coefficients, mhc::PreMix, mhc::Update) in double, on the same random inputs:
// every per-token value the GPU is checked against (r, z, h_pre, h_post, H_res, u, X', d_y,
// d_h_post, d_H_res, d_h_pre, and the update, pre-mix and coefficient parts of d_X) and the sums
// over tokens (d_W, d_alpha, d_b). A CUDA run that matches the reference therefore matches the CPU
// path.
//
// Tolerance. Both sides evaluate the same formulas in double and differ only in summation order
// and blocking (the gate/Sinkhorn kernels are the same code), so they agree to rounding. A
// reordered sum of K terms differs by at most ~K u sum|terms| (u = 1.1e-16), so every value is
// compared relative to the magnitude of its terms, not of its result (which can cancel: a dot
// product over C, or d_X through the coefficients, W g - beta v, which nearly vanishes for
// nC = 1): |cpu - ref| <= 1e-12 * mag. 1e-12 is ~1e4 u: room for K up to n C (n^2 + 2n) = 5120
// and t_max = 20 Sinkhorn steps, measured worst ~2e-15 * mag; a wrong term, index or factor
// (or eps off by 1e-4 relative) fails. Magnitudes: sums of |terms| for the mixes and
// the projection; for values downstream of the gates and Sinkhorn (h, H_res, dz/r, da) the
// largest entry of that token's vector. The coefficient backward is checked twice: fed the
// reference's d_h_pre, d_h_post, d_H_res (the comparison above), and chained after the CPU's own
// Update and PreMix backward as a block runs it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cuda/reference.hpp"
#include "mhc/coefficients.hpp"
#include "mhc/mixing.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

using namespace mhc_test;
using mhc::Index;

namespace {

using RowMatD = mhc::RowMatrix<double>;
using Vec = std::vector<double>;
constexpr double kTol = 1e-12;

/// max_k |a[k] - b[k]| / mag[k] (0 / 0 counts as 0, x / 0 as infinity).
double elem_diff(const double* a, const Vec& b, const Vec& mag) {
  double worst = 0;
  for (std::size_t k = 0; k < b.size(); ++k) {
    const double d = std::abs(a[k] - b[k]);
    if (d == 0) continue;
    worst = std::max(worst, mag[k] > 0 ? d / mag[k] : std::numeric_limits<double>::infinity());
  }
  return worst;
}

/// max_k |a[k] - b[k]| / max_k |b[k]|: relative to the largest entry of the vector.
double norm_diff(const double* a, const Vec& b) {
  double scale = 0;
  for (double v : b) scale = std::max(scale, std::abs(v));
  return elem_diff(a, b, Vec(b.size(), scale));
}

double max_abs(const Vec& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

/// Random inputs of one layer; biases near the documented fresh-block init (H_res near identity)
/// or generic, alpha of order 1 so the projection matters.
mhc_cuda_test::LayerInputs make_inputs(Rng& rng, int n, Index C, Index T, int iterations,
                                       bool near_identity) {
  mhc_cuda_test::LayerInputs in;
  in.n = n;
  in.C = C;
  in.T = T;
  in.iterations = iterations;
  in.eps = 1e-6;
  const int nc = in.nc();
  auto fill = [&](Vec& v, Index size, double lo, double hi) {
    v.resize(static_cast<std::size_t>(size));
    for (double& x : v) x = uniform(rng, lo, hi);
  };
  fill(in.X, T * n * C, -1.0, 1.0);
  fill(in.y, T * C, -1.0, 1.0);
  fill(in.G, T * n * C, -1.0, 1.0);
  fill(in.du, T * C, -1.0, 1.0);
  fill(in.W, Index(n) * C * nc, -1.0, 1.0);
  for (double& w : in.W) w /= std::sqrt(static_cast<double>(n * C));
  for (double& a : in.alpha) a = uniform(rng, 0.2, 1.0);
  fill(in.bias, nc, -1.0, 1.0);
  if (near_identity)
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) in.bias[std::size_t(2 * n + i * n + j)] += i == j ? 3.0 : -3.0;
  return in;
}

/// The CPU operators in double on `in`: forward, then each backward into its own buffers (the
/// coefficient backward fed the reference's coefficient gradients), and the chained backward
/// of a block (Update writes d_X, PreMix and Coefficients accumulate, each fed the previous
/// operator's outputs).
struct CpuRun {
  RowMatD h_pre, h_post, H_res, r, z, u, Xn;
  RowMatD dy, d_h_post, d_H_res, d_h_pre;
  RowMatD dX_update, dX_premix, dX_coef, dX_chain;
  RowMatD dW;
  Eigen::VectorXd d_alpha, d_bias;
};

template <int N>
CpuRun run_cpu(const mhc_cuda_test::LayerInputs& in, const RowMatD& ref_d_h_pre,
               const RowMatD& ref_d_h_post, const RowMatD& ref_d_H_res) {
  const int n = in.n, M = in.nc();
  const Index T = in.T, C = in.C, nC = Index(n) * C, nn = Index(n) * n;
  const auto X = mhc::map_batch(in.X.data(), T * n, C);
  const auto y = mhc::map_batch(in.y.data(), T, C);
  const auto G = mhc::map_batch(in.G.data(), T * n, C);
  const auto du = mhc::map_batch(in.du.data(), T, C);
  const auto W = mhc::map_batch(in.W.data(), nC, M);
  const Eigen::Map<const Eigen::VectorXd> b_pre(in.bias.data(), n), b_post(in.bias.data() + n, n),
      b_res(in.bias.data() + 2 * n, nn);
  const Eigen::Vector3d alpha(in.alpha[0], in.alpha[1], in.alpha[2]);
  const mhc::CoefficientParams<double> p{W, alpha, b_pre, b_post, b_res, in.iterations, in.eps};
  using Coef = mhc::Coefficients<double, N>;
  CpuRun o;
  o.h_pre.resize(T, n);
  o.h_post.resize(T, n);
  o.H_res.resize(T, nn);
  o.r.resize(T, 1);
  o.z.resize(T, M);
  o.u.resize(T, C);
  o.Xn.resize(T * n, C);
  Coef::forward(X, p, o.h_pre, o.h_post, o.H_res, o.r, o.z);
  mhc::PreMix<double, N>::forward(X, o.h_pre, o.u);
  mhc::Update<double, N>::forward(X, o.H_res, o.h_post, y, o.Xn);

  o.dy.resize(T, C);
  o.d_h_post.resize(T, n);
  o.d_H_res.resize(T, nn);
  o.d_h_pre.resize(T, n);
  o.dX_update.resize(T * n, C);
  mhc::Update<double, N>::backward(X, o.H_res, o.h_post, y, G, o.dX_update, o.d_H_res, o.d_h_post,
                                   o.dy);
  o.dX_premix = RowMatD::Zero(T * n, C);
  mhc::PreMix<double, N>::backward(X, o.h_pre, du, o.dX_premix, o.d_h_pre);
  o.dX_coef = RowMatD::Zero(T * n, C);
  o.dW.resize(nC, M);
  o.d_alpha.resize(3);
  o.d_bias.resize(M);  // (b_pre, b_post, b_res), the reference's layout
  Eigen::VectorXd workspace(Coef::workspace_size(T, n, C));
  Coef::backward(X, p, o.r, o.z, ref_d_h_pre, ref_d_h_post, ref_d_H_res, o.dX_coef,
                 {o.dW, o.d_alpha, o.d_bias.segment(0, n), o.d_bias.segment(n, n),
                  o.d_bias.segment(2 * n, nn)},
                 workspace);

  o.dX_chain.resize(T * n, C);
  RowMatD dH(T, nn), dhq(T, n), dhp(T, n), dy(T, C), dW(nC, M);
  Eigen::VectorXd da(3), db(M);
  mhc::Update<double, N>::backward(X, o.H_res, o.h_post, y, G, o.dX_chain, dH, dhq, dy);
  mhc::PreMix<double, N>::backward(X, o.h_pre, du, o.dX_chain, dhp);
  Coef::backward(X, p, o.r, o.z, dhp, dhq, dH, o.dX_chain,
                 {dW, da, db.segment(0, n), db.segment(n, n), db.segment(2 * n, nn)}, workspace);
  return o;
}

/// Magnitudes of the terms behind every per-token reference value (see the file comment).
struct TokenMagnitudes {
  Vec z, u, Xn, dy, d_h_post, d_H_res, d_h_pre, dX_update, dX_premix;
  double dX_coef = 0, dX_mix = 0;
};

TokenMagnitudes magnitudes(const mhc_cuda_test::LayerInputs& in, Index t,
                           const mhc_cuda_test::TokenResult& ref) {
  const int n = in.n, nc = in.nc();
  const Index C = in.C, nC = Index(n) * C;
  const auto at = [](const Vec& v, Index k) { return std::abs(v[static_cast<std::size_t>(k)]); };
  const Index x0 = t * nC, y0 = t * C;
  const auto X = [&](int i, Index c) { return at(in.X, x0 + i * C + c); };
  const auto G = [&](int i, Index c) { return at(in.G, x0 + i * C + c); };
  const auto y = [&](Index c) { return at(in.y, y0 + c); };
  const auto du = [&](Index c) { return at(in.du, y0 + c); };
  const auto w = [&](Index k, int j) { return at(in.W, k * nc + j); };
  TokenMagnitudes m;
  m.z.assign(std::size_t(nc), 0.0);
  m.u.assign(std::size_t(C), 0.0);
  m.Xn.assign(std::size_t(nC), 0.0);
  m.dy.assign(std::size_t(C), 0.0);
  m.d_h_post.assign(std::size_t(n), 0.0);
  m.d_H_res.assign(std::size_t(n * n), 0.0);
  m.d_h_pre.assign(std::size_t(n), 0.0);
  m.dX_update.assign(std::size_t(nC), 0.0);
  m.dX_premix.assign(std::size_t(nC), 0.0);
  for (Index k = 0; k < nC; ++k)
    for (int j = 0; j < nc; ++j) m.z[std::size_t(j)] += at(in.X, x0 + k) * w(k, j) / ref.r;
  for (int i = 0; i < n; ++i)
    for (Index c = 0; c < C; ++c) {
      const std::size_t ic = std::size_t(i * C + c), cs = std::size_t(c);
      m.u[cs] += at(ref.h_pre, i) * X(i, c);
      m.Xn[ic] = at(ref.h_post, i) * y(c);
      m.dy[cs] += at(ref.h_post, i) * G(i, c);
      m.d_h_post[std::size_t(i)] += G(i, c) * y(c);
      m.d_h_pre[std::size_t(i)] += X(i, c) * du(c);
      m.dX_premix[ic] = at(ref.h_pre, i) * du(c);
      for (int j = 0; j < n; ++j) {
        m.Xn[ic] += at(ref.H_res, i * n + j) * X(j, c);
        m.d_H_res[std::size_t(i * n + j)] += G(i, c) * X(j, c);
        m.dX_update[std::size_t(j * C + c)] += at(ref.H_res, i * n + j) * G(i, c);
      }
    }
  for (Index k = 0; k < nC; ++k) {
    double s = std::abs(ref.beta) * at(in.X, x0 + k);
    for (int j = 0; j < nc; ++j) s += w(k, j) * at(ref.q, j);
    m.dX_coef = std::max(m.dX_coef, s);
    m.dX_mix = std::max(m.dX_mix, m.dX_update[std::size_t(k)] + m.dX_premix[std::size_t(k)]);
  }
  return m;
}

template <int N>
void compare_case(int n, Index C, Index T, int iterations, bool near_identity) {
  const auto seed = fresh_seed();
  CAPTURE(seed, n, C, T, iterations, near_identity, N);
  Rng rng(seed);
  const mhc_cuda_test::LayerInputs in = make_inputs(rng, n, C, T, iterations, near_identity);
  const int nc = in.nc();
  const Index nC = Index(n) * C;
  std::vector<mhc_cuda_test::TokenResult> ref;
  RowMatD ref_d_h_pre(T, n), ref_d_h_post(T, n), ref_d_H_res(T, Index(n) * n);
  for (Index t = 0; t < T; ++t) {
    ref.push_back(mhc_cuda_test::reference_token(in, t));
    for (int i = 0; i < n; ++i) {
      ref_d_h_pre(t, i) = ref.back().d_h_pre[std::size_t(i)];
      ref_d_h_post(t, i) = ref.back().d_h_post[std::size_t(i)];
    }
    for (int k = 0; k < n * n; ++k) ref_d_H_res(t, k) = ref.back().d_H_res[std::size_t(k)];
  }
  const CpuRun cpu = run_cpu<N>(in, ref_d_h_pre, ref_d_h_post, ref_d_H_res);

  enum {
    kR,
    kZ,
    kHpre,
    kHpost,
    kHres,
    kU,
    kXn,
    kDy,
    kDhpost,
    kDHres,
    kDhpre,
    kDXu,
    kDXp,
    kDXc,
    kDXchain,
    kCount
  };
  double worst[kCount] = {};
  const auto upd = [&](int k, double d) { worst[k] = std::max(worst[k], d); };
  const auto row = [](const RowMatD& m, Index r) { return m.data() + r * m.cols(); };
  for (Index t = 0; t < T; ++t) {
    const mhc_cuda_test::TokenResult& rt = ref[std::size_t(t)];
    const TokenMagnitudes mag = magnitudes(in, t, rt);
    upd(kR, std::abs(cpu.r(t, 0) - rt.r) / rt.r);
    upd(kZ, elem_diff(row(cpu.z, t), rt.z, mag.z));
    upd(kHpre, norm_diff(row(cpu.h_pre, t), rt.h_pre));
    upd(kHpost, norm_diff(row(cpu.h_post, t), rt.h_post));
    upd(kHres, norm_diff(row(cpu.H_res, t), rt.H_res));
    upd(kU, elem_diff(row(cpu.u, t), rt.u, mag.u));
    upd(kXn, elem_diff(row(cpu.Xn, t * n), rt.Xn, mag.Xn));
    upd(kDy, elem_diff(row(cpu.dy, t), rt.dy, mag.dy));
    upd(kDhpost, elem_diff(row(cpu.d_h_post, t), rt.d_h_post, mag.d_h_post));
    upd(kDHres, elem_diff(row(cpu.d_H_res, t), rt.d_H_res, mag.d_H_res));
    upd(kDhpre, elem_diff(row(cpu.d_h_pre, t), rt.d_h_pre, mag.d_h_pre));
    upd(kDXu, elem_diff(row(cpu.dX_update, t * n), rt.dX_update, mag.dX_update));
    upd(kDXp, elem_diff(row(cpu.dX_premix, t * n), rt.dX_premix, mag.dX_premix));
    upd(kDXc, elem_diff(row(cpu.dX_coef, t * n), rt.dX_coef, Vec(std::size_t(nC), mag.dX_coef)));
    Vec total(static_cast<std::size_t>(nC));
    for (std::size_t k = 0; k < total.size(); ++k)
      total[k] = rt.dX_update[k] + rt.dX_premix[k] + rt.dX_coef[k];
    upd(kDXchain,
        elem_diff(row(cpu.dX_chain, t * n), total, Vec(std::size_t(nC), mag.dX_mix + mag.dX_coef)));
  }
  const char* names[kCount] = {"r",       "z",        "h_pre",      "h_post",    "H_res",
                               "u",       "X'",       "d_y",        "d_h_post",  "d_H_res",
                               "d_h_pre", "d_X upd.", "d_X premix", "d_X coef.", "d_X chained"};
  for (int k = 0; k < kCount; ++k) {
    INFO(names[k] << ": worst |cpu - ref| / magnitude over tokens = " << worst[k]);
    CHECK(worst[k] < kTol);
  }

  // Sums over tokens against the reference's (threaded) sums. Magnitude of a token sum: the sum
  // over tokens of each term's magnitude, |v_t[k]| max_j |q_t[j]| for d_W, max_j |da_t[j]| for
  // d_b, max_j |da_t[j]| sum_{j in group} mag_z_t[j] for d_alpha.
  const mhc_cuda_test::ParamGrads sums = mhc_cuda_test::reference_param_grads(in);
  Vec mag_dW(std::size_t(nC * nc), 0.0), mag_db(std::size_t(nc), 0.0), mag_da(3, 0.0);
  for (Index t = 0; t < T; ++t) {
    const mhc_cuda_test::TokenResult& rt = ref[std::size_t(t)];
    const double q = max_abs(rt.q), da = max_abs(rt.d_bias);
    const Vec mz = magnitudes(in, t, rt).z;
    for (Index k = 0; k < nC; ++k)
      for (int j = 0; j < nc; ++j)
        mag_dW[std::size_t(k * nc + j)] += std::abs(in.X[std::size_t(t * nC + k)]) * q;
    for (int j = 0; j < nc; ++j) {
      mag_db[std::size_t(j)] += da;
      mag_da[j < n ? 0 : j < 2 * n ? 1 : 2] += da * mz[std::size_t(j)];
    }
  }
  CHECK(elem_diff(cpu.dW.data(), sums.dW, mag_dW) < kTol);
  CHECK(elem_diff(cpu.d_alpha.data(), sums.d_alpha, mag_da) < kTol);
  CHECK(elem_diff(cpu.d_bias.data(), sums.d_bias, mag_db) < kTol);
}

template <int N>
void sweep(int n) {
  for (const Index C : {Index(1), Index(7), Index(64)})
    for (const Index T : {Index(1), Index(3), Index(17)})
      for (const int iterations : {1, 20}) compare_case<N>(n, C, T, iterations, iterations == 20);
}

}  // namespace

TEST_CASE("CUDA test reference matches the CPU operators in double", "[cuda_reference]") {
  SECTION("n = 1") { sweep<1>(1); }
  SECTION("n = 2") { sweep<2>(2); }
  SECTION("n = 4") { sweep<4>(4); }
  SECTION("n = 8") { sweep<8>(8); }
  SECTION("n = 4, 8, runtime n (N = Dynamic)") {
    sweep<mhc::Dynamic>(4);
    sweep<mhc::Dynamic>(8);
  }
  SECTION("t_max = 7, generic biases") {
    compare_case<4>(4, 64, 17, 7, false);
    compare_case<2>(2, 7, 3, 7, false);
  }
}
