// llamaforge's CPU kernels: matrix products straight from GGML blocks (Q4_0, Q4_1, Q8_0) as a GGUF
// file stores them, and the two small per-token operations that dominate a decode step once the
// matrix products are fast: attention of one query per row over the KV cache, and RMSNorm.
//
// Activations stay float32 and every product accumulates in float32, so a quantized model computes
// with exactly the weights the file defines (no requantization, no bfloat16 rounding of the
// activations): only the order of the additions differs from multiplying by the dequantized matrix.
//
//   ggml_matmul(x [M, K] f32, w uint8 [N, K/32 * block bytes], type, K) -> y [M, N] f32
//       y[m, n] = sum over blocks g of  d_g * (codes_g . x[m, g]) + offset_g * sum(x[m, g])
//       For small M (decode): each weight block is read once and used for every row of x.
//   ggml_dequantize(w, type, K) -> float32 [N, K], exactly as gguf-py's numpy dequantization
//       (for large M it is faster to dequantize once and call the BLAS matmul).
//
// Block layouts (ggml-common.h): Q4_0 {f16 d; u8 qs[16]}  w = d * (nibble - 8)
//                                Q4_1 {f16 d; f16 m; u8 qs[16]}  w = d * nibble + m
//                                Q8_0 {f16 d; i8 qs[32]}  w = d * q
// In both 4-bit types the low nibbles hold weights 0..15 of the block and the high nibbles 16..31.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define LF_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LF_AVX2 1
#endif



// blocks of work per thread below which a matrix is not split (fork and join cost a few microseconds)
#define LF_GRAIN 4096
namespace {

constexpr int64_t QK = 32;
// GGML's own type numbers; +100: the same blocks with float32 scales (see to_f32_scales)
enum GGMLType : int64_t { Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, F32S = 100 };

inline float half_to_float(uint16_t h) {
#if defined(LF_AVX512) || defined(LF_AVX2)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}
inline float to_f32(uint16_t h) { return half_to_float(h); }
inline float to_f32(float f) { return f; }

// S: the scale type, uint16_t (float16, the file's layout) or float (converted once at load, which
// saves the per-block conversions in the decode loop)
template <typename S> struct BQ4_0 { S d; uint8_t qs[16]; };
template <typename S> struct BQ4_1 { S d; S m; uint8_t qs[16]; };
template <typename S> struct BQ8_0 { S d; int8_t qs[32]; };
using BlockQ4_0 = BQ4_0<uint16_t>;
using BlockQ4_1 = BQ4_1<uint16_t>;
using BlockQ8_0 = BQ8_0<uint16_t>;
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34,
              "GGML block sizes");
static_assert(sizeof(BQ4_0<float>) == 20 && sizeof(BQ4_1<float>) == 24 && sizeof(BQ8_0<float>) == 36,
              "float-scale block sizes");

// Per type: the 32 codes as floats, the scale d and the offset added per weight (w = d * code + offset).
template <typename B> struct Block;

template <typename S> struct Block<BQ4_0<S>> {
  static constexpr bool has_offset = false;
  static float scale(const BQ4_0<S>& b) { return to_f32(b.d); }
  static float offset(const BQ4_0<S>&) { return 0.f; }
  static void codes(const BQ4_0<S>& b, float* q) {
    for (int j = 0; j < 16; ++j) { q[j] = float((b.qs[j] & 15) - 8); q[j + 16] = float((b.qs[j] >> 4) - 8); }
  }
#ifdef LF_AVX512
  static void codes(const BQ4_0<S>& b, __m512& lo, __m512& hi) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs)));
    const __m512i eight = _mm512_set1_epi32(8);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(v, _mm512_set1_epi32(15)), eight));
    hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(v, 4), eight));
  }
#endif
};

