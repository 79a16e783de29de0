// bfloat16 and float storage against double: every operator, forward and backward, on inputs
// that are exactly representable in the storage type (so only the operator's own rounding is
// measured). Stated tolerances, per element, with scale = max |reference| of that output:
//  - outputs stored in the storage type (u, X', d_X, d_y): |out - ref| <= 2^-8 |ref| + 1e-4 scale
//    for bf16 (one rounding to bf16, half an ulp = 2^-8 relative, plus fp32 accumulation), and
//    <= 1e-6 |ref| + 1e-5 scale for float;
//  - outputs in the compute type float (coefficients, their gradients, parameter gradients):
//    |out - ref| <= 1e-4 scale (fp32 accumulation over n*C and T terms, 20 Sinkhorn rounds).
//    The parameter gradients are sums over tokens whose terms can cancel (the H_res bias
//    gradient of one token sums to ~0 over each row of the Sinkhorn tangent space), so their
//    scale is max over elements of sum_t |per-token term|, the size the fp32 rounding scales
//    with; a result-relative scale made fresh seeds fail at n = 2 (1.4e-4 for d_b_res).
//
// Heap buffers are 64-byte aligned (Eigen aligns to 32 on AVX targets), so that the kernels'
// streaming stores run here: rows whose stride is a multiple of 64 bytes take the streaming
// branch, and the odd strides (C = 257) put rows on both sides of a line boundary.
// Also bit for bit: the Coefficients backward's staged and unstaged passes on repeated columns,
// and the SIMD bf16 conversions against the portable ones.
#ifndef EIGEN_MAX_ALIGN_BYTES
#define EIGEN_MAX_ALIGN_BYTES 64
#endif
#include "support/catch.hpp"
#include "support/ops_testing.hpp"

using namespace mhc_test;
using mhc::Index;

