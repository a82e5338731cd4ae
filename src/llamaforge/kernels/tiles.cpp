// Tiles of 16 weight rows (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) on AVX-512 VNNI builds, for
// products with several rows of x (prompts, batched decode).
//
// The one-row kernels (qdot.cpp) give each 512-bit product 16 partial sums of ONE output, so
// every block pays a float conversion and a scale multiply per 64 weights and row of x. Here the
// 16 rows' blocks are transposed in registers as they are read from the file (nothing is copied at
// load): lane l of code vector t[j] holds codes 4j..4j+3 of one weight row, so each dpbusd with
// a broadcast dword of x adds 4 products to 16 different outputs, eight of them finish a block,
// and the float work is one conversion and two FMAs per block (K-quants: per sub-block) for 16
// outputs. A tile is unpacked once into a small per-thread buffer and read by every row of x.
// Unpacking costs more than a one-row product saves: module.cpp calls this for prompts only.
#include "common.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace lf {

#if defined(LF_AVX512) && defined(LF_VNNI)
namespace {

// one block of 16 rows: codes (unsigned), weight scale and offset per lane
struct alignas(64) Tile16 { __m512i t[8]; __m512 wd, wo; };

// after the 4x4 dword transposes, lane l holds weight row 4 * (l % 4) + l / 4; the same map
// puts an output vector back in row order (it is its own inverse)
inline __m512i lane_rows() { return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15); }

// 16 bytes at `off` of rows p, p + ws, p + 2 ws, p + 3 ws: 128-bit chunk k = row k
inline __m512i rows4(const uint8_t* p, int64_t ws, int64_t off) {
  __m512i z = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + off)));
  z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + ws + off)), 1);
  z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * ws + off)), 2);
  return _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 3 * ws + off)), 3);
}

// a, b, c, d hold rows 0-3, 4-7, 8-11, 12-15 (chunk k = row k of each group); o[j] lane
// 4k + q = dword j of row 4q + k
inline void transpose4(__m512i a, __m512i b, __m512i c, __m512i d, __m512i* o) {
  const __m512i t0 = _mm512_unpacklo_epi32(a, b), t1 = _mm512_unpackhi_epi32(a, b);
  const __m512i t2 = _mm512_unpacklo_epi32(c, d), t3 = _mm512_unpackhi_epi32(c, d);
  o[0] = _mm512_unpacklo_epi64(t0, t2);
  o[1] = _mm512_unpackhi_epi64(t0, t2);
  o[2] = _mm512_unpacklo_epi64(t1, t3);
  o[3] = _mm512_unpackhi_epi64(t1, t3);
}

// Every type as w = d * u + o with unsigned codes u: Q4_0 u = n (o = -8 d), Q4_1 u = n (o = m),
// Q8_0 u = q + 128 (o = -128 d); o multiplies the q8 block's sum (s)
template <int64_t T>
inline void unpack(const uint8_t* w, int64_t ws, int64_t g, Tile16& tl) {
  constexpr int64_t B = bytes32<T>();
  const __m512i at = _mm512_mullo_epi32(lane_rows(), _mm512_set1_epi32(int(ws)));
  const __m512i m4 = _mm512_set1_epi8(15);
  {
    const uint8_t* b = w + g * B;
    const __m512i head = _mm512_i32gather_epi32(at, b, 1);   // d (and Q4_1's m) of each lane's row
    tl.wd = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
    if constexpr (T == Q4_1) tl.wo = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
    else tl.wo = _mm512_mul_ps(tl.wd, _mm512_set1_ps(T == Q4_0 ? -8.f : -128.f));
    __m512i z[4];
    if constexpr (T == Q8_0) {
      const __m512i flip = _mm512_set1_epi8(char(0x80));
      for (int h = 0; h < 2; ++h) {
        for (int q = 0; q < 4; ++q) z[q] = _mm512_xor_si512(rows4(b + 4 * q * ws, ws, 2 + 16 * h), flip);
        transpose4(z[0], z[1], z[2], z[3], tl.t + 4 * h);
      }
    } else {
      constexpr int64_t QS = T == Q4_0 ? 2 : 4;
      __m512i hi[4];
      for (int q = 0; q < 4; ++q) {
        const __m512i v = rows4(b + 4 * q * ws, ws, QS);
        z[q] = _mm512_and_si512(v, m4);                          // codes 0..15
        hi[q] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);   // codes 16..31
      }
      transpose4(z[0], z[1], z[2], z[3], tl.t);
      transpose4(hi[0], hi[1], hi[2], hi[3], tl.t + 4);
    }
  }
}