template <typename S> struct Block<BQ4_1<S>> {
  static constexpr bool has_offset = true;
  static float scale(const BQ4_1<S>& b) { return to_f32(b.d); }
  static float offset(const BQ4_1<S>& b) { return to_f32(b.m); }
  static void codes(const BQ4_1<S>& b, float* q) {
    for (int j = 0; j < 16; ++j) { q[j] = float(b.qs[j] & 15); q[j + 16] = float(b.qs[j] >> 4); }
  }
#ifdef LF_AVX512
  static void codes(const BQ4_1<S>& b, __m512& lo, __m512& hi) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
#endif
};

template <typename S> struct Block<BQ8_0<S>> {
  static constexpr bool has_offset = false;
  static float scale(const BQ8_0<S>& b) { return to_f32(b.d); }
  static float offset(const BQ8_0<S>&) { return 0.f; }
  static void codes(const BQ8_0<S>& b, float* q) {
    for (int j = 0; j < 32; ++j) q[j] = float(b.qs[j]);
  }
#ifdef LF_AVX512
  static void codes(const BQ8_0<S>& b, __m512& lo, __m512& hi) {
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs))));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs + 16))));
  }
#endif
};

// R rows of x against one weight row of nb blocks: out[r] = w . x[r].
// xs holds the per-block sums of x (only read by types with an offset).
template <typename B, int R>
inline void dot_rows(const B* w, int64_t nb, const float* x, int64_t ldx, const float* xs, int64_t ldxs,
                     float* out) {
  float off[R];
  for (int r = 0; r < R; ++r) off[r] = 0.f;
#ifdef LF_AVX512
  // two accumulators per row (even and odd blocks): the FMA chain of one would bound the loop
  __m512 acc[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
  int64_t g = 0;
  auto block = [&](int64_t g, int a) {
    __m512 lo, hi;
    Block<B>::codes(w[g], lo, hi);
    const __m512 d = _mm512_set1_ps(Block<B>::scale(w[g]));
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * QK;
      __m512 t = _mm512_mul_ps(lo, _mm512_loadu_ps(xr));
      t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), t);
      acc[a][r] = _mm512_fmadd_ps(t, d, acc[a][r]);
    }
    if (Block<B>::has_offset) {
      const float o = Block<B>::offset(w[g]);
      for (int r = 0; r < R; ++r) off[r] += o * xs[r * ldxs + g];
    }
  };
  for (; g + 2 <= nb; g += 2) { block(g, 0); block(g + 1, 1); }
  if (g < nb) block(g, 0);
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r])) + off[r];
#else
  // portable path: 8 partial sums per row, which compilers vectorise on AVX2 / NEON
  float acc[R][8];
  for (int r = 0; r < R; ++r) for (int l = 0; l < 8; ++l) acc[r][l] = 0.f;
  float q[QK];
  for (int64_t g = 0; g < nb; ++g) {
    Block<B>::codes(w[g], q);
    const float d = Block<B>::scale(w[g]);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * QK;
      float t[8];
      for (int l = 0; l < 8; ++l) t[l] = q[l] * xr[l] + q[l + 8] * xr[l + 8] + q[l + 16] * xr[l + 16] + q[l + 24] * xr[l + 24];
      for (int l = 0; l < 8; ++l) acc[r][l] += t[l] * d;
    }
    if (Block<B>::has_offset) {
      const float o = Block<B>::offset(w[g]);
      for (int r = 0; r < R; ++r) off[r] += o * xs[r * ldxs + g];
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += acc[r][l];
    out[r] = s + off[r];
  }
#endif
}

