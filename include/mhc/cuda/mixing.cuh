// mhc/cuda/mixing.cuh: the two stream mixes of an mHC layer on the GPU, forward and backward
// (spec sections 2.6, 2.7 and 3), per token t with X (n, C), coefficients from
// coefficients_forward:
//   pre-mix   u = h_pre^T X                     u[c] = sum_i h_pre[i] X[i][c]          (Eq. 3)
//   update    X' = H_res X + h_post y^T         X'[i][c] = sum_j H_res[i][j] X[j][c] + h_post[i] y[c]
//   backward  pre-mix: dX += h_pre du^T, dh_pre = X du
//             update:  dX += H_res^T G, dH_res = G X^T, dh_post = G y, dy = G^T h_post
// The forwards are one pass each (read X (and y), write u / X'). The backwards reduce over C per
// token: split over channels into partials, then summed per token in split order.
#pragma once

#include "mhc/cuda/common.cuh"

namespace mhc::cuda {
namespace detail {

/// u[t][c] = sum_i h_pre[t][i] X[t][i][c]; one thread per (token, VEC channels).
template <int N, int VEC, typename S>
__global__ void __launch_bounds__(256)
    pre_mix_forward_kernel(int n_rt, Index T, Index C, const S* __restrict__ X, Index ldx,
                           const float* __restrict__ h_pre, S* __restrict__ u, Index ldu) {
  pdl_wait();
  constexpr int NM = max_streams_v<N>;
  const int n = N > 0 ? N : n_rt;
  const Index nv = C / VEC, total = T * nv;
  for (Index k = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index t = k / nv, c = (k % nv) * VEC;
    float acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      if (i < n) {
        float x[VEC];
        load_vec<VEC>(X + (t * n + i) * ldx + c, x);
        const float h = __ldg(h_pre + t * n + i);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += h * x[e];
      }
    }
    store_vec<VEC>(u + t * ldu + c, acc);
  }
}

/// X'[t][i][c] = sum_j H_res[t][i][j] X[t][j][c] + h_post[t][i] y[t][c]; one thread per (token,
/// VEC channels) for all n streams, so X' may be X itself.
template <int N, int VEC, typename S>
__global__ void __launch_bounds__(256)
    update_forward_kernel(int n_rt, Index T, Index C, const S* X, Index ldx,
                          const S* __restrict__ y, Index ldy, const float* __restrict__ h_post,
                          const float* __restrict__ H_res, S* X_out, Index ldo) {
  pdl_wait();
  constexpr int NM = max_streams_v<N>;
  const int n = N > 0 ? N : n_rt;
  const Index nv = C / VEC, total = T * nv;
  for (Index k = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index t = k / nv, c = (k % nv) * VEC;
    float x[NM][VEC], yv[VEC];
#pragma unroll
    for (int j = 0; j < NM; ++j)
      if (j < n) load_vec<VEC>(X + (t * n + j) * ldx + c, x[j]);
    load_vec<VEC>(y + t * ldy + c, yv);
    const float* H = H_res + t * n * n;
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      if (i < n) {
        const float hp = __ldg(h_post + t * n + i);
        float o[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[e] = hp * yv[e];
#pragma unroll
        for (int j = 0; j < NM; ++j) {
          if (j < n) {
            const float hij = __ldg(H + i * n + j);
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[e] += hij * x[j][e];
          }
        }
        store_vec<VEC>(X_out + (t * n + i) * ldo + c, o);
      }
    }
  }
}

inline constexpr int kRowThreads = 128;  // threads of the per-token reduction kernels

/// Channel range [v_begin, v_end) of split sp out of `splits` over nv vectors.
__device__ __forceinline__ void split_range(Index nv, int splits, int sp, Index& v_begin,
                                            Index& v_end) {
  const Index per = (nv + splits - 1) / splits;
  v_begin = sp * per;
  v_end = v_begin + per < nv ? v_begin + per : nv;
}

/// Update backward, one block per (token, split): dy = G^T h_post (written), partials of
/// dh_post = G y and dH_res = G X^T to part[sp][t][n + n^2] (with one split, the sums themselves
/// to d_h_post, d_H_res); with dX non-null also
/// dX = (accumulate ? dX : 0) + H_res^T G.
template <int N, int VEC, typename S>
__global__ void __launch_bounds__(kRowThreads)
    update_backward_kernel(int n_rt, Index T, Index C, const S* __restrict__ G, Index ldg,
                           const S* __restrict__ X, Index ldx, const S* __restrict__ y, Index ldy,
                           const float* __restrict__ h_post, const float* __restrict__ H_res,
                           S* __restrict__ dy, Index lddy, S* __restrict__ dX, Index lddx,
                           bool accumulate, int splits, float* __restrict__ part,
                           float* __restrict__ d_h_post, float* __restrict__ d_H_res) {
  pdl_wait();
  constexpr int NM = max_streams_v<N>, K = NM + NM * NM;
  const int n = N > 0 ? N : n_rt;
  const Index t = blockIdx.x;
  const int sp = blockIdx.y;
  Index v_begin, v_end;
  split_range(C / VEC, splits, sp, v_begin, v_end);
  float hp[NM], H[NM * NM];
#pragma unroll
  for (int i = 0; i < NM; ++i) hp[i] = i < n ? __ldg(h_post + t * n + i) : 0.f;
#pragma unroll
  for (int i = 0; i < NM; ++i)
#pragma unroll
    for (int j = 0; j < NM; ++j)
      H[i * NM + j] = (i < n && j < n) ? __ldg(H_res + t * n * n + i * n + j) : 0.f;
  float acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.f;
  for (Index v = v_begin + threadIdx.x; v < v_end; v += blockDim.x) {
    const Index c = v * VEC;
    float g[NM][VEC], x[NM][VEC], yv[VEC];
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      if (i < n) {
        load_vec<VEC>(G + (t * n + i) * ldg + c, g[i]);
        load_vec<VEC>(X + (t * n + i) * ldx + c, x[i]);
      }
    }
    load_vec<VEC>(y + t * ldy + c, yv);
    float d[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) d[e] = 0.f;
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      if (i < n) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          d[e] += hp[i] * g[i][e];
          acc[i] += g[i][e] * yv[e];
        }
#pragma unroll
        for (int j = 0; j < NM; ++j)
          if (j < n)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[NM + i * NM + j] += g[i][e] * x[j][e];
      }
    }
    store_vec<VEC>(dy + t * lddy + c, d);
    if (dX) {
#pragma unroll
      for (int j = 0; j < NM; ++j) {
        if (j < n) {
          float o[VEC];
          if (accumulate) {
            load_vec<VEC>(dX + (t * n + j) * lddx + c, o);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[e] = 0.f;
          }
#pragma unroll
          for (int i = 0; i < NM; ++i)
            if (i < n)
#pragma unroll
              for (int e = 0; e < VEC; ++e) o[e] += H[i * NM + j] * g[i][e];
          store_vec<VEC>(dX + (t * n + j) * lddx + c, o);
        }
      }
    }
  }
  __shared__ float scratch[(kRowThreads / 32) * K];
  __shared__ float total[K];
  // Compact (dh_post (n), dH_res (n x n)) out of the NM-strided accumulators.
  float packed[K];
