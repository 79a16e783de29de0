// detail/operator_support.hpp: what the CPU batch operators (coefficients.hpp, mixing.hpp) share:
// vector views, storage <-> compute conversion of one row segment, the column blocking,
// lane-wise dot accumulators and the OpenMP loop over tokens.
//
// Determinism: every loop run through for_each_parallel gives each iteration its own outputs and a
// fixed order of arithmetic that does not depend on which thread runs it or how many threads
// there are, so results are bitwise identical for any OMP_NUM_THREADS.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if (defined(__AVX512F__) || defined(__AVX__)) && (defined(__x86_64__) || defined(_M_X64)) && \
    !defined(MHC_NO_STREAM_STORES)
#include <immintrin.h>
#define MHC_HAVE_STREAM_STORES 1
#endif
// Hand-written AVX-512 register kernels (coefficient projection and more): on where the target has
// AVX-512F (e.g. -march=native on the benchmark machine); MHC_NO_AVX512_KERNELS selects the
// portable Eigen-packet code instead (what targets with neither these nor the AVX2 kernels run).
#if defined(__AVX512F__) && (defined(__x86_64__) || defined(_M_X64)) && \
    !defined(MHC_NO_AVX512_KERNELS)
#include <immintrin.h>
#define MHC_HAVE_AVX512_KERNELS 1
// ... and with AVX512-BF16 (vdpbf16ps, vcvtne2ps2bf16), DQ (vfpclassps) and BW (vpermw): the
// backward of Update's bf16 line kernel takes its dot products on the stored values (vdpbf16ps)
// and both directions round with vcvtne2ps2bf16; without them the same kernels run on AVX-512F
// (dot products as FMAs on the column-parity floats, rounding in integer lanes).
#if defined(__AVX512BF16__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
#define MHC_HAVE_BF16_DOT_KERNELS 1
#endif
#endif
// Hand-written AVX2 + FMA register kernels (the mixing operators' full column blocks for n <= 4,
// the coefficient projection tile and the Coefficients backward's register passes) where
// the target has AVX2 and FMA but not AVX-512 (e.g. -march=native on AMD Zen 2 / Zen 3 or Intel
// Haswell to Alder Lake); MHC_NO_AVX2_KERNELS selects the portable Eigen-packet code instead.
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && \
    (defined(__x86_64__) || defined(_M_X64)) && !defined(MHC_NO_AVX2_KERNELS)
#include <immintrin.h>
#define MHC_HAVE_AVX2_KERNELS 1
#endif

#include "mhc/detail/check.hpp"
#include "mhc/detail/threading.hpp"
#include "mhc/types.hpp"