template <typename B>
torch::Tensor matmul_impl(const torch::Tensor& x, const torch::Tensor& w, int64_t K) {
  const int64_t M = x.numel() / K, N = w.size(0), nb = K / QK;
  const float* X = x.data_ptr<float>();
  const uint8_t* W = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.stride(0);
  // per-block sums of x, for the offset of Q4_1 (one pass over x, shared by every weight row)
  std::vector<float> xs(Block<B>::has_offset ? M * nb : 0);
  if (Block<B>::has_offset) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < nb; ++g) {
        float s = 0.f;
        for (int64_t j = 0; j < QK; ++j) s += X[m * K + g * QK + j];
        xs[m * nb + g] = s;
      }
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = torch::empty(shape, x.options());
  float* Y = y.data_ptr<float>();
  const float* XS = xs.data();
  const int64_t grain = std::max<int64_t>(16, LF_GRAIN / std::max<int64_t>(1, nb * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    float out[4];
    for (int64_t n = n0; n < n1; ++n) {
      const B* wr = reinterpret_cast<const B*>(W + n * row_bytes);
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        dot_rows<B, 4>(wr, nb, X + m * K, K, XS + m * nb, nb, out);
        for (int r = 0; r < 4; ++r) Y[(m + r) * N + n] = out[r];
      }
      switch (M - m) {
        case 3: dot_rows<B, 3>(wr, nb, X + m * K, K, XS + m * nb, nb, out); break;
        case 2: dot_rows<B, 2>(wr, nb, X + m * K, K, XS + m * nb, nb, out); break;
        case 1: dot_rows<B, 1>(wr, nb, X + m * K, K, XS + m * nb, nb, out); break;
        default: break;
      }
      for (int64_t r = 0; r < M - m; ++r) Y[(m + r) * N + n] = out[r];
    }
  });
  return y;
}

template <typename B>
torch::Tensor dequantize_impl(const torch::Tensor& w, int64_t K, c10::optional<torch::Tensor> into) {
  const int64_t N = w.size(0), nb = K / QK;
  const uint8_t* W = w.data_ptr<uint8_t>();
  const int64_t row_bytes = w.stride(0);
  torch::Tensor out;
  if (into.has_value() && into->defined()) {  // a caller's scratch buffer: no fresh pages to fault in
    TORCH_CHECK(into->scalar_type() == torch::kFloat32 && into->is_contiguous() && into->numel() >= N * K,
                "dequantize: the output buffer is too small or not contiguous float32");
    out = into->view(-1).narrow(0, 0, N * K).view({N, K});
  } else {
    out = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  }
  float* O = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / nb), [&](int64_t n0, int64_t n1) {
    float q[QK];
    for (int64_t n = n0; n < n1; ++n) {
      const B* wr = reinterpret_cast<const B*>(W + n * row_bytes);
      for (int64_t g = 0; g < nb; ++g) {
        const float d = Block<B>::scale(wr[g]), o = Block<B>::offset(wr[g]);
        float* dst = O + n * K + g * QK;
#ifdef LF_AVX512
        __m512 lo, hi;
        Block<B>::codes(wr[g], lo, hi);
        const __m512 vd = _mm512_set1_ps(d);
        lo = _mm512_mul_ps(vd, lo);
        hi = _mm512_mul_ps(vd, hi);
        if (Block<B>::has_offset) {
          lo = _mm512_add_ps(lo, _mm512_set1_ps(o));
          hi = _mm512_add_ps(hi, _mm512_set1_ps(o));
        }
        _mm512_storeu_ps(dst, lo);
        _mm512_storeu_ps(dst + 16, hi);
        continue;
#endif
        Block<B>::codes(wr[g], q);
        // d * q (+ m), two roundings as gguf-py's numpy does: built with -ffp-contract=off
        if (Block<B>::has_offset) for (int j = 0; j < QK; ++j) dst[j] = d * q[j] + o;
        else for (int j = 0; j < QK; ++j) dst[j] = d * q[j];
      }
    }
  });
  return out;
}

void check(const torch::Tensor& w, int64_t K, int64_t block_bytes) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.stride(1) == 1,
              "blocks must be a uint8 matrix [rows, bytes per row] with contiguous rows");
  TORCH_CHECK(K % QK == 0 && w.size(1) == K / QK * block_bytes,
              "blocks of ", w.size(1), " bytes per row do not hold ", K, " weights");
  TORCH_CHECK(w.device().is_cpu(), "GGML block kernels run on the CPU");
}

