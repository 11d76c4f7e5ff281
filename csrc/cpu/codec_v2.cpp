#include "cpu/codec_v2.h"

#include <cmath>
#include <vector>

#include "common/half.h"

namespace sk {

std::string v2_quantise(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                        int kmax, int64_t raw_limit, uint8_t* sym, int32_t* n_esc, uint8_t* raw) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return "v2_quantise: unknown dtype";
  if (kmax < 1 || kmax > 127) return "v2_quantise: kmax must be in [1, 127]";
  if (T < 0 || d < 1) return "v2_quantise: need T >= 0 and d >= 1";
  const float k = static_cast<float>(kmax);
  const uint8_t esc_sym = static_cast<uint8_t>(2 * kmax + 1);
  const int item = dtype_size(dtype);
#pragma omp parallel
  {
    std::vector<float> row(d);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      to_float(static_cast<const uint8_t*>(x) + t * d * item, dtype, d, row.data());
      uint8_t* s = sym + t * d;
      int32_t count = 0;
#pragma omp simd reduction(+ : count)
      for (int64_t c = 0; c < d; ++c) {
        const float v = (row[c] - center[c]) * inv[c];  // -ffp-contract=off: two roundings
        const bool esc = !(std::fabs(v) <= k);
        const float q = std::nearbyint(std::fmin(std::fmax(v, -k), k)) + k;  // ties to even
        s[c] = esc ? esc_sym : static_cast<uint8_t>(q);
        count += esc;
      }
      n_esc[t] = count;
      raw[t] = count > raw_limit;
      if (raw[t])
        for (int64_t c = 0; c < d; ++c) s[c] = 0;
    }
  }
  return "";
}

std::string v2_dequantise(const uint8_t* sym, int64_t T, int64_t d, const float* step, const float* center, int kmax,
                          int dtype, void* out) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return "v2_dequantise: unknown dtype";
  const int item = dtype_size(dtype);
#pragma omp parallel
  {
    std::vector<float> row(d);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      const uint8_t* s = sym + t * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        const float prod = static_cast<float>(static_cast<int>(s[c]) - kmax) * step[c];
        row[c] = prod + center[c];
      }
      from_float(row.data(), d, dtype, static_cast<uint8_t*>(out) + t * d * item);
    }
  }
  return "";
}

}  // namespace sk
