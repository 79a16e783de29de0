// The block stack (stack.hpp): 4-block gradients against central differences for every variant
// and both memory policies, checkpointed == cache-everything (bitwise) with less saved memory,
// the paper's segment length, the gain probe, and bad input.
#include <Eigen/Core>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "mhc/stack.hpp"
#include "support/block_testing.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

namespace {

using mhc::Index;
using mhc::StackMemory;
using RM = mhc::RowMatrix<double>;
using Layer = mhc_test::TanhLayer<double>;

template <typename Stack>
void randomize(Stack& stack, mhc_test::Rng& rng) {
  auto p = stack.parameters();
  for (int l = 0; l < stack.layers(); ++l) {
    const Index P = stack.block_parameter_count();
    auto v = stack.block(l).params();
    auto W = v.W();
    mhc_test::fill_uniform(W, rng, -0.3, 0.3);
    v.alpha().setConstant(0.6);
    auto seg = p.segment(Index(l) * P + v.layout.b_pre, P - v.layout.b_pre);
    seg += Eigen::VectorXd::NullaryExpr(seg.size(), [&](Index) { return mhc_test::uniform(rng, -0.5, 0.5); });
  }
}

template <typename Variant, int N>
void check_stack_gradient(int n, StackMemory memory, int segment, bool dynamic = true) {
  using Stack = mhc::Stack<double, N, Variant>;
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed, Variant::name, n, static_cast<int>(memory), segment, dynamic);
  mhc_test::Rng rng(seed);
  const int L = 4;
  const Index T = 2, C = 3;
  mhc::BlockOptions options;
  options.dynamic = dynamic;
  Stack stack(L, C, n, {}, options);
  if (Variant::kHasCoefficients) randomize(stack, rng);
  std::vector<Layer> layers;
  for (int l = 0; l < L; ++l) layers.emplace_back(C, rng);
  RM X(T * n, C), G(T * n, C);
  mhc_test::fill_uniform(X, rng, -1.5, 1.5);
  mhc_test::fill_uniform(G, rng);
  const Index nx = X.size(), np = stack.parameter_count(), nl = layers[0].parameter_count();
  Eigen::VectorXd x0(nx + np + L * nl);
  x0.head(nx) = Eigen::Map<const Eigen::VectorXd>(X.data(), nx);
  x0.segment(nx, np) = stack.parameters();
  for (int l = 0; l < L; ++l) layers[l].get(x0.data() + nx + np + l * nl);

  Stack probe(L, C, n, {}, options);
  probe.reserve(T, StackMemory::cache_all);
  auto loss = [&](const Eigen::VectorXd& v) {
    probe.parameters() = v.segment(nx, np);
    std::vector<Layer> ls = layers;
    for (int l = 0; l < L; ++l) ls[l].set(v.data() + nx + np + l * nl);
    RM out = Eigen::Map<const RM>(v.data(), T * n, C);
    probe.forward(out, ls, out);
    return (out.array() * G.array()).sum();
  };

  stack.reserve(T, memory, segment);
  RM out(T * n, C), dX(T * n, C);
  stack.forward(X, layers, out);
  Eigen::VectorXd grads = Eigen::VectorXd::Zero(np);
  stack.backward(G, layers, dX, grads);
  Eigen::VectorXd analytic(x0.size());
  analytic.head(nx) = Eigen::Map<const Eigen::VectorXd>(dX.data(), nx);
  analytic.segment(nx, np) = grads;
  for (int l = 0; l < L; ++l) layers[l].get_grad(analytic.data() + nx + np + l * nl);
  const auto r = mhc_test::check_gradient(loss, x0, analytic, rng, 1e-6, 300);
  CAPTURE(r.worst, r.analytic, r.numeric);
  CHECK(r.max_error < 5e-7);
}

