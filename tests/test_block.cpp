// The block wrapper (block.hpp): whole-block gradients against central differences for every
// variant and both memory modes, identical gradients across modes, the residual variant as
// exactly x + F(x), the default initialisation, parameter views, and bad input.
#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "mhc/block.hpp"
#include "support/block_testing.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

// Every member compiles for every storage type, variant and both kinds of n.
template class mhc::Block<float, 4, mhc::MhcVariant>;
template class mhc::Block<double, mhc::Dynamic, mhc::MhcVariant>;
template class mhc::Block<mhc::bf16, 4, mhc::MhcVariant>;
template class mhc::Block<float, 4, mhc::HcVariant>;
template class mhc::Block<mhc::bf16, mhc::Dynamic, mhc::HcVariant>;
template class mhc::Block<double, 3, mhc::MhcLiteVariant>;
template class mhc::Block<mhc::bf16, 4, mhc::MhcLiteVariant>;
template class mhc::Block<float, 1, mhc::ResidualVariant>;
template class mhc::Block<mhc::bf16, 1, mhc::ResidualVariant>;
template class mhc::BlockContext<mhc::bf16, 4, mhc::MhcVariant>;
template class mhc::BlockWorkspace<double, mhc::Dynamic, mhc::HcVariant>;

namespace {

using mhc::Index;
using mhc::MemoryMode;
using RM = mhc::RowMatrix<double>;
using Layer = mhc_test::TanhLayer<double>;

/// Random parameters away from the symmetric default point, so every term of the backward matters.
template <typename Block>
void randomize(Block& block, mhc_test::Rng& rng) {
  auto p = block.params();
  auto W = p.W();
  mhc_test::fill_uniform(W, rng, -0.4, 0.4);
  p.alpha_pre() = mhc_test::uniform(rng, 0.3, 1.0);
  p.alpha_post() = mhc_test::uniform(rng, 0.3, 1.0);
  p.alpha_res() = mhc_test::uniform(rng, 0.3, 1.0);
  auto bp = p.b_pre();
  auto bq = p.b_post();
  auto br = p.b_res();
  mhc_test::fill_uniform(bp, rng);
  mhc_test::fill_uniform(bq, rng);
  mhc_test::fill_uniform(br, rng, -1.5, 1.5);
}

template <typename Variant, int N>
void check_block_gradient(int n, MemoryMode mode, Index T, Index C, bool dynamic = true) {
  using Block = mhc::Block<double, N, Variant>;
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed, Variant::name, n, T, C, static_cast<int>(mode), dynamic);
  mhc_test::Rng rng(seed);
  mhc::BlockOptions options;
  options.dynamic = dynamic;
  Block block(C, n, {}, options);
  if (Variant::kHasCoefficients) randomize(block, rng);
  Layer layer(C, rng);
  RM X(T * n, C), G(T * n, C);
  mhc_test::fill_uniform(X, rng, -1.5, 1.5);
  mhc_test::fill_uniform(G, rng);

  const Index nx = X.size(), np = block.parameter_count(), nl = layer.parameter_count();
  Eigen::VectorXd x0(nx + np + nl);
  x0.head(nx) = Eigen::Map<const Eigen::VectorXd>(X.data(), nx);
  x0.segment(nx, np) = block.parameters();
  layer.get(x0.data() + nx + np);

  auto loss = [&](const Eigen::VectorXd& v) {
    Eigen::VectorXd params = v.segment(nx, np);
    Block b(C, params.data(), n, options);  // a view of caller memory
    Layer l = layer;
    l.set(v.data() + nx + np);
    RM Xv = Eigen::Map<const RM>(v.data(), T * n, C), out(T * n, C);
    typename Block::Context ctx(b, T, MemoryMode::cache);
    b.forward(Xv, l, out, ctx);
    return (out.array() * G.array()).sum();
  };

  typename Block::Context ctx(block, T, mode);
  RM out(T * n, C), dX(T * n, C);
  block.forward(X, layer, out, ctx);
  Eigen::VectorXd grads = Eigen::VectorXd::Zero(np);
  block.backward(ctx, G, layer, dX, grads);
  CHECK(layer.forward_calls == (mode == MemoryMode::recompute ? 2 : 1));
  CHECK(layer.backward_calls == 1);
  Eigen::VectorXd analytic(nx + np + nl);
  analytic.head(nx) = Eigen::Map<const Eigen::VectorXd>(dX.data(), nx);
  analytic.segment(nx, np) = grads;
  layer.get_grad(analytic.data() + nx + np);
  const auto r = mhc_test::check_gradient(loss, x0, analytic, rng, 1e-6, 500);
  CAPTURE(r.worst, r.analytic, r.numeric, nx, np);
  CHECK(r.max_error < 2e-7);
}

