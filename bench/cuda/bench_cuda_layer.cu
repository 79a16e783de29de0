// GPU benchmark of the mHC layer kernels (n = 4, bf16 storage) against a device-to-device copy
// measured in the same binary, and against a plain pre-norm MLP sublayer (cuBLAS bf16 GEMMs
// C -> 4C -> C, fp32 accumulation) so mHC's cost reads as a share of a real sublayer.
//   time:      the iterations are queued back-to-back in one stream, one pair of CUDA events
//              around each call, and the host waits only after the last (as in a model's stream,
//              and as nvbench or triton's do_bench time kernels: the launch latency of a call
//              from an idle GPU, ~5-10 us here, is not counted); manual time per iteration,
//              the summary uses the median. No L2 flush between calls: from T = 8192 on X is
//              several times the L2; the T <= 128 rows run from L2.
//   bytes_min: the spec's minimal bytes (section 6) for the op, each input read once and each
//              output written once; frac_copy = (bytes_min / time) / copy bandwidth
//   ops:       the launchers of mhc/cuda (coefficients, pre-mix, update, their backward, the
//              layer), plus coef_fwd_prepacked: the coefficient forward with W packed once
//              beforehand (MappingParams::W_packed, as an inference engine would), and
//              projection_fwd: the coefficient forward's pass over X alone (W packing +
//              tensor-core projection, no per-token finalize)
//   copy:      cudaMemcpyAsync device-to-device of a 1 GiB buffer, counted read + write
//   read:      a read-only stream over 1 GiB (16-byte loads, 4 in flight per thread, one float
//              written per block): the ceiling of an op that only reads, such as the coefficient
//              forward; frac_read = (bytes_min / time) / read bandwidth
// Prints a Markdown summary table last. Fixed seeds; inputs are random, never zeros.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mhc/cuda/layer.cuh"

namespace {

using bf16 = __nv_bfloat16;
using mhc::Index;

#define BENCH_CUDA(expr)                                                                    \
  do {                                                                                      \
    const cudaError_t e_ = (expr);                                                          \
    if (e_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                         \
    }                                                                                       \
  } while (0)
#define BENCH_OK(expr)                                                                   \
  do {                                                                                   \
    const mhc::cuda::Status s_ = (expr);                                                 \
    if (s_ != mhc::cuda::Status::kSuccess) {                                             \
      std::fprintf(stderr, "mhc error %s at %s:%d\n", mhc::cuda::status_string(s_), __FILE__, \
                   __LINE__);                                                            \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)
#define BENCH_BLAS(expr)                                                    \
  do {                                                                      \
    if ((expr) != CUBLAS_STATUS_SUCCESS) {                                  \
      std::fprintf(stderr, "cuBLAS error at %s:%d\n", __FILE__, __LINE__);  \
      std::exit(1);                                                         \
    }                                                                       \
  } while (0)

template <typename T>
struct Dev {
  T* p = nullptr;
  std::size_t n = 0;
  void alloc(std::size_t count) {
    n = count;
    BENCH_CUDA(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(T)));
  }
  ~Dev() {
    if (p) cudaFree(p);
  }
};

template <typename T>
__global__ void fill_kernel(T* p, std::size_t n, unsigned long long seed, float scale) {
  for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    unsigned long long z = seed + 0x9E3779B97F4A7C15ull * (k + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;
    p[k] = static_cast<T>(scale * u);
  }
}

template <typename T>
void fill(Dev<T>& d, unsigned long long seed, float scale) {
  fill_kernel<<<2048, 256>>>(d.p, d.n, seed, scale);
  BENCH_CUDA(cudaGetLastError());
}

// ---- plain pre-norm MLP sublayer: out = x + W2 gelu(W1 rmsnorm(x)) ---------------------------

__global__ void rmsnorm_kernel(const bf16* x, bf16* xn, float* inv_r, Index C) {
  const Index t = blockIdx.x;
  float ss = 0.f;
  for (Index c = threadIdx.x; c < C; c += blockDim.x) {
    const float v = __bfloat162float(x[t * C + c]);
    ss += v * v;
  }
  __shared__ float red[32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += red[w];
    red[0] = rsqrtf(s / static_cast<float>(C) + 1e-6f);
    inv_r[t] = red[0];
  }
  __syncthreads();
  const float ir = red[0];
  for (Index c = threadIdx.x; c < C; c += blockDim.x)
    xn[t * C + c] = __float2bfloat16_rn(__bfloat162float(x[t * C + c]) * ir);
}

/// dx = dout + (dxn - xn * mean(dxn * xn)) * inv_r   (RMSNorm backward plus the residual path)
__global__ void rmsnorm_backward_kernel(const bf16* dout, const bf16* dxn, const bf16* xn,
                                        const float* inv_r, bf16* dx, Index C) {
  const Index t = blockIdx.x;
  float dot = 0.f;
  for (Index c = threadIdx.x; c < C; c += blockDim.x)
    dot += __bfloat162float(dxn[t * C + c]) * __bfloat162float(xn[t * C + c]);
  __shared__ float red[32];
  for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = dot;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += red[w];
    red[0] = s / static_cast<float>(C);
  }
  __syncthreads();
  const float m = red[0], ir = inv_r[t];
  for (Index c = threadIdx.x; c < C; c += blockDim.x) {
    const float g = __bfloat162float(dxn[t * C + c]) - __bfloat162float(xn[t * C + c]) * m;
    dx[t * C + c] = __float2bfloat16_rn(__bfloat162float(dout[t * C + c]) + g * ir);
  }
}

