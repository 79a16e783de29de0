// The block's forward and backward allocate nothing once its context exists
// (EIGEN_RUNTIME_NO_MALLOC turns any Eigen heap allocation into an assertion failure).
#include "support/eigen_assert_counter.hpp"  // first: counts Eigen's malloc check

#include <Eigen/Core>

#include "mhc/block.hpp"
#include "support/catch.hpp"
#include "support/testing.hpp"

namespace {

/// y = tanh(u) * scale, element-wise; allocation-free.
template <typename S>
struct TanhScale {
  mhc::RowMatrix<S> y_saved;
  S scale = S(0.7);
  void forward(const mhc::ConstBatchRef<S>& u, mhc::BatchRef<S> y) {
    y_saved = (u.array().tanh() * scale).matrix();
    y = y_saved;
  }
  void backward(const mhc::ConstBatchRef<S>& d_y, mhc::BatchRef<S> d_u) {
    d_u = (d_y.array() * (S(1) - (y_saved.array() / scale).square()) * scale).matrix();
  }
};

template <typename Block>
void run_without_malloc(int n, bool dynamic = true) {
  using S = typename Block::Real;
  const auto seed = mhc_test::fresh_seed();
  CAPTURE(seed, n, dynamic);
  mhc_test::Rng rng(seed);
  const mhc::Index T = 6, C = 8;
  mhc::BlockInit init;
  init.projection_std = 0.2;
  mhc::BlockOptions options;
  options.dynamic = dynamic;
  Block block(C, n, init, options);
  TanhScale<S> layer;
  layer.y_saved.resize(T, C);
  mhc::RowMatrix<S> X(T * n, C), G(T * n, C), out(T * n, C), dX(T * n, C);
  mhc_test::fill_uniform(X, rng);
  mhc_test::fill_uniform(G, rng);
  Eigen::Matrix<S, Eigen::Dynamic, 1> grads = Eigen::Matrix<S, Eigen::Dynamic, 1>::Zero(block.parameter_count());
  for (mhc::MemoryMode mode : {mhc::MemoryMode::cache, mhc::MemoryMode::recompute}) {
    typename Block::Context ctx(block, T, mode);
    const int asserts_before = mhc_test::g_eigen_assert_failures;
    Eigen::internal::set_is_malloc_allowed(false);
    block.forward(X, layer, out, ctx);
    block.backward(ctx, G, layer, dX, grads);
    block.forward(out, layer, out, ctx);  // in place
    block.backward(ctx, dX, layer, dX, grads);
    Eigen::internal::set_is_malloc_allowed(true);
    CHECK(mhc_test::g_eigen_assert_failures == asserts_before);
    Eigen::internal::set_is_malloc_allowed(false);  // positive control: one allocation counted
    Eigen::VectorXf heap(1000);
    Eigen::internal::set_is_malloc_allowed(true);
    heap.setZero();
    CHECK(mhc_test::g_eigen_assert_failures == asserts_before + 1);
    mhc_test::g_eigen_assert_failures = asserts_before;
    CHECK(out.allFinite());
    CHECK(dX.allFinite());
  }
}

}  // namespace

TEST_CASE("block forward and backward do not allocate", "[block][nomalloc]") {
  run_without_malloc<mhc::MhcBlock<float>>(4);
  run_without_malloc<mhc::MhcBlock<double, mhc::Dynamic>>(3);
  run_without_malloc<mhc::HcBlock<double>>(4);
  run_without_malloc<mhc::MhcLiteBlock<float, 3>>(3);
  run_without_malloc<mhc::ResidualBlock<double>>(1);
  run_without_malloc<mhc::MhcBlock<float>>(4, false);
  run_without_malloc<mhc::HcBlock<double, 2>>(2, false);
}
