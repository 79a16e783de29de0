// detail/projection_avx2.hpp: the AVX2 + FMA register kernel of the coefficient projection
// (float compute type, M a multiple of 8 and at most 96 outputs per token: mHC / HC with n = 2,
// 4, 6, 8, M = n^2 + 2n; mHC-lite with n = 4, M = 32). Used by Coefficients::forward where the
// target has AVX2 and FMA but not AVX-512 (MHC_NO_AVX2_KERNELS turns it off); the AVX-512 kernel
// is detail/projection_avx512.hpp.
//
// acc_t (M) += W[k, :] * v_t[k] for a tile of TB tokens, row k of W at a time:
//   acc_t[8j .. 8j + 7] += W[k, 8j .. 8j + 7] * v_t[k]                            (j < M / 8)
// in sub-tiles of kSub = 12 / (M / 8) tokens whose 12 or fewer accumulators stay in registers for
// a block of rows: per row and sub-tile M / 8 loads of W, then per token one broadcast load of
// v_t[k] and M / 8 FMAs (M = 24: 4 tokens, 12 accumulators + 3 of W + the broadcast = 16 ymm
// registers, 7 loads per 12 FMAs; for M > 24 the compiler reloads some of W's row from L1, as
// FMA memory operands). The other sub-tiles of the tile read the block's rows of W again from L1.
// Every output adds its rows in ascending order, one fused multiply-add per row: bit for bit the
// portable tile of coefficients.hpp where the compiler fuses its multiply-adds (g++ -O2 and up
// with -mfma; tests/test_coefficients.cpp checks the tile against std::fma in that order). The
// sum of squares is kept lane-wise (8 lanes, summed in finish()).
//
// The portable tile it replaces holds its 8 tokens' 24 accumulators in 16 registers, so g++
// spills them (a store and a reload per FMA in its inner loop): on the Zen 3 VM of
// docs/performance_log.md it ran at 0.55-0.56 of the FMA peak with X and W in cache
// (bench_kernels CoefficientProjection/L2).
#pragma once

#include "mhc/detail/operator_support.hpp"

#if defined(MHC_HAVE_AVX2_KERNELS)

namespace mhc::detail {

template <int TB, int M>
struct ProjectionTileAvx2 {
  static_assert(M > 0 && M % 8 == 0, "whole 8-output groups");
  static constexpr int kVec = M / 8;  // accumulators per token
  static_assert(kVec <= 12, "a token's accumulators must fit in the registers");
  static constexpr int kSub = 12 / kVec;  // tokens per register sub-tile
  __m256 acc[TB][kVec];
  __m256 ss[TB];  // sum of squares, lane-wise

  void set_zero() {
    for (int t = 0; t < TB; ++t) {
      for (int j = 0; j < kVec; ++j) acc[t][j] = _mm256_setzero_ps();
      ss[t] = _mm256_setzero_ps();
    }
  }

  /// Rows [0, w) of W (row stride ldw floats, starting at w0) times the tokens' values
  /// v[t][0, w) (float, w values each).
  EIGEN_ALWAYS_INLINE void accumulate(const float* w0, Index ldw, const float* const* v, Index w) {
    // Sum of squares: whole 8-lane chunks, then a masked rest (lanes past w load as zero).
    for (int t = 0; t < TB; ++t) {
      __m256 s = ss[t];
      Index c = 0;
      for (; c + 8 <= w; c += 8) {
        const __m256 x = _mm256_loadu_ps(v[t] + c);
        s = _mm256_fmadd_ps(x, x, s);
      }
      if (c < w) {
        const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(w - c)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        const __m256 x = _mm256_maskload_ps(v[t] + c, mask);
        s = _mm256_fmadd_ps(x, x, s);
      }
      ss[t] = s;
    }
    sub_tiles<0>(w0, ldw, v, w);
  }

  /// Token t's M projection values into out[0, M); returns its sum of squares.
  float finish(int t, float* out) const {
    for (int j = 0; j < kVec; ++j) _mm256_storeu_ps(out + 8 * j, acc[t][j]);
    alignas(32) float l[8];
    _mm256_store_ps(l, ss[t]);
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
  }

 private:
  /// The sub-tile of tokens [T0, T0 + S), then the next one.
  template <int T0>
  EIGEN_ALWAYS_INLINE void sub_tiles(const float* w0, Index ldw, const float* const* v, Index w) {
    constexpr int S = TB - T0 < kSub ? TB - T0 : kSub;
    // the accumulators live in locals for the block (the members could alias the float loads
    // of v and would be stored back on every row)
    __m256 a[S][kVec];
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < kVec; ++j) a[s][j] = acc[T0 + s][j];
    const float* x[S];
    for (int s = 0; s < S; ++s) x[s] = v[T0 + s];
    const float* wk = w0;
#pragma GCC unroll 4
    for (Index k = 0; k < w; ++k, wk += ldw) {
      __m256 wv[kVec];
      for (int j = 0; j < kVec; ++j) wv[j] = _mm256_loadu_ps(wk + 8 * j);
      for (int s = 0; s < S; ++s) {
        const __m256 b = _mm256_broadcast_ss(x[s] + k);
        for (int j = 0; j < kVec; ++j) a[s][j] = _mm256_fmadd_ps(wv[j], b, a[s][j]);
      }
    }
    for (int s = 0; s < S; ++s)
      for (int j = 0; j < kVec; ++j) acc[T0 + s][j] = a[s][j];
    if constexpr (T0 + S < TB) sub_tiles<T0 + S>(w0, ldw, v, w);
  }
};

}  // namespace mhc::detail

#endif
