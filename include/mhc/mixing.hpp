// mixing.hpp: the two residual-stream mixings of an mHC block on the CPU, forward and backward
// (spec sections 2.6, 2.7 and 3; paper Eq. 3):
//
//   PreMix   u  = h_pre^T X              u[c]     = sum_i h_pre[i] X[i][c]
//   Update   X' = H_res X + h_post y^T   X'[i][c] = sum_j H_res[i][j] X[j][c] + h_post[i] y[c]
//
// Shapes, per batch of T tokens (storage Scalar in {float, double, bf16}, Real =
// compute_t<Scalar>):
//   X, X', d_X : (T*n, C) Scalar, row t*n+i is stream i of token t; rows may be padded
//   u, y, d_u, d_y : (T, C) Scalar
//   h_pre, h_post : (T, n) Real;  H_res : (T, n*n) Real, row-major n x n per token.
//   A coefficient input may instead have ONE row, shared by every token (static-only mode).
//   Coefficient gradients are always per token: (T, n) and (T, n*n).
// Every value is loaded to Real, combined in Real and rounded once when stored. Nothing is cached
// between forward and backward: the backward re-reads X (and y). Threading: OpenMP over tokens,
// each token's arithmetic is fixed, so results are bitwise identical for any thread count.
// No heap allocation: tiles of n x 64 values live on the stack.
#pragma once

#include "mhc/detail/operator_support.hpp"

namespace mhc {

/// Layer input u = h_pre^T X and its backward.
template <typename Scalar, int N = 4>
struct PreMix {
  static_assert(detail::is_storage_scalar_v<Scalar>,
                "mhc::PreMix: Scalar must be float, double or bf16");
  static_assert(N == Dynamic || (N >= 1 && N <= kMaxStreams), "mhc::PreMix: N out of range");
  using Real = compute_t<Scalar>;
  static constexpr int kStreams = N;
  static constexpr int kMaxN = N == Dynamic ? kMaxStreams : N;
#if defined(MHC_HAVE_AVX512_KERNELS)
  /// Full column blocks of a fixed small n run in AVX-512 registers (detail::load16 & co.).
  static constexpr bool kRegisterBlocks =
      std::is_same<Real, float>::value && N != Dynamic && N <= 4;
#endif
#if defined(MHC_HAVE_AVX2_KERNELS)
  /// The backward's full column blocks of a fixed small n with bf16 storage run in AVX2 registers
  /// (backward_avx2_blocks). With float storage the generic path runs: the kernel measured
  /// 0.62-0.74 of memcpy on one thread against its 0.67-0.81 (C = 1024 / 4096 / 7168, Zen 3,
  /// three alternating bench_operators runs); bf16 went from 0.36-0.49 to 0.45-0.69.
  static constexpr bool kAvx2Blocks = std::is_same<Scalar, bf16>::value && N != Dynamic &&
                                      N <= 4 && detail::DotAccumulator<float>::kLanes == 8;
#endif

#if defined(MHC_HAVE_AVX512_KERNELS)
  /// bf16 storage with short rows (C <= kRowWalkColumns, whole 64-column blocks): the forward
  /// walks each of a token's rows from start to end, keeping u's float sums in an L1 buffer,
  /// instead of going block by block across the n rows. With contiguous rows that reads the
  /// token's n*C*2 bytes, and the tokens after it, as ONE sequential stream (at C = 1024 a bf16
  /// row is half a 4 KB page, so the block order ran two interleaved streams per page), and it
  /// prefetches kPreMixForwardBf16PrefetchBytes ahead along it. Same multiplications and FMAs in
  /// the same order per column, so u is bit for bit the block order's. bench_operators built
  /// without and with it, bf16 PreMix forward at C = 1024, 4 alternating runs each
  /// (2026-11-29 17:39Z): 1 thread 0.74-0.84 -> 0.85-0.91 of memcpy, 2 threads 0.78-0.95 ->
  /// 0.78-1.04 (a scratch copy, 7 runs: medians 0.80 -> 0.82 and 0.82 -> 0.87).
  static constexpr bool kRowWalk = kRegisterBlocks && std::is_same<Scalar, bf16>::value;
  static constexpr Index kRowWalkColumns = 2048;  // the float sums: 8 KB of stack

  /// u[t] = sum_i h_pre[i] X[t][i] by rows (see kRowWalk); C <= kRowWalkColumns, C % 64 == 0.
  static void forward_token_rows(const ConstBatchRef<Scalar>& X, const Real* hp, Index t,
                                 BatchRef<Scalar>& u) {
    const Index C = u.cols();
    alignas(64) float acc[kRowWalkColumns];
    // prefetch addresses stay inside X's bytes (integer arithmetic: no pointer past the end)
    const std::uintptr_t end = detail::byte_range(X).second;
    for (int i = 0; i < N; ++i) {
      const Scalar* x = detail::at(X, t * N + i, 0);
      const __m512 h = _mm512_set1_ps(hp[i]);
      for (Index c0 = 0; c0 < C; c0 += detail::kColumnBlock) {
        const std::uintptr_t ahead =
            reinterpret_cast<std::uintptr_t>(x + c0) + detail::kPreMixForwardBf16PrefetchBytes;
        for (std::uintptr_t b = 0; b < detail::kColumnBlock * sizeof(Scalar); b += 64)
          if (ahead + b < end) detail::prefetch<1>(reinterpret_cast<const void*>(ahead + b));
        __m512 v[4];
        for (int q = 0; q < 4; ++q) {
          const __m512 xv = detail::load16(x + c0 + 16 * q);
          v[q] = i == 0 ? _mm512_mul_ps(h, xv)
                        : _mm512_fmadd_ps(h, xv, _mm512_load_ps(acc + c0 + 16 * q));
        }
        if (i + 1 < N) {
          for (int q = 0; q < 4; ++q) _mm512_store_ps(acc + c0 + 16 * q, v[q]);
        } else {
          detail::stream_block(detail::at(u, t, c0), v);
        }
      }
    }
  }
#endif