template <typename Variant, int N>
void check_modes_identical(int n) {
  using Block = mhc::Block<double, N, Variant>;
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed, Variant::name, n);
  mhc_test::Rng rng(seed);
  const Index T = 7, C = 9;
  Block block(C, n);
  if (Variant::kHasCoefficients) randomize(block, rng);
  Layer layer_a(C, rng);
  Layer layer_b = layer_a;
  RM X(T * n, C), G(T * n, C);
  mhc_test::fill_uniform(X, rng);
  mhc_test::fill_uniform(G, rng);
  typename Block::Context cache(block, T, MemoryMode::cache), recompute(block, T, MemoryMode::recompute);
  RM out_a(T * n, C), out_b(T * n, C), dX_a(T * n, C), dX_b(T * n, C);
  Eigen::VectorXd g_a = Eigen::VectorXd::Zero(block.parameter_count()), g_b = g_a;
  block.forward(X, layer_a, out_a, cache);
  block.forward(X, layer_b, out_b, recompute);
  CHECK(out_a == out_b);
  block.backward(cache, G, layer_a, dX_a, g_a);
  block.backward(recompute, G, layer_b, dX_b, g_b);
  CHECK(dX_a == dX_b);
  CHECK(g_a == g_b);
  CHECK(layer_a.dA == layer_b.dA);
  CHECK(recompute.saved_bytes() < cache.saved_bytes());
  CHECK(recompute.saved_bytes() == Index(sizeof(double)) * T * n * C);
}

}  // namespace

TEST_CASE("mHC block gradients match central differences", "[block][gradient]") {
  for (MemoryMode mode : {MemoryMode::cache, MemoryMode::recompute}) {
    check_block_gradient<mhc::MhcVariant, 4>(4, mode, 3, 5);
    check_block_gradient<mhc::MhcVariant, mhc::Dynamic>(3, mode, 2, 7);
    check_block_gradient<mhc::MhcVariant, mhc::Dynamic>(1, mode, 3, 1);
  }
}

TEST_CASE("HC block gradients match central differences", "[block][gradient]") {
  for (MemoryMode mode : {MemoryMode::cache, MemoryMode::recompute}) {
    check_block_gradient<mhc::HcVariant, 4>(4, mode, 3, 5);
    check_block_gradient<mhc::HcVariant, mhc::Dynamic>(2, mode, 3, 3);
  }
}

TEST_CASE("mHC-lite block gradients match central differences", "[block][gradient]") {
  for (MemoryMode mode : {MemoryMode::cache, MemoryMode::recompute}) {
    check_block_gradient<mhc::MhcLiteVariant, 4>(4, mode, 2, 3);
    check_block_gradient<mhc::MhcLiteVariant, mhc::Dynamic>(3, mode, 3, 4);
  }
}

TEST_CASE("block gradients on the operators' size grid: n = 8, C = 64 and 257, T = 1 and 33",
          "[block][gradient]") {
  check_block_gradient<mhc::MhcVariant, mhc::Dynamic>(8, MemoryMode::cache, 2, 3);
  check_block_gradient<mhc::MhcVariant, 4>(4, MemoryMode::recompute, 1, 64);
  check_block_gradient<mhc::MhcVariant, mhc::Dynamic>(2, MemoryMode::cache, 1, 257);
  check_block_gradient<mhc::MhcVariant, 4>(4, MemoryMode::cache, 33, 3);
  check_block_gradient<mhc::HcVariant, mhc::Dynamic>(8, MemoryMode::recompute, 5, 1);
}

TEST_CASE("static-only blocks: gradients match central differences", "[block][gradient]") {
  for (MemoryMode mode : {MemoryMode::cache, MemoryMode::recompute}) {
    check_block_gradient<mhc::MhcVariant, 4>(4, mode, 5, 6, false);
    check_block_gradient<mhc::HcVariant, mhc::Dynamic>(3, mode, 4, 5, false);
    check_block_gradient<mhc::MhcLiteVariant, 3>(3, mode, 4, 5, false);
  }
}

