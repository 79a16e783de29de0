// bench/fma_peak.hpp: the FMA peak the benchmarks compare the coefficient kernels with, measured
// in the same binary and process (bench_operators, bench_kernels).
#pragma once

#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <map>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace mhc_bench {

/// One thread's `iters` rounds of 16 independent FMA chains acc = a acc + b (Eigen's widest float
/// packet). With AVX-512 on x86-64 the loop is written out in assembly and starts on a 64-byte
/// boundary: its 16 six-byte vfmadd213ps fill [0, 96) and the fused dec/jnz [96, 101), so the
/// branch neither crosses nor ends on a 32-byte boundary. Compiled from C++, the loop's placement
/// followed the code around it, and on Skylake-family cores with the JCC-erratum microcode a
/// branch that crosses or ends on a 32-byte boundary is not cached in the decoded-uop cache: the
/// build of 09ea8dd had its jne end at such a boundary and read 190-200 GFLOP/s on 2 threads of
/// the Cascade Lake VM where a build with the same loop 16 bytes later read 265-270 (three
/// alternating runs of `--benchmark_filter=fma_peak`), so its peak, and the Coefficients rows'
/// vs_fma_peak and vs_roofline, depended on the link layout (docs/performance_log.md). Elsewhere
/// the C++ loop runs unrolled eight times, so its one branch comes once per 128 FMAs.
inline float fma_chains(long iters) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  Packet acc[16];
  for (int k = 0; k < 16; ++k) acc[k] = Eigen::internal::pset1<Packet>(float(k));
  const Packet a = Eigen::internal::pset1<Packet>(0.999999f),
               b = Eigen::internal::pset1<Packet>(1e-7f);
#if defined(__AVX512F__) && defined(__GNUC__) && defined(__x86_64__)
  static_assert(sizeof(Packet) == 64, "the widest float packet is a zmm register");
  if (iters > 0) {  // zmm0-15: the chains, zmm16: a, zmm17: b
    long left = iters;
    __asm__ __volatile__(
        ".irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15\n\t"
        "vmovups \\k * 64(%[acc]), %%zmm\\k\n\t"
        ".endr\n\t"
        "vmovups (%[a]), %%zmm16\n\t"
        "vmovups (%[b]), %%zmm17\n\t"
        ".p2align 6\n"
        "1:\n\t"
        ".irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15\n\t"
        "vfmadd213ps %%zmm17, %%zmm16, %%zmm\\k\n\t"
        ".endr\n\t"
        "dec %[left]\n\t"
        "jnz 1b\n\t"
        ".irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15\n\t"
        "vmovups %%zmm\\k, \\k * 64(%[acc])\n\t"
        ".endr\n\t"
        : [left] "+r"(left), "=m"(acc)
        : [acc] "r"(acc), [a] "r"(&a), [b] "r"(&b), "m"(acc), "m"(a), "m"(b)
        : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17");
  }
#else
#if defined(__clang__)
#pragma clang loop unroll_count(8)
#elif defined(__GNUC__)
#pragma GCC unroll 8
#endif
  for (long i = 0; i < iters; ++i) {
    for (int k = 0; k < 16; ++k) acc[k] = Eigen::internal::pmadd(acc[k], a, b);
  }
#endif
  float sink = 0;
  for (int k = 0; k < 16; ++k) sink += Eigen::internal::predux(acc[k]);
  return sink;
}

/// Seconds for `iters` rounds of fma_chains on each of `threads` threads: 32 x packet size x
/// iters flops per thread.
inline double fma_seconds(int threads, long iters) {
  const auto t0 = std::chrono::steady_clock::now();
  float sink = 0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(+ : sink)
#else
  (void)threads;  // one thread without OpenMP
#endif
  sink += fma_chains(iters);
  benchmark::DoNotOptimize(sink);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// The FMA rate (flop/s) of `threads` threads over `iters` rounds, best of `reps` measurements.
inline double fma_rate(int threads, long iters, int reps) {
  constexpr int kSize = Eigen::internal::packet_traits<float>::size;
  double best = 0;
  for (int rep = 0; rep < reps; ++rep)
    best = std::max(best, double(threads) * iters * 16 * 2 * kSize / fma_seconds(threads, iters));
  return best;
}

/// The FMA peak reported by the fma_peak rows: best of 3 measurements of 2^25 rounds (about 0.3 s
/// each), taken once per thread count at the start of the run.
inline double fma_peak(int threads) {
  static std::map<int, double> cache;
  if (auto it = cache.find(threads); it != cache.end()) return it->second;
  return cache[threads] = fma_rate(threads, 1L << 25, 3);
}

/// The FMA peak next to one timed iteration (bench_operators' Coefficients rows, every
/// bench_kernels row): best of 2 measurements of 2^18
/// rounds (about 1 ms each on the benchmark machine). On the shared VM the FMA rate at the start
/// of a run moved between 93 and 152 GFLOP/s on 1 thread and 152 and 302 on 2 within minutes
/// (docs/performance_log.md; some of that spread was the loop's placement, see fma_chains), so a
/// peak taken once at the start misstates what the same cores could do while the operator ran.
inline double fma_peak_now(int threads) { return fma_rate(threads, 1L << 18, 2); }

}  // namespace mhc_bench