// Calls f with a null pointer of the block type named by `type` (after checking w's row size).
template <typename F>
auto dispatch(const torch::Tensor& w, int64_t type, int64_t K, F&& f) {
  switch (type) {
    case Q4_0: check(w, K, sizeof(BlockQ4_0)); return f(static_cast<BlockQ4_0*>(nullptr));
    case Q4_1: check(w, K, sizeof(BlockQ4_1)); return f(static_cast<BlockQ4_1*>(nullptr));
    case Q8_0: check(w, K, sizeof(BlockQ8_0)); return f(static_cast<BlockQ8_0*>(nullptr));
    case F32S + Q4_0: check(w, K, sizeof(BQ4_0<float>)); return f(static_cast<BQ4_0<float>*>(nullptr));
    case F32S + Q4_1: check(w, K, sizeof(BQ4_1<float>)); return f(static_cast<BQ4_1<float>*>(nullptr));
    case F32S + Q8_0: check(w, K, sizeof(BQ8_0<float>)); return f(static_cast<BQ8_0<float>*>(nullptr));
    default: TORCH_CHECK(false, "unsupported GGML type id ", type);
  }
}

torch::Tensor ggml_matmul(torch::Tensor x, torch::Tensor w, int64_t type, int64_t K) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && x.scalar_type() == torch::kFloat32,
              "x must be float32 [..., ", K, "]");
  x = x.contiguous();
  return dispatch(w, type, K, [&](auto* b) { return matmul_impl<std::remove_pointer_t<decltype(b)>>(x, w, K); });
}

torch::Tensor ggml_dequantize(torch::Tensor w, int64_t type, int64_t K, c10::optional<torch::Tensor> into) {
  return dispatch(w, type, K, [&](auto* b) { return dequantize_impl<std::remove_pointer_t<decltype(b)>>(w, K, into); });
}

// The same blocks with float32 scales (type + 100): d (and m) widened once, codes unchanged.
template <typename S, template <typename> class BT>
torch::Tensor widen(const torch::Tensor& w, int64_t K) {
  const int64_t N = w.size(0), nb = K / QK;
  auto out = torch::empty({N, nb * int64_t(sizeof(BT<float>))}, torch::dtype(torch::kUInt8));
  const uint8_t* W = w.data_ptr<uint8_t>();
  uint8_t* O = out.data_ptr<uint8_t>();
  const int64_t row_bytes = w.stride(0);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const BT<S>* src = reinterpret_cast<const BT<S>*>(W + n * row_bytes);
      BT<float>* dst = reinterpret_cast<BT<float>*>(O + n * nb * int64_t(sizeof(BT<float>)));
      for (int64_t g = 0; g < nb; ++g) {
        dst[g].d = to_f32(src[g].d);
        if constexpr (std::is_same<BT<S>, BQ4_1<S>>::value) dst[g].m = to_f32(src[g].m);
        std::memcpy(dst[g].qs, src[g].qs, sizeof(src[g].qs));
      }
    }
  });
  return out;
}

torch::Tensor to_f32_scales(torch::Tensor w, int64_t type, int64_t K) {
  switch (type) {
    case Q4_0: check(w, K, sizeof(BlockQ4_0)); return widen<uint16_t, BQ4_0>(w, K);
    case Q4_1: check(w, K, sizeof(BlockQ4_1)); return widen<uint16_t, BQ4_1>(w, K);
    case Q8_0: check(w, K, sizeof(BlockQ8_0)); return widen<uint16_t, BQ8_0>(w, K);
    default: TORCH_CHECK(false, "to_f32_scales takes Q4_0, Q4_1 or Q8_0 (type ", type, ")");
  }
}

// ---- decode attention -------------------------------------------------------------------------
// q [B, H, 1, Hd]; k, v [B, Kh, L, Hd] (views of the cache: any strides, last dim contiguous), or
// the whole cache [S, Kh, L, Hd] with rows [B] giving each batch row's slot;
// mask [B, 1, 1, L] bool (true = attend) or undefined (attend all L). Grouped-query heads: query
// head h reads kv head h / (H / Kh). Float32 throughout, softmax with the max subtracted.
inline float dot(const float* a, const float* b, int64_t n) {
#ifdef LF_AVX512
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
#ifdef LF_AVX512
  const __m512 va = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
#else
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
#endif
}