namespace mhc {

/// Contiguous read-only / writable vector views (parameters, biases, workspaces).
template <typename Real>
using ConstVectorRef = Eigen::Ref<const Eigen::Matrix<Real, Eigen::Dynamic, 1>>;
template <typename Real>
using VectorRef = Eigen::Ref<Eigen::Matrix<Real, Eigen::Dynamic, 1>>;

namespace detail {

template <typename Scalar>
inline constexpr bool is_storage_scalar_v =
    std::is_same<Scalar, float>::value || std::is_same<Scalar, double>::value ||
    std::is_same<Scalar, bf16>::value;

/// Columns per tile of the streaming kernels (a few SIMD packets; one tile of n rows stays in L1).
inline constexpr int kColumnBlock = 64;

/// One row segment of up to MaxWidth columns in the compute type; Width is MaxWidth for full
/// blocks and Dynamic for the tail.
template <typename Real, int Width, int MaxWidth = kColumnBlock>
using BlockRow = Eigen::Array<Real, 1, Width, Eigen::RowMajor, 1, MaxWidth>;

/// n rows of one block (n fixed when N > 0, else at most kMaxStreams rows; never heap-allocated).
template <typename Real, int N, int Width>
using BlockTile = Eigen::Array<Real, N == Dynamic ? Eigen::Dynamic : N, Width, Eigen::RowMajor,
                               N == Dynamic ? kMaxStreams : N, kColumnBlock>;

/// Calls block(c0, width_tag, w) for the full Block-wide blocks of [0, C) and then the tail;
/// width_tag is std::integral_constant<int, Block or Dynamic>.
template <int Block = kColumnBlock, typename F>
inline void for_each_column_block(Index C, F&& block) {
  Index c0 = 0;
  for (; c0 + Block <= C; c0 += Block)
    block(c0, std::integral_constant<int, Block>{}, Index(Block));
  if (c0 < C) block(c0, std::integral_constant<int, Eigen::Dynamic>{}, C - c0);
}

/// bfloat16 <-> float on raw bits, written as plain loops the compiler vectorises (Eigen's scalar
/// casts of Eigen::bfloat16 do not vectorise). float -> bf16 rounds to nearest even; a NaN stays a
/// (quiet) NaN of the same sign.
EIGEN_STRONG_INLINE void bf16_to_float(const bf16* src, float* dst, Index w) {
  const auto* bits = reinterpret_cast<const std::uint16_t*>(src);
  for (Index k = 0; k < w; ++k) {
    const std::uint32_t u = std::uint32_t(bits[k]) << 16;
    std::memcpy(dst + k, &u, sizeof(float));
  }
}
EIGEN_STRONG_INLINE void float_to_bf16(const float* src, bf16* dst, Index w) {
  auto* bits = reinterpret_cast<std::uint16_t*>(dst);
  for (Index k = 0; k < w; ++k) {
    std::uint32_t u;
    std::memcpy(&u, src + k, sizeof(float));
    const std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    bits[k] = static_cast<std::uint16_t>(nan ? ((u >> 16) | 0x0040u) : rounded);
  }
}

#if defined(MHC_HAVE_AVX512_KERNELS)
/// 16 bf16 at src as 16 floats (exact: the bits shifted up).
EIGEN_ALWAYS_INLINE __m512 bf16x16_load(const bf16* src) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
/// Each lane of x rounded to bf16 as float_to_bf16 does (u + 0x7FFF + lsb, nearest even; a NaN
/// keeps its bits with the quiet bit set), the bf16 in the upper 16 bits of the 32-bit lane.
EIGEN_ALWAYS_INLINE __m512i bf16x16_round_in_lanes(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
#if defined(__AVX512DQ__)
  // one vfpclassps (quiet or signalling NaN) instead of an and, a compare and their two
  // constants, which loops short of registers need (the bf16 Update backward, mixing.hpp)
  const __mmask16 nan = _mm512_fpclass_ps_mask(x, 0x81);
#else
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                               _mm512_set1_epi32(0x7F800000));
#endif
  return _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x00400000));
}
/// 16 floats rounded to bf16 at dst, bit for bit as float_to_bf16 (nearest even, NaN quiet).
EIGEN_ALWAYS_INLINE __m256i bf16x16_bits(__m512 x) {
#if defined(__AVX512BF16__)
  // One instruction rounds to nearest even and quiets NaNs exactly like the code below, but
  // flushes float denormals to zero: used when no lane is a denormal.
  const __m512i u = _mm512_castps_si512(x);
  const __mmask16 zero_exponent = _mm512_testn_epi32_mask(u, _mm512_set1_epi32(0x7F800000));
  if (_mm512_mask_test_epi32_mask(zero_exponent, u, _mm512_set1_epi32(0x007FFFFF)) == 0) {
    const __m256bh converted = _mm512_cvtneps_pbh(x);
    __m256i bits;
    std::memcpy(&bits, &converted, sizeof(bits));
    return bits;
  }
#endif
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16x16_round_in_lanes(x), 16));
}
EIGEN_ALWAYS_INLINE void bf16x16_store(bf16* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bf16x16_bits(x));
}
/// 32 floats (lo: the first 16, hi: the next 16) rounded to 32 bf16, bit for bit as
/// float_to_bf16: with AVX512-BF16 (and DQ) one vcvtne2ps2bf16 and one denormal test per pair
/// (vfpclassps) instead of two conversions, two tests and an insert.
EIGEN_ALWAYS_INLINE __m512i bf16x32_bits(__m512 lo, __m512 hi) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  constexpr int kDenormal = 0x20;
  if (_kortestz_mask16_u8(_mm512_fpclass_ps_mask(lo, kDenormal),
                          _mm512_fpclass_ps_mask(hi, kDenormal))) {
    const __m512bh converted = _mm512_cvtne2ps_pbh(hi, lo);  // lo -> elements 0..15
    __m512i bits;
    std::memcpy(&bits, &converted, sizeof(bits));
    return bits;
  }
