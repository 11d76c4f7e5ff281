// Vector primitives of the decode step (see vec.h), written with GCC/Clang vector types of 16
// lanes so that each instruction-set build uses its own register width (one zmm, two ymm or
// four xmm registers per vector).
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu/decode/vec.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector helpers are internal to this file

#ifndef SK_ISA_NS
#error "build with -DSK_ISA_NS=<namespace>"
#endif

namespace sk {
namespace SK_ISA_NS {
namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
constexpr int kRows = 4;  // weight rows per pass: each activation load feeds four FMAs

inline f32x16 loadf(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 16 int8 as fp32 lanes (GCC lowers the generic conversion byte by byte, hence the intrinsics).
inline f32x16 load_i8(const int8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<f32x16>(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__AVX2__)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
  const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
  f32x16 v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  i8x16 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, f32x16);
#endif
}

inline float hsum(f32x16 v) {
  // Once per output row, so a plain loop is cheap enough.
  float t = 0.f;
  for (int i = 0; i < 16; ++i) t += v[i];
  return t;
}

float dot(const float* a, const float* b, int64_t n) {
  f32x16 acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = loadf(a + i) * loadf(b + i) + acc0;
    acc1 = loadf(a + i + 16) * loadf(b + i + 16) + acc1;
  }
  for (; i + 16 <= n; i += 16) acc0 = loadf(a + i) * loadf(b + i) + acc0;
  float t = hsum(acc0 + acc1);
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

template <typename W, f32x16 (*Load)(const W*)>
void rows_kernel(const W* w, int64_t K, const float* x, float* out, int64_t n0, int64_t n1) {
  const int64_t vec_end = K / 16 * 16;
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) {
    const W* r[kRows];
    for (int j = 0; j < kRows; ++j) r[j] = w + (n + j) * K;
    f32x16 acc[kRows] = {};
    for (int64_t k = 0; k < vec_end; k += 16) {
      const f32x16 xv = loadf(x + k);
      for (int j = 0; j < kRows; ++j) acc[j] = Load(r[j] + k) * xv + acc[j];
    }
    for (int j = 0; j < kRows; ++j) {
      float t = hsum(acc[j]);
      for (int64_t k = vec_end; k < K; ++k) t += static_cast<float>(r[j][k]) * x[k];
      out[n + j] = t;
    }
  }
  for (; n < n1; ++n) {
    const W* r = w + n * K;
    f32x16 acc{};
    for (int64_t k = 0; k < vec_end; k += 16) acc = Load(r + k) * loadf(x + k) + acc;
    float t = hsum(acc);
    for (int64_t k = vec_end; k < K; ++k) t += static_cast<float>(r[k]) * x[k];
    out[n] = t;
  }
}

void f32_rows(const float* w, int64_t K, const float* x, const float* bias, float* y, int64_t n0, int64_t n1) {
  rows_kernel<float, loadf>(w, K, x, y, n0, n1);
  if (bias)
    for (int64_t n = n0; n < n1; ++n) y[n] += bias[n];
}

void i8_rows(const int8_t* w, const float* scale, int64_t K, const float* x, const float* bias, float* y,
             int64_t n0, int64_t n1) {
  rows_kernel<int8_t, load_i8>(w, K, x, y, n0, n1);
  for (int64_t n = n0; n < n1; ++n) y[n] = y[n] * scale[n] + (bias ? bias[n] : 0.f);
}

void axpy(float a, const float* x, float* y, int64_t n) {
  int64_t i = 0;
  const f32x16 av = f32x16{} + a;
  for (; i + 16 <= n; i += 16) {
    const f32x16 v = av * loadf(x + i) + loadf(y + i);
    std::memcpy(y + i, &v, sizeof v);
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

const DecodeVec& decode_vec() {
#define SK_STR2(x) #x
#define SK_STR(x) SK_STR2(x)
  static const DecodeVec v{SK_STR(SK_ISA_NS) + 4, dot, f32_rows, i8_rows, axpy};  // name without "isa_"
  return v;
}

}  // namespace SK_ISA_NS
}  // namespace sk
