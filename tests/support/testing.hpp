// Shared test utilities: fresh random seeds (reproducible through MHC_TEST_SEED), random fills,
// and the one gradient checker every operator uses: central finite differences in double.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <string>

#include "support/catch.hpp"

namespace mhc_test {

/// A fresh seed per call unless MHC_TEST_SEED is set (then that seed, for reproducing a failure).
/// Tests print it with CAPTURE/INFO so a failure names the seed that made it.
inline std::uint64_t fresh_seed() {
  if (const char* env = std::getenv("MHC_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  static std::random_device device;
  return (static_cast<std::uint64_t>(device()) << 32) ^ device();
}

using Rng = std::mt19937_64;

inline double uniform(Rng& rng, double lo = -1.0, double hi = 1.0) {
  return std::uniform_real_distribution<double>(lo, hi)(rng);
}

/// Fills any Eigen object with uniform values in [lo, hi) (cast to its scalar type).
template <typename Derived>
void fill_uniform(Eigen::DenseBase<Derived>& m, Rng& rng, double lo = -1.0, double hi = 1.0) {
  using S = typename Derived::Scalar;
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c) m(r, c) = static_cast<S>(uniform(rng, lo, hi));
}

/// Result of a gradient check: the worst normalised error and where it occurred.
struct GradCheck {
  double max_error = 0.0;  ///< max |analytic - numeric| / (scale + |numeric|)
  Eigen::Index worst = -1;
  double analytic = 0.0, numeric = 0.0;
};

/// Checks a vector-Jacobian product against central finite differences in double.
///   loss(x)   : scalar L(x) = <g, f(x)> for a fixed random cotangent g (the caller builds it in)
///   grad      : the analytic dL/dx at x, from the operator's backward
/// Every coordinate is perturbed when x has at most `max_coords` entries; beyond that, a random
/// subset of `max_coords` coordinates plus `directions` random directional derivatives are checked.
inline GradCheck check_gradient(const std::function<double(const Eigen::VectorXd&)>& loss,
                                const Eigen::VectorXd& x, const Eigen::VectorXd& grad, Rng& rng,
                                double step = 1e-6, Eigen::Index max_coords = 400,
                                int directions = 4) {
  REQUIRE(grad.size() == x.size());
  GradCheck result;
  // A non-finite analytic gradient fails outright (an infinite max_error): it would make `scale`
  // infinite (every other error 0), and a NaN error compares false against any threshold.
  for (Eigen::Index k = 0; k < grad.size(); ++k) {
    if (!std::isfinite(grad[k])) {
      result.max_error = std::numeric_limits<double>::infinity();
      result.worst = k;
      result.analytic = grad[k];
      return result;
    }
  }
  const double scale = std::max(1e-3, grad.size() > 0 ? grad.cwiseAbs().maxCoeff() : 0.0);
  auto record = [&](double analytic, double numeric, Eigen::Index where) {
    double err = std::abs(analytic - numeric) / (scale + std::abs(numeric));
    if (!std::isfinite(err)) err = std::numeric_limits<double>::infinity();  // e.g. a NaN loss
    if (err > result.max_error || result.worst < 0) {
      if (err >= result.max_error) {
        result.max_error = err;
        result.worst = where;
        result.analytic = analytic;
        result.numeric = numeric;
      }
    }
  };
  Eigen::VectorXd probe = x;
  auto coordinate = [&](Eigen::Index k) {
    const double h = step * std::max(1.0, std::abs(x[k]));
    probe[k] = x[k] + h;
    const double up = loss(probe);
    probe[k] = x[k] - h;
    const double down = loss(probe);
    probe[k] = x[k];
    record(grad[k], (up - down) / (2 * h), k);
  };
  if (x.size() <= max_coords) {
    for (Eigen::Index k = 0; k < x.size(); ++k) coordinate(k);
  } else {
    std::uniform_int_distribution<Eigen::Index> pick(0, x.size() - 1);
    for (Eigen::Index k = 0; k < max_coords; ++k) coordinate(pick(rng));
    for (int d = 0; d < directions; ++d) {
      Eigen::VectorXd v(x.size());
      for (Eigen::Index k = 0; k < v.size(); ++k) v[k] = uniform(rng);
      v /= v.norm();
      const double up = loss(x + step * v);
      const double down = loss(x - step * v);
      record(grad.dot(v), (up - down) / (2 * step), -1 - d);
    }
  }
  return result;
}

/// Tolerance for comparing a Scalar computation against double.
template <typename S>
constexpr double tolerance() {
  return std::is_same<S, double>::value ? 1e-12 : std::is_same<S, float>::value ? 2e-5 : 2e-2;
}

}  // namespace mhc_test