#pragma unroll
  for (int k = 0; k < K; ++k) packed[k] = 0.f;
#pragma unroll
  for (int i = 0; i < NM; ++i) {
    if (i < n) {
      packed[i] = acc[i];
#pragma unroll
      for (int j = 0; j < NM; ++j)
        if (j < n) packed[n + i * n + j] = acc[NM + i * NM + j];
    }
  }
  const int count = n + n * n;
  block_sum<K>(packed, count, scratch, total);
  for (int k = threadIdx.x; k < count; k += blockDim.x) {
    if (splits == 1)  // the only split: straight to the outputs, no split_sum pass
      (k < n ? d_h_post[t * n + k] : d_H_res[t * n * n + (k - n)]) = total[k];
    else
      part[(sp * T + t) * count + k] = total[k];
  }
}

/// Pre-mix backward, one block per (token, split): partials of dh_pre = X du to part[sp][t][n]
/// (with one split, the sums themselves to d_h_pre);
/// with dX non-null also dX = (accumulate ? dX : 0) + h_pre du^T.
template <int N, int VEC, typename S>
__global__ void __launch_bounds__(kRowThreads)
    pre_mix_backward_kernel(int n_rt, Index T, Index C, const S* __restrict__ X, Index ldx,
                            const S* __restrict__ du, Index ldu, const float* __restrict__ h_pre,
                            S* __restrict__ dX, Index lddx, bool accumulate, int splits,
                            float* __restrict__ part, float* __restrict__ d_h_pre) {
  pdl_wait();
  constexpr int NM = max_streams_v<N>;
  const int n = N > 0 ? N : n_rt;
  const Index t = blockIdx.x;
  const int sp = blockIdx.y;
  Index v_begin, v_end;
  split_range(C / VEC, splits, sp, v_begin, v_end);
  float acc[NM];
#pragma unroll
  for (int i = 0; i < NM; ++i) acc[i] = 0.f;
  for (Index v = v_begin + threadIdx.x; v < v_end; v += blockDim.x) {
    const Index c = v * VEC;
    float d[VEC];
    load_vec<VEC>(du + t * ldu + c, d);
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      if (i < n) {
        float x[VEC];
        load_vec<VEC>(X + (t * n + i) * ldx + c, x);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[i] += x[e] * d[e];
        if (dX) {
          float o[VEC];
          if (accumulate) {
            load_vec<VEC>(dX + (t * n + i) * lddx + c, o);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) o[e] = 0.f;
          }
          const float h = __ldg(h_pre + t * n + i);
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[e] += h * d[e];
          store_vec<VEC>(dX + (t * n + i) * lddx + c, o);
        }
      }
    }
  }
  __shared__ float scratch[(kRowThreads / 32) * NM];
  __shared__ float total[NM];
  block_sum<NM>(acc, n, scratch, total);
  for (int k = threadIdx.x; k < n; k += blockDim.x)
    (splits == 1 ? d_h_pre[t * n + k] : part[(sp * T + t) * n + k]) = total[k];
}

