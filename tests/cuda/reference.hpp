// Double-precision reference for the CUDA tests, written from the spec formulas (sections 2 and
// 3). The per-token gate and Sinkhorn maths is the shared mhc::detail code with V = double; the
// projection, normalisation and the mixes are the plain sums of the spec.
#pragma once

#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "mhc/config.hpp"
#include "mhc/detail/coefficient_kernel.hpp"

namespace mhc_cuda_test {

using Index = mhc::Index;

/// Inputs of one layer in double (the exact values the GPU sees: bf16 inputs are rounded first).
struct LayerInputs {
  int n = 4;
  Index T = 0, C = 0;
  int iterations = 20;
  double eps = 1e-6;
  std::vector<double> X, y, G, du;  // (T, n, C), (T, C), (T, n, C), (T, C), dense
  std::vector<double> W;            // (n C, nc)
  double alpha[3] = {0, 0, 0};
  std::vector<double> bias;  // (nc)
  int nc() const { return n * n + 2 * n; }
};

/// Every per-token output of the layer (forward and backward) for one token.
struct TokenResult {
  std::vector<double> z, h_pre, h_post, H_res;  // nc, n, n, n*n
  double r = 0;
  std::vector<double> u, Xn;                    // C, n*C: pre-mix and update outputs
  std::vector<double> dy, d_h_post, d_H_res;    // C, n, n*n
  std::vector<double> d_h_pre;                  // n
  std::vector<double> dX_update, dX_premix, dX_coef;  // n*C each
  std::vector<double> q;                        // nc: dz / r
  double beta = 0;                              // (z . dz) / (n C r^2)
  double d_alpha[3] = {0, 0, 0};
  std::vector<double> d_bias;                   // nc
};

inline TokenResult reference_token(const LayerInputs& in, Index t) {
  const int n = in.n, nc = in.nc();
  const Index C = in.C;
  TokenResult o;
  const double* X = in.X.data() + t * n * C;
  const double* y = in.y.data() + t * C;
  const double* G = in.G.data() + t * n * C;
  const double* du = in.du.data() + t * C;
  // Projection and RMS (spec 2.1-2.2).
  std::vector<double> proj(nc, 0.0);
  double ss = 0;
  for (Index k = 0; k < n * C; ++k) {
    const double v = X[k];
    ss += v * v;
    const double* w = in.W.data() + k * nc;
    for (int j = 0; j < nc; ++j) proj[j] += v * w[j];
  }
  o.r = std::sqrt(ss / static_cast<double>(n * C) + in.eps);
  o.z.resize(nc);
  for (int j = 0; j < nc; ++j) o.z[j] = proj[j] / o.r;
  // Gates and Sinkhorn (spec 2.3-2.5): the shared per-token kernels in double.
  const mhc::detail::GateParams<double> gp{in.alpha[0], in.alpha[1], in.alpha[2], in.bias.data(),
                                           in.bias.data() + n, in.bias.data() + 2 * n};
  o.h_pre.resize(n);
  o.h_post.resize(n);
  o.H_res.resize(n * n);
  std::vector<double> A(n * n);
  mhc::detail::mhc_coefficients_forward<mhc::Dynamic>(n, in.iterations, o.z.data(), gp,
                                                      o.h_pre.data(), o.h_post.data(),
                                                      o.H_res.data(), A.data());
  // Pre-mix and update (spec 2.6-2.7).
  o.u.assign(C, 0.0);
  o.Xn.assign(n * C, 0.0);
  for (int i = 0; i < n; ++i)
    for (Index c = 0; c < C; ++c) {
      o.u[c] += o.h_pre[i] * X[i * C + c];
      double s = o.h_post[i] * y[c];
      for (int j = 0; j < n; ++j) s += o.H_res[i * n + j] * X[j * C + c];
      o.Xn[i * C + c] = s;
    }
  // Update backward (spec 3).
  o.dy.assign(C, 0.0);
  o.d_h_post.assign(n, 0.0);
  o.d_H_res.assign(n * n, 0.0);
  o.dX_update.assign(n * C, 0.0);
  for (int i = 0; i < n; ++i)
    for (Index c = 0; c < C; ++c) {
      const double g = G[i * C + c];
      o.dy[c] += o.h_post[i] * g;
      o.d_h_post[i] += g * y[c];
      for (int j = 0; j < n; ++j) {
        o.d_H_res[i * n + j] += g * X[j * C + c];
        o.dX_update[j * C + c] += o.H_res[i * n + j] * g;
      }
    }
  // Pre-mix backward.
  o.d_h_pre.assign(n, 0.0);
  o.dX_premix.assign(n * C, 0.0);
  for (int i = 0; i < n; ++i)
    for (Index c = 0; c < C; ++c) {
      o.d_h_pre[i] += X[i * C + c] * du[c];
      o.dX_premix[i * C + c] = o.h_pre[i] * du[c];
    }
  // Coefficient backward: shared gate + Sinkhorn backward, then the projection's.
  std::vector<double> dz(nc), scratch(mhc::detail::coefficient_backward_scratch(n, in.iterations));
  std::vector<double> dbp(n, 0.0), dbq(n, 0.0), dbr(n * n, 0.0);
  mhc::detail::mhc_coefficients_backward<mhc::Dynamic>(
      n, in.iterations, o.z.data(), gp, o.d_h_pre.data(), o.d_h_post.data(), o.d_H_res.data(),
      dz.data(), o.d_alpha, dbp.data(), dbq.data(), dbr.data(), scratch.data());
  o.d_bias.resize(nc);
  for (int i = 0; i < n; ++i) {
    o.d_bias[i] = dbp[i];
    o.d_bias[n + i] = dbq[i];
  }
  for (int k = 0; k < n * n; ++k) o.d_bias[2 * n + k] = dbr[k];
  o.q.resize(nc);
  double zdz = 0;
  for (int j = 0; j < nc; ++j) {
    o.q[j] = dz[j] / o.r;
    zdz += o.z[j] * dz[j];
  }
  o.beta = zdz / (static_cast<double>(n * C) * o.r * o.r);
  o.dX_coef.assign(n * C, 0.0);
  for (Index k = 0; k < n * C; ++k) {
    const double* w = in.W.data() + k * nc;
    double s = -o.beta * X[k];
    for (int j = 0; j < nc; ++j) s += w[j] * o.q[j];
    o.dX_coef[k] = s;
  }
  return o;
}

/// Sums over all tokens: dW (n C, nc), d_alpha (3), d_bias (nc), and the sums of absolute terms
/// (the scale a fixed-order fp32 sum is compared against). Threads over tokens.
struct ParamGrads {
  std::vector<double> dW, dW_abs, d_alpha, d_alpha_abs, d_bias, d_bias_abs;
};

inline ParamGrads reference_param_grads(const LayerInputs& in) {
  const int n = in.n, nc = in.nc();
  const Index K = n * in.C;
  unsigned workers = std::thread::hardware_concurrency();
  if (workers < 1) workers = 1;
  if (workers > 32) workers = 32;
  std::vector<ParamGrads> part(workers);
  std::vector<std::thread> pool;
  for (unsigned w = 0; w < workers; ++w) {
    pool.emplace_back([&, w] {
      ParamGrads& p = part[w];
      p.dW.assign(K * nc, 0.0);
      p.dW_abs.assign(K * nc, 0.0);
      p.d_alpha.assign(3, 0.0);
      p.d_alpha_abs.assign(3, 0.0);
      p.d_bias.assign(nc, 0.0);
      p.d_bias_abs.assign(nc, 0.0);
      for (Index t = w; t < in.T; t += workers) {
        const TokenResult r = reference_token(in, t);
        const double* X = in.X.data() + t * K;
        for (Index k = 0; k < K; ++k)
          for (int j = 0; j < nc; ++j) {
            const double v = X[k] * r.q[j];
            p.dW[k * nc + j] += v;
            p.dW_abs[k * nc + j] += std::abs(v);
          }
        for (int a = 0; a < 3; ++a) {
          p.d_alpha[a] += r.d_alpha[a];
          p.d_alpha_abs[a] += std::abs(r.d_alpha[a]);
        }
        for (int j = 0; j < nc; ++j) {
          p.d_bias[j] += r.d_bias[j];
          p.d_bias_abs[j] += std::abs(r.d_bias[j]);
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  ParamGrads out = part[0];
  for (unsigned w = 1; w < workers; ++w) {
    for (std::size_t k = 0; k < out.dW.size(); ++k) {
      out.dW[k] += part[w].dW[k];
      out.dW_abs[k] += part[w].dW_abs[k];
    }
    for (int a = 0; a < 3; ++a) {
      out.d_alpha[a] += part[w].d_alpha[a];
      out.d_alpha_abs[a] += part[w].d_alpha_abs[a];
    }
    for (int j = 0; j < nc; ++j) {
      out.d_bias[j] += part[w].d_bias[j];
      out.d_bias_abs[j] += part[w].d_bias_abs[j];
    }
  }
  return out;
}

}  // namespace mhc_cuda_test
