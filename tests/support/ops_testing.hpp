// Helpers for the operator tests (coefficients, pre-mix, update): padded caller buffers, naive
// double-precision references written straight from spec section 2, flattening for the
// finite-difference checker, and a sentinel check that an output stayed untouched.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <cstring>
#include <vector>

#include "mhc/coefficients.hpp"
#include "mhc/mixing.hpp"
#include "support/testing.hpp"

namespace mhc_test {

using mhc::Index;
template <typename S>
using RowMat = mhc::RowMatrix<S>;

/// A caller-owned (rows, cols) batch with row stride cols + pad, padding filled with a sentinel.
template <typename S>
struct Padded {
  Index rows = 0, cols = 0, stride = 0;
  std::vector<S> data;
  Padded() = default;
  Padded(Index r, Index c, Index pad = 0)
      : rows(r),
        cols(c),
        stride(c + pad),
        data(static_cast<size_t>(std::max<Index>(1, r * (c + pad))), S(-777)) {}
  auto view() { return mhc::map_batch(data.data(), rows, cols, stride); }
  auto cview() const {
    return mhc::map_batch(static_cast<const S*>(data.data()), rows, cols, stride);
  }
  S& operator()(Index r, Index c) { return data[static_cast<size_t>(r * stride + c)]; }
  S operator()(Index r, Index c) const { return data[static_cast<size_t>(r * stride + c)]; }
  template <typename M>
  void assign(const M& m) {
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) (*this)(r, c) = static_cast<S>(m(r, c));
  }
  RowMat<double> to_double() const {
    RowMat<double> m(rows, cols);
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) m(r, c) = static_cast<double>((*this)(r, c));
    return m;
  }
  bool same_bytes(const Padded& o) const {
    return data.size() == o.data.size() &&
           std::memcmp(data.data(), o.data.data(), data.size() * sizeof(S)) == 0;
  }
};

/// Random (rows, cols) matrix in [lo, hi).
inline RowMat<double> random_matrix(Rng& rng, Index rows, Index cols, double lo = -1,
                                    double hi = 1) {
  RowMat<double> m(rows, cols);
  fill_uniform(m, rng, lo, hi);
  return m;
}

/// Rounds every entry through storage type S (so a double reference sees exactly S's inputs).
template <typename S>
RowMat<double> round_through(const RowMat<double>& m) {
  RowMat<double> r(m.rows(), m.cols());
  for (Index i = 0; i < m.size(); ++i)
    r.data()[i] = static_cast<double>(static_cast<S>(m.data()[i]));
  return r;
}

/// Coordinates sampled by the finite-difference checks of large inputs: fewer in unoptimised
/// (sanitizer) builds, where every reference evaluation is tens of times slower.
inline Index fd_coords(Index release) {
#ifdef NDEBUG
  return release;
#else
  return std::max<Index>(10, release / 5);
#endif
}

inline Eigen::VectorXd flat(const RowMat<double>& m) {
  return Eigen::Map<const Eigen::VectorXd>(m.data(), m.size());
}
inline RowMat<double> unflat(const Eigen::VectorXd& v, Index rows, Index cols) {
  return Eigen::Map<const RowMat<double>>(v.data(), rows, cols);
}
inline double dot(const RowMat<double>& a, const RowMat<double>& b) {
  return (a.array() * b.array()).sum();
}

// ---- naive references (spec section 2), double -------------------------------------------------

inline RowMat<double> premix_ref(const RowMat<double>& X, const RowMat<double>& h_pre, int n) {
  const Index T = X.rows() / n, C = X.cols();
  RowMat<double> u = RowMat<double>::Zero(T, C);
  for (Index t = 0; t < T; ++t) {
    const Index hr = h_pre.rows() == 1 ? 0 : t;
    for (Index c = 0; c < C; ++c)
      for (int i = 0; i < n; ++i) u(t, c) += h_pre(hr, i) * X(t * n + i, c);
  }
  return u;
}

inline RowMat<double> update_ref(const RowMat<double>& X, const RowMat<double>& H_res,
                                 const RowMat<double>& h_post, const RowMat<double>& y, int n) {
  const Index T = y.rows(), C = y.cols();
  RowMat<double> out(T * n, C);
  for (Index t = 0; t < T; ++t) {
    const Index hr = H_res.rows() == 1 ? 0 : t;
    const Index pr = h_post.rows() == 1 ? 0 : t;
    for (int i = 0; i < n; ++i)
      for (Index c = 0; c < C; ++c) {
        double s = h_post(pr, i) * y(t, c);
        for (int j = 0; j < n; ++j) s += H_res(hr, i * n + j) * X(t * n + j, c);
        out(t * n + i, c) = s;
      }
  }
  return out;
}