/// Splits over channels for the per-token reductions: enough blocks to fill the GPU, at least one
/// block-width of vectors per split. Sizes only.
inline int row_splits(Index T, Index nv) {
  const Index most = nv / kRowThreads > 1 ? nv / kRowThreads : 1;
  const Index want = (kTargetBlocks + T - 1) / (T > 0 ? T : 1);
  const Index s = want < most ? want : most;
  return static_cast<int>(s < 1 ? 1 : s);
}

inline bool mixing_vec(Index C, std::initializer_list<std::pair<const void*, Index>> views) {
  if (C % kVec != 0) return false;
  for (const auto& v : views)
    if (!vec_ok(v.first, v.second)) return false;
  return true;
}

template <typename P>
inline Status check_floats(Index count, const P* p) {
  if (count == 0) return Status::kSuccess;
  if (!p) return Status::kInvalidArgument;
  return aligned(p, 4) ? Status::kSuccess : Status::kMisalignedPointer;
}

}  // namespace detail

// ---- pre-mix -----------------------------------------------------------------------------------

/// u = h_pre^T X per token: X (T, n, C) stride ldx, h_pre (T, n) fp32 dense, u (T, C) stride ldu.
/// u must not overlap X.
template <typename S>
inline Status pre_mix_forward(int n, Index T, Index C, const S* X, Index ldx, const float* h_pre,
                              S* u, Index ldu, cudaStream_t stream = 0) {
  static_assert(detail::is_storage_v<S>, "mhc::cuda: storage must be float or __nv_bfloat16");
  using namespace detail;
  if (!streams_ok(n) || T < 0 || C < 1) return Status::kInvalidArgument;
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_rows(u, T, C, ldu));
  MHC_CUDA_TRY(check_floats(T * n, h_pre));
  if (T == 0) return Status::kSuccess;
  if (overlap(u, T, ldu, X, span_bytes<S>(T * n, C, ldx), C)) return Status::kAliasing;
  const bool vec = mixing_vec(C, {{X, ldx}, {u, ldu}});
  return dispatch_streams(n, [&](auto nn) {
    constexpr int N = decltype(nn)::value;
    if (vec)
      launch(pre_mix_forward_kernel<N, kVec, S>, elementwise_blocks(T * (C / kVec)), 256, 0, stream, 
          n, T, C, X, ldx, h_pre, u, ldu);
    else
      launch(pre_mix_forward_kernel<N, 1, S>, elementwise_blocks(T * C), 256, 0, stream, 
          n, T, C, X, ldx, h_pre, u, ldu);
    return last_launch_status();
  });
}

inline std::size_t pre_mix_backward_workspace_size(int n, Index T, Index C) {
  if (!detail::streams_ok(n) || T < 0 || C < 1) return 0;
  detail::Carve cv(nullptr);
  cv.take<float>(static_cast<std::size_t>(detail::row_splits(T, C)) * T * n);
  return cv.bytes();
}