template <typename Variant, int N>
void check_checkpoint_identical(int n, int L, int segment) {
  using Stack = mhc::Stack<double, N, Variant>;
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed, Variant::name, n, L, segment);
  mhc_test::Rng rng(seed);
  const Index T = 5, C = 6;
  Stack a(L, C, n), b(L, C, n);
  if (Variant::kHasCoefficients) randomize(a, rng);
  b.parameters() = a.parameters();
  std::vector<Layer> la;
  for (int l = 0; l < L; ++l) la.emplace_back(C, rng);
  std::vector<Layer> lb = la;
  RM X(T * n, C), G(T * n, C), oa(T * n, C), ob(T * n, C), da(T * n, C);
  mhc_test::fill_uniform(X, rng);
  mhc_test::fill_uniform(G, rng);
  a.reserve(T, StackMemory::cache_all);
  b.reserve(T, StackMemory::checkpoint, segment);
  a.forward(X, la, oa);
  b.forward(X, lb, ob);
  CHECK(oa == ob);
  Eigen::VectorXd ga = Eigen::VectorXd::Zero(a.parameter_count()), gb = ga;
  a.backward(G, la, da, ga);
  RM db = G;
  b.backward(db, lb, db, gb);  // in place
  CHECK(da == db);
  CHECK(ga == gb);
  for (int l = 0; l < L; ++l) CHECK(la[l].dA == lb[l].dA);
  // Memory: ceil(L / L_r) checkpoints of (T n C) instead of L full contexts.
  const int lr = b.segment();
  CHECK(lr == (segment > 0 ? segment : Stack::default_segment(L, n)));
  const int segments = (L + lr - 1) / lr;
  CHECK(b.saved_bytes() == Index(segments) * T * n * C * Index(sizeof(double)));
  CHECK(b.saved_bytes() < a.saved_bytes());
  CHECK(b.peak_bytes() < a.peak_bytes());
}

}  // namespace

TEST_CASE("4-block stack gradients match central differences", "[stack][gradient]") {
  for (StackMemory m : {StackMemory::cache_all, StackMemory::checkpoint}) {
    check_stack_gradient<mhc::MhcVariant, 4>(4, m, 2);
    check_stack_gradient<mhc::MhcVariant, mhc::Dynamic>(3, m, 3);
    check_stack_gradient<mhc::HcVariant, 2>(2, m, 2);
    check_stack_gradient<mhc::MhcLiteVariant, 3>(3, m, 0);
    check_stack_gradient<mhc::ResidualVariant, 1>(1, m, 3);
    check_stack_gradient<mhc::MhcVariant, 4>(4, m, 2, false);
    check_stack_gradient<mhc::HcVariant, 2>(2, m, 3, false);
  }
}

TEST_CASE("checkpointed stack equals the cache-everything stack, with less memory", "[stack]") {
  check_checkpoint_identical<mhc::MhcVariant, 4>(4, 7, 3);
  check_checkpoint_identical<mhc::MhcVariant, 4>(4, 12, 0);
  check_checkpoint_identical<mhc::HcVariant, 2>(2, 5, 2);
  check_checkpoint_identical<mhc::MhcLiteVariant, 3>(3, 6, 4);
  check_checkpoint_identical<mhc::ResidualVariant, 1>(1, 6, 2);
}

TEST_CASE("the default segment is round(sqrt(n L / (n + 2)))", "[stack]") {
  using S = mhc::Stack<float>;
  CHECK(S::default_segment(32, 4) == 5);   // sqrt(21.3) = 4.62
  CHECK(S::default_segment(60, 4) == 6);   // sqrt(40) = 6.32
  CHECK(S::default_segment(1, 4) == 1);
  CHECK(S::default_segment(2, 16) == 1);
  S stack(32, 8);
  stack.reserve(4, StackMemory::checkpoint);
  CHECK(stack.segment() == 5);
  CHECK(stack.saved_bytes() == 7 * 4 * 4 * 8 * Index(sizeof(float)));
}

