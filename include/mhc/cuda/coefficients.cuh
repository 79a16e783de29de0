// mhc/cuda/coefficients.cuh: the mHC coefficients on the GPU, forward and backward (spec sections
// 2.1-2.5 and 3; paper Eqs. 7-9). Per token t, with v = vec(X_t) (length n C):
//   forward   r = sqrt(sum(v^2) / (n C) + eps),  z = (v W) / r,  then gates and Sinkhorn
//             (h_pre, h_post, H_res) from z by mhc::detail::mhc_coefficients_forward;
//   backward  from dh_pre, dh_post, dH_res: dz by mhc::detail::mhc_coefficients_backward (the
//             Sinkhorn iterates recomputed on chip from z), then
//             dX += W (dz / r) - v (z . dz) / (n C r^2),   dW = sum_t v^T (dz / r),
//             dalpha = sum_t da * z,   dbias = sum_t da.
//
// Kernels:
//   projection  one pass over X gives v W and sum(v^2) per token, split over channels into
//               partials (splits, T, n^2 + 2n + 1). For n = 4, bf16, C % 64 == 0 it runs on the
//               tensor cores: mma m16n8k16 with X exact in bf16 and W split as W_hi + W_lo (two
//               bf16 terms, relative error ~2^-17 per product, fp32 accumulation); otherwise an
//               fp32 FMA kernel. W is packed for it per call, or once by pack_weights
//               (MappingParams::W_packed).
//   finalize    one thread per token: partials summed in split order, then gates + Sinkhorn;
//               its own kernel (coalesced through shared memory), or, for the tensor-core
//               projection split <= 8 ways on sm_90, inside the projection: the splits of a
//               token tile form a thread-block cluster and its first block sums the others'
//               partials from their shared memory (same order, same bits).
//   backward    one thread per token for the coefficient maths, then one pass over X writing dX
//               and the per-chunk partial dW (for n = 4, bf16, C % 64 == 0 in the fused layer
//               backward both products with W run on the tensor cores, input_grad_mma_kernel);
//               dW, dalpha, dbias are summed in a fixed order.
#pragma once

#include <cooperative_groups.h>
#include <cuda_pipeline.h>

#include "mhc/cuda/common.cuh"
#include "mhc/detail/coefficient_kernel.hpp"

namespace mhc::cuda {
namespace detail {

// ---- projection: generic fp32-FMA path ---------------------------------------------------------

inline constexpr int kProjTokens = 4;  // tokens per block of the generic projection

template <int N>
inline constexpr int proj_cols_v = N == 4 ? 24 : 16;  // columns per block (blockIdx.z)

/// part[s][t][j] = sum over the split's channels of v[k] W[k][j] (j < nc), part[s][t][nc] =
/// sum of v[k]^2. Grid (ceil(T / TB), splits, ceil(nc / JB)), 256 threads.
template <int N, int VEC, typename S>
__global__ void __launch_bounds__(256)
    project_generic_kernel(int n_rt, Index T, Index C, const S* __restrict__ X, Index ldx,
                           const float* __restrict__ W, int splits, float* __restrict__ part) {
  pdl_wait();
  constexpr int TB = kProjTokens, JB = proj_cols_v<N>, K = TB * (JB + 1);
  const int n = N > 0 ? N : n_rt;
  const int nc = coef_count(n), P = nc + 1;
  const Index t0 = static_cast<Index>(blockIdx.x) * TB;
  const int sp = blockIdx.y;
  const int j0 = blockIdx.z * JB;
  const Index nvec = C / VEC;
  const Index per = (nvec + splits - 1) / splits;
  const Index v_begin = sp * per;
  const Index v_end = v_begin + per < nvec ? v_begin + per : nvec;
  float acc[K];
#pragma unroll
  for (int k = 0; k < K; ++k) acc[k] = 0.f;
  for (int i = 0; i < n; ++i) {
    for (Index vi = v_begin + threadIdx.x; vi < v_end; vi += blockDim.x) {
      const Index c = vi * VEC;
      float x[TB][VEC];
#pragma unroll
      for (int tb = 0; tb < TB; ++tb) {
        if (t0 + tb < T) {
          load_vec<VEC>(X + ((t0 + tb) * n + i) * ldx + c, x[tb]);
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) x[tb][e] = 0.f;
        }
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float* w = W + (i * C + c + e) * nc + j0;
        float wr[JB];
#pragma unroll
        for (int j = 0; j < JB; ++j) wr[j] = j0 + j < nc ? __ldg(w + j) : 0.f;
#pragma unroll
        for (int tb = 0; tb < TB; ++tb) {
#pragma unroll
          for (int j = 0; j < JB; ++j) acc[tb * (JB + 1) + j] += x[tb][e] * wr[j];
          acc[tb * (JB + 1) + JB] += x[tb][e] * x[tb][e];
        }
      }
    }
  }
  __shared__ float scratch[8 * K];
  __shared__ float total[K];
  block_sum<K>(acc, K, scratch, total);
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int tb = k / (JB + 1), j = k % (JB + 1);
    const Index t = t0 + tb;
    if (t >= T) continue;
    float* dst = part + (sp * T + t) * P;
    if (j < JB) {
      if (j0 + j < nc) dst[j0 + j] = total[k];
    } else if (blockIdx.z == 0) {
      dst[nc] = total[k];
    }
  }
}

// ---- projection: tensor-core path (n = 4, bf16, C % 64 == 0) -----------------------------------

inline constexpr int kMmaTokens = 64;  // tokens per block: 4 m-tiles of 16, shared by 4 warps
inline constexpr int kMmaNT = 3;       // n-tiles of 8 columns: n^2 + 2n = 24 for n = 4
inline constexpr int kMmaChunk = 64;   // channels per k-chunk: one 128-byte line of a row

/// W (n C, nc) fp32 -> two bf16 copies (hi = bf16(W), lo = bf16(W - hi)) in mma fragment order:
/// for k-chunk kc = i * (C / 64) + c / 64, n-tile nt, half h and lane (g = lane / 4,
/// q = lane % 4), one uint4 holds W[kc * 64 + 16 q + 8 h + e][8 nt + g] for e = 0..7 (zero past
/// column nc), at index ((kc * kMmaNT + nt) * 2 + h) * 32 + lane. Channels are permuted inside a
/// chunk the same way for X (see project_mma_kernel), which leaves v W exact.
template <int Unused = 0>
__global__ void pack_w_kernel(Index k_chunks, int nc, const float* __restrict__ W,
                              uint4* __restrict__ hi, uint4* __restrict__ lo) {
  pdl_wait();
  const Index total = k_chunks * kMmaNT * 2 * 32;
  for (Index idx = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<Index>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(idx % 32);
    const int h = static_cast<int>((idx / 32) % 2);
    const int nt = static_cast<int>((idx / 64) % kMmaNT);
    const Index kc = idx / (64 * kMmaNT);
    const int g = lane >> 2, q = lane & 3, col = nt * 8 + g;
    const Index k0 = kc * kMmaChunk + 16 * q + 8 * h;
    __nv_bfloat16 hv[8], lv[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float w = col < nc ? W[(k0 + e) * nc + col] : 0.f;
      hv[e] = __float2bfloat16_rn(w);
      lv[e] = __float2bfloat16_rn(w - __bfloat162float(hv[e]));
    }
    hi[idx] = *reinterpret_cast<const uint4*>(hv);
    lo[idx] = *reinterpret_cast<const uint4*>(lv);
  }
}

/// 16 bytes global -> shared, asynchronously; src_bytes = 0 writes zeros (src is not read).
__device__ __forceinline__ void cp_async16(void* smem, const void* src, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], unsigned a0, unsigned a1,
                                               unsigned a2, unsigned a3, unsigned b0,
                                               unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned word(const uint4& v, int k) {
  return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
}

/// One token's coefficients from its projection sums (spec 2.2-2.5): on entry z holds the sums
/// of v W and ss the sum of squares; on exit z = (v W) / r with r = sqrt(ss / (n C) + eps)
/// (returned), and h_pre, h_post, H_res from the shared gates + Sinkhorn maths.
template <int N, int NM = max_streams_v<N>>
__device__ __forceinline__ float finalize_token(int n, Index C, float ss, const MappingParams& p,
                                                float (&z)[NM * NM + 2 * NM], float (&h_pre)[NM],
                                                float (&h_post)[NM], float (&H)[NM * NM]) {
  const float r = sqrtf(ss / static_cast<float>(n * C) + p.eps);
  const float inv_r = 1.f / r;
#pragma unroll
  for (int j = 0; j < NM * NM + 2 * NM; ++j) z[j] = z[j] * inv_r;
  const mhc::detail::GateParams<float> gp{p.alpha[0], p.alpha[1], p.alpha[2],
                                          p.bias,     p.bias + n, p.bias + 2 * n};
  float A[NM * NM];
  mhc::detail::mhc_coefficients_forward<N>(n, p.iterations, z, gp, h_pre, h_post, H, A);
  return r;
}

/// Token k's outputs into a staging tile of B tokens (shared memory): z (B x nc) at 0, r at
/// B nc, h_pre at B (nc + 1), h_post at B (nc + 1 + n), H_res at B (nc + 1 + 2 n).
template <int NM>
__device__ __forceinline__ void stage_finalized(float* tile, int B, int k, int n,
                                                const float (&z)[NM * NM + 2 * NM], float r,
                                                const float (&h_pre)[NM], const float (&h_post)[NM],
                                                const float (&H)[NM * NM]) {
  const int nc = coef_count(n);
  float* pre = tile + B * (nc + 1);
  float* post = pre + B * n;
  float* hs = post + B * n;
#pragma unroll
  for (int j = 0; j < NM * NM + 2 * NM; ++j)
    if (j < nc) tile[k * nc + j] = z[j];
  tile[B * nc + k] = r;
#pragma unroll
  for (int i = 0; i < NM; ++i)
    if (i < n) pre[k * n + i] = h_pre[i], post[k * n + i] = h_post[i];
#pragma unroll
  for (int e = 0; e < NM * NM; ++e)
    if (e < n * n) hs[k * n * n + e] = H[e];
}

/// Coalesced stores of the `cnt` tokens from t0 on of a staging tile (stage_finalized); every
/// thread of the block takes part.
__device__ __forceinline__ void store_finalized(const float* tile, int B, int cnt, int n, Index t0,
                                                const Coefficients& out) {
  const int nc = coef_count(n);
  const float* rs = tile + B * nc;
  const float* pre = rs + B;
  const float* post = pre + B * n;
  const float* hs = post + B * n;
  for (int k = threadIdx.x; k < cnt * nc; k += blockDim.x) out.z[t0 * nc + k] = tile[k];
  for (int k = threadIdx.x; k < cnt; k += blockDim.x) out.r[t0 + k] = rs[k];
  for (int k = threadIdx.x; k < cnt * n; k += blockDim.x) {
    out.h_pre[t0 * n + k] = pre[k];
    out.h_post[t0 * n + k] = post[k];
  }
  for (int k = threadIdx.x; k < cnt * n * n; k += blockDim.x) out.H_res[t0 * n * n + k] = hs[k];
}

