// coefficients.hpp: the per-token hyper-connection coefficients on the CPU, forward and backward
// (spec sections 2.1-2.5, 3 and 4; paper Eqs. 7-9). Per token, with v = vec(X_t)
// (v[i*C + c] = X_t[i][c], length nC) and M = Mapping::coefficient_count(n) (n^2 + 2n for mHC and
// HC, n! + 2n for mHC-lite):
//
//   r = sqrt(sum(v^2) / (nC) + eps)                                  (Eq. 7, RMS norm)
//   z = (v W) / r                                  (1, M)            (Eq. 7, gain folded into W)
//   (h_pre, h_post, H_res) = Mapping(z)            (n, n, n x n)     (Eqs. 8-9 for mHC)
//
// Mapping is a variant of variants.hpp with coefficients: MhcVariant (default: sigmoid gates,
// H_res = SK(alpha_res z_res + b_res), t_max iterations), HcVariant (alpha tanh(z) + b) or
// MhcLiteVariant (sigmoid gates, H_res = sum_k softmax(alpha_res z_res + b_res)_k P_k). The
// projection, norm, d_X / d_W backward and static-only mode below are the same for all of them.
//
// v W and sum(v^2) come from ONE pass over X (12 tokens at a time for mHC with n = 4, so each row
// of W read from cache serves 12 tokens); the norm is applied after the product. The per-token
// mappings are the shared MHC_HOST_DEVICE kernels of detail/coefficient_kernel.hpp and
// detail/variant_kernel.hpp (the CUDA operators use the same ones).
//
// Backward (G_h = dL/dh_pre, dL/dh_post, dL/dH_res per token):
//   dz = alpha * da  (the mapping's backward; for mHC the gates and the exact t_max-step Sinkhorn
//                     backward, recomputing its iterates from z)
//   g = dz / r;   dW = sum_t v_t^T g_t;   dv_t = W g_t - v_t (z_t . g_t) / (nC r_t)   (d_X +=)
//   d_alpha = sum_t sum(da_t * z_t) per group;   d_b = sum_t da_t.
//
// Cache: the forward writes r (T, 1) and z (T, M) (M + 1 values per token, caller-owned); the
// backward reads them and recomputes the Sinkhorn iterates per token (no t_max * n^2 storage).
// Workspace: the backward needs workspace_size(T, n, C) Real values from the caller (per-token
// g, da, dalpha and a transposed copy of W); nothing is heap-allocated inside.
// Determinism: per-token values are computed independently; the sums over tokens (dW, d_alpha,
// d_b) run in token order for every output element, so results are bitwise identical for any
// number of OpenMP threads.
//
// Static-only mode (W with zero rows): the coefficients are the gated biases (z = 0), computed
// once into ONE output row that the mixing operators broadcast to all tokens; X, r and z are not
// touched. Its backward sums the per-token coefficient gradients and runs the gate/Sinkhorn
// backward once; d_X and d_W are untouched and no workspace is needed.
#pragma once

#include <cmath>

#include "mhc/detail/coefficient_kernel.hpp"
#include "mhc/detail/operator_support.hpp"
#include "mhc/variants.hpp"