#endif
  return _mm512_inserti64x4(_mm512_castsi256_si512(bf16x16_bits(lo)), bf16x16_bits(hi), 1);
}
/// One 64-byte line of 32 bf16 (bits) as floats split by column parity: even[k] = column 2k,
/// odd[k] = column 2k + 1. Exact, one shift or one mask per packet (no widening shuffle).
EIGEN_ALWAYS_INLINE __m512 bf16x32_even(__m512i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
}
EIGEN_ALWAYS_INLINE __m512 bf16x32_odd(__m512i bits) {
  return _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(int(0xFFFF0000u))));
}
/// The inverse of the split: the 32 bf16 of (even, odd) in column order, rounded bit for bit as
/// float_to_bf16. With AVX512-BF16: bf16x32_bits (vcvtne2ps2bf16), then one vpermw interleaves
/// its two halves. Without: each lane rounded in its 32 bits (u + 0x7FFF + lsb; a NaN keeps its
/// bits with the quiet bit set), then the even lane's upper half goes to the lower 16 bits and
/// the odd lane's upper half stays where it is, which IS column order (column 2k in the low half
/// of 32-bit lane k): a shift and one ternary-logic op, no narrowing or shuffle.
EIGEN_ALWAYS_INLINE __m512i bf16x32_bits_even_odd(__m512 even, __m512 odd) {
#if defined(MHC_HAVE_BF16_DOT_KERNELS)
  // 16-bit element 2k <- element k (even half), 2k + 1 <- element 16 + k (odd half)
  const __m512i pairs = _mm512_set_epi32(
      0x001F000F, 0x001E000E, 0x001D000D, 0x001C000C,
      0x001B000B, 0x001A000A, 0x00190009, 0x00180008,
      0x00170007, 0x00160006, 0x00150005, 0x00140004,
      0x00130003, 0x00120002, 0x00110001, 0x00100000);
  return _mm512_permutexvar_epi16(pairs, bf16x32_bits(even, odd));
#else
  // (even >> 16) | (odd & 0xFFFF0000): truth table A | (B & C) = 0xF8
  return _mm512_ternarylogic_epi32(_mm512_srli_epi32(bf16x16_round_in_lanes(even), 16),
                                   bf16x16_round_in_lanes(odd), _mm512_set1_epi32(int(0xFFFF0000u)),
                                   0xF8);
#endif
}
#endif

/// Compute-type row of `Width` columns (Dynamic: at most kColumnBlock).
template <typename Real, int Width>
using LoadedRow = Eigen::Array<Real, 1, Width, Eigen::RowMajor, 1,
                               Width == Eigen::Dynamic ? kColumnBlock : Width>;

/// w storage elements at src as a compute-type row: a view for float/double, a converted copy
/// for bf16.
template <typename Real, int Width, typename Scalar>
inline auto load_row(const Scalar* src, Index w) {
  if constexpr (std::is_same<Scalar, bf16>::value) {
    static_assert(std::is_same<Real, float>::value, "bf16 loads to float");
    LoadedRow<float, Width> row(1, w);
    bf16_to_float(src, row.data(), Width == Eigen::Dynamic ? w : Index(Width));  // fixed trip count
    return row;
  } else {
    return Eigen::Map<const Eigen::Array<Scalar, 1, Width>>(src, w).template cast<Real>();
  }
}

/// Stores a compute-type row expression into w storage elements (rounded to nearest for bf16).
template <int Width, typename Scalar, typename Expr>
inline void store_row(Scalar* dst, Index w, const Expr& row) {
  if constexpr (std::is_same<Scalar, bf16>::value) {
    const LoadedRow<float, Width> values = row;
    float_to_bf16(values.data(), dst, Width == Eigen::Dynamic ? w : Index(Width));
  } else {
    Eigen::Map<Eigen::Array<Scalar, 1, Width>>(dst, w) = row.template cast<Scalar>();
  }
}