/// project_mma_kernel: stages of each warp's copy ring, and the ring's shared-memory bytes per
/// block (4 warps x stages x (X tile of 64 tokens x 128 bytes + the chunk's W fragments)).
inline constexpr int kProjStages = 2;
inline constexpr int kProjXBytes = kMmaTokens * kMmaChunk * 2;
inline constexpr int kProjWBytes = 2 * kMmaNT * 2 * 32 * 16;
inline constexpr int kProjStageBytes = kProjXBytes + kProjWBytes;
inline constexpr int kProjSmemBytes = 4 * kProjStages * kProjStageBytes;
/// Blocks of project_mma_kernel resident at once on an H100/H200 (132 multiprocessors of 228 KB
/// shared memory, 1 KB of it reserved per block); used only to size the grid, never for
/// correctness.
inline constexpr int kMmaResident = 132 * (228 * 1024 / (kProjSmemBytes + 1024));

/// Same partials as project_generic_kernel, on the tensor cores (n = 4, bf16 X, C % 64 == 0).
/// Block: 4 warps x 64 tokens; the warps share the tokens and take every 4th 64-channel chunk of
/// the block's split (together 512 contiguous bytes of each row), then sum their tiles through
/// shared memory in warp order into the split's partials. Each warp streams its chunks through
/// a private 2-stage ring in shared memory (cp.async; a warp barrier per stage): per stage its
/// X tile, copied as whole 128-byte rows (8 lanes per row, so one L2 request per line; the
/// 16-byte pieces stored XOR-swizzled by row so that the fragment reads are free of bank
/// conflicts), and the chunk's W fragments. Thread (g, q) then takes channels 16q..16q+15 of
/// rows g and g + 8 of each m-tile; the four mma k-steps of the chunk use channels
/// 16q + 4s + {0..3}, s = 0..3, matched by the packed W. The sums of squares run on the tensor
/// cores too: each m-tile times its own transpose (tokens 0..7 and 8..15 as two n-tiles), of
/// which the diagonal is kept.
/// FUSED (sm_90, launched as clusters of 1 x splits blocks): no partials; the token tiles are
/// finalized in the kernel (see its end), into `out`.
template <bool FUSED = false>
__global__ void __launch_bounds__(128)
    project_mma_kernel(Index T, Index C, const __nv_bfloat16* __restrict__ X, Index ldx,
                       const uint4* __restrict__ Whi, const uint4* __restrict__ Wlo, int splits,
                       float* __restrict__ part, MappingParams p, Coefficients out) {
  pdl_wait();
  constexpr int n = 4, nc = 24, P = nc + 1, MT = kMmaTokens / 16, S = kProjStages;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const Index t0 = static_cast<Index>(blockIdx.x) * kMmaTokens;
  const int sp = blockIdx.y;
  const Index chunks = C / kMmaChunk;
  const Index per = (chunks + splits - 1) / splits;
  const Index c_begin = sp * per;
  const Index c_end = c_begin + per < chunks ? c_begin + per : chunks;

  float acc[MT][kMmaNT][4];
  float sd[MT][2][4];  // X X^T of each m-tile against its tokens 0..7 and 8..15
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      sd[m][0][k] = sd[m][1][k] = 0.f;
#pragma unroll
      for (int nt = 0; nt < kMmaNT; ++nt) acc[m][nt][k] = 0.f;
    }

  const Index my_begin = c_begin + warp;
  const int my_chunks = static_cast<int>(c_end > my_begin ? (c_end - my_begin + 3) / 4 : 0);
  const int iters = my_chunks * n;
  extern __shared__ __align__(16) unsigned char smem[];
  uint4* ring = reinterpret_cast<uint4*>(smem + warp * S * kProjStageBytes);
  // Stage it of the warp: stream i = it / my_chunks, chunk my_begin + 4 (it % my_chunks).
  // Lane l copies piece l % 8 of rows l / 8 + 4 j (rows past T re-read row T - 1; their results
  // are never stored) to uint4 slot row * 8 + (piece ^ (row & 7)), then its W fragments.
  const int piece = lane & 7;
  auto issue = [&](int it) {
    if (it < iters) {
      const int i = it / my_chunks;
      const Index c64 = my_begin + 4 * (it % my_chunks);
      uint4* xs = ring + (it % S) * (kProjStageBytes / 16);
#pragma unroll
      for (int j = 0; j < kMmaTokens / 4; ++j) {
        const int row = (lane >> 3) + 4 * j;
        Index t = t0 + row;
        t = t < T ? t : T - 1;
        cp_async16(xs + row * 8 + (piece ^ (row & 7)),
                   X + (t * n + i) * ldx + c64 * kMmaChunk + 8 * piece, 16);
      }
      uint4* wsm = xs + kProjXBytes / 16;
      const Index kc = i * chunks + c64;
#pragma unroll
      for (int f = 0; f < kMmaNT * 2; ++f) {
        const Index src = (kc * kMmaNT * 2 + f) * 32 + lane;
        cp_async16(wsm + f * 32 + lane, Whi + src, 16);
        cp_async16(wsm + (kMmaNT * 2 + f) * 32 + lane, Wlo + src, 16);
      }
    }
    __pipeline_commit();  // possibly empty, so that every iteration waits on the same count
  };
#pragma unroll
  for (int st = 0; st < S - 1; ++st) issue(st);
  for (int it = 0; it < iters; ++it) {
    __pipeline_wait_prior(S - 2);  // this thread's copies of stage it are done ...
    __syncwarp();  // ... and every lane's; every lane is also done with stage it - 1
    issue(it + S - 1);  // into the slot of stage it - 1
    const uint4* xs = ring + (it % S) * (kProjStageBytes / 16);
    const uint4* wsm = xs + kProjXBytes / 16;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      uint4 a[2][2];  // [row g / g + 8][channels 16q..16q+7 / 16q+8..16q+15]
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = 16 * m + 8 * r + g;
#pragma unroll
        for (int h = 0; h < 2; ++h) a[r][h] = xs[row * 8 + ((2 * q + h) ^ (row & 7))];
      }
      // Sums of squares: the m-tile times its own transpose, whose B fragments are the rows
      // g (a0, a2) and g + 8 (a1, a3) of the A fragment.
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int s = 0; s < 2; ++s) {
          const unsigned a0 = word(a[0][h], 2 * s), a1 = word(a[1][h], 2 * s);
          const unsigned a2 = word(a[0][h], 2 * s + 1), a3 = word(a[1][h], 2 * s + 1);
          mma_bf16_16816(sd[m][0], a0, a1, a2, a3, a0, a2);
          mma_bf16_16816(sd[m][1], a0, a1, a2, a3, a1, a3);
        }
#pragma unroll
      for (int nt = 0; nt < kMmaNT; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint4 bh = wsm[(nt * 2 + h) * 32 + lane];
          const uint4 bl = wsm[((kMmaNT + nt) * 2 + h) * 32 + lane];
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const unsigned a0 = word(a[0][h], 2 * s), a1 = word(a[1][h], 2 * s);
            const unsigned a2 = word(a[0][h], 2 * s + 1), a3 = word(a[1][h], 2 * s + 1);
            mma_bf16_16816(acc[m][nt], a0, a1, a2, a3, word(bh, 2 * s), word(bh, 2 * s + 1));
            mma_bf16_16816(acc[m][nt], a0, a1, a2, a3, word(bl, 2 * s), word(bl, 2 * s + 1));
          }
        }
      }
    }
  }
  __pipeline_wait_prior(0);

  __syncthreads();  // every warp is done with its ring before `red` reuses the bytes
  constexpr int BP = kMmaTokens * P;
  static_assert(4 * BP * sizeof(float) <= kProjSmemBytes, "reduction fits");
  float(*red)[BP] = reinterpret_cast<float(*)[BP]>(smem);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    // The diagonal of X X^T: token g's sum of squares is element g % 2 of sd[m][0] in thread
    // (g, q = g / 2), token g + 8's is element 2 + g % 2 of sd[m][1] in the same thread.
    if (q == g / 2) {
      red[warp][(16 * m + g) * P + nc] = (g & 1) ? sd[m][0][1] : sd[m][0][0];
      red[warp][(16 * m + g + 8) * P + nc] = (g & 1) ? sd[m][1][3] : sd[m][1][2];
    }
#pragma unroll
    for (int nt = 0; nt < kMmaNT; ++nt) {
      const int col = nt * 8 + 2 * q;
      red[warp][(16 * m + g) * P + col] = acc[m][nt][0];
      red[warp][(16 * m + g) * P + col + 1] = acc[m][nt][1];
      red[warp][(16 * m + g + 8) * P + col] = acc[m][nt][2];
      red[warp][(16 * m + g + 8) * P + col + 1] = acc[m][nt][3];
    }
  }
  __syncthreads();
  if constexpr (!FUSED) {
    for (int k = threadIdx.x; k < BP; k += blockDim.x) {
      const Index t = t0 + k / P;
      if (t < T) part[(sp * T + t0) * P + k] = ((red[0][k] + red[1][k]) + red[2][k]) + red[3][k];
    }
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && MHC_CUDA_CLUSTERS
    // The splits of this token tile form one thread-block cluster (1 x splits): each block keeps
    // its partials in shared memory, and block 0 sums them over the cluster (distributed shared
    // memory) in split order, exactly as coefficients_finalize_kernel sums them from `part`,
    // then finalizes the tile's tokens. No partials in global memory, no finalize launch.
    static_assert(5 * BP * sizeof(float) <= kProjSmemBytes, "partials fit beside the reduction");
    float* mine = reinterpret_cast<float*>(smem) + 4 * BP;
    for (int k = threadIdx.x; k < BP; k += blockDim.x)
      mine[k] = ((red[0][k] + red[1][k]) + red[2][k]) + red[3][k];
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every split's partials are in its block's shared memory
    if (sp == 0) {
      const int k = threadIdx.x;
      const int cnt = static_cast<int>(T - t0 < kMmaTokens ? T - t0 : kMmaTokens);
      float z[nc], h_pre[n], h_post[n], H[n * n], ss = 0.f, r = 0.f;
      if (k < cnt) {
#pragma unroll
        for (int j = 0; j < nc; ++j) z[j] = 0.f;
        for (int s2 = 0; s2 < splits; ++s2) {
          const float* src = cluster.map_shared_rank(mine, s2) + k * P;
#pragma unroll
          for (int j = 0; j < nc; ++j) z[j] += src[j];
          ss += src[nc];
        }
        r = finalize_token<n>(n, C, ss, p, z, h_pre, h_post, H);
      }
      __syncthreads();  // `red` (this block's) becomes the output staging tile
      if (k < cnt) stage_finalized<n>(red[0], kMmaTokens, k, n, z, r, h_pre, h_post, H);
      __syncthreads();
      store_finalized(red[0], kMmaTokens, cnt, n, t0, out);
    }
    cluster.sync();  // the other blocks' shared memory stays until block 0 has read it
#else
    __trap();  // never launched: fused_finalize() requires this code built for sm_90 or later
#endif
  }
}

