// The 8-bit activation path: x quantized once per matmul to q8 blocks, each weight block unpacked
// into unsigned 8-bit codes (and per-sub-block integer scales) in registers, then integer dot
// products: _mm256_maddubs_epi16 + _mm256_madd_epi16 on AVX2, _mm256_dpbusd_epi32 with VNNI
// (AVX512-VNNI+VL or AVX-VNNI). 256-bit vectors, so one source serves AVX2-only CPUs too; only the
// AVX-512+VNNI build takes the 32-weight types two blocks per 512-bit step, eight blocks per call of
// run32 (measured 17-47% faster for prompts of 32-128 rows than one block per step).
//
// Every type is written w = scale * code + offset with an unsigned code, so one product form serves
// all: sum_j scale_j * (codes_j . q_j) plus offset_j * sum(q_j), the latter from the activation
// blocks' precomputed sums (s for q8, bsums for q8_K). Q8_0's signed codes use the sign trick.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace lf {

int act_kind(int64_t type) {
  switch (type) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: return 1;
    case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: return 2;
    default: return 0;
  }
}

int64_t act_row_bytes(int64_t type, int64_t K) {
  switch (act_kind(type)) {
    case 1: return K / 32 * 8 + K;
    case 2: return K / 256 * int64_t(sizeof(BlockQ8K));
    default: return 0;
  }
}

#ifdef LF_AVX2
// One block of n (32 or 256) values: the scalar loop's arithmetic 8 lanes at a time, so the codes
// are bit-identical (|x| max exact, x * (127 / amax) in float32, rounded half to even); the
// scalar loop cost ~2 ns per value, a tenth of a 7B decode step's non-matmul time
inline int quantize_block_v(const float* xb, int8_t* qs, int n, float& d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int j = 0; j < n; j += 8) m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)), m);   // NaN skipped, as fmax does
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  d = amax / 127.f;
  const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  __m256i sum = _mm256_setzero_si256();
  for (int j = 0; j < n; j += 32) {
    __m256i q[4];
    for (int i = 0; i < 4; ++i)
      q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * i), id),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
    // pack 32 int32 -> 32 int8 (values within +-127: no saturation), then undo the lane interleave
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs + j),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  return _mm_cvtsi128_si32(t);
}
#endif

void quantize_act_row(int64_t type, const float* x, uint8_t* out, int64_t K) {
  const int kind = act_kind(type);
#ifdef LF_AVX2
  if (kind == 1) {
    const int64_t nb = K / 32;
    float* ds = reinterpret_cast<float*>(out);
    int8_t* qs = reinterpret_cast<int8_t*>(out + nb * 8);
    for (int64_t g = 0; g < nb; ++g) {
      const int sum = quantize_block_v(x + 32 * g, qs + 32 * g, 32, ds[g]);
      ds[nb + g] = ds[g] * float(sum);
    }
    return;
  }
  if (kind == 2) {
    for (int64_t g = 0; g < K / 256; ++g) {
      auto* b = reinterpret_cast<BlockQ8K*>(out) + g;
      quantize_block_v(x + 256 * g, b->qs, 256, b->d);
      for (int j = 0; j < 16; j += 2) {   // sums of 16 codes, two at a time
        const __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 16 * j)));
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 16 * j + 16)));
        __m256i h = _mm256_hadd_epi16(v, w);               // lanes: v0..3 w0..3 | v4..7 w4..7 (pair sums)
        h = _mm256_hadd_epi16(h, h);
        h = _mm256_hadd_epi16(h, h);                       // [v(0..3), w(0..3)] and [v(4..7), w(4..7)] sums
        const __m128i r = _mm_add_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        b->bsums[j] = int16_t(_mm_extract_epi16(r, 0));
        b->bsums[j + 1] = int16_t(_mm_extract_epi16(r, 1));
      }
    }
    return;
  }