namespace mhc {

/// Parameters of one block's coefficient mappings (views, caller-owned), in the compute type.
template <typename Real>
struct CoefficientParams {
  ConstBatchRef<Real> W;            ///< (n*C, M), row i*C + c; zero rows: static-only mode
  Eigen::Matrix<Real, 3, 1> alpha;  ///< (alpha_pre, alpha_post, alpha_res)
  ConstVectorRef<Real> b_pre;       ///< (n)
  ConstVectorRef<Real> b_post;      ///< (n)
  ConstVectorRef<Real> b_res;       ///< (R): n*n row-major for mHC and HC, n! for mHC-lite
  int iterations = 20;              ///< Sinkhorn t_max (mHC), in [1, kMaxSinkhornIterations]
  Real eps = Real(1e-6);            ///< eps_rms inside r, > 0
};

/// Parameter gradients (views, caller-owned; all overwritten by the backward).
template <typename Real>
struct CoefficientGrads {
  BatchRef<Real> d_W;        ///< same shape as W (zero rows in static-only mode)
  VectorRef<Real> d_alpha;   ///< (3)
  VectorRef<Real> d_b_pre;   ///< (n)
  VectorRef<Real> d_b_post;  ///< (n)
  VectorRef<Real> d_b_res;   ///< (R)
};

namespace detail {

/// The (M) projection accumulator of one token for a compile-time M, split as a multiple of the
/// widest packet plus the rest, so every FMA uses the widest packet that fits (M = 24 for n = 4:
/// one 16-lane and one 8-lane FMA with AVX-512, instead of three 8-lane ones).
template <typename Real, int M>
struct SplitAccumulator {
  static constexpr int kLanes = Eigen::internal::packet_traits<Real>::size;
  static constexpr int kHi = (M / kLanes) * kLanes;
  static constexpr int kLo = M - kHi;
  Eigen::Array<Real, (kHi > 0 ? kHi : 1), 1> hi;
  Eigen::Array<Real, (kLo > 0 ? kLo : 1), 1> lo;
  void set_zero() {
    hi.setZero();
    lo.setZero();
  }
  /// this += w (M values) * s
  void fma(const Real* w, Real s) {
    if constexpr (kHi > 0) hi += Eigen::Map<const Eigen::Array<Real, kHi, 1>>(w) * s;
    if constexpr (kLo > 0) lo += Eigen::Map<const Eigen::Array<Real, kLo, 1>>(w + kHi) * s;
  }
  /// dst (M) = this * s
  void store_scaled(Real* dst, Real s) const {
    if constexpr (kHi > 0) Eigen::Map<Eigen::Array<Real, kHi, 1>>(dst, kHi) = hi * s;
    if constexpr (kLo > 0) Eigen::Map<Eigen::Array<Real, kLo, 1>>(dst + kHi, kLo) = lo * s;
  }
};

/// Run-time M (N = Dynamic): one array of at most MaxM values.
template <typename Real, int MaxM>
struct DynamicAccumulator {
  Eigen::Array<Real, Eigen::Dynamic, 1, Eigen::ColMajor, MaxM, 1> a;
  int m = 0;
  void init(int M) {
    m = M;
    a.setZero(M);
  }
  void fma(const Real* w, Real s) {
    a += Eigen::Map<const Eigen::Array<Real, Eigen::Dynamic, 1>>(w, m) * s;
  }
  void store_scaled(Real* dst, Real s) const {
    Eigen::Map<Eigen::Array<Real, Eigen::Dynamic, 1>>(dst, m) = a * s;
  }
};

template <typename Scalar, int N, typename Mapping>
struct CoefficientKernels {
  using Real = compute_t<Scalar>;
  static constexpr int kMaxN = N == Dynamic ? Mapping::kMaxN : N;
  static constexpr int kMaxM = Mapping::coefficient_count(kMaxN);  // projection width M
  static constexpr int kMaxH = kMaxN * kMaxN + 2 * kMaxN;           // coefficients per token
  static constexpr int kScratch =  // per-token scratch of the mapping, forward and backward
      std::max(1, Mapping::scratch_count(kMaxN, kMaxSinkhornIterations));
  static constexpr int kPacket = Eigen::internal::packet_traits<Real>::size;
  // Register budget: about 24 packet accumulators per tile (of 32 vector registers with AVX-512).
  static constexpr int kAccPackets = (kMaxM + kPacket - 1) / kPacket;  // per token, forward
  static constexpr int kTileTokens =  // tokens per tile of the forward projection (12 for n = 4)
      N == Dynamic ? 8 : std::max(1, std::min(12, 24 / kAccPackets));
  static constexpr int kGradColumnBlock = 32;  // columns per block of the d_X pass
  static constexpr int kGradTileTokens =       // tokens per tile of the d_X pass (12 for float)
      std::max(1, std::min(12, 24 / std::max(1, kGradColumnBlock / kPacket)));
  using Accumulator =
      std::conditional_t<N == Dynamic, DynamicAccumulator<Real, kMaxM>,
                         SplitAccumulator<Real, Mapping::coefficient_count(N > 0 ? N : 1)>>;

  static GateParams<Real> gates(const CoefficientParams<Real>& p) {
    return {p.alpha[0], p.alpha[1], p.alpha[2], p.b_pre.data(), p.b_post.data(), p.b_res.data()};
  }

