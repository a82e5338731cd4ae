// Low-rank adapter updates computed row by row (lora.py, multilora.py): delta_m = s_i * B_i (A_i x_m)
// with i = idx[m], no update where idx[m] < 0. Every row is computed alone, in a fixed order, so
// a row's update never depends on which other rows share the batch: a request decodes the same
// tokens alone (one adapter) and in a batch of rows that each use a different adapter.
#include <torch/extension.h>
#include <ATen/Parallel.h>

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

// x [M, in] float32; a[i] [r_i, in], b[i] [out, r_i] float32 (adapter i's factors); idx [M] int64;
// scaling [n] float32. Returns delta [M, out].
torch::Tensor lora_delta(torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> b, torch::Tensor idx,
                         torch::Tensor scaling) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "lora_delta: x must be float32 [M, in]");
  TORCH_CHECK(!a.empty() && a.size() == b.size() && scaling.numel() == int64_t(a.size()) &&
                  scaling.scalar_type() == torch::kFloat32,
              "lora_delta: one A, one B and one scaling per adapter");
  TORCH_CHECK(idx.dim() == 1 && idx.size(0) == x.size(0) && idx.scalar_type() == torch::kLong,
              "lora_delta: idx must be int64 [M]");
  x = x.contiguous();
  const int64_t M = x.size(0), in = x.size(1), out = b[0].size(0), n = int64_t(a.size());
  for (int64_t i = 0; i < n; ++i) {
    a[i] = a[i].contiguous();
    b[i] = b[i].contiguous();
    TORCH_CHECK(a[i].dim() == 2 && a[i].size(1) == in && a[i].scalar_type() == torch::kFloat32 && b[i].dim() == 2 &&
                    b[i].size(0) == out && b[i].size(1) == a[i].size(0) && b[i].scalar_type() == torch::kFloat32,
                "lora_delta: adapter ", i, " has factors of the wrong shape or type");
  }
  auto y = torch::zeros({M, out}, x.options());
  auto sc = scaling.contiguous();
  const int64_t* I = idx.contiguous().data_ptr<int64_t>();
  const float* X = x.data_ptr<float>();
  const float* S = sc.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(I[m] < n, "lora_delta: adapter index ", I[m], " out of range");
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> t;
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t i = I[m];
      if (i < 0) continue;
      const int64_t r = a[i].size(0);
      if (r == 0) continue;    // an adapter that does not target this projection: no update
      const float* A = a[i].data_ptr<float>();
      const float* B = b[i].data_ptr<float>();
      t.resize(r);
      for (int64_t j = 0; j < r; ++j) t[j] = dot_fixed(X + m * in, A + j * in, in);
      for (int64_t o = 0; o < out; ++o) Y[m * out + o] = S[i] * dot_fixed(B + o * r, t.data(), r);
    }
  });
  return y;
}
}  // namespace lf
