// detail/projection_avx512.hpp: the AVX-512 register kernel of the coefficient projection (float
// compute type, M a multiple of 8 outputs per token, e.g. M = 24 for mHC / HC with n = 4 and
// M = 32 for mHC-lite with n = 4). Used by Coefficients::forward where the target has AVX-512F;
// with AVX2 + FMA only, detail/projection_avx2.hpp runs; elsewhere the portable Eigen-packet tile
// of coefficients.hpp.
//
// acc_t (M) += W[k, :] * v_t[k] for a tile of TB tokens, two rows k, k+1 of W at a time, every
// output group of 8 in one 16-lane vector whose even lanes take row k and odd lanes row k+1:
//   acc_t[j] += [W[k,8j], W[k+1,8j], W[k,8j+1], W[k+1,8j+1], ..., W[k,8j+7], W[k+1,8j+7]]
//               * [v_t[k], v_t[k+1], v_t[k], v_t[k+1], ...]                      (j < M / 8)
// The M / 8 interleaved W vectors of a pair of rows are built once per pair in registers (two
// permutes of two 16-float loads per 16 outputs, one of two 8-float loads for an 8-output rest)
// and shared by the TB tokens; the multiplier is ONE 64-bit broadcast load of (v_t[k], v_t[k+1])
// per token, shared by its M / 8 FMAs. At the end out[8j + i] = acc[j][2i] + acc[j][2i+1] (the
// even rows and the odd rows are summed separately, then added). Per pair of rows and token: M / 8
// FMAs and one load (M = 24: 3 FMAs per load, all 16-lane). TB (M / 8) <= 24 accumulators stay in
// registers (TB = 8 for M = 24, 6 for M = 32).
//
// This replaced (2026-11-29) a tile of 12 tokens that multiplied the first 16 outputs of rows k
// and k+1 by two 32-bit broadcasts of v_t[k] and v_t[k+1] (and interleaved only the 8-output
// rest): 36 broadcast loads per 36 FMAs. With the data in L1 (TB rows of 64 columns and W, same
// loop, repeated) the old tile ran at 177 GFLOP/s (0.79 of the 223 GFLOP/s FMA peak), this one at
// 205-207 (0.92); 215 (0.97) with W pre-interleaved in memory, but packing W per block into a
// buffer (it has no workspace) made the whole forward slower (the pack exposes the L2 latency of
// W). The 12 rows of the old tile also sat at the same 4 KB page offset for C a multiple of 1024
// (rows of 4 KB multiples), i.e. in the same L1 sets (12 ways); 8 rows leave room for W.
// Those rates are from the Zen 5 machine of docs/performance_log.md. On the Cascade Lake VM there
// the same loop, every output used, runs at 0.40-0.56 (median 0.44) of the FMA peak: about two
// micro-ops per FMA (12 loads and 3 permutes per 24 FMAs) is what that core sustains.
#pragma once

#include "mhc/detail/operator_support.hpp"

#if defined(MHC_HAVE_AVX512_KERNELS)

namespace mhc::detail {

template <int TB, int M>
struct ProjectionTileAvx512 {
  static_assert(M > 0 && M % 8 == 0, "whole 8-output groups");
  static constexpr int kVec = M / 8;  // accumulators per token
  static_assert(TB * kVec <= 24, "accumulators must fit in the registers");
  /// Rows of W ahead of the current pair that each step prefetches into L1 (see accumulate;
  /// 0: none).
  static constexpr Index kWPrefetchRows = 8;
  __m512 acc[TB][kVec];
  alignas(64) float ss[TB][16];  // sum of squares, lane-wise (in memory: touched once per block)

  void set_zero() {
    for (int t = 0; t < TB; ++t) {
      for (int j = 0; j < kVec; ++j) acc[t][j] = _mm512_setzero_ps();
      _mm512_store_ps(ss[t], _mm512_setzero_ps());
    }
  }

