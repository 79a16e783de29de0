// streams.hpp: entering and leaving the n-stream residual (spec section 2, last paragraph).
//
//   expand:    X[t][i][c] = x[t][c]                          x (T, C) -> X (T*n, C)
//              d_x[t][c]  = sum_i d_X[t][i][c]
//   collapse:  out[t][c]  = sum_i w[i] X[t][i][c]            X (T*n, C), w (n) -> out (T, C)
//              d_X[t][i][c] = w[i] d_out[t][c],  d_w[i] += sum_{t,c} X[t][i][c] d_out[t][c]
// The collapse weights are learnable; default_collapse_weights gives w = 1/n (the mean), under
// which a stack whose streams all stay equal reads out exactly that common value.
// Sums run in compute_t<Scalar>; nothing allocates.
#pragma once

#include <Eigen/Core>

#include "mhc/config.hpp"
#include "mhc/detail/check.hpp"
#include "mhc/types.hpp"

namespace mhc {

/// Expand/collapse for n streams (compile-time N, or mhc::Dynamic with n given at run time).
template <typename Scalar, int N = 4>
struct Streams {
  static_assert(N == Dynamic || (N >= 1 && N <= kMaxStreams), "mhc::Streams: N must be in [1, 16]");
  using Compute = compute_t<Scalar>;
  using Weights = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;
  static constexpr int kStreams = N;

  /// w = 1/n in every entry.
  static Weights default_collapse_weights(int n = N) {
    detail::check_static_streams<N>("Streams::default_collapse_weights", n);
    return Weights::Constant(n, Scalar(Compute(1) / Compute(n)));
  }

  /// X (T*n, C) = n copies of x (T, C). X must not overlap x.
  static void expand(const ConstBatchRef<Scalar>& x, BatchRef<Scalar> X, int n = N) {
    const char* where = "Streams::expand";
    detail::check_static_streams<N>(where, n);
    const Index T = x.rows(), C = x.cols();
    detail::check_batch(where, "x", x, T, C);
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_no_overlap(where, "X", X, "x", x);
    for (Index t = 0; t < T; ++t)
      for (int i = 0; i < n; ++i) X.row(t * n + i) = x.row(t);
  }

  /// d_x (T, C) = sum over streams of d_X (T*n, C) (overwrites d_x).
  static void expand_backward(const ConstBatchRef<Scalar>& d_X, BatchRef<Scalar> d_x, int n = N) {
    const char* where = "Streams::expand_backward";
    detail::check_static_streams<N>(where, n);
    const Index T = d_x.rows(), C = d_x.cols();
    detail::check_batch(where, "d_X", d_X, T * n, C);
    detail::check_batch(where, "d_x", d_x, T, C);
    detail::check_no_overlap(where, "d_x", d_x, "d_X", d_X);
    for (Index t = 0; t < T; ++t)
      for (Index c = 0; c < C; ++c) {
        Compute s = 0;
        for (int i = 0; i < n; ++i) s += Compute(d_X(t * n + i, c));
        d_x(t, c) = Scalar(s);
      }
  }

  /// out (T, C) = sum_i w[i] X[., i, .]; X (T*n, C), w (n). out must not overlap X or w.
  static void collapse(const ConstBatchRef<Scalar>& X, const Eigen::Ref<const Weights>& w,
                       BatchRef<Scalar> out, int n = N) {
    const char* where = "Streams::collapse";
    detail::check_static_streams<N>(where, n);
    const Index T = out.rows(), C = out.cols();
    check_weights(where, w, n);
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_batch(where, "out", out, T, C);
    detail::check_no_overlap(where, "out", out, "X", X);
    detail::check_no_overlap(where, "out", out, "w", detail::vector_bytes(w));
    for (Index t = 0; t < T; ++t)
      for (Index c = 0; c < C; ++c) {
        Compute s = 0;
        for (int i = 0; i < n; ++i) s += Compute(w[i]) * Compute(X(t * n + i, c));
        out(t, c) = Scalar(s);
      }
  }

  /// d_X (T*n, C) = w[i] d_out (overwrites); d_w (n) += sum_{t,c} X[t][i][c] d_out[t][c].
  /// d_X and d_w must not overlap each other or any input.
  static void collapse_backward(const ConstBatchRef<Scalar>& X, const Eigen::Ref<const Weights>& w,
                                const ConstBatchRef<Scalar>& d_out, BatchRef<Scalar> d_X,
                                Eigen::Ref<Weights> d_w, int n = N) {
    const char* where = "Streams::collapse_backward";
    detail::check_static_streams<N>(where, n);
    const Index T = d_out.rows(), C = d_out.cols();
    check_weights(where, w, n);
    detail::check_vector(where, "d_w", d_w, n);
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_batch(where, "d_out", d_out, T, C);
    detail::check_batch(where, "d_X", d_X, T * n, C);
    detail::check_no_overlap(where, "d_X", d_X, "X", X);
    detail::check_no_overlap(where, "d_X", d_X, "d_out", d_out);
    detail::check_no_overlap(where, "d_X", d_X, "w", detail::vector_bytes(w));
    const auto dw = detail::vector_bytes(d_w);
    detail::check_no_overlap(where, "d_w", dw, "X", X);
    detail::check_no_overlap(where, "d_w", dw, "d_out", d_out);
    detail::check_no_overlap(where, "d_w", dw, "d_X", d_X);
    detail::check_no_overlap(where, "d_w", dw, "w", detail::vector_bytes(w));
    Compute acc[kMaxStreams] = {};
    for (Index t = 0; t < T; ++t)
      for (int i = 0; i < n; ++i) {
        Compute s = 0;
        for (Index c = 0; c < C; ++c) {
          const Compute g = Compute(d_out(t, c));
          s += Compute(X(t * n + i, c)) * g;
          d_X(t * n + i, c) = Scalar(Compute(w[i]) * g);
        }
        acc[i] += s;
      }
    for (int i = 0; i < n; ++i) d_w[i] = Scalar(Compute(d_w[i]) + acc[i]);
  }

 private:
  static void check_weights(const char* where, const Eigen::Ref<const Weights>& w, int n) {
    detail::check_vector(where, "w", w, n);
  }
};

}  // namespace mhc