  /// u (T, C) = h_pre^T X per token. X (T*n, C); h_pre (T, n) or (1, n); u must not overlap X.
  static void forward(const ConstBatchRef<Scalar>& X, const ConstBatchRef<Real>& h_pre,
                      BatchRef<Scalar> u) {
    constexpr const char* where = "PreMix::forward";
    const int n_rt = static_cast<int>(h_pre.cols());
    const Index T = u.rows(), C = u.cols();
    detail::check_static_streams<N>(where, n_rt);
    const int n = N == Dynamic ? n_rt : N;
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_coefficients(where, "h_pre", h_pre, T, n);
    detail::check_batch(where, "u", u, T, C);
    detail::check_no_overlap(where, "u", u, "X", X);
    detail::check_no_overlap(where, "u", u, "h_pre", h_pre);
    const detail::StreamPrefetch<Scalar> ahead(T, C,
                                               std::is_same<Scalar, bf16>::value
                                                   ? detail::kPreMixForwardBf16PrefetchBytes
                                                   : detail::kStreamPrefetchBytes);
    detail::for_each_parallel(T, Index(n) * C, [&](Index t) {
      const Real* hp = h_pre.row(detail::coefficient_row(h_pre, t)).data();
#if defined(MHC_HAVE_AVX512_KERNELS)
      if constexpr (kRowWalk) {
        if (C <= kRowWalkColumns && C % detail::kColumnBlock == 0) {
          forward_token_rows(X, hp, t, u);
          return;
        }
      }
#endif
      detail::for_each_column_block(C, [&](Index c0, auto width_tag, Index w) {
        constexpr int W = decltype(width_tag)::value;
        ahead(X, n, t, c0, w);
#if defined(MHC_HAVE_AVX512_KERNELS)
        if constexpr (kRegisterBlocks) {
          if constexpr (W == detail::kColumnBlock) {
            __m512 acc[4];
            for (int q = 0; q < 4; ++q)
              acc[q] = _mm512_mul_ps(_mm512_set1_ps(hp[0]),
                                     detail::load16(detail::at(X, t * n, c0) + 16 * q));
            for (int i = 1; i < N; ++i)
              for (int q = 0; q < 4; ++q)
                acc[q] =
                    _mm512_fmadd_ps(_mm512_set1_ps(hp[i]),
                                    detail::load16(detail::at(X, t * n + i, c0) + 16 * q), acc[q]);
            detail::stream_block(detail::at(u, t, c0), acc);
            return;
          }
        }
#endif
        detail::BlockRow<Real, W> acc =
            hp[0] * detail::load_row<Real, W>(detail::at(X, t * n, c0), w);
        for (int i = 1; i < n; ++i)
          acc += hp[i] * detail::load_row<Real, W>(detail::at(X, t * n + i, c0), w);
        detail::stream_row<W>(detail::at(u, t, c0), w, acc);
      });
    });
  }

  /// Backward: d_X += h_pre d_u^T (accumulated), d_h_pre (T, n) = X d_u (overwritten).
  /// d_X must not overlap X, d_u or d_h_pre.
  static void backward(const ConstBatchRef<Scalar>& X, const ConstBatchRef<Real>& h_pre,
                       const ConstBatchRef<Scalar>& d_u, BatchRef<Scalar> d_X,
                       BatchRef<Real> d_h_pre) {
    constexpr const char* where = "PreMix::backward";
    const int n_rt = static_cast<int>(h_pre.cols());
    const Index T = d_u.rows(), C = d_u.cols();
    detail::check_static_streams<N>(where, n_rt);
    const int n = N == Dynamic ? n_rt : N;
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_coefficients(where, "h_pre", h_pre, T, n);
    detail::check_batch(where, "d_u", d_u, T, C);
    detail::check_batch(where, "d_X", d_X, T * n, C);
    detail::check_batch(where, "d_h_pre", d_h_pre, T, n);
    detail::check_no_overlap(where, "d_X", d_X, "X", X);
    detail::check_no_overlap(where, "d_X", d_X, "d_u", d_u);
    detail::check_no_overlap(where, "d_X", d_X, "h_pre", h_pre);
    detail::check_no_overlap(where, "d_h_pre", d_h_pre, "d_X", d_X);
    detail::check_no_overlap(where, "d_h_pre", d_h_pre, "X", X);
    detail::check_no_overlap(where, "d_h_pre", d_h_pre, "d_u", d_u);
    detail::check_no_overlap(where, "d_h_pre", d_h_pre, "h_pre", h_pre);
    const detail::StreamPrefetch<Scalar> ahead(T, C);
    detail::for_each_parallel(T, Index(n) * C, [&](Index t) {
      const Real* hp = h_pre.row(detail::coefficient_row(h_pre, t)).data();
      detail::DotAccumulator<Real> dhp[kMaxN];  // sum_c X[i][c] du[c]
      Index done = 0;  // leading columns handled by backward_avx2_blocks
#if defined(MHC_HAVE_AVX2_KERNELS)
      if constexpr (kAvx2Blocks) {
        done = C - C % detail::kColumnBlock;
        backward_avx2_blocks(X, hp, d_u, d_X, t, done, ahead, dhp);
      }
#endif
      detail::for_each_column_block(C - done, [&](Index c_rel, auto width_tag, Index w) {
        constexpr int W = decltype(width_tag)::value;
        const Index c0 = done + c_rel;
        ahead(d_u, 1, t, c0, w);
        ahead(X, n, t, c0, w);
        ahead(d_X, n, t, c0, w);
#if defined(MHC_HAVE_AVX512_KERNELS)
        if constexpr (kRegisterBlocks) {
          if constexpr (W == detail::kColumnBlock) {
            __m512 du[4];
            for (int q = 0; q < 4; ++q) du[q] = detail::load16(detail::at(d_u, t, c0) + 16 * q);
            for (int i = 0; i < N; ++i) {
              __m512 x[4];
              Scalar* dx = detail::at(d_X, t * n + i, c0);
              const __m512 h = _mm512_set1_ps(hp[i]);
              for (int q = 0; q < 4; ++q) {
                x[q] = detail::load16(detail::at(X, t * n + i, c0) + 16 * q);
                detail::store16(dx + 16 * q,
                                _mm512_fmadd_ps(h, du[q], detail::load16(dx + 16 * q)));
              }
              dhp[i].add_block(x, du);
            }
            return;
          }
        }
#endif
        const detail::BlockRow<Real, W> du = detail::load_row<Real, W>(detail::at(d_u, t, c0), w);
        for (int i = 0; i < n; ++i) {
          const Index row = t * n + i;
          dhp[i].template add<W>(detail::load_row<Real, W>(detail::at(X, row, c0), w), du, w);
          detail::store_row<W>(detail::at(d_X, row, c0), w,
                               detail::load_row<Real, W>(detail::at(d_X, row, c0), w) + hp[i] * du);
        }
      });
      for (int i = 0; i < n; ++i) d_h_pre(t, i) = dhp[i].total();
    });
  }

