// block.hpp: one hyper-connection block wrapped around any user layer F (paper Eq. 3):
//
//   coefficients  (h_pre, h_post, H_res) = variant mapping of z = (vec(X) W) / r     Eqs. 7-9
//   pre-mix       u  = h_pre^T X                                   (T, C)
//   layer         y  = F(u)                                        (T, C), the caller's layer
//   update        X' = H_res X + h_post y^T                        (T*n, C)
// and the exact backward through all of it (spec section 3), calling F's backward for d_u.
// Every variant with coefficients runs the library's operators: Coefficients<Scalar, N, Variant>
// (one projection, RMS norm and d_X / d_W backward for all; the variants differ only in the
// per-token mapping of variants.hpp), PreMix and Update. The forward computes the coefficients
// and u in one call (Coefficients::forward with u: X read from memory once for both).
// ResidualVariant (n = 1) is x' = x + F(x), computed as exactly that sum.
//
// The layer concept: any object `layer` with, for Scalar S,
//   layer.forward(const mhc::ConstBatchRef<S>& u, mhc::BatchRef<S> y);     y = F(u), both (T, C)
//   layer.backward(const mhc::ConstBatchRef<S>& d_y, mhc::BatchRef<S> d_u); d_u = J_F^T d_y
// backward refers to the most recent forward (the layer keeps what it needs, e.g. u) and
// accumulates the layer's own parameter gradients itself. forward must be deterministic: the
// recompute memory mode (and the checkpointed Stack) call it again on the same u before backward.
// is_block_layer_v<Layer, S> checks this at compile time; Block::forward static_asserts it.
//
// Parameters (Real = compute_t<Scalar>) live in ONE flat vector, in this order (BlockLayout):
//   W (n*C, K) row-major | alpha (3: pre, post, res) | b_pre (n) | b_post (n) | b_res (R)
// with K, R from the variant (variants.hpp). Gradients use the same layout, so one optimizer
// step covers a whole block (or a whole Stack). The block owns its parameters, or views caller
// memory (Block(C, data, n)). Defaults: BlockInit in variants.hpp.
//
// Static-only coefficients (BlockOptions::dynamic = false, spec section 4): no W, z = 0, so the
// coefficients are the gated biases, computed once per call as ONE row that the mixing operators
// broadcast to every token; their backward sums the per-token gradients and X gets no gradient
// through the coefficients. Cheaper: no projection, one Sinkhorn per call instead of per token.
//
// Memory modes (MemoryMode), identical gradients (bitwise: the same operations run):
//   cache:     the context keeps X (nC), y (C) and the per-token coefficients r, z, h_pre, h_post,
//              H_res (1 + K + 2n + n^2) for the backward.
//   recompute: the context keeps only X; backward recomputes the coefficients, u, and y = F(u)
//              (the paper's recomputation, section 4.3.2), re-running the layer's forward.
// Transient buffers (u, d_y, d_u, coefficient gradients, operator workspace) live in a
// BlockWorkspace that contexts may share (a Stack shares one across all its blocks).
// Nothing allocates in forward/backward once the context exists (every variant).
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <memory>
#include <random>
#include <type_traits>
#include <utility>

#include "mhc/coefficients.hpp"
#include "mhc/config.hpp"
#include "mhc/detail/check.hpp"
#include "mhc/mixing.hpp"
#include "mhc/types.hpp"
#include "mhc/variants.hpp"

