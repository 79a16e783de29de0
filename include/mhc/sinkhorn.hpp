// sinkhorn.hpp: batched Sinkhorn-Knopp projection onto the doubly stochastic matrices
// (spec section 2.5, paper Eq. 9) and its exact backward, on the CPU.
//
//   logits (T, n*n)  ->  out (T, n*n)       one row-major n x n matrix per token
//
// The map is the t_max-step iteration of detail/sinkhorn_kernel.hpp: clamped stable exp, then
// t_max rounds of column then row normalisation, so rows sum to 1 to rounding and columns to
// within the truncation error (reported on request). The backward is the exact vector-Jacobian
// product of those t_max steps: it recomputes the iterates from the logits (nothing is cached
// between forward and backward) and keeps only the per-round sums of the matrices in flight.
//
// SIMD: matrices are processed in tiles of kTile tokens held structure-of-arrays (element k of
// the tile is one Eigen::Array of kTile lanes), so every operation is a vector operation across
// tokens. A partial last tile is padded, so a token's result never depends on its position.
// Threading: with OpenMP, tiles are split over threads; every tile's arithmetic is independent of
// the thread count, so results are bitwise identical for any number of threads.
//
// NaN/Inf: a NaN logit makes every entry of its own matrix NaN (other matrices are unaffected);
// +Inf behaves like NaN; -Inf entries act as exp() = tiny (the clamp). Finite logits of any size
// (e.g. +-1e4 in float) give finite, nonnegative results.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>

#include "mhc/config.hpp"
#include "mhc/detail/check.hpp"
#include "mhc/detail/sinkhorn_kernel.hpp"
#include "mhc/detail/threading.hpp"
#include "mhc/types.hpp"