#endif
  const int64_t bs = kind == 1 ? 32 : 256;
  for (int64_t g = 0; g < K / bs; ++g) {
    const float* xb = x + g * bs;
    float amax = 0.f;
    for (int64_t j = 0; j < bs; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int8_t* qs;
    if (kind == 1) {
      const int64_t nb = K / 32;
      float* ds = reinterpret_cast<float*>(out);
      qs = reinterpret_cast<int8_t*>(out + nb * 8) + g * 32;
      int sum = 0;
      for (int j = 0; j < 32; ++j) { qs[j] = int8_t(std::nearbyint(xb[j] * id)); sum += qs[j]; }
      ds[g] = d;
      ds[nb + g] = d * float(sum);
    } else {
      auto* b = reinterpret_cast<BlockQ8K*>(out) + g;
      qs = b->qs;
      for (int j = 0; j < 256; ++j) qs[j] = int8_t(std::nearbyint(xb[j] * id));
      for (int j = 0; j < 16; ++j) {
        int sum = 0;
        for (int l = 0; l < 16; ++l) sum += qs[16 * j + l];
        b->bsums[j] = int16_t(sum);
      }
      b->d = d;
    }
  }
}

#ifdef LF_AVX2
bool has_int8_path() { return true; }

namespace {

inline uint16_t u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline float f16(const uint8_t* p) { return _cvtsh_ss(u16(p)); }
inline __m256i load(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// acc (8 x int32) += scale * (u . s) over groups of 4 bytes; u unsigned codes <= 63 (or |q8| <= 128), s signed
inline __m256i dot_scaled(__m256i acc, __m256i u, __m256i s, __m256i sc) {
#ifdef LF_VNNI
  return _mm256_dpwssd_epi32(acc, _mm256_maddubs_epi16(u, s), sc);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), sc));
#endif
}
inline __m256i dot(__m256i u, __m256i s) {
#ifdef LF_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
inline float hsum(__m256 a) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_movehdup_ps(v));
  return _mm_cvtss_f32(v);
}
inline int hsum_i32(__m256i a) {
  __m128i v = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0x4e));
  v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0xb1));
  return _mm_cvtsi128_si32(v);
}
// 16 nibble pairs -> 32 codes: low nibbles are codes 0..15, high nibbles 16..31
inline __m256i nibbles32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(15);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}
// bit j of 32 bits -> 0x10 in byte j (the fifth bit of Q5_0/Q5_1 codes)
inline __m256i bit4_of(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)), shuf);
  const __m256i sel = _mm256_set1_epi64x(int64_t(0x8040201008040201));
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

// ---- 32-weight blocks against q8 ------------------------------------------------------------------
// one block: codes u, w = d * code + o (o multiplies sum(x), i.e. the q8 block's s)
struct Unpacked32 { __m256i u; float d; float o; };

template <int64_t T> inline Unpacked32 unpack32(const uint8_t* b);
template <> inline Unpacked32 unpack32<Q4_0>(const uint8_t* b) { const float d = f16(b); return {nibbles32(b + 2), d, -8.f * d}; }
template <> inline Unpacked32 unpack32<Q4_1>(const uint8_t* b) { return {nibbles32(b + 4), f16(b), f16(b + 2)}; }
template <> inline Unpacked32 unpack32<Q5_0>(const uint8_t* b) {
  const float d = f16(b);
  return {_mm256_or_si256(nibbles32(b + 6), bit4_of(b + 2)), d, -16.f * d};
}
template <> inline Unpacked32 unpack32<Q5_1>(const uint8_t* b) {
  return {_mm256_or_si256(nibbles32(b + 8), bit4_of(b + 4)), f16(b), f16(b + 2)};
}

// one 32-weight block g against R rows (256-bit); acc: that block's accumulators, off: scalar offsets
template <int64_t T, int R>
inline void block32(const uint8_t* w, int64_t g, const Q8Row* x, __m256* acc, float* off) {
  const uint8_t* b = w + g * bytes32<T>();
  if constexpr (T == Q8_0) {
    const __m256i q = load(b + 2);
    const __m256i u = _mm256_sign_epi8(q, q);
    const float d = f16(b);
    for (int r = 0; r < R; ++r) {
      const __m256i p = dot(u, _mm256_sign_epi8(load(x[r].qs + 32 * g), q));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x[r].d[g]), acc[r]);
    }
  } else {
    const Unpacked32 k = unpack32<T>(b);
    for (int r = 0; r < R; ++r) {
      const __m256i p = dot(k.u, load(x[r].qs + 32 * g));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(k.d * x[r].d[g]), acc[r]);
      off[r] += k.o * x[r].s[g];
    }
  }
}

