// Per-token maths of the HC and mHC-lite variants (detail/variant_kernel.hpp): definitions,
// exact double stochasticity of mHC-lite, and the backward against central differences.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "mhc/detail/variant_kernel.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

namespace {

using mhc::detail::GateParams;

enum class Kind { hc, lite };

int z_width(Kind kind, int n) {
  return kind == Kind::hc ? mhc::detail::coefficient_count(n)
                          : mhc::detail::lite_coefficient_count(n);
}
int res_width(Kind kind, int n) { return kind == Kind::hc ? n * n : mhc::detail::factorial(n); }

// All inputs of one token's mapping packed into one vector:
// [z (K), alpha_pre, alpha_post, alpha_res, b_pre (n), b_post (n), b_res (R)].
struct Packed {
  Kind kind;
  int n;
  int K() const { return z_width(kind, n); }
  int R() const { return res_width(kind, n); }
  int size() const { return K() + 3 + 2 * n + R(); }
};

void forward(const Packed& p, const Eigen::VectorXd& x, double* h_pre, double* h_post, double* H) {
  const int n = p.n, K = p.K();
  GateParams<double> g{x[K], x[K + 1], x[K + 2], x.data() + K + 3, x.data() + K + 3 + n,
                       x.data() + K + 3 + 2 * n};
  if (p.kind == Kind::hc) {
    mhc::detail::hc_coefficients_forward<mhc::Dynamic>(n, x.data(), g, h_pre, h_post, H);
  } else {
    std::vector<double> w(static_cast<size_t>(p.R()));
    mhc::detail::lite_coefficients_forward<mhc::Dynamic>(n, x.data(), g, h_pre, h_post, H, w.data());
  }
}

void check_variant_gradient(Kind kind, int n, double z_scale) {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed, n, static_cast<int>(kind));
  mhc_test::Rng rng(seed);
  const Packed p{kind, n};
  const int K = p.K();
  Eigen::VectorXd x(p.size());
  mhc_test::fill_uniform(x, rng, -z_scale, z_scale);
  for (int a = 0; a < 3; ++a) x[K + a] = mhc_test::uniform(rng, 0.2, 1.5);
  Eigen::VectorXd g_pre(n), g_post(n), G(n * n);
  mhc_test::fill_uniform(g_pre, rng);
  mhc_test::fill_uniform(g_post, rng);
  mhc_test::fill_uniform(G, rng);
  auto loss = [&](const Eigen::VectorXd& v) {
    Eigen::VectorXd hp(n), hq(n), H(n * n);
    forward(p, v, hp.data(), hq.data(), H.data());
    return g_pre.dot(hp) + g_post.dot(hq) + G.dot(H);
  };
  // Analytic: backward writes dz and accumulates the parameter gradients.
  Eigen::VectorXd grad = Eigen::VectorXd::Zero(p.size());
  GateParams<double> gp{x[K], x[K + 1], x[K + 2], x.data() + K + 3, x.data() + K + 3 + n,
                        x.data() + K + 3 + 2 * n};
  double* d_alpha = grad.data() + K;
  double* d_b_pre = grad.data() + K + 3;
  double* d_b_post = d_b_pre + n;
  double* d_b_res = d_b_post + n;
  if (kind == Kind::hc) {
    mhc::detail::hc_coefficients_backward<mhc::Dynamic>(n, x.data(), gp, g_pre.data(), g_post.data(),
                                                        G.data(), grad.data(), d_alpha, d_b_pre,
                                                        d_b_post, d_b_res);
  } else {
    std::vector<double> w(static_cast<size_t>(p.R()));
    mhc::detail::lite_coefficients_backward<mhc::Dynamic>(n, x.data(), gp, g_pre.data(),
                                                          g_post.data(), G.data(), grad.data(),
                                                          d_alpha, d_b_pre, d_b_post, d_b_res,
                                                          w.data());
  }
  const auto r = mhc_test::check_gradient(loss, x, grad, rng);
  CAPTURE(r.worst, r.analytic, r.numeric);
  CHECK(r.max_error < 1e-8);
}

}  // namespace