namespace mhc {

/// What a block context keeps between forward and backward.
enum class MemoryMode { cache, recompute };

// ---- the layer concept -------------------------------------------------------------------------

template <typename Layer, typename Scalar, typename = void>
struct is_block_layer : std::false_type {};
template <typename Layer, typename Scalar>
struct is_block_layer<
    Layer, Scalar,
    std::void_t<decltype(std::declval<Layer&>().forward(std::declval<const ConstBatchRef<Scalar>&>(),
                                                        std::declval<BatchRef<Scalar>>())),
                decltype(std::declval<Layer&>().backward(std::declval<const ConstBatchRef<Scalar>&>(),
                                                         std::declval<BatchRef<Scalar>>()))>>
    : std::true_type {};
/// True when Layer models the block's layer concept for storage type Scalar.
template <typename Layer, typename Scalar>
inline constexpr bool is_block_layer_v = is_block_layer<Layer, Scalar>::value;

// ---- parameter layout --------------------------------------------------------------------------

/// Offsets of the parameter groups in the flat parameter (and gradient) vector.
struct BlockLayout {
  int n = 0;
  Index C = 0;
  Index K = 0;  ///< projection width (W's columns)
  Index R = 0;  ///< residual logits (b_res's size)
  Index W_rows = 0;  ///< nC, or 0 for static-only coefficients
  Index W = 0, alpha = 0, b_pre = 0, b_post = 0, b_res = 0, size = 0;

  template <typename Variant>
  static BlockLayout of(int n, Index C, bool dynamic = true) {
    BlockLayout l;
    l.n = n;
    l.C = C;
    if (!Variant::kHasCoefficients) return l;
    l.K = Variant::coefficient_count(n);
    l.R = Variant::res_count(n);
    l.W_rows = dynamic ? Index(n) * C : 0;
    l.W = 0;
    l.alpha = l.W_rows * l.K;
    l.b_pre = l.alpha + 3;
    l.b_post = l.b_pre + n;
    l.b_res = l.b_post + n;
    l.size = l.b_res + l.R;
    return l;
  }
};

/// Named views of a flat parameter (or gradient) vector laid out by BlockLayout.
template <typename Real>
struct BlockParamView {
  Real* data = nullptr;
  BlockLayout layout;
  Eigen::Map<RowMatrix<Real>> W() const { return {data + layout.W, layout.W_rows, layout.K}; }
  Real& alpha_pre() const { return data[layout.alpha]; }
  Real& alpha_post() const { return data[layout.alpha + 1]; }
  Real& alpha_res() const { return data[layout.alpha + 2]; }
  Eigen::Map<Eigen::Matrix<Real, 3, 1>> alpha() const { return Eigen::Map<Eigen::Matrix<Real, 3, 1>>(data + layout.alpha); }
  Eigen::Map<Eigen::Matrix<Real, Eigen::Dynamic, 1>> b_pre() const { return {data + layout.b_pre, layout.n}; }
  Eigen::Map<Eigen::Matrix<Real, Eigen::Dynamic, 1>> b_post() const { return {data + layout.b_post, layout.n}; }
  Eigen::Map<Eigen::Matrix<Real, Eigen::Dynamic, 1>> b_res() const { return {data + layout.b_res, layout.R}; }
};

/// Numerical options of a block.
struct BlockOptions {
  int iterations = 20;  ///< Sinkhorn t_max (mHC), in [1, kMaxSinkhornIterations]
  double eps = 1e-6;    ///< eps_rms inside r
  /// false: static-only coefficients (no W, z = 0): h_pre, h_post, H_res are the gated biases,
  /// computed once per call and shared by all tokens (one coefficient row; spec section 4).
  bool dynamic = true;
};

template <typename Scalar, int N, typename Variant>
class Block;

/// Transient per-call buffers of a block's forward and backward, sized for T tokens once.
/// One workspace may serve any number of blocks of the same shape, one call at a time.
template <typename Scalar, int N = 4, typename Variant = MhcVariant>
class BlockWorkspace {
 public:
  using Real = compute_t<Scalar>;
  BlockWorkspace() = default;
  BlockWorkspace(Index tokens, int n, Index C, int iterations = 20, bool dynamic = true) {
    resize(tokens, n, C, iterations, dynamic);
  }