namespace {

template <typename S>
double rel_stored() {
  return std::is_same<S, mhc::bf16>::value ? 1.0 / 256 : 1e-6;
}
template <typename S>
double abs_stored() {
  return std::is_same<S, mhc::bf16>::value ? 1e-4 : 1e-5;
}

/// Checks a storage-type result against the double reference with the stated tolerance.
template <typename S>
void check_stored(const char* what, const RowMat<S>& out, const RowMat<double>& ref) {
  REQUIRE(out.rows() == ref.rows());
  REQUIRE(out.cols() == ref.cols());
  const double scale = std::max(1e-12, ref.cwiseAbs().maxCoeff());
  double worst = 0;
  for (Index k = 0; k < ref.size(); ++k) {
    const double r = ref.data()[k], o = static_cast<double>(out.data()[k]);
    worst = std::max(worst,
                     std::abs(o - r) / (rel_stored<S>() * std::abs(r) + abs_stored<S>() * scale));
  }
  CAPTURE(what, worst);
  CHECK(worst <= 1.0);
}

/// Checks a compute-type (float) result against double: |out - ref| <= 1e-4 scale, scale =
/// max |ref|, or max(terms) when given (a sum's per-element sum of |terms|).
template <typename A>
void check_real(const char* what, const A& out, const RowMat<double>& ref,
                const RowMat<double>* terms = nullptr) {
  const RowMat<double> o = out.template cast<double>();
  REQUIRE(o.rows() == ref.rows());
  REQUIRE(o.cols() == ref.cols());
  const double scale = std::max(1e-12, terms ? terms->maxCoeff() : ref.cwiseAbs().maxCoeff());
  const double err = ref.size() ? (o - ref).cwiseAbs().maxCoeff() / scale : 0.0;
  CAPTURE(what, err);
  CHECK(err <= 1e-4);
}

template <typename S>
RowMat<S> to(const RowMat<double>& m) {
  return m.cast<S>();
}
template <typename S>
RowMat<double> from(const RowMat<S>& m) {
  return m.template cast<double>();
}

template <typename S, int N>
void storage_case(int n, Index C, Index T) {
  using R = mhc::compute_t<S>;
  const auto seed = fresh_seed();
  CAPTURE(seed, n, C, T, N, sizeof(S));
  Rng rng(seed);
  const Index M = Index(n) * n + 2 * n;
  // Inputs rounded through S (and coefficients through R), shared by both computations.
  const RowMat<double> X = round_through<S>(random_matrix(rng, T * n, C, -2, 2));
  const RowMat<double> y = round_through<S>(random_matrix(rng, T, C));
  const RowMat<double> G = round_through<S>(random_matrix(rng, T * n, C));
  const RowMat<double> Gu = round_through<S>(random_matrix(rng, T, C));
  const RowMat<double> D0 = round_through<S>(random_matrix(rng, T * n, C));
  CoefParamsD pd = random_coef_params(rng, n, C);
  pd.W = round_through<R>(pd.W);
  for (auto* v : {&pd.b_pre, &pd.b_post, &pd.b_res})
    for (Index k = 0; k < v->size(); ++k) (*v)[k] = double(R((*v)[k]));
  for (int k = 0; k < 3; ++k) pd.alpha[k] = double(R(pd.alpha[k]));

  // Double reference through the library in double.
  CoefParamsView<double> pv_d(pd);
  RowMat<double> hp_d(T, n), hq_d(T, n), H_d(T, Index(n) * n), r_d(T, 1), z_d(T, M);
  mhc::Coefficients<double, N>::forward(X, pv_d.params, hp_d, hq_d, H_d, r_d, z_d);
  // The same coefficients (rounded to R) feed both mixings, so each operator is compared alone.
  const RowMat<double> hp = round_through<R>(hp_d), hq = round_through<R>(hq_d),
                       H = round_through<R>(H_d);

  CoefParamsView<R> pv(pd);
  const RowMat<S> Xs = to<S>(X), ys = to<S>(y), Gs = to<S>(G), Gus = to<S>(Gu);
  const RowMat<R> hpR = hp.cast<R>(), hqR = hq.cast<R>(), HR = H.cast<R>();

  // Coefficients forward.
  RowMat<R> hp_s(T, n), hq_s(T, n), H_s(T, Index(n) * n), r_s(T, 1), z_s(T, M);
  mhc::Coefficients<S, N>::forward(Xs, pv.params, hp_s, hq_s, H_s, r_s, z_s);
  check_real("h_pre", hp_s, hp_d);
  check_real("h_post", hq_s, hq_d);
  check_real("H_res", H_s, H_d);
  check_real("r", r_s, r_d);
  check_real("z", z_s, z_d);

  // PreMix.
  RowMat<double> u_d(T, C);
  mhc::PreMix<double, N>::forward(X, hp, u_d);
  RowMat<S> u_s(T, C);
  mhc::PreMix<S, N>::forward(Xs, hpR, u_s);
  check_stored("u", u_s, u_d);
  RowMat<double> dX_d = D0, dhp_d(T, n);
  mhc::PreMix<double, N>::backward(X, hp, Gu, dX_d, dhp_d);
  RowMat<S> dX_s = to<S>(D0);
  RowMat<R> dhp_s(T, n);
  mhc::PreMix<S, N>::backward(Xs, hpR, Gus, dX_s, dhp_s);
  check_stored("PreMix d_X", dX_s, dX_d);
  check_real("d_h_pre", dhp_s, dhp_d);

  // Update.
  RowMat<double> out_d(T * n, C);
  mhc::Update<double, N>::forward(X, H, hq, y, out_d);
  RowMat<S> out_s(T * n, C);
  mhc::Update<S, N>::forward(Xs, HR, hqR, ys, out_s);
  check_stored("X'", out_s, out_d);
  RowMat<double> dXu_d(T * n, C), dH_d(T, Index(n) * n), dhq_d(T, n), dy_d(T, C);
  mhc::Update<double, N>::backward(X, H, hq, y, G, dXu_d, dH_d, dhq_d, dy_d);
  RowMat<S> dXu_s(T * n, C), dy_s(T, C);
  RowMat<R> dH_s(T, Index(n) * n), dhq_s(T, n);
  mhc::Update<S, N>::backward(Xs, HR, hqR, ys, Gs, dXu_s, dH_s, dhq_s, dy_s);
  check_stored("Update d_X", dXu_s, dXu_d);
  check_stored("d_y", dy_s, dy_d);
  check_real("d_H_res", dH_s, dH_d);
  check_real("d_h_post", dhq_s, dhq_d);

  // Coefficients backward, with the same cache values (rounded to R) on both sides.
  const RowMat<double> Gp = round_through<R>(random_matrix(rng, T, n)),
                       Gq = round_through<R>(random_matrix(rng, T, n)),
                       GH = round_through<R>(random_matrix(rng, T, Index(n) * n));
  RowMat<double> dXc_d = D0, dW_d(Index(n) * C, M);
  Eigen::VectorXd da_d(3), dbp_d(n), dbq_d(n), dbr_d(Index(n) * n);
  Eigen::VectorXd ws_d(mhc::Coefficients<double, N>::workspace_size(T, n, C));
  mhc::Coefficients<double, N>::backward(X, pv_d.params, r_d, z_d, Gp, Gq, GH, dXc_d,
                                         {dW_d, da_d, dbp_d, dbq_d, dbr_d}, ws_d);
  RowMat<S> dXc_s = to<S>(D0);
  RowMat<R> dW_s(Index(n) * C, M);
  Eigen::Matrix<R, Eigen::Dynamic, 1> da_s(3), dbp_s(n), dbq_s(n), dbr_s(Index(n) * n);
  Eigen::Matrix<R, Eigen::Dynamic, 1> ws_s(mhc::Coefficients<S, N>::workspace_size(T, n, C));
  mhc::Coefficients<S, N>::backward(Xs, pv.params, r_s, z_s, Gp.cast<R>(), Gq.cast<R>(),
                                    GH.cast<R>(), dXc_s, {dW_s, da_s, dbp_s, dbq_s, dbr_s}, ws_s);
  check_stored("Coefficients d_X", dXc_s, dXc_d);
  // Per-element sums of |per-token term| of the parameter gradients: the double backward of
  // each token alone.
  RowMat<double> dW_abs = RowMat<double>::Zero(Index(n) * C, M);
  Eigen::VectorXd da_abs = Eigen::VectorXd::Zero(3), dbp_abs = Eigen::VectorXd::Zero(n),
                  dbq_abs = Eigen::VectorXd::Zero(n), dbr_abs = Eigen::VectorXd::Zero(Index(n) * n);
  {
    RowMat<double> dX1 = RowMat<double>::Zero(n, C), dW1(Index(n) * C, M);
    Eigen::VectorXd da1(3), dbp1(n), dbq1(n), dbr1(Index(n) * n);
    Eigen::VectorXd ws1(mhc::Coefficients<double, N>::workspace_size(1, n, C));
    for (Index t = 0; t < T; ++t) {
      const RowMat<double> Xt = X.middleRows(t * n, n), rt = r_d.row(t), zt = z_d.row(t),
                           Gpt = Gp.row(t), Gqt = Gq.row(t), GHt = GH.row(t);
      mhc::Coefficients<double, N>::backward(Xt, pv_d.params, rt, zt, Gpt, Gqt, GHt, dX1,
                                             {dW1, da1, dbp1, dbq1, dbr1}, ws1);
      dW_abs += dW1.cwiseAbs();
      da_abs += da1.cwiseAbs();
      dbp_abs += dbp1.cwiseAbs();
      dbq_abs += dbq1.cwiseAbs();
      dbr_abs += dbr1.cwiseAbs();
    }
  }
  const RowMat<double> da_t = da_abs, dbp_t = dbp_abs, dbq_t = dbq_abs, dbr_t = dbr_abs;
  check_real("d_W", dW_s, dW_d, &dW_abs);
  check_real("d_alpha", RowMat<R>(da_s), RowMat<double>(da_d), &da_t);
  check_real("d_b_pre", RowMat<R>(dbp_s), RowMat<double>(dbp_d), &dbp_t);
  check_real("d_b_post", RowMat<R>(dbq_s), RowMat<double>(dbq_d), &dbq_t);
  check_real("d_b_res", RowMat<R>(dbr_s), RowMat<double>(dbr_d), &dbr_t);
}

}  // namespace

