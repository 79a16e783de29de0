// Stream expand / collapse (streams.hpp): values, backward against central differences, bad input.
#include <cmath>
#include <Eigen/Core>

#include "mhc/streams.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

namespace {
using RM = mhc::RowMatrix<double>;
}

TEMPLATE_TEST_CASE("expand copies into every stream and its backward sums them", "[streams]", float,
                   double) {
  using S = TestType;
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const mhc::Index T = 5, C = 7;
  mhc::RowMatrix<S> x(T, C), X(T * 3, C), dX(T * 3, C), dx(T, C);
  mhc_test::fill_uniform(x, rng);
  mhc_test::fill_uniform(dX, rng);
  mhc::Streams<S, 3>::expand(x, X);
  for (mhc::Index t = 0; t < T; ++t)
    for (int i = 0; i < 3; ++i) CHECK(X.row(t * 3 + i) == x.row(t));
  mhc::Streams<S, 3>::expand_backward(dX, dx);
  for (mhc::Index t = 0; t < T; ++t)
    for (mhc::Index c = 0; c < C; ++c) {
      const double a = double(dX(3 * t, c)), b = double(dX(3 * t + 1, c)),
                   d = double(dX(3 * t + 2, c));
      // S rounds each partial sum: the error scales with the terms, not with their (possibly
      // cancelling) sum.
      const double scale = std::abs(a) + std::abs(b) + std::abs(d);
      CHECK(std::abs(double(dx(t, c)) - (a + b + d)) <= mhc_test::tolerance<S>() * scale);
    }
}

TEST_CASE("collapse is the w-weighted stream sum; backward matches central differences",
          "[streams][gradient]") {
  for (int n : {1, 2, 4, 5}) {
    const auto seed = mhc_test::fresh_seed();
    CAPTURE(seed, n);
    mhc_test::Rng rng(seed);
    const mhc::Index T = 3, C = 5;
    RM X(T * n, C), g(T, C), out(T, C), dX(T * n, C);
    Eigen::VectorXd w(n);
    mhc_test::fill_uniform(X, rng);
    mhc_test::fill_uniform(g, rng);
    mhc_test::fill_uniform(w, rng);
    using St = mhc::Streams<double, mhc::Dynamic>;
    St::collapse(X, w, out, n);
    for (mhc::Index t = 0; t < T; ++t)
      for (mhc::Index c = 0; c < C; ++c) {
        double s = 0, mag = 0;  // the sum and the size of its terms (it may cancel to ~0)
        for (int i = 0; i < n; ++i) {
          s += w[i] * X(t * n + i, c);
          mag += std::abs(w[i] * X(t * n + i, c));
        }
        CHECK(std::abs(out(t, c) - s) <= 1e-14 * mag);
      }
    // Pack (X, w); L = <g, collapse(X, w)>.
    const mhc::Index nx = T * n * C;
    Eigen::VectorXd p(nx + n);
    p << Eigen::Map<const Eigen::VectorXd>(X.data(), nx), w;
    auto loss = [&](const Eigen::VectorXd& v) {
      RM Xv = Eigen::Map<const RM>(v.data(), T * n, C);
      Eigen::VectorXd wv = v.tail(n);
      RM o(T, C);
      St::collapse(Xv, wv, o, n);
      return (o.array() * g.array()).sum();
    };
    Eigen::VectorXd dw = Eigen::VectorXd::Constant(n, 0.25);  // accumulates on top
    St::collapse_backward(X, w, g, dX, dw, n);
    Eigen::VectorXd grad(nx + n);
    grad << Eigen::Map<const Eigen::VectorXd>(dX.data(), nx), dw.array() - 0.25;
    const auto r = mhc_test::check_gradient(loss, p, grad, rng);
    CAPTURE(r.worst, r.analytic, r.numeric);
    CHECK(r.max_error < 1e-9);
  }
  CHECK(mhc::Streams<float, 4>::default_collapse_weights().isApproxToConstant(0.25f));
}

TEST_CASE("expand then collapse with the default weights is the identity", "[streams]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  RM x(4, 6), X(16, 6), y(4, 6);
  mhc_test::fill_uniform(x, rng);
  mhc::Streams<double>::expand(x, X);
  mhc::Streams<double>::collapse(X, mhc::Streams<double>::default_collapse_weights(), y);
  CHECK((x - y).cwiseAbs().maxCoeff() < 1e-15);
}

