// Vector primitives of the decode step (see vec.h), written with GCC/Clang vector types of 16
// lanes so that each instruction-set build uses its own register width (one zmm, two ymm or
// four xmm registers per vector).
#include <cstring>

#include "cpu/decode/vec.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector helpers are internal to this file

#include "cpu/isa_build.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

typedef float f32x16 __attribute__((vector_size(64)));
constexpr int kRows = 4;  // weight rows per pass: each activation load feeds four FMAs

inline f32x16 loadf(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
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

void rows_kernel(const float* w, int64_t K, const float* x, float* out, int64_t n0, int64_t n1) {
  const int64_t vec_end = K / 16 * 16;
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) {
    const float* r[kRows];
    for (int j = 0; j < kRows; ++j) r[j] = w + (n + j) * K;
    f32x16 acc[kRows] = {};
    for (int64_t k = 0; k < vec_end; k += 16) {
      const f32x16 xv = loadf(x + k);
      for (int j = 0; j < kRows; ++j) acc[j] = loadf(r[j] + k) * xv + acc[j];
    }
    for (int j = 0; j < kRows; ++j) {
      float t = hsum(acc[j]);
      for (int64_t k = vec_end; k < K; ++k) t += r[j][k] * x[k];
      out[n + j] = t;
    }
  }
  for (; n < n1; ++n) {
    const float* r = w + n * K;
    f32x16 acc{};
    for (int64_t k = 0; k < vec_end; k += 16) acc = loadf(r + k) * loadf(x + k) + acc;
    float t = hsum(acc);
    for (int64_t k = vec_end; k < K; ++k) t += r[k] * x[k];
    out[n] = t;
  }
}

void f32_rows(const float* w, int64_t K, const float* x, const float* bias, float* y, int64_t n0, int64_t n1) {
  rows_kernel(w, K, x, y, n0, n1);
  if (bias)
    for (int64_t n = n0; n < n1; ++n) y[n] += bias[n];
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
  static const DecodeVec v{SK_ISA_NAME, dot, f32_rows, axpy};
  return v;
}

}  // namespace SK_ISA_NS
}  // namespace sk
