// detail/sinkhorn_kernel.hpp: Sinkhorn-Knopp on one n x n matrix (or one SIMD tile of them),
// forward and exact backward, shared by the CPU batch operator and the CUDA kernels.
//
// The map (spec section 2.5, paper Eq. 9), A the logits, all matrices row-major n x n:
//   M0[i][j] = max(exp(A[i][j] - max_k A[k][j]), tiny)        stable exp, clamped from below
//   repeat t_max times:  M[i][j] /= sum_k M[k][j]   (columns),  then  M[i][j] /= sum_k M[i][k] (rows)
// The per-column max shift is exact for t_max >= 1 (the first column step divides any column
// scale out); the clamp to the smallest normal number keeps every sum positive, so logits of any
// finite size give a finite result. A NaN logit makes its whole matrix NaN.
//
// Backward is the exact vector-Jacobian product of those t_max steps (not of the limit). It walks
// the steps in reverse from the final M, using the sums the forward recorded (2 * t_max * n
// values per matrix: far less than the t_max * n^2 iterates), for a normalisation M = P / s:
//   dP[i][j] = (dM[i][j] - sum_k dM[i][k] M[i][k]) / s_i,   then P = M * s_i     (rows)
// and the transpose for a column step; finally dA = dM0 * exp(A - max) where it was not clamped.
#pragma once

#include "mhc/detail/lanes.hpp"

