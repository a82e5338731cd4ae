// Low-rank adapter updates computed row by row (lora.py, multilora.py): y_m += s_i * B_i (A_i x_m)
// with i = idx[m], no update where idx[m] < 0. Every row is computed alone, in a fixed order, so
// a row's update never depends on which other rows share the batch: a request decodes the same
// tokens alone (one adapter) and in a batch of rows that each use a different adapter.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace lf {
namespace {
// sixteen partial sums in a fixed order (vectorized by the compiler without reassociating)
inline float dot_fixed(const float* a, const float* b, int64_t n) {
  float acc[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[k + l] * b[k + l];
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}
}  // namespace

// y [M, out] += the update of each row: y[m] += scaling[i] * (BT_i^T (A_i x[m])) with i = idx[m] (none
// where idx[m] < 0). x [M, in] float32; a[i] [r_i, in] and bt[i] [r_i, out] float32 (adapter i's
// factors, B transposed so the second product runs along contiguous outputs); idx [M] int64;
// scaling [n] float32. Each output's sum runs over j = 0..r-1 in order, whatever the other rows.
void lora_add_(torch::Tensor y, torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> bt,
               torch::Tensor idx, torch::Tensor scaling) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "lora_add_: x must be float32 [M, in]");
  TORCH_CHECK(!a.empty() && a.size() == bt.size() && scaling.numel() == int64_t(a.size()) &&
                  scaling.scalar_type() == torch::kFloat32,
              "lora_add_: one A, one B and one scaling per adapter");
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == x.size(0) && idx.scalar_type() == torch::kLong,
              "lora_add_: idx must be int64 [M]");
  x = x.contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = bt[0].size(1), n = int64_t(a.size());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) == out && y.is_contiguous() &&
                  y.scalar_type() == torch::kFloat32,
              "lora_add_: y must be contiguous float32 [M, out]");
  for (int64_t i = 0; i < n; ++i) {
    a[i] = a[i].contiguous();
    bt[i] = bt[i].contiguous();
    TORCH_CHECK(a[i].dim() == 2 && a[i].size(1) == in && a[i].scalar_type() == torch::kFloat32 && bt[i].dim() == 2 &&
                    bt[i].size(1) == out && bt[i].size(0) == a[i].size(0) && bt[i].scalar_type() == torch::kFloat32,
                "lora_add_: adapter ", i, " has factors of the wrong shape or type");
  }
  auto sc = scaling.contiguous();
  auto ix = idx.contiguous();
  const int64_t* I = ix.data_ptr<int64_t>();
  const float* X = x.data_ptr<float>();
  const float* S = sc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(I[m] < n, "lora_add_: adapter index ", I[m], " out of range");
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> t, acc(out);
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t i = I[m];
      if (i < 0) continue;
      const int64_t r = a[i].size(0);
      if (r == 0) continue;    // an adapter that does not target this projection: no update
      const float* A = a[i].data_ptr<float>();
      const float* BT = bt[i].data_ptr<float>();
      t.resize(r);
      for (int64_t j = 0; j < r; ++j) t[j] = dot_fixed(X + m * in, A + j * in, in);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < r; ++j) {
        const float tj = t[j];
        const float* row = BT + j * out;
        for (int64_t o = 0; o < out; ++o) acc[o] += tj * row[o];
      }
      float* ym = Y + m * out;
      for (int64_t o = 0; o < out; ++o) ym[o] += S[i] * acc[o];
    }
  });
}
}  // namespace lf