/// Sinkhorn-Knopp of spec 2.5 on one row-major n x n matrix, straight from the definition.
inline Eigen::MatrixXd sinkhorn_ref(const Eigen::MatrixXd& A, int iterations) {
  const Eigen::Index n = A.rows();
  Eigen::MatrixXd M(n, n);
  for (Eigen::Index j = 0; j < n; ++j) {
    const double m = A.col(j).maxCoeff();
    for (Eigen::Index i = 0; i < n; ++i)
      M(i, j) = std::max(std::exp(A(i, j) - m), 2.2250738585072014e-308);
  }
  for (int k = 0; k < iterations; ++k) {
    for (Eigen::Index j = 0; j < n; ++j) M.col(j) /= M.col(j).sum();
    for (Eigen::Index i = 0; i < n; ++i) M.row(i) /= M.row(i).sum();
  }
  return M;
}

/// Parameters of a coefficient test case, in double.
struct CoefParamsD {
  RowMat<double> W;  // (n*C, M) or (0, M)
  Eigen::Vector3d alpha;
  Eigen::VectorXd b_pre, b_post, b_res;
  int iterations = 20;
  double eps = 1e-6;
};

/// Analytic parameter gradients of one coefficient test case, in double.
struct CoefGradsD {
  RowMat<double> W;
  Eigen::VectorXd alpha, b_pre, b_post, b_res;
};

/// Checks every parameter gradient of loss(X, params) against central finite differences:
/// d_W (unless `static_mode`: then W has no rows), d_alpha, d_b_pre, d_b_post, d_b_res.
template <typename Loss>
void check_parameter_gradients(const Loss& loss, const RowMat<double>& X, const CoefParamsD& p,
                               const CoefGradsD& g, bool static_mode, Rng& rng) {
  if (!static_mode) {
    const auto gW = check_gradient(
        [&](const Eigen::VectorXd& v) {
          CoefParamsD q = p;
          q.W = unflat(v, p.W.rows(), p.W.cols());
          return loss(X, q);
        },
        flat(p.W), flat(g.W), rng, 1e-6, fd_coords(60));
    CAPTURE(gW.worst, gW.analytic, gW.numeric);
    CHECK(gW.max_error < 1e-6);
  }
  // Step for alpha and the biases: their gradients can be as small as 1e-4, where the
  // quotient's rounding at h = 1e-6 (about eps |L| / h = 2e-9 for |L| ~ 10) came to 1.7e-6 of the
  // 1e-3 scale floor (test_layer_gradients, 1 run in 15 failed); at 1e-5 the same entry agreed
  // to 2e-10, and these maps are smooth enough for the larger step's O(h^2) term.
  constexpr double kParameterStep = 1e-5;
  const auto check_vec = [&](const char* what, const Eigen::VectorXd& x0, const Eigen::VectorXd& d,
                             auto set) {
    const auto res = check_gradient(
        [&](const Eigen::VectorXd& v) {
          CoefParamsD q = p;
          set(q, v);
          return loss(X, q);
        },
        x0, d, rng, kParameterStep);
    CAPTURE(what, res.worst, res.analytic, res.numeric);
    CHECK(res.max_error < 1e-6);
  };
  check_vec("alpha", p.alpha, g.alpha, [](CoefParamsD& q, const Eigen::VectorXd& v) { q.alpha = v; });
  check_vec("b_pre", p.b_pre, g.b_pre, [](CoefParamsD& q, const Eigen::VectorXd& v) { q.b_pre = v; });
  check_vec("b_post", p.b_post, g.b_post,
            [](CoefParamsD& q, const Eigen::VectorXd& v) { q.b_post = v; });
  check_vec("b_res", p.b_res, g.b_res, [](CoefParamsD& q, const Eigen::VectorXd& v) { q.b_res = v; });
}


inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

/// Token t's r = sqrt(mean(v^2) + eps) and z = (v W) / r from the definition (spec 2.1-2.2),
/// v = vec(X_t), in double.
inline void project_ref(const RowMat<double>& X, const CoefParamsD& p, int n, Index t, double& r,
                        Eigen::VectorXd& z) {
  const Index C = X.cols();
  Eigen::VectorXd v(Index(n) * C);
  for (int i = 0; i < n; ++i)
    for (Index c = 0; c < C; ++c) v[i * C + c] = X(t * n + i, c);
  r = std::sqrt(v.squaredNorm() / double(n * C) + p.eps);
  z = (p.W.transpose() * v) / r;
}