// one block of 16 rows against R rows of x; every row's arithmetic is the same whatever R and
// whichever driver, so a row's result never depends on its batch. Each code vector is loaded once
// for all R rows (a tile of K = 2048 is 40 KiB, more than L1)
template <int R>
inline void accumulate(const Tile16& tl, int64_t g, const Q8Row* x, __m512* acc) {
  const int32_t* xw[R];
  for (int r = 0; r < R; ++r) xw[r] = reinterpret_cast<const int32_t*>(x[r].qs + 32 * g);
  // two chains of four per row: one dependent chain of eight would wait on dpbusd's latency
  __m512i i0[R], i1[R];
  for (int r = 0; r < R; ++r) {
    i0[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), tl.t[0], _mm512_set1_epi32(xw[r][0]));
    i1[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), tl.t[1], _mm512_set1_epi32(xw[r][1]));
  }
  for (int j = 2; j < 8; j += 2) {
    const __m512i a = tl.t[j], b = tl.t[j + 1];
    for (int r = 0; r < R; ++r) {
      i0[r] = _mm512_dpbusd_epi32(i0[r], a, _mm512_set1_epi32(xw[r][j]));
      i1[r] = _mm512_dpbusd_epi32(i1[r], b, _mm512_set1_epi32(xw[r][j + 1]));
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(i0[r], i1[r]));
    acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(tl.wd, _mm512_set1_ps(x[r].d[g])), acc[r]);
    acc[r] = _mm512_fmadd_ps(tl.wo, _mm512_set1_ps(x[r].s[g]), acc[r]);
  }
}

inline void store_rows(const __m512* acc, int R, float* y, int64_t ldy) {
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, _mm512_permutexvar_ps(lane_rows(), acc[r]));
}

// R rows of x against the unpacked tile (every block of it)
template <int R>
void rows32(const Tile16* tiles, int64_t nb, const uint8_t* xq, int64_t xs, float* y, int64_t ldy) {
  Q8Row x[R];
  for (int r = 0; r < R; ++r) x[r] = q8row(xq + r * xs, nb);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < nb; ++g) accumulate<R>(tiles[g], g, x, acc);
  store_rows(acc, R, y, ldy);
}

// ---- K-quants: 256 weights per block, sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q6_K) ------------------
// w = fs[s] * u + fm[s] per sub-block s and lane (fm multiplies the sub-block's sum of x)
struct alignas(64) TileK { __m512i t[64]; float fs[16][16]; float fm[16][16]; };

// codes of 16 bytes at `off` of each of 16 rows, combined by `f` (bytewise, so before the
// transpose) into 4 dwords per row, stored transposed at t[0..3]
template <class F>
inline void codes16(const uint8_t* b, int64_t ws, F f, __m512i* t) {
  __m512i z[4];
  for (int q = 0; q < 4; ++q) z[q] = f(b + 4 * q * ws);
  transpose4(z[0], z[1], z[2], z[3], t);
}

