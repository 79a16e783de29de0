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
// v W and sum(v^2) come from ONE pass over X (a tile of tokens at a time, so each row of W read
// from cache serves the whole tile; with AVX-512 the register tile of detail/projection_avx512.hpp
// takes 8 tokens and two rows of W per step, interleaved so that every FMA is 16 lanes wide and one
// broadcast of a token's two values feeds M / 8 FMAs; with AVX2 + FMA the tile of
// detail/projection_avx2.hpp takes 8 tokens in register sub-tiles of 4; with either, X is
// prefetched 1 KB ahead per row in the tile's walking order, and the AVX-512 tile prefetches W 8
// rows ahead); the norm is applied after the product. The per-token mappings are the shared
// MHC_HOST_DEVICE kernels of detail/coefficient_kernel.hpp and detail/variant_kernel.hpp (the CUDA
// operators use the same ones), run for one SIMD register of tokens at a time (structure of arrays)
// when n is fixed at compile time. The forward overload with u also runs PreMix::forward
// (mixing.hpp) on each 16 tokens right after their coefficients, from their rows of X still in
// cache.
//
// Backward (G_h = dL/dh_pre, dL/dh_post, dL/dH_res per token):
//   dz = alpha * da  (the mapping's backward; for mHC the gates and the exact t_max-step Sinkhorn
//                     backward, recomputing its iterates from z)
//   g = dz / r;   dW = sum_t v_t^T g_t;   dv_t = W g_t - v_t (z_t . g_t) / (nC r_t)   (d_X +=)
//   d_alpha = sum_t sum(da_t * z_t) per group;   d_b = sum_t da_t.
// d_X and d_W come from ONE fused pass over X and d_X: each job owns a block of K = nC (2048
// columns of one stream row with the register passes of AVX-512 or AVX2 + FMA and a fixed n,
// else 2 KB of them) and walks all tokens in token order (see grad_block).
//
// Cache: the forward writes r (T, 1) and z (T, M) (M + 1 values per token, caller-owned); the
// backward reads them and recomputes the Sinkhorn iterates per token (no t_max * n^2 storage).
// Workspace: the backward needs workspace_size(T, n, C) = T (2M + 4) + 64 / sizeof(Real) +
// 2 M n Cp Real values from the caller (Cp = C rounded up to a multiple of 16): per token g, da,
// dalpha, beta; W packed in strips (from a 64-byte boundary); the d_W accumulators in the same
// strips. Nothing is heap-allocated inside.
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
#include <numeric>
#include <utility>

#include "mhc/detail/coefficient_kernel.hpp"
#include "mhc/detail/operator_support.hpp"
#include "mhc/detail/projection_avx2.hpp"
#include "mhc/detail/projection_avx512.hpp"
#include "mhc/mixing.hpp"
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
  // Whether the forward projection runs a register tile: detail/projection_avx512.hpp with
  // AVX-512, detail/projection_avx2.hpp with AVX2 + FMA (float compute type, a compile-time M
  // that is a multiple of 8): M / 8 accumulators per token.
#if defined(MHC_HAVE_AVX512_KERNELS) || defined(MHC_HAVE_AVX2_KERNELS)
  static constexpr bool kRegisterProjection = std::is_same<Real, float>::value && N != Dynamic &&
                                              Mapping::coefficient_count(N > 0 ? N : 1) % 8 == 0;
#else
  static constexpr bool kRegisterProjection = false;
#endif
  static constexpr int kTileTokens =  // tokens per tile of the forward projection: 24 / (M / 8)
                                      // for a register tile, else 24 / ceil(M / packet); 1 to 12
      N == Dynamic          ? 8
      : kRegisterProjection ? std::max(1, std::min(12, 24 / (Mapping::coefficient_count(N) / 8)))
                            : std::max(1, std::min(12, 24 / kAccPackets));
  // Register passes (see grad_block): with 32 vector registers of 16 floats (AVX-512) and a
  // compile-time M, a full strip goes over each chunk in kPasses passes of at most kPassLimit
  // coefficients; each pass holds its part of the strip's W block and of its d_W accumulators
  // in registers (2 x 12 of 32 for M = 24), so one broadcast of g_t[m] feeds both FMAs.
  // With AVX2 + FMA (16 registers of 8 floats; float compute type) the same passes hold at most
  // 6 coefficients (2 x 6 of 16 registers, plus X, the d_X sums and the broadcast): M = 24 in 4
  // passes. Without them the portable loop keeps M = 24 accumulators in 16 registers and spills.
#if defined(MHC_HAVE_AVX2_KERNELS)
  static constexpr bool kAvx2Passes = std::is_same<Real, float>::value && kPacket == 8;
#else
  static constexpr bool kAvx2Passes = false;