/// Like store_row, but with non-temporal (streaming) stores where the target has AVX(-512) and dst
/// is 64-byte aligned for a full kColumnBlock block: for the large outputs nothing reads back
/// soon (X', d_X of Update, d_y, u), it saves the read-for-ownership of every written line.
/// Tasks that use it end with stream_fence() (for_each_parallel does, once per chunk).
template <int Width, typename Scalar, typename Expr>
inline void stream_row(Scalar* dst, Index w, const Expr& row) {
#if defined(MHC_HAVE_STREAM_STORES) && !defined(__AVX512F__)
  // AVX: the same with 32-byte streaming stores (two per cache line, written back to back)
  if constexpr (Width == kColumnBlock) {
    if (reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
      if constexpr (std::is_same<Scalar, float>::value) {
        const LoadedRow<float, Width> v = row;
        for (int q = 0; q < Width / 8; ++q)
          _mm256_stream_ps(dst + 8 * q, _mm256_loadu_ps(v.data() + 8 * q));
        return;
      } else if constexpr (std::is_same<Scalar, double>::value) {
        const LoadedRow<double, Width> v = row;
        for (int q = 0; q < Width / 4; ++q)
          _mm256_stream_pd(dst + 4 * q, _mm256_loadu_pd(v.data() + 4 * q));
        return;
      } else {
        const LoadedRow<float, Width> v = row;
        alignas(64) bf16 packed[Width];
        float_to_bf16(v.data(), packed, Width);
        for (int q = 0; q < Width / 16; ++q)
          _mm256_stream_si256(reinterpret_cast<__m256i*>(dst) + q,
                              _mm256_load_si256(reinterpret_cast<const __m256i*>(packed) + q));
        return;
      }
    }
  }
#elif defined(MHC_HAVE_STREAM_STORES)
  if constexpr (Width == kColumnBlock) {
    if (reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
      if constexpr (std::is_same<Scalar, float>::value) {
        const LoadedRow<float, Width> v = row;
        for (int q = 0; q < Width / 16; ++q)
          _mm512_stream_ps(dst + 16 * q, _mm512_loadu_ps(v.data() + 16 * q));
        return;
      } else if constexpr (std::is_same<Scalar, double>::value) {
        const LoadedRow<double, Width> v = row;
        for (int q = 0; q < Width / 8; ++q)
          _mm512_stream_pd(dst + 8 * q, _mm512_loadu_pd(v.data() + 8 * q));
        return;
      } else {
        const LoadedRow<float, Width> v = row;
        alignas(64) bf16 packed[Width];
        float_to_bf16(v.data(), packed, Width);
        for (int q = 0; q < Width / 32; ++q)
          _mm512_stream_si512(reinterpret_cast<__m512i*>(dst) + q,
                              _mm512_load_si512(reinterpret_cast<const __m512i*>(packed) + q));
        return;
      }
    }
  }
#endif
  store_row<Width>(dst, w, row);
}

/// Orders this thread's streaming stores before anything that follows (no-op without them).
inline void stream_fence() {
#if defined(MHC_HAVE_STREAM_STORES)
  _mm_sfence();
#endif
}

#if defined(MHC_HAVE_AVX512_KERNELS)
/// Register-level access to one full kColumnBlock block (4 packets of 16 floats) for the AVX-512
/// paths of the mixing operators (float compute type; float or bf16 storage).
EIGEN_ALWAYS_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
EIGEN_ALWAYS_INLINE __m512 load16(const bf16* p) { return bf16x16_load(p); }
EIGEN_ALWAYS_INLINE void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
EIGEN_ALWAYS_INLINE void store16(bf16* p, __m512 v) { bf16x16_store(p, v); }
/// v[0..3] (64 values) to dst, with non-temporal stores where stream_row would use them (dst
/// 64-byte aligned, stream stores available), else plain stores: same values either way.
template <typename Scalar>
EIGEN_ALWAYS_INLINE void stream_block(Scalar* dst, const __m512* v) {
  static_assert(kColumnBlock == 64, "four packets per block");
#if defined(MHC_HAVE_STREAM_STORES)
  if (reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
    if constexpr (std::is_same<Scalar, float>::value) {
      for (int q = 0; q < 4; ++q) _mm512_stream_ps(dst + 16 * q, v[q]);
    } else {
      for (int q = 0; q < 2; ++q)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst) + q,
                            bf16x32_bits(v[2 * q], v[2 * q + 1]));
    }
    return;
  }
#endif
  for (int q = 0; q < 4; ++q) store16(dst + 16 * q, v[q]);
}
/// v[0..1] (32 values) to dst, like stream_block: non-temporal where dst is 64-byte aligned (for
/// bf16 the pair is one cache line), else plain stores.
template <typename Scalar>
EIGEN_ALWAYS_INLINE void stream_pair(Scalar* dst, const __m512* v) {
#if defined(MHC_HAVE_STREAM_STORES)
  if (reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
    if constexpr (std::is_same<Scalar, float>::value) {
      for (int q = 0; q < 2; ++q) _mm512_stream_ps(dst + 16 * q, v[q]);
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), bf16x32_bits(v[0], v[1]));
    }
    return;
  }
#endif
  for (int q = 0; q < 2; ++q) store16(dst + 16 * q, v[q]);
}
/// One line of 32 bf16 given by column parity (bf16x32_even / bf16x32_odd layout) to dst, like
/// stream_pair: non-temporal where dst is 64-byte aligned, else a plain store.
EIGEN_ALWAYS_INLINE void stream_even_odd(bf16* dst, __m512 even, __m512 odd) {
  const __m512i bits = bf16x32_bits_even_odd(even, odd);
#if defined(MHC_HAVE_STREAM_STORES)
  if (reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), bits);
    return;
  }
#endif
  _mm512_storeu_si512(dst, bits);
}
#endif

