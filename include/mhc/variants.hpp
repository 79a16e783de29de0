// variants.hpp: the hyper-connection variants a Block can run, behind one interface
// (spec section 4). A variant fixes the per-token map from the normalised projection z to the
// coefficients (h_pre, h_post, H_res), its width, and the default biases.
//
//   variant          z width K       residual logits R   mapping                      H_res
//   MhcVariant       n^2 + 2n        n^2                 sigmoid, 2 sigmoid, SK       doubly stochastic (Sinkhorn, Eq. 9)
//   HcVariant        n^2 + 2n        n^2                 alpha tanh(z) + b (all 3)    unconstrained (Zhu et al.)
//   MhcLiteVariant   n! + 2n         n!                  sigmoid, 2 sigmoid, softmax  sum_k w_k P_k, exactly doubly stochastic
//   ResidualVariant  0               0                   none: u = x, x' = x + F(x)   (n = 1 only)
//
// Default biases (BlockInit; every value overridable), chosen so that a fresh block with W = 0
// behaves like a pre-norm residual block reading mostly stream `pre_stream`:
//   mHC:  b_res = c I - c/2 (c = res_logit_gap = 6): every row and column of exp(b_res) has the
//         same sum, so one Sinkhorn round is already exact: H_res = diag e^c/(e^c + n - 1)
//         (0.99262 for n = 4), off-diagonal 1/(e^c + n - 1);
//         b_pre = +g on pre_stream, -g elsewhere, g = pre_logit (ln 99): h_pre = 0.99 / 0.01;
//         b_post = 0: h_post = 2 sigmoid(0) = 1.
//   mHC-lite: b_res = log(p (n! - 1) / (1 - p)) on the identity permutation, 0 elsewhere, so the
//         identity has weight p = lite_identity_weight (0.99) and H_res[i][i] >= p;
//         b_pre, b_post as for mHC.
//   HC:   b_res = I, b_pre = e_{pre_stream}, b_post = 1 (the HC paper's initialisation, which makes
//         the static part exactly a pre-norm residual).
// alpha_pre = alpha_post = alpha_res = 0.01 (paper Table 5); W = 0 unless projection_std > 0
// (then i.i.d. normal with that deviation, from `seed`).
//
// The per-token forward/backward of a mapping take their per-token values as V: a plain Real for
// one token, or a lane array (Eigen::Array<Real, W, 1>, detail/lanes.hpp) holding the same value
// of W tokens, which Coefficients uses to run the mappings a SIMD register of tokens at a time.
#pragma once

#include <cmath>

#include "mhc/config.hpp"
#include "mhc/detail/coefficient_kernel.hpp"
#include "mhc/detail/variant_kernel.hpp"

namespace mhc {

/// Initialisation of a block's parameters (see the table above for what each means per variant).
struct BlockInit {
  double alpha = 0.01;                 ///< alpha_pre, alpha_post, alpha_res (paper Table 5)
  double res_logit_gap = 6.0;          ///< mHC: c in b_res = c I - c/2
  double pre_logit = 4.59511985013459; ///< mHC, mHC-lite: +-g for b_pre; ln(99) gives 0.99 / 0.01
  double post_logit = 0.0;             ///< mHC, mHC-lite: b_post (0 gives h_post = 1)
  double lite_identity_weight = 0.99;  ///< mHC-lite: softmax weight of the identity permutation
  int pre_stream = 0;                  ///< the stream h_pre selects (a stack uses layer mod n)
  double projection_std = 0.0;         ///< W ~ N(0, std^2) when > 0, else W = 0
  unsigned long long seed = 0;         ///< for projection_std
};

/// mHC (default): sigmoid gates and Sinkhorn-projected H_res.
struct MhcVariant {
  static constexpr const char* name = "mHC";
  static constexpr bool kHasCoefficients = true;
  static constexpr int kMaxN = kMaxStreams;
  static constexpr int coefficient_count(int n) { return n * n + 2 * n; }
  static constexpr int res_count(int n) { return n * n; }
  static constexpr int scratch_count(int n, int iterations) {
    return detail::coefficient_backward_scratch(n, iterations);
  }
  template <int N, typename V, typename Real>
  static void forward(int n, int iterations, const V* z, const detail::GateParams<Real>& p,
                      V* h_pre, V* h_post, V* H_res, V* scratch) {
    detail::mhc_coefficients_forward<N>(n, iterations, z, p, h_pre, h_post, H_res, scratch);
  }
  template <int N, typename V, typename Real>
  static void backward(int n, int iterations, const V* z, const detail::GateParams<Real>& p,
                       const V* dh_pre, const V* dh_post, const V* dH_res, V* dz,
                       V* d_alpha, V* d_b_pre, V* d_b_post, V* d_b_res, V* scratch) {
    detail::mhc_coefficients_backward<N>(n, iterations, z, p, dh_pre, dh_post, dH_res, dz, d_alpha,
                                         d_b_pre, d_b_post, d_b_res, scratch);
  }
  template <typename Real>
  static void default_biases(int n, const BlockInit& init, Real* b_pre, Real* b_post, Real* b_res) {
    sigmoid_gate_biases(n, init, b_pre, b_post);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j)
        b_res[i * n + j] = Real((i == j ? init.res_logit_gap : 0.0) - init.res_logit_gap / 2);
  }
  template <typename Real>
  static void sigmoid_gate_biases(int n, const BlockInit& init, Real* b_pre, Real* b_post) {
    for (int i = 0; i < n; ++i) {
      b_pre[i] = Real(i == init.pre_stream % n ? init.pre_logit : -init.pre_logit);
      b_post[i] = Real(init.post_logit);
    }
  }
};

