// 16 x 16 transpose of 32-bit lanes in AVX-512 registers, shared by the panels of the bf16
// kernels (codes, isa/lowbit_bf16.cpp) and the fp32 kernels (dequantised weights,
// isa/lowbit_fp32.cpp). Internal linkage: each kernel file gets its own copy built with its flags.
#pragma once

#include <immintrin.h>

namespace sk {
namespace {

// Transposes 16 x 16 u32 in place: v[j] lane i becomes the old v[i] lane j.
inline void transpose16(__m512i v[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 16; i += 2) {  // 32-bit interleave within each 128-bit lane
    a[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    a[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // b[g + c], 128-bit lane L: rows g..g+3 of column 4 L + c
    b[g] = _mm512_unpacklo_epi64(a[g], a[g + 2]);
    b[g + 1] = _mm512_unpackhi_epi64(a[g], a[g + 2]);
    b[g + 2] = _mm512_unpacklo_epi64(a[g + 1], a[g + 3]);
    b[g + 3] = _mm512_unpackhi_epi64(a[g + 1], a[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4 L + c: lane L of b[c], b[4 + c], b[8 + c], b[12 + c]
    const __m512i x0 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0x88), x1 = _mm512_shuffle_i32x4(b[c], b[4 + c], 0xdd);
    const __m512i y0 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0x88), y1 = _mm512_shuffle_i32x4(b[8 + c], b[12 + c], 0xdd);
    v[c] = _mm512_shuffle_i32x4(x0, y0, 0x88);
    v[8 + c] = _mm512_shuffle_i32x4(x0, y0, 0xdd);
    v[4 + c] = _mm512_shuffle_i32x4(x1, y1, 0x88);
    v[12 + c] = _mm512_shuffle_i32x4(x1, y1, 0xdd);
  }
}

}  // namespace
}  // namespace sk