#if defined(MHC_HAVE_AVX2_KERNELS)
/// Register-level access to 8 values (one AVX packet) for the AVX2 paths of the mixing operators
/// (float compute type; float or bf16 storage). bf16 loads are exact (the bits shifted up).
EIGEN_ALWAYS_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
EIGEN_ALWAYS_INLINE __m256 load8(const bf16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
/// 8 floats rounded to bf16 as float_to_bf16 does (u + 0x7FFF + lsb, nearest even; a NaN keeps
/// its bits with the quiet bit set), each bf16 in the upper 16 bits of its 32-bit lane. NaN is
/// found with integer operations: vcmpps (x unordered with itself) is one instruction instead of
/// two, but it issues on the FMA pipes of Zen 3, and the bf16 Coefficients backward, whose last
/// pass rounds between its FMAs, measured 0.37-0.51 of the roofline with it against 0.41-0.58.
EIGEN_ALWAYS_INLINE __m256i bf16x8_round_in_lanes(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                         _mm256_set1_epi32(0x7F800000));
  return _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), nan);
}
/// 8 floats rounded to 8 bf16, bit for bit as float_to_bf16.
EIGEN_ALWAYS_INLINE __m128i bf16x8_bits(__m256 x) {
  const __m256i bits = _mm256_srli_epi32(bf16x8_round_in_lanes(x), 16);
  // 32-bit lanes (each < 2^16) to 16 bits; packus works per 128-bit half, so pack the halves
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}
EIGEN_ALWAYS_INLINE void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
EIGEN_ALWAYS_INLINE void store8(bf16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), bf16x8_bits(v));
}

/// 16 values at p as two packets for kernels that work column by column (the same operations on
/// every column, no sums across columns): float in column order (lo: columns 0-7, hi: 8-15);
/// bf16 in the order of _mm256_unpack{lo,hi}_epi16 (lo: columns 0-3 and 8-11, hi: 4-7 and
/// 12-15), which widens 16 values with one load and two unpacks. store8x2 writes such a pair
/// back in column order; for bf16 the pack that narrows the two halves undoes the unpacks, so no
/// permute is needed. Exact (loads) and bit for bit float_to_bf16 (stores).
EIGEN_ALWAYS_INLINE void load8x2(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}
EIGEN_ALWAYS_INLINE void load8x2(const bf16* p, __m256& lo, __m256& hi) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits));  // each value << 16
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits));
}
EIGEN_ALWAYS_INLINE void store8x2(float* p, __m256 lo, __m256 hi) {
  _mm256_storeu_ps(p, lo);
  _mm256_storeu_ps(p + 8, hi);
}
EIGEN_ALWAYS_INLINE void store8x2(bf16* p, __m256 lo, __m256 hi) {
  const __m256i lo_bits = _mm256_srli_epi32(bf16x8_round_in_lanes(lo), 16);
  const __m256i hi_bits = _mm256_srli_epi32(bf16x8_round_in_lanes(hi), 16);
  // per 128-bit half: lo's four values, then hi's = columns 0-7 | 8-15
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(lo_bits, hi_bits));
}
/// 16 values in column order (lo: columns 0-7, hi: 8-15) to p, bf16 rounded as store8 does:
/// one pack and one permute for both halves (two stores of store8 extract and pack each half).
EIGEN_ALWAYS_INLINE void store16_columns(float* p, __m256 lo, __m256 hi) { store8x2(p, lo, hi); }
EIGEN_ALWAYS_INLINE void store16_columns(bf16* p, __m256 lo, __m256 hi) {
  const __m256i lo_bits = _mm256_srli_epi32(bf16x8_round_in_lanes(lo), 16);
  const __m256i hi_bits = _mm256_srli_epi32(bf16x8_round_in_lanes(hi), 16);
  // packed per 128-bit half: columns 0-3, 8-11 | 4-7, 12-15; the permute orders the four
  // 64-bit quarters 0, 2, 1, 3
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_permute4x64_epi64(_mm256_packus_epi32(lo_bits, hi_bits), 0xD8));
}
/// Keeps the compiler from carrying values loaded from memory across this point (no instruction).
EIGEN_ALWAYS_INLINE void compiler_barrier() { __asm__ __volatile__("" ::: "memory"); }

/// kColumnBlock values from an L1 buffer to dst: non-temporal stores of whole cache lines where
/// dst is 64-byte aligned, else plain stores. The AVX2 kernels compute a block's output rows into
/// a buffer first so that every line is written whole: lines streamed in parts, with other rows'
/// stores in between, made the Update backward about 3x slower on Zen 3
/// (docs/performance_log.md). Like stream_row, the caller's task ends with stream_fence().
template <typename Scalar>
EIGEN_ALWAYS_INLINE void stream_line_block(Scalar* dst, const Scalar* src) {
  constexpr int kBytes = kColumnBlock * int(sizeof(Scalar));
#if defined(MHC_HAVE_STREAM_STORES)  // (MHC_NO_STREAM_STORES: plain stores, no fence needed)
  if (reinterpret_cast<std::uintptr_t>(dst) % 64 == 0) {
    for (int b = 0; b < kBytes; b += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(reinterpret_cast<char*>(dst) + b),
                          _mm256_load_si256(reinterpret_cast<const __m256i*>(
                              reinterpret_cast<const char*>(src) + b)));
    return;
  }
#endif
  std::memcpy(dst, src, std::size_t(kBytes));
}
#endif