TEST_CASE("permutation enumerates the n! permutations in lexicographic order", "[variants]") {
  for (int n = 1; n <= mhc::detail::kMaxLiteStreams; ++n) {
    CAPTURE(n);
    const int K = mhc::detail::factorial(n);
    std::set<std::vector<int>> seen;
    std::vector<int> previous;
    for (int k = 0; k < K; ++k) {
      int perm[mhc::detail::kMaxLiteStreams];
      mhc::detail::permutation(n, k, perm);
      std::vector<int> v(perm, perm + n);
      std::vector<int> sorted = v;
      std::sort(sorted.begin(), sorted.end());
      for (int i = 0; i < n; ++i) REQUIRE(sorted[static_cast<size_t>(i)] == i);
      if (k > 0) CHECK(previous < v);
      previous = v;
      seen.insert(v);
    }
    CHECK(static_cast<int>(seen.size()) == K);
  }
  CHECK(mhc::detail::factorial(4) == 24);
  CHECK(mhc::detail::lite_coefficient_count(4) == 32);
}

TEST_CASE("HC mappings are alpha * tanh(z) + b, unconstrained", "[variants]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const int n = 3;
  Eigen::VectorXd z(mhc::detail::coefficient_count(n)), b_pre(n), b_post(n), b_res(n * n);
  mhc_test::fill_uniform(z, rng, -3, 3);
  mhc_test::fill_uniform(b_pre, rng);
  mhc_test::fill_uniform(b_post, rng);
  mhc_test::fill_uniform(b_res, rng, -2, 2);
  const GateParams<double> p{0.3, -0.7, 1.9, b_pre.data(), b_post.data(), b_res.data()};
  Eigen::VectorXd hp(n), hq(n), H(n * n);
  mhc::detail::hc_coefficients_forward<3>(n, z.data(), p, hp.data(), hq.data(), H.data());
  for (int i = 0; i < n; ++i) {
    CHECK(hp[i] == Approx(0.3 * std::tanh(z[i]) + b_pre[i]).epsilon(1e-14));
    CHECK(hq[i] == Approx(-0.7 * std::tanh(z[n + i]) + b_post[i]).epsilon(1e-14));
  }
  for (int k = 0; k < n * n; ++k)
    CHECK(H[k] == Approx(1.9 * std::tanh(z[2 * n + k]) + b_res[k]).epsilon(1e-14));
  // With b_res = 2 I the rows sum far from 1: nothing projects HC onto the Birkhoff polytope.
  Eigen::VectorXd two_i = Eigen::VectorXd::Zero(n * n);
  for (int i = 0; i < n; ++i) two_i[i * n + i] = 2.0;
  const GateParams<double> q{0.0, 0.0, 0.0, b_pre.data(), b_post.data(), two_i.data()};
  mhc::detail::hc_coefficients_forward<mhc::Dynamic>(n, z.data(), q, hp.data(), hq.data(), H.data());
  double row0 = H[0] + H[1] + H[2];
  CHECK(row0 == 2.0);
}

