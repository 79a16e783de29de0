// PreMix (u = h_pre^T X) and Update (X' = H_res X + h_post y^T): forward against the naive
// definition, backward against central finite differences in double, in-place update, broadcast
// (static) coefficients, padded rows and the argument errors.
#include "support/catch.hpp"
#include "support/ops_testing.hpp"

using namespace mhc_test;
using mhc::Index;

namespace {

struct Shape {
  int n;
  Index C, T;
};
// The maps are linear in each input, so central differences with a large step (1e-3) are exact up
// to rounding. Every n in {1, 2, 4, 8}, C in {1, 3, 64, 257}, T in {1, 5, 33} appears; C = 257 and
// 64 exercise the 64-column blocks and their tail.
const Shape kShapes[] = {{1, 1, 1},   {1, 257, 5}, {2, 3, 33}, {2, 64, 1},  {4, 1, 5},
                         {4, 64, 33}, {4, 257, 1}, {8, 3, 5},  {8, 257, 5}, {8, 64, 33}};

template <int N>
void premix_case(const Shape& s, bool broadcast, Index pad) {
  const int n = s.n;
  const auto seed = fresh_seed();
  CAPTURE(seed, n, s.C, s.T, N, broadcast, pad);
  Rng rng(seed);
  const RowMat<double> X = random_matrix(rng, s.T * n, s.C);
  const RowMat<double> h = random_matrix(rng, broadcast ? 1 : s.T, n, 0.05, 1.0);
  const RowMat<double> Gu = random_matrix(rng, s.T, s.C);
  const RowMat<double> D0 = random_matrix(rng, s.T * n, s.C);
  using Op = mhc::PreMix<double, N>;

  Padded<double> Xp(s.T * n, s.C, pad), up(s.T, s.C, pad);
  Xp.assign(X);
  Op::forward(Xp.cview(), h, up.view());
  const RowMat<double> u_ref = premix_ref(X, h, n);
  CHECK((up.to_double() - u_ref).cwiseAbs().maxCoeff() <=
        1e-12 * (1 + u_ref.cwiseAbs().maxCoeff()));
  for (Index r = 0; r < s.T; ++r)  // the row padding is never written
    for (Index c = s.C; c < s.C + pad; ++c) CHECK(up(r, c) == -777);

  Padded<double> dXp(s.T * n, s.C, pad), dup(s.T, s.C, pad);
  dXp.assign(D0);
  dup.assign(Gu);
  RowMat<double> dh(s.T, n);
  Op::backward(Xp.cview(), h, dup.cview(), dXp.view(), dh);
  const RowMat<double> dX = dXp.to_double() - D0;  // d_X accumulates

  const auto lossX = [&](const Eigen::VectorXd& x) {
    return dot(Gu, premix_ref(unflat(x, s.T * n, s.C), h, n));
  };
  const auto gX = check_gradient(lossX, flat(X), flat(dX), rng, 1e-3, fd_coords(200));
  CAPTURE(gX.worst, gX.analytic, gX.numeric);
  CHECK(gX.max_error < 1e-7);
  // d_h_pre is per token; with a broadcast row the gradient of that row is the sum over tokens.
  const auto lossH = [&](const Eigen::VectorXd& x) {
    return dot(Gu, premix_ref(X, unflat(x, h.rows(), n), n));
  };
  const RowMat<double> dh_row = broadcast ? RowMat<double>(dh.colwise().sum()) : dh;
  const auto gH = check_gradient(lossH, flat(h), flat(dh_row), rng, 1e-3, fd_coords(400));
  CAPTURE(gH.worst, gH.analytic, gH.numeric);
  CHECK(gH.max_error < 1e-7);
}

template <int N>
void update_case(const Shape& s, bool broadcast, Index pad) {
  const int n = s.n;
  const auto seed = fresh_seed();
  CAPTURE(seed, n, s.C, s.T, N, broadcast, pad);
  Rng rng(seed);
  const Index R = broadcast ? 1 : s.T;
  const RowMat<double> X = random_matrix(rng, s.T * n, s.C);
  const RowMat<double> H = random_matrix(rng, R, Index(n) * n, 0, 1);
  const RowMat<double> hq = random_matrix(rng, R, n, 0, 2);
  const RowMat<double> y = random_matrix(rng, s.T, s.C);
  const RowMat<double> G = random_matrix(rng, s.T * n, s.C);
  using Op = mhc::Update<double, N>;

  Padded<double> Xp(s.T * n, s.C, pad), yp(s.T, s.C, pad), outp(s.T * n, s.C, pad);
  Xp.assign(X);
  yp.assign(y);
  Op::forward(Xp.cview(), H, hq, yp.cview(), outp.view());
  const RowMat<double> ref = update_ref(X, H, hq, y, n);
  CHECK((outp.to_double() - ref).cwiseAbs().maxCoeff() <= 1e-12 * (1 + ref.cwiseAbs().maxCoeff()));

  Padded<double> Gp(s.T * n, s.C, pad), dXp(s.T * n, s.C, pad), dyp(s.T, s.C, pad);
  Gp.assign(G);
  RowMat<double> dH(s.T, Index(n) * n), dhq(s.T, n);
  Op::backward(Xp.cview(), H, hq, yp.cview(), Gp.cview(), dXp.view(), dH, dhq, dyp.view());

  const auto reduce = [&](const RowMat<double>& g) {
    return broadcast ? RowMat<double>(g.colwise().sum()) : g;
  };
  const auto loss = [&](const RowMat<double>& x, const RowMat<double>& h_res,
                        const RowMat<double>& h_post, const RowMat<double>& yy) {
    return dot(G, update_ref(x, h_res, h_post, yy, n));
  };
  const auto gX = check_gradient(
      [&](const Eigen::VectorXd& v) { return loss(unflat(v, X.rows(), X.cols()), H, hq, y); },
      flat(X), flat(dXp.to_double()), rng, 1e-3, fd_coords(200));
  CAPTURE(gX.worst, gX.analytic, gX.numeric);
  CHECK(gX.max_error < 1e-7);
  const auto gy = check_gradient(
      [&](const Eigen::VectorXd& v) { return loss(X, H, hq, unflat(v, y.rows(), y.cols())); },
      flat(y), flat(dyp.to_double()), rng, 1e-3, fd_coords(200));
  CAPTURE(gy.worst, gy.analytic, gy.numeric);
  CHECK(gy.max_error < 1e-7);
  const auto gH = check_gradient(
      [&](const Eigen::VectorXd& v) { return loss(X, unflat(v, H.rows(), H.cols()), hq, y); },
      flat(H), flat(reduce(dH)), rng, 1e-3, fd_coords(400));
  CAPTURE(gH.worst, gH.analytic, gH.numeric);
  CHECK(gH.max_error < 1e-7);
  const auto gq = check_gradient(
      [&](const Eigen::VectorXd& v) { return loss(X, H, unflat(v, hq.rows(), hq.cols()), y); },
      flat(hq), flat(reduce(dhq)), rng, 1e-3, fd_coords(400));
  CAPTURE(gq.worst, gq.analytic, gq.numeric);
  CHECK(gq.max_error < 1e-7);

  // In place: X_out = X and d_X = d_X_out give the same values as separate buffers.
  Padded<double> inplace = Xp;
  Op::forward(inplace.cview(), H, hq, yp.cview(), inplace.view());
  CHECK(inplace.same_bytes(outp));
  Padded<double> g_inplace = Gp;
  RowMat<double> dH2(s.T, Index(n) * n), dhq2(s.T, n);
  Padded<double> dy2(s.T, s.C, pad);
  Op::backward(Xp.cview(), H, hq, yp.cview(), g_inplace.cview(), g_inplace.view(), dH2, dhq2,
               dy2.view());
  CHECK(g_inplace.same_bytes(dXp));
  CHECK(dy2.same_bytes(dyp));
  CHECK(dH2 == dH);
  CHECK(dhq2 == dhq);
}

template <int N>
void run_shape(const Shape& s) {
  for (const bool broadcast : {false, true}) {
    premix_case<N>(s, broadcast, broadcast ? 5 : 0);
    update_case<N>(s, broadcast, broadcast ? 0 : 3);
  }
}

}  // namespace