  /// Allocates the buffers for T tokens of n streams and width C (dynamic or static-only
  /// coefficients: the latter keep one coefficient row). The sizes do not depend on
  /// `iterations` (the Coefficients operator keeps its per-token scratch on the stack).
  void resize(Index tokens, int n, Index C, int iterations = 20, bool dynamic = true) {
    detail::check_block_shape("BlockWorkspace", tokens, n, C);
    const BlockLayout l = BlockLayout::of<Variant>(n, C, dynamic);
    const Index rows = dynamic ? tokens : 1;
    T_ = tokens;
    n_ = n;
    C_ = C;
    dynamic_ = dynamic;
    u.resize(tokens, C);
    y.resize(tokens, C);
    d_y.resize(tokens, C);
    d_u.resize(tokens, C);
    if constexpr (Variant::kHasCoefficients) {
      r.resize(rows, 1);
      z.resize(rows, l.K);
      h_pre.resize(rows, n);
      h_post.resize(rows, n);
      H_res.resize(rows, Index(n) * n);
      d_h_pre.resize(tokens, n);
      d_h_post.resize(tokens, n);
      d_H_res.resize(tokens, Index(n) * n);
      grads.resize(l.size);
      ops.resize(Coefficients<Scalar, N, Variant>::workspace_size(tokens, n, C, !dynamic));
    }
    (void)iterations;
  }

  Index tokens() const { return T_; }
  int streams() const { return n_; }
  Index width() const { return C_; }
  bool dynamic() const { return dynamic_; }

  /// Bytes held by this workspace.
  Index bytes() const {
    const Index s = Index(sizeof(Scalar)), f = Index(sizeof(Real));
    return s * (u.size() + y.size() + d_y.size() + d_u.size()) +
           f * (r.size() + z.size() + h_pre.size() + h_post.size() + H_res.size() + d_h_pre.size() +
                d_h_post.size() + d_H_res.size() + grads.size() + ops.size());
  }

  RowMatrix<Scalar> u, y, d_y, d_u;                 // (T, C)
  RowMatrix<Real> r, z, h_pre, h_post, H_res;       // recomputed coefficients (recompute mode)
  RowMatrix<Real> d_h_pre, d_h_post, d_H_res;       // coefficient gradients
  Eigen::Matrix<Real, Eigen::Dynamic, 1> grads;     // one block's parameter gradients, overwritten
  Eigen::Matrix<Real, Eigen::Dynamic, 1> ops;       // Coefficients workspace

 private:
  Index T_ = 0, C_ = 0;
  int n_ = 0;
  bool dynamic_ = true;
};

/// What one block keeps between its forward and backward for T tokens (see MemoryMode).
template <typename Scalar, int N = 4, typename Variant = MhcVariant>
class BlockContext {
 public:
  using Real = compute_t<Scalar>;
  using Workspace = BlockWorkspace<Scalar, N, Variant>;

  BlockContext() = default;
  /// Allocates for T tokens of the block's shape. `shared` (optional) is a workspace of the same
  /// shape to use instead of an own one; it must outlive the context.
  BlockContext(const Block<Scalar, N, Variant>& block, Index tokens, MemoryMode mode,
               Workspace* shared = nullptr) {
    resize(block.streams(), block.width(), tokens, mode, block.options().iterations, shared,
           block.options().dynamic);
  }