#endif
  static constexpr bool kRegisterPasses = N != Dynamic && (kPacket == 16 || kAvx2Passes);
  // The fused d_X / d_W pass: columns of X per job, tokens per chunk, and how far ahead in its
  // token's row each strip-token step prefetches X and d_X (the next line). With the register
  // passes a job takes 2048 columns (8 KB of a float row, 4 KB of a bf16 row) in chunks of 8
  // (float) or 16 (bf16) tokens: each token's row segment is read in a long ascending run, and
  // a chunk keeps only 16 or 32 rows of X and d_X in flight (see grad_block); elsewhere 2 KB of
  // columns and 64 tokens.
  static constexpr int kGradBlock = kRegisterPasses ? 2048 : 2048 / int(sizeof(Real));
  static constexpr int kChunkTokens = !kRegisterPasses                    ? 64
                                      : std::is_same<Scalar, float>::value ? 8
                                                                           : 16;
  static constexpr int kPrefetchBytes = 64;
  // Line staging (AVX2 register passes, see grad_block): a chunk's tokens are read and written
  // one 64-byte span of columns (kLineColumns: 16 float, 32 bf16) at a time through an L1
  // buffer, and the kLineStrips strips of the span run their passes on the buffer.
  static constexpr bool kLineStaging = kAvx2Passes && N != Dynamic;
  static constexpr int kLineColumns = 64 / int(sizeof(Scalar));
  static constexpr int kLineStrips = kLineColumns / kPacket;
  // Whether a full strip of a chunk runs as two passes (d_W, then d_X; see grad_block): for bf16
  // storage with a compile-time n (paired A/B 1.035-1.069x; float 0.87-1.02x, so not there).
  static constexpr bool kTwoPass = N != Dynamic && !std::is_same<Scalar, Real>::value;
  using Accumulator =
      std::conditional_t<N == Dynamic, DynamicAccumulator<Real, kMaxM>,
                         SplitAccumulator<Real, Mapping::coefficient_count(N > 0 ? N : 1)>>;

  static GateParams<Real> gates(const CoefficientParams<Real>& p) {
    return {p.alpha[0], p.alpha[1], p.alpha[2], p.b_pre.data(), p.b_post.data(), p.b_res.data()};
  }

  /// r and z (= the projection / r) of token `tok`, from its sum of squares and
  /// `store_z(zt, 1 / r)`, which writes z_t.
  template <typename StoreZ>
  static void finish_token(const CoefficientParams<Real>& p, int n, Index C, Index tok, Real ss,
                           StoreZ&& store_z, BatchRef<Real>& r, BatchRef<Real>& z) {
    const Real nC = Real(n) * Real(C);
    const Real mean_square = C > 0 ? ss / nC : Real(0);
    const Real rt = std::sqrt(mean_square + p.eps);
    r(tok, 0) = rt;
    store_z(detail::at(z, tok, 0), Real(1) / rt);
  }

  /// Tokens per lane group of the per-token mappings (one SIMD register of tokens).
  static constexpr int kLanes = kPacket;
  /// Tokens per forward job: whole projection tiles and whole lane groups.
  static constexpr int kGroupTokens = 48;
  /// Tokens per step of a forward job with the fused pre-mix (see Coefficients::forward): whole
  /// tiles and lane groups, 16 with the AVX-512 tile (256 KB of X at C = 1024 in float, which
  /// stays in L2 next to W's 384 KB until the pre-mix reads it).
  static constexpr int kFusedTokens = std::lcm(kTileTokens, kLanes);
  static_assert(kGroupTokens % kFusedTokens == 0, "fused steps must tile a job");

  /// The mapping z -> (h_pre, h_post, H_res) of tokens [t0, t0 + count), count <= kLanes, all at
  /// once as a structure-of-arrays tile (lanes >= count get z = 0 and are not stored). For a
  /// run-time n, one token at a time.
  static void map_forward(const CoefficientParams<Real>& p, int n, Index t0, Index count,
                          const BatchRef<Real>& z, BatchRef<Real>& h_pre, BatchRef<Real>& h_post,
                          BatchRef<Real>& H_res) {
    if constexpr (N != Dynamic) {
      using Lane = Eigen::Array<Real, kLanes, 1>;
      constexpr int M = kFixedM;
      constexpr int kS = std::max(1, Mapping::scratch_count(N, 0));
      Lane zl[M], hp[N], hq[N], H[N * N], scratch[kS];
      for (int m = 0; m < M; ++m) zl[m].setZero();
      for (Index l = 0; l < count; ++l)
        for (int m = 0; m < M; ++m) zl[m][l] = z(t0 + l, m);
      Mapping::template forward<N>(N, p.iterations, static_cast<const Lane*>(zl), gates(p), hp, hq,
                                   H, scratch);
      for (Index l = 0; l < count; ++l) {
        for (int i = 0; i < N; ++i) {
          h_pre(t0 + l, i) = hp[i][l];
          h_post(t0 + l, i) = hq[i][l];
        }
        for (int k = 0; k < N * N; ++k) H_res(t0 + l, k) = H[k][l];
      }
    } else {
      Real scratch[kScratch];
      for (Index tok = t0; tok < t0 + count; ++tok)
        Mapping::template forward<N>(n, p.iterations,
                                     static_cast<const Real*>(detail::at(z, tok, 0)), gates(p),
                                     detail::at(h_pre, tok, 0), detail::at(h_post, tok, 0),
                                     detail::at(H_res, tok, 0), scratch);
    }
  }

  /// Sinkhorn iterations up to which the backward runs its mappings kLanes tokens at a time
  /// (the per-lane scratch holds the iterates' sums: 2 * iterations * n lanes on the stack).
  static constexpr int kLaneIterations = 32;
  static bool lanes_backward(int iterations) {
    return N != Dynamic && iterations <= kLaneIterations;
  }

  /// Per-token backward of the mapping for tokens [t0, t0 + count), count <= kLanes, as a
  /// structure-of-arrays tile (padding lanes: z = 0, zero gradients; not stored). Writes per
  /// token at g + t*ldg: dz (M, scaled by 1/r by the caller) | da (M) | dalpha (3).
  static void map_backward_lanes(const CoefficientParams<Real>& p, Index t0, Index count,
                                 const ConstBatchRef<Real>& z, const ConstBatchRef<Real>& d_h_pre,
                                 const ConstBatchRef<Real>& d_h_post,
                                 const ConstBatchRef<Real>& d_H_res, Real* g, Index ldg) {
    if constexpr (N != Dynamic) {
      using Lane = Eigen::Array<Real, kLanes, 1>;
      constexpr int M = kFixedM;
      constexpr int R = M - 2 * N;
      constexpr int kS = std::max(1, Mapping::scratch_count(N, kLaneIterations));
      Lane zl[M], dhp[N], dhq[N], dH[N * N], dz[M], da[M + 3], scratch[kS];
      for (int m = 0; m < M; ++m) zl[m].setZero();
      for (int k = 0; k < N; ++k) dhp[k].setZero(), dhq[k].setZero();
      for (int k = 0; k < N * N; ++k) dH[k].setZero();
      for (int k = 0; k < M + 3; ++k) da[k].setZero();
      for (Index l = 0; l < count; ++l) {
        for (int m = 0; m < M; ++m) zl[m][l] = z(t0 + l, m);
        for (int k = 0; k < N; ++k) dhp[k][l] = d_h_pre(t0 + l, k), dhq[k][l] = d_h_post(t0 + l, k);
        for (int k = 0; k < N * N; ++k) dH[k][l] = d_H_res(t0 + l, k);
      }
      Mapping::template backward<N>(N, p.iterations, static_cast<const Lane*>(zl), gates(p),
                                    static_cast<const Lane*>(dhp), static_cast<const Lane*>(dhq),
                                    static_cast<const Lane*>(dH), dz, da + M, da, da + N,
                                    da + 2 * N, scratch);
      for (Index l = 0; l < count; ++l) {
        Real* gt = g + (t0 + l) * ldg;
        for (int m = 0; m < M; ++m) gt[m] = dz[m][l];
        for (int k = 0; k < M + 3; ++k) gt[M + k] = da[k][l];
      }
      (void)R;
    } else {
      (void)p, (void)t0, (void)count, (void)z, (void)d_h_pre, (void)d_h_post, (void)d_H_res;
      (void)g, (void)ldg;
    }
  }

  /// The same for one token (any n, any number of iterations).
  static void map_backward_token(const CoefficientParams<Real>& p, int n, Index t,
                                 const ConstBatchRef<Real>& z, const ConstBatchRef<Real>& d_h_pre,
                                 const ConstBatchRef<Real>& d_h_post,
                                 const ConstBatchRef<Real>& d_H_res, Real* g, Index ldg) {
    const int M = Mapping::coefficient_count(n);
    Real* gt = g + t * ldg;
    Real* da = gt + M;
    for (Index k = 0; k < M + 3; ++k) da[k] = Real(0);
    Real scratch[kScratch];
    Mapping::template backward<N>(n, p.iterations, detail::at(z, t, 0), gates(p),
                                  detail::at(d_h_pre, t, 0), detail::at(d_h_post, t, 0),
                                  detail::at(d_H_res, t, 0), gt, da + M, da, da + n, da + 2 * n,
                                  scratch);
  }

  /// Column blocks of X prefetched ahead by the forward tile.
  static constexpr int kPrefetchBlocks = 4;
  /// Projection width for a compile-time n (0 for Dynamic).
  static constexpr int kFixedM = N == Dynamic ? 0 : Mapping::coefficient_count(N > 0 ? N : 1);

  /// Whether a register tile serves a tile of TB tokens: the AVX-512 one
  /// (detail/projection_avx512.hpp) or the AVX2 one (detail/projection_avx2.hpp).
