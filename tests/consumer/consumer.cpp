// A downstream program: projects a batch of logits and checks the rows of the result.
#include <mhc/sinkhorn.hpp>

#include <cmath>
#include <cstdio>

int main() {
  mhc::RowMatrix<float> logits(3, 16), out(3, 16);
  for (int k = 0; k < logits.size(); ++k) logits.data()[k] = std::sin(0.7f * k);
  mhc::Sinkhorn<float, 4>::forward(logits, out);
  for (int t = 0; t < 3; ++t)
    for (int i = 0; i < 4; ++i) {
      const float row = out.row(t).segment(4 * i, 4).sum();
      if (std::fabs(row - 1.0f) > 1e-5f) {
        std::printf("row %d of matrix %d sums to %g\n", i, t, row);
        return 1;
      }
    }
  std::printf("consumer: ok\n");
  return 0;
}