// the float16 at byte `at` of n consecutive blocks from a, as floats (n = 2 or 8)
template <int64_t T, int n>
inline __m256 block_halves(const uint8_t* a, int at) {
  constexpr int64_t B = bytes32<T>();
  uint64_t h[2] = {0, 0};
  for (int j = 0; j < n; ++j) h[j / 4] |= uint64_t(u16(a + j * B + at)) << (16 * (j % 4));
  return _mm256_cvtph_ps(_mm_set_epi64x(int64_t(h[1]), int64_t(h[0])));
}

// Blocks g .. g + 7 against R rows, one block per 256-bit step: the eight block scales are
// gathered and multiplied with each row's eight scales at once, and the offsets go straight into
// the lanes of acc (hsum adds them), instead of scalar work per block and row (block32)
template <int64_t T, int R>
inline void run8(const uint8_t* w, int64_t g, const Q8Row* x, __m256* acc) {
  constexpr int64_t B = bytes32<T>();
  const uint8_t* a = w + g * B;
  const __m256 wd = block_halves<T, 8>(a, 0);
  __m256 sc[R];
  for (int r = 0; r < R; ++r) sc[r] = _mm256_mul_ps(wd, _mm256_loadu_ps(x[r].d + g));
  if constexpr (T != Q8_0) {
    const __m256 wo = T == Q4_1 || T == Q5_1 ? block_halves<T, 8>(a, 2)
                                             : _mm256_mul_ps(wd, _mm256_set1_ps(T == Q4_0 ? -8.f : -16.f));
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x[r].s + g), acc[r]);
  }
  for (int j = 0; j < 8; ++j) {
    const uint8_t* b = a + j * B;
    const __m256i idx = _mm256_set1_epi32(j);
    __m256i u, q;
    if constexpr (T == Q8_0) {
      q = load(b + 2);
      u = _mm256_sign_epi8(q, q);
    } else {
      u = unpack32<T>(b).u;
    }
    for (int r = 0; r < R; ++r) {
      __m256i xv = load(x[r].qs + 32 * (g + j));
      if constexpr (T == Q8_0) xv = _mm256_sign_epi8(xv, q);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot(u, xv)), _mm256_permutevar8x32_ps(sc[r], idx), acc[r]);
    }
  }
}

#if defined(LF_AVX512) && defined(LF_VNNI)
// The 64 codes of two consecutive blocks at a in one 512-bit vector (Q8_0: magnitudes, and the
// sign of each code in `sign`), for two blocks per 512-bit step: half the instructions per weight
// of the 256-bit form
template <int64_t T>
inline __m512i codes64(const uint8_t* a, __mmask64& sign) {
  constexpr int64_t B = bytes32<T>();
  const uint8_t* b = a + B;
  if constexpr (T == Q8_0) {
    const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(load(a + 2)), load(b + 2), 1);
    sign = _mm512_movepi8_mask(q);
    return _mm512_abs_epi8(q);
  } else {
    constexpr int64_t QS = T == Q4_0 ? 2 : T == Q4_1 ? 4 : T == Q5_0 ? 6 : 8;
    // [A, A, B, B] (one 16-byte load broadcast, the other merged into the upper half), then a 16-bit
    // shift by 0 or 4 per 128-bit lane and a mask: [A lo, A hi, B lo, B hi], each block's 32 codes
    // in order, without a cross-lane shuffle (the form before, two masks of [A|B] joined and
    // permuted, took three shuffles per 64 weights: one thread, 1024x4096 in cache, Q4_0 1.1x)
    const __m512i v = _mm512_mask_broadcast_i32x4(
        _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + QS))), 0xFF00,
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + QS)));
    constexpr int64_t S = 0x0004000400040004;   // four 16-bit shift counts of 4
    __m512i u = _mm512_and_si512(_mm512_srlv_epi16(v, _mm512_set_epi64(S, S, 0, 0, S, S, 0, 0)), _mm512_set1_epi8(15));
    if constexpr (T == Q5_0 || T == Q5_1) {
      constexpr int64_t QH = T == Q5_0 ? 2 : 4;
      u = _mm512_or_si512(u, _mm512_inserti64x4(_mm512_castsi256_si512(bit4_of(a + QH)), bit4_of(b + QH), 1));
    }
    return u;
  }
}