  /// Forward for tokens [t0, t0 + TB): the projection and sum of squares in one pass over their
  /// rows of X, then r, z and the coefficients per token.
  template <int TB>
  static void forward_tile(const ConstBatchRef<Scalar>& X, const CoefficientParams<Real>& p,
                           int n_rt, Index t0, BatchRef<Real>& h_pre, BatchRef<Real>& h_post,
                           BatchRef<Real>& H_res, BatchRef<Real>& r, BatchRef<Real>& z) {
    const int n = N == Dynamic ? n_rt : N;
    const Index C = X.cols();
    const int M = Mapping::coefficient_count(n);
    const Index ldw = p.W.outerStride();
    Accumulator acc[TB];
    Real ss[TB];
    for (int t = 0; t < TB; ++t) {
      if constexpr (N == Dynamic)
        acc[t].init(M);
      else
        acc[t].set_zero();
      ss[t] = Real(0);
    }
    for (int i = 0; i < n; ++i) {
      for_each_column_block(C, [&](Index c0, auto width_tag, Index w) {
        constexpr int W = decltype(width_tag)::value;
        const Real* v[TB];
        [[maybe_unused]] Real converted[TB][kColumnBlock];
        for (int t = 0; t < TB; ++t) {
          const Scalar* src = detail::at(X, (t0 + t) * n + i, c0);
          if constexpr (std::is_same<Scalar, Real>::value) {
            v[t] = src;
          } else {
            bf16_to_float(src, converted[t], w);
            v[t] = converted[t];
          }
          ss[t] += Eigen::Map<const Eigen::Array<Real, 1, W>>(v[t], w).square().sum();
        }
        const Real* wk = detail::at(p.W, Index(i) * C + c0, 0);
        for (Index c = 0; c < w; ++c, wk += ldw)
          for (int t = 0; t < TB; ++t) acc[t].fma(wk, v[t][c]);
      });
    }
    const Real nC = Real(n) * Real(C);
    Real scratch[kScratch];
    for (int t = 0; t < TB; ++t) {
      const Index tok = t0 + t;
      const Real mean_square = C > 0 ? ss[t] / nC : Real(0);
      const Real rt = std::sqrt(mean_square + p.eps);
      r(tok, 0) = rt;
      Real* zt = detail::at(z, tok, 0);
      acc[t].store_scaled(zt, Real(1) / rt);
      Mapping::template forward<N>(n, p.iterations, static_cast<const Real*>(zt), gates(p),
                                   detail::at(h_pre, tok, 0), detail::at(h_post, tok, 0),
                                   detail::at(H_res, tok, 0), scratch);
    }
  }

  using Packet = typename Eigen::internal::packet_traits<Real>::type;

  /// kPacket values at src in the compute type, as a packet (converted through `buf` for bf16).
  static Packet load_packet(const Scalar* src, Real* buf) {
    if constexpr (std::is_same<Scalar, Real>::value) {
      (void)buf;
      return Eigen::internal::ploadu<Packet>(src);
    } else {
      Eigen::Map<Eigen::Array<Real, 1, kPacket>>(buf, kPacket) =
          load_row<Real, kPacket>(src, kPacket);
      return Eigen::internal::ploadu<Packet>(buf);
    }
  }

