// mhc/cuda/common.cuh: what every CUDA launcher shares. Status codes, argument checks that run on
// the host before any launch (so bad arguments never leave the device in an error state), the
// run-time n -> template N dispatch, 8-element vector loads for bf16 and fp32 storage, fixed-order
// warp and block sums (deterministic), and the workspace carve-up.
//
// Conventions of every launcher in mhc/cuda/:
//   - raw device pointers, sizes, row strides in elements (>= C), a workspace pointer and its size
//     (query it with the matching *_workspace_size(); nothing is allocated), cudaStream_t last;
//   - storage S = float or __nv_bfloat16, compute in fp32;
//   - n in [1, kMaxCudaStreams]; n = 4 runs a specialised instantiation, other n a run-time one;
//   - C any size: a vectorised path (8 elements, 16-byte accesses) when C and every stride are
//     multiples of 8 and every pointer is 16-byte aligned, an element-wise path otherwise;
//   - reductions over channels and over tokens are two-stage with a fixed order: the same inputs
//     give the same bits on every run (no floating-point atomics).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "mhc/config.hpp"

/// Returns the status of `expr` from the enclosing launcher unless it is kSuccess.
#define MHC_CUDA_TRY(expr)                                                \
  do {                                                                    \
    const ::mhc::cuda::Status mhc_status_ = (expr);                       \
    if (mhc_status_ != ::mhc::cuda::Status::kSuccess) return mhc_status_; \
  } while (0)