template <int64_t T>
inline void unpack_k(const uint8_t* w, int64_t ws, int64_t g, TileK& tl) {
  constexpr int64_t B = T == Q4_K ? 144 : T == Q5_K ? 176 : 210;
  const __m512i m4 = _mm512_set1_epi8(15), m3 = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  const __m512i at = _mm512_mullo_epi32(lane_rows(), _mm512_set1_epi32(int(ws)));
  {
    const uint8_t* b = w + g * B;
    // per-lane sub-block factors: the rows' scale bytes transposed like the codes, then taken
    // apart in vectors (rounded as dequantization does: d * float(scale))
    if constexpr (T == Q6_K) {
      const __m512i head = _mm512_i32gather_epi32(at, b + 206, 1);   // d: bytes 208, 209
      const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16)));
      __m512i sc[4];   // sc[j] lane: int8 scales 4j..4j+3 of its row
      codes16(b, ws, [&](const uint8_t* p) { return rows4(p, ws, 192); }, sc);
      for (int s = 0; s < 16; ++s) {
        const __m512i v = _mm512_srai_epi32(_mm512_slli_epi32(sc[s / 4], 24 - 8 * (s % 4)), 24);
        const __m512 f = _mm512_mul_ps(d, _mm512_cvtepi32_ps(v));
        _mm512_store_ps(tl.fs[s], f);
        _mm512_store_ps(tl.fm[s], _mm512_mul_ps(f, _mm512_set1_ps(-32.f)));
      }
    } else {
      const __m512i head = _mm512_i32gather_epi32(at, b, 1);   // d, dmin
      const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(head));
      const __m512 ndmin = _mm512_sub_ps(_mm512_setzero_ps(),
                                         _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(head, 16))));
      __m512i a[4];    // a[0..2] lane: the 12 packed scale bytes of its row, as three words
      codes16(b, ws, [&](const uint8_t* p) { return rows4(p, ws, 4); }, a);
      const __m512i six = _mm512_set1_epi32(0x3f3f3f3f), low4 = _mm512_set1_epi32(0x0f0f0f0f);
      const __m512i two = _mm512_set1_epi32(0x03030303), byte = _mm512_set1_epi32(0xff);
      const __m512i scv[2] = {_mm512_and_si512(a[0], six),
                              _mm512_or_si512(_mm512_and_si512(a[2], low4),
                                              _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a[0], 6), two), 4))};
      const __m512i mnv[2] = {_mm512_and_si512(a[1], six),
                              _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(a[2], 4), low4),
                                              _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(a[1], 6), two), 4))};
      for (int s = 0; s < 8; ++s) {
        const int sh = 8 * (s % 4);
        const __m512i sv = _mm512_and_si512(_mm512_srli_epi32(scv[s / 4], sh), byte);
        const __m512i mv = _mm512_and_si512(_mm512_srli_epi32(mnv[s / 4], sh), byte);
        _mm512_store_ps(tl.fs[s], _mm512_mul_ps(d, _mm512_cvtepi32_ps(sv)));
        _mm512_store_ps(tl.fm[s], _mm512_mul_ps(ndmin, _mm512_cvtepi32_ps(mv)));
      }
    }
    // codes: each group of 4 rows' bytes is loaded once and taken apart for every sub-block it holds
    __m512i z[4];
    if constexpr (T == Q6_K) {
      // codes 32v..32v+31 (v = 4h + k): low 4 bits from ql (k < 2: low nibbles of ql[64h + 32k ..],
      // else high nibbles of ql[64h + 32(k - 2) ..]), 2 high bits from qh[32h ..] >> 2k
      for (int h = 0; h < 2; ++h) {
        for (int e = 0; e < 2; ++e) {
          __m512i l0[4], l1[4], qh[4];
          for (int q = 0; q < 4; ++q) {
            const uint8_t* p = b + 4 * q * ws;
            l0[q] = rows4(p, ws, 64 * h + 16 * e);
            l1[q] = rows4(p, ws, 64 * h + 32 + 16 * e);
            qh[q] = rows4(p, ws, 128 + 32 * h + 16 * e);
          }
          for (int k = 0; k < 4; ++k) {
            for (int q = 0; q < 4; ++q) {
              const __m512i l = k & 1 ? l1[q] : l0[q];
              const __m512i lo = k < 2 ? _mm512_and_si512(l, m4) : _mm512_and_si512(_mm512_srli_epi16(l, 4), m4);
              const __m512i hb = _mm512_and_si512(_mm512_srli_epi16(qh[q], 2 * k), m3);
              z[q] = _mm512_or_si512(lo, _mm512_slli_epi16(hb, 4));
            }
            transpose4(z[0], z[1], z[2], z[3], tl.t + 8 * (4 * h + k) + 4 * e);
          }
        }
      }
    } else {
      constexpr int64_t QS = T == Q4_K ? 16 : 48;
      for (int e = 0; e < 2; ++e) {
        __m512i qh[4];
        if constexpr (T == Q5_K) for (int q = 0; q < 4; ++q) qh[q] = rows4(b + 4 * q * ws, ws, 16 + 16 * e);
        for (int c = 0; c < 4; ++c) {   // sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
          __m512i v[4];
          for (int q = 0; q < 4; ++q) v[q] = rows4(b + 4 * q * ws, ws, QS + 32 * c + 16 * e);
          for (int hi = 0; hi < 2; ++hi) {
            for (int q = 0; q < 4; ++q) {
              z[q] = hi ? _mm512_and_si512(_mm512_srli_epi16(v[q], 4), m4) : _mm512_and_si512(v[q], m4);
              if constexpr (T == Q5_K) {   // fifth bit: bit 2c + hi of qh[l]
                const __m512i hb = _mm512_and_si512(_mm512_srli_epi16(qh[q], 2 * c + hi), one);
                z[q] = _mm512_or_si512(z[q], _mm512_slli_epi16(hb, 4));
              }
            }
            transpose4(z[0], z[1], z[2], z[3], tl.t + 8 * (2 * c + hi) + 4 * e);
          }
        }
      }
    }
  }
}

