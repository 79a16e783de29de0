// mhc/cuda/layer.cuh: one mHC layer around a user layer F on the GPU, as the four calls a
// training step makes (spec sections 2 and 3):
//
//   forward:   layer_forward_pre    X -> coefficients, u = h_pre^T X                (2 passes)
//              (user)               y = F(u)
//              update_forward       X' = H_res X + h_post y^T                        (1 pass)
//   backward:  update_backward      G = dL/dX' -> dy, d_h_post, d_H_res (dX deferred)  (1 pass)
//              (user)               du = F'(u)^T dy
//              layer_backward       -> dX, dW, d_alpha, d_bias                       (2 passes)
//
// layer_backward fuses the three contributions to dX, H_res^T G + h_pre du^T + the coefficient
// term W (dz / r) - v (z . dz) / (n C r^2), and the partial dW into one pass over X, G and du,
// after a pass over X and du for dh_pre = X du.
#pragma once

#include "mhc/cuda/coefficients.cuh"
#include "mhc/cuda/mixing.cuh"

namespace mhc::cuda {

template <typename S>
inline std::size_t layer_forward_pre_workspace_size(int n, Index T, Index C) {
  return coefficients_forward_workspace_size<S>(n, T, C);
}

/// coefficients_forward then pre_mix_forward: X (T, n, C) stride ldx -> `coef` and u (T, C)
/// stride ldu.
template <typename S>
inline Status layer_forward_pre(int n, Index T, Index C, const S* X, Index ldx,
                                const MappingParams& p, const Coefficients& coef, S* u, Index ldu,
                                void* workspace, std::size_t workspace_bytes,
                                cudaStream_t stream = 0) {
  using namespace detail;
  if (!streams_ok(n) || T < 0 || C < 1) return Status::kInvalidArgument;
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_rows(u, T, C, ldu));
  if (T > 0 && overlap(u, T, ldu, X, span_bytes<S>(T * n, C, ldx), C)) return Status::kAliasing;
  MHC_CUDA_TRY(coefficients_forward(n, T, C, X, ldx, p, coef, workspace, workspace_bytes, stream));
  return pre_mix_forward(n, T, C, X, ldx, coef.h_pre, u, ldu, stream);
}

inline std::size_t layer_backward_workspace_size(int n, Index T, Index C, int iterations) {
  if (!detail::streams_ok(n) || T < 0 || C < 1) return 0;
  detail::Carve cv(nullptr);
  cv.take<float>(static_cast<std::size_t>(T) * n);  // d_h_pre
  cv.take<char>(pre_mix_backward_workspace_size(n, T, C));
  cv.take<char>(coefficients_backward_workspace_size(n, T, C, iterations));
  return cv.bytes();
}

/// Rest of the layer's backward once update_backward gave d_h_post, d_H_res and the user layer
/// gave du (T, C) stride ldu:
///   dX = H_res^T G + h_pre du^T + W (dz / r) - v (z . dz) / (n C r^2)   (T, n, C), written
///   dW (n C, n^2 + 2n), d_alpha (3), d_bias (n^2 + 2n): sums over tokens, written.
/// dX must not overlap G, du or X. Deterministic.
template <typename S>
inline Status layer_backward(int n, Index T, Index C, const S* G, Index ldg, const S* du,
                             Index ldu, const S* X, Index ldx, const MappingParams& p,
                             const ConstCoefficients& coef, const float* d_h_post,
                             const float* d_H_res, S* dX, Index lddx, float* dW, float* d_alpha,
                             float* d_bias, void* workspace, std::size_t workspace_bytes,
                             cudaStream_t stream = 0) {
  static_assert(detail::is_storage_v<S>, "mhc::cuda: storage must be float or __nv_bfloat16");
  using namespace detail;
  MHC_CUDA_TRY(check_params(n, T, C, p));
  MHC_CUDA_TRY(check_rows(G, T * n, C, ldg));
  MHC_CUDA_TRY(check_rows(du, T, C, ldu));
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_coefficients(coef, T));
  MHC_CUDA_TRY(check_floats(T * n, d_h_post));
  MHC_CUDA_TRY(check_floats(T * n * n, d_H_res));
  MHC_CUDA_TRY(check_grad_outputs(n, T, C, dX, lddx, dW, d_alpha, d_bias));
  if (T == 0) return zero_parameter_grads(n, C, dW, d_alpha, d_bias, stream);
  if (overlap(dX, T * n, lddx, G, span_bytes<S>(T * n, C, ldg), C) ||
      overlap(dX, T * n, lddx, X, span_bytes<S>(T * n, C, ldx), C) ||
      overlap(dX, T * n, lddx, du, span_bytes<S>(T, C, ldu), C))
    return Status::kAliasing;
  if (workspace_bytes < layer_backward_workspace_size(n, T, C, p.iterations))
    return Status::kWorkspaceTooSmall;
  if (!workspace) return Status::kInvalidArgument;
  Carve cv(workspace);
  float* d_h_pre = cv.take<float>(static_cast<std::size_t>(T) * n);
  const std::size_t pm_bytes = pre_mix_backward_workspace_size(n, T, C);
  void* pm_ws = cv.take<char>(pm_bytes);
  const std::size_t cb_bytes = coefficients_backward_workspace_size(n, T, C, p.iterations);
  Carve cb(cv.take<char>(cb_bytes));
  MHC_CUDA_TRY(pre_mix_backward<S>(n, T, C, X, ldx, du, ldu, coef.h_pre, nullptr, 0, false,
                                   d_h_pre, pm_ws, pm_bytes, stream));
  return coefficients_backward_impl<S>(n, T, C, G, ldg, du, ldu, X, ldx, p, coef, d_h_pre, d_h_post,
                                       d_H_res, dX, lddx, false, dW, d_alpha, d_bias, cb, stream);
}

}  // namespace mhc::cuda
