// Stability diagnostics (diagnostics.hpp): gains of single matrices and of composites, the doubly
// stochastic error, and token averaging.
#include <Eigen/Core>
#include <cmath>

#include "mhc/diagnostics.hpp"
#include "mhc/detail/sinkhorn_kernel.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

namespace {
using RM = mhc::RowMatrix<double>;
}

TEST_CASE("layer_gain is the token average of max abs row / column sums", "[diagnostics]") {
  RM H(2, 4);
  H.row(0) << 2.0, -1.0, 0.5, 0.5;   // rows: 3, 1;   columns: 2.5, 1.5
  H.row(1) << 1.0, 0.0, 0.0, 1.0;    // identity: 1, 1
  const mhc::Gain g = mhc::layer_gain<double>(H, 2);
  CHECK(g.forward == Approx((3.0 + 1.0) / 2));
  CHECK(g.backward == Approx((2.5 + 1.0) / 2));
  const mhc::DoublyStochasticError e = mhc::doubly_stochastic_error<double>(H, 2);
  CHECK(e.row == Approx(0.0).margin(1e-15) );
  CHECK(e.col == Approx(1.5));
  RM Hr(1, 4);
  Hr.row(0) << 2.0, -1.0, 0.5, 0.5;
  CHECK(mhc::doubly_stochastic_error<double>(Hr, 2).row == Approx(0.0).margin(1e-15));
  Hr(0, 1) = -0.5;  // row 0 now sums to 1.5
  CHECK(mhc::doubly_stochastic_error<double>(Hr, 2).row == Approx(0.5));
}

TEST_CASE("CompositeGain multiplies H(L) ... H(1) per token", "[diagnostics]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const int n = 3, T = 4, L = 5;
  mhc::CompositeGain cg(T, n);
  CHECK(cg.gains().forward == 1.0);
  std::vector<RM> layers;
  for (int l = 0; l < L; ++l) {
    RM H(T, n * n);
    mhc_test::fill_uniform(H, rng, -1.0, 1.5);
    cg.multiply<double>(H);
    layers.push_back(H);
  }
  CHECK(cg.layers() == L);
  double fwd = 0, bwd = 0;
  for (int t = 0; t < T; ++t) {
    Eigen::Matrix3d P = Eigen::Matrix3d::Identity();
    for (int l = 0; l < L; ++l) {
      Eigen::Matrix3d H = Eigen::Map<const Eigen::Matrix<double, 3, 3, Eigen::RowMajor>>(layers[l].row(t).data());
      P = H * P;
    }
    for (int k = 0; k < 9; ++k) CHECK(cg.product()(t, k) == Approx(P(k / 3, k % 3)).epsilon(1e-12));
    fwd += P.cwiseAbs().rowwise().sum().maxCoeff();
    bwd += P.cwiseAbs().colwise().sum().maxCoeff();
  }
  CHECK(cg.gains().forward == Approx(fwd / T).epsilon(1e-12));
  CHECK(cg.gains().backward == Approx(bwd / T).epsilon(1e-12));
  cg.reset();
  CHECK(cg.layers() == 0);
  CHECK(cg.gains().backward == 1.0);
}

TEST_CASE("products of Sinkhorn outputs keep gain 1; scaled identities grow geometrically",
          "[diagnostics]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const int n = 4, T = 6, L = 40;
  mhc::CompositeGain ds(T, n), grow(T, n);
  RM logits(T, n * n), H(T, n * n), scaled(T, n * n);
  for (int l = 0; l < L; ++l) {
    mhc_test::fill_uniform(logits, rng, -1, 1);  // well conditioned: converged in 20 rounds
    for (int t = 0; t < T; ++t)
      mhc::detail::sinkhorn_forward_kernel<4>(n, 20, logits.row(t).data(), H.row(t).data(),
                                              static_cast<double*>(nullptr));
    ds.multiply<double>(H);
    scaled.setZero();
    for (int t = 0; t < T; ++t)
      for (int i = 0; i < n; ++i) scaled(t, i * n + i) = 1.1;
    grow.multiply<double>(scaled);
  }
  CHECK(ds.gains().forward == Approx(1.0).epsilon(1e-6));
  CHECK(ds.gains().backward == Approx(1.0).epsilon(1e-6));
  CHECK(grow.gains().forward == Approx(std::pow(1.1, L)).epsilon(1e-12));
}

TEST_CASE("diagnostics reject bad shapes", "[diagnostics][errors]") {
  RM H(3, 8);
  H.setZero();
  CHECK_THROWS_AS(mhc::layer_gain<double>(H, 3), mhc::invalid_argument);
  CHECK_THROWS_AS(mhc::doubly_stochastic_error<double>(H, 0), mhc::invalid_argument);
  mhc::CompositeGain cg;
  CHECK_THROWS_AS(cg.multiply<double>(H), mhc::invalid_argument);
  cg.resize(3, 2);
  CHECK_THROWS_AS(cg.multiply<double>(H), mhc::invalid_argument);
  CHECK(cg.layers() == 0);
  CHECK(cg.product()(0, 0) == 1.0);
}