/// Backward of pre_mix_forward: d_h_pre (T, n) fp32 dense = X du, and when dX is non-null
/// dX = (accumulate ? dX : 0) + h_pre du^T (T, n, C) stride lddx. dX must not overlap X or du.
template <typename S>
inline Status pre_mix_backward(int n, Index T, Index C, const S* X, Index ldx, const S* du,
                               Index ldu, const float* h_pre, S* dX, Index lddx, bool accumulate,
                               float* d_h_pre, void* workspace, std::size_t workspace_bytes,
                               cudaStream_t stream = 0) {
  static_assert(detail::is_storage_v<S>, "mhc::cuda: storage must be float or __nv_bfloat16");
  using namespace detail;
  if (!streams_ok(n) || T < 0 || C < 1) return Status::kInvalidArgument;
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_rows(du, T, C, ldu));
  MHC_CUDA_TRY(check_floats(T * n, h_pre));
  MHC_CUDA_TRY(check_floats(T * n, d_h_pre));
  if (dX) MHC_CUDA_TRY(check_rows(dX, T * n, C, lddx));
  if (T == 0) return Status::kSuccess;
  if (dX && (overlap(dX, T * n, lddx, X, span_bytes<S>(T * n, C, ldx), C) ||
             overlap(dX, T * n, lddx, du, span_bytes<S>(T, C, ldu), C)))
    return Status::kAliasing;
  if (workspace_bytes < pre_mix_backward_workspace_size(n, T, C)) return Status::kWorkspaceTooSmall;
  if (!workspace) return Status::kInvalidArgument;
  const bool vec = mixing_vec(C, {{X, ldx}, {du, ldu}, {dX, lddx}});
  const int splits = row_splits(T, vec ? C / kVec : C);
  Carve cv(workspace);
  float* part = cv.take<float>(static_cast<std::size_t>(splits) * T * n);
  return dispatch_streams(n, [&](auto nn) {
    constexpr int N = decltype(nn)::value;
    const dim3 grid(static_cast<unsigned>(T), splits);
    if (vec)
      launch(pre_mix_backward_kernel<N, kVec, S>, grid, kRowThreads, 0, stream, 
          n, T, C, X, ldx, du, ldu, h_pre, dX, lddx, accumulate, splits, part, d_h_pre);
    else
      launch(pre_mix_backward_kernel<N, 1, S>, grid, kRowThreads, 0, stream, 
          n, T, C, X, ldx, du, ldu, h_pre, dX, lddx, accumulate, splits, part, d_h_pre);
    if (splits > 1)
      launch(split_sum_kernel<>, elementwise_blocks(T * n), 256, 0, stream, T, splits, n, part, n,
                                                                     d_h_pre, nullptr);
    return last_launch_status();
  });
}

// ---- update ------------------------------------------------------------------------------------

/// X' = H_res X + h_post y^T per token: X, X' (T, n, C) strides ldx / ldo, y (T, C) stride ldy,
/// h_post (T, n), H_res (T, n, n) fp32 dense. X' may be X itself (same pointer and stride) but
/// must not partly overlap it, nor overlap y.
template <typename S>
inline Status update_forward(int n, Index T, Index C, const S* X, Index ldx, const S* y, Index ldy,
                             const float* h_post, const float* H_res, S* X_out, Index ldo,
                             cudaStream_t stream = 0) {
  static_assert(detail::is_storage_v<S>, "mhc::cuda: storage must be float or __nv_bfloat16");
  using namespace detail;
  if (!streams_ok(n) || T < 0 || C < 1) return Status::kInvalidArgument;
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_rows(y, T, C, ldy));
  MHC_CUDA_TRY(check_rows(X_out, T * n, C, ldo));
  MHC_CUDA_TRY(check_floats(T * n, h_post));
  MHC_CUDA_TRY(check_floats(T * n * n, H_res));
  if (T == 0) return Status::kSuccess;
  if (partial_overlap(X_out, ldo, X, ldx, T * n, C) ||
      overlap(X_out, T * n, ldo, y, span_bytes<S>(T, C, ldy), C))
    return Status::kAliasing;
  const bool vec = mixing_vec(C, {{X, ldx}, {y, ldy}, {X_out, ldo}});
  return dispatch_streams(n, [&](auto nn) {
    constexpr int N = decltype(nn)::value;
    if (vec)
      launch(update_forward_kernel<N, kVec, S>, elementwise_blocks(T * (C / kVec)), 256, 0, stream, 
          n, T, C, X, ldx, y, ldy, h_post, H_res, X_out, ldo);
    else
      launch(update_forward_kernel<N, 1, S>, elementwise_blocks(T * C), 256, 0, stream, 
          n, T, C, X, ldx, y, ldy, h_post, H_res, X_out, ldo);
    return last_launch_status();
  });
}