  /// Allocates for T tokens of n streams, width C (and the block's iterations and dynamic flag).
  void resize(int n, Index C, Index tokens, MemoryMode mode, int iterations = 20,
              Workspace* shared = nullptr, bool dynamic = true) {
    detail::check_block_shape("BlockContext", tokens, n, C);
    if (shared && (shared->tokens() != tokens || shared->streams() != n ||
                   shared->width() != C || shared->dynamic() != dynamic))
      detail::throw_invalid("BlockContext", "the shared workspace is for (T, n, C, dynamic) = (",
                            shared->tokens(), ", ", shared->streams(), ", ", shared->width(), ", ",
                            shared->dynamic(), "), expected (", tokens, ", ", n, ", ", C, ", ",
                            dynamic, ")");
    has_forward_ = false;
    mode_ = mode;
    T_ = tokens;
    n_ = n;
    C_ = C;
    if (shared) {
      own_.reset();
      ws_ = shared;
    } else {
      own_ = std::make_unique<Workspace>(tokens, n, C, iterations, dynamic);
      ws_ = own_.get();
    }
    const BlockLayout l = BlockLayout::of<Variant>(n, C, dynamic);
    const Index rows = dynamic ? tokens : 1;
    dynamic_ = dynamic;
    X.resize(tokens * n, C);
    if (mode == MemoryMode::cache) {
      y.resize(tokens, C);
      if (Variant::kHasCoefficients) {
        r.resize(rows, 1);
        z.resize(rows, l.K);
        h_pre.resize(rows, n);
        h_post.resize(rows, n);
        H_res.resize(rows, Index(n) * n);
      }
    } else {
      y.resize(0, C);
      r.resize(0, 1);
      z.resize(0, l.K);
      h_pre.resize(0, n);
      h_post.resize(0, n);
      H_res.resize(0, Index(n) * n);
    }
    has_forward_ = false;
  }

  MemoryMode mode() const { return mode_; }
  Index tokens() const { return T_; }
  Workspace& workspace() const { return *ws_; }

  /// Bytes kept between forward and backward (the saved activations; the workspace excluded).
  Index saved_bytes() const {
    return Index(sizeof(Scalar)) * (X.size() + y.size()) +
           Index(sizeof(Real)) * (r.size() + z.size() + h_pre.size() + h_post.size() + H_res.size());
  }

  /// The last forward's H_res (T, n*n; one row when static-only): the saved one in cache mode,
  /// else the workspace's copy (valid until the workspace serves another call).
  const RowMatrix<Real>& last_H_res() const {
    return mode_ == MemoryMode::cache ? H_res : ws_->H_res;
  }

  // Saved state (public for inspection; written by Block::forward).
  RowMatrix<Scalar> X;                          // (T*n, C) the block input
  RowMatrix<Scalar> y;                          // (T, C)   cache mode
  RowMatrix<Real> r, z, h_pre, h_post, H_res;   // cache mode

 private:
  template <typename, int, typename>
  friend class Block;
  MemoryMode mode_ = MemoryMode::cache;
  Index T_ = 0, C_ = 0;
  int n_ = 0;
  bool dynamic_ = true;
  bool has_forward_ = false;
  std::unique_ptr<Workspace> own_;
  Workspace* ws_ = nullptr;
};

/// A hyper-connection block for storage type Scalar (float, double, bf16), N streams
/// (compile-time, or mhc::Dynamic), and a Variant from variants.hpp.
template <typename Scalar, int N = 4, typename Variant = MhcVariant>
class Block {
  static_assert(N == Dynamic || (N >= 1 && N <= Variant::kMaxN),
                "mhc::Block: N is out of range for this variant (mHC/HC: 1..16, mHC-lite: 1..5, "
                "residual: 1)");

 public:
  using Real = compute_t<Scalar>;
  using Vector = Eigen::Matrix<Real, Eigen::Dynamic, 1>;
  using Context = BlockContext<Scalar, N, Variant>;
  using Workspace = BlockWorkspace<Scalar, N, Variant>;
  using VariantType = Variant;
  static constexpr int kStreams = N;

  /// Number of parameters of a block of n streams and width C (dynamic: with W).
  static Index parameter_count(int n, Index C, bool dynamic = true) {
    return BlockLayout::of<Variant>(n, C, dynamic).size;
  }

  /// A block that owns its parameters, initialised from `init`.
  explicit Block(Index C, int n = N, const BlockInit& init = {}, const BlockOptions& options = {}) {
    setup(C, n, options);
    owned_.setZero(layout_.size);
    data_ = owned_.data();
    reset_parameters(init);
  }

  /// A block whose parameters are the parameter_count(n, C) values at `parameters` (caller
  /// memory, not modified here; call reset_parameters to write the defaults there).
  Block(Index C, Real* parameters, int n = N, const BlockOptions& options = {}) {
    setup(C, n, options);
    if (parameters == nullptr && layout_.size > 0)
      detail::throw_invalid("Block", "parameters is null but the block has ", layout_.size);
    data_ = parameters;
  }

