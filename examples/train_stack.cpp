// train_stack: trains one deep stack of simple layers three times, as a plain residual network,
// with Hyper-Connections (HC) and with mHC, from the same seed and learning rate, and shows the
// paper's central observation (Xie et al., arXiv 2512.24880, Figs. 3 and 7): HC's unconstrained
// residual mixing lets the composite gain of the stack, max abs row / column sum of
// H_res(L) ... H_res(1), grow by orders of magnitude, while mHC's doubly stochastic H_res keeps
// it near 1.
//
//   train_stack [--steps S] [--layers L] [--width C] [--tokens T] [--lr LR] [--seed K]
//               [--target-gain G] [--no-final-norm] [--variants residual,HC,mHC,mHC-lite]
//               [--out-dir DIR] [--threads K] [--check] [--quiet]
// Defaults: S = 3000, L = 64, C = 32, T = 32, LR = 0.01, G = 4, seed 1, DIR = docs, K = 1
// (about a minute on one idle core). --steps 50 is a few-second smoke run; with --check the
// exit status is 3 unless every run stayed finite, mHC's composite forward gain stayed within
// 1e-3 of 1 and HC's grew past 100 (ctest runs `--steps 40 --check`).
// Table: final loss = mean over the last 10% of steps; gains at the last step and the largest
// over the run; max|row-1|, max|col-1|: largest doubly stochastic error over steps, layers and
// tokens (HC: how far from doubly stochastic; mHC: rows exact, columns within Sinkhorn's
// truncation after t_max = 20 rounds, which grows when H_res logits become sharp).
//
// Model (n = 4 streams for HC and mHC, n = 1 for the residual run), shaped like a pre-norm
// transformer without attention:
//   X_0 = expand(x);  X_l = H_res X_{l-1} + h_post F_l(h_pre^T X_{l-1})  (l = 1..L);
//   out = rmsnorm(collapse_w(X_L)) * gamma      (learnable stream weights w, final norm gain gamma)
//   F_l(u) = tanh(rmsnorm(u) A_l + b_l) B_l     (C -> 2C -> C, a pre-norm MLP)
// Task (generated, nothing downloaded): x ~ N(0, I_C), fresh every step; target
//   t(x) = G tanh(x M) N  for a fixed random teacher M (C, 2C), N (2C, C).
// Loss 0.5 mean_{t,c} (out - t(x))^2; Adam (0.9, 0.999) with the same learning rate on every
// parameter (blocks, layers, w, gamma) for all runs, and the paper's step decay (x 0.316 after
// 80% of the steps, x 0.1 after 90%); same seed: same teacher, data and layer initialisation.
// Why HC's gain explodes here: with normalisation at every layer input and before the output
// (as in an LLM), the overall scale of the residual streams does not reach the loss, so nothing
// holds back a drift of H_res; Adam moves every H_res entry by about LR per step, in all L layers
// at once, and the composite gain compounds over depth (L = 64 at LR = 0.01 reaches 1e4 within a
// few hundred steps). mHC's H_res is doubly stochastic, so its composite forward gain stays at 1
// (rows sum to 1) and its backward gain near 1 (columns within Sinkhorn's truncation error).
// Writes DIR/train_stack.csv (per variant and step: loss, forward and backward composite gain,
// the largest doubly stochastic row / column error over the layers) and DIR/train_stack.svg
// (loss and forward gain per step, log scales).
#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "mhc/diagnostics.hpp"
#include "mhc/stack.hpp"
#include "mhc/streams.hpp"

