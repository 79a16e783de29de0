// stack.hpp: L hyper-connection blocks in sequence, X_L = B_L( ... B_1(X_0)), each around its own
// user layer, with the memory policy of the paper's section 4.3.2.
//
//   StackMemory::cache_all   every block keeps its input and per-token coefficients
//                            (MemoryMode::cache): saved per token  L (nC + C + 1 + K + 2n + n^2)
//   StackMemory::checkpoint  only the inputs of every L_r-th block are kept (the checkpoints);
//                            backward re-runs each segment of L_r blocks forward from its
//                            checkpoint, in cache mode, then back-propagates through it:
//                            saved per token  ceil(L / L_r) nC,  plus during backward one
//                            segment's L_r (nC + C + 1 + K + 2n + n^2)
// The paper's choice L_r = sqrt(n L / (n + 2)) minimises ceil(L/L_r) nC + L_r (n + 2) C;
// default_segment() rounds it. Both modes give bitwise identical results (the same operations
// run; the checkpointed backward repeats each block's forward once, and so each layer's forward:
// layers must be deterministic, see block.hpp).
//
// Parameters of all blocks live in one flat vector (block l at offset l * P, P =
// Block::parameter_count(n, C)), gradients in a vector of the same layout. Block l is initialised
// with pre_stream = l mod n and seed = init.seed + l (the HC paper's per-layer choice of stream).
// Memory: reserve(T, mode) allocates everything once; forward/backward then allocate nothing
// (for the mHC variant). saved_bytes() is what is kept between forward and backward,
// peak_bytes() everything the stack holds, both for the reserved T.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "mhc/block.hpp"
#include "mhc/diagnostics.hpp"

namespace mhc {

/// The stack's memory policy (see the header comment).
enum class StackMemory { cache_all, checkpoint };

template <typename Scalar, int N = 4, typename Variant = MhcVariant>
class Stack {
 public:
  using BlockType = Block<Scalar, N, Variant>;
  using Real = compute_t<Scalar>;
  using Vector = Eigen::Matrix<Real, Eigen::Dynamic, 1>;
  using Context = BlockContext<Scalar, N, Variant>;
  using Workspace = BlockWorkspace<Scalar, N, Variant>;

  /// The paper's segment length round(sqrt(n L / (n + 2))), at least 1 and at most L.
  static int default_segment(int layers, int n) {
    const double lr = std::sqrt(double(n) * layers / (n + 2.0));
    return std::max(1, std::min(layers, static_cast<int>(std::lround(lr))));
  }

  Stack(int layers, Index C, int n = N, const BlockInit& init = {}, const BlockOptions& options = {}) {
    if (layers < 1) detail::throw_invalid("Stack", "layers = ", layers, " must be positive");
    const Index P = BlockType::parameter_count(n, C, options.dynamic);  // the blocks validate
    params_.setZero(Index(layers) * P);
    blocks_.reserve(static_cast<size_t>(layers));
    for (int l = 0; l < layers; ++l) {
      blocks_.emplace_back(C, params_.data() + Index(l) * P, n, options);
      BlockInit li = init;
      li.pre_stream = l % n;
      li.seed = init.seed + static_cast<unsigned long long>(l);
      blocks_.back().reset_parameters(li);
    }
  }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;

  int layers() const { return static_cast<int>(blocks_.size()); }
  int streams() const { return blocks_.front().streams(); }
  Index width() const { return blocks_.front().width(); }
  const BlockType& block(int l) const { return blocks_.at(static_cast<size_t>(l)); }
  Index block_parameter_count() const { return blocks_.front().parameter_count(); }
  Index parameter_count() const { return params_.size(); }
  /// All parameters, block l at offset l * block_parameter_count().
  Eigen::Map<Vector> parameters() { return {params_.data(), params_.size()}; }