  Block(const Block& o) : layout_(o.layout_), options_(o.options_), owned_(o.owned_) {
    data_ = o.owns() ? owned_.data() : o.data_;
  }
  Block(Block&& o) noexcept : layout_(o.layout_), options_(o.options_) {
    const bool own = o.owns();
    owned_.swap(o.owned_);
    data_ = own ? owned_.data() : o.data_;
  }
  Block& operator=(Block o) {
    const bool own = o.owns();
    layout_ = o.layout_;
    options_ = o.options_;
    owned_.swap(o.owned_);
    data_ = own ? owned_.data() : o.data_;
    return *this;
  }

  /// Writes the defaults of `init` into the parameters (see variants.hpp). Throws
  /// mhc::invalid_argument, writing nothing, if `init` has a non-finite value, a negative
  /// projection_std or pre_stream, or (mHC-lite, n >= 2) lite_identity_weight outside (0, 1).
  void reset_parameters(const BlockInit& init) {
    if constexpr (Variant::kHasCoefficients) {
    check_init(init);
    BlockParamView<Real> p = params();
    if (init.projection_std > 0) {
      std::mt19937_64 rng(init.seed);
      std::normal_distribution<double> normal(0.0, init.projection_std);
      for (Index k = 0; k < p.W().size(); ++k) p.W().data()[k] = Real(normal(rng));
    } else {
      p.W().setZero();
    }
    p.alpha().setConstant(Real(init.alpha));
    Variant::default_biases(layout_.n, init, p.b_pre().data(), p.b_post().data(), p.b_res().data());
    } else {
      (void)init;
    }
  }

  int streams() const { return layout_.n; }
  Index width() const { return layout_.C; }
  const BlockLayout& layout() const { return layout_; }
  const BlockOptions& options() const { return options_; }
  Index parameter_count() const { return layout_.size; }
  bool owns() const { return owned_.size() > 0 || layout_.size == 0; }

  /// The flat parameter vector and its named views.
  Eigen::Map<Vector> parameters() const { return {data_, layout_.size}; }
  BlockParamView<Real> params() const { return {data_, layout_}; }
  /// Named views of a gradient vector of this block's layout.
  BlockParamView<Real> view(Eigen::Ref<Vector> grads) const {
    check_grads("Block::view", grads);
    return {grads.data(), layout_};
  }

  /// Throws mhc::invalid_argument (naming `where`) if the parameters are not what forward and
  /// backward accept: non-finite alpha or biases (e.g. after a diverged optimiser step). No-op
  /// for the residual variant. W is not scanned (T-independent but n*C*M values).
  void check_parameters(const char* where = "Block::check_parameters") const {
    if constexpr (Variant::kHasCoefficients)
      Coefficients<Scalar, N, Variant>::check_parameters(coefficient_params(), where);
    else
      (void)where;
  }

