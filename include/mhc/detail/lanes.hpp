// detail/lanes.hpp: the handful of element-wise operations the per-token kernels need, for two
// kinds of "lane" value: a plain scalar (one token; also what CUDA threads use) and a fixed-size
// Eigen::Array holding the same element of W tokens (the CPU SIMD tiles). Kernels written against
// these functions compile for both, so the maths exists once.
#pragma once

#include <cfloat>
#include <cmath>

#include "mhc/config.hpp"

#ifndef MHC_DEVICE_COMPILE
#include <Eigen/Core>
#endif

namespace mhc::detail {

/// Scalar type underneath a lane value.
template <typename V>
struct lane_scalar {
  using type = V;
};
template <typename V>
using lane_scalar_t = typename lane_scalar<V>::type;

/// Smallest positive normal number of the compute type: the floor that Sinkhorn's exp is clamped
/// to, so no row or column sum can reach zero (and no 0/0 appears) even for logits of +-1e4.
template <typename S>
MHC_HOST_DEVICE constexpr S tiny_normal();
template <>
MHC_HOST_DEVICE constexpr float tiny_normal<float>() { return FLT_MIN; }
template <>
MHC_HOST_DEVICE constexpr double tiny_normal<double>() { return DBL_MIN; }

MHC_HOST_DEVICE float lane_exp(float x) { return ::expf(x); }
MHC_HOST_DEVICE double lane_exp(double x) { return ::exp(x); }
MHC_HOST_DEVICE float lane_tanh(float x) { return ::tanhf(x); }
MHC_HOST_DEVICE double lane_tanh(double x) { return ::tanh(x); }
/// max that keeps a NaN in either argument's first position (NaN must propagate, never vanish).
template <typename S>
MHC_HOST_DEVICE S lane_max(S a, S b) { return b > a ? b : a; }
/// x clamped from below; NaN stays NaN.
template <typename S>
MHC_HOST_DEVICE S lane_floor(S x, S lo) { return x < lo ? lo : x; }
/// x where a >= b, else 0 (the derivative mask of lane_floor).
template <typename S>
MHC_HOST_DEVICE S lane_where_ge(S a, S b, S x) { return a >= b ? x : S(0); }
template <typename S>
MHC_HOST_DEVICE S lane_recip(S x) { return S(1) / x; }
/// 1 / x in float. In CUDA device code this is the hardware reciprocal (rcp.approx.ftz.f32, at
/// most 1 ulp from 1 / x; subnormal results flush to 0): the GPU runs these per-token kernels one
/// token per thread, latency-bound on their dependent chains, and the IEEE-rounded division is
/// about six dependent instructions instead of one. Host code keeps the exact 1 / x.
MHC_HOST_DEVICE float lane_recip(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return 1.0f / x;
#endif
}
template <typename S>
MHC_HOST_DEVICE S lane_sigmoid(S x) { return lane_recip(S(1) + lane_exp(-x)); }

#ifndef MHC_DEVICE_COMPILE
template <typename S, int W>
struct lane_scalar<Eigen::Array<S, W, 1>> {
  using type = S;
};
template <typename S, int W>
inline Eigen::Array<S, W, 1> lane_exp(const Eigen::Array<S, W, 1>& x) { return x.exp(); }
template <typename S, int W>
inline Eigen::Array<S, W, 1> lane_tanh(const Eigen::Array<S, W, 1>& x) { return x.tanh(); }
template <typename S, int W>
inline Eigen::Array<S, W, 1> lane_max(const Eigen::Array<S, W, 1>& a, const Eigen::Array<S, W, 1>& b) {
  return (b > a).select(b, a);
}
template <typename S, int W>
inline Eigen::Array<S, W, 1> lane_floor(const Eigen::Array<S, W, 1>& x, S lo) {
  return (x < lo).select(Eigen::Array<S, W, 1>::Constant(lo), x);
}
template <typename S, int W>
inline Eigen::Array<S, W, 1> lane_where_ge(const Eigen::Array<S, W, 1>& a, S b,
                                           const Eigen::Array<S, W, 1>& x) {
  return (a >= b).select(x, Eigen::Array<S, W, 1>::Zero());
}
template <typename S, int W>
inline Eigen::Array<S, W, 1> lane_recip(const Eigen::Array<S, W, 1>& x) { return x.inverse(); }
template <typename S, int W>
inline Eigen::Array<S, W, 1> lane_sigmoid(const Eigen::Array<S, W, 1>& x) {
  return (S(1) + (-x).exp()).inverse();
}
#endif

}  // namespace mhc::detail