template <typename Variant>
void check_static_equals_zero_projection() {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed, Variant::name);
  mhc_test::Rng rng(seed);
  const Index T = 6, C = 5;
  mhc::BlockOptions st;
  st.dynamic = false;
  mhc::Block<double, 4, Variant> dyn(C), sta(C, 4, {}, st);
  randomize(dyn, rng);
  dyn.params().W().setZero();
  CHECK(sta.parameter_count() == dyn.parameter_count() - 4 * C * dyn.layout().K);
  CHECK(sta.params().W().size() == 0);
  sta.params().alpha() = dyn.params().alpha();
  sta.params().b_pre() = dyn.params().b_pre();
  sta.params().b_post() = dyn.params().b_post();
  sta.params().b_res() = dyn.params().b_res();
  Layer l1(C, rng), l2 = l1;
  RM X(T * 4, C), G(T * 4, C), o1(T * 4, C), o2(T * 4, C), d1(T * 4, C), d2(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  mhc_test::fill_uniform(G, rng);
  typename mhc::Block<double, 4, Variant>::Context c1(dyn, T, MemoryMode::cache), c2(sta, T, MemoryMode::cache);
  dyn.forward(X, l1, o1, c1);
  sta.forward(X, l2, o2, c2);
  CHECK(c2.H_res.rows() == 1);
  CHECK((o1 - o2).cwiseAbs().maxCoeff() < 1e-13);
  Eigen::VectorXd g1 = Eigen::VectorXd::Zero(dyn.parameter_count()), g2 = Eigen::VectorXd::Zero(sta.parameter_count());
  dyn.backward(c1, G, l1, d1, g1);
  sta.backward(c2, G, l2, d2, g2);
  // With W = 0 the dynamic block's X gradient through r and z vanishes too (dz / r hits W = 0,
  // and the r term is proportional to z = 0).
  CHECK((d1 - d2).cwiseAbs().maxCoeff() < 1e-12);
  const Index skip = 4 * C * dyn.layout().K;
  CHECK((g1.tail(g2.size() - 3) - g2.tail(g2.size() - 3)).cwiseAbs().maxCoeff() < 1e-12);  // biases
  CHECK(g2.head(3).cwiseAbs().maxCoeff() == 0.0);  // d_alpha = sum(da * z) = 0 at z = 0
  CHECK(g1.segment(skip, 3).cwiseAbs().maxCoeff() == 0.0);
}

TEST_CASE("a static-only block equals a dynamic block with W = 0", "[block]") {
  check_static_equals_zero_projection<mhc::MhcVariant>();
  check_static_equals_zero_projection<mhc::HcVariant>();
  check_static_equals_zero_projection<mhc::MhcLiteVariant>();
}

TEST_CASE("residual block gradients match central differences", "[block][gradient]") {
  for (MemoryMode mode : {MemoryMode::cache, MemoryMode::recompute})
    check_block_gradient<mhc::ResidualVariant, 1>(1, mode, 4, 6);
}

TEST_CASE("cache and recompute modes give bitwise identical results", "[block]") {
  check_modes_identical<mhc::MhcVariant, 4>(4);
  check_modes_identical<mhc::MhcVariant, mhc::Dynamic>(5);
  check_modes_identical<mhc::HcVariant, 3>(3);
  check_modes_identical<mhc::MhcLiteVariant, 4>(4);
}

TEMPLATE_TEST_CASE("the residual variant is exactly x + F(x)", "[block]", float, double) {
  using S = TestType;
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 6, C = 11;
  mhc::ResidualBlock<S> block(C, 1);
  CHECK(block.parameter_count() == 0);
  mhc_test::TanhLayer<S> layer(C, rng), reference = layer;
  mhc::RowMatrix<S> x(T, C), out(T, C), y(T, C), dX(T, C), g(T, C), du(T, C);
  mhc_test::fill_uniform(x, rng);
  mhc_test::fill_uniform(g, rng);
  for (MemoryMode mode : {MemoryMode::cache, MemoryMode::recompute}) {
    typename mhc::ResidualBlock<S>::Context ctx(block, T, mode);
    block.forward(x, layer, out, ctx);
    reference.forward(x, y);
    const mhc::RowMatrix<S> expected = x + y;
    CHECK(out == expected);
    // Backward: d_x = g + J_F^T g.
    Eigen::Matrix<mhc::compute_t<S>, Eigen::Dynamic, 1> none(0);
    block.backward(ctx, g, layer, dX, none);
    reference.backward(g, du);
    const mhc::RowMatrix<S> expected_dx = g + du;
    CHECK(dX == expected_dx);
    // In place: x <- x + F(x).
    mhc::RowMatrix<S> inplace = x;
    block.forward(inplace, layer, inplace, ctx);
    CHECK(inplace == expected);
  }
}

