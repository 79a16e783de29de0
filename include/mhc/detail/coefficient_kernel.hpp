// detail/coefficient_kernel.hpp: the per-token mHC mappings from the normalised projection z,
// forward and backward (spec sections 2.3-2.5 and 3), shared by the CPU operators and CUDA.
//
//   z = (z_pre (n), z_post (n), z_res (n x n, row-major))          length n^2 + 2n
//   h_pre  = sigmoid(alpha_pre  * z_pre  + b_pre)                   Eq. 8
//   h_post = 2 sigmoid(alpha_post * z_post + b_post)
//   H_res  = SK(alpha_res * z_res + b_res)                          Eq. 9
// Backward, with s = sigmoid(a):  da_pre = dh_pre s(1-s),  da_post = 2 dh_post s(1-s),
// dA_res = SK'(dH_res);  dz = alpha * da;  dalpha += sum(da * z);  db += da.
#pragma once

#include "mhc/detail/sinkhorn_kernel.hpp"

namespace mhc::detail {

/// Number of projection outputs per token: n^2 + 2n.
MHC_HOST_DEVICE constexpr int coefficient_count(int n) { return n * n + 2 * n; }

/// The static parameters of one mHC block's mappings (per-block, not per-token).
template <typename S>
struct GateParams {
  S alpha_pre, alpha_post, alpha_res;
  const S* b_pre;   // (n)
  const S* b_post;  // (n)
  const S* b_res;   // (n, n) row-major
};

/// Scratch one token needs in mhc_coefficients_backward: A_res and M (n^2 each) and the
/// Sinkhorn sums.
MHC_HOST_DEVICE constexpr int coefficient_backward_scratch(int n, int iterations) {
  return 2 * n * n + sinkhorn_sums_size(n, iterations);
}

/// The two sigmoid gates of one token (Eq. 8): h_pre = sigmoid(alpha_pre z_pre + b_pre),
/// h_post = 2 sigmoid(alpha_post z_post + b_post), z_pre = z[0, n), z_post = z[n, 2n).
template <int N, typename V, typename S>
MHC_HOST_DEVICE void sigmoid_gates_forward(int n_rt, const V* z, const GateParams<S>& p, V* h_pre,
                                           V* h_post) {
  const int n = N > 0 ? N : n_rt;
  for (int i = 0; i < n; ++i) {
    const V a_pre = z[i] * p.alpha_pre + p.b_pre[i];
    const V a_post = z[n + i] * p.alpha_post + p.b_post[i];
    h_pre[i] = lane_sigmoid(a_pre);
    h_post[i] = lane_sigmoid(a_post) * S(2);
  }
}

/// Backward of sigmoid_gates_forward: writes dz[0, 2n); accumulates d_alpha[0..1], d_b_pre,
/// d_b_post with +=. da_pre = dh_pre s(1-s), da_post = 2 dh_post s(1-s), dz = alpha da.
template <int N, typename V, typename S>
MHC_HOST_DEVICE void sigmoid_gates_backward(int n_rt, const V* z, const GateParams<S>& p,
                                            const V* dh_pre, const V* dh_post, V* dz, V* d_alpha,
                                            V* d_b_pre, V* d_b_post) {
  const int n = N > 0 ? N : n_rt;
  for (int i = 0; i < n; ++i) {
    const V s_pre = lane_sigmoid(V(z[i] * p.alpha_pre + p.b_pre[i]));
    const V s_post = lane_sigmoid(V(z[n + i] * p.alpha_post + p.b_post[i]));
    const V da_pre = dh_pre[i] * s_pre * (S(1) - s_pre);
    const V da_post = dh_post[i] * s_post * (S(1) - s_post) * S(2);
    dz[i] = da_pre * p.alpha_pre;
    dz[n + i] = da_post * p.alpha_post;
    d_alpha[0] = d_alpha[0] + da_pre * z[i];
    d_alpha[1] = d_alpha[1] + da_post * z[n + i];
    d_b_pre[i] = d_b_pre[i] + da_pre;
    d_b_post[i] = d_b_post[i] + da_post;
  }
}

/// z -> h_pre (n), h_post (n), H_res (n x n). `A_scratch` holds n^2 lane values.
template <int N, typename V, typename S>
MHC_HOST_DEVICE void mhc_coefficients_forward(int n_rt, int iterations, const V* z,
                                              const GateParams<S>& p, V* h_pre, V* h_post,
                                              V* H_res, V* A_scratch) {
  const int n = N > 0 ? N : n_rt;
  const V* z_res = z + 2 * n;
  sigmoid_gates_forward<N>(n, z, p, h_pre, h_post);
  for (int k = 0; k < n * n; ++k) A_scratch[k] = z_res[k] * p.alpha_res + p.b_res[k];
  sinkhorn_forward_kernel<N>(n, iterations, A_scratch, H_res, static_cast<V*>(nullptr));
}

/// Backward of mhc_coefficients_forward for one token. Writes dz (n^2 + 2n); accumulates
/// d_alpha (3: pre, post, res), d_b_pre (n), d_b_post (n), d_b_res (n^2) with +=.
/// A and M hold n^2 lane values each, sums sinkhorn_sums_size(n, iterations) (separate arrays,
/// so that a GPU thread keeps A and M in registers while only the sums, indexed by the run-time
/// round, live in local memory).
template <int N, typename V, typename S>
MHC_HOST_DEVICE void mhc_coefficients_backward(int n_rt, int iterations, const V* z,
                                               const GateParams<S>& p, const V* dh_pre,
                                               const V* dh_post, const V* dH_res, V* dz,
                                               V* d_alpha, V* d_b_pre, V* d_b_post, V* d_b_res,
                                               V* A, V* M, V* sums) {
  const int n = N > 0 ? N : n_rt;
  const V* z_res = z + 2 * n;
  sigmoid_gates_backward<N>(n, z, p, dh_pre, dh_post, dz, d_alpha, d_b_pre, d_b_post);
  for (int k = 0; k < n * n; ++k) A[k] = z_res[k] * p.alpha_res + p.b_res[k];
  sinkhorn_forward_kernel<N>(n, iterations, A, M, sums);
  V* dA = dz + 2 * n;  // dA_res is computed in place in dz's res part, then scaled by alpha
  for (int k = 0; k < n * n; ++k) dA[k] = dH_res[k];
  sinkhorn_backward_kernel<N>(n, iterations, A, M, sums, dA);
  for (int k = 0; k < n * n; ++k) {
    d_alpha[2] = d_alpha[2] + dA[k] * z_res[k];
    d_b_res[k] = d_b_res[k] + dA[k];
    dA[k] = dA[k] * p.alpha_res;
  }
}

/// The same with one `scratch` of coefficient_backward_scratch(n, iterations) lane values
/// (A, M, then the sums).
template <int N, typename V, typename S>
MHC_HOST_DEVICE void mhc_coefficients_backward(int n_rt, int iterations, const V* z,
                                               const GateParams<S>& p, const V* dh_pre,
                                               const V* dh_post, const V* dH_res, V* dz,
                                               V* d_alpha, V* d_b_pre, V* d_b_post, V* d_b_res,
                                               V* scratch) {
  const int n = N > 0 ? N : n_rt;
  mhc_coefficients_backward<N>(n, iterations, z, p, dh_pre, dh_post, dH_res, dz, d_alpha, d_b_pre,
                               d_b_post, d_b_res, scratch, scratch + n * n, scratch + 2 * n * n);
}

}  // namespace mhc::detail