TEST_CASE("bf16 storage matches double within the stated tolerance", "[bf16]") {
  storage_case<mhc::bf16, 4>(4, 257, 33);
  storage_case<mhc::bf16, 4>(4, 64, 5);
  storage_case<mhc::bf16, mhc::Dynamic>(2, 3, 9);
  storage_case<mhc::bf16, 8>(8, 64, 5);
  storage_case<mhc::bf16, 1>(1, 1, 1);
  storage_case<mhc::bf16, 4>(4, 257, 150);  // > 2 chunks of the fused backward pass (64 tokens,
                                            // or 16 with the register passes)
  // rows of more than one job of the fused backward pass (2048 columns with the AVX-512 or AVX2
  // register passes) and a partial last one; 21 tokens: partial chunks of 8 and 16 tokens
  storage_case<mhc::bf16, 4>(4, 2100, 21);
  // whole 64-column blocks at n = 1, 2, 3 (the AVX2 kernels' odd-n and pair passes)
  storage_case<mhc::bf16, 1>(1, 129, 5);
  storage_case<mhc::bf16, 2>(2, 200, 5);
  storage_case<mhc::bf16, 3>(3, 257, 5);
  // the Coefficients backward's AVX2 line staging (64-byte spans: 32 bf16 columns) over several
  // token chunks (16 bf16 tokens) at n = 1, 2, 3, and rows shorter than a span (register passes
  // on 8-column strips, never staged)
  storage_case<mhc::bf16, 1>(1, 100, 37);
  storage_case<mhc::bf16, 2>(2, 72, 35);
  storage_case<mhc::bf16, 3>(3, 40, 19);
  storage_case<mhc::bf16, 2>(2, 20, 17);
}

