// Dequantization of every GGML type llama.cpp's common presets write, and the float32-activation
// dot product built on it. Each formula rounds exactly as gguf-py's numpy dequantization does
// (products and sums rounded separately: the build uses -ffp-contract=off), so the float32 matrix
// is bit-identical to gguf-py's. Layouts: ggml-common.h; index maps as in gguf-py's quants.py.
#include "common.h"

#include <cstring>

namespace lf {

float half_to_float(uint16_t h) {
#ifdef LF_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);           // inf / nan
  else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);   // normal
  else if (man == 0) bits = sign;                                       // zero
  else {                                                                // subnormal: normalise
    int e = -1;
    uint32_t m = man;
    do { ++e; m <<= 1; } while (!(m & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | ((m & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

TypeInfo type_info(int64_t type) {
  switch (type) {
    case F16: case BF16: return {1, 2};
    case Q4_0: return {32, 18};
    case Q4_1: return {32, 20};
    case Q5_0: return {32, 22};
    case Q5_1: return {32, 24};
    case Q8_0: return {32, 34};
    case Q2_K: return {256, 84};
    case Q3_K: return {256, 110};
    case Q4_K: return {256, 144};
    case Q5_K: return {256, 176};
    case Q6_K: return {256, 210};
    default: return {0, 0};
  }
}

namespace {

inline uint16_t u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
// inline: a call inside a vector loop spills every vector register around it
#ifdef LF_AVX2
inline float f16(const uint8_t* p) { return _cvtsh_ss(u16(p)); }
#else
inline float f16(const uint8_t* p) { return half_to_float(u16(p)); }
#endif

// Q4_K / Q5_K: 8 six-bit scales and mins packed in 12 bytes
inline void scale_min_k4(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

void deq_q4_0(const uint8_t* b, float* o) {
  const float d = f16(b);
  for (int j = 0; j < 16; ++j) {
    o[j] = d * float(int(b[2 + j] & 15) - 8);
    o[j + 16] = d * float(int(b[2 + j] >> 4) - 8);
  }
}
void deq_q4_1(const uint8_t* b, float* o) {
  const float d = f16(b), m = f16(b + 2);
  for (int j = 0; j < 16; ++j) {
    o[j] = d * float(b[4 + j] & 15) + m;
    o[j + 16] = d * float(b[4 + j] >> 4) + m;
  }
}
void deq_q5_0(const uint8_t* b, float* o) {
  const float d = f16(b);
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  for (int j = 0; j < 16; ++j) {
    o[j] = d * float(int((b[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);
    o[j + 16] = d * float(int((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
  }
}
void deq_q5_1(const uint8_t* b, float* o) {
  const float d = f16(b), m = f16(b + 2);
  uint32_t qh;
  std::memcpy(&qh, b + 4, 4);
  for (int j = 0; j < 16; ++j) {
    o[j] = d * float((b[8 + j] & 15) | (((qh >> j) & 1) << 4)) + m;
    o[j + 16] = d * float((b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
  }
}
void deq_q8_0(const uint8_t* b, float* o) {
  const float d = f16(b);
  for (int j = 0; j < 32; ++j) o[j] = float(int8_t(b[2 + j])) * d;
}
// K-quants: 256 weights; weight w = 128 * half + 32 * shift + l reads byte 32 * half + l
void deq_q2_k(const uint8_t* b, float* o) {
  const uint8_t* sc = b;
  const uint8_t* qs = b + 16;
  const float d = f16(b + 80), dmin = f16(b + 82);
  for (int w = 0; w < 256; w += 16) {
    const int j = w / 16, half = w / 128, s = (w / 32) % 4, l0 = w % 32;
    const float dl = d * float(sc[j] & 0xF), ml = dmin * float(sc[j] >> 4);
    for (int l = 0; l < 16; ++l) o[w + l] = dl * float((qs[32 * half + l0 + l] >> (2 * s)) & 3) - ml;
  }
}
void deq_q3_k(const uint8_t* b, float* o) {
  const uint8_t* hm = b;
  const uint8_t* qs = b + 32;
  const uint8_t* s = b + 96;
  const float d = f16(b + 108);
  for (int w = 0; w < 256; w += 16) {
    const int j = w / 16, g = w / 32, half = w / 128, sh = g % 4, l0 = w % 32;
    const int sc = int(((s[j % 8] >> (4 * (j / 8))) & 0xF) | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32;
    const float dl = d * float(sc);
    for (int l = 0; l < 16; ++l) {
      const int q = int((qs[32 * half + l0 + l] >> (2 * sh)) & 3) - (((hm[l0 + l] >> g) & 1) ? 0 : 4);
      o[w + l] = dl * float(q);
    }
  }
}
template <bool FIVE>
void deq_q45_k(const uint8_t* b, float* o) {
  const float d = f16(b), dmin = f16(b + 2);
  uint8_t sc[8], mn[8];
  scale_min_k4(b + 4, sc, mn);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = FIVE ? b + 48 : b + 16;
  for (int j = 0; j < 8; ++j) {   // sub-block j: weights 32j.., nibble j % 2 of bytes 32 * (j / 2)..
    const float dl = d * float(sc[j]), dm = dmin * float(mn[j]);
    const uint8_t* q = qs + 32 * (j / 2);
    for (int l = 0; l < 32; ++l) {
      int v = (q[l] >> (4 * (j % 2))) & 0xF;
      if (FIVE) v |= ((qh[l] >> j) & 1) << 4;
      o[32 * j + l] = dl * float(v) - dm;
    }
  }
}
void deq_q6_k(const uint8_t* b, float* o) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16(b + 208);
  for (int w = 0; w < 256; w += 16) {
    const int half = w / 128, r = w % 128;
    const float dl = d * float(sc[w / 16]);
    for (int l = 0; l < 16; ++l) {
      const int i = r + l;                    // 0..127 within the half
      const int lo = (ql[64 * half + i % 64] >> (4 * (i / 64))) & 0xF;
      const int hi = (qh[32 * half + i % 32] >> (2 * (i / 32))) & 3;
      o[w + l] = dl * float((lo | (hi << 4)) - 32);
    }
  }
}

// whole rows of Q4_0 / Q4_1 / Q8_0 in vector code (AVX2 builds; defined with the float32 kernels below)
template <int64_t T>
void deq_row32(const uint8_t* w, float* o, int64_t nb);

}  // namespace

void dequant_row(int64_t type, const uint8_t* w, float* out, int64_t K) {
#ifdef LF_AVX2
  switch (type) {
    case Q4_0: return deq_row32<Q4_0>(w, out, K / 32);
    case Q4_1: return deq_row32<Q4_1>(w, out, K / 32);
    case Q8_0: return deq_row32<Q8_0>(w, out, K / 32);
    default: break;
  }
#endif
  if (type == F16) {
    int64_t i = 0;
#ifdef LF_AVX2
    for (; i + 8 <= K; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i))));
#endif
    for (; i < K; ++i) out[i] = f16(w + 2 * i);
    return;
  }
  if (type == BF16) {
    int64_t i = 0;
#ifdef LF_AVX2
    for (; i + 8 <= K; i += 8) {
      const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2 * i)));
      _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
#endif
    for (; i < K; ++i) {
      const uint32_t bits = uint32_t(u16(w + 2 * i)) << 16;
      std::memcpy(out + i, &bits, 4);
    }
    return;
  }
  const TypeInfo ti = type_info(type);
  void (*f)(const uint8_t*, float*) = nullptr;
  switch (type) {
    case Q4_0: f = deq_q4_0; break;
    case Q4_1: f = deq_q4_1; break;
    case Q5_0: f = deq_q5_0; break;
    case Q5_1: f = deq_q5_1; break;
    case Q8_0: f = deq_q8_0; break;
    case Q2_K: f = deq_q2_k; break;
    case Q3_K: f = deq_q3_k; break;
    case Q4_K: f = deq_q45_k<false>; break;
    case Q5_K: f = deq_q45_k<true>; break;
    case Q6_K: f = deq_q6_k; break;
    default: return;
  }
  for (int64_t g = 0; g < K / ti.block; ++g) f(w + g * ti.bytes, out + g * ti.block);
}

namespace {

// ---- float32 activations straight from Q4_0 / Q4_1 / Q8_0 blocks ---------------------------------
// The small models' decode path (where per-step overhead, not bandwidth, bounds a token). Each
// block is dequantized in registers, then multiplied into every row of x: the unpacking is paid
// once per block for up to MAX_R rows (batched decode: 1.4x for 6 rows of Q4_1 over the form that
// scaled each row's block sum), and a row costs one FMA per 16 (AVX-512) or 8 (AVX2) weights. A
// row's arithmetic is the same whatever rows share the call, so a decoded token never depends on
// its batch.
template <int64_t T>
struct F32Block {
  static constexpr int64_t QS = T == Q4_1 ? 4 : 2;               // codes start (after d, and m)
  static constexpr int64_t BYTES = QS + (T == Q8_0 ? 32 : 16);
};

#ifdef LF_AVX512
constexpr int MAX_R = 8;   // 16 accumulators + the block's two vectors fit 32 zmm registers
// weights 0..15 and 16..31 of 4-bit block b, dequantized: the block's 16 possible weights
// are computed once (d * code, or d * code + m rounded once: gguf-py rounds the product too, which
// costs Q4_1 one more dependent operation per block, ~10% of a one-row product), and each code
// picks its weight with a permute (which reads only an index's low 4 bits, so the low nibbles need
// no mask): a third of the instructions of converting and scaling every code
// (EXACT: Q4_1's product rounded before the sum, as gguf-py does: dequant_row's bits)
template <int64_t T, bool EXACT = false>
inline void dequant32(const uint8_t* b, __m512& lo, __m512& hi) {
  constexpr int64_t QS = F32Block<T>::QS;
  const __m512 codes = T == Q4_0 ? _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7)
                                 : _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 table;
  if constexpr (T == Q4_1 && EXACT) table = _mm512_add_ps(_mm512_mul_ps(codes, _mm512_set1_ps(f16(b))), _mm512_set1_ps(f16(b + 2)));
  else if constexpr (T == Q4_1) table = _mm512_fmadd_ps(codes, _mm512_set1_ps(f16(b)), _mm512_set1_ps(f16(b + 2)));
  else table = _mm512_mul_ps(codes, _mm512_set1_ps(f16(b)));
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + QS)));
  lo = _mm512_permutexvar_ps(v, table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

template <int64_t T, int R>
void fdot32(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* out) {
  __m512 a[R], c[R];
  for (int r = 0; r < R; ++r) a[r] = c[r] = _mm512_setzero_ps();
  if constexpr (T == Q8_0) {
    // Q8_0's codes need a conversion each, and scaling 32 of them costs more than scaling a row's
    // block sum: d * (codes . x), into two chains alternating by block
    auto block = [&](int64_t g, __m512* acc) {
      const uint8_t* b = w + g * F32Block<T>::BYTES;
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
      const __m512 d = _mm512_set1_ps(f16(b));
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * ldx + g * 32;
        const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xr)));
        acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
      }
    };
    int64_t g = 0;
    for (; g + 2 <= nb; g += 2) { block(g, a); block(g + 1, c); }
    if (g < nb) block(g, a);
  } else {
    for (int64_t g = 0; g < nb; ++g) {
      __m512 lo, hi;
      dequant32<T>(w + g * F32Block<T>::BYTES, lo, hi);
      for (int r = 0; r < R; ++r) {
        const float* xr = x + r * ldx + g * 32;
        a[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), a[r]);
        c[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), c[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a[r], c[r]));
}
#elif defined(LF_AVX2)
constexpr int MAX_R = 3;   // 12 accumulators + the block's four vectors: AVX2 has 16 ymm registers
// weights 8v .. 8v + 7 of block b (v = 0..3), dequantized
template <int64_t T>
inline void dequant32(const uint8_t* b, __m256* wv) {
  constexpr int64_t QS = F32Block<T>::QS;
  if constexpr (T == Q8_0) {
    for (int v = 0; v < 4; ++v)
      wv[v] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + QS + 8 * v))));
  } else {
    for (int v = 0; v < 2; ++v) {   // bytes 8v..8v+7: low nibbles are weights 8v.., high ones 16 + 8v..
      const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + QS + 8 * v)));
      __m256i l = _mm256_and_si256(u, _mm256_set1_epi32(15)), h = _mm256_srli_epi32(u, 4);
      if constexpr (T == Q4_0) { l = _mm256_sub_epi32(l, _mm256_set1_epi32(8)); h = _mm256_sub_epi32(h, _mm256_set1_epi32(8)); }
      wv[v] = _mm256_cvtepi32_ps(l);
      wv[v + 2] = _mm256_cvtepi32_ps(h);
    }
  }
  const __m256 d = _mm256_set1_ps(f16(b));
  for (int v = 0; v < 4; ++v) wv[v] = _mm256_mul_ps(wv[v], d);
  if constexpr (T == Q4_1) {
    const __m256 m = _mm256_set1_ps(f16(b + 2));
    for (int v = 0; v < 4; ++v) wv[v] = _mm256_add_ps(wv[v], m);
  }
}

