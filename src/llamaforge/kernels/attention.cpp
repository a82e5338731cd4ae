// The small per-token operations that dominate a decode step once the matrix products are fast:
// attention of one query per row over the KV cache (and the q8_0 cache's quantization), rotary
// embedding, RMSNorm. Float32 arithmetic throughout.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace lf {
namespace {
// ---- decode attention -------------------------------------------------------------------------
// q [B, H, 1, Hd]; k, v [B, Kh, L, Hd] (views of the cache: any strides, last dim contiguous), or
// the whole cache [S, Kh, L, Hd] with rows [B] giving each batch row's slot; a Q8_0 cache's rows
// are uint8 [.., L, Hd / 32 * 34] (quantize_q8_0);
// mask [B, 1, 1, L] bool (true = attend) or undefined (attend all L). Grouped-query heads: query
// head h reads kv head h / (H / Kh). Float32 throughout, softmax with the max subtracted.

// value i of a float16 / Q8_0 row, as dequant_row rounds it (d * code in float32)
inline float half_at(const uint8_t* p) {
#ifdef LF_AVX2
  return _cvtsh_ss(uint16_t(p[0] | p[1] << 8));   // exact, as half_to_float, without a call
#else
  return half_to_float(uint16_t(p[0] | p[1] << 8));
#endif
}
template <int64_t P>
inline float value_at(const uint8_t* row, int64_t i) {
  if constexpr (P == F16) return half_at(row + 2 * i);
  const uint8_t* b = row + i / 32 * 34;
  return half_at(b) * float(int8_t(b[2 + i % 32]));
}

// The vector operations the kernels below are written in, W float32 lanes: AVX-512 (16) or AVX2
// (8). Everything after this block is written once for both.
#if defined(LF_AVX512)
#define LF_VEC 1
struct Vec {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float a) { return _mm512_set1_ps(a); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T max(T a, T b) { return _mm512_max_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(T a) { return _mm512_reduce_add_ps(a); }
  static float hmax(T a) { return _mm512_reduce_max_ps(a); }
  // values i .. i + 15 of a float16 / Q8_0 row as float32 (d * code for Q8_0, as dequant_row)
  template <int64_t P>
  static T values(const uint8_t* row, int64_t i) {
    if constexpr (P == F16) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i)));
    const uint8_t* b = row + i / 32 * 34;
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + i % 32));
    return _mm512_mul_ps(_mm512_set1_ps(half_at(b)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)));
  }
  // -inf in the lanes whose mask byte (bool) is false
  static T masked(T v, const bool* m) {
    const __mmask16 keep = _mm_cmpneq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)), _mm_setzero_si128());
    return _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), v);
  }
  // lane j = the sum of a[j]'s 16 lanes: a transposing tree of 45 shuffles and adds for 16 sums,
  // where 16 separate horizontal sums take ~8 dependent operations each
  static T sum_each(const T* a) {
    __m512 b[8], c[4];
    for (int j = 0; j < 8; ++j)   // 128-bit lanes: [a2j 0+2, a2j+1 0+2, a2j 1+3, a2j+1 1+3]
      b[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
    for (int k = 0; k < 4; ++k) {   // 128-bit lanes: one partial sum of each of a4k .. a4k+3
      const __m512d x = _mm512_castps_pd(b[2 * k]), y = _mm512_castps_pd(b[2 * k + 1]);
      c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
    const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
  }
  // exp for x <= 0 (Cephes' expf polynomial, ~1 ulp): x = n ln2 + r, exp(x) = 2^n * p(r); exp(-inf) = 0
  static T exp_nonpos(T x) {
    const __mmask16 finite = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.f));
    const T n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_mov_ps(finite, _mm512_scalef_ps(exp_poly(x, n), n));
  }
  // p(r) of exp_nonpos, r = x - n ln2 in two steps
  static T exp_poly(T x, T n) {
    T r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    T p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    return _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  }
};
#elif defined(LF_AVX2)
#define LF_VEC 1
struct Vec {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float a) { return _mm256_set1_ps(a); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T max(T a, T b) { return _mm256_max_ps(a, b); }
  static T fmadd(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(T a) {
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
  }
  static float hmax(T a) {
    __m128 v = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    v = _mm_max_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_max_ss(v, _mm_movehdup_ps(v)));
  }
  template <int64_t P>
  static T values(const uint8_t* row, int64_t i) {
    if constexpr (P == F16) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * i)));
    const uint8_t* b = row + i / 32 * 34;
    const __m128i c = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + i % 32));
    return _mm256_mul_ps(_mm256_set1_ps(half_at(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)));
  }
  static T masked(T v, const bool* m) {   // bool bytes 0/1 -> lanes of all ones where attended
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m))),
                                            _mm256_setzero_si256());
    return _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(keep));
  }
  static T sum_each(const T* a) {   // lane j = the sum of a[j]'s 8 lanes
    const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  // as the AVX-512 form, with 2^n from the exponent bits, so x is held at >= -87 (exp(-87) is
  // 1.6e-38, against a sum >= 1: the max's own term)
  static T exp_nonpos(T x) {
    const __m256 finite = _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const T n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(finite, _mm256_mul_ps(exp_poly(x, n), _mm256_castsi256_ps(e)));
  }
  static T exp_poly(T x, T n) {
    T r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    T p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    return _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.f));
  }
};
#endif

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef LF_VEC
  typename Vec::T acc = Vec::zero();
  for (; i + Vec::W <= n; i += Vec::W) acc = Vec::fmadd(Vec::load(a + i), Vec::load(b + i), acc);
  s = Vec::sum(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {  // y += a * x
  int64_t i = 0;
#ifdef LF_VEC
  const auto va = Vec::set1(a);
  for (; i + Vec::W <= n; i += Vec::W) Vec::store(y + i, Vec::fmadd(va, Vec::load(x + i), Vec::load(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * x[i];
}

// One cached key or value row (Hd values) stored as P (0: float32, F16, or Q8_0 blocks), read in
// place: dot with q, or y += a * row. Each computes exactly what dot / axpy compute on the row
// dequantized to float32 (same products, same order), without writing the float32 row anywhere:
// a float16 cache then streams half the bytes of a float32 one, a Q8_0 cache 34/128
template <int64_t P>
inline float dot_row(const float* q, const uint8_t* row, int64_t Hd) {
  if constexpr (P == 0) {
    return dot(q, reinterpret_cast<const float*>(row), Hd);
  } else {
    int64_t i = 0;
    float s = 0.f;
#ifdef LF_VEC
    typename Vec::T acc = Vec::zero();   // Q8_0 rows hold whole blocks (Hd % 32 == 0)
    for (; i + Vec::W <= Hd; i += Vec::W) acc = Vec::fmadd(Vec::load(q + i), Vec::template values<P>(row, i), acc);
    s = Vec::sum(acc);
#endif
    for (; i < Hd; ++i) s += q[i] * value_at<P>(row, i);
    return s;
  }
}

template <int64_t P>
inline void axpy_row(float a, const uint8_t* row, float* y, int64_t Hd) {
  if constexpr (P == 0) {
    axpy(a, reinterpret_cast<const float*>(row), y, Hd);
  } else {
    int64_t i = 0;
#ifdef LF_VEC
    const auto va = Vec::set1(a);
    for (; i + Vec::W <= Hd; i += Vec::W)
      Vec::store(y + i, Vec::fmadd(va, Vec::template values<P>(row, i), Vec::load(y + i)));
#endif
    for (; i < Hd; ++i) y[i] += a * value_at<P>(row, i);
  }
}

#ifdef LF_VEC
// q . row for the W cached rows at kb (row stride rb bytes), Hd % W == 0: one FMA chain per row,
// then one transposing sum (Vec::sum_each) for all W instead of a horizontal sum per row
template <int64_t P>
inline typename Vec::T dot_rows(const float* q, const uint8_t* kb, int64_t rb, int64_t Hd) {
  typename Vec::T a[Vec::W];
  for (int j = 0; j < Vec::W; ++j) {
    const uint8_t* row = kb + j * rb;
    auto at = [&](int64_t i) {
      if constexpr (P == 0) return Vec::load(reinterpret_cast<const float*>(row) + i);
      else return Vec::template values<P>(row, i);
    };
    auto acc = Vec::mul(Vec::load(q), at(0));
    for (int64_t i = Vec::W; i < Hd; i += Vec::W) acc = Vec::fmadd(Vec::load(q + i), at(i), acc);
    a[j] = acc;
  }
  return Vec::sum_each(a);
}
#endif

// s[0:L] = exp(s - mx) in place; returns the sum
inline float exp_sum(float* s, int64_t L, float mx) {
  float sum = 0.f;
  int64_t l = 0;
#ifdef LF_VEC
  typename Vec::T acc = Vec::zero();
  const auto vmx = Vec::set1(mx);
  for (; l + Vec::W <= L; l += Vec::W) {
    const auto e = Vec::exp_nonpos(Vec::sub(Vec::load(s + l), vmx));
    Vec::store(s + l, e);
    acc = Vec::add(acc, e);
  }
  sum = Vec::sum(acc);
#endif
  for (; l < L; ++l) { s[l] = std::exp(s[l] - mx); sum += s[l]; }
  return sum;
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               c10::optional<torch::Tensor> rows) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(), "q [B,H,1,Hd], k/v [B,K,L,Hd]");
  // a float16 or Q8_0 KV cache (kv_type="f16" / "q8_0") is read in place (dot_row, axpy_row)
  const auto kt = k.scalar_type();
  const int64_t packed = kt == torch::kHalf ? F16 : kt == torch::kByte ? Q8_0 : 0;   // GGML type; 0: float32
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && kt == v.scalar_type() && (packed || kt == torch::kFloat32),
              "decode attention takes float32 q, float32, float16 or Q8_0 (uint8) k/v");
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
  TORCH_CHECK(H % Kh == 0 && k.size(3) == (packed == Q8_0 ? Hd / 32 * 34 : Hd) && (packed != Q8_0 || Hd % 32 == 0),
              "head counts or shapes do not match");
  const bool* M = nullptr;
  torch::Tensor mk;
  if (mask.has_value() && mask->defined()) {
    mk = mask->to(torch::kBool).expand({B, 1, 1, L}).contiguous();
    M = mk.data_ptr<bool>();
  }
  auto out = torch::empty({B, H, 1, Hd}, q.options());
  const float* Q = q.data_ptr<float>();
  const uint8_t* K = static_cast<const uint8_t*>(k.data_ptr());
  const uint8_t* V = static_cast<const uint8_t*>(v.data_ptr());
  const int64_t esize = k.element_size();
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(float(Hd));
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  const int64_t rb = k.size(3) * esize;   // bytes of one cached position of one head
  auto run = [&](auto tag) {
    constexpr int64_t P = decltype(tag)::value;
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> s(L);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t b = t / H, h = t % H, kh = h / G;
        const float* qh = Q + t * Hd;
        const uint8_t* kb = K + (row[b] * ks0 + kh * ks1) * esize;
        const uint8_t* vb = V + (row[b] * vs0 + kh * vs1) * esize;
        const bool* mb = M ? M + b * L : nullptr;
        float mx = -INFINITY;
        int64_t l = 0;
#ifdef LF_VEC
        if (Hd % Vec::W == 0) {   // W positions at a time (one score per lane)
          auto vmx = Vec::set1(-INFINITY);
          for (; l + Vec::W <= L; l += Vec::W) {
            auto sc = Vec::mul(dot_rows<P>(qh, kb + l * rb, rb, Hd), Vec::set1(scale));
            if (mb) sc = Vec::masked(sc, mb + l);
            Vec::store(s.data() + l, sc);
            vmx = Vec::max(vmx, sc);
          }
          mx = Vec::hmax(vmx);
        }
#endif
        for (; l < L; ++l) {
          s[l] = (mb && !mb[l]) ? -INFINITY : dot_row<P>(qh, kb + l * rb, Hd) * scale;
          mx = std::max(mx, s[l]);
        }
        float* o = O + t * Hd;
        for (int64_t i = 0; i < Hd; ++i) o[i] = 0.f;
        if (mx == -INFINITY) continue;  // nothing visible: zeros (SDPA would give NaN)
        const float inv = 1.0f / exp_sum(s.data(), L, mx);
#ifdef LF_VEC
        // the common head size: the output row lives in 64 / W registers, for every cache type (the
        // same operations as axpy_row's in the same order; through memory, each row's update waited
        // on the previous one's stores: a float16 cache's attention took 1.3x a float32 one's)
        if (Hd == 64) {
          constexpr int NV = 64 / Vec::W;
          typename Vec::T acc[NV];
          for (int j = 0; j < NV; ++j) acc[j] = Vec::zero();
          for (int64_t l = 0; l < L; ++l) {
            if (s[l] == 0.f) continue;
            const auto p = Vec::set1(s[l]);
            const uint8_t* row = vb + l * rb;
            for (int j = 0; j < NV; ++j) {
              if constexpr (P == 0) acc[j] = Vec::fmadd(p, Vec::load(reinterpret_cast<const float*>(row) + Vec::W * j), acc[j]);
              else acc[j] = Vec::fmadd(p, Vec::template values<P>(row, Vec::W * j), acc[j]);
            }
          }
          const auto vi = Vec::set1(inv);
          for (int j = 0; j < NV; ++j) Vec::store(o + Vec::W * j, Vec::mul(acc[j], vi));
          continue;
        }
#endif
        for (int64_t l = 0; l < L; ++l) if (s[l] != 0.f) axpy_row<P>(s[l], vb + l * rb, o, Hd);
        for (int64_t i = 0; i < Hd; ++i) o[i] *= inv;
      }
    });
  };
  if (packed == F16) run(std::integral_constant<int64_t, F16>());
  else if (packed == Q8_0) run(std::integral_constant<int64_t, Q8_0>());
  else run(std::integral_constant<int64_t, 0>());
  return out;
}