TEST_CASE("float storage matches double within the stated tolerance", "[float]") {
  storage_case<float, 4>(4, 257, 33);
  storage_case<float, mhc::Dynamic>(8, 64, 5);
  storage_case<float, 2>(2, 3, 9);
  storage_case<float, 4>(4, 257, 150);  // > 2 chunks of the fused backward pass (64 tokens,
                                        // or 8 with the register passes)
  storage_case<float, 4>(4, 2100, 21);   // > 1 job per row and partial chunks (see above)
  storage_case<float, 1>(1, 129, 5);     // whole blocks at n = 1, 2, 3 (see the bf16 case)
  storage_case<float, 2>(2, 200, 5);
  storage_case<float, 3>(3, 257, 5);
  // AVX2 line staging (16 float columns per span, chunks of 8 tokens) over several chunks at
  // n = 1, 2, 3, and rows shorter than a span (see the bf16 case)
  storage_case<float, 1>(1, 100, 19);
  storage_case<float, 2>(2, 72, 17);
  storage_case<float, 3>(3, 40, 11);
  storage_case<float, 2>(2, 12, 9);
  // n = 10 (M = 120): too wide for the AVX2 projection tile (at most 96 outputs), the portable
  // tile runs
  storage_case<float, 10>(10, 70, 3);
}

namespace {
/// Coefficients backward on rows whose columns repeat one packet-wide pattern: column c of every
/// row of X, of d_X_old and of W holds the values of column c mod P (P = the compute type's
/// packet width), so each column's d_X and d_W are the same function of the same values, in the
/// same lane of its strip. Columns [0, 2L) (L = one 64-byte span: 16 float, 32 bf16 columns) and
/// the full strip [2L, 2L + P) after them must agree bit for bit: the AVX2 passes stage whole
/// spans through L1 and run the strip after the last span unstaged, with the same operations in
/// the same order; every other target runs one kind of pass on all these columns.
template <typename S, int N>
void repeated_columns_case(Index T) {
  using R = mhc::compute_t<S>;
  constexpr int n = N;
  constexpr Index P = Eigen::internal::packet_traits<R>::size;
  constexpr Index L = 64 / Index(sizeof(S));
  const Index C = 2 * L + P, M = Index(n) * n + 2 * n;
  const auto seed = fresh_seed();
  CAPTURE(seed, n, C, T, sizeof(S));
  Rng rng(seed);
  const auto repeat = [&](const RowMat<double>& pattern) {  // (rows, P) -> (rows, C)
    RowMat<double> out(pattern.rows(), C);
    for (Index c = 0; c < C; ++c) out.col(c) = pattern.col(c % P);
    return out;
  };
  const RowMat<S> X = to<S>(repeat(random_matrix(rng, T * n, P, -2, 2)));
  const RowMat<S> D0 = to<S>(repeat(random_matrix(rng, T * n, P)));
  CoefParamsD pd = random_coef_params(rng, n, C);
  for (int i = 0; i < n; ++i)  // W's row i*C + c = row i*C + c mod P
    for (Index c = P; c < C; ++c) pd.W.row(i * C + c) = pd.W.row(i * C + c % P);
  CoefParamsView<R> pv(pd);
  using Op = mhc::Coefficients<S, N>;
  RowMat<R> hp(T, n), hq(T, n), H(T, Index(n) * n), r(T, 1), z(T, M);
  Op::forward(X, pv.params, hp, hq, H, r, z);
  const RowMat<R> Gp = random_matrix(rng, T, n).cast<R>(), Gq = random_matrix(rng, T, n).cast<R>(),
                  GH = random_matrix(rng, T, Index(n) * n).cast<R>();
  RowMat<S> dX = D0;
  RowMat<R> dW(Index(n) * C, M);
  Eigen::Matrix<R, Eigen::Dynamic, 1> da(3), dbp(n), dbq(n), dbr(Index(n) * n);
  Eigen::Matrix<R, Eigen::Dynamic, 1> ws(Op::workspace_size(T, n, C));
  Op::backward(X, pv.params, r, z, Gp, Gq, GH, dX, {dW, da, dbp, dbq, dbr}, ws);
  int dx_mismatches = 0, dw_mismatches = 0;
  for (Index c = P; c < C; ++c) {
    for (Index row = 0; row < T * n; ++row)
      dx_mismatches += std::memcmp(&dX(row, c), &dX(row, c % P), sizeof(S)) != 0;
    for (int i = 0; i < n; ++i)
      for (Index m = 0; m < M; ++m)
        dw_mismatches += std::memcmp(&dW(i * C + c, m), &dW(i * C + c % P, m), sizeof(R)) != 0;
  }
  CHECK(dx_mismatches == 0);
  CHECK(dw_mismatches == 0);
  CHECK(!(dX.template cast<float>() == D0.template cast<float>()));  // the backward added to d_X
}
}  // namespace