TEST_CASE("PreMix and Update: forward matches the definition, backward matches finite differences",
          "[mixing]") {
  for (const Shape& s : kShapes) {
    run_shape<mhc::Dynamic>(s);
    switch (s.n) {
      case 1:
        run_shape<1>(s);
        break;
      case 2:
        run_shape<2>(s);
        break;
      case 4:
        run_shape<4>(s);
        break;
      case 8:
        run_shape<8>(s);
        break;
    }
  }
}

TEST_CASE("PreMix and Update: T = 0 and C = 0 are no-ops", "[mixing]") {
  RowMat<float> X(0, 5), u(0, 5), h(0, 4), H(0, 16), y(0, 5), out(0, 5);
  mhc::PreMix<float>::forward(X, h, u);
  mhc::Update<float>::forward(X, H, h, y, out);
  RowMat<float> X2 = RowMat<float>::Ones(8, 0), u2(2, 0), h2 = RowMat<float>::Ones(2, 4);
  RowMat<float> dh2 = RowMat<float>::Constant(2, 4, 5.f);
  mhc::PreMix<float>::backward(X2, h2, u2, X2 /* empty, never written */, dh2);
  CHECK(dh2.isZero());  // dh = X du over zero columns
}

TEST_CASE("PreMix and Update reject bad arguments before writing anything", "[mixing][errors]") {
  const int n = 4;
  const Index T = 3, C = 10;
  Rng rng(fresh_seed());
  RowMat<float> X = random_matrix(rng, T * n, C).cast<float>();
  RowMat<float> h = random_matrix(rng, T, n).cast<float>();
  RowMat<float> H = random_matrix(rng, T, n * n).cast<float>();
  RowMat<float> y = random_matrix(rng, T, C).cast<float>();
  RowMat<float> u = RowMat<float>::Constant(T, C, 42.f);
  RowMat<float> out = RowMat<float>::Constant(T * n, C, 42.f);
  const RowMat<float> u0 = u, out0 = out;
  using P = mhc::PreMix<float>;
  using U = mhc::Update<float>;
  using PD = mhc::PreMix<float, mhc::Dynamic>;

  const auto untouched = [&] { return u == u0 && out == out0; };
  // Wrong shapes.
  CHECK_THROWS_AS(P::forward(X.topRows(T * n - 1), h, u), mhc::invalid_argument);
  CHECK_THROWS_AS(P::forward(X, h.leftCols(3), u), mhc::invalid_argument);  // n = 3 != N = 4
  CHECK_THROWS_AS(P::forward(X, h.topRows(2), u), mhc::invalid_argument);   // 2 rows, not T or 1
  CHECK_THROWS_AS(U::forward(X, H.leftCols(15), h, y, out), mhc::invalid_argument);
  CHECK_THROWS_AS(U::forward(X, H, h, y.leftCols(C - 1), out), mhc::invalid_argument);
  // n out of range in the dynamic version.
  RowMat<float> h17 = RowMat<float>::Ones(T, 17), X17 = RowMat<float>::Ones(T * 17, C);
  CHECK_THROWS_AS(PD::forward(X17, h17, u), mhc::invalid_argument);
  CHECK_THROWS_AS(PD::forward(RowMat<float>(0, C), RowMat<float>(T, 0), u), mhc::invalid_argument);
  // Row stride smaller than C.
  CHECK_THROWS_AS(P::forward(mhc::map_batch(X.data(), T * n, C, C - 1), h, u),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(U::forward(X, H, h, mhc::map_batch(y.data(), T, C, 4), out),
                  mhc::invalid_argument);
  // Null buffers.
  CHECK_THROWS_AS(P::forward(mhc::map_batch(static_cast<const float*>(nullptr), T * n, C), h, u),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(U::forward(X, H, h, y, mhc::map_batch(static_cast<float*>(nullptr), T * n, C)),
                  mhc::invalid_argument);
  // Forbidden aliasing: u inside X; X_out shifted by one row against X; y inside X_out.
  CHECK_THROWS_AS(P::forward(X, h, X.topRows(T)), mhc::invalid_argument);
  CHECK_THROWS_AS(U::forward(X.topRows(2 * n), H.topRows(2), h.topRows(2), y.topRows(2),
                             X.middleRows(1, 2 * n)),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(U::forward(X, H, h, out.topRows(T), out), mhc::invalid_argument);
  CHECK(untouched());

  // Backward: outputs untouched on error.
  RowMat<float> G = random_matrix(rng, T * n, C).cast<float>();
  RowMat<float> dX = RowMat<float>::Constant(T * n, C, 7.f),
                dy = RowMat<float>::Constant(T, C, 7.f);
  RowMat<float> dH = RowMat<float>::Constant(T, n * n, 7.f),
                dh = RowMat<float>::Constant(T, n, 7.f);
  const RowMat<float> dX0 = dX, dy0 = dy, dH0 = dH, dh0 = dh;
  CHECK_THROWS_AS(U::backward(X, H, h, y, G, dX, dH.leftCols(3), dh, dy), mhc::invalid_argument);
  CHECK_THROWS_AS(U::backward(X, H, h, y, G, dX, dH, dh, X.topRows(T)), mhc::invalid_argument);
  CHECK_THROWS_AS(U::backward(X, H, h, y, G, X, dH, dh, dy), mhc::invalid_argument);  // d_X = X
  // d_X or d_y over the coefficients they are computed from (H_res, h_post inside one buffer).
  RowMat<float> coefs = RowMat<float>::Constant(T * n, C, 7.f);
  const RowMat<float> coefs0 = coefs;
  const auto H_in = mhc::map_batch(coefs.data() + 2, T, n * n);
  const auto h_in = mhc::map_batch(coefs.data() + C + 1, T, n);
  const auto dy_in = mhc::map_batch(coefs.data(), T, C);
  CHECK_THROWS_AS(U::backward(X, H_in, h, y, G, coefs, dH, dh, dy), mhc::invalid_argument);
  CHECK_THROWS_AS(U::backward(X, H, h_in, y, G, coefs, dH, dh, dy), mhc::invalid_argument);
  CHECK_THROWS_AS(U::backward(X, H_in, h, y, G, dX, dH, dh, dy_in), mhc::invalid_argument);
  CHECK_THROWS_AS(U::backward(X, H, h_in, y, G, dX, dH, dh, dy_in), mhc::invalid_argument);
  CHECK(coefs == coefs0);
  CHECK_THROWS_AS(P::backward(X, h, y, dX, dh.topRows(1)), mhc::invalid_argument);
  CHECK_THROWS_AS(P::backward(X, h, y, X, dh), mhc::invalid_argument);  // d_X overlaps X
  CHECK_THROWS_AS(P::backward(X, h, dX.topRows(T), dX, dh), mhc::invalid_argument);
  CHECK(dX == dX0);
  CHECK(dy == dy0);
  CHECK(dH == dH0);
  CHECK(dh == dh0);
}

TEST_CASE("Stream prefetch targets: a fixed distance along each row's walk over the tokens",
          "[mixing][prefetch]") {
  // The streaming kernels read row i of token 0, 1, 2, ... column block by column block. The
  // prefetch target of (t, c0) is the element `distance` further along that walk (position
  // t C + c0 + distance: token p / C, column p % C), none past the last token. StreamPrefetch
  // computes it per call; TokenPrefetch resolves it once per token for several views.
  using mhc::detail::StreamPrefetch;
  struct Case {
    Index T, C, pad, bytes;
  };
  const Case cases[] = {{5, 64, 0, 2048}, {7, 1024, 0, 2048}, {4, 100, 3, 2048},
                        {6, 257, 1, 4096}, {3, 33, 0, 64},     {9, 4096, 16, 2048},
                        {2, 1, 0, 2048},   {4, 512, 0, 2048}};
  for (const Case& k : cases) {
    constexpr int n = 3;
    CAPTURE(k.T, k.C, k.pad, k.bytes);
    Padded<float> X(k.T * n, k.C, k.pad), y(k.T, k.C, k.pad + 1);
    const auto Xv = X.cview();
    const auto yv = y.cview();
    const StreamPrefetch<float> ahead(k.T, k.C, k.bytes);
    const Index distance = k.bytes / Index(sizeof(float));
    const auto expected = [&](const auto& v, Index rows, Index t, Index i, Index c0) {
      const Index p = t * k.C + c0 + distance;
      return p / k.C < k.T ? reinterpret_cast<std::uintptr_t>(
                                 mhc::detail::at(v, (p / k.C) * rows + i, p % k.C))
                           : std::uintptr_t(0);
    };
    int mismatches = 0;
    for (Index t = 0; t < k.T; ++t) {
      auto token = ahead.token<n + 1>(t);
      token.add(yv, 1);
      token.add(Xv, n);
      for (Index c0 = 0; c0 < k.C; c0 += std::max<Index>(1, k.C / 37)) {
        mismatches += reinterpret_cast<std::uintptr_t>(ahead.target(yv, 1, t, 0, c0)) !=
                      expected(yv, 1, t, 0, c0);
        mismatches += token.address(0, c0) != expected(yv, 1, t, 0, c0);
        for (int i = 0; i < n; ++i) {
          mismatches += reinterpret_cast<std::uintptr_t>(ahead.target(Xv, n, t, i, c0)) !=
                        expected(Xv, n, t, i, c0);
          mismatches += token.address(1 + i, c0) != expected(Xv, n, t, i, c0);
        }
      }
    }
    CHECK(mismatches == 0);
  }
}