template <int64_t T, int R>
void fdot32(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* out) {
  __m256 a[R][4];
  for (int r = 0; r < R; ++r) for (int v = 0; v < 4; ++v) a[r][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < nb; ++g) {
    __m256 wv[4];
    dequant32<T>(w + g * F32Block<T>::BYTES, wv);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * 32;
      for (int v = 0; v < 4; ++v) a[r][v] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(xr + 8 * v), a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 s = _mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]), _mm256_add_ps(a[r][2], a[r][3]));
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    out[r] = _mm_cvtss_f32(v);
  }
}
#else
constexpr int MAX_R = 4;
// portable: 8 partial sums per row, which compilers vectorise on NEON and the like
template <int64_t T, int R>
void fdot32(const uint8_t* w, int64_t nb, const float* x, int64_t ldx, float* out) {
  constexpr int64_t QS = F32Block<T>::QS;
  float acc[R][8] = {};
  float q[32];
  for (int64_t g = 0; g < nb; ++g) {
    const uint8_t* b = w + g * F32Block<T>::BYTES;
    const float d = f16(b), m = T == Q4_1 ? f16(b + 2) : 0.f;
    for (int j = 0; j < 16; ++j) {
      if constexpr (T == Q8_0) { q[j] = d * float(int8_t(b[QS + j])); q[j + 16] = d * float(int8_t(b[QS + 16 + j])); }
      else {
        const int k = T == Q4_0 ? 8 : 0;
        const uint8_t cb = b[QS + j];
        q[j] = d * float(int(cb & 15) - k);
        q[j + 16] = d * float(int(cb >> 4) - k);
        if constexpr (T == Q4_1) { q[j] += m; q[j + 16] += m; }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + g * 32;
      for (int l = 0; l < 8; ++l) acc[r][l] += q[l] * xr[l] + q[l + 8] * xr[l + 8] + q[l + 16] * xr[l + 16] + q[l + 24] * xr[l + 24];
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int l = 0; l < 8; ++l) s += acc[r][l];
    out[r] = s;
  }
}
#endif

template <int64_t T, int R>
inline void fdot32_rows(const uint8_t* w, int64_t nb, const float* x, int64_t K, int rows, float* out) {
  if constexpr (R > 1) {
    if (rows < R) return fdot32_rows<T, R - 1>(w, nb, x, K, rows, out);
  }
  fdot32<T, R>(w, nb, x, K, out);
}

// every weight row of the range against all M rows of x, MAX_R at a time: the type and row-count
// dispatch happens once per range, not once per weight row (a call per row of 18 blocks costs ~15%)
template <int64_t T>
void fdot32_range(const uint8_t* w, int64_t ws, int64_t N, const float* x, int64_t M, int64_t K, float* y,
                  int64_t ldy) {
  const int64_t nb = K / 32;
  float out[MAX_R];
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* wr = w + n * ws;
    for (int64_t m = 0; m < M; m += MAX_R) {
      const int R = int(M - m < MAX_R ? M - m : MAX_R);
      fdot32_rows<T, MAX_R>(wr, nb, x + m * K, K, R, out);
      for (int r = 0; r < R; ++r) y[(m + r) * ldy + n] = out[r];
    }
  }
}