  /// Forward: X (T*n, C) -> X_out (T*n, C), calling layer.forward once. The context (made for
  /// this block's shape and T tokens) records what backward needs. X_out may be X itself; it must
  /// not otherwise overlap X. Bad arguments or parameters throw before X_out or the context is
  /// written; if the layer throws, the context holds no forward (backward then throws).
  template <typename Layer>
  void forward(const ConstBatchRef<Scalar>& X, Layer& layer, BatchRef<Scalar> X_out,
               Context& ctx) const {
    static_assert(is_block_layer_v<Layer, Scalar>,
                  "mhc::Block: the layer must provide forward(const mhc::ConstBatchRef<S>& u, "
                  "mhc::BatchRef<S> y) and backward(const mhc::ConstBatchRef<S>& d_y, "
                  "mhc::BatchRef<S> d_u) for the block's storage type S (see block.hpp)");
    constexpr const char* where = "Block::forward";
    check_io(where, X, X_out, ctx);
    check_parameters(where);
    ctx.has_forward_ = false;  // until this forward completes
    ctx.X = X;
    Workspace& ws = *ctx.ws_;
    const bool cache = ctx.mode_ == MemoryMode::cache;
    if constexpr (Variant::kHasCoefficients) {
      if (cache) {
        coefficients_and_u(ctx.X, ctx.r, ctx.z, ctx.h_pre, ctx.h_post, ctx.H_res, ws.u);
        layer_and_update(ctx.X, layer, ctx.h_post, ctx.H_res, ws, ctx.y, X_out);
      } else {
        coefficients_and_u(ctx.X, ws.r, ws.z, ws.h_pre, ws.h_post, ws.H_res, ws.u);
        layer_and_update(ctx.X, layer, ws.h_post, ws.H_res, ws, ws.y, X_out);
      }
    } else {
      RowMatrix<Scalar>& y = cache ? ctx.y : ws.y;
      layer.forward(ctx.X, y);
      X_out = ctx.X + y;  // exactly x + F(x)
    }
    ctx.has_forward_ = true;
  }

  /// Backward of the context's forward. d_X_out (T*n, C) -> d_X (T*n, C) (overwritten; it may be
  /// d_X_out itself), calling layer.backward once (and layer.forward first in recompute mode).
  /// The block's parameter gradients are ADDED to `grads` (parameter_count() values, this
  /// block's layout).
  template <typename Layer>
  void backward(Context& ctx, const ConstBatchRef<Scalar>& d_X_out, Layer& layer,
                BatchRef<Scalar> d_X, Eigen::Ref<Vector> grads) const {
    static_assert(is_block_layer_v<Layer, Scalar>,
                  "mhc::Block: the layer must provide forward(const mhc::ConstBatchRef<S>& u, "
                  "mhc::BatchRef<S> y) and backward(const mhc::ConstBatchRef<S>& d_y, "
                  "mhc::BatchRef<S> d_u) for the block's storage type S (see block.hpp)");
    constexpr const char* where = "Block::backward";
    if (!ctx.has_forward_) detail::throw_invalid(where, "the context holds no forward");
    check_context(where, ctx);
    const Index T = ctx.T_, C = layout_.C;
    const int n = layout_.n;
    detail::check_batch(where, "d_X_out", d_X_out, T * n, C);
    detail::check_batch(where, "d_X", d_X, T * n, C);
    detail::check_same_or_disjoint(where, "d_X", d_X, "d_X_out", d_X_out);
    check_grads(where, grads);
    check_parameters(where);
    Workspace& ws = *ctx.ws_;
    const bool cache = ctx.mode_ == MemoryMode::cache;
    if constexpr (!Variant::kHasCoefficients) {
      if (!cache) layer.forward(ctx.X, ws.y);
      ws.d_y = d_X_out;
      layer.backward(ws.d_y, ws.d_u);
      d_X = ws.d_y + ws.d_u;
    } else {
      if (!cache) {
        coefficients_and_u(ctx.X, ws.r, ws.z, ws.h_pre, ws.h_post, ws.H_res, ws.u);
        layer.forward(ws.u, ws.y);
      }
      const RowMatrix<Real>& r = cache ? ctx.r : ws.r;
      const RowMatrix<Real>& z = cache ? ctx.z : ws.z;
      const RowMatrix<Real>& h_pre = cache ? ctx.h_pre : ws.h_pre;
      const RowMatrix<Real>& h_post = cache ? ctx.h_post : ws.h_post;
      const RowMatrix<Real>& H_res = cache ? ctx.H_res : ws.H_res;
      const RowMatrix<Scalar>& y = cache ? ctx.y : ws.y;
      // Update: d_X = H_res^T G, d_y = G^T h_post, d_H_res = G X^T, d_h_post = G y.
      Update<Scalar, N>::backward(ctx.X, H_res, h_post, y, d_X_out, d_X, ws.d_H_res, ws.d_h_post,
                                  ws.d_y);
      layer.backward(ws.d_y, ws.d_u);
      // Pre-mix: d_X += h_pre d_u^T, d_h_pre = X d_u.
      PreMix<Scalar, N>::backward(ctx.X, h_pre, ws.d_u, d_X, ws.d_h_pre);
      coefficients_backward(ctx.X, ws, r, z, d_X, grads);
    }
  }