  /// d_X += W g_t - v_t beta_t for tokens [t0, t0 + TB), with Wt = W^T (M, nC) contiguous,
  /// g (T, ldg) and beta_t = (z_t . g_t) / (nC r_t). Full kGradColumnBlock-wide blocks keep the
  /// TB x (block / kPacket) accumulators in registers; the tail block goes through Eigen arrays.
  template <int TB>
  static void dx_tile(const ConstBatchRef<Scalar>& X, int n_rt, Index t0, const Real* Wt,
                      const Real* g, Index ldg, const Real* beta, BatchRef<Scalar>& d_X) {
    using namespace Eigen::internal;
    const int n = N == Dynamic ? n_rt : N;
    const Index C = X.cols();
    const Index nC = Index(n) * C;
    const int M = Mapping::coefficient_count(n);
    constexpr int kVec = kGradColumnBlock / kPacket;
    for (int i = 0; i < n; ++i) {
      for_each_column_block<kGradColumnBlock>(C, [&](Index c0, auto width_tag, Index w) {
        constexpr int W = decltype(width_tag)::value;
        const Real* wt = Wt + Index(i) * C + c0;
        if constexpr (W == kGradColumnBlock && kGradColumnBlock % kPacket == 0) {
          [[maybe_unused]] Real buf[kPacket];
          Packet acc[TB][kVec];
          for (int t = 0; t < TB; ++t) {
            const Scalar* src = detail::at(X, (t0 + t) * n + i, c0);
            const Packet nb = pset1<Packet>(-beta[t]);
            for (int q = 0; q < kVec; ++q)
              acc[t][q] = pmul(nb, load_packet(src + q * kPacket, buf));
          }
          for (int m = 0; m < M; ++m, wt += nC) {
            Packet wm[kVec];
            for (int q = 0; q < kVec; ++q) wm[q] = ploadu<Packet>(wt + q * kPacket);
            for (int t = 0; t < TB; ++t) {
              const Packet gb = pset1<Packet>(g[(t0 + t) * ldg + m]);
              for (int q = 0; q < kVec; ++q) acc[t][q] = pmadd(gb, wm[q], acc[t][q]);
            }
          }
          for (int t = 0; t < TB; ++t) {
            Scalar* dst = detail::at(d_X, (t0 + t) * n + i, c0);
            for (int q = 0; q < kVec; ++q) {
              const Packet sum = padd(load_packet(dst + q * kPacket, buf), acc[t][q]);
              if constexpr (std::is_same<Scalar, Real>::value) {
                pstoreu(dst + q * kPacket, sum);
              } else {
                pstoreu(buf, sum);
                store_row<kPacket>(dst + q * kPacket, kPacket,
                                   Eigen::Map<const Eigen::Array<Real, 1, kPacket>>(buf));
              }
            }
          }
        } else {
          BlockRow<Real, Eigen::Dynamic, kGradColumnBlock> acc[TB];
          for (int t = 0; t < TB; ++t)
            acc[t] =
                -beta[t] * load_row<Real, Eigen::Dynamic>(detail::at(X, (t0 + t) * n + i, c0), w);
          for (int m = 0; m < M; ++m, wt += nC) {
            const Eigen::Map<const Eigen::Array<Real, 1, Eigen::Dynamic>> wm(wt, w);
            for (int t = 0; t < TB; ++t) acc[t] += g[(t0 + t) * ldg + m] * wm;
          }
          for (int t = 0; t < TB; ++t) {
            Scalar* dst = detail::at(d_X, (t0 + t) * n + i, c0);
            store_row<Eigen::Dynamic>(dst, w, load_row<Real, Eigen::Dynamic>(dst, w) + acc[t]);
          }
        }
      });
    }
  }

  /// d_W rows [k0, k0 + w) (w <= kPacket, all in row i of X, columns c0..): sum over every token,
  /// in token order, of v_t[k] g_t. The M packet accumulators stay in registers for fixed n.
  static void dw_block(const ConstBatchRef<Scalar>& X, int n_rt, int i, Index c0, Index w,
                       const Real* g, Index ldg, BatchRef<Real>& d_W) {
    using namespace Eigen::internal;
    const int n = N == Dynamic ? n_rt : N;
    const Index T = X.rows() / n;
    const int M = Mapping::coefficient_count(n);
    constexpr int kAccs = N == Dynamic ? kMaxM : Mapping::coefficient_count(N > 0 ? N : 1);
    Packet acc[kAccs];
    for (int m = 0; m < M; ++m) acc[m] = pset1<Packet>(Real(0));
    alignas(64) Real buf[kPacket] = {};
    constexpr Index kAhead = 8;  // tokens prefetched ahead: the walk strides by a whole token
    for (Index t = 0; t < T; ++t) {
      if (t + kAhead < T) prefetch(detail::at(X, (t + kAhead) * n + i, c0));
      const Scalar* src = detail::at(X, t * n + i, c0);
      Packet v;
      if (w == kPacket) {
        v = load_packet(src, buf);
      } else {
        Eigen::Map<Eigen::Array<Real, 1, Eigen::Dynamic>>(buf, w) =
            load_row<Real, Eigen::Dynamic>(src, w);
        v = ploadu<Packet>(buf);  // lanes >= w stay 0
      }
      const Real* gt = g + t * ldg;
      if constexpr (N == Dynamic) {
        for (int m = 0; m < M; ++m) acc[m] = pmadd(pset1<Packet>(gt[m]), v, acc[m]);
      } else {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
        for (int m = 0; m < kAccs; ++m) acc[m] = pmadd(pset1<Packet>(gt[m]), v, acc[m]);
      }
    }
    const Index k0 = Index(i) * X.cols() + c0;
    for (int m = 0; m < M; ++m) {
      pstoreu(buf, acc[m]);
      for (Index c = 0; c < w; ++c) d_W(k0 + c, m) = buf[c];
    }
  }
};

}  // namespace detail

/// The coefficient pipeline X -> (h_pre, h_post, H_res) of one hyper-connection block, forward
/// and backward. Scalar: storage type of X (float, double, bf16); everything else is in
/// Real = compute_t<Scalar>. N: compile-time number of streams (mhc::Dynamic: taken from
/// b_pre.size()). Mapping: MhcVariant (default), HcVariant or MhcLiteVariant (variants.hpp).
template <typename Scalar, int N = 4, typename Mapping = MhcVariant>
struct Coefficients {
  static_assert(detail::is_storage_scalar_v<Scalar>,
                "mhc::Coefficients: Scalar must be float, double or bf16");
  static_assert(Mapping::kHasCoefficients,
                "mhc::Coefficients: the mapping must have coefficients (mHC, HC or mHC-lite)");
  static_assert(N == Dynamic || (N >= 1 && N <= Mapping::kMaxN),
                "mhc::Coefficients: N out of range for the mapping");
  using Real = compute_t<Scalar>;
  using Params = CoefficientParams<Real>;
  using Grads = CoefficientGrads<Real>;
  using MappingType = Mapping;
  static constexpr int kStreams = N;