/// HC (Zhu et al.): unconstrained tanh mappings; the unstable baseline.
struct HcVariant {
  static constexpr const char* name = "HC";
  static constexpr bool kHasCoefficients = true;
  static constexpr int kMaxN = kMaxStreams;
  static constexpr int coefficient_count(int n) { return n * n + 2 * n; }
  static constexpr int res_count(int n) { return n * n; }
  static constexpr int scratch_count(int, int) { return 0; }
  template <int N, typename V, typename Real>
  static void forward(int n, int, const V* z, const detail::GateParams<Real>& p, V* h_pre,
                      V* h_post, V* H_res, V*) {
    detail::hc_coefficients_forward<N>(n, z, p, h_pre, h_post, H_res);
  }
  template <int N, typename V, typename Real>
  static void backward(int n, int, const V* z, const detail::GateParams<Real>& p,
                       const V* dh_pre, const V* dh_post, const V* dH_res, V* dz,
                       V* d_alpha, V* d_b_pre, V* d_b_post, V* d_b_res, V*) {
    detail::hc_coefficients_backward<N>(n, z, p, dh_pre, dh_post, dH_res, dz, d_alpha, d_b_pre,
                                        d_b_post, d_b_res);
  }
  template <typename Real>
  static void default_biases(int n, const BlockInit& init, Real* b_pre, Real* b_post, Real* b_res) {
    for (int i = 0; i < n; ++i) {
      b_pre[i] = Real(i == init.pre_stream % n ? 1 : 0);
      b_post[i] = Real(1);
      for (int j = 0; j < n; ++j) b_res[i * n + j] = Real(i == j ? 1 : 0);
    }
  }
};

/// mHC-lite (Yang & Gao): H_res a softmax-weighted sum of the n! permutation matrices; n <= 5.
struct MhcLiteVariant {
  static constexpr const char* name = "mHC-lite";
  static constexpr bool kHasCoefficients = true;
  static constexpr int kMaxN = detail::kMaxLiteStreams;
  static constexpr int coefficient_count(int n) { return detail::lite_coefficient_count(n); }
  static constexpr int res_count(int n) { return detail::factorial(n); }
  static constexpr int scratch_count(int n, int) { return detail::factorial(n); }
  template <int N, typename V, typename Real>
  static void forward(int n, int, const V* z, const detail::GateParams<Real>& p, V* h_pre,
                      V* h_post, V* H_res, V* scratch) {
    detail::lite_coefficients_forward<N>(n, z, p, h_pre, h_post, H_res, scratch);
  }
  template <int N, typename V, typename Real>
  static void backward(int n, int, const V* z, const detail::GateParams<Real>& p,
                       const V* dh_pre, const V* dh_post, const V* dH_res, V* dz,
                       V* d_alpha, V* d_b_pre, V* d_b_post, V* d_b_res, V* scratch) {
    detail::lite_coefficients_backward<N>(n, z, p, dh_pre, dh_post, dH_res, dz, d_alpha, d_b_pre,
                                          d_b_post, d_b_res, scratch);
  }
  template <typename Real>
  static void default_biases(int n, const BlockInit& init, Real* b_pre, Real* b_post, Real* b_res) {
    MhcVariant::sigmoid_gate_biases(n, init, b_pre, b_post);
    const int K = detail::factorial(n);
    const double p = init.lite_identity_weight;
    const double logit = K > 1 ? std::log(p * (K - 1) / (1 - p)) : 0.0;
    for (int k = 0; k < K; ++k) b_res[k] = Real(k == 0 ? logit : 0.0);
  }
};

/// Plain residual x' = x + F(x): one stream, no coefficients, no parameters.
struct ResidualVariant {
  static constexpr const char* name = "residual";
  static constexpr bool kHasCoefficients = false;
  static constexpr int kMaxN = 1;
  static constexpr int coefficient_count(int) { return 0; }
  static constexpr int res_count(int) { return 0; }
  static constexpr int scratch_count(int, int) { return 0; }
};

}  // namespace mhc