// ---- finalize: partials -> z, r, gates, Sinkhorn -----------------------------------------------

/// Tokens per block of coefficients_finalize_kernel.
inline constexpr int kFinalizeTokens = 32;

/// One thread per token for the maths; a block of kFinalizeTokens tokens moves its data through
/// shared memory so that every global access is coalesced (one-thread-per-token loads and stores
/// at the rows' strides of 4-100 bytes made this kernel bound by L2 sector throughput: ~2 us per
/// 4096 tokens). The block's partials are summed over the splits element by element, in split
/// order (thread k holds elements k, k + 32, ...); then each token's r, z, gates and Sinkhorn;
/// then z, r, h_pre, h_post and H_res leave as contiguous runs of the block's rows.
template <int N>
__global__ void __launch_bounds__(kFinalizeTokens)
    coefficients_finalize_kernel(int n_rt, Index T, Index C, int splits,
                                 const float* __restrict__ part, MappingParams p,
                                 Coefficients out) {
  pdl_wait();
  constexpr int NM = max_streams_v<N>, NCM = NM * NM + 2 * NM, B = kFinalizeTokens;
  constexpr int kTile = B * (NCM + 1) > B * (2 * NCM + 1) ? B * (NCM + 1) : B * (2 * NCM + 1);
  __shared__ float tile[kTile];
  const int n = N > 0 ? N : n_rt;
  const int nc = coef_count(n), P = nc + 1;
  const Index t0 = blockIdx.x * static_cast<Index>(B);
  const int cnt = static_cast<int>(T - t0 < B ? T - t0 : B);
  const int len = cnt * P, tid = static_cast<int>(threadIdx.x);
  {
    float acc[NCM + 1];
#pragma unroll
    for (int e = 0; e <= NCM; ++e) acc[e] = 0.f;
    if (cnt == B) {  // a full block: loads without per-element guards, all in flight at once
#pragma unroll 2
      for (int sp = 0; sp < splits; ++sp) {
        const float* src = part + (sp * T + t0) * P + tid;
        float v[NCM + 1];
#pragma unroll
        for (int e = 0; e <= NCM; ++e) v[e] = N > 0 || e < P ? src[e * B] : 0.f;
#pragma unroll
        for (int e = 0; e <= NCM; ++e) acc[e] += v[e];
      }
    } else {
      for (int sp = 0; sp < splits; ++sp) {
        const float* src = part + (sp * T + t0) * P;
#pragma unroll
        for (int e = 0; e <= NCM; ++e)
          if (tid + e * B < len) acc[e] += src[tid + e * B];
      }
    }
#pragma unroll
    for (int e = 0; e <= NCM; ++e)
      if (tid + e * B < len) tile[tid + e * B] = acc[e];
  }
  __syncthreads();
  const Index t = t0 + tid;
  float z[NCM], h_pre[NM], h_post[NM], H[NM * NM], r = 0.f;
  if (t < T) {
#pragma unroll
    for (int j = 0; j < NCM; ++j) z[j] = j < nc ? tile[tid * P + j] : 0.f;
    r = finalize_token<N>(n, C, tile[tid * P + nc], p, z, h_pre, h_post, H);
  }
  pdl_trigger();  // only the stores are left: let the next kernel be scheduled
  __syncthreads();  // every thread has read its partials: the tile now takes the outputs
  if (t < T) stage_finalized<NM>(tile, B, tid, n, z, r, h_pre, h_post, H);
  __syncthreads();
  store_finalized(tile, B, cnt, n, t0, out);
}

// ---- backward ----------------------------------------------------------------------------------

/// Sinkhorn rounds whose sums the token kernel keeps in thread-local memory (which the hardware
/// interleaves across threads); more iterations use per-token scratch in the workspace.
inline constexpr int kLocalIterations = 32;

/// Records of 16-token groups that the token kernel writes for input_grad_mma_kernel (n = 4):
/// q = dz / r split into bf16 hi + lo, both token-major [t][m] (mma A operand) and m-major
/// [m][t] (B operand, rows padded to 24 so fragment loads are free of bank conflicts), then
/// fp32 beta [t], h_pre [t][i] and H_res^T [t][i][j] = H_res[t][j][i]. Tokens past T are zero.
inline constexpr int kRecGroup = 16;
inline constexpr int kRecQaHi = 0, kRecQaLo = 768, kRecQbHi = 1536, kRecQbLo = 2688;
inline constexpr int kRecBeta = 3840, kRecHpre = 3904, kRecHt = 4160, kRecBytes = 5184;

/// Writes token t's part of its group record (q and beta of the coefficient backward, h_pre and
/// H_res of the forward); all zero for a padding token (valid = false).
__device__ __forceinline__ void write_mma_record(unsigned char* rec, Index t, bool valid,
                                                 const float* q, float beta, const float* h_pre,
                                                 const float* H_res) {
  unsigned char* grp = rec + (t / kRecGroup) * kRecBytes;
  const int lt = static_cast<int>(t % kRecGroup);
  auto* qa_hi = reinterpret_cast<__nv_bfloat16*>(grp + kRecQaHi) + lt * 24;
  auto* qa_lo = reinterpret_cast<__nv_bfloat16*>(grp + kRecQaLo) + lt * 24;
  auto* qb_hi = reinterpret_cast<__nv_bfloat16*>(grp + kRecQbHi) + lt;
  auto* qb_lo = reinterpret_cast<__nv_bfloat16*>(grp + kRecQbLo) + lt;
  for (int m = 0; m < 24; ++m) {
    const float v = valid ? q[m] : 0.f;
    const __nv_bfloat16 hi = __float2bfloat16_rn(v);
    const __nv_bfloat16 lo = __float2bfloat16_rn(v - __bfloat162float(hi));
    qa_hi[m] = hi, qa_lo[m] = lo, qb_hi[m * 24] = hi, qb_lo[m * 24] = lo;
  }
  reinterpret_cast<float*>(grp + kRecBeta)[lt] = valid ? beta : 0.f;
  for (int i = 0; i < 4; ++i) {
    reinterpret_cast<float*>(grp + kRecHpre)[lt * 4 + i] = valid ? h_pre[i] : 0.f;
    for (int j = 0; j < 4; ++j)
      reinterpret_cast<float*>(grp + kRecHt)[lt * 16 + i * 4 + j] = valid ? H_res[j * 4 + i] : 0.f;
  }
}

/// One token of coefficients_backward_token_kernel, with `sums` for the Sinkhorn sums of the
/// shared kernel (A and M stay in registers); its dalpha (3) and dbias (nc) go to
/// grads[0, 3 + nc).
template <int N, int NM = max_streams_v<N>>
__device__ __forceinline__ void coefficients_backward_token(
    int n, Index t, Index C, const MappingParams& p, const ConstCoefficients& coef,
    const float* __restrict__ d_h_pre, const float* __restrict__ d_h_post,
    const float* __restrict__ d_H_res, float* __restrict__ qb, unsigned char* __restrict__ rec,
    float* sums, float (&grads)[3 + NM * NM + 2 * NM]) {
  constexpr int NCM = NM * NM + 2 * NM;
  const int nc = coef_count(n);
  float z[NCM], dz[NCM], dhp[NM], dhq[NM], dH[NM * NM];
  float dal[3] = {0.f, 0.f, 0.f}, dbp[NM], dbq[NM], dbr[NM * NM];
#pragma unroll
  for (int j = 0; j < NCM; ++j) z[j] = j < nc ? coef.z[t * nc + j] : 0.f;
#pragma unroll
  for (int i = 0; i < NM; ++i) {
    dhp[i] = i < n ? d_h_pre[t * n + i] : 0.f;
    dhq[i] = i < n ? d_h_post[t * n + i] : 0.f;
    dbp[i] = dbq[i] = 0.f;
  }
#pragma unroll
  for (int k = 0; k < NM * NM; ++k) {
    dH[k] = k < n * n ? d_H_res[t * n * n + k] : 0.f;
    dbr[k] = 0.f;
  }
  const mhc::detail::GateParams<float> gp{p.alpha[0], p.alpha[1], p.alpha[2],
                                          p.bias,     p.bias + n, p.bias + 2 * n};
  float A[NM * NM], M[NM * NM];
  mhc::detail::mhc_coefficients_backward<N>(n, p.iterations, z, gp, dhp, dhq, dH, dz, dal, dbp,
                                            dbq, dbr, A, M, sums);
  const float r = coef.r[t], inv_r = 1.f / r;
  float zdz = 0.f;
#pragma unroll
  for (int j = 0; j < NCM; ++j)
    if (j < nc) {
      zdz += z[j] * dz[j];
      dz[j] = dz[j] * inv_r;  // q
    }
  const float beta = zdz / (static_cast<float>(n * C) * r * r);
  if (rec && n == 4) {  // the tensor-core input gradient reads only the group records
    write_mma_record(rec, t, true, dz, beta, coef.h_pre + t * n, coef.H_res + t * n * n);
  } else {
#pragma unroll
    for (int j = 0; j < NCM; ++j)
      if (j < nc) qb[t * (nc + 1) + j] = dz[j];
    qb[t * (nc + 1) + nc] = beta;
  }
  grads[0] = dal[0], grads[1] = dal[1], grads[2] = dal[2];
#pragma unroll
  for (int i = 0; i < NM; ++i)
    if (i < n) {
      grads[3 + i] = dbp[i];
      grads[3 + n + i] = dbq[i];
    }
#pragma unroll
  for (int k = 0; k < NM * NM; ++k)
    if (k < n * n) grads[3 + 2 * n + k] = dbr[k];
}

