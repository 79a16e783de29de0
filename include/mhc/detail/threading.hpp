// detail/threading.hpp: optional OpenMP parallelism over token ranges. Without OpenMP (or for
// small ranges, or when already inside a parallel region) everything runs on the calling thread.
// The split never changes what is computed for a token, so callers' results are bitwise identical
// for any thread count as long as their `combine` is exactly associative and commutative (max,
// min, logical or) — never a floating-point sum.
#pragma once

#include "mhc/config.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mhc::detail {

/// Threads the next parallel call may use (1 without OpenMP).
inline int max_threads() {
#if defined(_OPENMP)
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

/// result = combine over threads of body(begin, end), where the ranges split [0, count) in
/// contiguous chunks; runs serially when count < min_parallel (a parallel region costs
/// microseconds, more than a few small work items).
template <typename R, typename Body, typename Combine>
R parallel_reduce(Index count, Index min_parallel, R init, Body&& body, Combine&& combine) {
  (void)min_parallel;  // only read with OpenMP
#if defined(_OPENMP)
  if (count >= min_parallel && count > 1 && max_threads() > 1) {
    R result = init;
#pragma omp parallel
    {
      const Index threads = omp_get_num_threads();
      const Index id = omp_get_thread_num();
      const Index begin = count * id / threads;
      const Index end = count * (id + 1) / threads;
      const R local = begin < end ? body(begin, end) : init;
#pragma omp critical(mhc_parallel_reduce)
      result = combine(result, local);
    }
    return result;
  }
#endif
  return combine(init, body(Index(0), count));
}

/// body(begin, end) over contiguous chunks of [0, count), in parallel when count >= min_parallel.
template <typename Body>
void parallel_for(Index count, Index min_parallel, Body&& body) {
  parallel_reduce(
      count, min_parallel, 0,
      [&](Index begin, Index end) {
        body(begin, end);
        return 0;
      },
      [](int, int) { return 0; });
}

}  // namespace mhc::detail