 private:
#if defined(MHC_HAVE_AVX2_KERNELS)
  /// n <= 4, AVX2 + FMA: backward() over the full column blocks [0, full) of token t, each
  /// block row by row, the n dot-product accumulators in registers over the whole row (their
  /// lanes become the DotAccumulator lanes). Each lane adds its columns in the generic path's
  /// order, as fused multiply-adds.
  template <typename Ahead>
  static void backward_avx2_blocks(const ConstBatchRef<Scalar>& X, const Real* hp,
                                   const ConstBatchRef<Scalar>& d_u, BatchRef<Scalar>& d_X,
                                   Index t, Index full, const Ahead& ahead,
                                   detail::DotAccumulator<Real>* dhp) {
    static_assert(kAvx2Blocks, "AVX2 float path");
    __m256 acc[N];
    for (int i = 0; i < N; ++i) acc[i] = _mm256_setzero_ps();
    for (Index c0 = 0; c0 < full; c0 += detail::kColumnBlock) {
      ahead(d_u, 1, t, c0, detail::kColumnBlock);
      ahead(X, N, t, c0, detail::kColumnBlock);
      ahead(d_X, N, t, c0, detail::kColumnBlock);
      const Scalar* du = detail::at(d_u, t, c0);
      for (int i = 0; i < N; ++i) {  // row by row (d_u's block stays in L1)
        const __m256 h = _mm256_set1_ps(hp[i]);
        const Scalar* x = detail::at(X, t * N + i, c0);
        Scalar* dx = detail::at(d_X, t * N + i, c0);
#pragma GCC unroll 8
        for (int c = 0; c < detail::kColumnBlock; c += 8) {
          const __m256 duv = detail::load8(du + c);
          acc[i] = _mm256_fmadd_ps(detail::load8(x + c), duv, acc[i]);
          detail::store8(dx + c, _mm256_fmadd_ps(h, duv, detail::load8(dx + c)));
        }
      }
    }
    for (int i = 0; i < N; ++i) _mm256_storeu_ps(dhp[i].lanes.data(), acc[i]);
  }
#endif
};

/// Residual update X' = H_res X + h_post y^T and its backward.
template <typename Scalar, int N = 4>
struct Update {
  static_assert(detail::is_storage_scalar_v<Scalar>,
                "mhc::Update: Scalar must be float, double or bf16");
  static_assert(N == Dynamic || (N >= 1 && N <= kMaxStreams), "mhc::Update: N out of range");
  using Real = compute_t<Scalar>;
  static constexpr int kStreams = N;
  static constexpr int kMaxN = N == Dynamic ? kMaxStreams : N;
#if defined(MHC_HAVE_AVX512_KERNELS)
  /// Full column blocks of a fixed small n run in AVX-512 registers (detail::load16 & co.).
  static constexpr bool kRegisterBlocks =
      std::is_same<Real, float>::value && N != Dynamic && N <= 4;
  /// bf16 storage: the forward's full blocks run in forward_bf16_block, the backward's in
  /// backward_bf16_rows (both by column parity; the backward's dot products with vdpbf16ps where
  /// the target has AVX512-BF16, else as FMAs on the split floats).
  static constexpr bool kBf16Rows = kRegisterBlocks && std::is_same<Scalar, bf16>::value;
#endif
#if defined(MHC_HAVE_AVX2_KERNELS)
  /// Full column blocks of a fixed small n run in AVX2 registers, float or bf16 storage
  /// (forward_avx2_block, backward_avx2_blocks; not with EIGEN_DONT_VECTORIZE, whose
  /// DotAccumulator has one lane).
  static constexpr bool kAvx2Blocks = std::is_same<Real, float>::value && N != Dynamic &&
                                      N <= 4 && detail::DotAccumulator<float>::kLanes == 8;
#endif