/// One thread per token: dz from (dh_pre, dh_post, dH_res) through the shared gate and Sinkhorn
/// backward, then q = dz / r and beta = (z . dz) / (n C r^2) to qb (T, nc + 1) or, with `rec`,
/// into the 16-token group records of input_grad_mma_kernel. The block's (one warp, 32 tokens)
/// sum of the tokens' dalpha (3) and dbias (nc), a fixed butterfly, goes to row blockIdx.x of tok
/// (ceil(T / 32), 3 + nc). The Sinkhorn sums of the recomputed forward
/// live in thread-local memory up to kLocalIterations, else in `scratch` (scratch_len per token).
template <int N>
__global__ void __launch_bounds__(32)
    coefficients_backward_token_kernel(int n_rt, Index T, Index C, MappingParams p,
                                       ConstCoefficients coef, const float* __restrict__ d_h_pre,
                                       const float* __restrict__ d_h_post,
                                       const float* __restrict__ d_H_res, float* __restrict__ qb,
                                       float* __restrict__ tok, unsigned char* __restrict__ rec,
                                       float* __restrict__ scratch, int scratch_len) {
  pdl_wait();
  constexpr int NM = max_streams_v<N>, W = 3 + NM * NM + 2 * NM;
  const int n = N > 0 ? N : n_rt;
  const Index t = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x;
  float grads[W];
#pragma unroll
  for (int k = 0; k < W; ++k) grads[k] = 0.f;
  if (t >= T) {  // padding tokens of the last record group
    if (rec && n == 4 && t < (T + kRecGroup - 1) / kRecGroup * kRecGroup)
      write_mma_record(rec, t, false, nullptr, 0.f, nullptr, nullptr);
  } else if (p.iterations <= kLocalIterations) {
    float local[mhc::detail::sinkhorn_sums_size(NM, kLocalIterations)];
    coefficients_backward_token<N>(n, t, C, p, coef, d_h_pre, d_h_post, d_H_res, qb, rec, local,
                                   grads);
  } else {
    coefficients_backward_token<N>(n, t, C, p, coef, d_h_pre, d_h_post, d_H_res, qb, rec,
                                   scratch + t * scratch_len, grads);
  }
  const int w = 3 + coef_count(n);
#pragma unroll
  for (int k = 0; k < W; ++k)
    if (k < w) {
      const float v = warp_sum(grads[k]);
      if (threadIdx.x == 0) tok[blockIdx.x * static_cast<Index>(w) + k] = v;
    }
}

inline constexpr int kGradTokens = 64;  // tokens staged per shared-memory batch
inline constexpr int kGradGroups = 32;  // channel groups (threads) per stream in a block

/// Tokens whose loads a thread issues together in input_grad_kernel (registers permitting).
template <int N>
inline constexpr int grad_unroll_v = N == 4 ? 4 : 1;
inline constexpr int kGradPrefetch = 16;  // tokens ahead that input_grad_kernel prefetches to L2

/// One pass over the channels of a token chunk (grid (channel blocks, chunks), n * kGradGroups
/// threads; thread (stream i, channel c)):
///   dX[t][i][c] = (ACCUM ? dX : 0) + [FUSED] sum_j H_res[t][j][i] G[t][j][c] + h_pre[t][i] du[t][c]
///                                  + sum_m W[i C + c][m] q[t][m] - beta[t] X[t][i][c]
///   dWpart[chunk][i C + c][m] = sum over the chunk's tokens of X[t][i][c] q[t][m]
/// The W row of a thread stays in registers for the chunk. The loads of U tokens are issued
/// together, without branches (a tail token re-reads the last one and is masked), so U tokens
/// of memory traffic are in flight per thread.
template <int N, typename S, bool FUSED, bool ACCUM>
__global__ void __launch_bounds__(N == 4 ? 4 * kGradGroups : kMaxCudaStreams * kGradGroups)
    input_grad_kernel(int n_rt, Index T, Index C, const S* __restrict__ G, Index ldg,
                      const S* __restrict__ du, Index ldu, const S* __restrict__ X, Index ldx,
                      const float* __restrict__ W, ConstCoefficients coef,
                      const float* __restrict__ qb, S* __restrict__ dX, Index lddx,
                      Index tokens_per_chunk, float* __restrict__ dW_part) {
  pdl_wait();
  constexpr int NM = max_streams_v<N>, NCM = NM * NM + 2 * NM, U = grad_unroll_v<N>;
  constexpr int QS = (NCM + 1 + 3) / 4 * 4;  // row stride of the staged q (+ beta)
  const int n = N > 0 ? N : n_rt;
  const int nc = coef_count(n);
  const int i = threadIdx.x / kGradGroups, g = threadIdx.x % kGradGroups;
  const Index c = static_cast<Index>(blockIdx.x) * kGradGroups + g;
  const bool active = c < C;
  const Index t_begin = blockIdx.y * tokens_per_chunk;
  const Index t_end = t_begin + tokens_per_chunk < T ? t_begin + tokens_per_chunk : T;

  __shared__ __align__(16) float s_q[kGradTokens * QS];
  __shared__ float s_hpre[kGradTokens * NM];
  __shared__ float s_H[kGradTokens * NM * NM];

  float w[NCM], dw[NCM];
#pragma unroll
  for (int m = 0; m < NCM; ++m) {
    w[m] = (active && m < nc) ? __ldg(W + (i * C + c) * nc + m) : 0.f;
    dw[m] = 0.f;
  }
  const Index cc = active ? c : 0;  // inactive threads read a valid element and store nothing
  const S* g_col = FUSED ? G + cc : G;
  const S* du_col = FUSED ? du + cc : du;
  const S* x_col = X + i * ldx + cc;
  S* dx_col = dX + i * lddx + cc;

  for (Index b0 = t_begin; b0 < t_end; b0 += kGradTokens) {
    const int nb = static_cast<int>(t_end - b0 < kGradTokens ? t_end - b0 : kGradTokens);
    __syncthreads();
    for (int k = threadIdx.x; k < nb * QS; k += blockDim.x) {
      const int tt = k / QS, m = k % QS;
      s_q[k] = m <= nc ? qb[(b0 + tt) * (nc + 1) + m] : 0.f;
    }
    if (FUSED) {
      for (int k = threadIdx.x; k < nb * n; k += blockDim.x) s_hpre[k] = coef.h_pre[b0 * n + k];
      for (int k = threadIdx.x; k < nb * n * n; k += blockDim.x) s_H[k] = coef.H_res[b0 * n * n + k];
    }
    __syncthreads();
    for (int tt0 = 0; tt0 < nb; tt0 += U) {
      // L2 prefetch of the rows kGradPrefetch tokens ahead (clamped to the chunk): warp i brings
      // its stream's X row and G row i, warp 0 the du row.
#pragma unroll
      for (int u = 0; u < U; ++u) {
        Index tp = b0 + tt0 + u + kGradPrefetch;
        tp = tp < t_end ? tp : t_end - 1;
        prefetch_l2(x_col + tp * n * ldx);
        if (FUSED) {
          if (i < n) prefetch_l2(g_col + (tp * n + i) * ldg);
          if (i == 0) prefetch_l2(du_col + tp * ldu);
        }
      }
      float x[U], old[U], gv[U][NM], d[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {  // loads of U tokens, branch-free
        const int tt = tt0 + u < nb ? tt0 + u : nb - 1;
        const Index t = b0 + tt;
        x[u] = to_float(x_col[t * n * ldx]);
        if (ACCUM) old[u] = to_float(dx_col[t * n * lddx]);
        if (FUSED) {
#pragma unroll
          for (int j = 0; j < NM; ++j)
            if (j < n) gv[u][j] = to_float(g_col[(t * n + j) * ldg]);
          d[u] = to_float(du_col[t * ldu]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tt = tt0 + u < nb ? tt0 + u : nb - 1;
        const float live = tt0 + u < nb ? 1.f : 0.f;
        const float* qrow = s_q + tt * QS;
        float out = ACCUM ? old[u] : 0.f;
        if (FUSED) {
#pragma unroll
          for (int j = 0; j < NM; ++j)
            if (j < n) out += s_H[tt * n * n + j * n + i] * gv[u][j];
          out += s_hpre[tt * n + i] * d[u];
        }
        const float xl = x[u] * live;
#pragma unroll
        for (int m4 = 0; m4 < QS / 4; ++m4) {
          const float4 q4 = *reinterpret_cast<const float4*>(qrow + 4 * m4);
          const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int m = 4 * m4 + k;
            if (m < NCM && m < nc) {
              out += w[m] * qv[k];
              dw[m] += xl * qv[k];
            }
          }
        }
        out -= qrow[nc] * x[u];
        if (active && tt0 + u < nb) dx_col[(b0 + tt) * n * lddx] = from_float<S>(out);
      }
    }
  }
  if (active) {
    float* dst = dW_part + static_cast<Index>(blockIdx.y) * n * C * nc;
#pragma unroll
    for (int m = 0; m < NCM; ++m)
      if (m < nc) dst[(i * C + c) * nc + m] = dw[m];
  }
}

/// Tokens per shared-memory stage of input_grad_staged_kernel.
inline constexpr int kStageTokens = 16;

/// The fused layer case of input_grad_kernel for n = 4 with 16-byte-aligned rows and C % 32 == 0:
/// the block's strips of G (4 rows), X (4 rows) and du (1 row) for kStageTokens tokens, and
/// their q, beta, h_pre, H_res, are copied into shared memory with cp.async, double-buffered, so
/// the next stage is in flight while the current one is computed (and G is read from memory
/// once, not once per stream). Same results as input_grad_kernel<4, S, true, false>.
template <typename S>
__global__ void __launch_bounds__(4 * kGradGroups)
    input_grad_staged_kernel(Index T, Index C, const S* __restrict__ G, Index ldg,
                             const S* __restrict__ du, Index ldu, const S* __restrict__ X,
                             Index ldx, const float* __restrict__ W, ConstCoefficients coef,
                             const float* __restrict__ qb, S* __restrict__ dX, Index lddx,
                             Index tokens_per_chunk, float* __restrict__ dW_part) {
  pdl_wait();
  constexpr int n = 4, nc = 24, ROWS = 2 * n + 1;       // G (n), X (n), du
  constexpr int PIECES = kGradGroups * sizeof(S) / 16;  // 16-byte pieces per row strip
  const int i = threadIdx.x / kGradGroups, g = threadIdx.x % kGradGroups;
  const Index c0 = static_cast<Index>(blockIdx.x) * kGradGroups;
  const Index c = c0 + g;
  const Index t_begin = blockIdx.y * tokens_per_chunk;
  const Index t_end = t_begin + tokens_per_chunk < T ? t_begin + tokens_per_chunk : T;

  constexpr int QS = 28;  // q (24) and beta, rows padded to whole float4s
  __shared__ __align__(16) S s_rows[2][kStageTokens][ROWS][kGradGroups];
  __shared__ __align__(16) float s_q[2][kStageTokens][QS];
  __shared__ float s_hpre[2][kStageTokens][n];
  __shared__ __align__(16) float s_Ht[2][kStageTokens][n * n];  // H_res transposed: [i][j]

  float w[nc], dw[nc];
#pragma unroll
  for (int m = 0; m < nc; ++m) {
    w[m] = __ldg(W + (i * C + c) * nc + m);
    dw[m] = 0.f;
  }

  auto issue = [&](int buf, Index b0, int nb) {
    for (int k = threadIdx.x; k < nb * ROWS * PIECES; k += blockDim.x) {
      const int tt = k / (ROWS * PIECES), r = (k / PIECES) % ROWS, pc = k % PIECES;
      const Index t = b0 + tt;
      const S* src = r < n       ? G + (t * n + r) * ldg
                     : r < 2 * n ? X + (t * n + (r - n)) * ldx
                                 : du + t * ldu;
      __pipeline_memcpy_async(&s_rows[buf][tt][r][pc * (16 / sizeof(S))],
                              src + c0 + pc * (16 / sizeof(S)), 16);
    }
    for (int k = threadIdx.x; k < nb * (nc + 1); k += blockDim.x)
      __pipeline_memcpy_async(&s_q[buf][k / (nc + 1)][k % (nc + 1)], qb + b0 * (nc + 1) + k, 4);
    for (int k = threadIdx.x; k < nb * n; k += blockDim.x)
      __pipeline_memcpy_async(&s_hpre[buf][k / n][k % n], coef.h_pre + b0 * n + k, 4);
    for (int k = threadIdx.x; k < nb * n * n; k += blockDim.x) {
      const int ij = k % (n * n);  // H_res[j][i] with j = ij / n, i = ij % n -> s_Ht[i][j]
      __pipeline_memcpy_async(&s_Ht[buf][k / (n * n)][(ij % n) * n + ij / n],
                              coef.H_res + b0 * n * n + k, 4);
    }
    __pipeline_commit();
  };

  const int stages = static_cast<int>((t_end - t_begin + kStageTokens - 1) / kStageTokens);
  auto stage_tokens = [&](int st) {
    const Index b0 = t_begin + static_cast<Index>(st) * kStageTokens;
    return static_cast<int>(t_end - b0 < kStageTokens ? t_end - b0 : kStageTokens);
  };
  if (stages > 0) issue(0, t_begin, stage_tokens(0));
  for (int st = 0; st < stages; ++st) {
    const int buf = st & 1;
    if (st + 1 < stages) {
      issue(buf ^ 1, t_begin + static_cast<Index>(st + 1) * kStageTokens, stage_tokens(st + 1));
      __pipeline_wait_prior(1);
    } else {
      __pipeline_wait_prior(0);
    }
    __syncthreads();
    const Index b0 = t_begin + static_cast<Index>(st) * kStageTokens;
    const int nb = stage_tokens(st);
    for (int tt = 0; tt < nb; ++tt) {
      const float x = to_float(s_rows[buf][tt][n + i][g]);
      float out = s_hpre[buf][tt][i] * to_float(s_rows[buf][tt][2 * n][g]);
      const float4 h = *reinterpret_cast<const float4*>(&s_Ht[buf][tt][i * n]);  // H_res[.][i]
      out += h.x * to_float(s_rows[buf][tt][0][g]) + h.y * to_float(s_rows[buf][tt][1][g]) +
             h.z * to_float(s_rows[buf][tt][2][g]) + h.w * to_float(s_rows[buf][tt][3][g]);
      const float* q = s_q[buf][tt];
#pragma unroll
      for (int m4 = 0; m4 < nc / 4; ++m4) {
        const float4 q4 = *reinterpret_cast<const float4*>(q + 4 * m4);
        const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          out += w[4 * m4 + k] * qv[k];
          dw[4 * m4 + k] += x * qv[k];
        }
      }
      out -= q[nc] * x;
      dX[((b0 + tt) * n + i) * lddx + c] = from_float<S>(out);
    }
    __syncthreads();  // the buffer is refilled by the next iteration's issue
  }
  float* dst = dW_part + static_cast<Index>(blockIdx.y) * n * C * nc;
#pragma unroll
  for (int m = 0; m < nc; ++m) dst[(i * C + c) * nc + m] = dw[m];
}

// ---- input gradient on the tensor cores (n = 4, bf16) --------------------------------------------

inline constexpr int kMmaStrip = 64;   // channels of a block (all 4 streams)
inline constexpr int kMmaStage = 16;   // tokens per shared-memory stage (= one record group)
inline constexpr int kMmaStages = 4;   // stages in the ring (3 in flight while one is computed)
inline constexpr int kMmaRowBytes = kMmaStrip * 2;            // one 64-channel bf16 row strip
inline constexpr int kMmaTokenBytes = 9 * kMmaRowBytes + 64;  // G (4), X (4), du; see mma_swz
inline constexpr int kMmaStageBytes = kMmaStage * kMmaTokenBytes + kRecBytes;
inline constexpr int kMmaOutBytes = kMmaStage * 4 * kMmaRowBytes;  // one stage's dX tile
inline constexpr int kMmaSmemBytes = kMmaStages * kMmaStageBytes + 2 * kMmaOutBytes;

/// Byte offset of 16-byte piece `chunk` (0..7) of a row strip of stage token t. The token stride
/// (1216 bytes, 16 banks mod 32) keeps two tokens' 64-byte halves apart; the XOR on the chunk
/// spreads the 8 token rows an ldmatrix reads over all 32 banks.
__device__ __forceinline__ int mma_swz(int t, int row, int chunk) {
  return t * kMmaTokenBytes + row * kMmaRowBytes + ((chunk ^ ((t >> 1) & 3)) << 4);
}

__device__ __forceinline__ void mma_bf16_1688(float (&d)[4], unsigned a0, unsigned a1,
                                              unsigned b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

/// (x, y) -> bf16x2 words hi = (bf16(x), bf16(y)) and lo = the bf16 of the remainders, so that
/// hi + lo carries ~16 significant bits of each value (x in the low half, as mma expects).
__device__ __forceinline__ void split_bf16x2(float x, float y, unsigned& hi, unsigned& lo) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  const float2 hf = __bfloat1622float2(h);
  const __nv_bfloat162 l = __floats2bfloat162_rn(x - hf.x, y - hf.y);
  hi = *reinterpret_cast<const unsigned*>(&h);
  lo = *reinterpret_cast<const unsigned*>(&l);
}

/// 16 bytes of shared memory as four floats in one load (the compiler splits a float4 read of a
/// computed shared address into four).
__device__ __forceinline__ float4 lds_float4(const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(a));
  return v;
}

