// detail/check.hpp: argument validation shared by the host entry points. Every check throws
// mhc::invalid_argument with the entry point, the argument's name and the sizes involved, and all
// of them run before an operator writes its first output element.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "mhc/config.hpp"
#include "mhc/types.hpp"

namespace mhc::detail {

inline void check_streams(const char* where, int n) {
  if (n < 1 || n > kMaxStreams)
    throw_invalid(where, "n = ", n, " is out of range [1, ", kMaxStreams, "]");
}

template <int N>
inline void check_static_streams(const char* where, int n) {
  static_assert(N == Dynamic || (N >= 1 && N <= kMaxStreams), "mhc: N must be in [1, kMaxStreams]");
  check_streams(where, n);
  if (N != Dynamic && n != N)
    throw_invalid(where, "n = ", n, " does not match the compile-time N = ", N);
}

/// A block's buffers: tokens >= 0, 1 <= n <= kMaxStreams, C >= 1.
inline void check_block_shape(const char* where, Index tokens, int n, Index C) {
  if (tokens < 0) throw_invalid(where, "tokens = ", tokens, " < 0");
  check_streams(where, n);
  if (C < 1) throw_invalid(where, "C = ", C, " must be positive");
}

/// `view` must be rows x cols, non-null when non-empty, aligned for its scalar, rows not
/// overlapping (outer stride >= cols).
template <typename View>
inline void check_batch(const char* where, const char* name, const View& view, Index rows,
                        Index cols) {
  using Scalar = typename View::Scalar;
  if (view.rows() != rows || view.cols() != cols)
    throw_invalid(where, name, " has shape (", view.rows(), ", ", view.cols(), "), expected (",
                  rows, ", ", cols, ")");
  if (rows == 0 || cols == 0) return;
  if (view.data() == nullptr) throw_invalid(where, name, " is null but has ", rows * cols, " elements");
  if (reinterpret_cast<std::uintptr_t>(view.data()) % alignof(Scalar) != 0)
    throw_invalid(where, name, " is not aligned to ", alignof(Scalar), " bytes");
  if (rows > 1 && view.outerStride() < cols)
    throw_invalid(where, name, " has row stride ", view.outerStride(), " smaller than its ", cols,
                  " columns");
}

/// Byte range [first, last) touched by a row-major view.
template <typename View>
inline std::pair<std::uintptr_t, std::uintptr_t> byte_range(const View& v) {
  using Scalar = typename View::Scalar;
  const auto begin = reinterpret_cast<std::uintptr_t>(v.data());
  if (v.rows() == 0 || v.cols() == 0) return {begin, begin};
  const auto count = static_cast<std::uintptr_t>((v.rows() - 1) * v.outerStride() + v.cols());
  return {begin, begin + count * sizeof(Scalar)};
}

template <typename A, typename B>
inline bool overlaps(const A& a, const B& b) {
  const auto ra = byte_range(a);
  const auto rb = byte_range(b);
  if (ra.first == ra.second || rb.first == rb.second) return false;
  return ra.first < rb.second && rb.first < ra.second;
}

/// Forbids `out` from sharing any byte with `in`.
template <typename Out, typename In>
inline void check_no_overlap(const char* where, const char* out_name, const Out& out,
                             const char* in_name, const In& in) {
  if (overlaps(out, in))
    throw_invalid(where, out_name, " overlaps ", in_name, "; in-place use is not supported here");
}

/// Allows `out` to be exactly `in` (same pointer, same stride) but no partial overlap.
template <typename Out, typename In>
inline void check_same_or_disjoint(const char* where, const char* out_name, const Out& out,
                                   const char* in_name, const In& in) {
  const bool identical = static_cast<const void*>(out.data()) == static_cast<const void*>(in.data()) &&
                         out.outerStride() == in.outerStride();
  if (!identical && overlaps(out, in))
    throw_invalid(where, out_name, " partially overlaps ", in_name,
                  "; it must be the same buffer (same stride) or disjoint");
}

/// A contiguous vector of `size` elements, non-null and aligned for its scalar when non-empty.
template <typename View>
inline void check_vector(const char* where, const char* name, const View& v, Index size) {
  using Scalar = std::remove_const_t<std::remove_pointer_t<decltype(v.data())>>;
  if (v.size() != size) throw_invalid(where, name, " has ", v.size(), " elements, expected ", size);
  if (size == 0) return;
  if (v.data() == nullptr) throw_invalid(where, name, " is null but has ", size, " elements");
  if (reinterpret_cast<std::uintptr_t>(v.data()) % alignof(Scalar) != 0)
    throw_invalid(where, name, " is not aligned to ", alignof(Scalar), " bytes");
}

/// Byte range of a contiguous vector view, for the overlap checks.
template <typename Vec>
struct VectorBytes {
  using Scalar = typename Vec::Scalar;
  const Vec& v;
  const Scalar* data() const { return v.data(); }
  Index rows() const { return v.size(); }
  Index cols() const { return 1; }
  Index outerStride() const { return 1; }
};
template <typename Vec>
inline VectorBytes<Vec> vector_bytes(const Vec& v) {
  return {v};
}

template <typename View>
inline void check_finite(const char* where, const char* name, const View& v) {
  for (Index r = 0; r < v.rows(); ++r)
    for (Index c = 0; c < v.cols(); ++c)
      if (!std::isfinite(static_cast<double>(v(r, c))))
        throw_invalid(where, name, "(", r, ", ", c, ") is not finite");
}

}  // namespace mhc::detail