  /// X_out (T*n, C) = H_res X + h_post y^T per token. X_out may be X itself (same data and row
  /// stride: in-place update; each token's n rows are read, per 64-column block, before any of
  /// them is written) but must not partially overlap it, nor overlap y or the coefficients.
  static void forward(const ConstBatchRef<Scalar>& X, const ConstBatchRef<Real>& H_res,
                      const ConstBatchRef<Real>& h_post, const ConstBatchRef<Scalar>& y,
                      BatchRef<Scalar> X_out) {
    constexpr const char* where = "Update::forward";
    const int n_rt = static_cast<int>(h_post.cols());
    const Index T = y.rows(), C = y.cols();
    detail::check_static_streams<N>(where, n_rt);
    const int n = N == Dynamic ? n_rt : N;
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_coefficients(where, "H_res", H_res, T, Index(n) * n);
    detail::check_coefficients(where, "h_post", h_post, T, n);
    detail::check_batch(where, "y", y, T, C);
    detail::check_batch(where, "X_out", X_out, T * n, C);
    detail::check_same_or_disjoint(where, "X_out", X_out, "X", X);
    detail::check_no_overlap(where, "X_out", X_out, "y", y);
    detail::check_no_overlap(where, "X_out", X_out, "H_res", H_res);
    detail::check_no_overlap(where, "X_out", X_out, "h_post", h_post);
    const detail::StreamPrefetch<Scalar> ahead(T, C);
    detail::for_each_parallel(T, Index(n) * C, [&](Index t) {
      const Real* H = H_res.row(detail::coefficient_row(H_res, t)).data();
      const Real* hq = h_post.row(detail::coefficient_row(h_post, t)).data();
      detail::for_each_column_block(C, [&](Index c0, auto width_tag, Index w) {
        constexpr int W = decltype(width_tag)::value;
        ahead(y, 1, t, c0, w);
        ahead(X, n, t, c0, w);
#if defined(MHC_HAVE_AVX512_KERNELS)
        if constexpr (kBf16Rows && W == detail::kColumnBlock) {
          forward_bf16_block(X, H, hq, y, X_out, t, c0);
          return;
        }
#endif
#if defined(MHC_HAVE_AVX2_KERNELS)
        if constexpr (kAvx2Blocks && W == detail::kColumnBlock) {
          forward_avx2_block(X, H, hq, y, X_out, t, c0);
          return;
        }
#endif
#if defined(MHC_HAVE_AVX512_KERNELS)
        if constexpr (kRegisterBlocks) {
          if constexpr (W == detail::kColumnBlock) {
            __m512 x[N][4], yr[4];  // all loaded before any store (in-place update)
            for (int j = 0; j < N; ++j)
              for (int q = 0; q < 4; ++q)
                x[j][q] = detail::load16(detail::at(X, t * n + j, c0) + 16 * q);
            for (int q = 0; q < 4; ++q) yr[q] = detail::load16(detail::at(y, t, c0) + 16 * q);
            for (int i = 0; i < N; ++i) {
              __m512 acc[4];
              for (int q = 0; q < 4; ++q) {
                acc[q] = _mm512_mul_ps(_mm512_set1_ps(hq[i]), yr[q]);
                for (int j = 0; j < N; ++j)
                  acc[q] = _mm512_fmadd_ps(_mm512_set1_ps(H[i * n + j]), x[j][q], acc[q]);
              }
              detail::stream_block(detail::at(X_out, t * n + i, c0), acc);
            }
            return;
          }
        }
#endif
        detail::BlockTile<Real, N, W> x(n, w);  // (n, w): token t's streams, this block
        for (int j = 0; j < n; ++j)
          x.row(j) = detail::load_row<Real, W>(detail::at(X, t * n + j, c0), w);
        const detail::BlockRow<Real, W> yr = detail::load_row<Real, W>(detail::at(y, t, c0), w);
        for (int i = 0; i < n; ++i) {
          detail::BlockRow<Real, W> acc = hq[i] * yr;
          for (int j = 0; j < n; ++j) acc += H[i * n + j] * x.row(j);
          detail::stream_row<W>(detail::at(X_out, t * n + i, c0), w, acc);
        }
      });
    });
  }

