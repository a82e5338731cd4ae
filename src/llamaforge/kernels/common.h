// Shared declarations of llamaforge's CPU kernels (no torch here: these files compile fast).
//
// Weights are GGML blocks exactly as a GGUF file stores them (ggml-common.h layouts); the type
// numbers are GGML's own. Two matmul paths read them:
//   float32 activations: a row of blocks is dequantized (bit-identical to gguf-py) into a small
//     buffer and multiplied with float32 x: exact weights, float32 arithmetic;
//   8-bit activations: x is quantized once per call to q8 blocks (32 values for the 32-weight
//     types, 256 with per-16 sums for the K-quants, as llama.cpp does) and each weight block is
//     multiplied with integer dot products (AVX2 maddubs/madd, or VNNI dpbusd where the build has it).
#pragma once
#include <cstddef>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define LF_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LF_AVX512 1
#endif
#if defined(LF_AVX2) && ((defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__))
#define LF_VNNI 1
#endif

namespace lf {

enum GGMLType : int64_t {
  F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30,
};

struct TypeInfo { int64_t block; int64_t bytes; };

// (weights per block, bytes per block); block 0 for an unknown type
TypeInfo type_info(int64_t type);

// out[0:K] = the K weights of one row of blocks, rounded exactly as gguf-py's numpy code does
void dequant_row(int64_t type, const uint8_t* w, float* out, int64_t K);

// 8-bit activation blocks
// q8 rows (32-weight types) are arrays: d[nb] floats, s[nb] floats (s = d * sum of the block's
// codes), then the K codes, so consecutive blocks' codes are contiguous (two per 512-bit load)
struct BlockQ8K { float d; int16_t bsums[16]; int8_t qs[256]; };      // bsums: sums of 16 qs

// a q8 row (32-weight types' activations): block scales, block sums (d * sum of codes), codes
struct Q8Row { const float* d; const float* s; const int8_t* qs; };
inline Q8Row q8row(const uint8_t* row, int64_t nb) {
  const float* d = reinterpret_cast<const float*>(row);
  return {d, d + nb, reinterpret_cast<const int8_t*>(row + nb * 8)};
}

template <int64_t T> constexpr int64_t bytes32() { return T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34; }

// 0: this type has no integer path (F16/BF16), 1: q8 (32-value blocks), 2: q8_K (256)
int act_kind(int64_t type);
// bytes of one quantized activation row of K values for `type`'s kind
int64_t act_row_bytes(int64_t type, int64_t K);
void quantize_act_row(int64_t type, const float* x, uint8_t* out, int64_t K);
// whether this build has the integer dot products (AVX2 or better)
bool has_int8_path();
// y[r * ldy + n] = w_n . x_r for the N weight rows at w + n * ws and R <= 4 quantized rows of x
void qdot_range(int64_t type, const uint8_t* w, int64_t ws, int64_t N, const uint8_t* xq, int64_t xs, int R,
                int64_t K, float* y, int64_t ldy);
// out[r] = w . x_r with float32 x (rows at x + r * ldx), R <= 4; buf: scratch of >= 256 floats
// (dequantize 256 weights at a time, then multiply): every type but the has_fast_f32 ones
void fdot_rows(int64_t type, const uint8_t* w, const float* x, int64_t ldx, int R, int64_t K, float* out, float* buf);
// Q4_0 / Q4_1 / Q8_0: y[m * ldy + n] = w_n . x_m for the N weight rows at
// w + n * ws and the M rows of x (contiguous, K each)
bool has_fast_f32(int64_t type);
void fdot_range(int64_t type, const uint8_t* w, int64_t ws, int64_t N, const float* x, int64_t M, int64_t K,
                float* y, int64_t ldy);

// Tiles of 16 weight rows (AVX-512 VNNI builds; tiles.cpp): whether `type` has them, and
// y[m * ldy + n] = w_n . x_m for the 16 rows at w (row stride ws) and the M q8 rows at xq (stride xs)
bool has_tile16(int64_t type);
void tile16_matmul(int64_t type, const uint8_t* w, int64_t ws, int64_t K, const uint8_t* xq, int64_t xs, int64_t M,
                   float* y, int64_t ldy, void* scratch);
// bytes of scratch tile16_matmul needs for K weights per row (one per thread)
int64_t tile16_scratch_bytes(int64_t K);

float half_to_float(uint16_t h);

}  // namespace lf