// one block of 16 rows against R rows of x (q8_K); SUB weights per sub-block (32 or 16). Each
// code vector is loaded once for all R rows (a 16-row tile of K = 2048 is 48 KiB: it lives in L2,
// and reading it once per row of x made L2 the bound); every row's arithmetic is what it would be
// alone, in the same order
template <int R, int SUB>
inline void accumulate_k(const TileK& tl, int64_t g, const uint8_t* xq, int64_t xs, __m512* acc) {
  constexpr int J = SUB / 4;   // dwords of x (4 codes each) per sub-block
  alignas(64) float sums[R][16];
  const int32_t* xw[R];
  __m512 blk[R];
  for (int r = 0; r < R; ++r) {
    const BlockQ8K* xb = reinterpret_cast<const BlockQ8K*>(xq + r * xs) + g;
    xw[r] = reinterpret_cast<const int32_t*>(xb->qs);
    _mm512_store_ps(sums[r], _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb->bsums)))));
    blk[r] = _mm512_setzero_ps();
  }
  for (int s = 0; s < 256 / SUB; ++s) {
    const __m512i* t = tl.t + s * J;
    // two chains of J / 2 per row: one dependent chain of J would wait on dpbusd's latency
    __m512i i0[R], i1[R];
    for (int r = 0; r < R; ++r) {
      i0[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t[0], _mm512_set1_epi32(xw[r][s * J]));
      i1[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t[1], _mm512_set1_epi32(xw[r][s * J + 1]));
    }
    for (int j = 2; j < J; j += 2) {
      const __m512i a = t[j], b = t[j + 1];
      for (int r = 0; r < R; ++r) {
        i0[r] = _mm512_dpbusd_epi32(i0[r], a, _mm512_set1_epi32(xw[r][s * J + j]));
        i1[r] = _mm512_dpbusd_epi32(i1[r], b, _mm512_set1_epi32(xw[r][s * J + j + 1]));
      }
    }
    const __m512 fs = _mm512_load_ps(tl.fs[s]), fm = _mm512_load_ps(tl.fm[s]);
    for (int r = 0; r < R; ++r) {
      const float xsum = SUB == 32 ? sums[r][2 * s] + sums[r][2 * s + 1] : sums[r][s];
      blk[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0[r], i1[r])), fs, blk[r]);
      blk[r] = _mm512_fmadd_ps(fm, _mm512_set1_ps(xsum), blk[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const BlockQ8K* xb = reinterpret_cast<const BlockQ8K*>(xq + r * xs) + g;
    acc[r] = _mm512_fmadd_ps(blk[r], _mm512_set1_ps(xb->d), acc[r]);
  }
}