  /// Backward with G = d_X_out: d_X = H_res^T G (overwritten; d_X may be d_X_out itself, same
  /// rule as forward), d_y = G^T h_post, d_H_res (T, n*n) = G X^T, d_h_post (T, n) = G y.
  static void backward(const ConstBatchRef<Scalar>& X, const ConstBatchRef<Real>& H_res,
                       const ConstBatchRef<Real>& h_post, const ConstBatchRef<Scalar>& y,
                       const ConstBatchRef<Scalar>& d_X_out, BatchRef<Scalar> d_X,
                       BatchRef<Real> d_H_res, BatchRef<Real> d_h_post, BatchRef<Scalar> d_y) {
    constexpr const char* where = "Update::backward";
    const int n_rt = static_cast<int>(h_post.cols());
    const Index T = y.rows(), C = y.cols();
    detail::check_static_streams<N>(where, n_rt);
    const int n = N == Dynamic ? n_rt : N;
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_coefficients(where, "H_res", H_res, T, Index(n) * n);
    detail::check_coefficients(where, "h_post", h_post, T, n);
    detail::check_batch(where, "y", y, T, C);
    detail::check_batch(where, "d_X_out", d_X_out, T * n, C);
    detail::check_batch(where, "d_X", d_X, T * n, C);
    detail::check_batch(where, "d_H_res", d_H_res, T, Index(n) * n);
    detail::check_batch(where, "d_h_post", d_h_post, T, n);
    detail::check_batch(where, "d_y", d_y, T, C);
    detail::check_same_or_disjoint(where, "d_X", d_X, "d_X_out", d_X_out);
    detail::check_no_overlap(where, "d_X", d_X, "X", X);
    detail::check_no_overlap(where, "d_X", d_X, "y", y);
    detail::check_no_overlap(where, "d_X", d_X, "H_res", H_res);
    detail::check_no_overlap(where, "d_X", d_X, "h_post", h_post);
    detail::check_no_overlap(where, "d_y", d_y, "X", X);
    detail::check_no_overlap(where, "d_y", d_y, "y", y);
    detail::check_no_overlap(where, "d_y", d_y, "H_res", H_res);
    detail::check_no_overlap(where, "d_y", d_y, "h_post", h_post);
    detail::check_no_overlap(where, "d_y", d_y, "d_X_out", d_X_out);
    detail::check_no_overlap(where, "d_y", d_y, "d_X", d_X);
    detail::check_no_overlap(where, "d_H_res", d_H_res, "d_h_post", d_h_post);
    const auto check_coefficient_grad = [&](const char* name, const BatchRef<Real>& g) {
      detail::check_no_overlap(where, name, g, "X", X);
      detail::check_no_overlap(where, name, g, "y", y);
      detail::check_no_overlap(where, name, g, "d_X_out", d_X_out);
      detail::check_no_overlap(where, name, g, "d_X", d_X);
      detail::check_no_overlap(where, name, g, "d_y", d_y);
      detail::check_no_overlap(where, name, g, "H_res", H_res);
      detail::check_no_overlap(where, name, g, "h_post", h_post);
    };
    check_coefficient_grad("d_H_res", d_H_res);
    check_coefficient_grad("d_h_post", d_h_post);
    const detail::StreamPrefetch<Scalar> ahead(T, C);
    detail::for_each_parallel(T, Index(n) * C, [&](Index t) {
      const Real* H = H_res.row(detail::coefficient_row(H_res, t)).data();
      const Real* hq = h_post.row(detail::coefficient_row(h_post, t)).data();
      detail::DotAccumulator<Real> dH[kMaxN * kMaxN];  // sum_c G[i][c] X[j][c]
      detail::DotAccumulator<Real> dhq[kMaxN];         // sum_c G[i][c] y[c]
      Index done = 0;  // leading columns handled by backward_bf16_rows
#if defined(MHC_HAVE_AVX512_KERNELS)
      if constexpr (kBf16Rows) {
        done = C - C % detail::kColumnBlock;
        backward_bf16_rows(X, y, d_X_out, d_X, d_y, H, hq, t, done, ahead, dH, dhq);
      }
#endif
#if defined(MHC_HAVE_AVX2_KERNELS)
      if constexpr (kAvx2Blocks) {
        done = C - C % detail::kColumnBlock;
        backward_avx2_blocks(X, y, d_X_out, d_X, d_y, H, hq, t, done, ahead, dH, dhq);
      }
#endif
      detail::for_each_column_block(C - done, [&](Index c_rel, auto width_tag, Index w) {
        constexpr int W = decltype(width_tag)::value;
        const Index c0 = done + c_rel;
        ahead(y, 1, t, c0, w);
        ahead(d_X_out, n, t, c0, w);
        ahead(X, n, t, c0, w);
#if defined(MHC_HAVE_AVX512_KERNELS)
        if constexpr (kRegisterBlocks) {
          if constexpr (W == detail::kColumnBlock) {
            __m512 g[N][4], yr[4], dy[4];  // G loaded before any store (in-place d_X)
            for (int i = 0; i < N; ++i)
              for (int q = 0; q < 4; ++q)
                g[i][q] = detail::load16(detail::at(d_X_out, t * n + i, c0) + 16 * q);
            for (int q = 0; q < 4; ++q) {
              yr[q] = detail::load16(detail::at(y, t, c0) + 16 * q);
              dy[q] = _mm512_mul_ps(_mm512_set1_ps(hq[0]), g[0][q]);
              for (int i = 1; i < N; ++i)
                dy[q] = _mm512_fmadd_ps(_mm512_set1_ps(hq[i]), g[i][q], dy[q]);
            }
            for (int i = 0; i < N; ++i) dhq[i].add_block(g[i], yr);
            detail::stream_block(detail::at(d_y, t, c0), dy);
            for (int j = 0; j < N; ++j) {
              __m512 x[4], dx[4];
              for (int q = 0; q < 4; ++q) {
                x[q] = detail::load16(detail::at(X, t * n + j, c0) + 16 * q);
                dx[q] = _mm512_mul_ps(_mm512_set1_ps(H[j]), g[0][q]);
                for (int i = 1; i < N; ++i)
                  dx[q] = _mm512_fmadd_ps(_mm512_set1_ps(H[i * n + j]), g[i][q], dx[q]);
              }
              for (int i = 0; i < N; ++i) dH[i * n + j].add_block(g[i], x);
              detail::stream_block(detail::at(d_X, t * n + j, c0), dx);
            }
            return;
          }
        }
#endif
        detail::BlockTile<Real, N, W> g(n, w);  // (n, w) rows of G for token t
        for (int i = 0; i < n; ++i)
          g.row(i) = detail::load_row<Real, W>(detail::at(d_X_out, t * n + i, c0), w);
        const detail::BlockRow<Real, W> yr = detail::load_row<Real, W>(detail::at(y, t, c0), w);
        detail::BlockRow<Real, W> dy = hq[0] * g.row(0);
        dhq[0].template add<W>(g.row(0), yr, w);
        for (int i = 1; i < n; ++i) {
          dy += hq[i] * g.row(i);
          dhq[i].template add<W>(g.row(i), yr, w);
        }
        detail::stream_row<W>(detail::at(d_y, t, c0), w, dy);
        for (int j = 0; j < n; ++j) {
          const detail::BlockRow<Real, W> x =
              detail::load_row<Real, W>(detail::at(X, t * n + j, c0), w);
          detail::BlockRow<Real, W> dx = H[j] * g.row(0);
          dH[j].template add<W>(g.row(0), x, w);
          for (int i = 1; i < n; ++i) {
            dx += H[i * n + j] * g.row(i);
            dH[i * n + j].template add<W>(g.row(i), x, w);
          }
          detail::stream_row<W>(detail::at(d_X, t * n + j, c0), w, dx);
        }
      });
      for (int k = 0; k < n * n; ++k) d_H_res(t, k) = dH[k].total();
      for (int i = 0; i < n; ++i) d_h_post(t, i) = dhq[i].total();
    });
  }