inline std::size_t update_backward_workspace_size(int n, Index T, Index C) {
  if (!detail::streams_ok(n) || T < 0 || C < 1) return 0;
  detail::Carve cv(nullptr);
  cv.take<float>(static_cast<std::size_t>(detail::row_splits(T, C)) * T * (n + n * n));
  return cv.bytes();
}

/// Backward of update_forward given G = dL/dX' (T, n, C) stride ldg:
///   dy = G^T h_post (T, C) stride lddy;  d_h_post = G y (T, n);  d_H_res = G X^T (T, n, n);
///   when dX is non-null, dX = (accumulate ? dX : 0) + H_res^T G (T, n, C) stride lddx.
/// Outputs must not overlap the inputs.
template <typename S>
inline Status update_backward(int n, Index T, Index C, const S* G, Index ldg, const S* X, Index ldx,
                              const S* y, Index ldy, const float* h_post, const float* H_res,
                              S* dy, Index lddy, S* dX, Index lddx, bool accumulate,
                              float* d_h_post, float* d_H_res, void* workspace,
                              std::size_t workspace_bytes, cudaStream_t stream = 0) {
  static_assert(detail::is_storage_v<S>, "mhc::cuda: storage must be float or __nv_bfloat16");
  using namespace detail;
  if (!streams_ok(n) || T < 0 || C < 1) return Status::kInvalidArgument;
  MHC_CUDA_TRY(check_rows(G, T * n, C, ldg));
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_rows(y, T, C, ldy));
  MHC_CUDA_TRY(check_rows(dy, T, C, lddy));
  MHC_CUDA_TRY(check_floats(T * n, h_post));
  MHC_CUDA_TRY(check_floats(T * n * n, H_res));
  MHC_CUDA_TRY(check_floats(T * n, d_h_post));
  MHC_CUDA_TRY(check_floats(T * n * n, d_H_res));
  if (dX) MHC_CUDA_TRY(check_rows(dX, T * n, C, lddx));
  if (T == 0) return Status::kSuccess;
  const std::size_t bg = span_bytes<S>(T * n, C, ldg), bx = span_bytes<S>(T * n, C, ldx),
                    by = span_bytes<S>(T, C, ldy);
  if (overlap(dy, T, lddy, G, bg, C) || overlap(dy, T, lddy, X, bx, C) ||
      overlap(dy, T, lddy, y, by, C))
    return Status::kAliasing;
  if (dX && (overlap(dX, T * n, lddx, G, bg, C) || overlap(dX, T * n, lddx, X, bx, C) ||
             overlap(dX, T * n, lddx, y, by, C) ||
             overlap(dX, T * n, lddx, dy, span_bytes<S>(T, C, lddy), C)))
    return Status::kAliasing;
  if (workspace_bytes < update_backward_workspace_size(n, T, C)) return Status::kWorkspaceTooSmall;
  if (!workspace) return Status::kInvalidArgument;
  const bool vec = mixing_vec(C, {{G, ldg}, {X, ldx}, {y, ldy}, {dy, lddy}, {dX, lddx}});
  const int splits = row_splits(T, vec ? C / kVec : C);
  Carve cv(workspace);
  float* part = cv.take<float>(static_cast<std::size_t>(splits) * T * (n + n * n));
  return dispatch_streams(n, [&](auto nn) {
    constexpr int N = decltype(nn)::value;
    const dim3 grid(static_cast<unsigned>(T), splits);
    if (vec)
      launch(update_backward_kernel<N, kVec, S>, grid, kRowThreads, 0, stream, 
          n, T, C, G, ldg, X, ldx, y, ldy, h_post, H_res, dy, lddy, dX, lddx, accumulate, splits,
          part, d_h_post, d_H_res);
    else
      launch(update_backward_kernel<N, 1, S>, grid, kRowThreads, 0, stream, 
          n, T, C, G, ldg, X, ldx, y, ldy, h_post, H_res, dy, lddy, dX, lddx, accumulate, splits,
          part, d_h_post, d_H_res);
    if (splits > 1)
      launch(split_sum_kernel<>, elementwise_blocks(T * (n + n * n)), 256, 0, stream, 
          T, splits, n + n * n, part, n, d_h_post, d_H_res);
    return last_launch_status();
  });
}

}  // namespace mhc::cuda