/// Four transposed 8x8 bf16 tiles from shared memory (lane l gives the address of row l % 8 of
/// tile l / 8).
__device__ __forceinline__ void ldmatrix_x4_trans(const void* smem, unsigned& r0, unsigned& r1,
                                                  unsigned& r2, unsigned& r3) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a));
}

/// The fused layer case of the input-gradient pass for n = 4, bf16, C % 64 == 0, 16-byte rows,
/// with both products with W on the tensor cores. Block = 8 warps on a 64-channel strip; warp w
/// owns channels 8w .. 8w + 7 of the strip in all four streams, for a chunk of whole 16-token
/// groups. Per stage (one group) the G, X, du strips and the group record arrive by cp.async in
/// a 4-stage ring (2-3 stages in flight, one barrier per stage). A stage's dX tile (16 tokens x
/// 4 streams x 64 channels) goes through shared memory (double-buffered) and leaves in the next
/// stage as full 128-byte rows, 16 bytes per lane (direct 4-byte stores filled half sectors).
///   P = Q W^T       16 tokens x 32 columns per warp (n-tile = stream, column = channel),
///                   k = 24 (16 + 8): Q and W each as bf16 hi + lo, products hi hi + hi lo +
///                   lo hi (~2^-16 relative).
///   dX = P + H_res^T G + h_pre du^T - beta X    fp32, one bf16 rounding. A lane holds the same
///                   2 channels of all 4 streams, so each G and du value is unpacked once.
///   dW_part += X^T Q   32 rows (2 streams x 8 channels per m-tile) x 24, k = 16 tokens: X exact
///                   in bf16 (ldmatrix.trans), Q hi + lo; accumulated in registers over the chunk.
/// The W fragments of a warp's channels stay in registers for the whole chunk.
template <int Unused = 0>
__global__ void __launch_bounds__(256, 2)
    input_grad_mma_kernel(Index T, Index C, const __nv_bfloat16* __restrict__ G, Index ldg,
                          const __nv_bfloat16* __restrict__ du, Index ldu,
                          const __nv_bfloat16* __restrict__ X, Index ldx,
                          const float* __restrict__ W, const unsigned char* __restrict__ rec,
                          __nv_bfloat16* __restrict__ dX, Index lddx, Index tokens_per_chunk,
                          float* __restrict__ dW_part) {
  pdl_wait();
  constexpr int n = 4, nc = 24;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
  const Index c0 = static_cast<Index>(blockIdx.x) * kMmaStrip;
  const Index cw = c0 + 8 * warp;  // the warp's 8 channels
  const Index t_begin = blockIdx.y * tokens_per_chunk;  // a multiple of kMmaStage
  const Index t_end = t_begin + tokens_per_chunk < T ? t_begin + tokens_per_chunk : T;

  // W^T fragments (B operand: k = m, n = column): n-tile s is stream s, column g channel cw + g.
  // Columns of W: {2q, 2q+1}, {2q+8, 2q+9} (k16 step) and {16+2q, 17+2q} (k8 step), hi and lo.
  unsigned wh[4][3], wl[4][3];
#pragma unroll
  for (int st = 0; st < 4; ++st) {
    const float* w = W + (st * C + cw + g) * nc + 2 * q;
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      const float2 v = __ldg(reinterpret_cast<const float2*>(w + 8 * s));
      split_bf16x2(v.x, v.y, wh[st][s], wl[st][s]);
    }
  }
  float dw[2][3][4];
#pragma unroll
  for (int kt = 0; kt < 2; ++kt)