 private:
#if defined(MHC_HAVE_AVX512_KERNELS)
  /// bf16 storage, n <= 4, AVX-512: forward() on the full 64-column block at c0 of token t,
  /// one 64-byte line (32 columns) of each row at a time, split by column parity
  /// (bf16x32_even / _odd: a shift or a mask per line instead of two widening loads and shifts)
  /// and put back in column order by the store (stream_even_odd). The same products and FMAs per
  /// column as the float register path, so X_out is bit for bit the same; each line of the n rows
  /// is loaded before any of them is written (in-place update).
  static void forward_bf16_block(const ConstBatchRef<Scalar>& X, const Real* H, const Real* hq,
                                 const ConstBatchRef<Scalar>& y, BatchRef<Scalar>& X_out, Index t,
                                 Index c0) {
    static_assert(kBf16Rows, "bf16 line path");
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      const Index c = c0 + 32 * half;
      __m512 xe[N], xo[N];
#pragma GCC unroll 16
      for (int j = 0; j < N; ++j) {
        const __m512i bits = _mm512_loadu_si512(detail::at(X, t * N + j, c));
        xe[j] = detail::bf16x32_even(bits);
        xo[j] = detail::bf16x32_odd(bits);
      }
      const __m512i ybits = _mm512_loadu_si512(detail::at(y, t, c));
      const __m512 ye = detail::bf16x32_even(ybits), yo = detail::bf16x32_odd(ybits);
#pragma GCC unroll 16
      for (int i = 0; i < N; ++i) {
        __m512 even = _mm512_mul_ps(_mm512_set1_ps(hq[i]), ye);
        __m512 odd = _mm512_mul_ps(_mm512_set1_ps(hq[i]), yo);
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) {
          even = _mm512_fmadd_ps(_mm512_set1_ps(H[i * N + j]), xe[j], even);
          odd = _mm512_fmadd_ps(_mm512_set1_ps(H[i * N + j]), xo[j], odd);
        }
        detail::stream_even_odd(detail::at(X_out, t * N + i, c), even, odd);
      }
    }
  }

  /// bf16 storage, n <= 4, AVX-512: backward() over the full column blocks [0, full) of token
  /// t, 32 columns (one cache line of each row) per step. The n*n + n dot products
  /// (d_H_res[i][j] = G_i . X_j, d_h_post[i] = G_i . y) stay in zmm registers over the whole row;
  /// their lanes become the DotAccumulator lanes (the tail and total() follow as elsewhere). With
  /// AVX512-BF16 they run on the stored bf16 values with vdpbf16ps (fp32 sums of exact bf16
  /// products, two columns per lane and instruction; X and y are never converted). Without it,
  /// X and y are split by column parity like G and each lane takes two FMAs per line (column 2k,
  /// then 2k + 1), so the sums differ from vdpbf16ps's in rounding, not in what they add (before,
  /// such targets ran the generic register path: 16 columns per packet, every row widened and
  /// every stored packet narrowed on its own). G is converted, for
  /// d_X = H_res^T G and d_y = G^T h_post, and by column parity (bf16x32_even / _odd: a shift
  /// or a mask of the line already loaded for the dot products) rather than by 16-column halves
  /// (two widening loads and shifts per row): the same products and FMAs per column, the results
  /// put back in column order by one vpermw per stored line (stream_even_odd), so every output
  /// is bit for bit what the halves gave. That took 8 loads and 8 shuffles off each 32-column
  /// step; with the data in cache (scratch harness: T = 8 / 2 tokens repeated, 1 thread) the
  /// kernel ran 1.03-1.17x faster at C = 1024 and 1.16-1.21x at C = 4096; bench_operators
  /// before and after, five alternating runs at C = 1024: 0.56-0.85 -> 0.73-0.89 of memcpy on 1
  /// thread, 0.55-0.80 -> 0.69-0.81 on 2 (docs/operators.md). Row pointers are taken once per
  /// token, and so are the prefetch targets of its 2n + 1 rows (detail::TokenPrefetch; before,
  /// each block recomputed every row's target token and column from the views). The loop keeps
  /// 20 accumulators and 8 split rows of G in the 32 vector registers and spills; the NaN test
  /// of the bf16 rounding is one vfpclassps, which frees two constants' registers. Paired A/B on
  /// the Cascade Lake VM (n = 4, X of 128 MiB, vs_memcpy per call, docs/performance_log.md): the
  /// NaN test 1.03-1.07x, the resolved prefetch 1.02-1.05x on top of it.
  template <typename Ahead>
  static void backward_bf16_rows(const ConstBatchRef<Scalar>& X, const ConstBatchRef<Scalar>& y,
                                 const ConstBatchRef<Scalar>& d_X_out, BatchRef<Scalar>& d_X,
                                 BatchRef<Scalar>& d_y, const Real* H, const Real* hq, Index t,
                                 Index full, const Ahead& ahead, detail::DotAccumulator<Real>* dH,
                                 detail::DotAccumulator<Real>* dhq) {
    static_assert(kBf16Rows, "bf16 row path");
    const bf16* gp[N];
    const bf16* xp[N];
    bf16* dxp[N];
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      gp[i] = detail::at(d_X_out, t * N + i, 0);
      xp[i] = detail::at(X, t * N + i, 0);
      dxp[i] = detail::at(d_X, t * N + i, 0);
    }
    const bf16* yp = detail::at(y, t, 0);
    bf16* dyp = detail::at(d_y, t, 0);
    __m512 aH[N * N], ahq[N];
#pragma GCC unroll 16
    for (int k = 0; k < N * N; ++k) aH[k] = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) ahq[i] = _mm512_setzero_ps();
#if defined(MHC_HAVE_BF16_DOT_KERNELS)
    const auto as_bh = [](__m512i bits) {
      __m512bh v;
      std::memcpy(&v, &bits, sizeof(v));
      return v;
    };