template <int R, int SUB>
void rowsK(const TileK* tiles, int64_t nb, const uint8_t* xq, int64_t xs, float* y, int64_t ldy) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < nb; ++g) accumulate_k<R, SUB>(tiles[g], g, xq, xs, acc);
  store_rows(acc, R, y, ldy);
}

// a function template's instance for R = 1 .. 8 (the rows of x in one pass), chosen at run time
template <int N = 8, class F>
inline void with_rows(int64_t R, F f) {
  if constexpr (N > 1) {
    if (R < N) return with_rows<N - 1>(R, f);
  }
  f(std::integral_constant<int, N>{});
}

// Unpack every block of a tile once, then pass over x MR rows at a time (MR accumulators and a
// block's vectors in the registers: 8 for the 32-weight types, 4 for the K-quants' sub-block loop;
// A/B, one thread, 4096 x 4096: 4 for the 32-weight types 1.0x, 6 for the K-quants 0.72-1.12x)
template <int MR, class Tile, class Unpack, class Rows>
void tile_product(int64_t nb, int64_t M, const uint8_t* xq, int64_t xs, float* y, int64_t ldy, Tile* tiles,
                  Unpack unpack_block, Rows rows) {
  for (int64_t g = 0; g < nb; ++g) unpack_block(g, tiles[g]);
  for (int64_t m = 0; m < M; m += MR) {
    with_rows<MR>(std::min<int64_t>(MR, M - m), [&](auto R) { rows(R, tiles, xq + m * xs, y + m * ldy); });
  }
}

}  // namespace

bool has_tile16(int64_t type) {
  return type == Q4_0 || type == Q4_1 || type == Q8_0 || type == Q4_K || type == Q5_K || type == Q6_K;
}

int64_t tile16_scratch_bytes(int64_t K) {
  return std::max(K / 32 * int64_t(sizeof(Tile16)), K / 256 * int64_t(sizeof(TileK))) + 64;
}

void tile16_matmul(int64_t type, const uint8_t* w, int64_t ws, int64_t K, const uint8_t* xq, int64_t xs, int64_t M,
                   float* y, int64_t ldy, void* scratch) {
  void* buf = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
  auto rows32_any = [&](auto R, const Tile16* t, const uint8_t* x, float* yr) {
    rows32<decltype(R)::value>(t, K / 32, x, xs, yr, ldy);
  };
  auto run32 = [&](auto unpack_block) {
    tile_product<8>(K / 32, M, xq, xs, y, ldy, static_cast<Tile16*>(buf), unpack_block, rows32_any);
  };
  auto runK = [&](auto unpack_block, auto sub) {
    auto rowsK_any = [&](auto R, const TileK* t, const uint8_t* x, float* yr) {
      rowsK<decltype(R)::value, decltype(sub)::value>(t, K / 256, x, xs, yr, ldy);
    };
    tile_product<4>(K / 256, M, xq, xs, y, ldy, static_cast<TileK*>(buf), unpack_block, rowsK_any);
  };
  using S32 = std::integral_constant<int, 32>;
  using S16 = std::integral_constant<int, 16>;
  switch (type) {
    case Q4_0: return run32([&](int64_t g, Tile16& t) { unpack<Q4_0>(w, ws, g, t); });
    case Q4_1: return run32([&](int64_t g, Tile16& t) { unpack<Q4_1>(w, ws, g, t); });
    case Q8_0: return run32([&](int64_t g, Tile16& t) { unpack<Q8_0>(w, ws, g, t); });
    case Q4_K: return runK([&](int64_t g, TileK& t) { unpack_k<Q4_K>(w, ws, g, t); }, S32{});
    case Q5_K: return runK([&](int64_t g, TileK& t) { unpack_k<Q5_K>(w, ws, g, t); }, S32{});
    case Q6_K: return runK([&](int64_t g, TileK& t) { unpack_k<Q6_K>(w, ws, g, t); }, S16{});
    default: return;
  }
}
#else
bool has_tile16(int64_t) { return false; }
int64_t tile16_scratch_bytes(int64_t) { return 0; }
void tile16_matmul(int64_t, const uint8_t*, int64_t, int64_t, const uint8_t*, int64_t, int64_t, float*, int64_t, void*) {}
#endif

}  // namespace lf
