// Python bindings: matrix products straight from GGML blocks, their dequantization, and the small
// per-token operations (attention.cpp).
//
//   matmul(x [..., K] f32, [w uint8 [N_i, row bytes], ...], type, K, int8) -> [y_i [..., N_i] f32]
//       Several matrices of one type that read the same x (q/k/v, gate/up) in one pass: x is
//       quantized once (int8=True and the type has an integer path) and one thread pool covers all
//       their rows. Each weight row is read once for every row of x.
//   dequant_matmul(x, [w, ...], type, K) -> [y_i]: the same products through float32 tiles of the
//       matrices and BLAS (float32 prompts of more than a few rows).
//   dequantize(w, type, K) -> float32 [N, K], bit-identical to gguf-py.
//   block_decode(h, ...) -> one transformer block for one token of one sequence (block.cpp).
//   block_rows(h, ...) -> one transformer block for one-token rows in their own cache slots (block.cpp).
//   lora_add_(y, x, [A_i], [B_i^T], idx, scaling): y += each row's own adapter update (lora.cpp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common.h"

namespace lf {
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               c10::optional<torch::Tensor> rows);
torch::Tensor quantize_q8_0(torch::Tensor x);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor block_decode(torch::Tensor h, std::vector<torch::Tensor> w, std::vector<int64_t> types, bool int8,
                           torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps, torch::Tensor cos,
                           torch::Tensor sin, std::vector<torch::Tensor> kv);
torch::Tensor block_rows(torch::Tensor h, std::vector<torch::Tensor> w, std::vector<int64_t> types, bool int8,
                         torch::Tensor attn_norm, torch::Tensor ffn_norm, double eps, torch::Tensor cos,
                         torch::Tensor sin, torch::Tensor kc, torch::Tensor vc, torch::Tensor slots,
                         torch::Tensor pos, torch::Tensor mask, std::vector<std::vector<torch::Tensor>> lora_a,
                         std::vector<std::vector<torch::Tensor>> lora_bt, std::vector<torch::Tensor> lora_scaling,
                         c10::optional<torch::Tensor> lora_rows);
void lora_add_(torch::Tensor y, torch::Tensor x, std::vector<torch::Tensor> a, std::vector<torch::Tensor> bt,
               torch::Tensor idx, torch::Tensor scaling);
}

namespace {
using namespace lf;

TypeInfo checked(const torch::Tensor& w, int64_t type, int64_t K) {
  const TypeInfo ti = type_info(type);
  TORCH_CHECK(ti.block > 0, "unsupported GGML type id ", type);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.stride(1) == 1,
              "blocks must be a uint8 matrix [rows, bytes per row] with contiguous rows");
  TORCH_CHECK(K > 0 && K % ti.block == 0 && w.size(1) == K / ti.block * ti.bytes,
              "blocks of ", w.size(1), " bytes per row do not hold ", K, " weights");
  TORCH_CHECK(w.device().is_cpu(), "GGML block kernels run on the CPU");
  return ti;
}

// f(n0, n1) over [0, total) on the thread pool. Large calls hand the range out in chunks (of at
// least `unit`) from a shared counter instead of splitting it evenly up front: on a VM one core can
// stall or get less memory bandwidth for a while, and with a fixed split the other then waits at
// the barrier (perf, Llama-2-7B-shaped Q4_K_M decode at 2 threads: 9% of samples spinning in
// libgomp; in-process A/B of whole decode steps, 7B Q4_0 and Q4_K_M: 1.09x). Small calls keep the
// even split: there the counter's cache line moving between cores costs more than it balances
// (bundled 135M decode, 960-row q/k/v of 0.3 MB: 0.95-0.97x with eight chunks per thread; a 2 MB
// threshold, which takes 1.1B's q/k/v and down projections in, measured 0.94-0.96x there).
// Which rows a call computes never changes their values, so results do not depend on the schedule.
template <class F>
void balanced_for(int64_t total, int64_t grain, int64_t unit, bool dynamic, const F& f) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), (total + grain - 1) / grain);
  if (!dynamic || nt <= 1 || at::in_parallel_region()) {
    at::parallel_for(0, total, grain, f);
    return;
  }
  const int64_t chunk = std::max(unit, total / (nt * 8));   // the last chunk claimed stays small
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    for (int64_t n0; (n0 = next.fetch_add(chunk, std::memory_order_relaxed)) < total;)
      f(n0, std::min(total, n0 + chunk));
  });
}

}  // namespace