  /// Number of projection outputs per token, M (n^2 + 2n for mHC and HC, n! + 2n for mHC-lite).
  static constexpr Index projection_size(int n) { return Mapping::coefficient_count(n); }
  /// Number of residual logits per token, R = size of b_res (n^2, or n! for mHC-lite).
  static constexpr Index res_size(int n) { return Mapping::res_count(n); }

  /// Real values the backward needs in `workspace` for T tokens of n x C (0 when static_only).
  static Index workspace_size(Index T, int n, Index C, bool static_only = false) {
    if (static_only) return 0;
    const Index M = projection_size(n);
    return T * (2 * M + 3) + M * Index(n) * C;
  }

  /// Forward. X (T*n, C) Scalar. Outputs, Real: h_pre (T, n), h_post (T, n), H_res (T, n*n), and
  /// the cache r (T, 1), z (T, M). Static-only mode (p.W has zero rows): h_pre, h_post,
  /// H_res have ONE row; X, r and z are ignored.
  static void forward(const ConstBatchRef<Scalar>& X, const Params& p, BatchRef<Real> h_pre,
                      BatchRef<Real> h_post, BatchRef<Real> H_res, BatchRef<Real> r,
                      BatchRef<Real> z) {
    constexpr const char* where = "Coefficients::forward";
    const int n_rt = check_params(where, p);
    const int n = N == Dynamic ? n_rt : N;
    const Index M = projection_size(n);
    using K = detail::CoefficientKernels<Scalar, N, Mapping>;
    if (is_static(p)) {
      detail::check_batch(where, "h_pre", h_pre, 1, n);
      detail::check_batch(where, "h_post", h_post, 1, n);
      detail::check_batch(where, "H_res", H_res, 1, Index(n) * n);
      check_outputs_disjoint(where, p, h_pre, h_post, H_res);
      const Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxM, 1> zero =
          Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxM, 1>::Zero(M);
      Real scratch[K::kScratch];
      Mapping::template forward<N>(n, p.iterations, zero.data(), K::gates(p), h_pre.data(),
                                   h_post.data(), H_res.data(), scratch);
      return;
    }
    const Index T = check_x(where, X, n, p);
    detail::check_batch(where, "h_pre", h_pre, T, n);
    detail::check_batch(where, "h_post", h_post, T, n);
    detail::check_batch(where, "H_res", H_res, T, Index(n) * n);
    detail::check_batch(where, "r", r, T, 1);
    detail::check_batch(where, "z", z, T, M);
    check_outputs_disjoint(where, p, h_pre, h_post, H_res, r, z);
    const auto outputs = {detail::byte_range(h_pre), detail::byte_range(h_post),
                          detail::byte_range(H_res), detail::byte_range(r), detail::byte_range(z)};
    for (const auto& o : outputs)
      if (range_overlaps(o, detail::byte_range(X)))
        detail::throw_invalid(where, "an output overlaps X");
    constexpr int TB = K::kTileTokens;
    const Index full_tiles = T / TB;
    const Index jobs = full_tiles + (T - full_tiles * TB);
    detail::for_each_parallel(
        jobs, T * Index(n) * X.cols() * M / std::max<Index>(1, jobs), [&](Index job) {
          if (job < full_tiles)
            K::template forward_tile<TB>(X, p, n, job * TB, h_pre, h_post, H_res, r, z);
          else
            K::template forward_tile<1>(X, p, n, full_tiles * TB + (job - full_tiles), h_pre,
                                        h_post, H_res, r, z);
        });
  }