  /// Allocates every buffer for T tokens under `memory`; segment = L_r for checkpoint mode
  /// (0: default_segment). Must be called before forward.
  void reserve(Index tokens, StackMemory memory, int segment = 0) {
    constexpr const char* where = "Stack::reserve";
    if (tokens < 0) detail::throw_invalid(where, "tokens = ", tokens, " < 0");
    const int L = layers(), n = streams();
    const Index C = width();
    if (segment == 0) segment = default_segment(L, n);
    if (segment < 1 || segment > L)
      detail::throw_invalid(where, "segment = ", segment, " is out of range [1, ", L, "]");
    T_ = tokens;
    memory_ = memory;
    segment_ = memory == StackMemory::checkpoint ? segment : 1;
    const int iters = blocks_.front().options().iterations;
    const bool dynamic = blocks_.front().options().dynamic;
    ws_ = std::make_unique<Workspace>(tokens, n, C, iters, dynamic);
    contexts_.clear();
    checkpoints_.clear();
    const int kept = memory == StackMemory::cache_all ? L : segment_;
    contexts_.resize(static_cast<size_t>(kept));
    for (auto& c : contexts_) c.resize(n, C, tokens, MemoryMode::cache, iters, ws_.get(), dynamic);
    if (memory == StackMemory::checkpoint) {
      const int count = (L + segment_ - 1) / segment_;
      checkpoints_.resize(static_cast<size_t>(count));
      for (auto& c : checkpoints_) c.resize(tokens * n, C);
      pass_.resize(n, C, tokens, MemoryMode::recompute, iters, ws_.get(), dynamic);
      replay_.resize(tokens * n, C);
    } else {
      pass_ = Context();
      replay_.resize(0, C);
    }
    has_forward_ = false;
  }

  Index tokens() const { return T_; }
  StackMemory memory() const { return memory_; }
  /// L_r (1 in cache_all mode).
  int segment() const { return segment_; }

  /// Bytes kept between forward and backward: every context (cache_all) or the checkpoints.
  Index saved_bytes() const {
    if (memory_ == StackMemory::cache_all) {
      Index b = 0;
      for (const auto& c : contexts_) b += c.saved_bytes();
      return b;
    }
    return Index(checkpoints_.size()) * T_ * streams() * width() * Index(sizeof(Scalar));
  }

  /// Everything the stack holds for the reserved T: contexts, checkpoints, the replay buffer and
  /// the shared workspace (the high-water mark of forward + backward; parameters excluded).
  Index peak_bytes() const {
    Index b = ws_ ? ws_->bytes() : 0;
    for (const auto& c : contexts_) b += c.saved_bytes();
    b += Index(checkpoints_.size()) * T_ * streams() * width() * Index(sizeof(Scalar));
    if (memory_ == StackMemory::checkpoint) b += pass_.saved_bytes();
    b += replay_.size() * Index(sizeof(Scalar));
    return b;
  }

  /// X (T*n, C) -> X_out (T*n, C) through all blocks; layers[l] is block l's layer (at least L
  /// of them). X_out may be X itself. Optional diagnostics: `gain` (resized for T tokens and n)
  /// gets each block's H_res multiplied into it; `ds_error` (L entries) gets each block's doubly
  /// stochastic error (both untouched by the residual variant, whose H_res is the identity).
  /// Bad arguments, and any block's bad parameters, throw before X_out or the diagnostics are
  /// written (a layer that throws leaves them partly updated).
  template <typename Layers>
  void forward(const ConstBatchRef<Scalar>& X, Layers& layers, BatchRef<Scalar> X_out,
               CompositeGain* gain = nullptr, DoublyStochasticError* ds_error = nullptr) {
    constexpr const char* where = "Stack::forward";
    check_ready(where, layers);
    const Index rows = T_ * streams(), C = width();
    detail::check_batch(where, "X", X, rows, C);
    detail::check_batch(where, "X_out", X_out, rows, C);
    detail::check_same_or_disjoint(where, "X_out", X_out, "X", X);
    if (gain && (gain->streams() != streams() || gain->product().rows() != T_))
      detail::throw_invalid(where, "gain is for (T, n) = (", gain->product().rows(), ", ",
                            gain->streams(), "), expected (", T_, ", ", streams(), ")");
    for (const BlockType& block : blocks_) block.check_parameters(where);
    has_forward_ = false;  // until this forward completes (a layer may throw)
    if (X_out.data() != X.data()) X_out = X;
    const int L = layers_count();
    for (int l = 0; l < L; ++l) {
      Context* ctx;
      if (memory_ == StackMemory::cache_all) {
        ctx = &contexts_[static_cast<size_t>(l)];
      } else {
        if (l % segment_ == 0) checkpoints_[static_cast<size_t>(l / segment_)] = X_out;
        ctx = &pass_;
      }
      blocks_[static_cast<size_t>(l)].forward(X_out, layers[static_cast<size_t>(l)], X_out, *ctx);
      if constexpr (Variant::kHasCoefficients) {
        if (gain) gain->multiply<Real>(ctx->last_H_res());
        if (ds_error) ds_error[l] = doubly_stochastic_error<Real>(ctx->last_H_res(), streams());
      }
    }
    has_forward_ = true;
  }