/// A dot product accumulated over the column blocks of one token, in a fixed order: full blocks
/// add their packet-wide segments lane by lane (no horizontal sum per block), the tail block adds
/// a scalar; total() = sum of the lanes + tail. The order depends only on C, never on threads.
template <typename Real>
struct DotAccumulator {
  static constexpr int kLanes = Eigen::internal::packet_traits<Real>::size;
  Eigen::Array<Real, 1, kLanes> lanes = Eigen::Array<Real, 1, kLanes>::Zero();
  Real tail = Real(0);
  template <int Width, typename A, typename B>
  void add(const A& a, const B& b, Index w) {
    if constexpr (Width == kColumnBlock && kColumnBlock % kLanes == 0) {
      for (int s = 0; s < kColumnBlock / kLanes; ++s)
        lanes += a.template segment<kLanes>(s * kLanes) * b.template segment<kLanes>(s * kLanes);
    } else {
      tail += (a.head(w) * b.head(w)).sum();
    }
  }
#if defined(MHC_HAVE_AVX512_KERNELS)
  /// The full-block add of 64 float products a[q] * b[q], q = 0..3 (same order as add()).
  EIGEN_ALWAYS_INLINE void add_block(const __m512* a, const __m512* b) {
    static_assert(kLanes == 16, "float lanes");
    __m512 l = _mm512_loadu_ps(lanes.data());
    for (int q = 0; q < 4; ++q) l = _mm512_fmadd_ps(a[q], b[q], l);
    _mm512_storeu_ps(lanes.data(), l);
  }
#endif
  Real total() const { return lanes.sum() + tail; }
};

/// Hints the cache to fetch the line at p for reading (no effect where the compiler has no
/// builtin). Locality as __builtin_prefetch: 3 = into L1 (prefetcht0), 2 = into L2 (prefetcht1),
/// 1 = outer levels only (prefetcht2, the kernel's own load brings the line further in).
/// On x86-64 with GCC/Clang the instruction is an `asm volatile`: g++ 12's IPA mod/ref analysis
/// treats __builtin_prefetch as having no effect and, depending on what else the translation
/// unit instantiates, deleted whole prefetch helpers (StreamPrefetch) as dead code. A scratch
/// binary whose PreMix<bf16>::forward had lost all its prefetches ran at 0.61-0.72 of memcpy
/// instead of 0.89-0.94 (C = 1024 and 7168, 1 thread); a bench_operators built with the builtin
/// that way ran the bf16 PreMix backward at 0.46-0.80. The address goes in as a register ("r"),
/// not as a memory operand ("m"(*p)): that told the compiler the asm reads *p and ordered it
/// against the kernels' stores, and bf16 PreMix backward fell from 1.13-1.41 to 0.89-1.26 of
/// memcpy (1 thread, C = 1024 / 4096 / 7168, 3 alternating runs of each build, 18:09-18:11Z).
template <int Locality = 3>
inline void prefetch(const void* p) {
  static_assert(Locality >= 0 && Locality <= 3, "prefetch locality is 0..3");
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (Locality == 3)
    __asm__ __volatile__("prefetcht0 (%0)" : : "r"(p));
  else if constexpr (Locality == 2)
    __asm__ __volatile__("prefetcht1 (%0)" : : "r"(p));
  else if constexpr (Locality == 1)
    __asm__ __volatile__("prefetcht2 (%0)" : : "r"(p));
  else
    __asm__ __volatile__("prefetchnta (%0)" : : "r"(p));
#elif defined(__GNUC__)
  __builtin_prefetch(p, 0, Locality);
#else
  (void)p;
#endif
}