__device__ __forceinline__ float gelu(float a) {
  return 0.5f * a * (1.f + tanhf(0.7978845608f * (a + 0.044715f * a * a * a)));
}
__device__ __forceinline__ float gelu_grad(float a) {
  const float k = 0.7978845608f, u = k * (a + 0.044715f * a * a * a), th = tanhf(u);
  return 0.5f * (1.f + th) + 0.5f * a * (1.f - th * th) * k * (1.f + 3.f * 0.044715f * a * a);
}
__global__ void gelu_kernel(const bf16* a, bf16* h, std::size_t n) {
  for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    h[k] = __float2bfloat16_rn(gelu(__bfloat162float(a[k])));
}
__global__ void gelu_backward_kernel(const bf16* a, bf16* dh, std::size_t n) {
  for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dh[k] = __float2bfloat16_rn(__bfloat162float(dh[k]) * gelu_grad(__bfloat162float(a[k])));
}

/// Row-major C (M x N) = op(A) op(B) + beta C, bf16 in and out, fp32 accumulation.
void gemm_rm(cublasHandle_t h, bool ta, bool tb, int M, int N, int K, const bf16* A, int lda,
             const bf16* B, int ldb, bf16* Cm, int ldc, float beta) {
  const float alpha = 1.f;
  BENCH_BLAS(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, N, M,
                          K, &alpha, B, CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, Cm,
                          CUDA_R_16BF, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---- per-size state --------------------------------------------------------------------------

constexpr int kN = 4, kNC = kN * kN + 2 * kN;

struct Problem {
  Index T = 0, C = 0;
  Dev<bf16> X, G, Xn, dX, y, u, du, dy;
  Dev<float> W, alpha, bias, z, r, h_pre, h_post, H_res, d_h_post, d_H_res, dW, d_alpha, d_bias;
  Dev<char> ws, W_packed;
  std::size_t ws_bytes = 0;
  mhc::cuda::MappingParams p, p_packed;  // p_packed: p with W packed once (pack_weights)
  mhc::cuda::Coefficients coef;
  // MLP
  Dev<bf16> mx, mxn, ma, mh, mout, mdout, mdh, mdxn, mdx, W1, W2, dW1, dW2;
  Dev<float> minv_r;
  cublasHandle_t blas = nullptr;

  Problem(Index T_, Index C_) : T(T_), C(C_) {
    const std::size_t tnc = static_cast<std::size_t>(T) * kN * C, tc = static_cast<std::size_t>(T) * C;
    for (auto* b : {&X, &G, &Xn, &dX}) b->alloc(tnc);
    for (auto* b : {&y, &u, &du, &dy}) b->alloc(tc);
    W.alloc(static_cast<std::size_t>(kN) * C * kNC);
    dW.alloc(W.n);
    alpha.alloc(3), bias.alloc(kNC), d_alpha.alloc(3), d_bias.alloc(kNC);
    z.alloc(T * kNC), r.alloc(T), h_pre.alloc(T * kN), h_post.alloc(T * kN);
    H_res.alloc(T * kN * kN), d_h_post.alloc(T * kN), d_H_res.alloc(T * kN * kN);
    fill(X, 1, 1.f), fill(G, 2, 1.f), fill(y, 3, 1.f), fill(du, 4, 1.f);
    fill(W, 5, std::sqrt(3.f / static_cast<float>(kN * C)));
    fill(alpha, 6, 0.5f), fill(bias, 7, 1.f);
    ws_bytes = std::max({mhc::cuda::layer_forward_pre_workspace_size<bf16>(kN, T, C),
                         mhc::cuda::update_backward_workspace_size(kN, T, C),
                         mhc::cuda::layer_backward_workspace_size(kN, T, C, 20)});
    ws.alloc(ws_bytes);
    p.W = W.p, p.alpha = alpha.p, p.bias = bias.p, p.iterations = 20, p.eps = 1e-6f;
    W_packed.alloc(mhc::cuda::packed_weights_size<bf16>(kN, C));
    BENCH_OK(mhc::cuda::pack_weights<bf16>(kN, C, W.p, W_packed.p, W_packed.n));
    p_packed = p;
    p_packed.W_packed = W_packed.p;
    coef = {z.p, r.p, h_pre.p, h_post.p, H_res.p};
    // MLP buffers
    for (auto* b : {&mx, &mxn, &mout, &mdout, &mdxn, &mdx}) b->alloc(tc);
    for (auto* b : {&ma, &mh, &mdh}) b->alloc(tc * 4);
    for (auto* b : {&W1, &W2, &dW1, &dW2}) b->alloc(static_cast<std::size_t>(C) * 4 * C);
    minv_r.alloc(T);
    fill(mx, 8, 1.f), fill(mdout, 9, 1.f);
    fill(W1, 10, 1.f / std::sqrt(static_cast<float>(C)));
    fill(W2, 11, 1.f / std::sqrt(static_cast<float>(4 * C)));
    BENCH_BLAS(cublasCreate(&blas));
    BENCH_CUDA(cudaDeviceSynchronize());
  }
  ~Problem() {
    if (blas) cublasDestroy(blas);
  }

  // mHC pieces (stream 0)
  void coefficients() {
    BENCH_OK(mhc::cuda::coefficients_forward<bf16>(kN, T, C, X.p, C, p, coef, ws.p, ws_bytes));
  }
  // The same with W packed once beforehand (MappingParams::W_packed): no per-call W packing.
  void coefficients_prepacked() {
    BENCH_OK(mhc::cuda::coefficients_forward<bf16>(kN, T, C, X.p, C, p_packed, coef, ws.p,
                                                   ws_bytes));
  }
  // The pass over X of the coefficient forward alone (n = 4, bf16, C % 64 == 0: W packing and
  // the tensor-core projection, without the per-token finalize), through the same workspace
  // layout and launch plan as coefficients_forward.
  void projection() {
    namespace d = mhc::cuda::detail;
    d::Carve cv(ws.p);
    const d::ForwardWorkspace w = d::forward_workspace(cv, kN, T, C, true, true);
    BENCH_OK(d::launch_mma_projection(T, C, X.p, C, p, w, d::projection_plan(kN, T, C, true, true),
                                      nullptr, nullptr));
    BENCH_CUDA(cudaGetLastError());
  }
  void pre_mix() { BENCH_OK(mhc::cuda::pre_mix_forward<bf16>(kN, T, C, X.p, C, h_pre.p, u.p, C)); }
  void update() {
    BENCH_OK(mhc::cuda::update_forward<bf16>(kN, T, C, X.p, C, y.p, C, h_post.p, H_res.p, Xn.p, C));
  }
  void update_backward() {
    BENCH_OK(mhc::cuda::update_backward<bf16>(kN, T, C, G.p, C, X.p, C, y.p, C, h_post.p, H_res.p,
                                              dy.p, C, nullptr, 0, false, d_h_post.p, d_H_res.p,
                                              ws.p, ws_bytes));
  }
  void layer_backward() {
    BENCH_OK(mhc::cuda::layer_backward<bf16>(kN, T, C, G.p, C, du.p, C, X.p, C, p,
                                             mhc::cuda::as_const(coef), d_h_post.p, d_H_res.p,
                                             dX.p, C, dW.p, d_alpha.p, d_bias.p, ws.p, ws_bytes));
  }
  void forward() {
    BENCH_OK(mhc::cuda::layer_forward_pre<bf16>(kN, T, C, X.p, C, p, coef, u.p, C, ws.p, ws_bytes));
    update();
  }
  void forward_backward() {
    forward();
    update_backward();
    layer_backward();
  }
  void copy() {
    BENCH_CUDA(cudaMemcpyAsync(Xn.p, X.p, X.n * sizeof(bf16), cudaMemcpyDeviceToDevice));
  }
  // MLP
  void mlp_forward() {
    const int t = static_cast<int>(T), c = static_cast<int>(C);
    rmsnorm_kernel<<<t, 256>>>(mx.p, mxn.p, minv_r.p, C);
    gemm_rm(blas, false, false, t, 4 * c, c, mxn.p, c, W1.p, 4 * c, ma.p, 4 * c, 0.f);
    gelu_kernel<<<4096, 256>>>(ma.p, mh.p, ma.n);
    BENCH_CUDA(cudaMemcpyAsync(mout.p, mx.p, mx.n * sizeof(bf16), cudaMemcpyDeviceToDevice));
    gemm_rm(blas, false, false, t, c, 4 * c, mh.p, 4 * c, W2.p, c, mout.p, c, 1.f);
  }
  void mlp_forward_backward() {
    mlp_forward();
    const int t = static_cast<int>(T), c = static_cast<int>(C);
    gemm_rm(blas, false, true, t, 4 * c, c, mdout.p, c, W2.p, c, mdh.p, 4 * c, 0.f);  // dH
    gemm_rm(blas, true, false, 4 * c, c, t, mh.p, 4 * c, mdout.p, c, dW2.p, c, 0.f);  // dW2
    gelu_backward_kernel<<<4096, 256>>>(ma.p, mdh.p, mdh.n);                           // dA
    gemm_rm(blas, false, true, t, c, 4 * c, mdh.p, 4 * c, W1.p, 4 * c, mdxn.p, c, 0.f);  // dXn
    gemm_rm(blas, true, false, c, 4 * c, t, mxn.p, c, mdh.p, 4 * c, dW1.p, 4 * c, 0.f);  // dW1
    rmsnorm_backward_kernel<<<t, 256>>>(mdout.p, mdxn.p, mxn.p, minv_r.p, mdx.p, C);
  }
};

std::unique_ptr<Problem> g_problem;
Problem& problem(Index T, Index C) {
  if (!g_problem || g_problem->T != T || g_problem->C != C) {
    g_problem.reset();
    g_problem = std::make_unique<Problem>(T, C);
  }
  return *g_problem;
}

double g_copy_bw = 0;  // bytes/s, read + write
double g_read_bw = 0;  // bytes/s, read only

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

/// Median seconds of `reps` timed runs of f after 3 warm-ups.
template <typename F>
std::vector<double> queued_times(F&& f, int reps) {
  std::vector<cudaEvent_t> ev(2 * static_cast<std::size_t>(reps));
  for (auto& e : ev) BENCH_CUDA(cudaEventCreate(&e));
  for (int k = 0; k < 3; ++k) f();
  BENCH_CUDA(cudaDeviceSynchronize());
  for (int k = 0; k < reps; ++k) {
    BENCH_CUDA(cudaEventRecord(ev[2 * k]));
    f();
    BENCH_CUDA(cudaEventRecord(ev[2 * k + 1]));
  }
  BENCH_CUDA(cudaEventSynchronize(ev.back()));
  BENCH_CUDA(cudaGetLastError());
  std::vector<double> s(static_cast<std::size_t>(reps));
  for (int k = 0; k < reps; ++k) {
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, ev[2 * k], ev[2 * k + 1]));
    s[k] = ms * 1e-3;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return s;
}

template <typename F>
double time_median(F&& f, int reps) {
  return median(queued_times(std::forward<F>(f), reps));
}

void measure_copy_bandwidth() {
  Dev<char> a, b;
  const std::size_t bytes = std::size_t(1) << 30;
  a.alloc(bytes), b.alloc(bytes);
  BENCH_CUDA(cudaMemset(a.p, 1, bytes));
  const double s = time_median(
      [&] { BENCH_CUDA(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice)); }, 20);
  g_copy_bw = 2.0 * static_cast<double>(bytes) / s;
}