/// h_pre (T, n), h_post (T, n), H_res (T, n*n) from the definition (one row in static mode).
struct CoefOutD {
  RowMat<double> h_pre, h_post, H_res, r, z;
};
inline CoefOutD coefficients_ref(const RowMat<double>& X, const CoefParamsD& p, int n) {
  const Index M = Index(n) * n + 2 * n;
  const bool is_static = p.W.rows() == 0;
  const Index T = is_static ? 1 : X.rows() / n;
  CoefOutD o;
  o.h_pre.resize(T, n);
  o.h_post.resize(T, n);
  o.H_res.resize(T, Index(n) * n);
  o.r.resize(T, 1);
  o.z.resize(T, M);
  for (Index t = 0; t < T; ++t) {
    Eigen::VectorXd z = Eigen::VectorXd::Zero(M);
    if (!is_static) project_ref(X, p, n, t, o.r(t, 0), z), o.z.row(t) = z.transpose();
    for (int i = 0; i < n; ++i) {
      o.h_pre(t, i) = sigmoid(p.alpha[0] * z[i] + p.b_pre[i]);
      o.h_post(t, i) = 2 * sigmoid(p.alpha[1] * z[n + i] + p.b_post[i]);
    }
    Eigen::MatrixXd A(n, n);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) A(i, j) = p.alpha[2] * z[2 * n + i * n + j] + p.b_res[i * n + j];
    const Eigen::MatrixXd H = sinkhorn_ref(A, p.iterations);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) o.H_res(t, i * n + j) = H(i, j);
  }
  return o;
}

/// Random parameters with z = O(1) (W scaled by 1/sqrt(nC)) and gates away from saturation.
inline CoefParamsD random_coef_params(Rng& rng, int n, Index C, bool is_static = false) {
  const Index M = Index(n) * n + 2 * n;
  CoefParamsD p;
  p.W = is_static ? RowMat<double>(0, M)
                  : random_matrix(rng, Index(n) * C, M, -1, 1) * (1.7 / std::sqrt(double(n * C)));
  p.alpha = Eigen::Vector3d(uniform(rng, 0.3, 1.2), uniform(rng, 0.3, 1.2), uniform(rng, 0.3, 1.2));
  p.b_pre = Eigen::VectorXd(n);
  p.b_post = Eigen::VectorXd(n);
  p.b_res = Eigen::VectorXd(Index(n) * n);
  for (int i = 0; i < n; ++i) {
    p.b_pre[i] = uniform(rng);
    p.b_post[i] = uniform(rng);
  }
  for (Index k = 0; k < Index(n) * n; ++k) p.b_res[k] = uniform(rng, -1.5, 1.5);
  return p;
}

/// The library's parameter struct viewing `p` converted to Real (keeps the converted copies).
template <typename Real>
struct CoefParamsView {
  RowMat<Real> W;
  Eigen::Matrix<Real, Eigen::Dynamic, 1> b_pre, b_post, b_res;
  mhc::CoefficientParams<Real> params;
  explicit CoefParamsView(const CoefParamsD& p)
      : W(p.W.cast<Real>()),
        b_pre(p.b_pre.cast<Real>()),
        b_post(p.b_post.cast<Real>()),
        b_res(p.b_res.cast<Real>()),
        params{W, p.alpha.cast<Real>(), b_pre, b_post, b_res, p.iterations, Real(p.eps)} {}
  CoefParamsView(const CoefParamsView&) = delete;
};

/// The small case of the coefficient error tests: float, n = 4, T = 3, C = 10, random X and
/// parameters, and outputs filled with the sentinel 9 with a check that none of them changed.
struct CoefErrorCase {
  static constexpr int n = 4;
  static constexpr Index T = 3, C = 10, M = 24;
  using Op = mhc::Coefficients<float>;
  Rng rng;
  RowMat<float> X;
  CoefParamsD pd;
  CoefParamsView<float> pv;
  RowMat<float> hp, hq, H, r, z;
  const RowMat<float> hp0, H0, r0, z0;
  CoefErrorCase()
      : rng(fresh_seed()),
        X(random_matrix(rng, T * n, C).cast<float>()),
        pd(random_coef_params(rng, n, C)),
        pv(pd),
        hp(RowMat<float>::Constant(T, n, 9.f)),
        hq(hp),
        H(RowMat<float>::Constant(T, n * n, 9.f)),
        r(RowMat<float>::Constant(T, 1, 9.f)),
        z(RowMat<float>::Constant(T, M, 9.f)),
        hp0(hp),
        H0(H),
        r0(r),
        z0(z) {}
  bool untouched() const { return hp == hp0 && hq == hp0 && H == H0 && r == r0 && z == z0; }
};

}  // namespace mhc_test