// Blocks g .. g + n - 1 (n = 2 or 8: n / 2 512-bit steps) against R rows. The block scales are
// gathered and multiplied with the rows' scales n at a time, and the offsets n at a time: with
// n = 8 the per-block scalar work that bounds a one-row product is a quarter of n = 2's
template <int64_t T, int R, int n>
inline void run32(const uint8_t* w, int64_t g, const Q8Row* x, __m512* acc, __m256* off) {
  constexpr int64_t B = bytes32<T>();
  const uint8_t* a = w + g * B;
  const __m256 wd = block_halves<T, n>(a, 0);
  __m256 wo = _mm256_setzero_ps();
  if constexpr (T == Q4_0) wo = _mm256_mul_ps(wd, _mm256_set1_ps(-8.f));
  if constexpr (T == Q5_0) wo = _mm256_mul_ps(wd, _mm256_set1_ps(-16.f));
  if constexpr (T == Q4_1 || T == Q5_1) wo = block_halves<T, n>(a, 2);
  __m512i u[n / 2];
  __mmask64 sign[n / 2] = {};
  for (int p = 0; p < n / 2; ++p) u[p] = codes64<T>(a + 2 * p * B, sign[p]);
  // n = 2: only lanes 0 and 1 are blocks of this step (and the rows' arrays may end after them)
  const __m256i keep = n == 8 ? _mm256_set1_epi32(-1) : _mm256_setr_epi32(-1, -1, 0, 0, 0, 0, 0, 0);
  for (int r = 0; r < R; ++r) {
    const __m256 xd = _mm256_maskload_ps(x[r].d + g, keep);
    const __m512 sc = _mm512_castps256_ps512(_mm256_mul_ps(wd, xd));
    for (int p = 0; p < n / 2; ++p) {
      __m512i xv = _mm512_loadu_si512(x[r].qs + 32 * (g + 2 * p));
      if constexpr (T == Q8_0) xv = _mm512_mask_sub_epi8(xv, sign[p], _mm512_setzero_si512(), xv);
      const __m512i prod = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[p], xv);
      const __m512i idx = _mm512_set_epi32(2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1,
                                           2 * p + 1, 2 * p + 1, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p, 2 * p);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(prod), _mm512_permutexvar_ps(idx, sc), acc[r]);
    }
    if constexpr (T != Q8_0) off[r] = _mm256_fmadd_ps(wo, _mm256_maskload_ps(x[r].s + g, keep), off[r]);
  }
}
#endif

template <int64_t T, int R>
void dot32(const uint8_t* w, const uint8_t* xq, int64_t xs, int64_t nb, float* out) {
  Q8Row x[R];
  for (int r = 0; r < R; ++r) x[r] = q8row(xq + r * xs, nb);
  __m256 acc[R];
  float off[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); off[r] = 0.f; }
  int64_t g = 0;
#if defined(LF_AVX512) && defined(LF_VNNI)
  __m512 acc2[R];
  __m256 off2[R];
  for (int r = 0; r < R; ++r) { acc2[r] = _mm512_setzero_ps(); off2[r] = _mm256_setzero_ps(); }
  for (; g + 8 <= nb; g += 8) run32<T, R, 8>(w, g, x, acc2, off2);
  for (; g + 2 <= nb; g += 2) run32<T, R, 2>(w, g, x, acc2, off2);
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_add_ps(_mm512_castps512_ps256(acc2[r]), _mm512_extractf32x8_ps(acc2[r], 1));
    off[r] = hsum(off2[r]);
  }
#else
  for (; g + 8 <= nb; g += 8) run8<T, R>(w, g, x, acc);
#endif
  for (; g < nb; ++g) block32<T, R>(w, g, x, acc, off);
  for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) + off[r];
}

// ---- K-quants (256 weights) against q8_K --------------------------------------------------------
// w = d * sc_j * code + dm * off_j per sub-block. u[v] holds codes 32v..32v+31. sc: the sub-block
// scales as int32 lanes (8 for 32-weight sub-blocks; 16 in two vectors for 16-weight ones), in the
// form scale_of() turns into a per-lane multiplier. off . bsums is the offset term: off16 (16 int16
// per-16 offsets) or, for 32-weight sub-blocks, off8 (8 int16) against pair sums of bsums.
struct UnpackedK {
  __m256i u[8];
  __m256i sc[2];
  __m256i off16;   // Q2_K, Q3_K, Q6_K
  __m128i off8;    // Q4_K, Q5_K
  float d, dm;
};