namespace mhc::detail {

/// Number of sums the forward records for the backward: t_max column sums then row sums, n each.
MHC_HOST_DEVICE constexpr int sinkhorn_sums_size(int n, int iterations) { return 2 * iterations * n; }

/// M0 = max(exp(A - colmax(A)), tiny) into M.
template <int N, typename V>
MHC_HOST_DEVICE void sinkhorn_exp(int n_rt, const V* A, V* M) {
  using S = lane_scalar_t<V>;
  const int n = N > 0 ? N : n_rt;
  for (int j = 0; j < n; ++j) {
    V m = A[j];
    for (int i = 1; i < n; ++i) m = lane_max(m, A[i * n + j]);
    for (int i = 0; i < n; ++i) {
      const V shifted = A[i * n + j] - m;
      M[i * n + j] = lane_floor(lane_exp(shifted), tiny_normal<S>());
    }
  }
}

/// One column normalisation of M in place; the column sums go to `sums` when it is not null.
template <int N, typename V>
MHC_HOST_DEVICE void sinkhorn_normalize_columns(int n_rt, V* M, V* sums) {
  const int n = N > 0 ? N : n_rt;
  for (int j = 0; j < n; ++j) {
    V s = M[j];
    for (int i = 1; i < n; ++i) s = s + M[i * n + j];
    if (sums) sums[j] = s;
    const V r = lane_recip(s);
    for (int i = 0; i < n; ++i) M[i * n + j] = M[i * n + j] * r;
  }
}

/// One row normalisation of M in place; the row sums go to `sums` when it is not null.
template <int N, typename V>
MHC_HOST_DEVICE void sinkhorn_normalize_rows(int n_rt, V* M, V* sums) {
  const int n = N > 0 ? N : n_rt;
  for (int i = 0; i < n; ++i) {
    V s = M[i * n];
    for (int j = 1; j < n; ++j) s = s + M[i * n + j];
    if (sums) sums[i] = s;
    const V r = lane_recip(s);
    for (int j = 0; j < n; ++j) M[i * n + j] = M[i * n + j] * r;
  }
}

/// Forward: M = SK(A) after `iterations` column-then-row rounds. `sums` (may be null) receives
/// sinkhorn_sums_size(n, iterations) values for sinkhorn_backward_kernel.
template <int N, typename V>
MHC_HOST_DEVICE void sinkhorn_forward_kernel(int n_rt, int iterations, const V* A, V* M, V* sums) {
  const int n = N > 0 ? N : n_rt;
  sinkhorn_exp<N>(n, A, M);
  for (int k = 0; k < iterations; ++k) {
    sinkhorn_normalize_columns<N>(n, M, sums ? sums + (2 * k) * n : nullptr);
    sinkhorn_normalize_rows<N>(n, M, sums ? sums + (2 * k + 1) * n : nullptr);
  }
}

/// Walks `steps` column-then-row rounds back. On entry M is the iterate after the last of them and
/// G = dL/dM; `sums` holds those rounds' sums (column sums then row sums, n each, per round). On
/// exit M is the iterate before the first of them (reconstructed as M * s) and G = dL/dM there.
template <int N, typename V>
MHC_HOST_DEVICE void sinkhorn_reverse_rounds(int n_rt, int steps, V* M, const V* sums, V* G) {
  const int n = N > 0 ? N : n_rt;
  for (int k = steps - 1; k >= 0; --k) {
    const V* row_sums = sums + (2 * k + 1) * n;
    for (int i = 0; i < n; ++i) {
      V dot = G[i * n] * M[i * n];
      for (int j = 1; j < n; ++j) dot = dot + G[i * n + j] * M[i * n + j];
      const V s = row_sums[i];
      const V r = lane_recip(s);
      for (int j = 0; j < n; ++j) {
        G[i * n + j] = (G[i * n + j] - dot) * r;
        M[i * n + j] = M[i * n + j] * s;
      }
    }
    const V* col_sums = sums + (2 * k) * n;
    for (int j = 0; j < n; ++j) {
      V dot = G[j] * M[j];
      for (int i = 1; i < n; ++i) dot = dot + G[i * n + j] * M[i * n + j];
      const V s = col_sums[j];
      const V r = lane_recip(s);
      for (int i = 0; i < n; ++i) {
        G[i * n + j] = (G[i * n + j] - dot) * r;
        M[i * n + j] = M[i * n + j] * s;
      }
    }
  }
}

/// Backward of the clamped stable exp: G = dL/dM0 becomes dL/dA = G * exp(A - colmax) where the
/// exp was not clamped, 0 where it was. exp(A - colmax) is recomputed from A exactly.
template <int N, typename V>
MHC_HOST_DEVICE void sinkhorn_exp_backward(int n_rt, const V* A, V* G) {
  using S = lane_scalar_t<V>;
  const int n = N > 0 ? N : n_rt;
  for (int j = 0; j < n; ++j) {
    V m = A[j];
    for (int i = 1; i < n; ++i) m = lane_max(m, A[i * n + j]);
    for (int i = 0; i < n; ++i) {
      const V shifted = A[i * n + j] - m;
      const V e = lane_exp(shifted);
      const V g = G[i * n + j] * e;
      G[i * n + j] = lane_where_ge(e, tiny_normal<S>(), g);
    }
  }
}

/// Backward: given A, the forward's final M (overwritten: it walks back to M0) and its sums, turns
/// G from dL/dM into dL/dA in place.
template <int N, typename V>
MHC_HOST_DEVICE void sinkhorn_backward_kernel(int n_rt, int iterations, const V* A, V* M,
                                              const V* sums, V* G) {
  const int n = N > 0 ? N : n_rt;
  sinkhorn_reverse_rounds<N>(n, iterations, M, sums, G);
  sinkhorn_exp_backward<N>(n, A, G);
}

/// Backward from A alone, with scratch for at most `Capacity` rounds of sums
/// (sinkhorn_sums_size(n, Capacity) values) and n^2 values of M. Up to Capacity iterations it
/// costs one forward and one reverse sweep; beyond, it reverses Capacity rounds at a time,
/// recomputing the forward up to each chunk (memory stays fixed, time grows quadratically).
template <int N, int Capacity, typename V>
MHC_HOST_DEVICE void sinkhorn_backward_from_logits(int n_rt, int iterations, const V* A, V* M,
                                                   V* sums, V* G) {
  const int n = N > 0 ? N : n_rt;
  for (int hi = iterations; hi > 0; hi -= Capacity) {
    const int lo = hi > Capacity ? hi - Capacity : 0;
    sinkhorn_exp<N>(n, A, M);
    for (int k = 0; k < hi; ++k) {
      V* round = k >= lo ? sums + 2 * (k - lo) * n : nullptr;
      sinkhorn_normalize_columns<N>(n, M, round);
      sinkhorn_normalize_rows<N>(n, M, round ? round + n : nullptr);
    }
    sinkhorn_reverse_rounds<N>(n, hi - lo, M, sums, G);
  }
  sinkhorn_exp_backward<N>(n, A, G);
}

/// Max |column sum - 1| and max |row sum - 1| of one matrix (the doubly stochastic error).
template <int N, typename S>
MHC_HOST_DEVICE void doubly_stochastic_error(int n_rt, const S* M, S* col_err, S* row_err) {
  const int n = N > 0 ? N : n_rt;
  S ce = 0, re = 0;
  for (int a = 0; a < n; ++a) {
    S cs = 0, rs = 0;
    for (int b = 0; b < n; ++b) {
      cs += M[b * n + a];
      rs += M[a * n + b];
    }
    const S cd = cs > S(1) ? cs - S(1) : S(1) - cs;
    const S rd = rs > S(1) ? rs - S(1) : S(1) - rs;
    ce = (cd > ce || cd != cd) ? cd : ce;  // NaN-propagating max
    re = (rd > re || rd != rd) ? rd : re;
  }
  *col_err = ce;
  *row_err = re;
}

}  // namespace mhc::detail
