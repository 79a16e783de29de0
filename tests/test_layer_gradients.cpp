// The operators composed into one mHC layer, in double:
//   (h_pre, h_post, H_res) = Coefficients(X);  u = PreMix(X, h_pre);  y = F(u);
//   X' = Update(X, H_res, h_post, y),  with the fixed nonlinear F(u) = tanh(u) + 0.1 u^2,
// and L = <G, X'>. The chained backward (Update -> F' -> PreMix -> Coefficients, d_X accumulated
// across the three) is checked against central finite differences of the composed forward for X,
// W, alpha, b_pre, b_post and b_res; dynamic and static-only coefficients.
#include <cmath>
#include <limits>

#include "support/catch.hpp"
#include "support/ops_testing.hpp"

using namespace mhc_test;
using mhc::Index;

namespace {

double F(double u) { return std::tanh(u) + 0.1 * u * u; }
double dF(double u) {
  const double t = std::tanh(u);
  return 1 - t * t + 0.2 * u;
}

template <int N>
struct Layer {
  int n;
  Index C, T;
  bool is_static;
  Index R() const { return is_static ? 1 : T; }

  RowMat<double> forward(const RowMat<double>& X, const CoefParamsD& pd) const {
    CoefParamsView<double> pv(pd);
    RowMat<double> hp(R(), n), hq(R(), n), H(R(), Index(n) * n), r(T, 1),
        z(T, Index(n) * n + 2 * n);
    mhc::Coefficients<double, N>::forward(X, pv.params, hp, hq, H, r, z);
    RowMat<double> u(T, C);
    mhc::PreMix<double, N>::forward(X, hp, u);
    const RowMat<double> y = u.unaryExpr([](double v) { return F(v); });
    RowMat<double> out(T * n, C);
    mhc::Update<double, N>::forward(X, H, hq, y, out);
    return out;
  }
};

template <int N>
void layer_case(int n, Index C, Index T, bool is_static) {
  const auto seed = fresh_seed();
  CAPTURE(seed, n, C, T, N, is_static);
  Rng rng(seed);
  const Index M = Index(n) * n + 2 * n;
  const Layer<N> layer{n, C, T, is_static};
  const RowMat<double> X = random_matrix(rng, T * n, C);
  const CoefParamsD p = random_coef_params(rng, n, C, is_static);
  const RowMat<double> G = random_matrix(rng, T * n, C);

  // Forward, keeping what the backward needs.
  CoefParamsView<double> pv(p);
  const Index R = layer.R();
  RowMat<double> hp(R, n), hq(R, n), H(R, Index(n) * n), r(T, 1), z(T, M);
  mhc::Coefficients<double, N>::forward(X, pv.params, hp, hq, H, r, z);
  RowMat<double> u(T, C);
  mhc::PreMix<double, N>::forward(X, hp, u);
  const RowMat<double> y = u.unaryExpr([](double v) { return F(v); });

  // Backward: Update, then F', then PreMix, then Coefficients; d_X accumulates.
  RowMat<double> dX(T * n, C), dH(T, Index(n) * n), dhq(T, n), dy(T, C), dhp(T, n);
  mhc::Update<double, N>::backward(X, H, hq, y, G, dX, dH, dhq, dy);
  const RowMat<double> du = dy.array() * u.unaryExpr([](double v) { return dF(v); }).array();
  mhc::PreMix<double, N>::backward(X, hp, du, dX, dhp);
  RowMat<double> dW(p.W.rows(), M);
  Eigen::VectorXd d_alpha(3), db_pre(n), db_post(n), db_res(Index(n) * n);
  Eigen::VectorXd ws(mhc::Coefficients<double, N>::workspace_size(T, n, C, is_static));
  mhc::Coefficients<double, N>::backward(X, pv.params, r, z, dhp, dhq, dH, dX,
                                         {dW, d_alpha, db_pre, db_post, db_res}, ws);

  const auto loss = [&](const RowMat<double>& x, const CoefParamsD& q) {
    return dot(G, layer.forward(x, q));
  };
  const auto gX =
      check_gradient([&](const Eigen::VectorXd& v) { return loss(unflat(v, T * n, C), p); },
                     flat(X), flat(dX), rng, 1e-6, fd_coords(80));
  CAPTURE(gX.worst, gX.analytic, gX.numeric);
  CHECK(gX.max_error < 1e-6);
  check_parameter_gradients(loss, X, p, {dW, d_alpha, db_pre, db_post, db_res}, is_static, rng);
}

}  // namespace

TEST_CASE("A whole layer (coefficients, pre-mix, F, update) matches finite differences",
          "[layer]") {
  for (const bool is_static : {false, true}) {
    layer_case<mhc::Dynamic>(1, 1, 1, is_static);
    layer_case<1>(1, 64, 5, is_static);
    layer_case<2>(2, 3, 33, is_static);
    layer_case<mhc::Dynamic>(2, 257, 1, is_static);
    layer_case<4>(4, 64, 33, is_static);
    layer_case<4>(4, 257, 5, is_static);
    layer_case<8>(8, 3, 33, is_static);
    layer_case<mhc::Dynamic>(8, 64, 5, is_static);
  }
}

TEST_CASE("The finite-difference checker accepts exact gradients and rejects wrong ones",
          "[layer][checker]") {
  // L(x) = offset + sum_k c_k sin(x_k): its exact gradient passes and the same off by 1e-4 (of
  // the largest entry, 1) fails, also under a large offset and when only a subset of coordinates
  // and random directions are probed.
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (const double offset : {0.0, 1e3}) {
    for (const Index size : {Index(7), Index(600)}) {
      CAPTURE(offset, size);
      Eigen::VectorXd x(size), c(size);
      for (Index k = 0; k < size; ++k) x[k] = uniform(rng, -2, 2), c[k] = uniform(rng, -1, 1);
      x[0] = 0, c[0] = 1;  // the largest gradient entry is 1
      const auto loss = [&](const Eigen::VectorXd& v) {
        return offset + (c.array() * v.array().sin()).sum();
      };
      const Eigen::VectorXd exact = (c.array() * x.array().cos()).matrix();
      CHECK(check_gradient(loss, x, exact, rng).max_error < 1e-6);
      // off by 1e-4: one entry where every coordinate is probed (size <= 400), else every
      // entry, so that whichever coordinates the subset check picks show it
      Eigen::VectorXd wrong = exact;
      if (size <= 400)
        wrong[size / 2] += 1e-4;
      else
        wrong.array() += 1e-4;
      CHECK(check_gradient(loss, x, wrong, rng).max_error > 1e-6);
      // a non-finite entry anywhere fails, even where the subset check would not probe it
      for (const double bad : {std::numeric_limits<double>::quiet_NaN(),
                               std::numeric_limits<double>::infinity()}) {
        Eigen::VectorXd broken = exact;
        broken[size - 1] = bad;
        CHECK(check_gradient(loss, x, broken, rng).max_error > 1e-6);
      }
    }
  }
  // an exact gradient of a loss that is NaN near x fails too
  Eigen::VectorXd x = Eigen::VectorXd::Constant(3, 0.5);
  const auto nan_loss = [](const Eigen::VectorXd& v) { return std::sqrt(0.5 - v[0]) + v[1]; };
  const Eigen::VectorXd grad = (Eigen::VectorXd(3) << -1e6, 1, 0).finished();
  CHECK(check_gradient(nan_loss, x, grad, rng).max_error > 1e-6);
}