// scales as int32 -> the multiplier form dot_scaled() takes (int16 pairs for madd without VNNI)
inline __m256i mul_form(__m256i sc32) {
  return _mm256_or_si256(_mm256_and_si256(sc32, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(sc32, 16));
}
// the multiplier vector of codes u[v]: 32-weight sub-blocks (one scale) or 16-weight (two)
template <bool SIXTEEN>
inline __m256i scale_of(const UnpackedK& k, int v) {
  if constexpr (SIXTEEN) {
    const int j = 2 * (v % 4);
    return _mm256_permutevar8x32_epi32(k.sc[v / 4], _mm256_set_epi32(j + 1, j + 1, j + 1, j + 1, j, j, j, j));
  } else {
    return _mm256_permutevar8x32_epi32(k.sc[0], _mm256_set1_epi32(v));
  }
}

// Q4_K / Q5_K: 12 bytes -> 8 six-bit scales (bytes 0..7) and 8 mins (bytes 8..15), in registers (a
// scalar form's four 4-byte stores read back as one 16-byte load stall store forwarding every block)
inline __m128i scale_min_k4(const uint8_t* s) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));     // a0 a1 a2 (+ 4 bytes)
  const __m128i a = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0));            // a0 a2 a1 a2
  const __m128i lo = _mm_and_si128(_mm_srlv_epi32(a, _mm_setr_epi32(0, 0, 0, 4)),
                                   _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i h = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0));            // lanes 1, 3: a0, a1
  const __m128i hi = _mm_and_si128(_mm_srli_epi32(h, 2), _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
  return _mm_or_si128(lo, hi);
}

template <int64_t T> inline void unpackK(const uint8_t* b, UnpackedK& k);

template <> inline void unpackK<Q2_K>(const uint8_t* b, UnpackedK& k) {
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int half = 0; half < 2; ++half) {
    const __m256i q = load(b + 16 + 32 * half);
    for (int sh = 0; sh < 4; ++sh) k.u[4 * half + sh] = _mm256_and_si256(_mm256_srli_epi16(q, 2 * sh), m3);
  }
  const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  const __m128i sc = _mm_and_si128(s, _mm_set1_epi8(15)), mn = _mm_and_si128(_mm_srli_epi16(s, 4), _mm_set1_epi8(15));
  k.sc[0] = mul_form(_mm256_cvtepu8_epi32(sc));
  k.sc[1] = mul_form(_mm256_cvtepu8_epi32(_mm_srli_si128(sc, 8)));
  k.off16 = _mm256_cvtepu8_epi16(mn);
  k.d = f16(b + 80);
  k.dm = -f16(b + 82);
}

template <> inline void unpackK<Q3_K>(const uint8_t* b, UnpackedK& k) {
  const __m256i hm = load(b), m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  for (int half = 0; half < 2; ++half) {
    const __m256i q = load(b + 32 + 32 * half);
    for (int sh = 0; sh < 4; ++sh) {
      const int g = 4 * half + sh;
      const __m256i hb = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, g), one), 2);
      k.u[g] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * sh), m3), hb);   // 0..7 = q + 4
    }
  }
  // 16 six-bit scales: low nibbles in bytes 0..7 (j < 8) / their high nibbles (j >= 8), two high
  // bits each from bytes 8..11
  uint32_t a[3], r[4];
  std::memcpy(a, b + 96, 12);
  const uint32_t low4 = 0x0f0f0f0f, two = 0x03030303;
  r[0] = (a[0] & low4) | ((a[2] & two) << 4);
  r[1] = (a[1] & low4) | (((a[2] >> 2) & two) << 4);
  r[2] = ((a[0] >> 4) & low4) | (((a[2] >> 4) & two) << 4);
  r[3] = ((a[1] >> 4) & low4) | (((a[2] >> 6) & two) << 4);
  const __m128i sc = _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r)), _mm_set1_epi8(32));
  k.sc[0] = mul_form(_mm256_cvtepi8_epi32(sc));
  k.sc[1] = mul_form(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)));
  k.off16 = _mm256_cvtepi8_epi16(sc);    // times -4: folded into dm
  k.d = f16(b + 108);
  k.dm = -4.f * k.d;
}