namespace lf {
std::vector<torch::Tensor> ggml_matmul(torch::Tensor x, std::vector<torch::Tensor> ws, int64_t type, int64_t K,
                                       bool int8) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && x.scalar_type() == torch::kFloat32,
              "x must be float32 [..., ", K, "]");
  TORCH_CHECK(!ws.empty(), "matmul needs at least one weight matrix");
  x = x.contiguous();
  for (auto& w : ws) checked(w, type, K);
  const int64_t M = x.numel() / K, T = int64_t(ws.size());
  const float* X = x.data_ptr<float>();
  int8 = int8 && act_kind(type) != 0 && has_int8_path();

  std::vector<int64_t> start(T + 1, 0);   // global row index of each matrix's first row
  std::vector<const uint8_t*> W(T);
  std::vector<int64_t> stride(T);
  std::vector<float*> Y(T);
  std::vector<torch::Tensor> ys;
  for (int64_t i = 0; i < T; ++i) {
    auto shape = x.sizes().vec();
    shape.back() = ws[i].size(0);
    ys.push_back(torch::empty(shape, x.options()));
    start[i + 1] = start[i] + ws[i].size(0);
    W[i] = ws[i].data_ptr<uint8_t>();
    stride[i] = ws[i].stride(0);
    Y[i] = ys[i].data_ptr<float>();
  }
  if (M == 0) return ys;
  std::vector<uint8_t> xq;
  const int64_t xs = int8 ? act_row_bytes(type, K) : 0;
  if (int8) {
    xq.resize(M * xs);
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) quantize_act_row(type, X + m * K, xq.data() + m * xs, K);
    });
  }
  const bool fast_f32 = !int8 && has_fast_f32(type);
  // Prompts (more than TILE_MIN_ROWS rows) on 16-row tiles (tiles.cpp): 2-3x the one-row kernels'
  // speed there. Up to TILE_MIN_ROWS rows (decode, batched decode of up to 16 sequences) the
  // one-row kernels are as fast or faster (Zen 4 splits the tiles' 512-bit shuffles in two), and
  // they keep a decoded row's result independent of how many sequences share the step.
  constexpr int64_t TILE_MIN_ROWS = 16;
  const bool tiled = int8 && M > TILE_MIN_ROWS && has_tile16(type);
  std::vector<int64_t> unit_start(T + 1, 0), unit_matrix;   // tiled: units of 16 rows per matrix
  if (tiled) {
    for (int64_t i = 0; i < T; ++i) {
      unit_start[i + 1] = unit_start[i] + (start[i + 1] - start[i] + 15) / 16;
      unit_matrix.resize(unit_start[i + 1], i);
    }
  }
  const int64_t grain = std::max<int64_t>(tiled ? 1 : 4, (int64_t(1) << 17) / std::max<int64_t>(1, K * M * (tiled ? 16 : 1)));
  int64_t weight_bytes = 0;
  for (const auto& w : ws) weight_bytes += w.size(0) * w.size(1);
  const bool dynamic = weight_bytes * M >= (int64_t(8) << 20);
  balanced_for(tiled ? unit_start[T] : start[T], grain, tiled ? 1 : 4, dynamic, [&](int64_t n0, int64_t n1) {
    float buf[256], out[4];
    // units fixed by the matrices' shapes (whole tiles, and each matrix's tail of N % 16 rows on
    // the one-row kernel): which kernel computes an output never depends on the thread split
    if (tiled) {
      thread_local std::vector<uint8_t> scratch;   // kept: a fresh buffer per call would fault pages in
      if (int64_t(scratch.size()) < tile16_scratch_bytes(K)) scratch.resize(tile16_scratch_bytes(K));
      for (int64_t u = n0; u < n1; ++u) {
        const int64_t j = unit_matrix[u], row = 16 * (u - unit_start[j]), N = start[j + 1] - start[j];
        if (row + 16 <= N) {
          tile16_matmul(type, W[j] + row * stride[j], stride[j], K, xq.data(), xs, M, Y[j] + row, N, scratch.data());
          continue;
        }
        for (int64_t m = 0; m < M; m += 4) {
          qdot_range(type, W[j] + row * stride[j], stride[j], N - row, xq.data() + m * xs, xs,
                     int(std::min<int64_t>(4, M - m)), K, Y[j] + m * N + row, N);
        }
      }
      return;
    }
    int64_t i = 0;
    while (start[i + 1] <= n0) ++i;
    if (fast_f32) {   // float32 Q4_0/Q4_1/Q8_0: one call per matrix's share of the range
      for (int64_t n = n0; n < n1; n = std::min(n1, start[++i])) {
        const int64_t row = n - start[i], N = start[i + 1] - start[i];
        fdot_range(type, W[i] + row * stride[i], stride[i], std::min(n1, start[i + 1]) - n, X, M, K, Y[i] + row, N);
      }
      return;
    }
    // Groups of NT weight rows: each group of 4 x rows is read for every row of the group while it
    // is in L1 (a 4-row q8 group of K = 4096 is 20 KiB), instead of streaming all of x from L2
    // once per weight row (measured 4096x4096, one thread, 8-bit path: Q4_0 1.21x at 16 rows, 1.10x
    // at 128)
    constexpr int64_t NT = 8;
    if (int8) {
      for (int64_t n = n0; n < n1; n = std::min(n1, start[++i])) {
        const int64_t row = n - start[i], N = start[i + 1] - start[i], count = std::min(n1, start[i + 1]) - n;
        const uint8_t* w = W[i] + row * stride[i];
        const int64_t group = M <= 4 ? count : NT;   // decode (one group of x rows): one call per share
        for (int64_t t = 0; t < count; t += group) {
          for (int64_t m = 0; m < M; m += 4) {
            qdot_range(type, w + t * stride[i], stride[i], std::min(group, count - t), xq.data() + m * xs, xs,
                       int(std::min<int64_t>(4, M - m)), K, Y[i] + m * N + row + t, N);
          }
        }
      }
      return;
    }
    for (int64_t t0 = n0; t0 < n1; t0 += NT) {
      const int64_t t1 = std::min(n1, t0 + NT);
      for (int64_t m = 0; m < M; m += 4) {
        int64_t j = i;
        for (int64_t n = t0; n < t1; ++n) {
          while (n >= start[j + 1]) ++j;
          const int R = int(std::min<int64_t>(4, M - m));
          const int64_t row = n - start[j], N = start[j + 1] - start[j];
          fdot_rows(type, W[j] + row * stride[j], X + m * K, K, R, K, out, buf);
          for (int r = 0; r < R; ++r) Y[j][(m + r) * N + row] = out[r];
        }
      }
      while (t1 < n1 && t1 >= start[i + 1]) ++i;
    }
  });
  return ys;
}
}  // namespace lf