#ifdef LF_AVX512
// exp for x <= 0 (Cephes' expf polynomial, ~1 ulp): x = n ln2 + r, exp(x) = 2^n * p(r); exp(-inf) = 0
inline __m512 exp_nonpos(__m512 x) {
  const __mmask16 finite = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-103.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(y, n));
}
#endif

// s[0:L] = exp(s - mx) in place; returns the sum
inline float exp_sum(float* s, int64_t L, float mx) {
  float sum = 0.f;
  int64_t l = 0;
#ifdef LF_AVX512
  __m512 acc = _mm512_setzero_ps();
  const __m512 vmx = _mm512_set1_ps(mx);
  for (; l + 16 <= L; l += 16) {
    const __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(s + l), vmx));
    _mm512_storeu_ps(s + l, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; l < L; ++l) { s[l] = std::exp(s[l] - mx); sum += s[l]; }
  return sum;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               c10::optional<torch::Tensor> rows) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(), "q [B,H,1,Hd], k/v [B,K,L,Hd]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32,
              "decode attention is float32");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == k.size(3) && v.stride(2) == v.size(3),
              "k and v rows must be contiguous");
  q = q.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Hd = q.size(3), Kh = k.size(1), L = k.size(2), G = H / Kh;
  // rows: batch row b reads k[rows[b]] (k, v are then a whole cache [S, K, L, Hd]); else k[b]
  std::vector<int64_t> row(B);
  if (rows.has_value() && rows->defined()) {
    auto r = rows->to(torch::kLong).contiguous();
    TORCH_CHECK(r.numel() == B, "rows must name one cache row per batch row");
    for (int64_t b = 0; b < B; ++b) {
      row[b] = r.data_ptr<int64_t>()[b];
      TORCH_CHECK(row[b] >= 0 && row[b] < k.size(0), "row ", row[b], " is outside the cache");
    }
  } else {
    TORCH_CHECK(k.size(0) == B, "k and v must have one row per batch row");
    for (int64_t b = 0; b < B; ++b) row[b] = b;
  }
  TORCH_CHECK(H % Kh == 0 && k.size(3) == Hd, "head counts or shapes do not match");
  const bool* M = nullptr;
  torch::Tensor mk;
  if (mask.has_value() && mask->defined()) {
    mk = mask->to(torch::kBool).expand({B, 1, 1, L}).contiguous();
    M = mk.data_ptr<bool>();
  }
  auto out = torch::empty({B, H, 1, Hd}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(Hd));
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / H, h = t % H, kh = h / G;
      const float* qh = Q + t * Hd;
      const float* kb = K + row[b] * ks0 + kh * ks1;
      const float* vb = V + row[b] * vs0 + kh * vs1;
      const bool* mb = M ? M + b * L : nullptr;
      float mx = -INFINITY;
      for (int64_t l = 0; l < L; ++l) {
        s[l] = (mb && !mb[l]) ? -INFINITY : dot(qh, kb + l * Hd, Hd) * scale;
        mx = std::max(mx, s[l]);
      }
      float* o = O + t * Hd;
      for (int64_t i = 0; i < Hd; ++i) o[i] = 0.f;
      if (mx == -INFINITY) continue;  // nothing visible: zeros (SDPA would give NaN)
      const float inv = 1.0f / exp_sum(s.data(), L, mx);
#ifdef LF_AVX512
      if (Hd == 64) {  // the common head size: the output row lives in four registers
        __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
        for (int64_t l = 0; l < L; ++l) {
          if (s[l] == 0.f) continue;
          const __m512 p = _mm512_set1_ps(s[l]);
          const float* vl = vb + l * 64;
          o0 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vl), o0);
          o1 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vl + 16), o1);
          o2 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vl + 32), o2);
          o3 = _mm512_fmadd_ps(p, _mm512_loadu_ps(vl + 48), o3);
        }
        const __m512 vi = _mm512_set1_ps(inv);
        _mm512_storeu_ps(o, _mm512_mul_ps(o0, vi));
        _mm512_storeu_ps(o + 16, _mm512_mul_ps(o1, vi));
        _mm512_storeu_ps(o + 32, _mm512_mul_ps(o2, vi));
        _mm512_storeu_ps(o + 48, _mm512_mul_ps(o3, vi));
        continue;
      }