/// Reads `count` uint4 (grid-stride, 4 loads in flight per thread) and writes one value per
/// block, so the loads cannot be dropped.
__global__ void read_stream_kernel(const uint4* __restrict__ src, std::size_t count,
                                   unsigned* __restrict__ out) {
  unsigned acc = 0;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x;
  for (; k + 3 * stride < count; k += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldg(src + k + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; k < count; k += stride) {
    const uint4 v = __ldg(src + k);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  for (int off = 16; off > 0; off >>= 1) acc ^= __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x == 0) out[blockIdx.x] = acc;
}

void measure_read_bandwidth() {
  Dev<char> a;
  Dev<unsigned> out;
  const std::size_t bytes = std::size_t(1) << 30;
  const int blocks = 132 * 8;
  a.alloc(bytes), out.alloc(blocks);
  BENCH_CUDA(cudaMemset(a.p, 1, bytes));
  const double s = time_median(
      [&] {
        read_stream_kernel<<<blocks, 256>>>(reinterpret_cast<const uint4*>(a.p), bytes / 16, out.p);
      },
      20);
  g_read_bw = static_cast<double>(bytes) / s;
}

struct Op {
  const char* name;
  double bytes_per_token_per_C;  // minimal bytes / (T C s), spec section 6, s = 2
  void (Problem::*run)();
};

// Minimal bytes per token, in units of C s (n = 4):
//   coefficients (and the projection pass alone): read X (n);  pre-mix: read X, write u (n + 1);
//   update: read X, y, write X' (2n + 1);  update backward: read G, X, y, write dy (2n + 2);
//   layer backward: read G, X, du, write dX (3n + 1);  layer forward (3n + 2);
//   layer forward + backward (3n + 2) + (5n + 4).
const Op kOps[] = {
    {"copy_X", 2.0 * kN, &Problem::copy},
    {"coefficients_fwd", kN, &Problem::coefficients},
    {"coef_fwd_prepacked", kN, &Problem::coefficients_prepacked},
    {"projection_fwd", kN, &Problem::projection},
    {"pre_mix_fwd", kN + 1, &Problem::pre_mix},
    {"update_fwd", 2 * kN + 1, &Problem::update},
    {"update_bwd", 2 * kN + 2, &Problem::update_backward},
    {"layer_bwd", 3 * kN + 1, &Problem::layer_backward},
    {"layer_fwd", 3 * kN + 2, &Problem::forward},
    {"layer_fwd_bwd", (3 * kN + 2) + (5 * kN + 4), &Problem::forward_backward},
    {"mlp_fwd", 0, &Problem::mlp_forward},
    {"mlp_fwd_bwd", 0, &Problem::mlp_forward_backward},
};

std::map<std::string, double> g_median;  // "op/T/C" -> seconds

void run_op(benchmark::State& state, const Op& op, Index T, Index C) {
  Problem& pb = problem(T, C);
  const std::vector<double> times =
      queued_times([&] { (pb.*op.run)(); }, static_cast<int>(state.max_iterations));
  std::size_t it = 0;
  for (auto _ : state) state.SetIterationTime(times[it++]);
  const double med = median(times);
  const double bytes = op.bytes_per_token_per_C * static_cast<double>(T) * C * sizeof(bf16);
  if (bytes > 0) {
    state.SetBytesProcessed(static_cast<int64_t>(bytes) * state.iterations());
    state.counters["bytes_min"] = bytes;
    state.counters["GBps_median"] = bytes / med * 1e-9;
    state.counters["frac_copy"] = bytes / med / g_copy_bw;
    state.counters["frac_read"] = bytes / med / g_read_bw;
  }
  state.counters["median_us"] = med * 1e6;
  state.SetItemsProcessed(static_cast<int64_t>(T) * state.iterations());
  g_median[std::string(op.name) + "/" + std::to_string(T) + "/" + std::to_string(C)] = med;
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  measure_copy_bandwidth();
  measure_read_bandwidth();
  std::vector<Index> Ts = {1, 128, 8192, 32768}, Cs = {2048, 4096, 7168};
  if (const char* quick = std::getenv("MHC_BENCH_QUICK"); quick && std::string(quick) == "1")
    Ts = {128, 8192}, Cs = {4096};
  for (const Index C : Cs)
    for (const Index T : Ts)
      for (const Op& op : kOps) {
        const std::string name =
            std::string(op.name) + "/T:" + std::to_string(T) + "/C:" + std::to_string(C);
        int iters = (op.bytes_per_token_per_C == 0 && T * C >= 8192 * 4096) ? 10 : 30;
        if (const char* it = std::getenv("MHC_BENCH_ITERS")) iters = std::atoi(it);
        benchmark::RegisterBenchmark(name.c_str(), [op, T, C](benchmark::State& s) {
          run_op(s, op, T, C);
        })->UseManualTime()->Iterations(iters)->Unit(benchmark::kMicrosecond);
      }
  benchmark::RunSpecifiedBenchmarks();
  g_problem.reset();

  // Summary (medians): fraction of copy bandwidth per kernel and mHC's share of an MLP sublayer.
  std::printf("\n## mhc CUDA summary (n = 4, bf16; copy %.0f GB/s read+write; read-only stream "
              "%.0f GB/s)\n\n",
              g_copy_bw * 1e-9, g_read_bw * 1e-9);
  std::printf("| C | T | coef fwd | coef fwd, W prepacked | projection | pre-mix fwd | update fwd | update bwd | layer bwd | "
              "layer fwd | layer fwd+bwd | MLP fwd | MLP fwd+bwd | mHC/MLP fwd | mHC/MLP fwd+bwd |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Index C : Cs)
    for (const Index T : Ts) {
      auto key = [&](const char* op) {
        return std::string(op) + "/" + std::to_string(T) + "/" + std::to_string(C);
      };
      if (!g_median.count(key("layer_fwd_bwd"))) continue;
      std::printf("| %lld | %lld |", static_cast<long long>(C), static_cast<long long>(T));
      for (const Op& op : kOps) {
        if (std::string(op.name) == "copy_X") continue;
        const double s = g_median[key(op.name)];
        if (op.bytes_per_token_per_C > 0) {
          const double bytes = op.bytes_per_token_per_C * static_cast<double>(T) * C * 2;
          std::printf(" %.1f us (%.0f%%) |", s * 1e6, 100.0 * bytes / s / g_copy_bw);
        } else {
          std::printf(" %.1f us |", s * 1e6);
        }
      }
      std::printf(" %.1f%% | %.1f%% |\n", 100.0 * g_median[key("layer_fwd")] / g_median[key("mlp_fwd")],
                  100.0 * g_median[key("layer_fwd_bwd")] / g_median[key("mlp_fwd_bwd")]);
    }
  std::printf("\nCoefficient forward (reads X only) against the read-only stream:");
  for (const Index C : Cs)
    for (const Index T : Ts) {
      const std::string k = "coefficients_fwd/" + std::to_string(T) + "/" + std::to_string(C);
      if (!g_median.count(k) || T < 8192) continue;
      const double bytes = kN * static_cast<double>(T) * C * 2;
      std::printf(" C %lld T %lld: %.0f%%;", static_cast<long long>(C), static_cast<long long>(T),
                  100.0 * bytes / g_median[k] / g_read_bw);
    }
  std::printf("\n");
  benchmark::Shutdown();
  return 0;
}