TEST_CASE("a fresh block behaves like a pre-norm residual (default initialisation)", "[block]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 5, C = 8;
  RM X(T * 4, C), out(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  Layer layer(C, rng);
  {
    mhc::MhcBlock<double> block(C);
    mhc::MhcBlock<double>::Context ctx(block, T, MemoryMode::cache);
    block.forward(X, layer, out, ctx);
    const double e6 = std::exp(6.0);
    for (Index t = 0; t < T; ++t) {
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j)  // one Sinkhorn round is exact here: e^c / (e^c + n - 1)
          CHECK(ctx.H_res(t, i * 4 + j) == Approx(i == j ? e6 / (e6 + 3) : 1 / (e6 + 3)).epsilon(1e-12));
        CHECK(ctx.h_pre(t, i) == Approx(i == 0 ? 0.99 : 0.01).epsilon(1e-12));
        CHECK(ctx.h_post(t, i) == Approx(1.0).epsilon(1e-15));
      }
    }
    CHECK(ctx.H_res(0, 0) > 0.99);
    CHECK(block.params().alpha_res() == 0.01);
    CHECK(block.params().W().isZero());
  }
  {
    mhc::BlockInit init;
    init.pre_stream = 2;
    init.projection_std = 0.1;
    init.seed = 5;
    mhc::HcBlock<double> block(C, 4, init);
    mhc::HcBlock<double>::Context ctx(block, T, MemoryMode::cache);
    block.forward(X, layer, out, ctx);
    CHECK(!block.params().W().isZero());
    CHECK(block.params().W().cwiseAbs().maxCoeff() < 1.0);
    for (int i = 0; i < 4; ++i) {
      CHECK(block.params().b_pre()[i] == (i == 2 ? 1.0 : 0.0));
      CHECK(block.params().b_post()[i] == 1.0);
      for (int j = 0; j < 4; ++j) CHECK(block.params().b_res()[i * 4 + j] == (i == j ? 1.0 : 0.0));
    }
    // The dynamic part is alpha tanh(.) with alpha = 0.01.
    CHECK((ctx.H_res.row(0) - block.params().b_res().transpose()).cwiseAbs().maxCoeff() <= 0.01);
  }
  {
    mhc::MhcLiteBlock<double> block(C);
    mhc::MhcLiteBlock<double>::Context ctx(block, T, MemoryMode::cache);
    block.forward(X, layer, out, ctx);
    for (Index t = 0; t < T; ++t)
      for (int i = 0; i < 4; ++i) CHECK(ctx.H_res(t, i * 4 + i) >= 0.99 - 1e-12);
  }
}

TEST_CASE("parameters can live in caller memory", "[block]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 3, C = 4;
  mhc::MhcBlock<double, 2> owner(C, 2);
  randomize(owner, rng);
  std::vector<double> storage(static_cast<size_t>(owner.parameter_count()));
  Eigen::Map<Eigen::VectorXd>(storage.data(), owner.parameter_count()) = owner.parameters();
  mhc::MhcBlock<double, 2> viewer(C, storage.data(), 2);
  CHECK(viewer.parameters().data() == storage.data());
  CHECK(!viewer.owns());
  mhc::MhcBlock<double, 2> copy = viewer;  // copies the view, not the values
  CHECK(copy.parameters().data() == storage.data());
  mhc::MhcBlock<double, 2> owned_copy = owner;
  CHECK(owned_copy.parameters().data() != owner.parameters().data());
  CHECK(owned_copy.parameters() == owner.parameters());
  Layer layer(C, rng), layer2 = layer;
  RM X(T * 2, C), a(T * 2, C), b(T * 2, C);
  mhc_test::fill_uniform(X, rng);
  mhc::MhcBlock<double, 2>::Context c1(owner, T, MemoryMode::cache), c2(viewer, T, MemoryMode::cache);
  owner.forward(X, layer, a, c1);
  viewer.forward(X, layer2, b, c2);
  CHECK(a == b);
  // Gradients accumulate into caller memory with the same layout.
  Eigen::VectorXd g = Eigen::VectorXd::Constant(owner.parameter_count(), 1.0);
  RM dX(T * 2, C);
  owner.backward(c1, a, layer, dX, g);
  Eigen::VectorXd g2 = Eigen::VectorXd::Zero(owner.parameter_count());
  viewer.backward(c2, b, layer2, dX, g2);
  CHECK((g.array() - 1.0 - g2.array()).abs().maxCoeff() < 1e-12);
  CHECK(owner.view(g2).b_res().size() == 4);
}