namespace mhc {

/// Options of the Sinkhorn projection (paper Table 5 defaults).
struct SinkhornOptions {
  int iterations = 20;  ///< t_max: column-then-row rounds, in [1, kMaxSinkhornIterations]
};

/// What a forward achieved over the batch, in the compute type before rounding to storage.
struct SinkhornReport {
  double max_column_error = 0.0;  ///< max over matrices of max_j |sum_i M[i][j] - 1|
  double max_row_error = 0.0;     ///< max over matrices of max_i |sum_j M[i][j] - 1|
};

namespace detail {

/// Rounds of sums the batched backward keeps per matrix before it recomputes in chunks.
inline constexpr int kSinkhornSumsCapacity = 32;

/// Tokens per tile. Small matrices (n <= 4) use two SIMD registers of lanes, enough independent
/// work to hide the division latency while the tile (A, M, gradients, sums) stays in L1; larger
/// ones, and batches smaller than a wide tile, use one register (`wide` = false) so that neither
/// the cache nor a single matrix pays for unused lanes. Lane arithmetic is identical for every
/// width, bit for bit, so the choice never changes a result.
template <typename Compute, int N, bool wide = true>
constexpr int sinkhorn_tile_width() {
  return (wide && N <= 4 ? 2 : 1) * Eigen::internal::packet_traits<Compute>::size;
}

inline double nan_max(double a, double b) { return (b > a || std::isnan(b)) ? b : a; }

/// Rows [first, first + count) of `src` into a structure-of-arrays tile (count <= W; the rest
/// of the lanes get logits 0: a well-conditioned padding whose results are never stored).
template <int NN, typename Lane, typename Src>
inline void load_tile(const Src& src, Index first, Index count, int nn, Lane* tile) {
  using C = typename Lane::Scalar;
  for (int k = 0; k < nn; ++k) tile[k].setZero();
  for (Index l = 0; l < count; ++l) {
    const auto* row = src.data() + (first + l) * src.outerStride();
    for (int k = 0; k < nn; ++k) tile[k][l] = static_cast<C>(row[k]);
  }
}

template <typename Lane, typename Dst>
inline void store_tile(const Lane* tile, Index first, Index count, int nn, Dst& dst) {
  using S = typename Dst::Scalar;
  for (Index l = 0; l < count; ++l) {
    auto* row = dst.data() + (first + l) * dst.outerStride();
    for (int k = 0; k < nn; ++k) row[k] = static_cast<S>(tile[k][l]);
  }
}

template <typename Scalar>
inline int sinkhorn_check(const char* where, int N, Index cols, const SinkhornOptions& opt) {
  int n = N;
  if (N == Dynamic) {
    n = static_cast<int>(std::lround(std::sqrt(static_cast<double>(cols))));
    if (static_cast<Index>(n) * n != cols)
      throw_invalid(where, "logits have ", cols, " columns, which is not n*n for any n");
  } else if (cols != static_cast<Index>(N) * N) {
    throw_invalid(where, "logits have ", cols, " columns, expected n*n = ", N * N);
  }
  check_streams(where, n);
  if (opt.iterations < 1 || opt.iterations > kMaxSinkhornIterations)
    throw_invalid(where, "iterations = ", opt.iterations, " is out of range [1, ",
                  kMaxSinkhornIterations, "]");
  return n;
}

/// Tiles below this count (about 50 us of work at n = 4) run on the calling thread: waking a
/// second thread costs microseconds when it is idle and far more when its core is busy.
inline constexpr Index kSinkhornMinParallelTiles = 64;

struct ErrorPair {
  double col = 0.0, row = 0.0;
};
inline ErrorPair max_errors(ErrorPair a, ErrorPair b) {
  return {nan_max(a.col, b.col), nan_max(a.row, b.row)};
}

/// Forward over all tiles for a compile-time N (N > 0) and tile width W; returns the errors.
template <int N, int W, typename Scalar>
SinkhornReport sinkhorn_forward_tiles(const ConstBatchRef<Scalar>& logits, BatchRef<Scalar>& out,
                                      int iterations, bool want_report) {
  using C = compute_t<Scalar>;
  constexpr int NN = N * N;
  using Lane = Eigen::Array<C, W, 1>;
  const Index T = logits.rows();
  const Index tiles = (T + W - 1) / W;
  const ErrorPair errors = parallel_reduce(
      tiles, kSinkhornMinParallelTiles, ErrorPair{},
      [&](Index tile_begin, Index tile_end) {
        ErrorPair local;
        Lane A[NN], M[NN];
        for (Index tile = tile_begin; tile < tile_end; ++tile) {
          const Index first = tile * W;
          const Index count = std::min<Index>(W, T - first);
          load_tile<NN>(logits, first, count, NN, A);
          sinkhorn_forward_kernel<N>(N, iterations, A, M, static_cast<Lane*>(nullptr));
          if (want_report) {
            for (int a = 0; a < N; ++a) {
              Lane cs = M[a], rs = M[a * N];
              for (int b = 1; b < N; ++b) {
                cs += M[b * N + a];
                rs += M[a * N + b];
              }
              for (Index l = 0; l < count; ++l) {
                local.col = nan_max(local.col, std::abs(static_cast<double>(cs[l]) - 1.0));
                local.row = nan_max(local.row, std::abs(static_cast<double>(rs[l]) - 1.0));
              }
            }
          }
          store_tile(M, first, count, NN, out);
        }
        return local;
      },
      max_errors);
  return {errors.col, errors.row};
}

template <int N, int W, typename Scalar>
void sinkhorn_backward_tiles(const ConstBatchRef<Scalar>& logits, const ConstBatchRef<Scalar>& d_out,
                             BatchRef<Scalar>& d_logits, int iterations) {
  using C = compute_t<Scalar>;
  constexpr int NN = N * N;
  using Lane = Eigen::Array<C, W, 1>;
  const Index T = logits.rows();
  const Index tiles = (T + W - 1) / W;
  parallel_for(tiles, kSinkhornMinParallelTiles, [&](Index tile_begin, Index tile_end) {
    Lane A[NN], M[NN], G[NN], sums[2 * kSinkhornSumsCapacity * N];
    for (Index tile = tile_begin; tile < tile_end; ++tile) {
      const Index first = tile * W;
      const Index count = std::min<Index>(W, T - first);
      load_tile<NN>(logits, first, count, NN, A);
      load_tile<NN>(d_out, first, count, NN, G);
      sinkhorn_backward_from_logits<N, kSinkhornSumsCapacity>(N, iterations, A, M, sums, G);
      store_tile(G, first, count, NN, d_logits);
    }
  });
}

template <int N, typename Scalar>
SinkhornReport sinkhorn_forward_fixed(const ConstBatchRef<Scalar>& logits, BatchRef<Scalar>& out,
                                      int iterations, bool want_report) {
  using C = compute_t<Scalar>;
  constexpr int wide = sinkhorn_tile_width<C, N, true>();
  constexpr int narrow = sinkhorn_tile_width<C, N, false>();
  return logits.rows() >= wide
             ? sinkhorn_forward_tiles<N, wide, Scalar>(logits, out, iterations, want_report)
             : sinkhorn_forward_tiles<N, narrow, Scalar>(logits, out, iterations, want_report);
}

template <int N, typename Scalar>
void sinkhorn_backward_fixed(const ConstBatchRef<Scalar>& logits, const ConstBatchRef<Scalar>& d_out,
                             BatchRef<Scalar>& d_logits, int iterations) {
  using C = compute_t<Scalar>;
  constexpr int wide = sinkhorn_tile_width<C, N, true>();
  constexpr int narrow = sinkhorn_tile_width<C, N, false>();
  if (logits.rows() >= wide)
    sinkhorn_backward_tiles<N, wide, Scalar>(logits, d_out, d_logits, iterations);
  else
    sinkhorn_backward_tiles<N, narrow, Scalar>(logits, d_out, d_logits, iterations);
}

/// Runtime-n path for n beyond the compile-time dispatch: one matrix at a time, scalar lanes.
template <typename Scalar>
SinkhornReport sinkhorn_forward_rows(const ConstBatchRef<Scalar>& logits, BatchRef<Scalar>& out,
                                     int n, int iterations, bool want_report) {
  using C = compute_t<Scalar>;
  const int nn = n * n;
  const ErrorPair errors = parallel_reduce(
      logits.rows(), kSinkhornMinParallelTiles, ErrorPair{},
      [&](Index t_begin, Index t_end) {
        ErrorPair local;
        C A[kMaxStreams * kMaxStreams], M[kMaxStreams * kMaxStreams];
        for (Index t = t_begin; t < t_end; ++t) {
          for (int k = 0; k < nn; ++k) A[k] = static_cast<C>(logits(t, k));
          sinkhorn_forward_kernel<Dynamic>(n, iterations, A, M, static_cast<C*>(nullptr));
          if (want_report) {
            C ce, re;
            doubly_stochastic_error<Dynamic>(n, M, &ce, &re);
            local = max_errors(local, {static_cast<double>(ce), static_cast<double>(re)});
          }
          for (int k = 0; k < nn; ++k) out(t, k) = static_cast<Scalar>(M[k]);
        }
        return local;
      },
      max_errors);
  return {errors.col, errors.row};
}

template <typename Scalar>
void sinkhorn_backward_rows(const ConstBatchRef<Scalar>& logits, const ConstBatchRef<Scalar>& d_out,
                            BatchRef<Scalar>& d_logits, int n, int iterations) {
  using C = compute_t<Scalar>;
  const int nn = n * n;
  parallel_for(logits.rows(), kSinkhornMinParallelTiles, [&](Index t_begin, Index t_end) {
    C A[kMaxStreams * kMaxStreams], M[kMaxStreams * kMaxStreams], G[kMaxStreams * kMaxStreams];
    C sums[2 * kSinkhornSumsCapacity * kMaxStreams];
    for (Index t = t_begin; t < t_end; ++t) {
      for (int k = 0; k < nn; ++k) {
        A[k] = static_cast<C>(logits(t, k));
        G[k] = static_cast<C>(d_out(t, k));
      }
      sinkhorn_backward_from_logits<Dynamic, kSinkhornSumsCapacity>(n, iterations, A, M, sums, G);
      for (int k = 0; k < nn; ++k) d_logits(t, k) = static_cast<Scalar>(G[k]);
    }
  });
}

/// Calls f(std::integral_constant<int, N>) for the runtime n when 1 <= n <= 8, else returns false.
template <typename F>
bool dispatch_streams(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); return true;
    case 2: f(std::integral_constant<int, 2>{}); return true;
    case 3: f(std::integral_constant<int, 3>{}); return true;
    case 4: f(std::integral_constant<int, 4>{}); return true;
    case 5: f(std::integral_constant<int, 5>{}); return true;
    case 6: f(std::integral_constant<int, 6>{}); return true;
    case 7: f(std::integral_constant<int, 7>{}); return true;
    case 8: f(std::integral_constant<int, 8>{}); return true;
    default: return false;
  }
}

}  // namespace detail