// ---- Q8_0 KV cache rows -------------------------------------------------------------------------
// x [..., n] float32 -> uint8 [..., n / 32 * 34]: GGML Q8_0 blocks as llama.cpp's quantize_row_q8_0_ref
// writes them (d = max|x| / 127 kept as float16, codes roundf(x / d) with the float32 d), so the
// cache holds what llama.cpp's q8_0 cache holds. Not quantize_act_row's layout or rounding.
torch::Tensor quantize_q8_0(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() >= 1 && x.size(-1) % 32 == 0,
              "quantize_q8_0 takes float32 x [..., n] with n a multiple of 32");
  x = x.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = shape.back() / 32 * 34;
  auto out = torch::empty(shape, x.options().dtype(torch::kUInt8));
  const float* X = x.data_ptr<float>();
  uint8_t* O = out.data_ptr<uint8_t>();
  at::parallel_for(0, x.numel() / 32, 1024, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {   // rows hold whole blocks: block b is x[32 b : 32 b + 32]
      const float* xb = X + b * 32;
      uint8_t* ob = O + b * 34;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
      const uint16_t h = c10::Half(d).x;   // round to nearest even, as GGML_FP32_TO_FP16
      std::memcpy(ob, &h, 2);
      for (int j = 0; j < 32; ++j) ob[2 + j] = uint8_t(int8_t(std::round(xb[j] * id)));
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

}  // namespace lf