template <bool FIVE>
inline void unpack_q45k(const uint8_t* b, UnpackedK& k) {
  const __m128i smv = scale_min_k4(b + 4);
  k.sc[0] = mul_form(_mm256_cvtepu8_epi32(smv));
  k.off8 = _mm_cvtepu8_epi16(_mm_srli_si128(smv, 8));
  const uint8_t* qs = b + (FIVE ? 48 : 16);
  const __m256i m4 = _mm256_set1_epi8(15), one = _mm256_set1_epi8(1);
  __m256i hm = _mm256_setzero_si256();
  if (FIVE) hm = load(b + 16);
  for (int c = 0; c < 4; ++c) {
    const __m256i q = load(qs + 32 * c);
    k.u[2 * c] = _mm256_and_si256(q, m4);
    k.u[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
    if (FIVE) {
      k.u[2 * c] = _mm256_or_si256(k.u[2 * c], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 2 * c), one), 4));
      k.u[2 * c + 1] = _mm256_or_si256(k.u[2 * c + 1], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, 2 * c + 1), one), 4));
    }
  }
  k.d = f16(b);
  k.dm = -f16(b + 2);
}
template <> inline void unpackK<Q4_K>(const uint8_t* b, UnpackedK& k) { unpack_q45k<false>(b, k); }
template <> inline void unpackK<Q5_K>(const uint8_t* b, UnpackedK& k) { unpack_q45k<true>(b, k); }

template <> inline void unpackK<Q6_K>(const uint8_t* b, UnpackedK& k) {
  const __m256i m4 = _mm256_set1_epi8(15), m3 = _mm256_set1_epi8(3);
  for (int half = 0; half < 2; ++half) {
    const __m256i l0 = load(b + 64 * half), l1 = load(b + 64 * half + 32), h = load(b + 128 + 32 * half);
    auto hi = [&](int sh) { return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2 * sh), m3), 4); };
    k.u[4 * half + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), hi(0));
    k.u[4 * half + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), hi(1));
    k.u[4 * half + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), hi(2));
    k.u[4 * half + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), hi(3));
  }
  const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
  k.sc[0] = mul_form(_mm256_cvtepi8_epi32(sc));
  k.sc[1] = mul_form(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8)));
  k.off16 = _mm256_cvtepi8_epi16(sc);    // times -32: folded into dm
  k.d = f16(b + 208);
  k.dm = -32.f * k.d;
}

// Q4_K / Q5_K: the 8 per-32 mins (int16) times the activation block's sums over the same 32 codes
// (pairs of its per-16 sums), as 4 int32 lanes
inline __m128i mins_dot(__m128i off8, const BlockQ8K* x) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x->bsums));
  const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x->bsums + 8));
  return _mm_madd_epi16(off8, _mm_hadd_epi16(lo, hi));
}

// a K-quant row's result: its block-scale lanes (8) plus its offset lanes (4), in a fixed order
inline float hsum_k(__m256 acc, __m128 off) {
  __m128 v = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)), off);
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  return _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
}