#if defined(MHC_HAVE_AVX512_KERNELS)
  template <int TB>
  static constexpr bool kRegisterTile = kRegisterProjection && TB * (kFixedM / 8) <= 24;
  template <int TB>
  using RegisterTile = ProjectionTileAvx512<TB, kFixedM>;
#elif defined(MHC_HAVE_AVX2_KERNELS)
  template <int TB>  // a token's M / 8 accumulators fit in 12 registers: M <= 96 (n <= 8)
  static constexpr bool kRegisterTile = kRegisterProjection && kFixedM / 8 <= 12;
  template <int TB>
  using RegisterTile = ProjectionTileAvx2<TB, kFixedM>;
#endif

  /// Projection for tokens [t0, t0 + TB): the product and sum of squares in one pass over their
  /// rows of X, then r and z per token.
  template <int TB>
  static void forward_tile(const ConstBatchRef<Scalar>& X, const CoefficientParams<Real>& p,
                           int n_rt, Index t0, BatchRef<Real>& r, BatchRef<Real>& z) {
    const int n = N == Dynamic ? n_rt : N;
    const Index C = X.cols();
    const int M = Mapping::coefficient_count(n);
    const Index ldw = p.W.outerStride();
#if defined(MHC_HAVE_AVX512_KERNELS) || defined(MHC_HAVE_AVX2_KERNELS)
    if constexpr (kRegisterTile<TB>) {
      RegisterTile<TB> tile;
      tile.set_zero();
      for (int i = 0; i < n; ++i) {
        for_each_column_block(C, [&](Index c0, auto, Index w) {
          // The TB rows are TB separate streams: fetch kPrefetchBlocks blocks ahead in the order
          // the tile walks them (past the end of row i into row i + 1 of the same token, past
          // its last row into the first row of token t + TB, the next tile's).
          Index ahead_c = c0 + kPrefetchBlocks * kColumnBlock, ahead_row = i;
          while (ahead_c >= C) ahead_c -= C, ++ahead_row;
          if (ahead_row >= n) ahead_row += (TB - 1) * n;
          const bool ahead_ok = (t0 + TB - 1) * n + ahead_row < X.rows();
          const float* v[TB];
          [[maybe_unused]] alignas(64) float converted[TB][kColumnBlock];
          for (int t = 0; t < TB; ++t) {
            const Scalar* src = detail::at(X, (t0 + t) * n + i, c0);
            if (ahead_ok) {
              const char* ahead =
                  reinterpret_cast<const char*>(detail::at(X, (t0 + t) * n + ahead_row, ahead_c));
              for (int line = 0; line < int(kColumnBlock * sizeof(Scalar)); line += 64)
                prefetch(ahead + line);
            }
            if constexpr (std::is_same<Scalar, float>::value) {
              v[t] = src;
            } else {
              if (w == kColumnBlock) {  // a full block: a vector at a time (exact)
#if defined(MHC_HAVE_AVX512_KERNELS)
                for (int q = 0; q < kColumnBlock; q += 16)
                  _mm512_store_ps(converted[t] + q, bf16x16_load(src + q));
#else
                for (int q = 0; q < kColumnBlock; q += 8)
                  _mm256_store_ps(converted[t] + q, load8(src + q));
#endif
              } else {
                bf16_to_float(src, converted[t], w);
              }
              v[t] = converted[t];
            }
          }
          tile.accumulate(detail::at(p.W, Index(i) * C + c0, 0), ldw, v, w);
        });
      }
      for (int t = 0; t < TB; ++t) {
        alignas(64) float proj[kFixedM];
        const float ss = tile.finish(t, proj);
        finish_token(
            p, n, C, t0 + t, ss,
            [&](float* zt, float scale) {
              for (int m = 0; m < kFixedM; ++m) zt[m] = proj[m] * scale;
            },
            r, z);
      }
      return;
    }
#endif
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
    for (int t = 0; t < TB; ++t)
      finish_token(
          p, n, C, t0 + t, ss[t], [&](Real* zt, Real scale) { acc[t].store_scaled(zt, scale); },
          r, z);
  }

  using Packet = typename Eigen::internal::packet_traits<Real>::type;

  /// kPacket values at src in the compute type, as a packet (converted through `buf` for bf16).
  static Packet load_packet(const Scalar* src, Real* buf) {
    if constexpr (std::is_same<Scalar, Real>::value) {
      (void)buf;
      return Eigen::internal::ploadu<Packet>(src);
#if defined(MHC_HAVE_AVX512_KERNELS)
    } else if constexpr (kPacket == 16) {
      (void)buf;
      return bf16x16_load(src);
#endif
#if defined(MHC_HAVE_AVX2_KERNELS)
    } else if constexpr (kAvx2Passes) {
      (void)buf;
      return load8(src);
#endif
    } else {
      Eigen::Map<Eigen::Array<Real, 1, kPacket>>(buf, kPacket) =
          load_row<Real, kPacket>(src, kPacket);
      return Eigen::internal::ploadu<Packet>(buf);
    }
  }

  /// Stores a packet of compute-type values into kPacket storage elements at dst.
  static void store_packet(Scalar* dst, const Packet& value, Real* buf) {
    if constexpr (std::is_same<Scalar, Real>::value) {
      (void)buf;
      Eigen::internal::pstoreu(dst, value);
#if defined(MHC_HAVE_AVX512_KERNELS)
    } else if constexpr (kPacket == 16) {
      (void)buf;
      bf16x16_store(dst, value);
#endif
#if defined(MHC_HAVE_AVX2_KERNELS)
    } else if constexpr (kAvx2Passes) {
      (void)buf;
      store8(dst, value);
#endif
    } else {
      Eigen::internal::pstoreu(buf, value);
      store_row<kPacket>(dst, kPacket, Eigen::Map<const Eigen::Array<Real, 1, kPacket>>(buf));
    }
  }

  /// Columns of a stream row rounded up to a multiple of kStripPad: the packed W^T / d_W^T
  /// strips of the backward workspace (any packet width up to 16 floats divides it).
  static constexpr int kStripPad = 16;
  static Index padded_columns(Index C) { return (C + kStripPad - 1) / kStripPad * kStripPad; }

  /// The packed strips start on a 64-byte boundary (every packet load of W and of the d_W
  /// accumulators within one cache line): the workspace holds kStripAlign spare values in front
  /// of them. Before, they followed the T (2M + 4) per-token values directly, and for T not a
  /// multiple of 16 (float) every one of those loads straddled two lines: the backward was
  /// 1.24-1.29x slower at C = 7168 in bench_operators (T = 1171 float, 2341 bf16).
  static constexpr int kStripAlign = int(64 / sizeof(Real));
  static Real* strip_start(Real* p) {
    const auto misalign = reinterpret_cast<std::uintptr_t>(p) % 64;
    return misalign == 0 ? p : p + (64 - misalign) / sizeof(Real);
  }

  /// Packs W (nC, M) into strips: for stream row i and column strip c (a multiple of kPacket),
  /// the M x kPacket block Wp[(i*Cp + c)*M + m*kPacket + lane] = W[i*C + c + lane][m] (0 past C).
  static void pack_strips(const ConstBatchRef<Real>& W, int n, Index C, Index i_strip, Real* Wp) {
    const Index Cp = padded_columns(C);
    const Index strips_per_row = Cp / kPacket;
    const Index i = i_strip / strips_per_row;
    const Index c = (i_strip % strips_per_row) * kPacket;
    const int M = static_cast<int>(W.cols());
    Real* dst = Wp + (i * Cp + c) * M;
    for (int lane = 0; lane < kPacket; ++lane) {
      const bool inside = c + lane < C;
      const Real* row = inside ? detail::at(W, i * C + c + lane, 0) : nullptr;
      for (int m = 0; m < M; ++m) dst[m * kPacket + lane] = inside ? row[m] : Real(0);
    }
    (void)n;
  }

  static constexpr int kPassLimit = kAvx2Passes ? 6 : 12;
  static constexpr int kPasses = kFixedM > 0 ? (kFixedM + kPassLimit - 1) / kPassLimit : 1;
  static constexpr int kPassM = kFixedM > 0 ? (kFixedM + kPasses - 1) / kPasses : 1;
  // partial sums of a token's d_X within a pass (independent FMA chains)
  static constexpr int kDxChains = 2;

  /// Pass P of a full strip (columns [col, col + kPacket) of stream row i) over the chunk's
  /// tokens [t0, t1): coefficients [P kPassM, P kPassM + MP). The first pass reads X and d_X
  /// (prefetching the next line of both rows into L2) and starts each token's d_X sum from
  /// d_X_old - beta_t v_t; a pass that is not the last leaves the sum (float, not rounded) in
  /// dxbuf and the first one X (in the compute type) in vbuf, where the next pass picks them up;
  /// the last one writes d_X. d_W accumulates in token order as in the single loop (bit for bit).
  /// Staged (kLineStaging): X and the started d_X sums are already in vbuf and dxbuf, and the
  /// last pass leaves its sums there too; X and d_X are not touched.
  template <int P, bool Staged>
  static void grad_strip_pass(const ConstBatchRef<Scalar>& X, BatchRef<Scalar>& d_X, int n, int i,
                              Index col, Index t0, Index t1, const Real* wp, Real* dwp,
                              const Real* g, Index ldg, Index beta_offset, bool prefetch_next,
                              Real* vbuf, Real* dxbuf) {
    using namespace Eigen::internal;
    constexpr int m0 = P * kPassM;
    constexpr int MP = std::min(kPassM, kFixedM - m0);
    constexpr bool kFirst = P == 0 && !Staged, kLast = P == kPasses - 1 && !Staged;
    constexpr int D = std::min(kDxChains, MP);
    [[maybe_unused]] alignas(64) Real buf[kPacket];
    Packet wr[MP], acc[MP];
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
    for (int m = 0; m < MP; ++m) {
      wr[m] = ploadu<Packet>(wp + (m0 + m) * kPacket);
      acc[m] = t0 == 0 ? pset1<Packet>(Real(0)) : ploadu<Packet>(dwp + (m0 + m) * kPacket);
    }
    for (Index t = t0; t < t1; ++t) {
      const Real* gt = g + t * ldg;
      Real* const vt = vbuf + (t - t0) * kPacket;
      Real* const dxt = dxbuf + (t - t0) * kPacket;
      Packet v, dx[D];
      if constexpr (kFirst) {
        const Scalar* src = detail::at(X, t * n + i, col);
        const Scalar* dst = detail::at(d_X, t * n + i, col);
        if (prefetch_next) {  // into L2 (see grad_block)
          prefetch<2>(reinterpret_cast<const char*>(src) + kPrefetchBytes);
          prefetch<2>(reinterpret_cast<const char*>(dst) + kPrefetchBytes);
        }
        v = load_packet(src, buf);
        if constexpr (!kLast) pstore(vt, v);
        dx[0] = pmadd(pset1<Packet>(-gt[beta_offset]), v, load_packet(dst, buf));
      } else {
        v = pload<Packet>(vt);
        dx[0] = pload<Packet>(dxt);
      }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
      for (int d = 1; d < D; ++d) dx[d] = pset1<Packet>(Real(0));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
      for (int m = 0; m < MP; ++m) {
        const Packet gm = pset1<Packet>(gt[m0 + m]);
        dx[m % D] = pmadd(gm, wr[m], dx[m % D]);
        acc[m] = pmadd(gm, v, acc[m]);
      }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
      for (int d = 1; d < D; ++d) dx[0] = padd(dx[0], dx[d]);
      if constexpr (kLast)
        store_packet(detail::at(d_X, t * n + i, col), dx[0], buf);
      else
        pstore(dxt, dx[0]);
    }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
    for (int m = 0; m < MP; ++m) pstoreu(dwp + (m0 + m) * kPacket, acc[m]);
  }

  /// All passes of a full strip, in order.
  template <bool Staged, int... P>
  static void grad_strip_passes(std::integer_sequence<int, P...>, const ConstBatchRef<Scalar>& X,
                                BatchRef<Scalar>& d_X, int n, int i, Index col, Index t0, Index t1,
                                const Real* wp, Real* dwp, const Real* g, Index ldg,
                                Index beta_offset, bool prefetch_next, Real* vbuf, Real* dxbuf) {
    (grad_strip_pass<P, Staged>(X, d_X, n, i, col, t0, t1, wp, dwp, g, ldg, beta_offset,
                                prefetch_next, vbuf, dxbuf),
     ...);
  }

  /// The fused d_X / d_W pass over one block of K = n*C (columns [c0, c0 + w) of stream row i,
  /// k = i*C + c, c0 a multiple of kGradBlock, w <= kGradBlock), for EVERY token in token order:
  ///   d_X_t[k] += sum_m W[k][m] g_t[m] - v_t[k] beta_t          (each element once)
  ///   d_W[k][m] = sum_t v_t[k] g_t[m]                          (token order per element)
  /// Wp = W in strips (pack_strips) and dWp (same layout) are workspace; per token, g (M) at
  /// g + t*ldg and beta_t at g + t*ldg + beta_offset.
  ///
  /// Tokens go in chunks of kChunkTokens. Each kPacket-wide strip holds its M d_W accumulators in
  /// registers over the chunk's tokens (kept in dWp between chunks) and reads its M x kPacket
  /// block of W (contiguous, from L1) per token, and one packet of X and of d_X per token. Each
  /// strip-token step prefetches the line kPrefetchBytes further along the same token's row of
  /// X and of d_X into L1 (what the next strip, or the one after for bf16, reads of this token);
  /// DRAM is left to the hardware prefetchers, which follow the rows. At the end the block of dWp
  /// goes to d_W.
  ///
  /// With kRegisterPasses (AVX-512: 32 registers of 16 floats; a compile-time n; for AVX2 see
  /// below: 6 instead of 12), a full strip goes over the chunk in kPasses = ceil(M / 12) passes
  /// of at most 12 coefficients instead
  /// (grad_strip_pass; M = 24: m in [0, 12), then [12, 24)): the pass's 12 packets of W and its 12
  /// d_W accumulators stay in registers over the chunk, so per token one broadcast of g_t[m] feeds
  /// both FMAs (d_W[m] += g_t[m] v_t and the d_X sum += g_t[m] W[m]): about 29 loads per 49 FMAs
  /// instead of 50 per 48, which bound the single loop (float, a small working set, 1 thread, on
  /// the Zen 5 machine of docs/performance_log.md: 0.45 -> 0.75 of the FMA peak; on the Cascade
  /// Lake VM there this grad_block runs at 0.27-0.35 of the peak even in L1 / L2 and the pass's
  /// instruction mix alone at 0.45-0.52; bench_kernels measures it). The first pass loads X and
  /// d_X, starts the d_X sum from d_X_old - beta_t v_t and leaves it (float) and X (converted
  /// for bf16) in two chunk buffers on the stack (TC x kPacket floats each, L1); the last adds
  /// its part and writes d_X once (one bf16 rounding). d_W is summed in token order with the same
  /// FMAs as in the single loop (bit for bit); the d_X sum's order differs (two partial sums per
  /// pass), so d_X moves in the last bits.
  /// The first pass prefetches the next line of X and of d_X into L2, not L1: the token rows of
  /// a strip lie a multiple of 4 KB apart (n C s bytes for every C in the benchmark), all in ONE L1
  /// set (8 or 12 ways), so lines prefetched one strip ahead into L1 evict each other before they
  /// are read. Paired A/B against the single loop / kTwoPass (scratch harness, whole backward,
  /// bench shapes; docs/operators.md): float 1.13-1.19x, bf16 1.03-1.09x (1 and 2 threads; one
  /// noisier 2-thread run: float 1.02-1.07x, bf16 0.97-1.00x).
  /// Jobs of 2048 columns and chunks of 8 (float) or 16 (bf16) tokens (kGradBlock, kChunkTokens;
  /// 512 and 64 before 2026-11-30): each token's row is walked in runs of 8 KB (float), and a
  /// chunk has 16 or 32 rows of X and d_X in flight instead of 128, few enough for the hardware
  /// prefetchers to follow. bench_operators, six alternating runs on the Cascade Lake VM
  /// (docs/performance_log.md): float 0.39-0.46 -> 0.48-0.58 of the roofline, bf16 0.24-0.27 ->
  /// 0.27-0.31; float chunks of 8 with 512-column jobs gave 0.40-0.42 -> 0.45-0.47.
  /// At every benchmark C the rows cost 10-30% through this aliasing (the same bytes at C = 1088,
  /// 4112, 7184: float 1 thread 0.57-0.71 of the roofline instead of 0.52-0.60, bf16 0.56-0.78
  /// instead of 0.47-0.62; measured with 64-token chunks). Tried against it and not kept
  /// (docs/operators.md, all slower or within the noise): each chunk's block rows of X and d_X
  /// staged in row order through a stack buffer with non-aliasing rows (the copy does not overlap
  /// the passes: 2-3x slower), also double-buffered with the copy interleaved into the passes (2x
  /// slower); the same strip prefetched 16 or 32 tokens ahead instead of the next line; d_X_old
  /// read in the last pass; dynamic job scheduling; against the present constants, 4096-column
  /// jobs, chunks of 4 float tokens or of 8 or 32 bf16 tokens, prefetches 128 B ahead or into L1
  /// (16 float tokens: faster on 1 thread, slower on 2). One core reads X and d_X at 13-14 GB/s at
  /// most, so the float pass is within 1.2-1.4x of reading its inputs once.
  ///
  /// With AVX2 + FMA (kAvx2Passes: 16 registers of 8 floats) the same passes take at most 6
  /// coefficients each (M = 24: 4 passes), with line staging (kLineStaging): each 64-byte span
  /// of columns (16 float, 32 bf16: 2 or 4 strips) of the chunk's rows (one span at a time, not
  /// the whole block as in the staging tried above) is read once into two L1 buffers (X in the
  /// compute type, and d_X_old - beta_t v_t), the span's strips run all their passes on the
  /// buffers, and the span of d_X is written back whole. The chunk's rows share
  /// one L1 set (above): unstaged, each strip of a line read it again from L2, and the last
  /// pass's store of d_X missed L1 (11% of grad_block's samples on that one store, perf, Zen 3).
  /// The same operations in the same order as the unstaged passes (bit for bit; scratch check
  /// over n = 1..4 and 12 values of C, and test_operators_bf16's repeated columns).
  /// bench_operators on the Zen 3 VM of docs/performance_log.md, medians of three alternating
  /// runs against the code before:
  /// float 0.41-0.49 -> 0.53-0.62 of the roofline, bf16 0.30-0.34 -> 0.54-0.63; staging alone,
  /// best of eight repetitions: float 1.05-1.14x, bf16 1.30-1.44x. Chunks of 4 float or 4, 8 or
  /// 32 bf16 tokens and prefetches 128 or 256 B ahead, or into L1, measured within the noise or
  /// slower. With staging the staging loop, not the first pass, prefetches the next line. For bf16
  /// the passes replace the two-pass strip (kTwoPass), which gives the single loop's results.
  ///
  /// Otherwise (no register passes: double, a run-time n, or neither AVX-512 nor AVX2 + FMA;
  /// the row's last, narrower strip), with kTwoPass (bf16, compile-time n) a full strip goes
  /// over the chunk twice: first d_W (the
  /// accumulators in registers, X converted once into a chunk buffer), then d_X (the M x kPacket
  /// block of W in registers, X from that buffer); the same operations in the same order, so the
  /// results are bit for bit those of the single pass, and W is loaded once per chunk, not per
  /// token.
  ///
  /// Measured (docs/operators.md, Implementation notes): this is 1.08-1.22x faster than the
  /// previous scheme (16-token chunks, every line of the next chunk prefetched into L2 by a
  /// cursor, about two prefetches per strip-token step); dropping the cursor and adding the
  /// just-in-time line gave most of it, 64-token chunks (d_W accumulators reloaded a quarter as
  /// often) 1.00-1.10x more.
  static void grad_block(const ConstBatchRef<Scalar>& X, int n_rt, int i, Index c0, Index w,
                         const Real* Wp, Real* dWp, const Real* g, Index ldg, Index beta_offset,
                         BatchRef<Scalar>& d_X, BatchRef<Real>& d_W) {
    using namespace Eigen::internal;
    const int n = N == Dynamic ? n_rt : N;
    const Index T = X.rows() / n;
    const Index C = X.cols();
    const Index Cp = padded_columns(C);
    const int M = Mapping::coefficient_count(n);
    constexpr int kAccs = N == Dynamic ? kMaxM : Mapping::coefficient_count(N > 0 ? N : 1);
    constexpr int TC = kChunkTokens;
    alignas(64) Real buf[kPacket];
    // the register passes' chunk buffers (X in the compute type, the d_X sums between passes)
    [[maybe_unused]] alignas(64) Real vbuf[kRegisterPasses ? TC * kPacket : 1];
    [[maybe_unused]] alignas(64) Real dxbuf[kRegisterPasses ? TC * kPacket : 1];
    [[maybe_unused]] alignas(64) Real lvbuf[kLineStaging ? TC * kLineColumns : 1];
    [[maybe_unused]] alignas(64) Real ldxbuf[kLineStaging ? TC * kLineColumns : 1];
    // strips at byte offsets below this have a line of the block kPrefetchBytes further on
    const Index prefetch_end = w * Index(sizeof(Scalar)) - kPrefetchBytes;
    for (Index t0 = 0; t0 < T; t0 += TC) {
      const Index t1 = std::min<Index>(T, t0 + TC);
      for (Index s = 0; s < w; s += kPacket) {
        const Index ws = std::min<Index>(kPacket, w - s);  // < kPacket: the row's last strip
        const Real* wp = Wp + (Index(i) * Cp + c0 + s) * M;
        Real* dwp = dWp + (Index(i) * Cp + c0 + s) * M;
        const bool prefetch_next = s * Index(sizeof(Scalar)) < prefetch_end;
        if constexpr (kLineStaging) {
          if (s + kLineColumns <= w) {
            // stage the chunk's kLineColumns columns of X and of d_X_old - beta_t v_t
            for (Index t = t0; t < t1; ++t) {
              const Scalar* src = detail::at(X, t * n + i, c0 + s);
              const Scalar* dst = detail::at(d_X, t * n + i, c0 + s);
              if (prefetch_next) {
                prefetch<2>(reinterpret_cast<const char*>(src) + kPrefetchBytes);
                prefetch<2>(reinterpret_cast<const char*>(dst) + kPrefetchBytes);
              }
              const Packet nbeta = pset1<Packet>(-g[t * ldg + beta_offset]);
              for (int q = 0; q < kLineStrips; ++q) {
                const Index at = (q * TC + (t - t0)) * kPacket;
                const Packet v = load_packet(src + q * kPacket, buf);
                pstore(lvbuf + at, v);
                pstore(ldxbuf + at, pmadd(nbeta, v, load_packet(dst + q * kPacket, buf)));
              }
            }
            for (int q = 0; q < kLineStrips; ++q)
              grad_strip_passes<true>(std::make_integer_sequence<int, kPasses>(), X, d_X, n, i,
                                      c0 + s + q * kPacket, t0, t1, wp + q * kPacket * M,
                                      dwp + q * kPacket * M, g, ldg, beta_offset, false,
                                      lvbuf + q * TC * kPacket, ldxbuf + q * TC * kPacket);
            for (Index t = t0; t < t1; ++t) {
              Scalar* dst = detail::at(d_X, t * n + i, c0 + s);
              for (int q = 0; q < kLineStrips; ++q)
                store_packet(dst + q * kPacket,
                             pload<Packet>(ldxbuf + (q * TC + (t - t0)) * kPacket), buf);
            }
            s += kLineColumns - kPacket;
            continue;
          }
        }
        if constexpr (kRegisterPasses) {
          if (ws == kPacket) {
            grad_strip_passes<false>(std::make_integer_sequence<int, kPasses>(), X, d_X, n, i,
                                     c0 + s, t0, t1, wp, dwp, g, ldg, beta_offset, prefetch_next,
                                     vbuf, dxbuf);
            continue;
          }
        }
        // For a fixed n every loop over m has the compile-time bound kAccs (= M) and is unrolled,
        // so that acc stays in registers.
        const int MA = N == Dynamic ? M : kAccs;
        Packet acc[kAccs];
        if (t0 == 0) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
          for (int m = 0; m < MA; ++m) acc[m] = pset1<Packet>(Real(0));
        } else {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
          for (int m = 0; m < MA; ++m) acc[m] = ploadu<Packet>(dwp + m * kPacket);
        }
        if constexpr (kTwoPass) {
          if (ws == kPacket) {
            alignas(64) Real vbuf[TC * kPacket];  // the chunk's X strip, converted
            for (Index t = t0; t < t1; ++t) {  // d_W
              const Scalar* src = detail::at(X, t * n + i, c0 + s);
              if (prefetch_next)
                prefetch<3>(reinterpret_cast<const char*>(src) + kPrefetchBytes);
              const Packet v = load_packet(src, buf);
              pstore(vbuf + (t - t0) * kPacket, v);
              const Real* gt = g + t * ldg;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
              for (int m = 0; m < kAccs; ++m) acc[m] = pmadd(pset1<Packet>(gt[m]), v, acc[m]);
            }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
            for (int m = 0; m < kAccs; ++m) pstoreu(dwp + m * kPacket, acc[m]);
            Packet wr[kAccs];
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
            for (int m = 0; m < kAccs; ++m) wr[m] = ploadu<Packet>(wp + m * kPacket);
            for (Index t = t0; t < t1; ++t) {  // d_X
              Scalar* dst = detail::at(d_X, t * n + i, c0 + s);
              if (prefetch_next)
                prefetch<3>(reinterpret_cast<const char*>(dst) + kPrefetchBytes);
              const Real* gt = g + t * ldg;
              const Packet v = pload<Packet>(vbuf + (t - t0) * kPacket);
              Packet dx[4] = {pmul(pset1<Packet>(-gt[beta_offset]), v), pset1<Packet>(Real(0)),
                              pset1<Packet>(Real(0)), pset1<Packet>(Real(0))};
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
              for (int m = 0; m < kAccs; ++m)
                dx[m % 4] = pmadd(pset1<Packet>(gt[m]), wr[m], dx[m % 4]);
              const Packet dxo = load_packet(dst, buf);
              store_packet(dst, padd(dxo, padd(padd(dx[0], dx[1]), padd(dx[2], dx[3]))), buf);
            }
            continue;
          }
        }
        for (Index t = t0; t < t1; ++t) {
          const Scalar* src = detail::at(X, t * n + i, c0 + s);
          Scalar* dst = detail::at(d_X, t * n + i, c0 + s);
          if (prefetch_next) {
            prefetch<3>(reinterpret_cast<const char*>(src) + kPrefetchBytes);
            prefetch<3>(reinterpret_cast<const char*>(dst) + kPrefetchBytes);
          }
          const Real* gt = g + t * ldg;
          Packet v, dxo;
          if (ws == kPacket) {
            v = load_packet(src, buf);
            dxo = load_packet(dst, buf);
          } else {  // lanes >= ws are 0
            Eigen::Map<Eigen::Array<Real, 1, kPacket>>(buf).setZero();
            Eigen::Map<Eigen::Array<Real, 1, Eigen::Dynamic>>(buf, ws) =
                load_row<Real, Eigen::Dynamic>(src, ws);
            v = pload<Packet>(buf);
            Eigen::Map<Eigen::Array<Real, 1, Eigen::Dynamic>>(buf, ws) =
                load_row<Real, Eigen::Dynamic>(dst, ws);
            dxo = pload<Packet>(buf);
          }
          // four partial sums (m mod 4) shorten the dependency chain of the d_X sum
          Packet dx[4] = {pmul(pset1<Packet>(-gt[beta_offset]), v), pset1<Packet>(Real(0)),
                          pset1<Packet>(Real(0)), pset1<Packet>(Real(0))};
          if constexpr (N == Dynamic) {
            for (int m = 0; m < M; ++m) {
              const Packet gm = pset1<Packet>(gt[m]);
              dx[m % 4] = pmadd(gm, ploadu<Packet>(wp + m * kPacket), dx[m % 4]);
              acc[m] = pmadd(gm, v, acc[m]);
            }
          } else {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
            for (int m = 0; m < kAccs; ++m) {
              const Packet gm = pset1<Packet>(gt[m]);
              dx[m % 4] = pmadd(gm, ploadu<Packet>(wp + m * kPacket), dx[m % 4]);
              acc[m] = pmadd(gm, v, acc[m]);
            }
          }
          const Packet sum = padd(dxo, padd(padd(dx[0], dx[1]), padd(dx[2], dx[3])));
          if (ws == kPacket) {
            store_packet(dst, sum, buf);
          } else {
            pstore(buf, sum);
            store_row<Eigen::Dynamic>(
                dst, ws, Eigen::Map<const Eigen::Array<Real, 1, Eigen::Dynamic>>(buf, ws));
          }
        }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
        for (int m = 0; m < MA; ++m) pstoreu(dwp + m * kPacket, acc[m]);
      }
    }
    // dWp's strips ([m][lane] per strip) into d_W's rows, through raw pointers and with a
    // compile-time M for a fixed n: element by element through the Ref this copy took most of a
    // call with few tokens (C = 1024, T = 8: 70% of grad_block's samples under perf).
    const int MA = N == Dynamic ? M : kAccs;
    const Index ldd = d_W.outerStride();
    for (Index s = 0; s < w; s += kPacket) {
      const Real* dwp = dWp + (Index(i) * Cp + c0 + s) * M;
      Real* row = d_W.data() + (Index(i) * C + c0 + s) * ldd;
      const Index lanes = std::min<Index>(kPacket, w - s);
      for (Index lane = 0; lane < lanes; ++lane, row += ldd) {
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 128
#endif
        for (int m = 0; m < MA; ++m) row[m] = dwp[m * kPacket + lane];
      }
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

  /// Validates p as forward and backward do first (b_pre, b_post, b_res sizes and buffers, n in
  /// range, iterations, eps, finite alpha and biases, W's columns and buffer): throws
  /// mhc::invalid_argument naming `where`; returns n. W's rows are checked against X by the
  /// operators themselves.
  static int check_parameters(const Params& p,
                              const char* where = "Coefficients::check_parameters") {
    return check_params(where, p);
  }

  /// Real values the backward needs in `workspace` for T tokens of n x C (0 when static_only).
  static Index workspace_size(Index T, int n, Index C, bool static_only = false) {
    if (static_only) return 0;
    const Index M = projection_size(n);
    using K = detail::CoefficientKernels<Scalar, N, Mapping>;
    return T * (2 * M + 4) + K::kStripAlign + 2 * M * Index(n) * K::padded_columns(C);
  }

  /// Forward. X (T*n, C) Scalar. Outputs, Real: h_pre (T, n), h_post (T, n), H_res (T, n*n), and
  /// the cache r (T, 1), z (T, M). Static-only mode (p.W has zero rows): h_pre, h_post,
  /// H_res have ONE row; X, r and z are ignored.
  static void forward(const ConstBatchRef<Scalar>& X, const Params& p, BatchRef<Real> h_pre,
                      BatchRef<Real> h_post, BatchRef<Real> H_res, BatchRef<Real> r,
                      BatchRef<Real> z) {
    forward_impl("Coefficients::forward", X, p, h_pre, h_post, H_res, r, z, nullptr);
  }

  /// Forward with the pre-mix fused in: as above, and u (T, C) Scalar = h_pre^T X per token
  /// (PreMix::forward), each group of tokens' u computed right after its coefficients, while
  /// its rows of X are still in cache. X is then read from memory once instead of twice (spec
  /// section 6: projection, sum of squares and u read X once). Every output is bit for bit
  /// what forward() followed by PreMix::forward gives. In static-only mode X is read (for u
  /// only) and T = X.rows() / n. u must not overlap X, the parameters or any other output.
  static void forward(const ConstBatchRef<Scalar>& X, const Params& p, BatchRef<Real> h_pre,
                      BatchRef<Real> h_post, BatchRef<Real> H_res, BatchRef<Real> r,
                      BatchRef<Real> z, BatchRef<Scalar> u) {
    forward_impl("Coefficients::forward (with u)", X, p, h_pre, h_post, H_res, r, z, &u);
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
    if (ws > 0 && reinterpret_cast<std::uintptr_t>(workspace.data()) % alignof(Real) != 0)
      detail::throw_invalid(where, "workspace is not aligned to ", alignof(Real), " bytes");
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
    // Zeroed once per call: g++ 12 -O2 cannot see that the Sinkhorn sums are written before they
    // are read and warns (-Wmaybe-uninitialized) on the run-time-n instantiations.
    Real scratch[K::kScratch] = {};
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
    // Workspace layout: per token [g (M) | da (M) = (pre n | post n | res R) | dalpha (3) |
    // beta (1)], then (from the next 64-byte boundary) W^T (M, nC), then the d_W^T accumulators
    // (M, nC).
    const Index ldg = 2 * M + 4;
    const Index beta_offset = 2 * M + 3;
    Real* g = workspace.data();
    const Index nC = Index(n) * C;
    const Index Cp = K::padded_columns(C);
    Real* Wp = K::strip_start(g + T * ldg);
    Real* dWp = Wp + M * Index(n) * Cp;
    // Pass 1, per token (kLanes tokens at a time for a fixed n): da and dz from the gate/Sinkhorn
    // backward, g = dz / r, beta = (z . g) / (nC r).
    const bool lanes = K::lanes_backward(p.iterations);
    const Index groups = lanes ? (T + K::kLanes - 1) / K::kLanes : T;
    const Index work = M * p.iterations * 8 * (lanes ? K::kLanes : 1);
    detail::for_each_parallel(groups, work, [&](Index job) {
      if (lanes) {
        const Index t0 = job * K::kLanes;
        K::map_backward_lanes(p, t0, std::min<Index>(K::kLanes, T - t0), z, d_h_pre, d_h_post,
                              d_H_res, g, ldg);
      } else {
        K::map_backward_token(p, n, job, z, d_h_pre, d_h_post, d_H_res, g, ldg);
      }
      const Index t_end = lanes ? std::min<Index>(T, (job + 1) * K::kLanes) : job + 1;
      for (Index t = lanes ? job * K::kLanes : job; t < t_end; ++t) {
        Real* gt = g + t * ldg;
        const Real inv_r = Real(1) / r(t, 0);
        Real zg = Real(0);
        for (Index m = 0; m < M; ++m) {
          gt[m] *= inv_r;  // dz / r
          zg += z(t, m) * gt[m];
        }
        gt[beta_offset] = zg / (Real(nC) * r(t, 0));
      }
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
    // W in strips of kPacket columns (M x kPacket blocks, contiguous): the fused pass reads one
    // such block per token.
    detail::for_each_parallel(Index(n) * (Cp / K::kPacket), M * K::kPacket, [&](Index strip) {
      K::pack_strips(p.W, n, C, strip, Wp);
    });
    // Pass 2, per block of K (kGradBlock columns of one stream row), all tokens in token order:
    // d_X += W g_t - v_t beta_t and d_W = sum_t v_t^T g_t, X and d_X streamed once.
    const Index blocks_per_row = (C + K::kGradBlock - 1) / K::kGradBlock;
    detail::for_each_parallel(Index(n) * blocks_per_row, T * K::kGradBlock * M, [&](Index job) {
      const int i = static_cast<int>(job / blocks_per_row);
      const Index c0 = (job % blocks_per_row) * K::kGradBlock;
      K::grad_block(X, n, i, c0, std::min<Index>(K::kGradBlock, C - c0), Wp, dWp, g, ldg,
                    beta_offset, d_X, grads.d_W);
    });
  }

 private:
  static bool is_static(const Params& p) { return p.W.rows() == 0; }

  /// forward() and, when u is non-null, the fused pre-mix (see the public overloads).
  static void forward_impl(const char* where, const ConstBatchRef<Scalar>& X, const Params& p,
                           BatchRef<Real>& h_pre, BatchRef<Real>& h_post, BatchRef<Real>& H_res,
                           BatchRef<Real>& r, BatchRef<Real>& z, BatchRef<Scalar>* u) {
    const int n_rt = check_params(where, p);
    const int n = N == Dynamic ? n_rt : N;
    const Index M = projection_size(n);
    using K = detail::CoefficientKernels<Scalar, N, Mapping>;
    // u: (T, C), disjoint from X, the parameters and the other outputs; checked before anything
    // is written
    const auto check_u = [&](Index T, bool with_cache) {
      detail::check_batch(where, "u", *u, T, X.cols());
      const auto bytes = detail::byte_range(*u);
      const std::pair<std::uintptr_t, std::uintptr_t> none{0, 0};  // r, z: unused when static
      const std::pair<const char*, std::pair<std::uintptr_t, std::uintptr_t>> others[] = {
          {"X", detail::byte_range(X)},
          {"W", detail::byte_range(p.W)},
          {"b_pre", detail::byte_range(detail::vector_bytes(p.b_pre))},
          {"b_post", detail::byte_range(detail::vector_bytes(p.b_post))},
          {"b_res", detail::byte_range(detail::vector_bytes(p.b_res))},
          {"h_pre", detail::byte_range(h_pre)},
          {"h_post", detail::byte_range(h_post)},
          {"H_res", detail::byte_range(H_res)},
          {"r", with_cache ? detail::byte_range(r) : none},
          {"z", with_cache ? detail::byte_range(z) : none}};
      for (const auto& [name, range] : others)
        if (range_overlaps(bytes, range))
          detail::throw_invalid(where, "u overlaps ", name);
    };
    if (is_static(p)) {
      detail::check_batch(where, "h_pre", h_pre, 1, n);
      detail::check_batch(where, "h_post", h_post, 1, n);
      detail::check_batch(where, "H_res", H_res, 1, Index(n) * n);
      check_outputs_disjoint(where, p, h_pre, h_post, H_res);
      if (u != nullptr) {
        if (X.rows() % n != 0)
          detail::throw_invalid(where, "X has ", X.rows(), " rows, not a multiple of n = ", n);
        detail::check_batch(where, "X", X, X.rows(), X.cols());
        check_u(X.rows() / n, false);
      }
      const Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxM, 1> zero =
          Eigen::Matrix<Real, Eigen::Dynamic, 1, 0, K::kMaxM, 1>::Zero(M);
      Real scratch[K::kScratch];
      Mapping::template forward<N>(n, p.iterations, zero.data(), K::gates(p), h_pre.data(),
                                   h_post.data(), H_res.data(), scratch);
      if (u != nullptr) PreMix<Scalar, N>::forward(X, h_pre, *u);
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
    if (u != nullptr) check_u(T, true);
    // Jobs of kGroupTokens tokens: projection tiles of TB tokens (then single tokens), then the
    // mappings kLanes tokens at a time. With u, a job goes kFusedTokens tokens at a time (tiles,
    // mappings, then PreMix::forward on them, their rows of X still in L2), which keeps the
    // tile and lane-group boundaries of the unfused order, so every result is the same.
    constexpr int TB = K::kTileTokens;
    constexpr int G = K::kGroupTokens;
    const Index S = u != nullptr ? K::kFusedTokens : G;
    const Index C = X.cols();
    const Index jobs = (T + G - 1) / G;
    detail::for_each_parallel(jobs, Index(G) * n * C * M, [&](Index job) {
      const Index t1 = std::min(T, job * G + G);
      for (Index s0 = job * G; s0 < t1; s0 += S) {
        const Index s1 = std::min(t1, s0 + S);
        Index t = s0;
        for (; t + TB <= s1; t += TB) K::template forward_tile<TB>(X, p, n, t, r, z);
        for (; t < s1; ++t) K::template forward_tile<1>(X, p, n, t, r, z);
        for (t = s0; t < s1; t += K::kLanes)
          K::map_forward(p, n, t, std::min<Index>(K::kLanes, s1 - t), z, h_pre, h_post, H_res);
        if (u != nullptr)
          PreMix<Scalar, N>::forward(X.middleRows(s0 * n, (s1 - s0) * n),
                                     h_pre.middleRows(s0, s1 - s0), u->middleRows(s0, s1 - s0));
      }
    });
  }

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