TEST_CASE("mHC-lite H_res is exactly doubly stochastic and nonnegative", "[variants]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  for (int n = 1; n <= mhc::detail::kMaxLiteStreams; ++n) {
    CAPTURE(n);
    const int K = mhc::detail::factorial(n);
    Eigen::VectorXd z(mhc::detail::lite_coefficient_count(n)), b_pre(n), b_post(n), b_res(K), w(K);
    mhc_test::fill_uniform(z, rng, -4, 4);
    mhc_test::fill_uniform(b_pre, rng);
    mhc_test::fill_uniform(b_post, rng);
    mhc_test::fill_uniform(b_res, rng, -30, 30);
    const GateParams<double> p{1.0, 1.0, 1.0, b_pre.data(), b_post.data(), b_res.data()};
    Eigen::VectorXd hp(n), hq(n), H(n * n);
    mhc::detail::lite_coefficients_forward<mhc::Dynamic>(n, z.data(), p, hp.data(), hq.data(),
                                                         H.data(), w.data());
    CHECK(std::abs(w.sum() - 1.0) < 1e-14);
    for (int a = 0; a < n; ++a) {
      double rs = 0, cs = 0;
      for (int b = 0; b < n; ++b) {
        CHECK(H[a * n + b] >= 0.0);
        rs += H[a * n + b];
        cs += H[b * n + a];
      }
      CHECK(std::abs(rs - 1.0) < 1e-14);
      CHECK(std::abs(cs - 1.0) < 1e-14);
    }
    for (int i = 0; i < n; ++i) {
      CHECK(hp[i] == Approx(1.0 / (1.0 + std::exp(-(z[i] + b_pre[i])))).epsilon(1e-14));
      CHECK(hq[i] == Approx(2.0 / (1.0 + std::exp(-(z[n + i] + b_post[i])))).epsilon(1e-14));
    }
  }
  // One dominant logit selects its permutation matrix.
  const int n = 4;
  Eigen::VectorXd z = Eigen::VectorXd::Zero(mhc::detail::lite_coefficient_count(n));
  Eigen::VectorXd b_pre = Eigen::VectorXd::Zero(n), b_post = b_pre, b_res = Eigen::VectorXd::Zero(24),
                  w(24);
  b_res[17] = 60.0;
  const GateParams<double> p{0.01, 0.01, 0.01, b_pre.data(), b_post.data(), b_res.data()};
  Eigen::VectorXd hp(n), hq(n), H(n * n);
  mhc::detail::lite_coefficients_forward<4>(n, z.data(), p, hp.data(), hq.data(), H.data(), w.data());
  int perm[4];
  mhc::detail::permutation(n, 17, perm);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) CHECK(std::abs(H[i * n + j] - (perm[i] == j ? 1.0 : 0.0)) < 1e-20);
}

TEST_CASE("HC backward matches central differences", "[variants][gradient]") {
  for (int n : {1, 2, 3, 4, 5}) {
    check_variant_gradient(Kind::hc, n, 1.5);
    check_variant_gradient(Kind::hc, n, 0.05);
  }
}

TEST_CASE("mHC-lite backward matches central differences", "[variants][gradient]") {
  for (int n : {1, 2, 3, 4, 5}) {
    check_variant_gradient(Kind::lite, n, 1.5);
    check_variant_gradient(Kind::lite, n, 0.05);
  }
}

TEST_CASE("variant kernels run on float lanes like on double", "[variants]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const int n = 4;
  Eigen::VectorXd z(mhc::detail::lite_coefficient_count(n)), b(40);
  mhc_test::fill_uniform(z, rng);
  mhc_test::fill_uniform(b, rng);
  Eigen::VectorXf zf = z.cast<float>(), bf = b.cast<float>();
  const GateParams<double> pd{0.5, 0.6, 0.7, b.data(), b.data() + 4, b.data() + 8};
  const GateParams<float> pf{0.5f, 0.6f, 0.7f, bf.data(), bf.data() + 4, bf.data() + 8};
  Eigen::VectorXd hp(n), hq(n), H(16), w(24);
  Eigen::VectorXf hpf(n), hqf(n), Hf(16), wf(24);
  mhc::detail::lite_coefficients_forward<4>(n, z.data(), pd, hp.data(), hq.data(), H.data(), w.data());
  mhc::detail::lite_coefficients_forward<4>(n, zf.data(), pf, hpf.data(), hqf.data(), Hf.data(),
                                            wf.data());
  CHECK((H - Hf.cast<double>()).cwiseAbs().maxCoeff() < 1e-6);
  mhc::detail::hc_coefficients_forward<4>(n, z.data(), pd, hp.data(), hq.data(), H.data());
  mhc::detail::hc_coefficients_forward<4>(n, zf.data(), pf, hpf.data(), hqf.data(), Hf.data());
  CHECK((H - Hf.cast<double>()).cwiseAbs().maxCoeff() < 1e-6);
  CHECK((hp - hpf.cast<double>()).cwiseAbs().maxCoeff() < 1e-6);
}