#endif
    const auto line = [](const bf16* p) { return _mm512_loadu_si512(p); };
    auto fetch = ahead.template token<2 * N + 1>(t);  // y, G and X rows, resolved once
    fetch.add(y, 1);
    fetch.add(d_X_out, N);
    fetch.add(X, N);
    for (Index c0 = 0; c0 < full; c0 += detail::kColumnBlock) {
      fetch(c0, detail::kColumnBlock);
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
        const Index c = c0 + 32 * half;
        __m512i gbits[N];  // G loaded before any store (in-place d_X)
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) gbits[i] = line(gp[i] + c);
        __m512 ge[N], go[N];  // G's even and odd columns as floats
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) {
          ge[i] = detail::bf16x32_even(gbits[i]);
          go[i] = detail::bf16x32_odd(gbits[i]);
        }
#if defined(MHC_HAVE_BF16_DOT_KERNELS)
        const __m512bh yr = as_bh(line(yp + c));
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) ahq[i] = _mm512_dpbf16_ps(ahq[i], as_bh(gbits[i]), yr);
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) {
          const __m512bh x = as_bh(line(xp[j] + c));
#pragma GCC unroll 16
          for (int i = 0; i < N; ++i)
            aH[i * N + j] = _mm512_dpbf16_ps(aH[i * N + j], as_bh(gbits[i]), x);
        }
#else
        // acc += a[2k] b[2k], then += a[2k + 1] b[2k + 1], per lane k
        const auto dot = [&](__m512& acc, int i, __m512i bits) {
          acc = _mm512_fmadd_ps(ge[i], detail::bf16x32_even(bits), acc);
          acc = _mm512_fmadd_ps(go[i], detail::bf16x32_odd(bits), acc);
        };
        const __m512i ybits = line(yp + c);
#pragma GCC unroll 16
        for (int i = 0; i < N; ++i) dot(ahq[i], i, ybits);
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) {
          const __m512i xbits = line(xp[j] + c);
#pragma GCC unroll 16
          for (int i = 0; i < N; ++i) dot(aH[i * N + j], i, xbits);
        }
#endif
        // d_y = G^T h_post and d_X[j] = sum_i H[i][j] G[i], the same products and FMAs per column
        // as the other paths, then interleaved back into column order by the store
        const auto mix = [&](const Real* coef, int stride, bf16* dst) {
          __m512 even = _mm512_mul_ps(_mm512_set1_ps(coef[0]), ge[0]);
          __m512 odd = _mm512_mul_ps(_mm512_set1_ps(coef[0]), go[0]);
#pragma GCC unroll 16
          for (int i = 1; i < N; ++i) {
            even = _mm512_fmadd_ps(_mm512_set1_ps(coef[i * stride]), ge[i], even);
            odd = _mm512_fmadd_ps(_mm512_set1_ps(coef[i * stride]), go[i], odd);
          }
          detail::stream_even_odd(dst, even, odd);
        };
        mix(hq, 1, dyp + c);
#pragma GCC unroll 16
        for (int j = 0; j < N; ++j) mix(H + j, N, dxp[j] + c);
      }
    }
#pragma GCC unroll 16
    for (int k = 0; k < N * N; ++k) _mm512_storeu_ps(dH[k].lanes.data(), aH[k]);
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) _mm512_storeu_ps(dhq[i].lanes.data(), ahq[i]);
  }
