// Helpers for the block and stack tests: a small nonlinear user layer with its own weights
// (y = tanh(u A + b)), modelling the block's layer concept, and its parameter packing.
#pragma once

#include <Eigen/Core>

#include "mhc/types.hpp"
#include "support/testing.hpp"

namespace mhc_test {

/// y = tanh(u A + b): A (C, C), b (C). Keeps u and y from its last forward; backward accumulates
/// d_A, d_b and writes d_u.
template <typename S>
struct TanhLayer {
  using Mat = mhc::RowMatrix<double>;
  Mat A, dA;
  Eigen::RowVectorXd b, db;
  mhc::RowMatrix<double> u_saved, y_saved;
  int forward_calls = 0, backward_calls = 0;

  TanhLayer() = default;
  TanhLayer(mhc::Index C, Rng& rng, double scale = 0.6) : A(C, C), dA(C, C), b(C), db(C) {
    fill_uniform(A, rng, -scale, scale);
    fill_uniform(b, rng, -0.3, 0.3);
    dA.setZero();
    db.setZero();
  }
  mhc::Index parameter_count() const { return A.size() + b.size(); }

  void forward(const mhc::ConstBatchRef<S>& u, mhc::BatchRef<S> y) {
    ++forward_calls;
    u_saved = u.template cast<double>();
    y_saved = ((u_saved * A).rowwise() + b).array().tanh().matrix();
    y = y_saved.cast<S>();
  }
  void backward(const mhc::ConstBatchRef<S>& d_y, mhc::BatchRef<S> d_u) {
    ++backward_calls;
    const Mat d_pre = (d_y.template cast<double>().array() * (1.0 - y_saved.array().square())).matrix();
    dA += u_saved.transpose() * d_pre;
    db += d_pre.colwise().sum();
    d_u = (d_pre * A.transpose()).cast<S>();
  }

  /// Packs / unpacks (A, b) into a flat vector.
  void get(double* out) const {
    Eigen::Map<Mat>(out, A.rows(), A.cols()) = A;
    Eigen::Map<Eigen::RowVectorXd>(out + A.size(), b.size()) = b;
  }
  void set(const double* in) {
    A = Eigen::Map<const Mat>(in, A.rows(), A.cols());
    b = Eigen::Map<const Eigen::RowVectorXd>(in + A.size(), b.size());
  }
  void get_grad(double* out) const {
    Eigen::Map<Mat>(out, dA.rows(), dA.cols()) = dA;
    Eigen::Map<Eigen::RowVectorXd>(out + dA.size(), db.size()) = db;
  }
};

}  // namespace mhc_test