  /// Backward. Inputs as the forward plus its cache r, z and the coefficient gradients
  /// d_h_pre (T, n), d_h_post (T, n), d_H_res (T, n*n) (always one row per token). Writes
  /// d_X += dL/dX through the coefficients (untouched in static-only mode) and overwrites every
  /// gradient in `grads`. `workspace` holds at least workspace_size(T, n, C) values.
  static void backward(const ConstBatchRef<Scalar>& X, const Params& p,
                       const ConstBatchRef<Real>& r, const ConstBatchRef<Real>& z,
                       const ConstBatchRef<Real>& d_h_pre, const ConstBatchRef<Real>& d_h_post,
                       const ConstBatchRef<Real>& d_H_res, BatchRef<Scalar> d_X, Grads grads,
                       VectorRef<Real> workspace) {
    constexpr const char* where = "Coefficients::backward";
    const int n_rt = check_params(where, p);
    const int n = N == Dynamic ? n_rt : N;
    const Index M = projection_size(n);
    using K = detail::CoefficientKernels<Scalar, N, Mapping>;
    const Index T = d_h_pre.rows();
    detail::check_batch(where, "d_h_pre", d_h_pre, T, n);
    detail::check_batch(where, "d_h_post", d_h_post, T, n);
    detail::check_batch(where, "d_H_res", d_H_res, T, Index(n) * n);
    detail::check_batch(where, "grads.d_W", grads.d_W, p.W.rows(), p.W.cols());
    detail::check_vector(where, "grads.d_alpha", grads.d_alpha, 3);
    detail::check_vector(where, "grads.d_b_pre", grads.d_b_pre, n);
    detail::check_vector(where, "grads.d_b_post", grads.d_b_post, n);
    detail::check_vector(where, "grads.d_b_res", grads.d_b_res, res_size(n));
    const bool static_only = is_static(p);
    Index C = 0;
    if (!static_only) {
      if (check_x(where, X, n, p) != T)
        detail::throw_invalid(where, "X has ", X.rows(), " rows, expected T*n = ", T * n);
      C = X.cols();
      detail::check_batch(where, "r", r, T, 1);
      detail::check_batch(where, "z", z, T, M);
      detail::check_batch(where, "d_X", d_X, T * n, C);
    }
    const Index ws = workspace_size(T, n, C, static_only);
    if (workspace.size() < ws)
      detail::throw_invalid(where, "workspace has ", workspace.size(), " values, needs ", ws);
    if (ws > 0 && workspace.data() == nullptr) detail::throw_invalid(where, "workspace is null");
    // Every writable view must be disjoint from every other view.
    {
      using detail::byte_range;
      using detail::vector_bytes;
      const std::pair<std::uintptr_t, std::uintptr_t> outs[] = {
          byte_range(grads.d_W),
          byte_range(vector_bytes(grads.d_alpha)),
          byte_range(vector_bytes(grads.d_b_pre)),
          byte_range(vector_bytes(grads.d_b_post)),
          byte_range(vector_bytes(grads.d_b_res)),
          static_only ? byte_range(grads.d_W) : byte_range(d_X),
          {reinterpret_cast<std::uintptr_t>(workspace.data()),
           reinterpret_cast<std::uintptr_t>(workspace.data() + ws)}};
      const std::pair<std::uintptr_t, std::uintptr_t> ins[] = {
          byte_range(p.W),
          byte_range(vector_bytes(p.b_pre)),
          byte_range(vector_bytes(p.b_post)),
          byte_range(vector_bytes(p.b_res)),
          byte_range(d_h_pre),
          byte_range(d_h_post),
          byte_range(d_H_res),
          static_only ? byte_range(p.W) : byte_range(X),
          static_only ? byte_range(p.W) : byte_range(r),
          static_only ? byte_range(p.W) : byte_range(z)};
      constexpr int kOuts = sizeof(outs) / sizeof(outs[0]);
      for (int a = 0; a < kOuts; ++a) {
        for (const auto& in : ins)
          if (range_overlaps(outs[a], in))
            detail::throw_invalid(where, "output #", a,
                                  " (d_W, d_alpha, d_b_pre, d_b_post, "
                                  "d_b_res, d_X, workspace) overlaps an input");
        for (int b = a + 1; b < kOuts; ++b)
          if (range_overlaps(outs[a], outs[b]))
            detail::throw_invalid(where, "outputs #", a, " and #", b,
                                  " (d_W, d_alpha, d_b_pre, d_b_post, d_b_res, d_X, workspace) "
                                  "overlap");
      }
    }
    const auto gp = K::gates(p);
    Real scratch[K::kScratch];
    Real dz[K::kMaxM];
    if (static_only) {
      // The coefficients do not depend on the token: sum the gradients over tokens (token order),
      // then one gate/Sinkhorn backward at z = 0.
      // dh = (d_h_pre (n) | d_h_post (n) | d_H_res (n*n)) summed over tokens.
      Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxH, 1> dh =
          Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxH, 1>::Zero(Index(n) * n + 2 * n);
      for (Index t = 0; t < T; ++t) {
        for (int i = 0; i < n; ++i) {
          dh[i] += d_h_pre(t, i);
          dh[n + i] += d_h_post(t, i);
        }
        for (Index k = 0; k < Index(n) * n; ++k) dh[2 * n + k] += d_H_res(t, k);
      }
      const Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxM, 1> zero =
          Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxM, 1>::Zero(M);
      grads.d_alpha.setZero();
      grads.d_b_pre.setZero();
      grads.d_b_post.setZero();
      grads.d_b_res.setZero();
      Mapping::template backward<N>(n, p.iterations, zero.data(), gp, dh.data(), dh.data() + n,
                                    dh.data() + 2 * n, dz, grads.d_alpha.data(),
                                    grads.d_b_pre.data(), grads.d_b_post.data(),
                                    grads.d_b_res.data(), scratch);
      return;
    }
    // Workspace layout: per token [g (M) | da (M) = (pre n | post n | res R) | dalpha (3)],
    // then W^T (M, nC).
    const Index ldg = 2 * M + 3;
    Real* g = workspace.data();
    Real* Wt = g + T * ldg;
    const Index nC = Index(n) * C;
    // Pass 1, per token: da and dz from the gate/Sinkhorn backward, g = dz / r.
    detail::for_each_parallel(T, M * p.iterations * 8, [&](Index t) {
      Real* gt = g + t * ldg;
      Real* da = gt + M;
      Real* dalpha = da + M;
      for (Index k = 0; k < M + 3; ++k) da[k] = Real(0);
      Real scratch_t[K::kScratch];
      Real dzt[K::kMaxM];
      Mapping::template backward<N>(n, p.iterations, detail::at(z, t, 0), gp,
                                    detail::at(d_h_pre, t, 0), detail::at(d_h_post, t, 0),
                                    detail::at(d_H_res, t, 0), dzt, dalpha, da, da + n, da + 2 * n,
                                    scratch_t);
      const Real inv_r = Real(1) / r(t, 0);
      for (Index m = 0; m < M; ++m) gt[m] = dzt[m] * inv_r;
    });
    // Parameter sums over tokens, in token order.
    grads.d_alpha.setZero();
    grads.d_b_pre.setZero();
    grads.d_b_post.setZero();
    grads.d_b_res.setZero();
    for (Index t = 0; t < T; ++t) {
      const Real* da = g + t * ldg + M;
      for (int a = 0; a < 3; ++a) grads.d_alpha[a] += da[M + a];
      for (int i = 0; i < n; ++i) {
        grads.d_b_pre[i] += da[i];
        grads.d_b_post[i] += da[n + i];
      }
      for (Index k = 0; k < res_size(n); ++k) grads.d_b_res[k] += da[2 * n + k];
    }
    // W^T (M, nC) so that the d_X pass streams rows of it.
    detail::for_each_parallel(M, nC, [&](Index m) {
      for (Index k = 0; k < nC; ++k) Wt[m * nC + k] = p.W(k, m);
    });
    // Pass 2, per token tile: d_X += W g_t - v_t (z_t . g_t) / (nC r_t).
    constexpr int TB = K::kGradTileTokens;
    const Index full_tiles = T / TB;
    const Index jobs = full_tiles + (T - full_tiles * TB);
    detail::for_each_parallel(jobs, T * nC * M / std::max<Index>(1, jobs), [&](Index job) {
      const bool full = job < full_tiles;
      const Index t0 = full ? job * TB : full_tiles * TB + (job - full_tiles);
      Real beta[TB];
      for (int t = 0; t < (full ? TB : 1); ++t) {
        const Index tok = t0 + t;
        Real zg = Real(0);
        for (Index m = 0; m < M; ++m) zg += z(tok, m) * g[tok * ldg + m];
        beta[t] = zg / (Real(nC) * r(tok, 0));
      }
      if (full)
        K::template dx_tile<TB>(X, n, t0, Wt, g, ldg, beta, d_X);
      else
        K::template dx_tile<1>(X, n, t0, Wt, g, ldg, beta, d_X);
    });
    // Pass 3, per packet of W rows: d_W = sum_t v_t^T g_t (token order per element).
    const Index blocks_per_row = (C + K::kPacket - 1) / K::kPacket;
    detail::for_each_parallel(Index(n) * blocks_per_row, T * K::kPacket * M, [&](Index job) {
      const int i = static_cast<int>(job / blocks_per_row);
      const Index c0 = (job % blocks_per_row) * K::kPacket;
      K::dw_block(X, n, i, c0, std::min<Index>(K::kPacket, C - c0), g, ldg, grads.d_W);
    });
  }

