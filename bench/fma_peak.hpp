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

/// Independent FMA chains per thread: 16, enough to cover the FMA latency on two or more pipes;
/// 12 on x86-64 without AVX-512, whose 16 vector registers must also hold the two constants.
/// There, 16 chains left a and b no register, and g++ 12 reloaded spilled chains from the stack
/// inside the loop: on a Zen 3 VM the peak read 55 GFLOP/s on one thread where the 12-chain loop
/// below reads 95-101, and the Coefficients forward "ran" at 1.07 of it.
#if defined(__AVX512F__) || !(defined(__x86_64__) || defined(__i386__))
inline constexpr int kFmaChains = 16;
#else
inline constexpr int kFmaChains = 12;
#endif

/// One thread's `iters` rounds of kFmaChains independent FMA chains acc = a acc + b (Eigen's
/// widest float packet). On x86-64 with AVX-512, or AVX2 and FMA, the loop is written out in
/// assembly and starts on a 64-byte boundary, its loop-closing branch placed so that it neither
/// crosses nor ends on a 32-byte boundary. Compiled from C++, the loop's placement followed the
/// code around it, and on Skylake-family cores with the JCC-erratum microcode such a branch is not
/// cached in the decoded-uop cache: the build of 09ea8dd had its jne end at such a boundary and
/// read 190-200 GFLOP/s on 2 threads of the Cascade Lake VM where a build with the same loop 16
/// bytes later read 265-270 (three alternating runs of `--benchmark_filter=fma_peak`), so its
/// peak, and the Coefficients rows' vs_fma_peak and vs_roofline, depended on the link layout
/// (docs/performance_log.md). AVX-512: 16 six-byte vfmadd213ps fill [0, 96), the fused dec/jnz
/// [96, 101). AVX2: 12 five-byte vfmadd213ps fill [0, 60), a four-byte nop, dec/jnz [64, 69).
/// Elsewhere the C++ loop runs unrolled eight times, so its one branch comes once per 8 rounds.
inline float fma_chains(long iters) {
  using Packet = Eigen::internal::packet_traits<float>::type;
  Packet acc[kFmaChains];
  for (int k = 0; k < kFmaChains; ++k) acc[k] = Eigen::internal::pset1<Packet>(float(k));
  const Packet a = Eigen::internal::pset1<Packet>(0.999999f),
               b = Eigen::internal::pset1<Packet>(1e-7f);
#if defined(__AVX512F__) && defined(__GNUC__) && defined(__x86_64__)
  static_assert(sizeof(Packet) == 64 && kFmaChains == 16, "16 zmm chains");
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
#elif defined(__AVX2__) && defined(__FMA__) && defined(__GNUC__) && defined(__x86_64__)
  static_assert(sizeof(Packet) == 32 && kFmaChains == 12, "12 ymm chains");
  if (iters > 0) {  // ymm0-11: the chains, ymm12: a, ymm13: b
    long left = iters;
    __asm__ __volatile__(
        ".irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11\n\t"
        "vmovups \\k * 32(%[acc]), %%ymm\\k\n\t"
        ".endr\n\t"
        "vmovups (%[a]), %%ymm12\n\t"
        "vmovups (%[b]), %%ymm13\n\t"
        ".p2align 6\n"
        "1:\n\t"
        ".irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11\n\t"
        "vfmadd213ps %%ymm13, %%ymm12, %%ymm\\k\n\t"
        ".endr\n\t"
        ".byte 0x0f, 0x1f, 0x40, 0x00\n\t"  // nopl 0(%rax): dec/jnz start at byte 64
        "dec %[left]\n\t"
        "jnz 1b\n\t"
        ".irp k, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11\n\t"
        "vmovups %%ymm\\k, \\k * 32(%[acc])\n\t"
        ".endr\n\t"
        : [left] "+r"(left), "=m"(acc)
        : [acc] "r"(acc), [a] "r"(&a), [b] "r"(&b), "m"(acc), "m"(a), "m"(b)
        : "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13");
  }
#else
#if defined(__clang__)
#pragma clang loop unroll_count(8)
#elif defined(__GNUC__)
#pragma GCC unroll 8
#endif
  for (long i = 0; i < iters; ++i) {
    for (int k = 0; k < kFmaChains; ++k) acc[k] = Eigen::internal::pmadd(acc[k], a, b);
  }
#endif
  float sink = 0;
  for (int k = 0; k < kFmaChains; ++k) sink += Eigen::internal::predux(acc[k]);
  return sink;
}

/// Seconds for `iters` rounds of fma_chains on each of `threads` threads: 2 x kFmaChains x
/// packet size x iters flops per thread.
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
    best = std::max(best, double(threads) * iters * kFmaChains * 2 * kSize /
                               fma_seconds(threads, iters));
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