  /// The kVec interleaved vectors of rows a, b of W (b taken as zero unless HasB):
  /// out[j] = [a[8j], b[8j], a[8j+1], b[8j+1], ..., a[8j+7], b[8j+7]].
  template <bool HasB>
  static EIGEN_ALWAYS_INLINE void interleave(const float* a, const float* b, __m512* out) {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi =
        _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int q = 0; q < M / 16; ++q) {
      const __m512 ra = _mm512_loadu_ps(a + 16 * q);
      const __m512 rb = HasB ? _mm512_loadu_ps(b + 16 * q) : _mm512_setzero_ps();
      out[2 * q] = _mm512_permutex2var_ps(ra, lo, rb);
      out[2 * q + 1] = _mm512_permutex2var_ps(ra, hi, rb);
    }
    if constexpr (M % 16 != 0) {
      const __m512 ra = _mm512_castps256_ps512(_mm256_loadu_ps(a + M - 8));
      const __m512 rb =
          HasB ? _mm512_castps256_ps512(_mm256_loadu_ps(b + M - 8)) : _mm512_setzero_ps();
      out[kVec - 1] = _mm512_permutex2var_ps(ra, lo, rb);
    }
  }

  /// Rows [k, k + w) of W (row stride ldw floats, starting at w0) times the tokens' values
  /// v[t][0, w) (float, w values each).
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
    __m512 a[TB][kVec];
    for (int t = 0; t < TB; ++t)
      for (int j = 0; j < kVec; ++j) a[t][j] = acc[t][j];
    // One pair of rows W[k], W[k + 1] (interleaved here, in registers: packing W into a buffer
    // first measured slower, see docs/operators.md); for the last, unpaired row (Full = false)
    // the partner row and v_t[k + 1] are taken as zero. W streams through L1 once per tile, 2M
    // floats per pair (3 lines for M = 24), from L2, or from L3 where W outgrows L2 (C >= 4096
    // with the 1 MB L2 of Cascade Lake): each step prefetches the pair kWPrefetchRows rows on
    // (768 B for a dense M = 24 W; past the block's last row these are the first rows of the
    // block the tile reads next; a padded W gets the same bytes from row k + kWPrefetchRows, a
    // hint only). Without it the L1 next-line prefetcher alone fell behind (Cascade Lake VM,
    // bench_operators, five alternating runs of the Coefficients forward rows: geometric mean
    // of the 12 cells 59.1 -> 63.0 GFLOP/s, 10 of 12 higher; 1536 B ahead: 62.3). Results are
    // unchanged (a prefetch only). Not measured on Zen 5, where a prefetch of W's next block
    // at each block's start had measured 0.85x (docs/performance_log.md).
    const auto step = [&](const float* wa, Index k, auto full) __attribute__((always_inline)) {
      constexpr bool kFull = decltype(full)::value;
      if constexpr (kFull && kWPrefetchRows > 0) {
        // the 2M floats kWPrefetchRows rows on (an integer address: it may lie past W's end)
        const std::uintptr_t ahead = reinterpret_cast<std::uintptr_t>(wa) +
                                     std::uintptr_t(kWPrefetchRows * ldw) * sizeof(float);
        for (int line = 0; line < 2 * M * int(sizeof(float)); line += 64)
          prefetch(reinterpret_cast<const void*>(ahead + line));
      }
      __m512 wv[kVec];
      interleave<kFull>(wa, wa + ldw, wv);
      for (int t = 0; t < TB; ++t) {
        __m512 x;
        if constexpr (kFull) {
          double pair;  // (v_t[k], v_t[k + 1])
          std::memcpy(&pair, v[t] + k, sizeof(double));
          x = _mm512_castpd_ps(_mm512_set1_pd(pair));
        } else {
          x = _mm512_maskz_mov_ps(0x5555, _mm512_set1_ps(v[t][k]));
        }
        for (int j = 0; j < kVec; ++j) a[t][j] = _mm512_fmadd_ps(wv[j], x, a[t][j]);
      }
    };
    Index k = 0;
    for (; k + 2 <= w; k += 2) step(w0 + k * ldw, k, std::true_type{});
    if (k < w) step(w0 + k * ldw, k, std::false_type{});
    for (int t = 0; t < TB; ++t)
      for (int j = 0; j < kVec; ++j) acc[t][j] = a[t][j];
  }

  /// Token t's M projection values into out[0, M); returns its sum of squares.
  float finish(int t, float* out) const {
    for (int j = 0; j < kVec; ++j) {
      alignas(64) float l[16];
      _mm512_store_ps(l, acc[t][j]);
      for (int i = 0; i < 8; ++i) out[8 * j + i] = l[2 * i] + l[2 * i + 1];
    }
    return _mm512_reduce_add_ps(_mm512_load_ps(ss[t]));
  }
};

}  // namespace mhc::detail

#endif