#endif
#if defined(MHC_HAVE_AVX2_KERNELS)
  /// n <= 4, AVX2 + FMA: forward() on the full 64-column block at c0 of token t, 16 columns per
  /// step (the n rows' two packets, two of y, two results and a broadcast: <= 13 registers); for
  /// float into an L1 buffer, then the block's n rows out as whole lines (stream_line_block;
  /// medians 0.96-1.31 -> 1.13-1.44 of memcpy, three alternating bench_operators runs on Zen 3,
  /// against direct stores). The same products and sums per column as the generic path, as
  /// fused multiply-adds; the block is read before any of it is written (in-place update). bf16
  /// goes through load8x2 / store8x2, whose lane order only a column-by-column kernel may use
  /// (in cache 96 -> 76 ns per block against load8 / store8, C = 4096, docs/operators.md).
  static void forward_avx2_block(const ConstBatchRef<Scalar>& X, const Real* H, const Real* hq,
                                 const ConstBatchRef<Scalar>& y, BatchRef<Scalar>& X_out, Index t,
                                 Index c0) {
    static_assert(kAvx2Blocks, "AVX2 float path");
    // float: through an L1 buffer, streamed out as whole lines; bf16: stored directly (streaming
    // its 2-line rows measured 0.59-0.67 of memcpy against 0.77-0.82 at C = 4096 / 7168)
    constexpr bool kStreamLines = std::is_same<Scalar, float>::value;
    alignas(64) Scalar out[kStreamLines ? N : 1][detail::kColumnBlock];
#pragma GCC unroll 4
    for (int c = 0; c < detail::kColumnBlock; c += 16) {
      __m256 x[N][2], yr[2];  // column by column: the lane order of load8x2 does not matter
      for (int j = 0; j < N; ++j)
        detail::load8x2(detail::at(X, t * N + j, c0 + c), x[j][0], x[j][1]);
      detail::load8x2(detail::at(y, t, c0 + c), yr[0], yr[1]);
      for (int i = 0; i < N; ++i) {
        __m256 acc[2];
        for (int q = 0; q < 2; ++q) {
          acc[q] = _mm256_mul_ps(_mm256_set1_ps(hq[i]), yr[q]);
          for (int j = 0; j < N; ++j)
            acc[q] = _mm256_fmadd_ps(_mm256_set1_ps(H[i * N + j]), x[j][q], acc[q]);
        }
        Scalar* dst = kStreamLines ? out[i] + c : detail::at(X_out, t * N + i, c0 + c);
        detail::store8x2(dst, acc[0], acc[1]);
      }
    }
    if constexpr (kStreamLines)
      for (int i = 0; i < N; ++i)
        detail::stream_line_block(detail::at(X_out, t * N + i, c0), out[i]);
  }

  /// n <= 4, AVX2 + FMA (16 vector registers): backward() over the full column blocks [0, full)
  /// of token t. Per 64-column block (in L1 after the first pass) the n*n + n dot products run
  /// in passes that keep their accumulators in registers: two columns j of d_H_res at a time
  /// (2n accumulators, n packets of G and two of X: <= 14 registers), then d_h_post; a last pass
  /// computes d_y = G^T h_post and d_X = H_res^T G, 16 columns at a time, into an L1 buffer that
  /// goes out as whole lines (stream_line_block) after the block's last read of G (in-place
  /// d_X). Every accumulator lane adds its columns in the generic path's order, as fused
  /// multiply-adds, and the lanes become the DotAccumulator lanes (the tail and total() follow
  /// as elsewhere).
  template <typename Ahead>
  static void backward_avx2_blocks(const ConstBatchRef<Scalar>& X, const ConstBatchRef<Scalar>& y,
                                   const ConstBatchRef<Scalar>& d_X_out, BatchRef<Scalar>& d_X,
                                   BatchRef<Scalar>& d_y, const Real* H, const Real* hq, Index t,
                                   Index full, const Ahead& ahead,
                                   detail::DotAccumulator<Real>* dH,
                                   detail::DotAccumulator<Real>* dhq) {
    static_assert(kAvx2Blocks, "AVX2 float path");
    constexpr int kB = detail::kColumnBlock;
    __m256 aH[N * N], ahq[N];
    for (int k = 0; k < N * N; ++k) aH[k] = _mm256_setzero_ps();
    for (int i = 0; i < N; ++i) ahq[i] = _mm256_setzero_ps();
    // bf16: the block's rows of G, X and y widened once into L1 (the passes read G n + 2 times)
    alignas(32) float wide[std::is_same<Scalar, bf16>::value ? 2 * N + 1 : 1][kB];
    for (Index c0 = 0; c0 < full; c0 += kB) {
      ahead(y, 1, t, c0, kB);
      ahead(d_X_out, N, t, c0, kB);
      ahead(X, N, t, c0, kB);
      const float* g[N];  // this block's columns of G, X and y as floats
      const float* x[N + 1];  // x[N]: y
      const auto row = [&](const ConstBatchRef<Scalar>& v, Index r, int k) -> const float* {
        if constexpr (std::is_same<Scalar, bf16>::value) {
          detail::bf16_to_float(detail::at(v, r, c0), wide[k], kB);
          return wide[k];
        } else {
          (void)k;
          return detail::at(v, r, c0);
        }
      };
      for (int i = 0; i < N; ++i) g[i] = row(d_X_out, t * N + i, i);
      for (int j = 0; j < N; ++j) x[j] = row(X, t * N + j, N + j);
      x[N] = row(y, t, 2 * N);
      // acc[i * stride + k] += G[i] . x[k] for nb columns k (<= 2): 2n accumulators, G's n
      // packets of 8 columns and two of x (<= 14 registers)
      const auto dots = [&](__m256* acc, int stride, const float* const* b, int nb) {
        __m256 a[2 * N];
        for (int i = 0; i < N; ++i)
          for (int k = 0; k < nb; ++k) a[i * nb + k] = acc[i * stride + k];
#pragma GCC unroll 8
        for (int c = 0; c < kB; c += 8) {
          __m256 gv[N], bv[2];
          for (int i = 0; i < N; ++i) gv[i] = _mm256_loadu_ps(g[i] + c);
          for (int k = 0; k < nb; ++k) bv[k] = _mm256_loadu_ps(b[k] + c);
          for (int i = 0; i < N; ++i)
            for (int k = 0; k < nb; ++k)
              a[i * nb + k] = _mm256_fmadd_ps(gv[i], bv[k], a[i * nb + k]);
        }
        for (int i = 0; i < N; ++i)
          for (int k = 0; k < nb; ++k) acc[i * stride + k] = a[i * nb + k];
        // each pass reloads G from L1: without this g++ 12 loaded all 32 packets of G once for
        // every pass and spilled them to the stack, a store and a reload per packet and pass
        detail::compiler_barrier();
      };
      for (int j = 0; j + 1 < N; j += 2) dots(aH + j, N, x + j, 2);
      if (N % 2 == 1) dots(aH + (N - 1), N, x + (N - 1), 1);
      dots(ahq, 1, x + N, 1);
      // d_y = G^T h_post and d_X[j] = sum_i H[i][j] G[i]; G's columns are loaded before d_X's
      // are written (in-place d_X)
      alignas(64) Scalar out[N + 1][kB];  // d_X rows, then d_y, streamed out as whole lines
#pragma GCC unroll 4
      for (int c = 0; c < kB; c += 16) {
        __m256 gv[N][2];
        for (int i = 0; i < N; ++i)
          for (int q = 0; q < 2; ++q) gv[i][q] = _mm256_loadu_ps(g[i] + c + 8 * q);
        const auto mix = [&](const Real* coef, int stride, Scalar* dst) {
          __m256 v[2];
          for (int q = 0; q < 2; ++q) {
            v[q] = _mm256_mul_ps(_mm256_set1_ps(coef[0]), gv[0][q]);
            for (int i = 1; i < N; ++i)
              v[q] = _mm256_fmadd_ps(_mm256_set1_ps(coef[i * stride]), gv[i][q], v[q]);
          }
          detail::store16_columns(dst, v[0], v[1]);
        };
        mix(hq, 1, out[N] + c);
        for (int j = 0; j < N; ++j) mix(H + j, N, out[j] + c);
      }
      detail::stream_line_block(detail::at(d_y, t, c0), out[N]);
      for (int j = 0; j < N; ++j) detail::stream_line_block(detail::at(d_X, t * N + j, c0), out[j]);
    }
    for (int k = 0; k < N * N; ++k) _mm256_storeu_ps(dH[k].lanes.data(), aH[k]);
    for (int i = 0; i < N; ++i) _mm256_storeu_ps(dhq[i].lanes.data(), ahq[i]);
  }
#endif
};

}  // namespace mhc