TEST_CASE("Coefficients backward: columns with the same inputs get the same gradients, staged or "
          "not", "[bf16][float]") {
  // chunks of 8 float / 16 bf16 tokens: 37 and 19 tokens end in partial chunks
  repeated_columns_case<float, 4>(19);
  repeated_columns_case<float, 1>(37);
  repeated_columns_case<float, 3>(9);
  repeated_columns_case<mhc::bf16, 4>(37);
  repeated_columns_case<mhc::bf16, 2>(19);
  repeated_columns_case<mhc::bf16, 1>(5);
}

TEST_CASE("The vectorised bf16 conversions agree bit for bit with Eigen::bfloat16", "[bf16]") {
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  std::vector<float> values = {0.f,
                               -0.f,
                               1.f,
                               -1.f,
                               1.00390625f /* tie: 1 + 2^-8 */,
                               1.01171875f /* tie, odd */,
                               3.0e38f,
                               -3.4e38f,
                               1e-40f,
                               -1e-45f,
                               std::numeric_limits<float>::infinity(),
                               -std::numeric_limits<float>::infinity(),
                               std::numeric_limits<float>::min()};
  for (int k = 0; k < 5000; ++k)
    values.push_back(
        static_cast<float>(uniform(rng, -1, 1) * std::pow(2.0, uniform(rng, -130, 128))));
  std::vector<mhc::bf16> ours(values.size());
  mhc::detail::float_to_bf16(values.data(), ours.data(), Index(values.size()));
  std::vector<float> back(values.size());
  mhc::detail::bf16_to_float(ours.data(), back.data(), Index(values.size()));
  for (size_t k = 0; k < values.size(); ++k) {
    const mhc::bf16 ref(values[k]);
    CAPTURE(values[k]);
    CHECK(Eigen::numext::bit_cast<std::uint16_t>(ours[k]) ==
          Eigen::numext::bit_cast<std::uint16_t>(ref));
    CHECK(back[k] == static_cast<float>(ref));
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  mhc::bf16 b;
  mhc::detail::float_to_bf16(&nan, &b, 1);
  CHECK(Eigen::numext::isnan(b));
  float f;
  mhc::detail::bf16_to_float(&b, &f, 1);
  CHECK(std::isnan(f));
}

#if defined(MHC_HAVE_AVX512_KERNELS) || defined(MHC_HAVE_AVX2_KERNELS)
namespace {
std::uint16_t bits_of(mhc::bf16 v) { return Eigen::numext::bit_cast<std::uint16_t>(v); }

/// 32 x 400 floats for the SIMD rounding tests: normal values, a quarter of the 32-value groups
/// float denormals, and specials (zeros, ties, huge, denormals, infinities; NaNs quiet,
/// signalling, and with payloads only in the low 16 bits, which rounding alone would carry into
/// an infinity).
std::vector<float> rounding_test_values(Rng& rng) {
  std::vector<float> values;
  for (int k = 0; k < 32 * 400; ++k) {
    const double e = (k / 32) % 4 == 0 ? uniform(rng, -150, -120) : uniform(rng, -60, 60);
    values.push_back(static_cast<float>(uniform(rng, -1, 1) * std::pow(2.0, e)));
  }
  const auto from_bits = [](std::uint32_t b) {
    float f;
    std::memcpy(&f, &b, sizeof(f));
    return f;
  };
  const float specials[] = {0.f, -0.f, 1.00390625f, 1.01171875f, 3.0e38f, -3.4e38f, 1e-40f,
                            -1e-45f, std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::signaling_NaN(), from_bits(0x7F800001u),
                            from_bits(0xFF80FFFFu), from_bits(0x7FC00001u),
                            std::numeric_limits<float>::min()};
  for (size_t k = 0; k < sizeof(specials) / sizeof(float); ++k)
    values[(37 * k) % values.size()] = specials[k];
  return values;
}
}  // namespace
#endif

#if defined(MHC_HAVE_AVX512_KERNELS)
TEST_CASE("The AVX-512 bf16 stores agree bit for bit with float_to_bf16", "[bf16]") {
  // bf16x16_bits (one packet) and bf16x32_bits (a pair: vcvtne2ps2bf16 where no lane is a float
  // denormal) against the portable rounding, on packets with and without denormals, NaN, ties;
  // also the column-parity split and its interleaving store (vcvtne2ps2bf16 + vpermw with
  // AVX512-BF16, integer rounding and one ternary-logic op without).
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::vector<float> values = rounding_test_values(rng);
  std::vector<mhc::bf16> ref(values.size()), one(values.size()), pair(values.size());
  mhc::detail::float_to_bf16(values.data(), ref.data(), Index(values.size()));
  for (size_t k = 0; k < values.size(); k += 32) {
    const __m512 lo = _mm512_loadu_ps(values.data() + k), hi = _mm512_loadu_ps(values.data() + k + 16);
    mhc::detail::bf16x16_store(one.data() + k, lo);
    mhc::detail::bf16x16_store(one.data() + k + 16, hi);
    _mm512_storeu_si512(pair.data() + k, mhc::detail::bf16x32_bits(lo, hi));
  }
  int mismatches = 0;
  for (size_t k = 0; k < values.size(); ++k) {
    const auto r = bits_of(ref[k]);
    mismatches += bits_of(one[k]) != r;
    mismatches += bits_of(pair[k]) != r;
  }
  CHECK(mismatches == 0);
  // The parity split of a line (bf16x32_even / _odd) gives each bf16 column's exact float value,
  // and bf16x32_bits_even_odd puts the rounded columns back in order: fed the values of columns
  // 2k and 2k + 1, it stores what float_to_bf16 stores for them.
  int split_mismatches = 0, eo_mismatches = 0;
  std::vector<mhc::bf16> eo(values.size());
  for (size_t k = 0; k < values.size(); k += 32) {
    alignas(64) float even[16], odd[16];
    for (int l = 0; l < 16; ++l) even[l] = values[k + 2 * l], odd[l] = values[k + 2 * l + 1];
    _mm512_storeu_si512(eo.data() + k, mhc::detail::bf16x32_bits_even_odd(_mm512_load_ps(even),
                                                                           _mm512_load_ps(odd)));
    const __m512i line = _mm512_loadu_si512(ref.data() + k);
    _mm512_store_ps(even, mhc::detail::bf16x32_even(line));
    _mm512_store_ps(odd, mhc::detail::bf16x32_odd(line));
    for (int l = 0; l < 16; ++l) {
      const float e = static_cast<float>(ref[k + 2 * l]);
      const float o = static_cast<float>(ref[k + 2 * l + 1]);
      split_mismatches += std::memcmp(&even[l], &e, sizeof(float)) != 0;
      split_mismatches += std::memcmp(&odd[l], &o, sizeof(float)) != 0;
    }
  }
  for (size_t k = 0; k < values.size(); ++k)
    eo_mismatches += bits_of(eo[k]) != bits_of(ref[k]);
  CHECK(split_mismatches == 0);
  CHECK(eo_mismatches == 0);
}
#endif

#if defined(MHC_HAVE_AVX2_KERNELS)
TEST_CASE("The AVX2 bf16 loads and stores agree bit for bit with the portable conversions",
          "[bf16]") {
  // store8 / bf16x8_bits, store16_columns and store8x2 against float_to_bf16 (nearest even, NaN
  // quieted), load8 and load8x2 against bf16_to_float, and stream_line_block (streaming into a
  // 64-byte aligned row, plain stores elsewhere) copying a block exactly
  const auto seed = fresh_seed();
  CAPTURE(seed);
  Rng rng(seed);
  const std::vector<float> values = rounding_test_values(rng);
  const Index count = Index(values.size());
  std::vector<mhc::bf16> ref(values.size()), stored(values.size());
  mhc::detail::float_to_bf16(values.data(), ref.data(), count);
  for (Index k = 0; k < count; k += 8)
    mhc::detail::store8(stored.data() + k, _mm256_loadu_ps(values.data() + k));
  std::vector<float> widened(values.size()), loaded(values.size());
  mhc::detail::bf16_to_float(ref.data(), widened.data(), count);
  for (Index k = 0; k < count; k += 8)
    _mm256_storeu_ps(loaded.data() + k, mhc::detail::load8(ref.data() + k));
  int store_mismatches = 0;
  for (Index k = 0; k < count; ++k) store_mismatches += bits_of(stored[k]) != bits_of(ref[k]);
  CHECK(store_mismatches == 0);
  CHECK(std::memcmp(loaded.data(), widened.data(), sizeof(float) * values.size()) == 0);
  // the 16-value pairs: store16_columns (lo = columns 0-7, hi = 8-15) and load8x2 / store8x2,
  // whose bf16 lanes hold columns 0-3, 8-11 (lo) and 4-7, 12-15 (hi); float in column order
  constexpr int kUnpacked[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  std::vector<mhc::bf16> columns(values.size()), pairs(values.size()), round_trip(values.size());
  std::vector<float> floats(values.size());
  int lane_mismatches = 0;
  for (Index k = 0; k < count; k += 16) {
    alignas(32) float in_lanes[16], out_lanes[16];
    for (int l = 0; l < 16; ++l) in_lanes[l] = values[std::size_t(k + kUnpacked[l])];
    mhc::detail::store16_columns(columns.data() + k, _mm256_loadu_ps(values.data() + k),
                                 _mm256_loadu_ps(values.data() + k + 8));
    mhc::detail::store8x2(pairs.data() + k, _mm256_load_ps(in_lanes), _mm256_load_ps(in_lanes + 8));
    __m256 lo, hi;
    mhc::detail::load8x2(ref.data() + k, lo, hi);
    _mm256_store_ps(out_lanes, lo);
    _mm256_store_ps(out_lanes + 8, hi);
    for (int l = 0; l < 16; ++l)
      lane_mismatches += std::memcmp(&out_lanes[l], &widened[std::size_t(k + kUnpacked[l])],
                                     sizeof(float)) != 0;
    mhc::detail::store8x2(round_trip.data() + k, lo, hi);
    mhc::detail::load8x2(values.data() + k, lo, hi);
    mhc::detail::store8x2(floats.data() + k, lo, hi);
  }
  int pair_mismatches = 0;
  for (Index k = 0; k < count; ++k) {
    pair_mismatches += bits_of(columns[k]) != bits_of(ref[k]);
    pair_mismatches += bits_of(pairs[k]) != bits_of(ref[k]);
    pair_mismatches += bits_of(round_trip[k]) != bits_of(ref[k]);
  }
  CHECK(lane_mismatches == 0);
  CHECK(pair_mismatches == 0);
  CHECK(std::memcmp(floats.data(), values.data(), sizeof(float) * values.size()) == 0);
  constexpr int B = mhc::detail::kColumnBlock;
  alignas(64) float src[B];
  alignas(64) mhc::bf16 src_bf16[B];
  std::memcpy(src, values.data(), sizeof(src));
  std::memcpy(src_bf16, ref.data(), sizeof(src_bf16));
  for (const int offset : {0, 1, 8, 16}) {  // elements past a 64-byte boundary
    CAPTURE(offset);
    alignas(64) float dst[B + 16] = {};
    alignas(64) mhc::bf16 dst_bf16[B + 32] = {};
    mhc::detail::stream_line_block(dst + offset, src);
    mhc::detail::stream_line_block(dst_bf16 + offset, src_bf16);
    mhc::detail::stream_fence();
    CHECK(std::memcmp(dst + offset, src, sizeof(src)) == 0);
    CHECK(std::memcmp(dst_bf16 + offset, src_bf16, sizeof(src_bf16)) == 0);
    int outside = 0;  // nothing written before or after the block
    for (int k = 0; k < B + 16; ++k) outside += (k < offset || k >= offset + B) && dst[k] != 0.f;
    for (int k = 0; k < B + 32; ++k)
      outside += (k < offset || k >= offset + B) && bits_of(dst_bf16[k]) != 0;
    CHECK(outside == 0);
  }
}
#endif

namespace {
/// Update in place (X_out = X, d_X = d_X_out) against separate buffers, bit for bit, for a storage
/// type (test_mixing covers this in double only; the float/bf16 register paths differ).
template <typename S, int n>
void update_in_place_case(Index C, Index T) {
  using R = mhc::compute_t<S>;
  const auto seed = fresh_seed();
  CAPTURE(seed, n, C, T, sizeof(S));
  Rng rng(seed);
  const RowMat<S> X = to<S>(random_matrix(rng, T * n, C));
  const RowMat<S> G = to<S>(random_matrix(rng, T * n, C));
  const RowMat<S> y = to<S>(random_matrix(rng, T, C));
  const RowMat<R> H = random_matrix(rng, T, n * n).cast<R>();
  const RowMat<R> hq = random_matrix(rng, T, n).cast<R>();
  using Op = mhc::Update<S, n>;
  RowMat<S> out(T * n, C), inplace = X;
  Op::forward(X, H, hq, y, out);
  Op::forward(inplace, H, hq, y, inplace);
  CHECK(std::memcmp(out.data(), inplace.data(), sizeof(S) * out.size()) == 0);
  RowMat<S> dX(T * n, C), dy(T, C), dy2(T, C), g_inplace = G;
  RowMat<R> dH(T, n * n), dhq(T, n), dH2(T, n * n), dhq2(T, n);
  Op::backward(X, H, hq, y, G, dX, dH, dhq, dy);
  Op::backward(X, H, hq, y, g_inplace, g_inplace, dH2, dhq2, dy2);
  CHECK(std::memcmp(dX.data(), g_inplace.data(), sizeof(S) * dX.size()) == 0);
  CHECK(std::memcmp(dy.data(), dy2.data(), sizeof(S) * dy.size()) == 0);
  CHECK(dH == dH2);
  CHECK(dhq == dhq2);
}
}  // namespace

TEST_CASE("Update in place equals separate buffers bit for bit (float, bf16)", "[bf16][float]") {
  for (const Index C : {64, 257, 1088}) {
    update_in_place_case<float, 4>(C, 9);
    update_in_place_case<mhc::bf16, 4>(C, 9);
    update_in_place_case<float, 3>(C, 5);
    update_in_place_case<mhc::bf16, 3>(C, 5);
    update_in_place_case<float, 2>(C, 5);
    update_in_place_case<mhc::bf16, 2>(C, 5);
    update_in_place_case<float, 1>(C, 5);
    update_in_place_case<mhc::bf16, 1>(C, 5);
  }
}

namespace {
/// u[t][c] depends only on column c of token t, so PreMix forward on the first C columns of a
/// wider X must give the first C columns of the wide result bit for bit, whichever kernel path
/// each width takes (bf16 with AVX-512: rows walked one by one for C <= 2048 in whole 64-column
/// blocks, 64-column blocks across the rows otherwise), with contiguous and with padded rows.
template <typename S>
void premix_columns_case(Index C, Index wide, Index T) {
  using R = mhc::compute_t<S>;
  constexpr int n = 4;
  const auto seed = fresh_seed();
  CAPTURE(seed, C, wide, T, sizeof(S));
  Rng rng(seed);
  const RowMat<S> Xw = to<S>(random_matrix(rng, T * n, wide, -2, 2));
  const RowMat<R> hp = random_matrix(rng, T, n).cast<R>();
  RowMat<S> uw(T, wide), u(T, C), u_padded(T, C);
  mhc::PreMix<S, n>::forward(Xw, hp, uw);
  const RowMat<S> X = Xw.leftCols(C);
  mhc::PreMix<S, n>::forward(X, hp, u);
  const Eigen::Map<const RowMat<S>, 0, Eigen::OuterStride<>> padded(Xw.data(), T * n, C,
                                                                   Eigen::OuterStride<>(wide));
  mhc::PreMix<S, n>::forward(padded, hp, u_padded);
  const RowMat<S> head = uw.leftCols(C);
  CHECK(std::memcmp(u.data(), head.data(), sizeof(S) * u.size()) == 0);
  CHECK(std::memcmp(u_padded.data(), head.data(), sizeof(S) * u.size()) == 0);
}
}  // namespace

TEST_CASE("PreMix forward: a column's result does not depend on C or on the row stride",
          "[bf16][float]") {
  for (const Index C : {64, 1024, 2048}) {
    premix_columns_case<float>(C, 2112, 7);
    premix_columns_case<mhc::bf16>(C, 2112, 7);
  }
  premix_columns_case<mhc::bf16>(1024, 1088, 3);
}