namespace mhc::cuda {

/// Result of a launcher. Anything but kSuccess from argument checking means nothing was launched.
enum class Status : int {
  kSuccess = 0,
  kInvalidArgument,    ///< a size, n, t_max or stride is out of range, or a buffer is null
  kMisalignedPointer,  ///< a pointer is not aligned to its element type
  kWorkspaceTooSmall,  ///< workspace_bytes is below *_workspace_size()
  kAliasing,           ///< an output overlaps an input it may not share
  kCudaError,          ///< a CUDA call failed (launch error reported by cudaGetLastError)
};

inline const char* status_string(Status s) {
  switch (s) {
    case Status::kSuccess: return "success";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kMisalignedPointer: return "misaligned pointer";
    case Status::kWorkspaceTooSmall: return "workspace too small";
    case Status::kAliasing: return "forbidden aliasing between an output and an input";
    case Status::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

/// Largest n the CUDA kernels accept (register arrays are sized by it).
inline constexpr int kMaxCudaStreams = 8;

/// Parameters of the mHC mappings (spec sections 2.2-2.5), all device pointers, fp32:
///   W     (n C, n^2 + 2n) row-major, row index i * C + c (v = vec(X), RMSNorm gain folded in)
///   alpha (3): alpha_pre, alpha_post, alpha_res
///   bias  (n^2 + 2n): b_pre (n), b_post (n), b_res (n x n row-major)
struct MappingParams {
  const float* W = nullptr;
  const float* alpha = nullptr;
  const float* bias = nullptr;
  int iterations = 20;   ///< Sinkhorn t_max, in [0, kMaxSinkhornIterations]
  float eps = 1e-6f;     ///< eps_rms in r = sqrt(sum(v^2) / (n C) + eps)
  /// Optional (16-byte aligned): W as pack_weights (coefficients.cuh) wrote it for the same n
  /// and C. coefficients_forward then skips packing W on every call where its tensor-core path
  /// runs (n = 4, bf16, C % 64 == 0), and ignores it elsewhere. The caller repacks whenever W
  /// changes: a stale copy gives coefficients of the old W.
  const void* W_packed = nullptr;
};

/// Per-token coefficients produced by coefficients_forward and read by every other operator,
/// fp32, dense rows: z (T, n^2 + 2n), r (T), h_pre (T, n), h_post (T, n), H_res (T, n, n).
template <typename P>
struct CoefficientsT {
  P* z = nullptr;
  P* r = nullptr;
  P* h_pre = nullptr;
  P* h_post = nullptr;
  P* H_res = nullptr;
};
using Coefficients = CoefficientsT<float>;
using ConstCoefficients = CoefficientsT<const float>;

inline ConstCoefficients as_const(const Coefficients& c) {
  return {c.z, c.r, c.h_pre, c.h_post, c.H_res};
}

namespace detail {

inline constexpr int kVec = 8;  // elements per vector access (16 bytes of bf16, 32 of fp32)

template <typename S>
inline constexpr bool is_storage_v =
    std::is_same<S, float>::value || std::is_same<S, __nv_bfloat16>::value;

/// Number of projection outputs per token: n^2 + 2n.
__host__ __device__ constexpr int coef_count(int n) { return n * n + 2 * n; }

/// Compile-time bound for register arrays: N itself, or kMaxCudaStreams for the run-time case.
template <int N>
inline constexpr int max_streams_v = N > 0 ? N : kMaxCudaStreams;

// ---- element loads / stores (fp32 compute) -------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename S>
__device__ __forceinline__ S from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

/// Loads VEC consecutive elements (VEC = 1; 2 with 2-element alignment; kVec with 16-byte
/// alignment).
template <int VEC, typename S>
__device__ __forceinline__ void load_vec(const S* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(p[0]);
  } else if constexpr (VEC == 2) {
    float2 f;
    if constexpr (std::is_same<S, __nv_bfloat16>::value)
      f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    else
      f = *reinterpret_cast<const float2*>(p);
    v[0] = f.x;
    v[1] = f.y;
  } else if constexpr (std::is_same<S, __nv_bfloat16>::value) {
    static_assert(VEC == 8, "bf16 vectors are 8 wide");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 f = __bfloat1622float2(h[k]);
      v[2 * k] = f.x;
      v[2 * k + 1] = f.y;
    }
  } else {
    static_assert(VEC == 8, "fp32 vectors are 8 wide");
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
}

template <int VEC, typename S>
__device__ __forceinline__ void store_vec(S* p, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = from_float<S>(v[0]);
  } else if constexpr (VEC == 2) {
    if constexpr (std::is_same<S, __nv_bfloat16>::value)
      *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
    else
      *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
  } else if constexpr (std::is_same<S, __nv_bfloat16>::value) {
    uint4 raw;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int k = 0; k < 4; ++k) h[k] = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  } else {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
  }
}

// ---- programmatic dependent launch (sm_90+) ----------------------------------------------------
//
// Every kernel of mhc/cuda is launched with the programmatic-stream-serialization attribute
// (launch() below) and calls pdl_wait() before its first global-memory access: the next kernel of
// a launcher's chain is scheduled as the previous one retires instead of after a full launch
// round trip, and pdl_wait() (griddepcontrol.wait) returns only once the kernels before it have
// completed and flushed their writes. A kernel that follows a normal launch (a user kernel, a
// memset) simply starts after it. Kernels trigger their dependents implicitly, when their blocks
// exit; only the per-token finalize triggers early (pdl_trigger(), before its stores). Early
// triggers elsewhere were measured to hurt: the dependents' resident blocks, waiting in
// griddepcontrol.wait, slowed the projection by 23 us at T = 8192 and took the room of blocks of
// the kernels sized to fill the GPU in one wave. Below sm_90 both are no-ops and launch()
// launches plainly.

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// Compute capability major of the current device (0 when it cannot be queried), cached per
/// device, so a launch costs one cudaGetDevice, not an attribute query as well.
inline int device_major() {
  static std::atomic<signed char> cached[64];  // per device: 0 unknown, else major
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  const bool cacheable = device >= 0 && device < 64;
  if (cacheable) {
    const signed char c = cached[device].load(std::memory_order_relaxed);
    if (c != 0) return c;
  }
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return 0;
  if (cacheable) cached[device].store(static_cast<signed char>(major), std::memory_order_relaxed);
  return major;
}

/// Whether the current device takes programmatic dependent launches (compute capability >= 9;
/// define MHC_CUDA_NO_PDL to launch every kernel plainly).
inline bool pdl_supported() {
#ifdef MHC_CUDA_NO_PDL
  return false;
#else
  return device_major() >= 9;
#endif
}

/// Thread-block clusters (sm_90) need CUDA 12; with an older toolkit the kernels that use them
/// are never launched as such (detail::fused_finalize says no).
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12000
#define MHC_CUDA_CLUSTERS 1
#else
#define MHC_CUDA_CLUSTERS 0
#endif

/// kernel<<<grid, block, smem, stream>>>(args...) with programmatic stream serialization where the
/// device supports it, as thread-block clusters of `cluster` blocks unless that is 1 x 1 x 1
/// (clusters need compute capability 9; the caller checks). Errors surface through
/// last_launch_status() like a <<<>>> launch.
template <typename... Params, typename... Args>
inline void launch_clusters(void (*kernel)(Params...), dim3 grid, dim3 cluster, dim3 block,
                            std::size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[2];
  unsigned count = 0;
  if (pdl_supported()) {
    attr[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[count++].val.programmaticStreamSerializationAllowed = 1;
  }
#if MHC_CUDA_CLUSTERS
  if (cluster.x * cluster.y * cluster.z > 1) {
    attr[count].id = cudaLaunchAttributeClusterDimension;
    attr[count].val.clusterDim.x = cluster.x;
    attr[count].val.clusterDim.y = cluster.y;
    attr[count++].val.clusterDim.z = cluster.z;
  }
#else
  (void)cluster;
#endif
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = count;
  (void)cudaLaunchKernelEx(&cfg, kernel, static_cast<Params>(args)...);
}

/// launch_clusters without clusters.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem,
                   cudaStream_t stream, Args&&... args) {
  launch_clusters(kernel, grid, dim3(1, 1, 1), block, smem, stream, std::forward<Args>(args)...);
}

/// Hint: bring the 32-byte sector holding p into L2 (no register result, never faults on a valid
/// address; callers keep p inside their buffers).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// ---- deterministic sums ------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

/// Sums `count` per-thread values over the block (blockDim.x a multiple of 32, at most 1024) in a
/// fixed order; thread 0..count-1 ends with total[k] in `out` (shared, count floats) after the
/// call. `scratch` is shared memory of (blockDim.x / 32) * count floats.
template <int COUNT>
__device__ __forceinline__ void block_sum(const float (&v)[COUNT], int count, float* scratch,
                                          float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < COUNT; ++k) {
    if (k < count) {
      const float s = warp_sum(v[k]);
      if (lane == 0) scratch[warp * count + k] = s;
    }
  }
  __syncthreads();
  for (int k = threadIdx.x; k < count; k += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < warps; ++w) s += scratch[w * count + k];
    out[k] = s;
  }
  __syncthreads();
}

