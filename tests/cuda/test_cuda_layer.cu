// CUDA kernels of mhc/cuda/ against the double reference (tests/cuda/reference.hpp) on fresh
// random inputs with poisoned (NaN) outputs: coefficients, pre-mix, update, their backwards, and
// the fused layer backward; T in {1, 3, 8192}, C in {7, 4096, 7168}, n in {2, 4, 8}, fp32 and
// bf16 storage. Needs a GPU: CI only compiles it. MHC_CUDA_TEST_SMALL=1 shrinks the sizes (used
// under compute-sanitizer).
#define EIGEN_NO_CUDA  // Eigen (pulled in by the test support) stays host-only in this TU
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "mhc/cuda/layer.cuh"
#include "reference.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

namespace {

using mhc::Index;
using mhc::cuda::Status;
using namespace mhc_cuda_test;

#define CUDA_REQUIRE(expr) REQUIRE((expr) == cudaSuccess)

template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  std::size_t count = 0;
  explicit DeviceBuffer(std::size_t n) : count(n) {
    REQUIRE(cudaMalloc(&ptr, std::max<std::size_t>(n, 1) * sizeof(T)) == cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void poison() { CUDA_REQUIRE(cudaMemset(ptr, 0xFF, count * sizeof(T))); }  // NaN in fp32/bf16
  std::vector<T> download() const {
    std::vector<T> h(count);
    CUDA_REQUIRE(cudaMemcpy(h.data(), ptr, count * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void upload(const std::vector<T>& h) {
    REQUIRE(h.size() == count);
    CUDA_REQUIRE(cudaMemcpy(ptr, h.data(), count * sizeof(T), cudaMemcpyHostToDevice));
  }
};

double to_double(float x) { return x; }
double to_double(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }
template <typename S>
S from_double(double x);
template <>
float from_double<float>(double x) {
  return static_cast<float>(x);
}
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}

/// Counter-based uniform numbers in [-1, 1): fast enough for 10^9 values.
struct Uniform {
  std::uint64_t seed;
  double operator()(std::uint64_t k) const {
    std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (k + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<double>(z >> 11) * (2.0 / 9007199254740992.0) - 1.0;
  }
};

/// Fills a (rows, C) view with row stride ld (padding poisoned) in storage S, and returns the
/// stored values densely in double.
template <typename S>
std::vector<S> make_rows(Index rows, Index C, Index ld, const Uniform& rng, std::uint64_t stream,
                         double scale, std::vector<double>& dense) {
  std::vector<S> h(static_cast<std::size_t>(rows * ld), from_double<S>(std::nan("")));
  dense.resize(static_cast<std::size_t>(rows * C));
  for (Index r = 0; r < rows; ++r)
    for (Index c = 0; c < C; ++c) {
      const S v = from_double<S>(scale * rng((stream << 40) + static_cast<std::uint64_t>(r * C + c)));
      h[r * ld + c] = v;
      dense[r * C + c] = to_double(v);
    }
  return h;
}

template <typename S>
__global__ void count_nonfinite_kernel(const S* p, Index rows, Index cols, Index ld,
                                       unsigned long long* count) {
  for (Index k = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; k < rows * cols;
       k += static_cast<Index>(gridDim.x) * blockDim.x) {
    const float v = mhc::cuda::detail::to_float(p[(k / cols) * ld + k % cols]);
    if (!isfinite(v)) atomicAdd(count, 1ull);  // an integer count: order does not matter
  }
}

/// Number of non-finite elements in a (rows, cols) view: every output must have been written.
template <typename S>
unsigned long long count_nonfinite(const S* p, Index rows, Index cols, Index ld) {
  DeviceBuffer<unsigned long long> c(1);
  CUDA_REQUIRE(cudaMemset(c.ptr, 0, sizeof(unsigned long long)));
  count_nonfinite_kernel<<<1024, 256>>>(p, rows, cols, ld, c.ptr);
  CUDA_REQUIRE(cudaGetLastError());
  return c.download()[0];
}

/// Rows [r0, r0 + count) of a (.., cols) view with stride ld, densely in double.
template <typename S>
std::vector<double> fetch_rows(const S* p, Index r0, Index count, Index cols, Index ld) {
  std::vector<S> h(static_cast<std::size_t>(count * cols));
  CUDA_REQUIRE(cudaMemcpy2D(h.data(), cols * sizeof(S), p + r0 * ld, ld * sizeof(S),
                            cols * sizeof(S), count, cudaMemcpyDeviceToHost));
  std::vector<double> d(h.size());
  for (std::size_t k = 0; k < h.size(); ++k) d[k] = to_double(h[k]);
  return d;
}

/// max |got - want| / max(max |want|, floor) over one token's outputs.
double rel_error(const std::vector<double>& got, const std::vector<double>& want,
                 double floor = 1e-6) {
  REQUIRE(got.size() == want.size());
  double scale = floor, err = 0;
  for (std::size_t k = 0; k < want.size(); ++k) {
    scale = std::max(scale, std::abs(want[k]));
    const double e = std::abs(got[k] - want[k]);
    err = std::isnan(got[k]) ? std::numeric_limits<double>::infinity() : std::max(err, e);
  }
  return err / scale;
}

bool small_sizes() {
  const char* e = std::getenv("MHC_CUDA_TEST_SMALL");
  return e && std::string(e) == "1";
}

template <typename S>
constexpr double storage_tol() {
  return std::is_same<S, float>::value ? 2e-4 : 1.5e-2;
}

/// One full layer case: every launcher against the reference.
template <typename S>
void run_case(int n, Index T, Index C, std::uint64_t seed) {
  CAPTURE(n, T, C, seed, sizeof(S));
  const Uniform rng{seed};
  LayerInputs in;
  in.n = n, in.T = T, in.C = C, in.iterations = 20, in.eps = 1e-6;
  const int nc = in.nc();
  // Padded X and G rows: stride % 8 == 0 (vector path) except for n == 2 (element-wise path).
  const Index pad = (n == 2) ? 3 : 8;
  const Index ldx = C + pad, ldg = C + pad, ldo = C + pad;
  const auto hX = make_rows<S>(T * n, C, ldx, rng, 1, 1.0, in.X);
  const auto hy = make_rows<S>(T, C, C, rng, 2, 1.0, in.y);
  const auto hG = make_rows<S>(T * n, C, ldg, rng, 3, 1.0, in.G);
  const auto hdu = make_rows<S>(T, C, C, rng, 4, 1.0, in.du);
  // W ~ U(-a, a), a = sqrt(3 / (n C)): z of order 1. alpha and biases away from their inits so
  // every gate and the Sinkhorn map have non-trivial gradients.
  const double a = std::sqrt(3.0 / static_cast<double>(n * C));
  std::vector<float> hW(static_cast<std::size_t>(n * C * nc)), hbias(nc), halpha(3);
  in.W.resize(hW.size());
  for (std::size_t k = 0; k < hW.size(); ++k) {
    hW[k] = static_cast<float>(a * rng((5ull << 40) + k));
    in.W[k] = hW[k];
  }
  in.bias.resize(nc);
  for (int j = 0; j < nc; ++j) {
    hbias[j] = static_cast<float>(rng((6ull << 40) + j));
    in.bias[j] = hbias[j];
  }
  for (int k = 0; k < 3; ++k) {
    halpha[k] = static_cast<float>(0.5 + 0.3 * rng((7ull << 40) + k));
    in.alpha[k] = halpha[k];
  }

  DeviceBuffer<S> X(hX.size()), y(hy.size()), G(hG.size()), du(hdu.size());
  X.upload(hX), y.upload(hy), G.upload(hG), du.upload(hdu);
  DeviceBuffer<float> W(hW.size()), bias(nc), alpha(3);
  W.upload(hW), bias.upload(hbias), alpha.upload(halpha);
  mhc::cuda::MappingParams p;
  p.W = W.ptr, p.alpha = alpha.ptr, p.bias = bias.ptr, p.iterations = in.iterations;
  p.eps = static_cast<float>(in.eps);

  const std::size_t tn = static_cast<std::size_t>(T) * n;
  DeviceBuffer<float> z(T * nc), r(T), h_pre(tn), h_post(tn), H_res(tn * n);
  DeviceBuffer<S> u(T * C), Xn(tn * ldo), dy(T * C), dX(tn * ldx), dX_u(tn * ldx),
      dX_p(tn * ldx), dX_c(tn * ldx);
  DeviceBuffer<float> d_h_post(tn), d_H_res(tn * n), d_h_pre(tn), dW(W.count), d_alpha(3),
      d_bias(nc), dW2(W.count), d_alpha2(3), d_bias2(nc), dWc(W.count), d_alphac(3), d_biasc(nc);
  for (auto* b : {&z, &r, &h_pre, &h_post, &H_res, &d_h_post, &d_H_res, &d_h_pre, &dW, &d_alpha,
                  &d_bias, &dW2, &d_alpha2, &d_bias2, &dWc, &d_alphac, &d_biasc})
    b->poison();
  for (auto* b : {&u, &Xn, &dy, &dX, &dX_u, &dX_p, &dX_c}) b->poison();
  const mhc::cuda::Coefficients coef{z.ptr, r.ptr, h_pre.ptr, h_post.ptr, H_res.ptr};

  std::size_t ws_bytes = std::max({mhc::cuda::layer_forward_pre_workspace_size<S>(n, T, C),
                                    mhc::cuda::update_backward_workspace_size(n, T, C),
                                    mhc::cuda::pre_mix_backward_workspace_size(n, T, C),
                                    mhc::cuda::coefficients_backward_workspace_size(n, T, C, 20),
                                    mhc::cuda::layer_backward_workspace_size(n, T, C, 20)});
  DeviceBuffer<char> ws(ws_bytes);
  ws.poison();

  // Forward.
  REQUIRE(mhc::cuda::layer_forward_pre<S>(n, T, C, X.ptr, ldx, p, coef, u.ptr, C, ws.ptr,
                                          ws_bytes) == Status::kSuccess);
  REQUIRE(mhc::cuda::update_forward<S>(n, T, C, X.ptr, ldx, y.ptr, C, h_post.ptr, H_res.ptr,
                                       Xn.ptr, ldo) == Status::kSuccess);
  // Backward, fused layer path: update_backward (dX deferred), then layer_backward.
  REQUIRE(mhc::cuda::update_backward<S>(n, T, C, G.ptr, ldg, X.ptr, ldx, y.ptr, C, h_post.ptr,
                                        H_res.ptr, dy.ptr, C, nullptr, 0, false, d_h_post.ptr,
                                        d_H_res.ptr, ws.ptr, ws_bytes) == Status::kSuccess);
  const auto cc = mhc::cuda::as_const(coef);
  REQUIRE(mhc::cuda::layer_backward<S>(n, T, C, G.ptr, ldg, du.ptr, C, X.ptr, ldx, p, cc,
                                       d_h_post.ptr, d_H_res.ptr, dX.ptr, ldx, dW.ptr,
                                       d_alpha.ptr, d_bias.ptr, ws.ptr,
                                       ws_bytes) == Status::kSuccess);
  // Same again: the parameter gradients must repeat bit for bit.
  REQUIRE(mhc::cuda::layer_backward<S>(n, T, C, G.ptr, ldg, du.ptr, C, X.ptr, ldx, p, cc,
                                       d_h_post.ptr, d_H_res.ptr, dX.ptr, ldx, dW2.ptr,
                                       d_alpha2.ptr, d_bias2.ptr, ws.ptr,
                                       ws_bytes) == Status::kSuccess);
  // Stand-alone operators: each dX term alone (dX_u written, dX_p written, dX_c accumulated onto
  // dX_p's copy would mix terms: written too).
  REQUIRE(mhc::cuda::update_backward<S>(n, T, C, G.ptr, ldg, X.ptr, ldx, y.ptr, C, h_post.ptr,
                                        H_res.ptr, dy.ptr, C, dX_u.ptr, ldx, false, d_h_post.ptr,
                                        d_H_res.ptr, ws.ptr, ws_bytes) == Status::kSuccess);
  REQUIRE(mhc::cuda::pre_mix_backward<S>(n, T, C, X.ptr, ldx, du.ptr, C, h_pre.ptr, dX_p.ptr, ldx,
                                         false, d_h_pre.ptr, ws.ptr,
                                         ws_bytes) == Status::kSuccess);
  REQUIRE(mhc::cuda::coefficients_backward<S>(n, T, C, X.ptr, ldx, p, cc, d_h_pre.ptr,
                                              d_h_post.ptr, d_H_res.ptr, dX_c.ptr, ldx, false,
                                              dWc.ptr, d_alphac.ptr, d_biasc.ptr, ws.ptr,
                                              ws_bytes) == Status::kSuccess);
  CUDA_REQUIRE(cudaDeviceSynchronize());
  CUDA_REQUIRE(cudaGetLastError());

  // W packed once (pack_weights, MappingParams::W_packed) where the tensor-core projection runs:
  // the same coefficients, bit for bit, as packing inside every call.
  if (const std::size_t pw_bytes = mhc::cuda::packed_weights_size<S>(n, C)) {
    DeviceBuffer<char> pw(pw_bytes);
    DeviceBuffer<float> z2(z.count), r2(r.count), hp2(tn), hq2(tn), H2(H_res.count);
    for (auto* b : {&z2, &r2, &hp2, &hq2, &H2}) b->poison();
    REQUIRE(mhc::cuda::pack_weights<S>(n, C, W.ptr, pw.ptr, pw_bytes) == Status::kSuccess);
    mhc::cuda::MappingParams pp = p;
    pp.W_packed = pw.ptr;
    ws.poison();  // the packed copy must not come from the workspace of the earlier call
    REQUIRE(mhc::cuda::coefficients_forward<S>(n, T, C, X.ptr, ldx, pp,
                                               {z2.ptr, r2.ptr, hp2.ptr, hq2.ptr, H2.ptr}, ws.ptr,
                                               ws_bytes) == Status::kSuccess);
    CUDA_REQUIRE(cudaDeviceSynchronize());
    CHECK(z2.download() == z.download());
    CHECK(r2.download() == r.download());
    CHECK(hp2.download() == h_pre.download());
    CHECK(hq2.download() == h_post.download());
    CHECK(H2.download() == H_res.download());
  }

  // Every output written (poison gone) everywhere, not only on the sampled tokens.
  CHECK(count_nonfinite(u.ptr, T, C, C) == 0);
  CHECK(count_nonfinite(Xn.ptr, T * n, C, ldo) == 0);
  CHECK(count_nonfinite(dy.ptr, T, C, C) == 0);
  for (const auto* b : {&dX, &dX_u, &dX_p, &dX_c}) CHECK(count_nonfinite(b->ptr, T * n, C, ldx) == 0);
  for (const auto* b : {&z, &r, &h_pre, &h_post, &H_res, &d_h_post, &d_H_res, &d_h_pre})
    CHECK(count_nonfinite(b->ptr, 1, static_cast<Index>(b->count), 0) == 0);

  // Bitwise determinism of the reductions over tokens.
  CHECK(dW.download() == dW2.download());
  CHECK(d_alpha.download() == d_alpha2.download());
  CHECK(d_bias.download() == d_bias2.download());

  // Per-token outputs on sampled tokens (all when T is small).
  std::vector<Index> tokens;
  if (T <= 64) {
    for (Index t = 0; t < T; ++t) tokens.push_back(t);
  } else {
    tokens = {0, T - 1};
    for (int k = 0; k < 22; ++k)
      tokens.push_back(static_cast<Index>((rng((8ull << 40) + k) + 1.0) * 0.5 * T) % T);
  }
  const double ts = storage_tol<S>(), tf = 1e-3;  // stored outputs; fp32 outputs
  double worst[16] = {};
  const char* names[16] = {"z",      "r",        "h_pre",   "h_post", "H_res",     "u",
                           "X'",     "dy",       "d_h_post", "d_H_res", "d_h_pre", "dX (layer)",
                           "dX (update)", "dX (pre-mix)", "dX (coefficients)", ""};
  for (const Index t : tokens) {
    const TokenResult ref = reference_token(in, t);
    std::vector<double> dX_layer(ref.dX_update.size());
    for (std::size_t k = 0; k < dX_layer.size(); ++k)
      dX_layer[k] = ref.dX_update[k] + ref.dX_premix[k] + ref.dX_coef[k];
    const double errs[15] = {
        rel_error(fetch_rows(z.ptr, t, 1, nc, nc), ref.z),
        rel_error(fetch_rows(r.ptr, t, 1, 1, 1), {ref.r}),
        rel_error(fetch_rows(h_pre.ptr, t, 1, n, n), ref.h_pre),
        rel_error(fetch_rows(h_post.ptr, t, 1, n, n), ref.h_post),
        rel_error(fetch_rows(H_res.ptr, t, 1, n * n, n * n), ref.H_res),
        rel_error(fetch_rows(u.ptr, t, 1, C, C), ref.u),
        rel_error(fetch_rows(Xn.ptr, t * n, n, C, ldo), ref.Xn),
        rel_error(fetch_rows(dy.ptr, t, 1, C, C), ref.dy),
        rel_error(fetch_rows(d_h_post.ptr, t, 1, n, n), ref.d_h_post),
        rel_error(fetch_rows(d_H_res.ptr, t, 1, n * n, n * n), ref.d_H_res),
        rel_error(fetch_rows(d_h_pre.ptr, t, 1, n, n), ref.d_h_pre),
        rel_error(fetch_rows(dX.ptr, t * n, n, C, ldx), dX_layer),
        rel_error(fetch_rows(dX_u.ptr, t * n, n, C, ldx), ref.dX_update),
        rel_error(fetch_rows(dX_p.ptr, t * n, n, C, ldx), ref.dX_premix),
        rel_error(fetch_rows(dX_c.ptr, t * n, n, C, ldx), ref.dX_coef)};
    for (int k = 0; k < 15; ++k) worst[k] = std::max(worst[k], errs[k]);
  }
  for (int k = 0; k < 15; ++k) {
    CAPTURE(names[k], worst[k]);
    const bool stored = k >= 5 && k != 8 && k != 9 && k != 10;
    CHECK(worst[k] <= (stored ? ts : tf));
  }

  // Sums over tokens, against the reference over all tokens where it is affordable on the host.
  const double work = static_cast<double>(T) * n * C * nc;
  if (work <= 1.2e10) {
    const ParamGrads pg = reference_param_grads(in);
    auto check_sum = [&](const char* what, const std::vector<float>& got,
                         const std::vector<double>& want, const std::vector<double>& abs_sum) {
      // Error over the sum of |terms| of each element, floored at 1% of the largest such sum
      // (an element that cancels to ~0 inside one token's maths has no meaningful relative error).
      double e = 0, top = 0;
      for (const double a : abs_sum) top = std::max(top, a);
      for (std::size_t k = 0; k < want.size(); ++k) {
        const double err = std::abs(static_cast<double>(got[k]) - want[k]) /
                           (abs_sum[k] + 1e-2 * top + 1e-12);
        e = std::isnan(got[k]) ? std::numeric_limits<double>::infinity() : std::max(e, err);
      }
      CAPTURE(what, e);
      CHECK(e <= 1e-3);
    };
    check_sum("dW", dW.download(), pg.dW, pg.dW_abs);
    check_sum("d_alpha", d_alpha.download(), pg.d_alpha, pg.d_alpha_abs);
    check_sum("d_bias", d_bias.download(), pg.d_bias, pg.d_bias_abs);
    check_sum("dW (coefficients_backward)", dWc.download(), pg.dW, pg.dW_abs);
    check_sum("d_alpha (coefficients_backward)", d_alphac.download(), pg.d_alpha, pg.d_alpha_abs);
    check_sum("d_bias (coefficients_backward)", d_biasc.download(), pg.d_bias, pg.d_bias_abs);
  } else {
    // Too large for the host reference: the fused and stand-alone paths must agree bit for bit
    // (same kernels, same order), and be finite.
    CHECK(dW.download() == dWc.download());
    CHECK(count_nonfinite(dW.ptr, 1, static_cast<Index>(dW.count), 0) == 0);
  }
}

template <typename S>
void run_grid() {
  const bool small = small_sizes();
  const std::vector<Index> Ts = small ? std::vector<Index>{1, 3, 70} : std::vector<Index>{1, 3, 8192};
  const std::vector<Index> Cs = small ? std::vector<Index>{7, 40, 256}
                                      : std::vector<Index>{7, 4096, 7168};
  for (const int n : {2, 4, 8})
    for (const Index T : Ts)
      for (const Index C : Cs) run_case<S>(n, T, C, mhc_test::fresh_seed());
  // bf16, n = 4: the coefficient forward's projection split 4 ways over C, finalized inside the
  // projection by clusters of 4 blocks (the full sizes split 2 ways; T <= 3 splits 16 ways and
  // takes the separate finalize); small enough for compute-sanitizer.
  if (small) run_case<S>(4, 2048, 1024, mhc_test::fresh_seed());
}

}  // namespace

TEST_CASE("cuda layer kernels match the double reference, fp32 storage", "[cuda]") {
  run_grid<float>();
}

TEST_CASE("cuda layer kernels match the double reference, bf16 storage", "[cuda]") {
  run_grid<__nv_bfloat16>();
}

TEST_CASE("cuda launchers reject bad arguments before launching", "[cuda]") {
  using mhc::cuda::MappingParams;
  const int n = 4;
  const Index T = 5, C = 16;
  DeviceBuffer<float> X(T * n * C), u(T * C), h(T * n), W(n * C * 24), bias(24), alpha(3);
  DeviceBuffer<float> z(T * 24), r(T), hp(T * n), hq(T * n), H(T * n * n);
  u.poison();
  z.poison();
  MappingParams p;
  p.W = W.ptr, p.bias = bias.ptr, p.alpha = alpha.ptr;
  const mhc::cuda::Coefficients coef{z.ptr, r.ptr, hp.ptr, hq.ptr, H.ptr};
  const std::size_t ws_bytes = mhc::cuda::coefficients_forward_workspace_size<float>(n, T, C);
  DeviceBuffer<char> ws(ws_bytes);
  using mhc::cuda::coefficients_forward;
  using mhc::cuda::pre_mix_forward;
  CHECK(coefficients_forward<float>(0, T, C, X.ptr, C, p, coef, ws.ptr, ws_bytes) ==
        Status::kInvalidArgument);
  CHECK(coefficients_forward<float>(9, T, C, X.ptr, C, p, coef, ws.ptr, ws_bytes) ==
        Status::kInvalidArgument);
  CHECK(coefficients_forward<float>(n, T, C, X.ptr, C - 1, p, coef, ws.ptr, ws_bytes) ==
        Status::kInvalidArgument);
  CHECK(coefficients_forward<float>(n, T, C, nullptr, C, p, coef, ws.ptr, ws_bytes) ==
        Status::kInvalidArgument);
  CHECK(coefficients_forward<float>(n, T, C, X.ptr + 0, C, p, coef, ws.ptr, ws_bytes - 1) ==
        Status::kWorkspaceTooSmall);
  const float* misaligned =
      reinterpret_cast<const float*>(reinterpret_cast<const char*>(X.ptr) + 2);
  CHECK(coefficients_forward<float>(n, T, C, misaligned, C, p, coef, ws.ptr, ws_bytes) ==
        Status::kMisalignedPointer);
  MappingParams bad = p;
  bad.iterations = mhc::kMaxSinkhornIterations + 1;
  CHECK(coefficients_forward<float>(n, T, C, X.ptr, C, bad, coef, ws.ptr, ws_bytes) ==
        Status::kInvalidArgument);
  bad = p;
  bad.W = nullptr;
  CHECK(coefficients_forward<float>(n, T, C, X.ptr, C, bad, coef, ws.ptr, ws_bytes) ==
        Status::kInvalidArgument);
  // u inside X is forbidden aliasing.
  CHECK(pre_mix_forward<float>(n, T, C, X.ptr, C, h.ptr, X.ptr + C, C) == Status::kAliasing);
  CHECK(pre_mix_forward<float>(n, T, C, X.ptr, C, h.ptr, u.ptr, C - 1) ==
        Status::kInvalidArgument);
  // pack_weights: only where the tensor-core path exists (n = 4, bf16, C % 64 == 0).
  {
    using mhc::cuda::pack_weights;
    using mhc::cuda::packed_weights_size;
    const Index Cm = 64;
    DeviceBuffer<float> Wm(n * Cm * 24);
    const std::size_t pw_bytes = packed_weights_size<__nv_bfloat16>(n, Cm);
    CHECK(pw_bytes == Wm.count * sizeof(float));  // bf16 hi + lo: as many bytes as W
    CHECK(packed_weights_size<float>(n, Cm) == 0);
    CHECK(packed_weights_size<__nv_bfloat16>(2, Cm) == 0);
    CHECK(packed_weights_size<__nv_bfloat16>(n, 96) == 0);
    DeviceBuffer<char> pw(pw_bytes + 16);
    pw.poison();
    CHECK(pack_weights<float>(n, Cm, Wm.ptr, pw.ptr, pw_bytes) == Status::kInvalidArgument);
    CHECK(pack_weights<__nv_bfloat16>(n, 96, Wm.ptr, pw.ptr, pw_bytes) ==
          Status::kInvalidArgument);
    CHECK(pack_weights<__nv_bfloat16>(n, Cm, nullptr, pw.ptr, pw_bytes) ==
          Status::kInvalidArgument);
    CHECK(pack_weights<__nv_bfloat16>(n, Cm, Wm.ptr, nullptr, pw_bytes) ==
          Status::kInvalidArgument);
    CHECK(pack_weights<__nv_bfloat16>(n, Cm, Wm.ptr, pw.ptr, pw_bytes - 1) ==
          Status::kInvalidArgument);
    CHECK(pack_weights<__nv_bfloat16>(n, Cm, Wm.ptr, pw.ptr + 8, pw_bytes) ==
          Status::kMisalignedPointer);
    CUDA_REQUIRE(cudaDeviceSynchronize());
    const std::vector<char> untouched = pw.download();
    CHECK(std::all_of(untouched.begin(), untouched.end(),
                      [](char v) { return static_cast<unsigned char>(v) == 0xFF; }));
    bad = p;
    bad.W_packed = pw.ptr + 8;
    CHECK(coefficients_forward<float>(n, T, C, X.ptr, C, bad, coef, ws.ptr, ws_bytes) ==
          Status::kMisalignedPointer);
  }
  // No launch happened: the device has no pending error and the outputs are untouched.
  CUDA_REQUIRE(cudaDeviceSynchronize());
  CUDA_REQUIRE(cudaGetLastError());
  for (const float v : u.download()) CHECK(std::isnan(v));
  for (const float v : z.download()) CHECK(std::isnan(v));
  // T = 0 is valid and launches nothing.
  CHECK(coefficients_forward<float>(n, 0, C, X.ptr, C, p, coef, ws.ptr, ws_bytes) ==
        Status::kSuccess);
}