// Whole rows for dequant_row: the float32 prompt path dequantizes every weight once per forward,
// and the scalar loops (one call per block) cost ~0.8 cycles per weight, a third of a 20-token
// forward of the guard's blocks; this is ~0.2. The same blocks as the kernels above, rounded as
// gguf-py rounds (a product, then a sum), so the same bits as the scalar loops.
template <int64_t T>
void deq_row32(const uint8_t* w, float* o, int64_t nb) {
  for (int64_t g = 0; g < nb; ++g, o += 32) {
    const uint8_t* b = w + g * F32Block<T>::BYTES;
#if defined(LF_AVX512)
    if constexpr (T == Q8_0) {   // the kernels above keep Q8_0 codes unscaled: convert and scale here
      const __m512 d = _mm512_set1_ps(f16(b));
      for (int h = 0; h < 2; ++h) {
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * h));
        _mm512_storeu_ps(o + 16 * h, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d));
      }
    } else {
      __m512 lo, hi;
      dequant32<T, true>(b, lo, hi);
      _mm512_storeu_ps(o, lo);
      _mm512_storeu_ps(o + 16, hi);
    }
#elif defined(LF_AVX2)
    __m256 wv[4];
    dequant32<T>(b, wv);
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(o + 8 * v, wv[v]);
#endif   // (portable builds never call it: dequant_row's scalar loops serve them)
  }
}

}  // namespace