// ---- second stage of the two-stage reductions -------------------------------------------------

/// Per-token sums of split partials, in split order: part (splits, T, P) -> columns [0, w0) to
/// dst0 (T, w0) and [w0, P) to dst1 (T, P - w0) (dst1 may be null when w0 == P).
template <int Unused = 0>  // a template, so the header may enter several TUs
__global__ void split_sum_kernel(Index T, int splits, int P, const float* __restrict__ part,
                                 int w0, float* __restrict__ dst0, float* __restrict__ dst1) {
  pdl_wait();
  const Index total = T * P;
  for (Index k = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; k < total;
       k += static_cast<Index>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += part[sp * total + k];
    const Index t = k / P;
    const int j = static_cast<int>(k % P);
    if (j < w0)
      dst0[t * w0 + j] = s;
    else
      dst1[t * (P - w0) + (j - w0)] = s;
  }
}

/// The sums over tokens of the coefficient backward, one launch: blocks [0, chunk_blocks) give
/// out[k] = sum over chunks of part[chunk][k] (k < size, chunk order fixed: the dW partials of the
/// input-gradient pass); block chunk_blocks + j gives the column sum sum_t rows[t][j] over `count`
/// rows of `width` (a fixed tree over the block's threads) to out0[j] for j < w0, out1[j - w0]
/// otherwise (d_alpha and d_bias from the per-token values). Either part may be empty.
template <int Unused = 0>  // a template, so the header may enter several TUs
__global__ void __launch_bounds__(256)
    parameter_sums_kernel(Index size, int chunks, const float* __restrict__ part,
                          float* __restrict__ out, int chunk_blocks, Index count, int width,
                          const float* __restrict__ rows, int w0, float* __restrict__ out0,
                          float* __restrict__ out1) {
  pdl_wait();
  if (static_cast<int>(blockIdx.x) < chunk_blocks) {
    for (Index k = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; k < size;
         k += static_cast<Index>(chunk_blocks) * blockDim.x) {
      float s = 0.f;
      for (int ch = 0; ch < chunks; ++ch) s += part[ch * size + k];
      out[k] = s;
    }
    return;
  }
  __shared__ float scratch[8];
  __shared__ float total[1];
  const int j = static_cast<int>(blockIdx.x) - chunk_blocks;
  float v[1] = {0.f};
  for (Index t = threadIdx.x; t < count; t += blockDim.x) v[0] += rows[t * width + j];
  block_sum<1>(v, 1, scratch, total);
  if (threadIdx.x == 0) (j < w0 ? out0[j] : out1[j - w0]) = total[0];
}

