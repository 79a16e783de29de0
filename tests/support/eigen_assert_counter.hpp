// support/eigen_assert_counter.hpp: include FIRST, before any Eigen or mhc header, in a test that
// proves "no heap allocation" with EIGEN_RUNTIME_NO_MALLOC. Eigen's assertions (its "heap
// allocation is forbidden" check among them) are counted in mhc_test::g_eigen_assert_failures
// instead of aborting, and stay active in Release builds, where eigen_assert would otherwise be
// compiled out and the malloc check with it. A test compares the count before and after the
// region under test (and has a positive control that one allocation is counted).
#pragma once

#if defined(EIGEN_CORE_H)
#error "support/eigen_assert_counter.hpp must be included before any Eigen header"
#endif

#include <cstdio>

namespace mhc_test {
inline int g_eigen_assert_failures = 0;
}  // namespace mhc_test

#define eigen_assert(x)                                                                  \
  do {                                                                                   \
    if (!(x)) {                                                                          \
      ++::mhc_test::g_eigen_assert_failures;                                             \
      std::fprintf(stderr, "eigen_assert failed: %s (%s:%d)\n", #x, __FILE__, __LINE__); \
    }                                                                                    \
  } while (false)
#define EIGEN_RUNTIME_NO_MALLOC