#pragma unroll
    for (int nt = 0; nt < 3; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dw[kt][nt][e] = 0.f;

  const int stages = static_cast<int>((t_end - t_begin + kMmaStage - 1) / kMmaStage);
  // Copy roles, fixed for the whole chunk so that a stage costs a few adds per piece: threads
  // 0-127 copy the G rows (4 tokens x 4 rows x 8 pieces per pass, 4 passes) and the du row (one
  // piece), threads 128-255 the X rows likewise and the group record (324 pieces).
  const int ct = threadIdx.x & 127;
  const bool x_role = threadIdx.x >= 128;
  const int c_tt = ct >> 5, c_r = (ct >> 3) & 3, c_pc = ct & 7;  // token (+4 per pass), row, piece
  const Index ld_rows = x_role ? ldx : ldg;
  const unsigned char* row_src = reinterpret_cast<const unsigned char*>(
      (x_role ? X : G) + ((t_begin + c_tt) * n + c_r) * ld_rows + c0 + 8 * c_pc);
  const Index row_step = 4 * n * ld_rows * 2;  // 4 tokens, bytes
  const int du_tt = ct >> 3;
  const unsigned char* du_src =
      reinterpret_cast<const unsigned char*>(du + (t_begin + du_tt) * ldu + c0 + 8 * c_pc);
  const unsigned char* rec_src = rec + (t_begin / kRecGroup) * kRecBytes + 16 * ct;
  const int row_slot = x_role ? n + c_r : c_r;
  const int left0 = static_cast<int>(t_end - t_begin);  // tokens of the chunk
  auto issue = [&](int st) {
    if (st < stages) {
      unsigned char* base = smem + (st % kMmaStages) * kMmaStageBytes;
      const int left = left0 - st * kMmaStage;  // live tokens of this stage: tt < left
      const Index adv = static_cast<Index>(st) * 4;  // passes of 4 tokens before this stage
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tt = c_tt + 4 * j;
        cp_async16(base + mma_swz(tt, row_slot, c_pc), row_src + (adv + j) * row_step,
                   tt < left ? 16 : 0);
      }
      if (!x_role) {
        cp_async16(base + mma_swz(du_tt, 2 * n, c_pc),
                   du_src + static_cast<Index>(st) * kMmaStage * ldu * 2, du_tt < left ? 16 : 0);
      } else {
        const unsigned char* src = rec_src + static_cast<Index>(st) * kRecBytes;
        unsigned char* dst = base + kMmaStage * kMmaTokenBytes + 16 * ct;
#pragma unroll
        for (int j = 0; j < 3; ++j)
          if (ct + 128 * j < kRecBytes / 16) cp_async16(dst + 2048 * j, src + 2048 * j, 16);
      }
    }
    __pipeline_commit();  // possibly empty, so that every iteration waits on the same count
  };

  // dX tiles: row tt * 4 + i (token tt, stream i) of 8 16-byte chunks, chunk k at k ^ (tt & 7)
  // so that the 8 tokens a warp writes at once fall on different banks.
  unsigned char* out_tiles = smem + kMmaStages * kMmaStageBytes;
  const auto out_off = [](int tt, int i, int chunk) {
    return (tt * 4 + i) * kMmaRowBytes + ((chunk ^ (tt & 7)) << 4);
  };
  // Copies the dX tile of stage st (written by all warps before the last barrier) out: thread k
  // takes pieces k and k + 256 (row = piece / 8, chunk = piece % 8): a warp stores 4 full rows.
  const auto store_tile = [&](int st) {
    const unsigned char* tile = out_tiles + (st & 1) * kMmaOutBytes;
    const Index b0 = t_begin + static_cast<Index>(st) * kMmaStage;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int piece = threadIdx.x + 256 * j, row = piece >> 3, chunk = piece & 7;
      const int tt = row >> 2, i = row & 3;
      if (b0 + tt < t_end)
        *reinterpret_cast<uint4*>(dX + ((b0 + tt) * n + i) * lddx + c0 + 8 * chunk) =
            *reinterpret_cast<const uint4*>(tile + out_off(tt, i, chunk));
    }
  };

#pragma unroll
  for (int st = 0; st < kMmaStages - 1; ++st) issue(st);
  for (int st = 0; st < stages; ++st) {
    __pipeline_wait_prior(kMmaStages - 2);  // this stage's copies are done (this thread's) ...
    __syncthreads();  // ... and everyone's; every warp is also done with the previous stage,
    issue(st + kMmaStages - 1);  // whose buffer this refills
    if (st > 0) store_tile(st - 1);  // complete at this barrier; this stage writes the other tile
    const unsigned char* base = smem + (st % kMmaStages) * kMmaStageBytes;
    const unsigned char* rg = base + kMmaStage * kMmaTokenBytes;  // the group record
    const auto word = [&](int off, int idx) {
      return reinterpret_cast<const unsigned*>(rg + off)[idx];
    };
    const Index b0 = t_begin + static_cast<Index>(st) * kMmaStage;

    // dW_part[k][m] += sum_t X[t][k] Q[t][m]: A = X^T by ldmatrix.trans (m-tile kt: rows 0-7 =
    // stream 2kt, rows 8-15 = stream 2kt + 1, channels cw .. cw + 7), B = Q from the m-major
    // record (b0 = Q[2q, 2q+1][m], b1 = Q[2q+8, 2q+9][m], m = 8 nt + g).
    {
      unsigned a[2][4];
      const int mat = lane >> 3, r = lane & 7, t = r + (mat >> 1) * 8;
#pragma unroll
      for (int kt = 0; kt < 2; ++kt)
        ldmatrix_x4_trans(base + mma_swz(t, n + 2 * kt + (mat & 1), warp), a[kt][0], a[kt][1],
                          a[kt][2], a[kt][3]);
#pragma unroll
      for (int lo = 1; lo >= 0; --lo)
#pragma unroll
        for (int nt = 0; nt < 3; ++nt) {
          const int off = lo ? kRecQbLo : kRecQbHi, m = 8 * nt + g;
          const unsigned b0w = word(off, m * 12 + q), b1w = word(off, m * 12 + q + 4);
#pragma unroll
          for (int kt = 0; kt < 2; ++kt)
            mma_bf16_16816(dw[kt][nt], a[kt][0], a[kt][1], a[kt][2], a[kt][3], b0w, b1w);
        }
    }

    // P = Q W^T for tokens g, g + 8: A = Q from the token-major record.
    float acc[4][4];  // [stream][token g: 0, 1; token g + 8: 2, 3]
    {
      unsigned ah[6], al[6];
#pragma unroll
      for (int s = 0; s < 3; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          ah[2 * s + h] = word(kRecQaHi, (g + 8 * h) * 12 + q + 4 * s);
          al[2 * s + h] = word(kRecQaLo, (g + 8 * h) * 12 + q + 4 * s);
        }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
        mma_bf16_16816(acc[nt], al[0], al[1], al[2], al[3], wh[nt][0], wh[nt][1]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
        mma_bf16_16816(acc[nt], ah[0], ah[1], ah[2], ah[3], wl[nt][0], wl[nt][1]);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma_bf16_1688(acc[nt], al[4], al[5], wh[nt][2]);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma_bf16_1688(acc[nt], ah[4], ah[5], wl[nt][2]);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
        mma_bf16_16816(acc[nt], ah[0], ah[1], ah[2], ah[3], wh[nt][0], wh[nt][1]);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma_bf16_1688(acc[nt], ah[4], ah[5], wh[nt][2]);
    }

    // dX for tokens g, g + 8, channels cw + 2q, +1, all four streams, into the stage's tile.
    unsigned char* tile = out_tiles + (st & 1) * kMmaOutBytes;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = g + 8 * h;
      if (b0 + t >= t_end) continue;
      const float beta = reinterpret_cast<const float*>(rg + kRecBeta)[t];
      const float4 hp = lds_float4(rg + kRecHpre + 16 * t);
      const auto pair = [&](int row) {
        return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
            base + mma_swz(t, row, warp) + 4 * q));
      };
      const float2 g0 = pair(0), g1 = pair(1), g2 = pair(2), g3 = pair(3), d = pair(2 * n);
#pragma unroll
      for (int i = 0; i < n; ++i) {
        const float4 ht = lds_float4(rg + kRecHt + 16 * (t * 4 + i));
        const float hpi = i == 0 ? hp.x : i == 1 ? hp.y : i == 2 ? hp.z : hp.w;
        const float2 x = pair(n + i);
        float2 o;  // one fma per term, starting from P
        o.x = fmaf(ht.x, g0.x, acc[i][2 * h]);
        o.y = fmaf(ht.x, g0.y, acc[i][2 * h + 1]);
        o.x = fmaf(ht.y, g1.x, o.x), o.y = fmaf(ht.y, g1.y, o.y);
        o.x = fmaf(ht.z, g2.x, o.x), o.y = fmaf(ht.z, g2.y, o.y);
        o.x = fmaf(ht.w, g3.x, o.x), o.y = fmaf(ht.w, g3.y, o.y);
        o.x = fmaf(hpi, d.x, o.x), o.y = fmaf(hpi, d.y, o.y);
        o.x = fmaf(-beta, x.x, o.x), o.y = fmaf(-beta, x.y, o.y);
        *reinterpret_cast<__nv_bfloat162*>(tile + out_off(t, i, warp) + 4 * q) =
            __floats2bfloat162_rn(o.x, o.y);
      }
    }
  }
  __pipeline_wait_prior(0);
  __syncthreads();  // the last stage's dX tile is complete
  if (stages > 0) store_tile(stages - 1);

  float* dstw = dW_part + static_cast<Index>(blockIdx.y) * n * C * nc;
#pragma unroll
  for (int kt = 0; kt < 2; ++kt)
#pragma unroll
    for (int nt = 0; nt < 3; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<float2*>(dstw + ((2 * kt + h) * C + cw + g) * nc + 8 * nt + 2 * q) =
            make_float2(dw[kt][nt][2 * h], dw[kt][nt][2 * h + 1]);
}

// ---- launch plans (sizes only; shared by the launchers and the workspace queries) --------------

template <typename S>
inline bool use_mma(int n, Index C, const S* X, Index ldx) {
  return std::is_same<S, __nv_bfloat16>::value && n == 4 && C % kMmaChunk == 0 &&
         (X == nullptr || (aligned(X, 16) && ldx % kVec == 0));
}

struct ProjectionPlan {
  bool mma;
  int blocks_x, splits, blocks_z;
};

inline ProjectionPlan projection_plan(int n, Index T, Index C, bool mma, bool vec) {
  ProjectionPlan pl{};
  pl.mma = mma;
  const int nc = coef_count(n);
  if (pl.mma) {
    pl.blocks_x = ceil_div(T, kMmaTokens);
    pl.blocks_z = 1;
    // The splits that fill whole waves of kMmaResident blocks best (a partial last wave runs at
    // a fraction of the bandwidth); ties go to fewer splits (fewer partials to sum).
    const int max_splits = static_cast<int>(C / kMmaChunk / 4 > 1 ? C / kMmaChunk / 4 : 1);
    pl.splits = 1;
    double best = 0.0;
    for (int s = 1; s <= max_splits && s <= 16; ++s) {
      const long long blocks = static_cast<long long>(pl.blocks_x) * s;
      const long long waves = (blocks + kMmaResident - 1) / kMmaResident;
      const double fill = static_cast<double>(blocks) / static_cast<double>(waves * kMmaResident);
      if (fill > best + 1e-9) best = fill, pl.splits = s;
    }
  } else {
    pl.blocks_x = ceil_div(T, kProjTokens);
    pl.blocks_z = ceil_div(nc, n == 4 ? 24 : 16);
    const Index nvec = vec ? C / kVec : C;
    const int max_splits = static_cast<int>(nvec / 256 > 1 ? nvec / 256 : 1);
    const int want = ceil_div(kTargetBlocks, static_cast<Index>(pl.blocks_x) * pl.blocks_z);
    pl.splits = want < max_splits ? want : max_splits;
  }
  if (pl.splits < 1) pl.splits = 1;
  return pl;
}