template <int64_t T, int R>
void dotK(const uint8_t* w, const uint8_t* xq, int64_t xs, int64_t nb, float* out) {
  constexpr int64_t BYTES = T == Q2_K ? 84 : T == Q3_K ? 110 : T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
  constexpr bool SIXTEEN = T == Q2_K || T == Q3_K || T == Q6_K;
  __m256 acc[R];
  __m128 offacc[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm256_setzero_ps(); offacc[r] = _mm_setzero_ps(); }
  UnpackedK k;
  for (int64_t g = 0; g < nb; ++g) {
    unpackK<T>(w + g * BYTES, k);
    for (int r = 0; r < R; ++r) {
      const BlockQ8K* x = reinterpret_cast<const BlockQ8K*>(xq + r * xs) + g;
      __m256i isum = _mm256_setzero_si256();
      for (int v = 0; v < 8; ++v) isum = dot_scaled(isum, k.u[v], load(x->qs + 32 * v), scale_of<SIXTEEN>(k, v));
      __m128i ioff;
      if constexpr (SIXTEEN) {
        const __m256i p = _mm256_madd_epi16(k.off16, load(x->bsums));
        ioff = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
      } else {
        ioff = mins_dot(k.off8, x);
      }
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(k.d * x->d), acc[r]);
      offacc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(ioff), _mm_set1_ps(k.dm * x->d), offacc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum_k(acc[r], offacc[r]);
}

#if defined(LF_AVX512) && defined(LF_VNNI)
// Q4_K / Q5_K on AVX-512 VNNI: 64 weights (two 32-weight sub-blocks) per 512-bit step, which are 64
// consecutive activations, so q8_K's own layout serves. The sub-block scales are applied by
// vpdpwssd on vpmaddubsw's int16 pair sums (2 instructions per 64 weights) instead of vpdpbusd,
// vpmulld and vpaddd per 32: the one-row Q4_K kernel was bound by its instruction count, not by
// memory, at 7B shapes on Zen 4 (measured 1.1-1.4x per matrix). Q6_K's 512-bit form measured
// slower than its 256-bit one (six-bit codes cost more shifts than they save), so it stays there.
struct UnpackedK512 {
  __m512i u[4];    // codes of weights 64p .. 64p + 63
  __m512i sc[4];   // int16 scale of each code pair's sub-block
  __m128i off8;    // per-32 mins
  float d, dm;
};

template <int64_t T>
inline void unpackK512(const uint8_t* b, UnpackedK512& k) {
  constexpr bool FIVE = T == Q5_K;
  const __m128i smv = scale_min_k4(b + 4);
  const __m512i s16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(smv));
  k.off8 = _mm_cvtepu8_epi16(_mm_srli_si128(smv, 8));
  k.d = f16(b);
  k.dm = -f16(b + 2);
  const uint8_t* qs = b + (FIVE ? 48 : 16);
  const __m512i m4 = _mm512_set1_epi8(15), shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
  __m512i hm = _mm512_setzero_si512();
  if constexpr (FIVE) hm = _mm512_broadcast_i64x4(load(b + 16));
  for (int p = 0; p < 4; ++p) {
    // low nibbles: sub-block 2p, high nibbles: 2p + 1
    k.u[p] = _mm512_and_si512(_mm512_srlv_epi64(_mm512_broadcast_i64x4(load(qs + 32 * p)), shift), m4);
    if constexpr (FIVE) {   // the fifth bit: bit 2p (low half) or 2p + 1 (high half) of qh
      const __mmask64 top = _mm512_test_epi8_mask(
          hm, _mm512_inserti64x4(_mm512_set1_epi8(char(1 << (2 * p))), _mm256_set1_epi8(char(1 << (2 * p + 1))), 1));
      k.u[p] = _mm512_mask_add_epi8(k.u[p], top, k.u[p], _mm512_set1_epi8(16));
    }
    alignas(64) int16_t idx[32];   // int16 lane i of step p: sub-block 2p + i / 16 (vpermw measured
    for (int i = 0; i < 32; ++i) idx[i] = int16_t(2 * p + i / 16);   // faster than vpshufb here)
    k.sc[p] = _mm512_permutexvar_epi16(_mm512_load_si512(idx), s16);
  }
}