/// Sinkhorn-Knopp projection of a batch of n x n logit matrices, n = N at compile time
/// (N = Dynamic: n is read from the logits' column count, n*n).
///   Scalar: float, double or mhc::bf16 storage; arithmetic in compute_t<Scalar>.
template <typename Scalar, int N = 4>
struct Sinkhorn {
  static_assert(N == Dynamic || (N >= 1 && N <= kMaxStreams), "mhc::Sinkhorn: N out of range");
  static constexpr int kN = N;
  using Compute = compute_t<Scalar>;

  /// out = SK(logits), both (T, n*n). `out` may be the same buffer as `logits` (in place) but
  /// must not partially overlap it. Fills *report with the achieved errors when report != null.
  /// Throws mhc::invalid_argument (before writing anything) on bad shapes, null/misaligned
  /// buffers, partial overlap, or iterations out of range.
  static void forward(const ConstBatchRef<Scalar>& logits, BatchRef<Scalar> out,
                      const SinkhornOptions& options = {}, SinkhornReport* report = nullptr) {
    constexpr const char* where = "Sinkhorn::forward";
    const int n = detail::sinkhorn_check<Scalar>(where, N, logits.cols(), options);
    detail::check_batch(where, "logits", logits, logits.rows(), Index(n) * n);
    detail::check_batch(where, "out", out, logits.rows(), Index(n) * n);
    detail::check_same_or_disjoint(where, "out", out, "logits", logits);
    SinkhornReport achieved;
    const bool want = report != nullptr;
    if constexpr (N != Dynamic) {
      achieved = detail::sinkhorn_forward_fixed<N, Scalar>(logits, out, options.iterations, want);
    } else {
      const bool fixed = detail::dispatch_streams(n, [&](auto nc) {
        achieved = detail::sinkhorn_forward_fixed<decltype(nc)::value, Scalar>(
            logits, out, options.iterations, want);
      });
      if (!fixed)
        achieved = detail::sinkhorn_forward_rows<Scalar>(logits, out, n, options.iterations, want);
    }
    if (report) *report = achieved;
  }