// MKL's (or OpenBLAS's) Fortran sgemm, which torch's CPU library exports: called straight for the
// tiles of dequant_matmul, as at::mm_out's tensor wrapping and dispatch cost a few microseconds
// per call, ~10% of a 20-token forward of the bundled model's blocks at one thread (930 tiles).
// Weak: a torch without it leaves the pointer null and the tiles go through at::mm_out.
extern "C" __attribute__((weak)) void sgemm_(const char* ta, const char* tb, const int* m, const int* n,
                                             const int* k, const float* alpha, const float* a, const int* lda,
                                             const float* b, const int* ldb, const float* beta, float* c,
                                             const int* ldc);

namespace {
using namespace lf;

torch::Tensor ggml_dequantize(torch::Tensor w, int64_t type, int64_t K) {
  checked(w, type, K);
  const int64_t N = w.size(0);
  auto out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  const uint8_t* W = w.data_ptr<uint8_t>();
  const int64_t rs = w.stride(0);
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) dequant_row(type, W + n * rs, O + n * K, K);
  });
  return out;
}

// Many rows of float32 x (a prompt) against several matrices: each thread dequantizes a tile of
// weight rows (~256 KiB of float32, so it stays in L2) into its own buffer and multiplies it with
// all of x by a one-threaded BLAS call. Dequantizing whole matrices into one shared buffer for a
// multi-threaded BLAS call instead (the form before) wrote and re-read every matrix through memory
// and held a float32 copy of the largest one (the bundled model's 49,152-row vocabulary: 113 MB);
// bundled 135M, whole prompt forwards at 2 threads, in-process A/B: 1.20x at 48 tokens, 1.14x at
// 80, 1.09-1.11x at 128-256, 1.13-1.23x at 384, 1.00x at 512; the same bits (test_native.py).
std::vector<torch::Tensor> dequant_matmul(torch::Tensor x, std::vector<torch::Tensor> ws, int64_t type, int64_t K) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && x.scalar_type() == torch::kFloat32,
              "x must be float32 [..., ", K, "]");
  TORCH_CHECK(!ws.empty(), "dequant_matmul needs at least one weight matrix");
  const int64_t tile = std::max<int64_t>(16, std::min<int64_t>(128, (int64_t(1) << 16) / K / 16 * 16));
  x = x.contiguous();
  for (auto& w : ws) checked(w, type, K);
  const int64_t M = x.numel() / K, T = int64_t(ws.size());
  std::vector<int64_t> unit_start(T + 1, 0);
  std::vector<torch::Tensor> ys;
  for (int64_t i = 0; i < T; ++i) {
    auto shape = x.sizes().vec();
    shape.back() = ws[i].size(0);
    ys.push_back(torch::empty(shape, x.options()));
    unit_start[i + 1] = unit_start[i] + (ws[i].size(0) + tile - 1) / tile;
  }
  if (M == 0) return ys;
  const auto xm = x.view({M, K});
  std::vector<torch::Tensor> flat;
  for (auto& y : ys) flat.push_back(y.view({M, y.size(-1)}));
  at::parallel_for(0, unit_start[T], 1, [&](int64_t u0, int64_t u1) {
    // the pool's threads do not inherit the caller's inference mode, and the outputs may be
    // inference tensors (written in place here)
    c10::InferenceMode inference;
    thread_local std::vector<float> buf;
    if (int64_t(buf.size()) < tile * K) buf.resize(tile * K);
    for (int64_t u = u0; u < u1; ++u) {
      int64_t i = 0;
      while (unit_start[i + 1] <= u) ++i;
      const int64_t N = ws[i].size(0), row = (u - unit_start[i]) * tile, n = std::min(tile, N - row);
      const int64_t rs = ws[i].stride(0);
      const uint8_t* W = ws[i].data_ptr<uint8_t>() + row * rs;
      for (int64_t r = 0; r < n; ++r) dequant_row(type, W + r * rs, buf.data() + r * K, K);
      if (sgemm_ != nullptr && std::max({M, K, ws[i].size(0)}) < (int64_t(1) << 30)) {
        // column-major: y^T[row:row + n, :] = tile (n x K) . x^T (K x M), leading dimension N
        const int m = int(n), nn = int(M), k = int(K), lda = int(K), ldb = int(K), ldc = int(N);
        const float one = 1.0f, zero = 0.0f;
        sgemm_("T", "N", &m, &nn, &k, &one, buf.data(), &lda, xm.data_ptr<float>(), &ldb, &zero,
               flat[i].data_ptr<float>() + row, &ldc);
      } else {
        auto out = flat[i].narrow(1, row, n);   // y[:, row:row + n], written in place by BLAS
        at::mm_out(out, xm, torch::from_blob(buf.data(), {n, K}, torch::kFloat32).t());
      }
    }
  });
  return ys;
}