  /// Backward of the last forward: d_X_out (T*n, C) -> d_X (T*n, C) (may be d_X_out itself);
  /// every block's parameter gradients are ADDED to grads (parameter_count() values, not
  /// overlapping the parameters). Bad arguments and parameters throw before d_X or grads are
  /// written.
  template <typename Layers>
  void backward(const ConstBatchRef<Scalar>& d_X_out, Layers& layers, BatchRef<Scalar> d_X,
                Eigen::Ref<Vector> grads) {
    constexpr const char* where = "Stack::backward";
    check_ready(where, layers);
    if (!has_forward_) detail::throw_invalid(where, "no forward to differentiate");
    const Index rows = T_ * streams(), C = width();
    detail::check_batch(where, "d_X_out", d_X_out, rows, C);
    detail::check_batch(where, "d_X", d_X, rows, C);
    detail::check_same_or_disjoint(where, "d_X", d_X, "d_X_out", d_X_out);
    if (grads.size() != parameter_count())
      detail::throw_invalid(where, "grads has ", grads.size(), " values, expected ", parameter_count());
    if (grads.size() > 0 && grads.data() == nullptr) detail::throw_invalid(where, "grads is null");
    detail::check_no_overlap(where, "grads", detail::vector_bytes(grads), "the parameters",
                             detail::vector_bytes(params_));
    for (const BlockType& block : blocks_) block.check_parameters(where);
    if (d_X.data() != d_X_out.data()) d_X = d_X_out;
    const int L = layers_count();
    const Index P = block_parameter_count();
    auto step_back = [&](int l, Context& ctx) {
      Eigen::Ref<Vector> g = grads.segment(Index(l) * P, P);
      blocks_[static_cast<size_t>(l)].backward(ctx, d_X, layers[static_cast<size_t>(l)], d_X, g);
    };
    if (memory_ == StackMemory::cache_all) {
      for (int l = L - 1; l >= 0; --l) step_back(l, contexts_[static_cast<size_t>(l)]);
      return;
    }
    const int segments = static_cast<int>(checkpoints_.size());
    for (int s = segments - 1; s >= 0; --s) {
      const int first = s * segment_, last = std::min(L, first + segment_);
      replay_ = checkpoints_[static_cast<size_t>(s)];
      for (int l = first; l < last; ++l)
        blocks_[static_cast<size_t>(l)].forward(replay_, layers[static_cast<size_t>(l)], replay_,
                                                contexts_[static_cast<size_t>(l - first)]);
      for (int l = last - 1; l >= first; --l) step_back(l, contexts_[static_cast<size_t>(l - first)]);
    }
  }

 private:
  int layers_count() const { return static_cast<int>(blocks_.size()); }

  template <typename Layers>
  void check_ready(const char* where, const Layers& layers) const {
    if (!ws_) detail::throw_invalid(where, "call reserve(tokens, memory) first");
    if (static_cast<Index>(layers.size()) < layers_count())
      detail::throw_invalid(where, "got ", layers.size(), " layers for ", layers_count(), " blocks");
  }

  Vector params_;
  std::vector<BlockType> blocks_;
  std::unique_ptr<Workspace> ws_;
  std::vector<Context> contexts_;
  std::vector<RowMatrix<Scalar>> checkpoints_;
  Context pass_;                 // checkpoint mode: forward pass context (keeps only its input)
  RowMatrix<Scalar> replay_;     // checkpoint mode: the segment being recomputed
  Index T_ = 0;
  StackMemory memory_ = StackMemory::cache_all;
  int segment_ = 1;
  bool has_forward_ = false;
};

}  // namespace mhc