 private:
  static bool is_static(const Params& p) { return p.W.rows() == 0; }

  static bool range_overlaps(const std::pair<std::uintptr_t, std::uintptr_t>& a,
                             const std::pair<std::uintptr_t, std::uintptr_t>& b) {
    if (a.first == a.second || b.first == b.second) return false;
    return a.first < b.second && b.first < a.second;
  }

  /// Validates the parameters; returns n.
  static int check_params(const char* where, const Params& p) {
    const int n = static_cast<int>(p.b_pre.size());
    detail::check_static_streams<N>(where, n);
    if (n > Mapping::kMaxN)
      detail::throw_invalid(where, "n = ", n, " exceeds ", Mapping::kMaxN, " for the ",
                            Mapping::name, " mapping");
    detail::check_vector(where, "b_pre", p.b_pre, n);
    detail::check_vector(where, "b_post", p.b_post, n);
    detail::check_vector(where, "b_res", p.b_res, res_size(n));
    if (p.iterations < 1 || p.iterations > kMaxSinkhornIterations)
      detail::throw_invalid(where, "iterations = ", p.iterations, " is out of range [1, ",
                            kMaxSinkhornIterations, "]");
    if (!(p.eps > Real(0)) || !std::isfinite(p.eps))
      detail::throw_invalid(where, "eps = ", p.eps, " must be positive and finite");
    detail::check_finite(where, "alpha", p.alpha);
    detail::check_finite(where, "b_pre", p.b_pre);
    detail::check_finite(where, "b_post", p.b_post);
    detail::check_finite(where, "b_res", p.b_res);
    if (p.W.rows() != 0) {
      if (p.W.cols() != projection_size(n))
        detail::throw_invalid(where, "W has ", p.W.cols(),
                              " columns, expected M = ", projection_size(n), " for the ",
                              Mapping::name, " mapping");
      detail::check_batch(where, "W", p.W, p.W.rows(), p.W.cols());
    }
    return n;
  }