/// Bytes ahead of the current column block that the streaming kernels prefetch in each row they
/// read (rows are long, but a row of a token is only C elements: the hardware prefetchers lose
/// the stream at every 4 KB page; a few blocks ahead keeps the lines arriving). 2 KB into L2
/// measured better than 1 KB into L1 (bf16 at C = 1024: PreMix forward 0.55 -> 0.67-0.79 of
/// memcpy, Update backward 0.53 -> 0.70): the L1 has few miss buffers, L2 more.
inline constexpr Index kStreamPrefetchBytes = 2048;
/// PreMix forward with bf16 storage prefetches twice as far (StreamPrefetch's third argument):
/// it reads 4 of its 5 bytes, so its rows are consumed fastest and 2 KB ahead was not enough. In
/// a paired A/B in one process (11 alternating calls each, same-run memcpy after each call,
/// n = 4, T x C as in bench_operators) the medians went 0.74 -> 0.82 (C = 1024, 1 thread), 0.82
/// -> 0.85 (2 threads), 0.78 -> 0.82 and 0.84 -> 0.90 (C = 4096), 0.91 -> 0.89 and 0.94 -> 0.90
/// (C = 7168) of memcpy; float moved by -0.01 to -0.08 at 4 KB, so it keeps 2 KB.
inline constexpr Index kPreMixForwardBf16PrefetchBytes = 4096;

/// Address of element (r, c) of a row-major view.
template <typename View>
inline auto at(View&& v, Index r, Index c) {
  return v.data() + r * v.outerStride() + c;
}

template <typename Scalar, int Rows>
struct TokenPrefetch;

/// Software prefetch for the streaming kernels, which walk a token's rows block by block
/// (columns c0, c0 + 64, ...) and then the next token's. Each row read is prefetched
/// kStreamPrefetchBytes ahead in THAT order: past the end of a token's row the distance carries
/// on into the same row of the next token (of T), not into the next row of memory, which the
/// kernel reads at the same time anyway. Without the carry the first kStreamPrefetchBytes of
/// rows 1..n-1 of every token were never prefetched (half of a 2 KB bf16 row at C = 1024).
template <typename Scalar>
struct StreamPrefetch {
  Index T, C, tokens_ahead, cols_ahead;  // distance = tokens_ahead rows of C + cols_ahead columns
  StreamPrefetch(Index T_, Index C_, Index bytes = kStreamPrefetchBytes) : T(T_), C(C_) {
    const Index d = std::max<Index>(1, bytes / Index(sizeof(Scalar)));
    tokens_ahead = C > 0 ? d / C : 0;
    cols_ahead = C > 0 ? d % C : 0;
  }
  /// The token and column that the kernel reads the distance after (t, c0); false past the last
  /// token.
  EIGEN_ALWAYS_INLINE bool locate(Index t, Index c0, Index& tt, Index& c) const {
    c = c0 + cols_ahead, tt = t + tokens_ahead;
    if (c >= C) c -= C, ++tt;
    return tt < T;
  }
  /// The element that the kernel reads the distance after (t, c0) in row i of token t's
  /// rows_per_token rows of v (what operator() prefetches); nullptr past the last token.
  template <typename View>
  EIGEN_ALWAYS_INLINE auto target(const View& v, Index rows_per_token, Index t, Index i,
                                  Index c0) const -> decltype(at(v, 0, 0)) {
    Index tt, c;
    return locate(t, c0, tt, c) ? at(v, tt * rows_per_token + i, c) : nullptr;
  }
  /// Prefetches, in each of token t's `rows_per_token` rows of v, the w elements that the kernel
  /// reads the distance after (t, c0).
  template <typename View>
  EIGEN_ALWAYS_INLINE void operator()(const View& v, Index rows_per_token, Index t, Index c0,
                                      Index w) const {
    Index tt, c;
    if (!locate(t, c0, tt, c)) return;
    for (Index i = 0; i < rows_per_token; ++i) {
      const char* p = reinterpret_cast<const char*>(at(v, tt * rows_per_token + i, c));
      for (Index b = 0; b < w * Index(sizeof(Scalar)); b += 64) prefetch<1>(p + b);
    }
  }
  /// The same targets in Rows rows of token t (added with TokenPrefetch::add), resolved once.
  template <int Rows>
  TokenPrefetch<Scalar, Rows> token(Index t) const {
    TokenPrefetch<Scalar, Rows> p;
    p.target_token = t + tokens_ahead;
    p.wrap = C - cols_ahead;
    p.first_ok = p.target_token < T;
    p.second_ok = p.target_token + 1 < T;
    p.first_offset = cols_ahead * Index(sizeof(Scalar));
    p.second_offset = (cols_ahead - C) * Index(sizeof(Scalar));
    return p;
  }
};