TEST_CASE("streams reject bad input before writing", "[streams][errors]") {
  using St = mhc::Streams<double, 4>;
  RM x(2, 3), X(8, 3), out(2, 3), dX(8, 3);
  x.setOnes();
  X.setOnes();
  out.setConstant(-7);
  dX.setConstant(-7);
  Eigen::VectorXd w = St::default_collapse_weights(), dw = Eigen::VectorXd::Zero(4);
  RM wrong(7, 3);
  wrong.setConstant(-7);
  CHECK_THROWS_AS(St::expand(x, wrong), mhc::invalid_argument);
  CHECK_THROWS_AS(St::expand(x, X, 3), mhc::invalid_argument);  // n != N
  using Sd = mhc::Streams<double, mhc::Dynamic>;
  CHECK_THROWS_AS(Sd::expand(x, X, 0), mhc::invalid_argument);
  CHECK_THROWS_AS(St::collapse(X, Eigen::VectorXd::Ones(3), out), mhc::invalid_argument);
  CHECK_THROWS_AS(St::collapse(wrong, w, out), mhc::invalid_argument);
  CHECK_THROWS_AS(St::collapse_backward(X, w, out, wrong, dw), mhc::invalid_argument);
  Eigen::VectorXd dw3 = Eigen::VectorXd::Zero(3);
  CHECK_THROWS_AS(St::collapse_backward(X, w, x, dX, dw3), mhc::invalid_argument);
  // Aliasing: the output overlapping the input.
  CHECK_THROWS_AS(St::expand(X.topRows(2), X), mhc::invalid_argument);
  CHECK_THROWS_AS(St::collapse(X, w, X.topRows(2)), mhc::invalid_argument);
  CHECK_THROWS_AS(St::collapse_backward(X, w, x, X, dw), mhc::invalid_argument);
  // Null or misaligned weights; d_w or an output over the weights or another argument.
  using Vec = Eigen::VectorXd;
  const Eigen::Map<const Vec> null_w(static_cast<const double*>(nullptr), 4);
  CHECK_THROWS_AS(St::collapse(X, null_w, out), mhc::invalid_argument);
  CHECK_THROWS_AS(St::collapse_backward(X, null_w, x, dX, dw), mhc::invalid_argument);
  Eigen::Map<Vec> null_dw(static_cast<double*>(nullptr), 4);
  CHECK_THROWS_AS(St::collapse_backward(X, w, x, dX, null_dw), mhc::invalid_argument);
  alignas(8) unsigned char raw[8 * 5 + 1] = {};
  const Eigen::Map<const Vec> odd_w(reinterpret_cast<const double*>(raw + 1), 4);
  CHECK_THROWS_AS(St::collapse(X, odd_w, out), mhc::invalid_argument);
  RM wd(2, 3);  // w in the first 4 values of a (2, 3) buffer
  wd.setConstant(0.25);
  const Eigen::Map<const Vec> w_in_out(wd.data(), 4);
  CHECK_THROWS_AS(St::collapse(X, w_in_out, wd), mhc::invalid_argument);  // out over w
  RM dX_big = RM::Constant(8, 3, -7);
  Eigen::Map<Vec> dw_in_dX(dX_big.data() + 3, 4);
  CHECK_THROWS_AS(St::collapse_backward(X, w, x, dX_big, dw_in_dX), mhc::invalid_argument);
  Eigen::Map<Vec> dw_in_X(X.data(), 4);
  CHECK_THROWS_AS(St::collapse_backward(X, w, x, dX, dw_in_X), mhc::invalid_argument);
  Eigen::Map<Vec> dw_in_dout(out.data(), 4);
  CHECK_THROWS_AS(St::collapse_backward(X, w, out, dX, dw_in_dout), mhc::invalid_argument);
  Eigen::Map<Vec> dw_is_w(w.data(), 4);
  CHECK_THROWS_AS(St::collapse_backward(X, w, x, dX, dw_is_w), mhc::invalid_argument);
  const Eigen::Map<const Vec> w_in_dX(dX.data() + 2, 4);
  CHECK_THROWS_AS(St::collapse_backward(X, w_in_dX, x, dX, dw), mhc::invalid_argument);
  CHECK((dX_big.array() == -7).all());
  CHECK((wd.array() == 0.25).all());
  CHECK((w.array() == 0.25).all());
  try {
    St::expand(x, wrong);
  } catch (const mhc::invalid_argument& e) {
    CHECK(std::string(e.what()).find("X has shape (7, 3), expected (8, 3)") != std::string::npos);
  }
  CHECK((wrong.array() == -7).all());
  CHECK((out.array() == -7).all());
  CHECK((dX.array() == -7).all());
  CHECK((dw.array() == 0).all());
  CHECK((X.array() == 1).all());
}