  /// Validates X against n and W; returns T.
  static Index check_x(const char* where, const ConstBatchRef<Scalar>& X, int n, const Params& p) {
    if (X.rows() % n != 0)
      detail::throw_invalid(where, "X has ", X.rows(), " rows, not a multiple of n = ", n);
    const Index T = X.rows() / n;
    detail::check_batch(where, "X", X, T * n, X.cols());
    if (p.W.rows() != Index(n) * X.cols())
      detail::throw_invalid(where, "W has ", p.W.rows(), " rows, expected n*C = ", n, "*", X.cols(),
                            " = ", Index(n) * X.cols());
    return T;
  }

  template <typename... Outs>
  static void check_outputs_disjoint(const char* where, const Params& p, const Outs&... outs) {
    const std::pair<std::uintptr_t, std::uintptr_t> o[] = {detail::byte_range(outs)...};
    const std::pair<std::uintptr_t, std::uintptr_t> in[] = {
        detail::byte_range(p.W), detail::byte_range(detail::vector_bytes(p.b_pre)),
        detail::byte_range(detail::vector_bytes(p.b_post)),
        detail::byte_range(detail::vector_bytes(p.b_res))};
    constexpr int kOuts = sizeof...(Outs);
    for (int a = 0; a < kOuts; ++a) {
      for (const auto& i : in)
        if (range_overlaps(o[a], i))
          detail::throw_invalid(where, "output #", a,
                                " (h_pre, h_post, H_res, r, z) overlaps a parameter");
      for (int b = a + 1; b < kOuts; ++b)
        if (range_overlaps(o[a], o[b]))
          detail::throw_invalid(where, "outputs #", a, " and #", b,
                                " (h_pre, h_post, H_res, r, z) overlap");
    }
  }
};

}  // namespace mhc