/// StreamPrefetch's targets in Rows rows of ONE token (from StreamPrefetch::token, then add() per
/// view until Rows rows are in), resolved once per token so that the per-block step of a kernel
/// with many rows only adds its column: for c0 < wrap the distance lands in the rows of token
/// target_token, from c0 = wrap on in those of the token after it; a token past the last is
/// not fetched. The same addresses as StreamPrefetch::target (tests/test_mixing.cpp). Used by
/// the bf16 Update backward (2n + 1 rows per block; see Update::backward_bf16_rows).
template <typename Scalar, int Rows>
struct TokenPrefetch {
  std::uintptr_t first[Rows] = {}, second[Rows] = {};  // byte address of column 0, plus offset
  int rows = 0;
  Index target_token = 0, wrap = 0, first_offset = 0, second_offset = 0;
  bool first_ok = false, second_ok = false;
  /// Appends rows_per_token rows of v (row i of the target token, and of the one after it).
  template <typename View>
  void add(const View& v, Index rows_per_token) {
    for (Index i = 0; i < rows_per_token; ++i, ++rows) {
      eigen_assert(rows < Rows && "TokenPrefetch: more rows than Rows");
      // integer addresses (modulo 2^64): second + c0 lies in the row for every c0 >= wrap
      if (first_ok)
        first[rows] =
            reinterpret_cast<std::uintptr_t>(at(v, target_token * rows_per_token + i, 0)) +
            std::uintptr_t(first_offset);
      if (second_ok)
        second[rows] =
            reinterpret_cast<std::uintptr_t>(at(v, (target_token + 1) * rows_per_token + i, 0)) +
            std::uintptr_t(second_offset);
    }
  }
  /// The row addresses for the block at c0 (first or second), nullptr past the last token.
  EIGEN_ALWAYS_INLINE const std::uintptr_t* rows_for(Index c0) const {
    const bool in_first = c0 < wrap;
    return (in_first ? first_ok : second_ok) ? (in_first ? first : second) : nullptr;
  }
  /// Address of the element the kernel reads the distance after column c0 in row r (in the order
  /// of add()); 0 past the last token.
  EIGEN_ALWAYS_INLINE std::uintptr_t address(int r, Index c0) const {
    const std::uintptr_t* row = rows_for(c0);
    return row != nullptr ? row[r] + std::uintptr_t(c0 * Index(sizeof(Scalar))) : 0;
  }
  /// Prefetches, in all Rows rows, the w elements that the kernel reads the distance after c0.
  EIGEN_ALWAYS_INLINE void operator()(Index c0, Index w) const {
    eigen_assert(rows == Rows && "TokenPrefetch: rows missing");
    const std::uintptr_t* row = rows_for(c0);
    if (row == nullptr) return;
    const std::uintptr_t offset = std::uintptr_t(c0 * Index(sizeof(Scalar)));
    for (int r = 0; r < Rows; ++r)
      for (Index b = 0; b < w * Index(sizeof(Scalar)); b += 64)
        prefetch<1>(reinterpret_cast<const void*>(row[r] + offset + std::uintptr_t(b)));
  }
};

/// Row index of a coefficient view that holds either one row per token or one row for all.
template <typename View>
inline Index coefficient_row(const View& v, Index t) {
  return v.rows() == 1 ? 0 : t;
}

/// Total work (roughly, elements touched) below which for_each_parallel stays on the calling
/// thread: starting a parallel region costs microseconds, far more than a small batch.
inline constexpr Index kMinParallelWork = Index(1) << 18;

/// body(i) for each i in [0, count), over threading.hpp's contiguous chunks, in parallel when
/// count * work_per_item >= kMinParallelWork. Iterations must write disjoint outputs (results then
/// do not depend on the thread count). Each chunk ends with stream_fence(), so bodies may use
/// streaming stores without a fence of their own (a fence per token stalled the short-row
/// kernels until their write-combining buffers drained: every 2 KB at C = 1024 in bf16).
template <typename F>
inline void for_each_parallel(Index count, Index work_per_item, F&& body) {
  const Index per = std::max<Index>(1, work_per_item);
  parallel_for(count, std::max<Index>(2, (kMinParallelWork + per - 1) / per),
               [&](Index begin, Index end) {
                 for (Index i = begin; i < end; ++i) body(i);
                 stream_fence();
               });
}

/// A coefficient view (h_pre, h_post, H_res): `cols` columns and T rows, or one row shared by all
/// T tokens.
template <typename View>
inline void check_coefficients(const char* where, const char* name, const View& v, Index T,
                               Index cols) {
  const Index rows = v.rows() == 1 ? 1 : T;
  if (v.rows() != rows || v.cols() != cols)
    throw_invalid(where, name, " has shape (", v.rows(), ", ", v.cols(), "), expected (", T, ", ",
                  cols, ") or (1, ", cols, ")");
  check_batch(where, name, v, rows, cols);
}

}  // namespace detail
}  // namespace mhc