struct InputGradPlan {
  int groups, blocks_x, chunks;
  Index tokens_per_chunk;
};

inline InputGradPlan input_grad_plan(Index T, Index C) {
  InputGradPlan pl{};
  pl.groups = kGradGroups;  // one channel per thread: W row and dW take 2 (n^2 + 2n) registers
  pl.blocks_x = ceil_div(C, pl.groups);
  const Index max_chunks = (T + kGradTokens - 1) / kGradTokens;
  Index chunks = ceil_div(2 * kTargetBlocks, pl.blocks_x);
  if (chunks > max_chunks) chunks = max_chunks;
  if (chunks < 1) chunks = 1;
  pl.tokens_per_chunk = (T + chunks - 1) / chunks;
  if (pl.tokens_per_chunk < 1) pl.tokens_per_chunk = 1;
  pl.chunks = ceil_div(T > 0 ? T : 1, pl.tokens_per_chunk);
  return pl;
}

/// Grid of input_grad_mma_kernel: 64-channel strips x token chunks (whole stages), about two
/// blocks per multiprocessor of an H200 in one wave. Sizes only, so the sums' order (and bits)
/// never depend on the device.
inline InputGradPlan mma_grad_plan(Index T, Index C) {
  InputGradPlan pl{};
  pl.groups = kMmaStrip;
  pl.blocks_x = ceil_div(C, kMmaStrip);
  const Index stages = (T + kMmaStage - 1) / kMmaStage;
  Index chunks = (kTargetBlocks / 2) / pl.blocks_x;
  if (chunks > stages) chunks = stages;
  if (chunks < 1) chunks = 1;
  pl.tokens_per_chunk = (stages + chunks - 1) / chunks * kMmaStage;
  pl.chunks = ceil_div(T > 0 ? T : 1, pl.tokens_per_chunk);
  return pl;
}

template <typename S>
inline bool use_mma_grad(int n, Index C, const S* G, Index ldg, const S* du, Index ldu,
                         const S* X, Index ldx, const S* dX, Index lddx) {
  return std::is_same<S, __nv_bfloat16>::value && n == 4 && C % kMmaStrip == 0 && G != nullptr &&
         du != nullptr && vec_ok(G, ldg) && vec_ok(du, ldu) && vec_ok(X, ldx) && vec_ok(dX, lddx);
}

/// uint4 fragments of one bf16 copy (hi or lo) of the packed W (n = 4, C % 64 == 0).
inline std::size_t packed_w_fragments(Index C) {
  return static_cast<std::size_t>(4) * (C / kMmaChunk) * kMmaNT * 2 * 32;
}

struct ForwardWorkspace {
  float* part;
  uint4* w_hi;  // packed W: hi fragments, then lo (launch_pack_w)
};

inline ForwardWorkspace forward_workspace(Carve& cv, int n, Index T, Index C, bool mma, bool vec) {
  const ProjectionPlan pl = projection_plan(n, T, C, mma, vec);
  ForwardWorkspace ws{};
  ws.part = cv.take<float>(static_cast<std::size_t>(pl.splits) * T * (coef_count(n) + 1));
  if (pl.mma) {
    ws.w_hi = cv.take<uint4>(2 * packed_w_fragments(C));  // hi, then lo
  }
  return ws;
}

struct BackwardWorkspace {
  float* qb;
  float* tok;
  unsigned char* rec;  // 16-token group records of input_grad_mma_kernel (n = 4 only)
  float* scratch;
  float* dW_part;
  int scratch_len;
};

inline BackwardWorkspace backward_workspace(Carve& cv, int n, Index T, Index C, int iterations) {
  const int nc = coef_count(n);
  BackwardWorkspace ws{};
  ws.scratch_len =
      iterations > kLocalIterations ? mhc::detail::coefficient_backward_scratch(n, iterations) : 0;
  ws.qb = cv.take<float>(static_cast<std::size_t>(T) * (nc + 1));
  ws.tok = cv.take<float>(static_cast<std::size_t>(ceil_div(T, 32)) * (3 + nc));
  ws.scratch = cv.take<float>(static_cast<std::size_t>(T) * ws.scratch_len);
  ws.rec = n == 4 ? cv.take<unsigned char>(static_cast<std::size_t>((T + kRecGroup - 1) / kRecGroup) *
                                           kRecBytes)
                  : nullptr;
  int chunks = input_grad_plan(T, C).chunks;
  if (n == 4 && C % kMmaStrip == 0 && mma_grad_plan(T, C).chunks > chunks)
    chunks = mma_grad_plan(T, C).chunks;
  ws.dW_part = cv.take<float>(static_cast<std::size_t>(chunks) * n * C * nc);
  return ws;
}

inline Status check_params(int n, Index T, Index C, const MappingParams& p) {
  if (!streams_ok(n) || T < 0 || C < 1) return Status::kInvalidArgument;
  if (p.iterations < 0 || p.iterations > kMaxSinkhornIterations) return Status::kInvalidArgument;
  if (!(p.eps >= 0.f)) return Status::kInvalidArgument;
  if (!p.W || !p.alpha || !p.bias) return Status::kInvalidArgument;
  if (!aligned(p.W, 4) || !aligned(p.alpha, 4) || !aligned(p.bias, 4) ||
      !aligned(p.W_packed, 16))
    return Status::kMisalignedPointer;
  return Status::kSuccess;
}

template <typename P>
inline Status check_coefficients(const CoefficientsT<P>& c, Index T) {
  if (T == 0) return Status::kSuccess;
  if (!c.z || !c.r || !c.h_pre || !c.h_post || !c.H_res) return Status::kInvalidArgument;
  if (!aligned(c.z, 4) || !aligned(c.r, 4) || !aligned(c.h_pre, 4) || !aligned(c.h_post, 4) ||
      !aligned(c.H_res, 4))
    return Status::kMisalignedPointer;
  return Status::kSuccess;
}

/// W (fp32) -> the bf16 hi / lo fragments of the tensor-core projection, hi then lo.
inline void launch_pack_w(Index C, const float* W, uint4* hi, cudaStream_t stream) {
  const Index k_chunks = 4 * (C / kMmaChunk);
  launch(pack_w_kernel<>, elementwise_blocks(k_chunks * kMmaNT * 2 * 32), 256, 0, stream, k_chunks,
         coef_count(4), W, hi, hi + packed_w_fragments(C));
}

/// Most splits of the projection that one cluster of the fused projection + finalize takes (the
/// portable cluster size); more splits go through partials and coefficients_finalize_kernel.
inline constexpr int kMaxFusedSplits = 8;

/// Whether the fused projection was compiled for sm_90 or later (PTX of an older virtual
/// architecture, JIT-compiled for a newer GPU, has no cluster code). Queried once.
inline bool fused_projection_built() {
  static const bool built = [] {
    cudaFuncAttributes a{};
    return cudaFuncGetAttributes(&a, project_mma_kernel<true>) == cudaSuccess &&
           a.ptxVersion >= 90;
  }();
  return built;
}

/// Whether coefficients_forward finalizes inside the tensor-core projection (clusters: sm_90).
inline bool fused_finalize(const ProjectionPlan& pl) {
  return MHC_CUDA_CLUSTERS && pl.mma && pl.splits <= kMaxFusedSplits && device_major() >= 9 &&
         fused_projection_built();
}

/// The tensor-core pass over X of the coefficient forward (n = 4, bf16, C % 64 == 0): W packed
/// into the workspace unless p.W_packed already holds it (pack_weights), then the projection:
/// with `fused_out`, finalized into it (fused_finalize(pl) must hold), else its partials into
/// ws.part. Shared by the launcher and the benchmark's projection-only row.
inline Status launch_mma_projection(Index T, Index C, const __nv_bfloat16* X, Index ldx,
                                    const MappingParams& p, const ForwardWorkspace& ws,
                                    const ProjectionPlan& pl, const Coefficients* fused_out,
                                    cudaStream_t stream) {
  const auto kernel = fused_out ? project_mma_kernel<true> : project_mma_kernel<false>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kProjSmemBytes) !=
      cudaSuccess)
    return Status::kCudaError;
  const uint4* hi = static_cast<const uint4*>(p.W_packed);
  if (!hi) {
    launch_pack_w(C, p.W, ws.w_hi, stream);
    hi = ws.w_hi;
  }
  launch_clusters(kernel, dim3(pl.blocks_x, pl.splits), dim3(1, fused_out ? pl.splits : 1),
                  dim3(128), kProjSmemBytes, stream, T, C, X, ldx, hi,
                  hi + packed_w_fragments(C), pl.splits, ws.part, p,
                  fused_out ? *fused_out : Coefficients{});
  return Status::kSuccess;
}

}  // namespace detail

// ---- coefficients forward ----------------------------------------------------------------------

/// Workspace bytes coefficients_forward needs for these sizes, whatever the alignment of X.
template <typename S>
inline std::size_t coefficients_forward_workspace_size(int n, Index T, Index C) {
  if (!detail::streams_ok(n) || T < 0 || C < 1) return 0;
  std::size_t most = 0;
  for (int variant = 0; variant < 3; ++variant) {
    const bool mma = variant == 0 && detail::use_mma<S>(n, C, nullptr, 0);
    detail::Carve cv(nullptr);
    detail::forward_workspace(cv, n, T, C, mma, variant != 2);
    if (cv.bytes() > most) most = cv.bytes();
  }
  return most;
}

/// Bytes of W packed for coefficients_forward's tensor-core projection (MappingParams::W_packed):
/// its bf16 hi / lo fragments (384 C bytes, as many as W) for n = 4, storage bf16 and
/// C % 64 == 0, the only case with that path; 0 otherwise (nothing to pack).
template <typename S>
inline std::size_t packed_weights_size(int n, Index C) {
  if (!detail::use_mma<S>(n, C, static_cast<const S*>(nullptr), 0) || C < 1) return 0;
  return 2 * detail::packed_w_fragments(C) * sizeof(uint4);
}

/// Packs W (n C, n^2 + 2n) fp32 into `packed` (packed_weights_size<S>(n, C) bytes, 16-byte
/// aligned) for MappingParams::W_packed: the per-call W packing of coefficients_forward done
/// once per weight update instead (an inference engine packs once at load time; a training step
/// once after each optimizer update). The result is exactly what coefficients_forward would pack
/// itself, so its outputs do not change by a bit. kInvalidArgument where the path does not exist
/// (packed_weights_size is 0), for a null pointer or a too-small buffer; nothing is written then.
template <typename S>
inline Status pack_weights(int n, Index C, const float* W, void* packed, std::size_t packed_bytes,
                           cudaStream_t stream = 0) {
  using namespace detail;
  const std::size_t need = packed_weights_size<S>(n, C);
  if (need == 0 || !W || !packed || packed_bytes < need) return Status::kInvalidArgument;
  if (!aligned(W, 4) || !aligned(packed, 16)) return Status::kMisalignedPointer;
  launch_pack_w(C, W, static_cast<uint4*>(packed), stream);
  return last_launch_status();
}