inline int elementwise_blocks(Index work, int threads = 256) {
  const Index b = (work + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > 4096 ? 4096 : b));
}

// ---- host-side checks --------------------------------------------------------------------------

inline bool aligned(const void* p, std::size_t a) {
  return reinterpret_cast<std::uintptr_t>(p) % a == 0;
}

/// A (rows x C) storage view with row stride ld: non-null, element-aligned, ld >= C.
template <typename S>
inline Status check_rows(const S* p, Index rows, Index C, Index ld) {
  if (rows == 0) return Status::kSuccess;
  if (p == nullptr) return Status::kInvalidArgument;
  if (ld < C) return Status::kInvalidArgument;
  if (!aligned(p, alignof(S))) return Status::kMisalignedPointer;
  return Status::kSuccess;
}

/// Byte range [first, last) of a (rows x cols) view with row stride ld.
template <typename S>
inline bool overlap(const S* a, Index rows_a, Index ld_a, const void* b, std::size_t bytes_b,
                    Index cols) {
  if (rows_a == 0 || bytes_b == 0 || a == nullptr || b == nullptr) return false;
  const auto a0 = reinterpret_cast<std::uintptr_t>(a);
  const auto a1 = a0 + static_cast<std::uintptr_t>((rows_a - 1) * ld_a + cols) * sizeof(S);
  const auto b0 = reinterpret_cast<std::uintptr_t>(b);
  const auto b1 = b0 + bytes_b;
  return a0 < b1 && b0 < a1;
}

template <typename S>
inline std::size_t span_bytes(Index rows, Index cols, Index ld) {
  return rows == 0 ? 0 : static_cast<std::size_t>((rows - 1) * ld + cols) * sizeof(S);
}

/// Outputs may be the same buffer as an input (identical pointer and stride) or disjoint.
template <typename S>
inline bool partial_overlap(const S* out, Index ld_out, const S* in, Index ld_in, Index rows,
                            Index C) {
  if (static_cast<const void*>(out) == static_cast<const void*>(in) && ld_out == ld_in) return false;
  return overlap(out, rows, ld_out, in, span_bytes<S>(rows, C, ld_in), C);
}

inline bool vec_ok(const void* p, Index ld) {
  return p == nullptr || (aligned(p, 16) && ld % kVec == 0);
}

inline Status last_launch_status() {
  return cudaGetLastError() == cudaSuccess ? Status::kSuccess : Status::kCudaError;
}

inline int ceil_div(Index a, Index b) { return static_cast<int>((a + b - 1) / b); }

/// Number of blocks a launch aims for: 4 per multiprocessor of an H100/H200 (132). It depends only
/// on the problem size, never on the device, so the reduction order (and so the bits of every
/// result) is the same on any GPU.
inline constexpr int kTargetBlocks = 528;

/// Bump allocator over the caller's workspace (256-byte aligned pieces). With base == nullptr it
/// only counts, so *_workspace_size() and the launcher share one layout.
class Carve {
 public:
  explicit Carve(void* base) : base_(static_cast<char*>(base)) {}
  template <typename P>
  P* take(std::size_t count) {
    offset_ = (offset_ + 255) / 256 * 256;
    P* p = base_ ? reinterpret_cast<P*>(base_ + offset_) : nullptr;
    offset_ += count * sizeof(P);
    return p;
  }
  std::size_t bytes() const { return offset_; }

 private:
  char* base_;
  std::size_t offset_ = 0;
};

/// Calls f(std::integral_constant<int, N>) with N = 4 for n == 4 and N = Dynamic otherwise.
template <typename F>
inline Status dispatch_streams(int n, F&& f) {
  if (n == 4) return f(std::integral_constant<int, 4>{});
  return f(std::integral_constant<int, Dynamic>{});
}

inline bool streams_ok(int n) { return n >= 1 && n <= kMaxCudaStreams; }

}  // namespace detail
}  // namespace mhc::cuda