namespace {

using Scalar = float;
using Mat = mhc::RowMatrix<float>;
using Vec = Eigen::VectorXf;
using mhc::Index;

struct Settings {
  int steps = 3000;
  int layers = 64;
  Index width = 32;
  Index tokens = 32;
  double lr = 1e-2;
  double target_gain = 4.0;
  unsigned seed = 1;
  std::string out_dir = "docs";
  std::string variants = "residual,HC,mHC";
  bool final_norm = true;
  int threads = 1;
  bool check = false;
  bool quiet = false;
};

/// Adam on one flat parameter vector.
struct Adam {
  Vec m, v;
  int t = 0;
  void step(Eigen::Ref<Vec> p, const Eigen::Ref<const Vec>& g, double lr) {
    if (m.size() != p.size()) {
      m = Vec::Zero(p.size());
      v = Vec::Zero(p.size());
    }
    ++t;
    const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
    m = b1 * m + (1 - b1) * g;
    v = b2 * v + (1 - b2) * g.cwiseAbs2();
    const float c1 = 1 - std::pow(b1, float(t)), c2 = 1 - std::pow(b2, float(t));
    p.array() -= float(lr) * (m.array() / c1) / ((v.array() / c2).sqrt() + eps);
  }
};

/// F(u) = tanh(rmsnorm(u) A + b) B: a pre-norm MLP, C -> H -> C. Parameters and gradients are
/// flat vectors [A (C, H) | b (H) | B (H, C)]. Models mhc's layer concept (block.hpp).
struct MlpLayer {
  Index C = 0, H = 0;
  Vec params, grads;
  Mat u_hat, h, tmp_da, tmp_dh, tmp_duh;  // saved from forward / scratch
  Eigen::VectorXf r;

  MlpLayer(Index c, Index hidden, std::mt19937& rng) : C(c), H(hidden) {
    params.resize(C * H + H + H * C);
    grads = Vec::Zero(params.size());
    std::normal_distribution<float> normal(0.f, 1.f);
    for (Index k = 0; k < C * H; ++k) params[k] = normal(rng) / std::sqrt(float(C));
    for (Index k = 0; k < H; ++k) params[C * H + k] = 0.f;
    for (Index k = 0; k < H * C; ++k) params[C * H + H + k] = 0.1f * normal(rng) / std::sqrt(float(H));
  }
  Eigen::Map<Mat> A() { return {params.data(), C, H}; }
  Eigen::Map<Eigen::RowVectorXf> b() { return {params.data() + C * H, H}; }
  Eigen::Map<Mat> B() { return {params.data() + C * H + H, H, C}; }
  Eigen::Map<Mat> dA() { return {grads.data(), C, H}; }
  Eigen::Map<Eigen::RowVectorXf> db() { return {grads.data() + C * H, H}; }
  Eigen::Map<Mat> dB() { return {grads.data() + C * H + H, H, C}; }