TEST_CASE("float blocks agree with double blocks", "[block]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 9, C = 13;
  mhc::MhcBlock<double> bd(C);
  randomize(bd, rng);
  Eigen::VectorXf pf = bd.parameters().cast<float>();
  mhc::MhcBlock<float> bf(C, pf.data());
  Layer ld(C, rng);
  mhc_test::TanhLayer<float> lf;
  lf.A = ld.A;
  lf.b = ld.b;
  lf.dA = ld.dA;
  lf.db = ld.db;
  RM X(T * 4, C), G(T * 4, C), out(T * 4, C), dX(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  mhc_test::fill_uniform(G, rng);
  mhc::RowMatrix<float> Xf = X.cast<float>(), Gf = G.cast<float>(), outf(T * 4, C), dXf(T * 4, C);
  mhc::MhcBlock<double>::Context cd(bd, T, MemoryMode::cache);
  mhc::MhcBlock<float>::Context cf(bf, T, MemoryMode::recompute);
  bd.forward(X, ld, out, cd);
  bf.forward(Xf, lf, outf, cf);
  CHECK((out - outf.cast<double>()).cwiseAbs().maxCoeff() < 1e-5);
  Eigen::VectorXd gd = Eigen::VectorXd::Zero(bd.parameter_count());
  Eigen::VectorXf gf = Eigen::VectorXf::Zero(bf.parameter_count());
  bd.backward(cd, G, ld, dX, gd);
  bf.backward(cf, Gf, lf, dXf, gf);
  CHECK((dX - dXf.cast<double>()).cwiseAbs().maxCoeff() < 1e-4);
  CHECK((gd - gf.cast<double>()).cwiseAbs().maxCoeff() < 1e-4 * (1 + gd.cwiseAbs().maxCoeff()));
}

namespace {
struct NoBackward {
  void forward(const mhc::ConstBatchRef<double>&, mhc::BatchRef<double>) {}
};
struct WrongScalar {
  void forward(const mhc::ConstBatchRef<float>&, mhc::BatchRef<float>) {}
  void backward(const mhc::ConstBatchRef<float>&, mhc::BatchRef<float>) {}
};
}  // namespace

TEST_CASE("the layer concept is checked at compile time", "[block]") {
  STATIC_REQUIRE(mhc::is_block_layer_v<Layer, double>);
  STATIC_REQUIRE(mhc::is_block_layer_v<mhc_test::TanhLayer<float>, float>);
  STATIC_REQUIRE_FALSE(mhc::is_block_layer_v<NoBackward, double>);
  STATIC_REQUIRE_FALSE(mhc::is_block_layer_v<WrongScalar, double>);
  STATIC_REQUIRE_FALSE(mhc::is_block_layer_v<int, double>);
}

TEST_CASE("the block rejects bad input before writing", "[block][errors]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 3, C = 5;
  using B = mhc::MhcBlock<double>;
  CHECK_THROWS_AS(B(0), mhc::invalid_argument);
  CHECK_THROWS_AS(B(C, 3), mhc::invalid_argument);  // n != N
  using LiteX = mhc::MhcLiteBlock<double, mhc::Dynamic>;
  using MhcX = mhc::MhcBlock<double, mhc::Dynamic>;
  using ResX = mhc::Block<double, mhc::Dynamic, mhc::ResidualVariant>;
  CHECK_THROWS_AS(LiteX(C, 6), mhc::invalid_argument);
  CHECK_THROWS_AS(MhcX(C, 17), mhc::invalid_argument);
  CHECK_THROWS_AS(ResX(C, 2), mhc::invalid_argument);
  mhc::BlockOptions bad;
  bad.iterations = 0;
  CHECK_THROWS_AS(B(C, 4, {}, bad), mhc::invalid_argument);
  CHECK_THROWS_AS(B(C, static_cast<double*>(nullptr)), mhc::invalid_argument);

  B block(C);
  Layer layer(C, rng);
  RM X(T * 4, C), out(T * 4, C), dX(T * 4, C), wrong(T * 4 - 1, C);
  mhc_test::fill_uniform(X, rng);
  out.setConstant(-7);
  dX.setConstant(-7);
  wrong.setConstant(-7);
  B::Context ctx(block, T, MemoryMode::cache);
  Eigen::VectorXd g = Eigen::VectorXd::Zero(block.parameter_count());
  // backward before any forward
  CHECK_THROWS_AS(block.backward(ctx, X, layer, dX, g), mhc::invalid_argument);
  CHECK_THROWS_AS(block.forward(wrong, layer, out, ctx), mhc::invalid_argument);
  CHECK_THROWS_AS(block.forward(X, layer, wrong, ctx), mhc::invalid_argument);
  try {
    block.forward(X, layer, wrong, ctx);
  } catch (const mhc::invalid_argument& e) {
    CHECK(std::string(e.what()).find("X_out has shape (11, 5), expected (12, 5)") != std::string::npos);
  }
  // A context for another T or another width.
  B::Context other_t(block, T + 1, MemoryMode::cache);
  CHECK_THROWS_AS(block.forward(X, layer, out, other_t), mhc::invalid_argument);
  B wide(C + 1);
  B::Context other_c(wide, T, MemoryMode::cache);
  CHECK_THROWS_AS(block.forward(X, layer, out, other_c), mhc::invalid_argument);
  // Partial overlap of output and input.
  RM big((T + 1) * 4, C);
  big.setZero();
  CHECK_THROWS_AS(block.forward(big.topRows(T * 4), layer, big.bottomRows(T * 4), ctx),
                  mhc::invalid_argument);
  CHECK((out.array() == -7).all());
  CHECK(layer.forward_calls == 0);
  block.forward(X, layer, out, ctx);
  Eigen::VectorXd short_g = Eigen::VectorXd::Zero(block.parameter_count() - 1);
  CHECK_THROWS_AS(block.backward(ctx, X, layer, dX, short_g), mhc::invalid_argument);
  CHECK_THROWS_AS(block.backward(ctx, wrong, layer, dX, g), mhc::invalid_argument);
  CHECK_THROWS_AS(block.backward(ctx, X, layer, wrong, g), mhc::invalid_argument);
  Eigen::Map<Eigen::VectorXd> params = block.parameters();
  CHECK_THROWS_AS(block.backward(ctx, X, layer, dX, params), mhc::invalid_argument);  // grads = params
  CHECK((dX.array() == -7).all());
  CHECK((g.array() == 0).all());
  CHECK(layer.backward_calls == 0);
  // A shared workspace of the wrong shape.
  B::Workspace ws(T, 4, C + 2);
  CHECK_THROWS_AS(B::Context(block, T, MemoryMode::cache, &ws), mhc::invalid_argument);
  // Null buffers and row strides smaller than C, forward and backward.
  const auto null_in = mhc::map_batch(static_cast<const double*>(nullptr), T * 4, C);
  const auto null_out = mhc::map_batch(static_cast<double*>(nullptr), T * 4, C);
  CHECK_THROWS_AS(block.forward(null_in, layer, out, ctx), mhc::invalid_argument);
  CHECK_THROWS_AS(block.forward(X, layer, null_out, ctx), mhc::invalid_argument);
  CHECK_THROWS_AS(block.backward(ctx, null_in, layer, dX, g), mhc::invalid_argument);
  CHECK_THROWS_AS(block.backward(ctx, X, layer, null_out, g), mhc::invalid_argument);
  CHECK_THROWS_AS(block.forward(mhc::map_batch(X.data(), T * 4, C, C - 1), layer, out, ctx),
                  mhc::invalid_argument);
  CHECK_THROWS_AS(block.backward(ctx, X, layer, mhc::map_batch(dX.data(), T * 4, C, C - 1), g),
                  mhc::invalid_argument);
  CHECK((dX.array() == -7).all());
  CHECK((g.array() == 0).all());
  CHECK(layer.forward_calls == 1);
  CHECK(layer.backward_calls == 0);
}

TEST_CASE("non-finite parameters throw before a block writes anything", "[block][errors]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 2, C = 3;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  RM X(T * 4, C), out(T * 4, C), dX(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  Layer layer(C, rng);
  using B = mhc::MhcBlock<double>;
  B block(C);
  B::Context ctx(block, T, MemoryMode::cache);
  block.forward(X, layer, out, ctx);  // a good forward first
  const RM out0 = out, ctx_X0 = ctx.X;
  block.params().b_res()[6] = nan;  // H_res logit (1, 2); e.g. a diverged optimiser step
  CHECK_THROWS_AS(block.forward(2 * X, layer, out, ctx), mhc::invalid_argument);
  CHECK(out == out0);
  CHECK(ctx.X == ctx_X0);
  dX.setConstant(-7);
  Eigen::VectorXd g = Eigen::VectorXd::Zero(block.parameter_count());
  CHECK_THROWS_AS(block.backward(ctx, X, layer, dX, g), mhc::invalid_argument);
  CHECK((dX.array() == -7).all());
  CHECK((g.array() == 0).all());
  CHECK(layer.forward_calls == 1);

  // A layer that throws leaves the context without a forward (backward then refuses it).
  struct Throwing {
    void forward(const mhc::ConstBatchRef<double>&, mhc::BatchRef<double>) {
      throw std::runtime_error("layer failed");
    }
    void backward(const mhc::ConstBatchRef<double>&, mhc::BatchRef<double>) {}
  } throwing;
  B fine(C);
  B::Context fine_ctx(fine, T, MemoryMode::cache);
  fine.forward(X, layer, out, fine_ctx);
  CHECK_THROWS_AS(fine.forward(X, throwing, out, fine_ctx), std::runtime_error);
  CHECK_THROWS_AS(fine.backward(fine_ctx, X, layer, dX, g), mhc::invalid_argument);
}

TEST_CASE("block contexts, workspaces and initialisers reject bad values", "[block][errors]") {
  using B = mhc::MhcBlock<double>;
  using BX = mhc::MhcBlock<double, mhc::Dynamic>;
  CHECK_THROWS_AS(B::Workspace(2, 4, -8), mhc::invalid_argument);
  CHECK_THROWS_AS(B::Workspace(2, 0, 8), mhc::invalid_argument);
  CHECK_THROWS_AS(B::Workspace(-1, 4, 8), mhc::invalid_argument);
  BX::Context ctx;
  CHECK_THROWS_AS(ctx.resize(4, -8, 2, MemoryMode::cache), mhc::invalid_argument);
  CHECK_THROWS_AS(ctx.resize(17, 8, 2, MemoryMode::recompute), mhc::invalid_argument);
  {
    // a shared workspace of the wrong shape leaves a context (and its forward) as it was
    const auto seed = mhc_test::fresh_seed();
    CAPTURE(seed);
    mhc_test::Rng rng(seed);
    B block(3);
    Layer layer(3, rng);
    B::Context good(block, 2, MemoryMode::cache);
    RM X(8, 3), out(8, 3), dX(8, 3);
    mhc_test::fill_uniform(X, rng);
    block.forward(X, layer, out, good);
    B::Workspace other(5, 4, 3);
    CHECK_THROWS_AS(good.resize(4, 3, 2, MemoryMode::recompute, 20, &other),
                    mhc::invalid_argument);
    CHECK(good.mode() == MemoryMode::cache);
    Eigen::VectorXd g = Eigen::VectorXd::Zero(block.parameter_count());
    CHECK_NOTHROW(block.backward(good, X, layer, dX, g));
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  mhc::BlockInit init;
  init.alpha = nan;
  CHECK_THROWS_AS(B(5, 4, init), mhc::invalid_argument);
  init = {};
  init.pre_stream = -1;
  CHECK_THROWS_AS(B(5, 4, init), mhc::invalid_argument);
  init = {};
  init.projection_std = -0.1;
  CHECK_THROWS_AS(B(5, 4, init), mhc::invalid_argument);
  init = {};
  init.lite_identity_weight = 1.0;  // b_res would be +inf
  CHECK_THROWS_AS(mhc::MhcLiteBlock<double>(5, 4, init), mhc::invalid_argument);
  CHECK_NOTHROW(B(5, 4, init));                                        // not used by mHC
  CHECK_NOTHROW(mhc::MhcLiteBlock<double, mhc::Dynamic>(5, 1, init));  // n = 1: one permutation
  // reset_parameters writes nothing when it throws
  B block(5);
  const Eigen::VectorXd before = block.parameters();
  init = {};
  init.res_logit_gap = std::numeric_limits<double>::infinity();
  CHECK_THROWS_AS(block.reset_parameters(init), mhc::invalid_argument);
  CHECK(block.parameters() == before);
}

TEST_CASE("bf16 blocks agree with float blocks to bf16 precision", "[block]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 5, C = 16;
  mhc::MhcBlock<float> bf(C);
  mhc::HcBlock<float> hf(C);
  randomize(bf, rng);
  randomize(hf, rng);
  mhc::MhcBlock<mhc::bf16> bb(C, bf.parameters().data());  // bf16 storage, float parameters
  mhc::HcBlock<mhc::bf16> hb(C, hf.parameters().data());
  mhc_test::TanhLayer<float> lf(C, rng, 0.3);
  mhc_test::TanhLayer<mhc::bf16> lb;
  lb.A = lf.A;
  lb.b = lf.b;
  lb.dA = lf.dA;
  lb.db = lf.db;
  mhc::RowMatrix<float> X(T * 4, C), G(T * 4, C), of(T * 4, C), dXf(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  mhc_test::fill_uniform(G, rng);
  // Inputs exactly representable in bf16, so both runs see the same values.
  const mhc::RowMatrix<mhc::bf16> Xb = X.cast<mhc::bf16>(), Gb = G.cast<mhc::bf16>();
  X = Xb.cast<float>();
  G = Gb.cast<float>();
  mhc::RowMatrix<mhc::bf16> ob(T * 4, C), dXb(T * 4, C);
  auto run = [&](auto& blk_f, auto& blk_b) {
    using BF = std::decay_t<decltype(blk_f)>;
    using BB = std::decay_t<decltype(blk_b)>;
    typename BF::Context cf(blk_f, T, MemoryMode::cache);
    typename BB::Context cb(blk_b, T, MemoryMode::recompute);
    blk_f.forward(X, lf, of, cf);
    blk_b.forward(Xb, lb, ob, cb);
    CHECK((of - ob.cast<float>()).cwiseAbs().maxCoeff() < 0.05f);
    Eigen::VectorXf gf = Eigen::VectorXf::Zero(blk_f.parameter_count()), gb = gf;
    blk_f.backward(cf, G, lf, dXf, gf);
    blk_b.backward(cb, Gb, lb, dXb, gb);
    CHECK((dXf - dXb.cast<float>()).cwiseAbs().maxCoeff() < 0.05f * (1 + dXf.cwiseAbs().maxCoeff()));
    CHECK((gf - gb).cwiseAbs().maxCoeff() < 0.05f * (1 + gf.cwiseAbs().maxCoeff()));
  };
  run(bf, bb);
  run(hf, hb);
}

TEST_CASE("padded (strided) views give the same results as contiguous ones", "[block]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 4, C = 7, S = 10;  // row stride 10 > C
  auto check = [&](auto& block) {
    using B = std::decay_t<decltype(block)>;
    const int n = block.streams();
    randomize(block, rng);
    Layer l1(C, rng), l2 = l1;
    RM X(T * n, C), G(T * n, C), out(T * n, C), dX(T * n, C);
    mhc_test::fill_uniform(X, rng);
    mhc_test::fill_uniform(G, rng);
    std::vector<double> xs(T * n * S, -5.0), gs(T * n * S, -5.0), os(T * n * S, -5.0), ds(T * n * S, -5.0);
    auto Xp = mhc::map_batch(xs.data(), T * n, C, S);
    auto Gp = mhc::map_batch(gs.data(), T * n, C, S);
    auto Op = mhc::map_batch(os.data(), T * n, C, S);
    auto Dp = mhc::map_batch(ds.data(), T * n, C, S);
    Xp = X;
    Gp = G;
    typename B::Context c1(block, T, MemoryMode::cache), c2(block, T, MemoryMode::cache);
    Eigen::VectorXd g1 = Eigen::VectorXd::Zero(block.parameter_count()), g2 = g1;
    block.forward(X, l1, out, c1);
    block.forward(Xp, l2, Op, c2);
    CHECK(RM(Op) == out);
    block.backward(c1, G, l1, dX, g1);
    block.backward(c2, Gp, l2, Dp, g2);
    CHECK(RM(Dp) == dX);
    CHECK(g1 == g2);
    for (Index r = 0; r < T * n; ++r)  // the padding is untouched
      for (Index c = C; c < S; ++c) {
        CHECK(os[static_cast<size_t>(r * S + c)] == -5.0);
        CHECK(ds[static_cast<size_t>(r * S + c)] == -5.0);
      }
  };
  mhc::MhcBlock<double> m(C);
  mhc::HcBlock<double, mhc::Dynamic> h(C, 3);
  check(m);
  check(h);
}
