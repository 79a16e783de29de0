// Projects a batch of random 4 x 4 logit matrices onto the doubly stochastic matrices, prints
// one of them with its row and column sums, and shows how t_max trades accuracy for time.
#include <mhc/sinkhorn.hpp>

#include <cstdio>
#include <random>

int main() {
  const mhc::Index T = 4096;  // tokens
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  mhc::RowMatrix<float> logits(T, 16), H(T, 16);
  for (mhc::Index k = 0; k < logits.size(); ++k) logits.data()[k] = normal(rng);

  mhc::SinkhornReport report;
  mhc::Sinkhorn4f::forward(logits, H, {20}, &report);
  const Eigen::Map<const Eigen::Matrix<float, 4, 4, Eigen::RowMajor>> H0(H.row(0).data());
  std::printf("H_res of token 0 (t_max = 20):\n");
  for (int i = 0; i < 4; ++i)
    std::printf("  %.4f %.4f %.4f %.4f   row sum %.6f\n", H0(i, 0), H0(i, 1), H0(i, 2), H0(i, 3),
                H0.row(i).sum());
  std::printf("  column sums: %.6f %.6f %.6f %.6f\n\n", H0.col(0).sum(), H0.col(1).sum(),
              H0.col(2).sum(), H0.col(3).sum());

  std::printf("%8s  %22s  %22s\n", "t_max", "max |column sum - 1|", "max |row sum - 1|");
  for (int t_max : {1, 2, 5, 10, 20, 50}) {
    mhc::Sinkhorn4f::forward(logits, H, {t_max}, &report);
    std::printf("%8d  %22.3e  %22.3e\n", t_max, report.max_column_error, report.max_row_error);
  }

  // Backward: dL/dlogits for L = sum(G * H), the exact gradient of the 20-step map.
  mhc::RowMatrix<float> G = mhc::RowMatrix<float>::Ones(T, 16), d_logits(T, 16);
  G.col(0).setConstant(2.0f);
  mhc::Sinkhorn4f::backward(logits, G, d_logits);
  std::printf("\ndL/dlogits of token 0, first row: %.5f %.5f %.5f %.5f\n", d_logits(0, 0),
              d_logits(0, 1), d_logits(0, 2), d_logits(0, 3));
  return 0;
}