  void forward(const mhc::ConstBatchRef<float>& u, mhc::BatchRef<float> y) {
    const Index T = u.rows();
    r.resize(T);
    u_hat.resize(T, C);
    for (Index t = 0; t < T; ++t) {
      r[t] = std::sqrt(u.row(t).squaredNorm() / float(C) + 1e-6f);
      u_hat.row(t) = u.row(t) / r[t];
    }
    h.noalias() = u_hat * A();
    h.rowwise() += b();
    h = h.array().tanh().matrix();
    y.noalias() = h * B();
  }
  void backward(const mhc::ConstBatchRef<float>& d_y, mhc::BatchRef<float> d_u) {
    dB().noalias() += h.transpose() * d_y;
    tmp_dh.noalias() = d_y * B().transpose();
    tmp_da = (tmp_dh.array() * (1.f - h.array().square())).matrix();
    dA().noalias() += u_hat.transpose() * tmp_da;
    db() += tmp_da.colwise().sum();
    tmp_duh.noalias() = tmp_da * A().transpose();
    for (Index t = 0; t < d_u.rows(); ++t) {
      const float proj = u_hat.row(t).dot(tmp_duh.row(t)) / float(C);
      d_u.row(t) = (tmp_duh.row(t) - proj * u_hat.row(t)) / r[t];
    }
  }
};

/// The fixed random teacher t(x) = G tanh(x M) N; M (C, 2C) ~ N(0, 2.25 / C), N (2C, C) ~ N(0, 1 / 2C).
struct Teacher {
  Mat M, N;
  float gain;
  Teacher(Index C, float g, std::mt19937& rng) : M(C, 2 * C), N(2 * C, C), gain(g) {
    std::normal_distribution<float> normal(0.f, 1.f);
    for (Index k = 0; k < M.size(); ++k) M.data()[k] = normal(rng) * 1.5f / std::sqrt(float(C));
    for (Index k = 0; k < N.size(); ++k) N.data()[k] = normal(rng) / std::sqrt(float(2 * C));
  }
  Mat operator()(const Mat& x) const {
    Mat hidden = (x * M).array().tanh().matrix();
    Mat t = gain * (hidden * N);
    return t;
  }
};

struct Record {
  int step;
  double loss, fwd, bwd, ds_row, ds_col;
};

struct RunResult {
  std::string name;
  std::vector<Record> records;
  double final_loss = 0, final_fwd = 1, final_bwd = 1, ms_per_step = 0, max_fwd = 0, max_ds_row = 0,
         max_ds_col = 0;
  int diverged_at = -1;
};

/// Trains one variant; n streams (1 for the residual).
template <int N, typename Variant>
RunResult train(const char* name, const Settings& s) {
  RunResult result;
  result.name = name;
  const int n = N;
  const Index C = s.width, T = s.tokens;
  std::mt19937 rng(s.seed);  // same stream of weights, data and teacher for every variant
  Teacher teacher(C, float(s.target_gain), rng);
  std::vector<MlpLayer> layers;
  for (int l = 0; l < s.layers; ++l) layers.emplace_back(C, 2 * C, rng);
  mhc::BlockInit init;
  init.projection_std = 0.02;
  init.seed = s.seed;
  mhc::Stack<Scalar, N, Variant> stack(s.layers, C, n, init);
  stack.reserve(T, mhc::StackMemory::checkpoint);
  Vec w = mhc::Streams<Scalar, N>::default_collapse_weights(n), dw(n);
  Vec stack_grads(stack.parameter_count());
  std::vector<Adam> layer_opt(static_cast<size_t>(s.layers));
  Adam stack_opt, w_opt;
  mhc::CompositeGain gain(T, n);
  std::vector<mhc::DoublyStochasticError> ds(static_cast<size_t>(s.layers));
  Mat x(T, C), X(T * n, C), o(T, C), o_hat(T, C), out(T, C), d_out(T, C), d_o(T, C), dX(T * n, C);
  Eigen::VectorXf o_r(T);
  Eigen::RowVectorXf gamma = Eigen::RowVectorXf::Ones(C), d_gamma(C);
  Adam gamma_opt;
  std::normal_distribution<float> normal(0.f, 1.f);
  const auto start = std::chrono::steady_clock::now();
  int done = 0;
  double ema = -1;
  for (int step = 1; step <= s.steps; ++step) {
    for (Index k = 0; k < x.size(); ++k) x.data()[k] = normal(rng);
    const Mat target = teacher(x);
    // Forward.
    mhc::Streams<Scalar, N>::expand(x, X, n);
    gain.reset();
    stack.forward(X, layers, X, &gain, ds.data());
    mhc::Streams<Scalar, N>::collapse(X, w, o, n);
    if (s.final_norm) {
      for (Index t = 0; t < T; ++t) {
        o_r[t] = std::sqrt(o.row(t).squaredNorm() / float(C) + 1e-6f);
        o_hat.row(t) = o.row(t) / o_r[t];
      }
      out = o_hat.array().rowwise() * gamma.array();
    } else {
      out = o;
    }
    const Mat diff = out - target;
    const double loss = 0.5 * double(diff.squaredNorm()) / double(diff.size());
    const mhc::Gain g = gain.gains();
    if (!std::isfinite(loss) || !std::isfinite(g.forward)) {
      result.diverged_at = step;
      break;
    }
    // Backward.
    d_out = diff / float(diff.size());
    if (s.final_norm) {
      d_gamma = (o_hat.array() * d_out.array()).colwise().sum();
      const Mat d_hat = d_out.array().rowwise() * gamma.array();
      for (Index t = 0; t < T; ++t)
        d_o.row(t) = (d_hat.row(t) - o_hat.row(t) * (o_hat.row(t).dot(d_hat.row(t)) / float(C))) / o_r[t];
    } else {
      d_o = d_out;
    }
    dw.setZero();
    mhc::Streams<Scalar, N>::collapse_backward(X, w, d_o, dX, dw, n);
    stack_grads.setZero();
    for (auto& l : layers) l.grads.setZero();
    stack.backward(dX, layers, dX, stack_grads);
    // Update, with the paper's step decay (x 0.316 after 80% of the steps, x 0.1 after 90%).
    const double lr = s.lr * (step > 0.9 * s.steps ? 0.1 : step > 0.8 * s.steps ? 0.316 : 1.0);
    stack_opt.step(stack.parameters(), stack_grads, lr);
    for (int l = 0; l < s.layers; ++l)
      layer_opt[size_t(l)].step(layers[size_t(l)].params, layers[size_t(l)].grads, lr);
    w_opt.step(w, dw, lr);
    if (s.final_norm) {
      Vec gv = gamma.transpose(), dg = d_gamma.transpose();
      gamma_opt.step(gv, dg, lr);
      gamma = gv.transpose();
    }
    ema = ema < 0 ? loss : 0.95 * ema + 0.05 * loss;
    mhc::DoublyStochasticError worst;
    for (const auto& e : ds) {
      worst.row = std::max(worst.row, e.row);
      worst.col = std::max(worst.col, e.col);
    }
    result.records.push_back({step, loss, g.forward, g.backward, worst.row, worst.col});
    result.max_fwd = std::max(result.max_fwd, g.forward);
    result.max_ds_row = std::max(result.max_ds_row, worst.row);
    result.max_ds_col = std::max(result.max_ds_col, worst.col);
    done = step;
    if (!s.quiet && (step % std::max(1, s.steps / 10) == 0 || step == 1)) {
      std::printf("  %-8s step %5d/%d  loss %.4f (avg %.4f)  composite gain fwd %10.4g bwd %10.4g\n",
                  name, step, s.steps, loss, ema, g.forward, g.backward);
      std::fflush(stdout);
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.ms_per_step = done > 0 ? 1e3 * secs / done : 0;
  if (!result.records.empty()) {
    // Final loss: mean over the last 10% of steps (the per-step loss is a fresh random batch).
    const size_t k = std::max<size_t>(1, result.records.size() / 10);
    double acc = 0;
    for (size_t i = result.records.size() - k; i < result.records.size(); ++i) acc += result.records[i].loss;
    result.final_loss = acc / double(k);
    result.final_fwd = result.records.back().fwd;
    result.final_bwd = result.records.back().bwd;
  }
  return result;
}

// ---- output -------------------------------------------------------------------------------------

void write_csv(const std::string& path, const std::vector<RunResult>& runs) {
  std::ofstream f(path);
  f << "variant,step,loss,forward_gain,backward_gain,ds_row_error,ds_col_error\n";
  for (const auto& r : runs)
    for (const auto& rec : r.records)
      f << r.name << ',' << rec.step << ',' << rec.loss << ',' << rec.fwd << ',' << rec.bwd << ','
        << rec.ds_row << ',' << rec.ds_col << '\n';
  if (!f) throw std::runtime_error("cannot write " + path);
}

/// One log-scale panel: polylines of (step, value) per run.
void svg_panel(std::ostringstream& o, double x0, double y0, double w, double h, const char* title,
               const std::vector<RunResult>& runs, int steps, bool gain, const std::vector<const char*>& colors) {
  double lo = 1e300, hi = -1e300;
  for (const auto& r : runs)
    for (const auto& rec : r.records) {
      const double v = gain ? rec.fwd : rec.loss;
      if (v > 0 && std::isfinite(v)) {
        lo = std::min(lo, v);
        hi = std::max(hi, v);
      }
    }
  if (gain) lo = std::min(lo, 0.5);
  double llo = std::floor(std::log10(lo)), lhi = std::ceil(std::log10(hi));
  if (lhi <= llo) lhi = llo + 1;
  auto X = [&](double s) { return x0 + w * (s - 1) / std::max(1, steps - 1); };
  auto Y = [&](double v) { return y0 + h - h * (std::log10(v) - llo) / (lhi - llo); };
  o << "<rect x='" << x0 << "' y='" << y0 << "' width='" << w << "' height='" << h
    << "' fill='white' stroke='#444'/>\n";
  o << "<text x='" << x0 + w / 2 << "' y='" << y0 - 10 << "' text-anchor='middle' font-size='15'>"
    << title << "</text>\n";
  for (int e = int(llo); e <= int(lhi); ++e) {
    const double y = Y(std::pow(10.0, e));
    o << "<line x1='" << x0 << "' x2='" << x0 + w << "' y1='" << y << "' y2='" << y
      << "' stroke='#ddd'/>\n";
    o << "<text x='" << x0 - 6 << "' y='" << y + 4 << "' text-anchor='end' font-size='11'>1e" << e
      << "</text>\n";
  }
  for (int k = 0; k <= 4; ++k) {
    const double s = 1 + (steps - 1) * k / 4.0;
    o << "<text x='" << X(s) << "' y='" << y0 + h + 16 << "' text-anchor='middle' font-size='11'>"
      << int(std::lround(s)) << "</text>\n";
  }
  o << "<text x='" << x0 + w / 2 << "' y='" << y0 + h + 34
    << "' text-anchor='middle' font-size='12'>training step</text>\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    o << "<polyline fill='none' stroke='" << colors[i] << "' stroke-width='1.5' points='";
    const auto& recs = runs[i].records;
    const size_t stride = std::max<size_t>(1, recs.size() / 800);
    for (size_t j = 0; j < recs.size(); j += stride) {
      double v = recs[j].fwd;
      if (!gain) {  // running mean of the last (up to) 20 per-step losses
        const size_t from = j >= 19 ? j - 19 : 0;
        v = 0;
        for (size_t q = from; q <= j; ++q) v += recs[q].loss;
        v /= double(j - from + 1);
      }
      if (v > 0 && std::isfinite(v)) o << X(recs[j].step) << ',' << Y(v) << ' ';
    }
    o << "'/>\n";
  }
}

void write_svg(const std::string& path, const std::vector<RunResult>& runs, const Settings& s) {
  std::vector<const char*> colors;
  for (const auto& r : runs)
    colors.push_back(r.name == "residual" ? "#2b6cb0" : r.name == "HC" ? "#c53030" : r.name == "mHC" ? "#2f855a" : "#805ad5");
  std::ostringstream o;
  const double W = 1000, H = 420;
  o << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H
    << "' font-family='sans-serif'>\n<rect width='100%' height='100%' fill='white'/>\n";
  svg_panel(o, 70, 50, 380, 280, "training loss (mean of the last 20 steps)", runs, s.steps, false, colors);
  svg_panel(o, 580, 50, 380, 280, "composite forward gain  max_i sum_j |(H_L...H_1)_ij|", runs,
            s.steps, true, colors);
  for (size_t i = 0; i < runs.size(); ++i) {
    const double x = 200 + 230 * double(i);
    o << "<line x1='" << x << "' x2='" << x + 30 << "' y1='" << H - 28 << "' y2='" << H - 28
      << "' stroke='" << colors[i] << "' stroke-width='3'/>\n";
    o << "<text x='" << x + 36 << "' y='" << H - 24 << "' font-size='13'>" << runs[i].name
      << "</text>\n";
  }
  o << "<text x='" << W / 2 << "' y='18' text-anchor='middle' font-size='13'>" << s.layers
    << " blocks, C = " << s.width << ", n = 4 (residual: 1), " << s.tokens
    << " tokens/step, Adam lr " << s.lr << ", seed " << s.seed << "</text>\n";
  o << "</svg>\n";
  std::ofstream f(path);
  f << o.str();
  if (!f) throw std::runtime_error("cannot write " + path);
}

int parse_int(const char* v) { return std::atoi(v); }

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "missing value after %s\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--steps") s.steps = parse_int(next());
    else if (a == "--layers") s.layers = parse_int(next());
    else if (a == "--width") s.width = parse_int(next());
    else if (a == "--tokens") s.tokens = parse_int(next());
    else if (a == "--lr") s.lr = std::atof(next());
    else if (a == "--target-gain") s.target_gain = std::atof(next());
    else if (a == "--seed") s.seed = static_cast<unsigned>(parse_int(next()));
    else if (a == "--out-dir") s.out_dir = next();
    else if (a == "--variants") s.variants = next();
    else if (a == "--quiet") s.quiet = true;
    else if (a == "--no-final-norm") s.final_norm = false;
    else if (a == "--threads") s.threads = parse_int(next());
    else if (a == "--check") s.check = true;
    else {
      std::fprintf(stderr,
                   "usage: %s [--steps S] [--layers L] [--width C] [--tokens T] [--lr LR]\n"
                   "          [--target-gain G] [--no-final-norm] [--seed K] [--out-dir DIR]\n"
                   "          [--variants residual,HC,mHC,mHC-lite] [--threads K] [--check] [--quiet]\n",
                   argv[0]);
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  if (s.steps < 1 || s.layers < 1 || s.width < 1 || s.tokens < 1 || !(s.lr > 0)) {
    std::fprintf(stderr, "steps, layers, width, tokens and lr must be positive\n");
    return 2;
  }
#ifdef _OPENMP
  // 32 tokens per step is too little work to split over threads (results are identical anyway).
  omp_set_num_threads(std::max(1, s.threads));
#endif
  std::printf("train_stack: %d blocks of C = %ld, %ld tokens/step, %d steps, Adam lr %g, seed %u\n",
              s.layers, long(s.width), long(s.tokens), s.steps, s.lr, s.seed);
  std::vector<RunResult> runs;
  const std::string list = "," + s.variants + ",";
  auto wanted = [&](const char* name) { return list.find("," + std::string(name) + ",") != std::string::npos; };
  if (wanted("residual")) runs.push_back(train<1, mhc::ResidualVariant>("residual", s));
  if (wanted("HC")) runs.push_back(train<4, mhc::HcVariant>("HC", s));
  if (wanted("mHC")) runs.push_back(train<4, mhc::MhcVariant>("mHC", s));
  if (wanted("mHC-lite")) runs.push_back(train<4, mhc::MhcLiteVariant>("mHC-lite", s));
  if (runs.empty()) {
    std::fprintf(stderr, "--variants: none of residual, HC, mHC, mHC-lite in '%s'\n", s.variants.c_str());
    return 2;
  }

  std::printf("\n%-9s %10s %14s %14s %12s %12s %12s %8s\n", "variant", "final loss",
              "fwd gain end", "bwd gain end", "max fwd gain", "max|row-1|", "max|col-1|", "ms/step");
  for (const auto& r : runs) {
    std::printf("%-9s %10.4f %14.4g %14.4g %12.4g %12.3g %12.3g %8.2f", r.name.c_str(), r.final_loss,
                r.final_fwd, r.final_bwd, r.max_fwd, r.max_ds_row, r.max_ds_col, r.ms_per_step);
    if (r.diverged_at > 0) std::printf("   diverged at step %d", r.diverged_at);
    std::printf("\n");
  }
  const std::string csv = s.out_dir + "/train_stack.csv", svg = s.out_dir + "/train_stack.svg";
  try {
    std::filesystem::create_directories(s.out_dir);
    write_csv(csv, runs);
    write_svg(svg, runs, s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_stack: %s\n", e.what());
    return 1;
  }
  std::printf("\nwrote %s and %s\n", csv.c_str(), svg.c_str());
  if (s.check) {
    bool ok = true;
    for (const auto& r : runs) {
      if (r.diverged_at > 0 || !std::isfinite(r.final_loss)) ok = false;
      if (r.name == "mHC" && std::abs(r.max_fwd - 1.0) > 1e-3) ok = false;
      if (r.name == "HC" && r.max_fwd < 100.0) ok = false;
    }
    std::printf("check: %s\n", ok ? "passed" : "FAILED");
    if (!ok) return 3;
  }
  return 0;
}
