// detail/variant_kernel.hpp: the per-token mappings z -> (h_pre, h_post, H_res) of the variants
// other than mHC (whose mappings are detail/coefficient_kernel.hpp), forward and backward,
// shared by the CPU block and CUDA. Same argument shape as mhc_coefficients_forward/backward.
//
// HC (Zhu et al., arXiv 2409.19606, dynamic hyper-connections, Eqs. 10-13; written as in the
// mHC paper's Eq. 5). Our choice: the dynamic part uses mHC's flattened, RMS-normalised projection
// z = (vec(X) W) / r (Eq. 7, width n^2 + 2n) instead of HC's per-stream LayerNorm and C-wide
// projections, so that HC and mHC differ only in the mapping below (the constraint under study):
//   h_pre  = alpha_pre  * tanh(z_pre)  + b_pre            (n)      unconstrained
//   h_post = alpha_post * tanh(z_post) + b_post           (n)      unconstrained
//   H_res  = alpha_res  * tanh(z_res)  + b_res            (n x n)  unconstrained
// Backward, t = tanh(z):  dz = alpha * dh * (1 - t^2);  dalpha += sum(dh * t);  db += dh.
//
// mHC-lite (Yang & Gao, arXiv 2601.05732): H_res is a convex combination of the n! permutation
// matrices, exactly doubly stochastic without Sinkhorn:
//   a = alpha_res * z_res + b_res   (n! logits: the projection is n! + 2n wide, not n^2 + 2n)
//   w = softmax(a),  H_res = sum_k w_k P_k,  P_k[i][perm_k(i)] = 1,
// perm_k the k-th permutation of (0..n-1) in lexicographic order (Lehmer code of k).
// h_pre and h_post are mHC's sigmoid gates (Eq. 8). Backward:
//   dw_k = sum_i dH_res[i][perm_k(i)],  da = w * (dw - sum_k w_k dw_k),
//   dz_res = alpha_res * da,  dalpha_res += sum(da * z_res),  db_res += da.
#pragma once

#include "mhc/detail/coefficient_kernel.hpp"