template <int64_t T, int R>
void dotK512(const uint8_t* w, const uint8_t* xq, int64_t xs, int64_t nb, float* out) {
  constexpr int64_t BYTES = T == Q4_K ? 144 : 176;
  __m512 acc[R];
  __m128 offacc[R];
  for (int r = 0; r < R; ++r) { acc[r] = _mm512_setzero_ps(); offacc[r] = _mm_setzero_ps(); }
  UnpackedK512 k;
  for (int64_t g = 0; g < nb; ++g) {
    unpackK512<T>(w + g * BYTES, k);
    for (int r = 0; r < R; ++r) {
      const BlockQ8K* x = reinterpret_cast<const BlockQ8K*>(xq + r * xs) + g;
      // two chains of two: vpdpwssd's latency, not its throughput, bounds one row
      __m512i isum[2];
      for (int c = 0; c < 2; ++c) {
        isum[c] = _mm512_dpwssd_epi32(_mm512_setzero_si512(), _mm512_maddubs_epi16(k.u[c], _mm512_loadu_si512(x->qs + 64 * c)), k.sc[c]);
        isum[c] = _mm512_dpwssd_epi32(isum[c], _mm512_maddubs_epi16(k.u[c + 2], _mm512_loadu_si512(x->qs + 64 * (c + 2))), k.sc[c + 2]);
      }
      const __m128i ioff = mins_dot(k.off8, x);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(isum[0], isum[1])), _mm512_set1_ps(k.d * x->d), acc[r]);
      offacc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(ioff), _mm_set1_ps(k.dm * x->d), offacc[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = hsum_k(_mm256_add_ps(_mm512_castps512_ps256(acc[r]), _mm512_extractf32x8_ps(acc[r], 1)), offacc[r]);
}
#define LF_DOTK512 1
#endif

// N consecutive weight rows (stride ws) against the same R rows of x: one type dispatch per range,
// not per row (a row of K = 576 is only 18 blocks). Taking K in chunks shared by groups of rows,
// to keep long rows of x in L1, was tried and measured far slower (Zen 4, one row of x, 2 threads,
// 4096 x 11008 Q4_K: 17.4 -> 9.4 GiB/s: eight interleaved weight streams per thread defeat the
// hardware prefetcher)
template <int R, typename Dot>
void each_row(Dot dot, const uint8_t* w, int64_t ws, int64_t N, float* y, int64_t ldy) {
  float out[R];
  for (int64_t n = 0; n < N; ++n) {
    dot(w + n * ws, out);
    for (int r = 0; r < R; ++r) y[r * ldy + n] = out[r];
  }
}

template <int R>
void qdot_range_r(int64_t type, const uint8_t* w, int64_t ws, int64_t N, const uint8_t* xq, int64_t xs, int64_t K,
                  float* y, int64_t ldy) {
  const int64_t nb32 = K / 32, nbK = K / 256;
#define LF_RUN32(T) return each_row<R>([&](const uint8_t* wr, float* o) { dot32<T, R>(wr, xq, xs, nb32, o); }, w, ws, N, y, ldy)
#define LF_RUNK(T) return each_row<R>([&](const uint8_t* wr, float* o) { dotK<T, R>(wr, xq, xs, nbK, o); }, w, ws, N, y, ldy)
#define LF_RUNK512(T) return each_row<R>([&](const uint8_t* wr, float* o) { dotK512<T, R>(wr, xq, xs, nbK, o); }, w, ws, N, y, ldy)
  switch (type) {
    case Q4_0: LF_RUN32(Q4_0);
    case Q4_1: LF_RUN32(Q4_1);
    case Q5_0: LF_RUN32(Q5_0);
    case Q5_1: LF_RUN32(Q5_1);
    case Q8_0: LF_RUN32(Q8_0);
    case Q2_K: LF_RUNK(Q2_K);
    case Q3_K: LF_RUNK(Q3_K);
#ifdef LF_DOTK512
    case Q4_K: LF_RUNK512(Q4_K);
    case Q5_K: LF_RUNK512(Q5_K);
#else
    case Q4_K: LF_RUNK(Q4_K);
    case Q5_K: LF_RUNK(Q5_K);
#endif
    case Q6_K: LF_RUNK(Q6_K);
    default: return;
  }
#undef LF_RUN32
#undef LF_RUNK
#undef LF_RUNK512
}

}  // namespace

void qdot_range(int64_t type, const uint8_t* w, int64_t ws, int64_t N, const uint8_t* xq, int64_t xs, int R,
                int64_t K, float* y, int64_t ldy) {
  switch (R) {
    case 4: return qdot_range_r<4>(type, w, ws, N, xq, xs, K, y, ldy);
    case 3: return qdot_range_r<3>(type, w, ws, N, xq, xs, K, y, ldy);
    case 2: return qdot_range_r<2>(type, w, ws, N, xq, xs, K, y, ldy);
    default: return qdot_range_r<1>(type, w, ws, N, xq, xs, K, y, ldy);
  }
}

#else
bool has_int8_path() { return false; }
void qdot_range(int64_t, const uint8_t*, int64_t, int64_t, const uint8_t*, int64_t, int, int64_t, float*, int64_t) {}
#endif

}  // namespace lf