  /// d_logits = (dSK/dlogits)^T d_out: the exact vector-Jacobian product of the t_max-step map
  /// that forward computes with the same options. All three are (T, n*n); d_logits may be the
  /// same buffer as d_out (not as logits). Iterates are recomputed from the logits.
  static void backward(const ConstBatchRef<Scalar>& logits, const ConstBatchRef<Scalar>& d_out,
                       BatchRef<Scalar> d_logits, const SinkhornOptions& options = {}) {
    constexpr const char* where = "Sinkhorn::backward";
    const int n = detail::sinkhorn_check<Scalar>(where, N, logits.cols(), options);
    detail::check_batch(where, "logits", logits, logits.rows(), Index(n) * n);
    detail::check_batch(where, "d_out", d_out, logits.rows(), Index(n) * n);
    detail::check_batch(where, "d_logits", d_logits, logits.rows(), Index(n) * n);
    detail::check_no_overlap(where, "d_logits", d_logits, "logits", logits);
    detail::check_same_or_disjoint(where, "d_logits", d_logits, "d_out", d_out);
    if constexpr (N != Dynamic) {
      detail::sinkhorn_backward_fixed<N, Scalar>(logits, d_out, d_logits, options.iterations);
    } else {
      const bool fixed = detail::dispatch_streams(n, [&](auto nc) {
        detail::sinkhorn_backward_fixed<decltype(nc)::value, Scalar>(logits, d_out, d_logits,
                                                                     options.iterations);
      });
      if (!fixed) detail::sinkhorn_backward_rows<Scalar>(logits, d_out, d_logits, n, options.iterations);
    }
  }
};

using Sinkhorn4f = Sinkhorn<float, 4>;
using Sinkhorn4d = Sinkhorn<double, 4>;
using SinkhornXf = Sinkhorn<float, Dynamic>;
using SinkhornXd = Sinkhorn<double, Dynamic>;

}  // namespace mhc
