// detail/projection_avx512.hpp: the AVX-512 register kernel of the coefficient projection (float
// compute type, M = 16 kHi + 8 kTail outputs per token, e.g. M = 24 for mHC / HC with n = 4 and
// M = 32 for mHC-lite with n = 4). Used by Coefficients::forward where the target has AVX-512F;
// elsewhere the portable Eigen-packet tile of coefficients.hpp runs instead.
//
// acc_t (M) += W[k, :] * v_t[k] for a tile of TB tokens, two rows k, k+1 of W at a time so that
// every FMA is a full 16-lane one:
//   hi_t[q] += W[k, 16q:16q+16] * v_t[k] + W[k+1, 16q:16q+16] * v_t[k+1]     (q < kHi)
//   lo_t    += [W[k,16kHi], W[k+1,16kHi], W[k,16kHi+1], W[k+1,16kHi+1], ...]
//              * [v_t[k], v_t[k+1], v_t[k], v_t[k+1], ...]                  (the 8-wide rest)
// The interleaved rest row is one permute of two 8-lane loads per pair of rows (shared by the TB
// tokens); the multiplier is one 64-bit broadcast of (v_t[k], v_t[k+1]). At the end the even and
// odd lanes of lo_t are added. Per pair of rows: TB (2 kHi + kTail) FMAs, all accumulators in
// registers (TB (kHi + kTail) <= 24 of the 32 vector registers).
#pragma once

#include "mhc/detail/operator_support.hpp"

#if defined(MHC_HAVE_AVX512_KERNELS)

namespace mhc::detail {

template <int TB, int kHi, int kTail>
struct ProjectionTileAvx512 {
  static_assert(kTail == 0 || kTail == 1, "the rest is 0 or 8 outputs");
  static_assert(TB * (kHi + kTail) <= 24, "accumulators must fit in the registers");
  static constexpr int M = 16 * kHi + 8 * kTail;
  __m512 hi[TB][kHi > 0 ? kHi : 1];
  __m512 lo[TB];
  alignas(64) float ss[TB][16];  // sum of squares, lane-wise (in memory: touched once per block)

  void set_zero() {
    for (int t = 0; t < TB; ++t) {
      for (int q = 0; q < kHi; ++q) hi[t][q] = _mm512_setzero_ps();
      lo[t] = _mm512_setzero_ps();
      _mm512_store_ps(ss[t], _mm512_setzero_ps());
    }
  }

  /// Rows [k, k + w) of W (w <= 64, row stride ldw floats, starting at w0) times the tokens'
  /// values v[t][0, w) (float, w values each).
  EIGEN_ALWAYS_INLINE void accumulate(const float* w0, Index ldw, const float* const* v, Index w) {
    // Sum of squares: full 16-lane chunks, then a masked rest.
    for (int t = 0; t < TB; ++t) {
      __m512 s = _mm512_load_ps(ss[t]);
      Index c = 0;
      for (; c + 16 <= w; c += 16) {
        const __m512 x = _mm512_loadu_ps(v[t] + c);
        s = _mm512_fmadd_ps(x, x, s);
      }
      if (c < w) {
        const __mmask16 mask = static_cast<__mmask16>((1u << (w - c)) - 1u);
        const __m512 x = _mm512_maskz_loadu_ps(mask, v[t] + c);
        s = _mm512_fmadd_ps(x, x, s);
      }
      _mm512_store_ps(ss[t], s);
    }
    // The accumulators live in locals for the block (the members could alias the float loads of
    // v and would be stored back on every iteration).
    __m512 h[TB][kHi > 0 ? kHi : 1], l[TB];
    for (int t = 0; t < TB; ++t) {
      for (int q = 0; q < kHi; ++q) h[t][q] = hi[t][q];
      l[t] = lo[t];
    }
    const __m512i interleave =
        _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const Index pairs = w / 2;
    const float* wk = w0;
    for (Index p = 0; p < pairs; ++p, wk += 2 * ldw) {
      __m512 wa[kHi > 0 ? kHi : 1], wb[kHi > 0 ? kHi : 1];
      for (int q = 0; q < kHi; ++q) {
        wa[q] = _mm512_loadu_ps(wk + 16 * q);
        wb[q] = _mm512_loadu_ps(wk + ldw + 16 * q);
      }
      __m512 wt = _mm512_setzero_ps();
      if constexpr (kTail) {
        wt = _mm512_permutex2var_ps(_mm512_castps256_ps512(_mm256_loadu_ps(wk + 16 * kHi)),
                                    interleave,
                                    _mm512_castps256_ps512(_mm256_loadu_ps(wk + ldw + 16 * kHi)));
      }
      for (int t = 0; t < TB; ++t) {
        const float* x = v[t] + 2 * p;
        for (int q = 0; q < kHi; ++q) {
          h[t][q] = _mm512_fmadd_ps(wa[q], _mm512_set1_ps(x[0]), h[t][q]);
          h[t][q] = _mm512_fmadd_ps(wb[q], _mm512_set1_ps(x[1]), h[t][q]);
        }
        if constexpr (kTail) {
          double pair;
          std::memcpy(&pair, x, sizeof(double));
          l[t] = _mm512_fmadd_ps(wt, _mm512_castpd_ps(_mm512_set1_pd(pair)), l[t]);
        }
      }
    }
    if (w % 2 != 0) {  // the last, unpaired row: its partner row is zero
      const Index k = w - 1;
      const float* wl = w0 + k * ldw;
      __m512 wa[kHi > 0 ? kHi : 1];
      for (int q = 0; q < kHi; ++q) wa[q] = _mm512_loadu_ps(wl + 16 * q);
      __m512 wt = _mm512_setzero_ps();
      if constexpr (kTail)
        wt = _mm512_permutex2var_ps(_mm512_castps256_ps512(_mm256_loadu_ps(wl + 16 * kHi)),
                                    interleave, _mm512_setzero_ps());
      for (int t = 0; t < TB; ++t) {
        const __m512 x = _mm512_set1_ps(v[t][k]);
        for (int q = 0; q < kHi; ++q) h[t][q] = _mm512_fmadd_ps(wa[q], x, h[t][q]);
        if constexpr (kTail) l[t] = _mm512_fmadd_ps(wt, x, l[t]);
      }
    }
    for (int t = 0; t < TB; ++t) {
      for (int q = 0; q < kHi; ++q) hi[t][q] = h[t][q];
      lo[t] = l[t];
    }
  }

  /// Token t's M projection values into out[0, M); returns its sum of squares.
  float finish(int t, float* out) const {
    for (int q = 0; q < kHi; ++q) _mm512_storeu_ps(out + 16 * q, hi[t][q]);
    if constexpr (kTail) {
      alignas(64) float l[16];
      _mm512_store_ps(l, lo[t]);
      for (int j = 0; j < 8; ++j) out[16 * kHi + j] = l[2 * j] + l[2 * j + 1];
    }
    return _mm512_reduce_add_ps(_mm512_load_ps(ss[t]));
  }
};

}  // namespace mhc::detail

#endif