 private:
  void setup(Index C, int n, const BlockOptions& options) {
    constexpr const char* where = "Block";
    detail::check_static_streams<N>(where, n);
    if (n > Variant::kMaxN)
      detail::throw_invalid(where, "n = ", n, " exceeds ", Variant::kMaxN, " for the ",
                            Variant::name, " variant");
    if (C < 1) detail::throw_invalid(where, "C = ", C, " must be positive");
    if (options.iterations < 1 || options.iterations > kMaxSinkhornIterations)
      detail::throw_invalid(where, "iterations = ", options.iterations, " is out of range [1, ",
                            kMaxSinkhornIterations, "]");
    if (!(options.eps > 0) || !std::isfinite(options.eps))
      detail::throw_invalid(where, "eps = ", options.eps, " must be positive and finite");
    layout_ = BlockLayout::of<Variant>(n, C, options.dynamic);
    options_ = options;
  }

  void check_init(const BlockInit& init) const {
    constexpr const char* where = "Block::reset_parameters";
    const std::pair<const char*, double> values[] = {
        {"alpha", init.alpha},           {"res_logit_gap", init.res_logit_gap},
        {"pre_logit", init.pre_logit},   {"post_logit", init.post_logit},
        {"projection_std", init.projection_std}};
    for (const auto& v : values)
      if (!std::isfinite(v.second)) detail::throw_invalid(where, "init.", v.first, " = ", v.second,
                                                          " is not finite");
    if (init.projection_std < 0)
      detail::throw_invalid(where, "init.projection_std = ", init.projection_std, " < 0");
    if (init.pre_stream < 0)
      detail::throw_invalid(where, "init.pre_stream = ", init.pre_stream, " < 0");
    if (std::is_same<Variant, MhcLiteVariant>::value && detail::factorial(layout_.n) > 1 &&
        !(init.lite_identity_weight > 0 && init.lite_identity_weight < 1))
      detail::throw_invalid(where, "init.lite_identity_weight = ", init.lite_identity_weight,
                            " is not in (0, 1)");
  }

  void check_context(const char* where, const Context& ctx) const {
    if (ctx.ws_ == nullptr || ctx.n_ != layout_.n || ctx.C_ != layout_.C ||
        ctx.dynamic_ != options_.dynamic)
      detail::throw_invalid(where, "the context is for (n, C, dynamic) = (", ctx.n_, ", ", ctx.C_,
                            ", ", ctx.dynamic_, "), the block is (", layout_.n, ", ", layout_.C,
                            ", ", options_.dynamic, ")");
  }

  void check_io(const char* where, const ConstBatchRef<Scalar>& X, const BatchRef<Scalar>& X_out,
                const Context& ctx) const {
    check_context(where, ctx);
    const Index T = ctx.T_, C = layout_.C;
    const int n = layout_.n;
    detail::check_batch(where, "X", X, T * n, C);
    detail::check_batch(where, "X_out", X_out, T * n, C);
    detail::check_same_or_disjoint(where, "X_out", X_out, "X", X);
    detail::check_no_overlap(where, "X", X, "the context", ctx.X);
  }

  void check_grads(const char* where, const Eigen::Ref<Vector>& grads) const {
    if (grads.size() != layout_.size)
      detail::throw_invalid(where, "grads has ", grads.size(), " values, expected ", layout_.size);
    if (layout_.size > 0 && grads.data() == nullptr) detail::throw_invalid(where, "grads is null");
    if (layout_.size > 0 && data_ != nullptr) {
      const auto g0 = reinterpret_cast<std::uintptr_t>(grads.data());
      const auto p0 = reinterpret_cast<std::uintptr_t>(data_);
      const auto bytes = static_cast<std::uintptr_t>(layout_.size) * sizeof(Real);
      if (g0 < p0 + bytes && p0 < g0 + bytes)
        detail::throw_invalid(where, "grads overlaps the block's parameters");
    }
  }