#endif
      for (int64_t l = 0; l < L; ++l) if (s[l] != 0.f) axpy(s[l], vb + l * Hd, o, Hd);
      for (int64_t i = 0; i < Hd; ++i) o[i] *= inv;
    }
  });
  return out;
}

// ---- rotary embedding --------------------------------------------------------------------------
// x [B, T, H, Hd] (any strides, pairs contiguous), cos/sin [B, T, Hd/2]: each pair (x[2i], x[2i+1])
// rotated by its angle, as the complex product (x0 + i x1)(cos + i sin). Returns a new contiguous tensor.
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat32 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "rope takes float32 x [B, T, H, Hd] with contiguous head rows");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), P = x.size(3) / 2;
  cos = cos.contiguous(); sin = sin.contiguous();
  TORCH_CHECK(cos.numel() == B * T * P && sin.numel() == B * T * P, "cos/sin must be [B, T, Hd/2]");
  auto out = torch::empty({B, T, H, 2 * P}, x.options());
  const float* X = x.data_ptr<float>();
  const float* C = cos.data_ptr<float>();
  const float* S = sin.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2);
  at::parallel_for(0, B * T, std::max<int64_t>(1, 16384 / (H * P)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T;
      const float* c = C + r * P;
      const float* sn = S + r * P;
      for (int64_t h = 0; h < H; ++h) {
        const float* xi = X + b * s0 + t * s1 + h * s2;
        float* o = O + (r * H + h) * 2 * P;
        for (int64_t i = 0; i < P; ++i) {
          const float x0 = xi[2 * i], x1 = xi[2 * i + 1];
          o[2 * i] = x0 * c[i] - x1 * sn[i];
          o[2 * i + 1] = x0 * sn[i] + x1 * c[i];
        }
      }
    }
  });
  return out;
}

// ---- RMSNorm ----------------------------------------------------------------------------------
// x [..., D] float32, w [D]: (x * rsqrt(mean(x^2) + eps)) * w, rounded as the reference writes it.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32 && w.dim() == 1 &&
              x.size(-1) == w.size(0), "rms_norm takes float32 x [..., D] and w [D]");
  x = x.contiguous();
  const int64_t D = w.size(0), M = x.numel() / D;
  auto out = torch::empty_like(x);
  const float* X = x.data_ptr<float>();
  const float* W = w.contiguous().data_ptr<float>();
  float* Y = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = X + m * D;
      float* yr = Y + m * D;
      const float r = 1.0f / std::sqrt(dot(xr, xr, D) / float(D) + float(eps));
      for (int64_t i = 0; i < D; ++i) yr[i] = (xr[i] * r) * W[i];
    }
  });
  return out;
}

std::string isa() {
#if defined(LF_AVX512)
  return "avx512";
#elif defined(LF_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("matmul", &ggml_matmul, "y = x @ dequant(w).T from GGML blocks, float32");
  m.def("dequantize", &ggml_dequantize, "float32 matrix of GGML blocks (optionally into a buffer)",
        py::arg("w"), py::arg("type"), py::arg("K"), py::arg("into") = py::none());
  m.def("decode_attention", &decode_attention, "softmax(q k^T / sqrt(Hd)) v for one query per row, GQA",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask") = py::none(), py::arg("rows") = py::none());
  m.def("rope", &rope, "rotary position embedding of interleaved pairs");
  m.def("rms_norm", &rms_norm, "RMSNorm in float32");
  m.def("to_f32_scales", &to_f32_scales, "the blocks with float32 scales (type + 100)");
  m.def("isa", &isa, "instruction set the kernels were built for");
}