std::string isa() {
#if defined(LF_AVX512) && defined(LF_VNNI)
  return "avx512+vnni";
#elif defined(LF_AVX512)
  return "avx512";
#elif defined(LF_VNNI)
  return "avx2+vnni";
#elif defined(LF_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &ggml_matmul, "[x @ dequant(w).T for each w] from GGML blocks",
        py::arg("x"), py::arg("ws"), py::arg("type"), py::arg("K"), py::arg("int8") = true);
  m.def("dequantize", &ggml_dequantize, "float32 matrix of GGML blocks", py::arg("w"), py::arg("type"), py::arg("K"));
  m.def("dequant_matmul", &dequant_matmul, "[x @ dequant(w).T for each w], dequantized a tile of rows at a time",
        py::arg("x"), py::arg("ws"), py::arg("type"), py::arg("K"));
  m.def("decode_attention", &lf::decode_attention, "softmax(q k^T / sqrt(Hd)) v for one query per row, GQA",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask") = py::none(), py::arg("rows") = py::none());
  m.def("quantize_q8_0", &lf::quantize_q8_0, "GGML Q8_0 blocks of float32 rows (llama.cpp's reference rounding)");
  m.def("rope", &lf::rope, "rotary position embedding of interleaved pairs");
  m.def("rms_norm", &lf::rms_norm, "RMSNorm in float32");
  m.def("block_decode", &lf::block_decode, "one transformer block for one token of one sequence (block.cpp)",
        py::arg("h"), py::arg("w"), py::arg("types"), py::arg("int8"), py::arg("attn_norm"), py::arg("ffn_norm"),
        py::arg("eps"), py::arg("cos"), py::arg("sin"), py::arg("kv"));
  m.def("block_rows", &lf::block_rows, "one transformer block for one-token rows in their own cache slots (block.cpp)",
        py::arg("h"), py::arg("w"), py::arg("types"), py::arg("int8"), py::arg("attn_norm"), py::arg("ffn_norm"),
        py::arg("eps"), py::arg("cos"), py::arg("sin"), py::arg("kc"), py::arg("vc"), py::arg("slots"),
        py::arg("pos"), py::arg("mask"), py::arg("lora_a") = std::vector<std::vector<torch::Tensor>>(),
        py::arg("lora_bt") = std::vector<std::vector<torch::Tensor>>(),
        py::arg("lora_scaling") = std::vector<torch::Tensor>(), py::arg("lora_rows") = py::none());
  m.def("lora_add_", &lf::lora_add_, "y += each row's own low-rank adapter update, each row alone (lora.cpp)",
        py::arg("y"), py::arg("x"), py::arg("a"), py::arg("bt"), py::arg("idx"), py::arg("scaling"));
  m.def("isa", &isa, "instruction set the kernels were built for");
  m.def("int8_path", &has_int8_path, "whether the 8-bit activation dot products are built");
}