  CoefficientParams<Real> coefficient_params() const {
    const BlockParamView<Real> p = params();
    return CoefficientParams<Real>{
        ConstBatchRef<Real>(p.W()), Eigen::Matrix<Real, 3, 1>(p.alpha()),
        ConstVectorRef<Real>(p.b_pre()), ConstVectorRef<Real>(p.b_post()),
        ConstVectorRef<Real>(p.b_res()), options_.iterations, Real(options_.eps)};
  }

  /// (r, z, h_pre, h_post, H_res) of every token of X (one coefficient row when static-only)
  /// and u = h_pre^T X, in the fused forward (X read from memory once).
  void coefficients_and_u(const RowMatrix<Scalar>& X, RowMatrix<Real>& r, RowMatrix<Real>& z,
                          RowMatrix<Real>& h_pre, RowMatrix<Real>& h_post, RowMatrix<Real>& H_res,
                          RowMatrix<Scalar>& u) const {
    if constexpr (Variant::kHasCoefficients)
      Coefficients<Scalar, N, Variant>::forward(X, coefficient_params(), h_pre, h_post, H_res, r,
                                                z, u);
    else  // the residual variant has no coefficients: never called
      (void)X, (void)r, (void)z, (void)h_pre, (void)h_post, (void)H_res, (void)u;
  }

  /// y = F(u) (u in ws.u), X_out = H_res X + h_post y^T.
  template <typename Layer>
  void layer_and_update(const RowMatrix<Scalar>& X, Layer& layer, const RowMatrix<Real>& h_post,
                        const RowMatrix<Real>& H_res, Workspace& ws, RowMatrix<Scalar>& y,
                        BatchRef<Scalar>& X_out) const {
    layer.forward(ws.u, y);
    Update<Scalar, N>::forward(X, H_res, h_post, y, X_out);
  }

  /// d_X += dL/dX through the coefficients; grads += the block's parameter gradients.
  void coefficients_backward(const RowMatrix<Scalar>& X, Workspace& ws, const RowMatrix<Real>& r,
                             const RowMatrix<Real>& z, BatchRef<Scalar>& d_X,
                             Eigen::Ref<Vector>& grads) const {
    if constexpr (Variant::kHasCoefficients) {
      BlockParamView<Real> g{ws.grads.data(), layout_};
      CoefficientGrads<Real> cg{BatchRef<Real>(g.W()), VectorRef<Real>(g.alpha()),
                                VectorRef<Real>(g.b_pre()), VectorRef<Real>(g.b_post()),
                                VectorRef<Real>(g.b_res())};
      Coefficients<Scalar, N, Variant>::backward(X, coefficient_params(), r, z, ws.d_h_pre,
                                                 ws.d_h_post, ws.d_H_res, d_X, cg, ws.ops);
      grads += ws.grads;
    } else {  // the residual variant has no coefficients: never called
      (void)X, (void)ws, (void)r, (void)z, (void)d_X, (void)grads;
    }
  }

  BlockLayout layout_;
  BlockOptions options_;
  Vector owned_;
  Real* data_ = nullptr;
};

/// Short aliases.
template <typename Scalar, int N = 4>
using MhcBlock = Block<Scalar, N, MhcVariant>;
template <typename Scalar, int N = 4>
using HcBlock = Block<Scalar, N, HcVariant>;
template <typename Scalar, int N = 4>
using MhcLiteBlock = Block<Scalar, N, MhcLiteVariant>;
template <typename Scalar>
using ResidualBlock = Block<Scalar, 1, ResidualVariant>;

}  // namespace mhc
