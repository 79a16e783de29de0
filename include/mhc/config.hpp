// mhc — Manifold-Constrained Hyper-Connections, header-only.
// config.hpp: version, host/device annotation, assertion and error types shared by every header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#define MHC_VERSION_MAJOR 0
#define MHC_VERSION_MINOR 1
#define MHC_VERSION_PATCH 0

// MHC_HOST_DEVICE marks the small per-token maths (Sinkhorn step, gates, their backward) that
// compiles under both the host compiler and nvcc, so CPU and GPU share one definition.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define MHC_HOST_DEVICE __host__ __device__ __forceinline__
#define MHC_DEVICE_COMPILE 1
#else
#define MHC_HOST_DEVICE inline
#endif

#if defined(__CUDA_ARCH__)
#define MHC_ON_DEVICE 1
#endif

// MHC_ASSERT guards internal invariants (never user input: that raises mhc::invalid_argument).
// Define it before including any mhc header to route it elsewhere; by default it is active
// unless NDEBUG is set.
#ifndef MHC_ASSERT
#if defined(NDEBUG) || defined(MHC_ON_DEVICE)
#define MHC_ASSERT(cond, msg) ((void)0)
#else
#include <cstdio>
#include <cstdlib>
#define MHC_ASSERT(cond, msg)                                                         \
  ((cond) ? (void)0                                                                   \
          : (std::fprintf(stderr, "mhc: internal assertion '%s' failed at %s:%d: %s\n", \
                          #cond, __FILE__, __LINE__, msg),                            \
             std::abort()))
#endif
#endif

namespace mhc {

/// Index type for token counts, widths and strides (signed, like Eigen::Index).
using Index = std::ptrdiff_t;

/// Marks a size that is only known at run time (compare Eigen::Dynamic).
inline constexpr int Dynamic = -1;

/// Largest number of residual streams the CPU operators accept (1 <= n <= kMaxStreams).
inline constexpr int kMaxStreams = 16;

/// Largest Sinkhorn iteration count (t_max) accepted. The batched backward keeps the per-round
/// sums of up to 32 rounds per matrix in flight; past that it recomputes in chunks (time grows
/// quadratically), so this bound also keeps a mistyped t_max from stalling a run.
inline constexpr int kMaxSinkhornIterations = 256;

/// Thrown by every host entry point on invalid arguments (shape mismatch, null or overlapping
/// buffers, n or t_max out of range, forbidden NaN/Inf). Outputs are left untouched when it is
/// thrown: all checks run before the first write.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

template <typename... Parts>
[[noreturn]] inline void throw_invalid(const char* where, const Parts&... parts) {
  std::ostringstream os;
  os << "mhc::" << where << ": ";
  (os << ... << parts);
  throw ::mhc::invalid_argument(os.str());
}

}  // namespace detail
}  // namespace mhc