bool has_fast_f32(int64_t type) { return type == Q4_0 || type == Q4_1 || type == Q8_0; }

void fdot_range(int64_t type, const uint8_t* w, int64_t ws, int64_t N, const float* x, int64_t M, int64_t K,
                float* y, int64_t ldy) {
  switch (type) {
    case Q4_0: return fdot32_range<Q4_0>(w, ws, N, x, M, K, y, ldy);
    case Q4_1: return fdot32_range<Q4_1>(w, ws, N, x, M, K, y, ldy);
    case Q8_0: return fdot32_range<Q8_0>(w, ws, N, x, M, K, y, ldy);
    default: return;
  }
}

void fdot_rows(int64_t type, const uint8_t* w, const float* x, int64_t ldx, int R, int64_t K, float* out, float* buf) {
  const TypeInfo ti = type_info(type);
  const int64_t per = ti.block >= 256 ? ti.block : 256;   // weights dequantized at a time
  float tail[4] = {0.f, 0.f, 0.f, 0.f};
#ifdef LF_AVX2
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
#endif
  for (int64_t k0 = 0; k0 < K; k0 += per) {
    const int64_t n = K - k0 < per ? K - k0 : per;
    dequant_row(type, w + k0 / ti.block * ti.bytes, buf, n);
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + k0;
      int64_t j = 0;
#ifdef LF_AVX2
      for (; j + 8 <= n; j += 8) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(buf + j), _mm256_loadu_ps(xr + j), acc[r]);
#endif
      for (; j < n; ++j) tail[r] += buf[j] * xr[j];
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = tail[r];
#ifdef LF_AVX2
    __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    s += _mm_cvtss_f32(v);
#endif
    out[r] = s;
  }
}

}  // namespace lf