/// X (T, n, C) rows of stride ldx (T * n rows) -> per-token coefficients (spec 2.1-2.5, Eqs.
/// 7-9): z, r, h_pre, h_post, H_res into `out` (fp32, dense). Deterministic.
template <typename S>
inline Status coefficients_forward(int n, Index T, Index C, const S* X, Index ldx,
                                   const MappingParams& p, const Coefficients& out,
                                   void* workspace, std::size_t workspace_bytes,
                                   cudaStream_t stream = 0) {
  static_assert(detail::is_storage_v<S>, "mhc::cuda: storage must be float or __nv_bfloat16");
  using namespace detail;
  MHC_CUDA_TRY(check_params(n, T, C, p));
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_coefficients(out, T));
  if (T == 0) return Status::kSuccess;
  if (workspace_bytes < coefficients_forward_workspace_size<S>(n, T, C))
    return Status::kWorkspaceTooSmall;
  if (!workspace) return Status::kInvalidArgument;
  const bool vec = C % kVec == 0 && vec_ok(X, ldx);
  const bool mma = use_mma(n, C, X, ldx);
  Carve cv(workspace);
  const ForwardWorkspace ws = forward_workspace(cv, n, T, C, mma, vec);
  const ProjectionPlan pl = projection_plan(n, T, C, mma, vec);
  if (pl.mma) {
    const bool fused = fused_finalize(pl);
    MHC_CUDA_TRY(launch_mma_projection(T, C, reinterpret_cast<const __nv_bfloat16*>(X), ldx, p,
                                       ws, pl, fused ? &out : nullptr, stream));
    if (fused) return last_launch_status();
  }
  return dispatch_streams(n, [&](auto nn) {
    constexpr int N = decltype(nn)::value;
    if (!pl.mma) {
      const dim3 grid(pl.blocks_x, pl.splits, pl.blocks_z);
      if (vec)
        launch(project_generic_kernel<N, kVec, S>, grid, 256, 0, stream, n, T, C, X, ldx, p.W,
               pl.splits, ws.part);
      else
        launch(project_generic_kernel<N, 1, S>, grid, 256, 0, stream, n, T, C, X, ldx, p.W,
               pl.splits, ws.part);
    }
    launch(coefficients_finalize_kernel<N>, ceil_div(T, kFinalizeTokens), kFinalizeTokens, 0,
           stream, n, T, C, pl.splits, ws.part, p, out);
    return last_launch_status();
  });
}

// ---- coefficients backward ---------------------------------------------------------------------

inline std::size_t coefficients_backward_workspace_size(int n, Index T, Index C, int iterations) {
  if (!detail::streams_ok(n) || T < 0 || C < 1 || iterations < 0 ||
      iterations > kMaxSinkhornIterations)
    return 0;
  detail::Carve cv(nullptr);
  detail::backward_workspace(cv, n, T, C, iterations);
  return cv.bytes();
}

namespace detail {

/// Shared by coefficients_backward and layer_backward: token kernel, input-gradient pass (with
/// the optional update and pre-mix terms), then the fixed-order sums of dW, dalpha, dbias.
template <typename S>
inline Status coefficients_backward_impl(int n, Index T, Index C, const S* G, Index ldg,
                                         const S* du, Index ldu, const S* X, Index ldx,
                                         const MappingParams& p, const ConstCoefficients& coef,
                                         const float* d_h_pre, const float* d_h_post,
                                         const float* d_H_res, S* dX, Index lddx, bool accumulate,
                                         float* dW, float* d_alpha, float* d_bias, Carve& cv,
                                         cudaStream_t stream) {
  const BackwardWorkspace ws = backward_workspace(cv, n, T, C, p.iterations);
  const bool mma = use_mma_grad(n, C, G, ldg, du, ldu, X, ldx, dX, lddx);
  const InputGradPlan pl = mma ? mma_grad_plan(T, C) : input_grad_plan(T, C);
  const int nc = coef_count(n);
  if (mma && cudaFuncSetAttribute(input_grad_mma_kernel<>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  kMmaSmemBytes) != cudaSuccess)
    return Status::kCudaError;
  return dispatch_streams(n, [&](auto nn) {
    constexpr int N = decltype(nn)::value;
    launch(coefficients_backward_token_kernel<N>, ceil_div(T, 32), 32, 0, stream, 
        n, T, C, p, coef, d_h_pre, d_h_post, d_H_res, ws.qb, ws.tok, mma ? ws.rec : nullptr,
        ws.scratch, ws.scratch_len);
    const dim3 grid(pl.blocks_x, pl.chunks);
    const int threads = n * kGradGroups;
    bool staged = false;
    if constexpr (N == 4) {
      if constexpr (std::is_same<S, __nv_bfloat16>::value) {
        if (mma)
          launch(input_grad_mma_kernel<>, grid, 256, kMmaSmemBytes, stream, 
              T, C, G, ldg, du, ldu, X, ldx, p.W, ws.rec, dX, lddx, pl.tokens_per_chunk,
              ws.dW_part);
      }
      staged = mma;
      if (!staged)
        staged = G && C % kGradGroups == 0 && vec_ok(G, ldg) && vec_ok(X, ldx) && vec_ok(du, ldu);
      if (staged && !mma)
        launch(input_grad_staged_kernel<S>, grid, threads, 0, stream, 
            T, C, G, ldg, du, ldu, X, ldx, p.W, coef, ws.qb, dX, lddx, pl.tokens_per_chunk,
            ws.dW_part);
    }
    if (!staged) {
      if (G)  // the fused layer backward: dX written from all three terms
        launch(input_grad_kernel<N, S, true, false>, grid, threads, 0, stream, 
            n, T, C, G, ldg, du, ldu, X, ldx, p.W, coef, ws.qb, dX, lddx, pl.tokens_per_chunk,
            ws.dW_part);
      else if (accumulate)
        launch(input_grad_kernel<N, S, false, true>, grid, threads, 0, stream, 
            n, T, C, G, ldg, du, ldu, X, ldx, p.W, coef, ws.qb, dX, lddx, pl.tokens_per_chunk,
            ws.dW_part);
      else
        launch(input_grad_kernel<N, S, false, false>, grid, threads, 0, stream, 
            n, T, C, G, ldg, du, ldu, X, ldx, p.W, coef, ws.qb, dX, lddx, pl.tokens_per_chunk,
            ws.dW_part);
    }
    // dW = sum of the chunk partials; tok rows are the token blocks' (dalpha (3), dbias (nc)):
    // one fixed-order column sum per output. One launch for both.
    const Index w_size = static_cast<Index>(n) * C * nc;
    const int chunk_blocks = elementwise_blocks(w_size);
    launch(parameter_sums_kernel<>, chunk_blocks + 3 + nc, 256, 0, stream, w_size, pl.chunks,
           ws.dW_part, dW, chunk_blocks, ceil_div(T, 32), 3 + nc, ws.tok, 3, d_alpha, d_bias);
    return last_launch_status();
  });
}

template <typename S>
inline Status check_grad_outputs(int n, Index T, Index C, const S* dX, Index lddx, const float* dW,
                                 const float* d_alpha, const float* d_bias) {
  MHC_CUDA_TRY(check_rows(dX, T * n, C, lddx));
  if (!dW || !d_alpha || !d_bias) return Status::kInvalidArgument;
  if (!aligned(dW, 4) || !aligned(d_alpha, 4) || !aligned(d_bias, 4))
    return Status::kMisalignedPointer;
  return Status::kSuccess;
}

/// With no tokens the parameter gradients are zero.
inline Status zero_parameter_grads(int n, Index C, float* dW, float* d_alpha, float* d_bias,
                                   cudaStream_t stream) {
  const std::size_t nc = coef_count(n);
  if (cudaMemsetAsync(dW, 0, static_cast<std::size_t>(n) * C * nc * sizeof(float), stream) !=
          cudaSuccess ||
      cudaMemsetAsync(d_alpha, 0, 3 * sizeof(float), stream) != cudaSuccess ||
      cudaMemsetAsync(d_bias, 0, nc * sizeof(float), stream) != cudaSuccess)
    return Status::kCudaError;
  return Status::kSuccess;
}

}  // namespace detail

/// Backward of coefficients_forward (spec section 3) given dh_pre, dh_post (T, n) and dH_res
/// (T, n, n), fp32 dense:
///   dX  = (accumulate ? dX : 0) + W (dz / r) - v (z . dz) / (n C r^2)     (T, n, C), stride lddx
///   dW  = sum_t v^T (dz / r)                     (n C, n^2 + 2n), written (not accumulated)
///   d_alpha (3), d_bias (n^2 + 2n) = sums over tokens, written.
/// The Sinkhorn iterates are recomputed from z; all sums over tokens run in a fixed order.
template <typename S>
inline Status coefficients_backward(int n, Index T, Index C, const S* X, Index ldx,
                                    const MappingParams& p, const ConstCoefficients& coef,
                                    const float* d_h_pre, const float* d_h_post,
                                    const float* d_H_res, S* dX, Index lddx, bool accumulate,
                                    float* dW, float* d_alpha, float* d_bias, void* workspace,
                                    std::size_t workspace_bytes, cudaStream_t stream = 0) {
  static_assert(detail::is_storage_v<S>, "mhc::cuda: storage must be float or __nv_bfloat16");
  using namespace detail;
  MHC_CUDA_TRY(check_params(n, T, C, p));
  MHC_CUDA_TRY(check_rows(X, T * n, C, ldx));
  MHC_CUDA_TRY(check_coefficients(coef, T));
  MHC_CUDA_TRY(check_grad_outputs(n, T, C, dX, lddx, dW, d_alpha, d_bias));
  if (T > 0 && (!d_h_pre || !d_h_post || !d_H_res)) return Status::kInvalidArgument;
  if (partial_overlap(dX, lddx, X, ldx, T * n, C) ||
      (static_cast<const void*>(dX) == static_cast<const void*>(X) && T > 0))
    return Status::kAliasing;
  if (T == 0) return zero_parameter_grads(n, C, dW, d_alpha, d_bias, stream);
  if (workspace_bytes < coefficients_backward_workspace_size(n, T, C, p.iterations))
    return Status::kWorkspaceTooSmall;
  if (!workspace) return Status::kInvalidArgument;
  Carve cv(workspace);
  return coefficients_backward_impl<S>(n, T, C, nullptr, 0, nullptr, 0, X, ldx, p, coef, d_h_pre,
                                       d_h_post, d_H_res, dX, lddx, accumulate, dW, d_alpha,
                                       d_bias, cv, stream);
}

}  // namespace mhc::cuda
