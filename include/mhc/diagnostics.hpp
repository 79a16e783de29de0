// diagnostics.hpp: the stability measures of the mHC paper (section 3.1, Figs. 3 and 7).
//
// For one token, the composite residual map of layers 1..L is P = H_res(L) ... H_res(1) (n x n).
//   forward gain  = max_i sum_j |P[i][j]|   (max absolute row sum: worst amplification of a
//                                            signal travelling forward through the streams)
//   backward gain = max_j sum_i |P[i][j]|   (max absolute column sum: same for gradients)
// Both are averaged over tokens, as the paper does ("Amax gain magnitude"). A doubly stochastic
// H_res has both gains equal to 1, and products of them stay doubly stochastic; HC's unconstrained
// H_res lets them grow geometrically with depth.
// The doubly stochastic error of one layer is max over tokens of max |row sum - 1| and
// max |column sum - 1|.
// Every H_res batch is (T, n*n): one row-major n x n matrix per token. Products run in double.
#pragma once

#include <Eigen/Core>
#include <cmath>

#include "mhc/config.hpp"
#include "mhc/detail/check.hpp"
#include "mhc/detail/sinkhorn_kernel.hpp"
#include "mhc/types.hpp"

namespace mhc {

/// Token-averaged forward (max abs row sum) and backward (max abs column sum) gains.
struct Gain {
  double forward = 1.0;
  double backward = 1.0;
};

/// Largest |row sum - 1| and |column sum - 1| over the tokens of one layer.
struct DoublyStochasticError {
  double row = 0.0;
  double col = 0.0;
};

namespace detail {

/// Gains of one n x n row-major matrix, accumulated into sums.
template <typename M>
inline void add_matrix_gains(const M& P, int n, double* fwd, double* bwd) {
  double row_max = 0.0, col_max = 0.0;
  for (int a = 0; a < n; ++a) {
    double rs = 0.0, cs = 0.0;
    for (int b = 0; b < n; ++b) {
      rs += std::abs(static_cast<double>(P[a * n + b]));
      cs += std::abs(static_cast<double>(P[b * n + a]));
    }
    row_max = (rs > row_max || rs != rs) ? rs : row_max;
    col_max = (cs > col_max || cs != cs) ? cs : col_max;
  }
  *fwd += row_max;
  *bwd += col_max;
}

template <typename Scalar>
inline void check_hres_batch(const char* where, const ConstBatchRef<Scalar>& H_res, int n) {
  check_streams(where, n);
  check_batch(where, "H_res", H_res, H_res.rows(), Index(n) * n);
}

}  // namespace detail

/// Gains of a single layer's H_res (T, n*n), averaged over its T tokens.
template <typename Scalar>
Gain layer_gain(const ConstBatchRef<Scalar>& H_res, int n) {
  detail::check_hres_batch("layer_gain", H_res, n);
  Gain g{0.0, 0.0};
  const Index T = H_res.rows();
  if (T == 0) return Gain{};
  for (Index t = 0; t < T; ++t) detail::add_matrix_gains(H_res.row(t).data(), n, &g.forward, &g.backward);
  g.forward /= double(T);
  g.backward /= double(T);
  return g;
}

/// Doubly stochastic error of one layer's H_res (T, n*n): the worst token.
template <typename Scalar>
DoublyStochasticError doubly_stochastic_error(const ConstBatchRef<Scalar>& H_res, int n) {
  detail::check_hres_batch("doubly_stochastic_error", H_res, n);
  DoublyStochasticError e;
  for (Index t = 0; t < H_res.rows(); ++t) {
    double col = 0.0, row = 0.0;
    double M[kMaxStreams * kMaxStreams];
    for (int k = 0; k < n * n; ++k) M[k] = static_cast<double>(H_res(t, k));
    detail::doubly_stochastic_error<Dynamic>(n, M, &col, &row);
    e.row = (row > e.row || row != row) ? row : e.row;
    e.col = (col > e.col || col != col) ? col : e.col;
  }
  return e;
}

/// Running per-token product P_t = H_res(L) ... H_res(1) over the layers of a stack, in double.
/// Owns (T, n*n) doubles, allocated once by the constructor (or resize()).
class CompositeGain {
 public:
  CompositeGain() = default;
  CompositeGain(Index tokens, int n) { resize(tokens, n); }

  /// Sets the token count and n, and resets to the identity (allocates).
  void resize(Index tokens, int n) {
    detail::check_streams("CompositeGain::resize", n);
    if (tokens < 0) detail::throw_invalid("CompositeGain::resize", "tokens = ", tokens, " < 0");
    n_ = n;
    P_.resize(tokens, Index(n) * n);
    next_.resize(Index(n) * n);
    reset();
  }

  /// P_t = I for every token.
  void reset() {
    P_.setZero();
    for (Index t = 0; t < P_.rows(); ++t)
      for (int i = 0; i < n_; ++i) P_(t, i * n_ + i) = 1.0;
    layers_ = 0;
  }

  /// P_t <- H_res_t P_t for the next layer; H_res is (T, n*n), or (1, n*n) shared by all tokens
  /// (static-only coefficients).
  template <typename Scalar>
  void multiply(const ConstBatchRef<Scalar>& H_res) {
    const char* where = "CompositeGain::multiply";
    if (n_ == 0) detail::throw_invalid(where, "call resize(tokens, n) first");
    detail::check_batch(where, "H_res", H_res, H_res.rows() == 1 ? 1 : P_.rows(), Index(n_) * n_);
    const int n = n_;
    for (Index t = 0; t < P_.rows(); ++t) {
      const Index h = H_res.rows() == 1 ? 0 : t;
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
          double s = 0.0;
          for (int k = 0; k < n; ++k) s += static_cast<double>(H_res(h, i * n + k)) * P_(t, k * n + j);
          next_[i * n + j] = s;
        }
      for (int k = 0; k < n * n; ++k) P_(t, k) = next_[k];
    }
    ++layers_;
  }

  /// Token-averaged gains of the product so far (1, 1 before any layer).
  Gain gains() const {
    const Index T = P_.rows();
    if (T == 0) return Gain{};
    Gain g{0.0, 0.0};
    for (Index t = 0; t < T; ++t) detail::add_matrix_gains(P_.row(t).data(), n_, &g.forward, &g.backward);
    g.forward /= double(T);
    g.backward /= double(T);
    return g;
  }

  /// The product so far, (T, n*n).
  const RowMatrix<double>& product() const { return P_; }
  Index layers() const { return layers_; }
  int streams() const { return n_; }

 private:
  int n_ = 0;
  Index layers_ = 0;
  RowMatrix<double> P_;
  Eigen::VectorXd next_;
};

}  // namespace mhc
