// types.hpp: the views every host operator takes. Inputs and outputs are caller-owned; mhc never
// allocates on a hot path. A batch of per-token objects is a row-major matrix with one row per
// token (or per token-and-stream), and the rows may be padded (outer stride >= columns).
#pragma once

#include <Eigen/Core>

#include "mhc/config.hpp"

namespace mhc {

/// Row-major dynamic matrix: the storage layout of every batch in mhc.
template <typename Scalar>
using RowMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Read-only view of a row-major batch, rows possibly padded. Bind it to a RowMatrix, a block of
/// one, or an Eigen::Map<const RowMatrix<S>, 0, Eigen::OuterStride<>> over raw memory.
/// Note: binding a column-major object makes Eigen copy it into a temporary; pass row-major data.
template <typename Scalar>
using ConstBatchRef = Eigen::Ref<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Writable view of a row-major batch, rows possibly padded.
template <typename Scalar>
using BatchRef = Eigen::Ref<RowMatrix<Scalar>, 0, Eigen::OuterStride<>>;

/// Wraps raw row-major memory (rows x cols, row stride `stride` elements, stride >= cols).
template <typename Scalar>
inline Eigen::Map<RowMatrix<Scalar>, 0, Eigen::OuterStride<>> map_batch(Scalar* data, Index rows,
                                                                       Index cols,
                                                                       Index stride = -1) {
  return {data, rows, cols, Eigen::OuterStride<>(stride < 0 ? cols : stride)};
}

template <typename Scalar>
inline Eigen::Map<const RowMatrix<Scalar>, 0, Eigen::OuterStride<>> map_batch(const Scalar* data,
                                                                             Index rows,
                                                                             Index cols,
                                                                             Index stride = -1) {
  return {data, rows, cols, Eigen::OuterStride<>(stride < 0 ? cols : stride)};
}

/// bfloat16 storage on the CPU.
using bf16 = Eigen::bfloat16;

/// The type every reduction, coefficient and Sinkhorn step runs in for a storage type:
/// double for double, float for float and bfloat16 (spec section 1: at least fp32).
template <typename Scalar>
struct compute_type {
  using type = float;
};
template <>
struct compute_type<double> {
  using type = double;
};
template <typename Scalar>
using compute_t = typename compute_type<Scalar>::type;

}  // namespace mhc