namespace mhc::detail {

/// n! for the small n the permutation variant supports.
MHC_HOST_DEVICE constexpr int factorial(int n) { return n <= 1 ? 1 : n * factorial(n - 1); }

/// Largest n for mHC-lite (n! = 120 logits per token at n = 5).
inline constexpr int kMaxLiteStreams = 5;

/// perm[i] for the k-th permutation of 0..n-1 in lexicographic order (k < n!, n <= 5).
MHC_HOST_DEVICE void permutation(int n, int k, int* perm) {
  int pool[kMaxLiteStreams] = {0, 1, 2, 3, 4};
  int left = n;
  for (int i = 0; i < n; ++i) {
    const int f = factorial(n - 1 - i);
    const int pick = k / f;
    k -= pick * f;
    perm[i] = pool[pick];
    for (int m = pick; m + 1 < left; ++m) pool[m] = pool[m + 1];
    --left;
  }
}

// ---- HC -----------------------------------------------------------------------------------------

/// HC coefficients for one token: z (n^2 + 2n) -> h_pre (n), h_post (n), H_res (n x n).
template <int N, typename V, typename S>
MHC_HOST_DEVICE void hc_coefficients_forward(int n_rt, const V* z, const GateParams<S>& p, V* h_pre,
                                             V* h_post, V* H_res) {
  const int n = N > 0 ? N : n_rt;
  for (int i = 0; i < n; ++i) {
    h_pre[i] = lane_tanh(V(z[i])) * p.alpha_pre + p.b_pre[i];
    h_post[i] = lane_tanh(V(z[n + i])) * p.alpha_post + p.b_post[i];
  }
  for (int k = 0; k < n * n; ++k) H_res[k] = lane_tanh(V(z[2 * n + k])) * p.alpha_res + p.b_res[k];
}

/// Backward of hc_coefficients_forward: writes dz (n^2 + 2n); accumulates d_alpha (3: pre, post,
/// res), d_b_pre (n), d_b_post (n), d_b_res (n^2) with +=.
template <int N, typename V, typename S>
MHC_HOST_DEVICE void hc_coefficients_backward(int n_rt, const V* z, const GateParams<S>& p,
                                              const V* dh_pre, const V* dh_post, const V* dH_res,
                                              V* dz, V* d_alpha, V* d_b_pre, V* d_b_post,
                                              V* d_b_res) {
  const int n = N > 0 ? N : n_rt;
  for (int i = 0; i < n; ++i) {
    const V t_pre = lane_tanh(V(z[i]));
    const V t_post = lane_tanh(V(z[n + i]));
    dz[i] = dh_pre[i] * (S(1) - t_pre * t_pre) * p.alpha_pre;
    dz[n + i] = dh_post[i] * (S(1) - t_post * t_post) * p.alpha_post;
    d_alpha[0] = d_alpha[0] + dh_pre[i] * t_pre;
    d_alpha[1] = d_alpha[1] + dh_post[i] * t_post;
    d_b_pre[i] = d_b_pre[i] + dh_pre[i];
    d_b_post[i] = d_b_post[i] + dh_post[i];
  }
  for (int k = 0; k < n * n; ++k) {
    const V t = lane_tanh(V(z[2 * n + k]));
    dz[2 * n + k] = dH_res[k] * (S(1) - t * t) * p.alpha_res;
    d_alpha[2] = d_alpha[2] + dH_res[k] * t;
    d_b_res[k] = d_b_res[k] + dH_res[k];
  }
}

// ---- mHC-lite -----------------------------------------------------------------------------------

/// Projection width of mHC-lite: n! + 2n.
MHC_HOST_DEVICE constexpr int lite_coefficient_count(int n) { return factorial(n) + 2 * n; }

/// w = softmax(alpha_res z_res + b_res) over the K = n! permutation logits (max-shifted).
template <typename V, typename S>
MHC_HOST_DEVICE void lite_softmax_weights(int K, const V* z_res, const GateParams<S>& p, V* w) {
  V m = z_res[0] * p.alpha_res + p.b_res[0];
  for (int k = 0; k < K; ++k) {
    w[k] = z_res[k] * p.alpha_res + p.b_res[k];
    m = lane_max(m, w[k]);
  }
  V total = w[0] * S(0);
  for (int k = 0; k < K; ++k) {
    w[k] = lane_exp(V(w[k] - m));
    total = total + w[k];
  }
  const V inv = lane_recip(total);
  for (int k = 0; k < K; ++k) w[k] = w[k] * inv;
}

/// mHC-lite coefficients for one token: z (n! + 2n) -> h_pre (n), h_post (n), H_res (n x n).
/// `w_scratch` holds n! lane values (the softmax weights on exit).
template <int N, typename V, typename S>
MHC_HOST_DEVICE void lite_coefficients_forward(int n_rt, const V* z, const GateParams<S>& p,
                                               V* h_pre, V* h_post, V* H_res, V* w_scratch) {
  const int n = N > 0 ? N : n_rt;
  const int K = factorial(n);
  sigmoid_gates_forward<N>(n, z, p, h_pre, h_post);
  lite_softmax_weights(K, z + 2 * n, p, w_scratch);
  for (int k = 0; k < n * n; ++k) H_res[k] = w_scratch[0] * S(0);
  int perm[kMaxLiteStreams];
  for (int k = 0; k < K; ++k) {
    permutation(n, k, perm);
    for (int i = 0; i < n; ++i) H_res[i * n + perm[i]] = H_res[i * n + perm[i]] + w_scratch[k];
  }
}

/// Backward of lite_coefficients_forward: writes dz (n! + 2n); accumulates d_alpha (3),
/// d_b_pre (n), d_b_post (n), d_b_res (n!) with +=. `w_scratch` holds n! lane values.
template <int N, typename V, typename S>
MHC_HOST_DEVICE void lite_coefficients_backward(int n_rt, const V* z, const GateParams<S>& p,
                                                const V* dh_pre, const V* dh_post, const V* dH_res,
                                                V* dz, V* d_alpha, V* d_b_pre, V* d_b_post,
                                                V* d_b_res, V* w_scratch) {
  const int n = N > 0 ? N : n_rt;
  const int K = factorial(n);
  sigmoid_gates_backward<N>(n, z, p, dh_pre, dh_post, dz, d_alpha, d_b_pre, d_b_post);
  // Recompute w = softmax(a) (n! values; cheaper than storing them per token).
  const V* z_res = z + 2 * n;
  lite_softmax_weights(K, z_res, p, w_scratch);
  // dw_k into dz's res part, and sum_k w_k dw_k.
  V* dw = dz + 2 * n;
  V wdw = w_scratch[0] * S(0);
  int perm[kMaxLiteStreams];
  for (int k = 0; k < K; ++k) {
    permutation(n, k, perm);
    V g = dH_res[perm[0]];
    for (int i = 1; i < n; ++i) g = g + dH_res[i * n + perm[i]];
    dw[k] = g;
    wdw = wdw + w_scratch[k] * g;
  }
  for (int k = 0; k < K; ++k) {
    const V da = w_scratch[k] * (dw[k] - wdw);
    d_alpha[2] = d_alpha[2] + da * z_res[k];
    d_b_res[k] = d_b_res[k] + da;
    dz[2 * n + k] = da * p.alpha_res;
  }
}

}  // namespace mhc::detail