TEST_CASE("the gain probe: 1 for a fresh mHC stack, growing for a drifted HC stack", "[stack]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const int L = 16;
  const Index T = 4, C = 5;
  std::vector<Layer> layers;
  for (int l = 0; l < L; ++l) layers.emplace_back(C, rng);
  RM X(T * 4, C), out(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  mhc::CompositeGain gain(T, 4);
  mhc::BlockInit init;
  init.projection_std = 0.3;
  mhc::Stack<double> m(L, C, 4, init);
  m.reserve(T, StackMemory::checkpoint);
  std::vector<mhc::DoublyStochasticError> ds(L);
  m.forward(X, layers, out, &gain, ds.data());
  CHECK(gain.layers() == L);
  for (int l = 0; l < L; ++l) {
    CHECK(ds[l].row < 1e-12);
    CHECK(ds[l].col < 1e-3);
  }
  CHECK(gain.gains().forward == Approx(1.0).epsilon(1e-9));  // rows sum to 1 exactly after SK
  CHECK(gain.gains().backward == Approx(1.0).epsilon(1e-3));
  // HC with b_res = 1.1 I: each layer scales by about 1.1, the composite by about 1.1^L.
  mhc::Stack<double, 4, mhc::HcVariant> h(L, C, 4, init);
  for (int l = 0; l < L; ++l) h.block(l).params().b_res() *= 1.1;
  h.reserve(T, StackMemory::cache_all);
  gain.reset();
  h.forward(X, layers, out, &gain, ds.data());
  CHECK(ds[0].row > 0.05);  // rows of 1.1 I plus a dynamic part of at most 4 * 0.01
  CHECK(gain.gains().forward > std::pow(1.1, L) * 0.8);
  CHECK(gain.gains().forward < std::pow(1.1, L) * 1.25);
}

TEST_CASE("static-only stacks: checkpointing and the gain probe with one coefficient row", "[stack]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const int L = 6;
  const Index T = 3, C = 4;
  mhc::BlockOptions options;
  options.dynamic = false;
  mhc::Stack<double, 4, mhc::HcVariant> a(L, C, 4, {}, options), b(L, C, 4, {}, options);
  randomize(a, rng);
  b.parameters() = a.parameters();
  std::vector<Layer> la;
  for (int l = 0; l < L; ++l) la.emplace_back(C, rng);
  std::vector<Layer> lb = la;
  RM X(T * 4, C), G(T * 4, C), oa(T * 4, C), ob(T * 4, C), da(T * 4, C), db(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  mhc_test::fill_uniform(G, rng);
  a.reserve(T, StackMemory::cache_all);
  b.reserve(T, StackMemory::checkpoint, 4);
  mhc::CompositeGain gain(T, 4);
  a.forward(X, la, oa, &gain);
  b.forward(X, lb, ob);
  CHECK(oa == ob);
  // Every token sees the same composite, the product of the blocks' bias matrices H = b_res.
  Eigen::Matrix4d P = Eigen::Matrix4d::Identity();
  for (int l = 0; l < L; ++l)
    P = Eigen::Map<const Eigen::Matrix<double, 4, 4, Eigen::RowMajor>>(a.block(l).params().b_res().data()) * P;
  CHECK(gain.gains().forward == Approx(P.cwiseAbs().rowwise().sum().maxCoeff()).epsilon(1e-12));
  Eigen::VectorXd ga = Eigen::VectorXd::Zero(a.parameter_count()), gb = ga;
  a.backward(G, la, da, ga);
  b.backward(G, lb, db, gb);
  CHECK(da == db);
  CHECK(ga == gb);
}

TEST_CASE("the stack rejects bad input", "[stack][errors]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 2, C = 3;
  using S = mhc::Stack<double>;
  CHECK_THROWS_AS(S(0, C), mhc::invalid_argument);
  CHECK_THROWS_AS(S(3, C, 5), mhc::invalid_argument);
  S stack(3, C);
  std::vector<Layer> layers;
  for (int l = 0; l < 3; ++l) layers.emplace_back(C, rng);
  RM X(T * 4, C), out(T * 4, C), wrong(T * 4 + 1, C);
  X.setOnes();
  out.setConstant(-7);
  CHECK_THROWS_AS(stack.forward(X, layers, out), mhc::invalid_argument);  // not reserved
  CHECK_THROWS_AS(stack.reserve(T, StackMemory::checkpoint, 4), mhc::invalid_argument);
  stack.reserve(T, StackMemory::checkpoint, 2);
  Eigen::VectorXd g = Eigen::VectorXd::Zero(stack.parameter_count());
  CHECK_THROWS_AS(stack.backward(X, layers, out, g), mhc::invalid_argument);  // no forward
  std::vector<Layer> two(layers.begin(), layers.begin() + 2);
  CHECK_THROWS_AS(stack.forward(X, two, out), mhc::invalid_argument);
  CHECK_THROWS_AS(stack.forward(wrong, layers, out), mhc::invalid_argument);
  mhc::CompositeGain bad_gain(T + 1, 4);
  CHECK_THROWS_AS(stack.forward(X, layers, out, &bad_gain), mhc::invalid_argument);
  CHECK((out.array() == -7).all());
  stack.forward(X, layers, out);
  Eigen::VectorXd short_g = Eigen::VectorXd::Zero(stack.parameter_count() - 1);
  CHECK_THROWS_AS(stack.backward(X, layers, out, short_g), mhc::invalid_argument);
  CHECK_THROWS_AS(stack.backward(X, layers, wrong, g), mhc::invalid_argument);
  CHECK((g.array() == 0).all());
}

TEST_CASE("non-finite parameters or grads over the parameters: the stack writes nothing",
          "[stack][errors]") {
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed);
  mhc_test::Rng rng(seed);
  const Index T = 2, C = 3;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  RM X(T * 4, C), out(T * 4, C), dX(T * 4, C);
  mhc_test::fill_uniform(X, rng);
  // block 2 of 3 bad (a diverged optimiser step): forward and backward write nothing
  mhc::Stack<double> stack(3, C);
  std::vector<Layer> layers;
  for (int l = 0; l < 3; ++l) layers.emplace_back(C, rng);
  stack.reserve(T, mhc::StackMemory::cache_all);
  mhc::CompositeGain gain(T, 4);
  stack.forward(X, layers, out, &gain);
  stack.block(2).params().alpha()[0] = nan;
  out.setConstant(-7);
  const Index gain_layers = gain.layers();
  const auto gain_product = gain.product();
  CHECK_THROWS_AS(stack.forward(X, layers, out, &gain), mhc::invalid_argument);
  CHECK((out.array() == -7).all());
  CHECK(gain.layers() == gain_layers);
  CHECK(gain.product() == gain_product);
  Eigen::VectorXd sg = Eigen::VectorXd::Zero(stack.parameter_count());
  dX.setConstant(-7);
  CHECK_THROWS_AS(stack.backward(X, layers, dX, sg), mhc::invalid_argument);
  CHECK((dX.array() == -7).all());
  CHECK((sg.array() == 0).all());
  // grads over the parameters: rejected before d_X is written
  stack.block(2).params().alpha()[0] = 0.01;
  stack.forward(X, layers, out);
  CHECK_THROWS_AS(stack.backward(X, layers, dX, stack.parameters()), mhc::invalid_argument);
  CHECK((dX.array() == -7).all());

  // A layer that throws mid-stack: the stack then holds no forward, so backward refuses at once
  // instead of running the later blocks' contexts from the forward before.
  struct Flaky : Layer {
    using Layer::Layer;
    bool fail = false;
    void forward(const mhc::ConstBatchRef<double>& u, mhc::BatchRef<double> y) {
      if (fail) throw std::runtime_error("layer failed");
      Layer::forward(u, y);
    }
  };
  std::vector<Flaky> flaky;
  for (int l = 0; l < 3; ++l) flaky.emplace_back(C, rng);
  mhc::Stack<double> second(3, C);
  second.reserve(T, mhc::StackMemory::cache_all);
  second.forward(X, flaky, out);
  flaky[1].fail = true;
  CHECK_THROWS_AS(second.forward(X, flaky, out), std::runtime_error);
  Eigen::VectorXd sg2 = Eigen::VectorXd::Zero(second.parameter_count());
  CHECK_THROWS_AS(second.backward(X, flaky, dX, sg2), mhc::invalid_argument);
  CHECK((dX.array() == -7).all());
  CHECK((sg2.array() == 0).all());
  CHECK(flaky[2].backward_calls == 0);
}
