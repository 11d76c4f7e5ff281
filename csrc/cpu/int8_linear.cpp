// W8A8 linear: per-token int8 quantisation of x, exact int32 dot products against int8
// weights, fp32 rescale. Every floating-point step repeats the reference's operations in
// its order, so the result equals the reference bit for bit (not just within a tolerance).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/half.h"
#include "cpu/linear.h"
#include "cpu/thread_pool.h"

namespace sk {
namespace {

constexpr int kRowBlock = 4;

float quantize_row(const float* x, int64_t K, int8_t* q) {
  float amax = 0.0f;
#pragma omp simd reduction(max : amax)
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  float s = amax / 127.0f;
  if (!(s > 0.0f)) s = 1.0f;
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    const float v = std::nearbyint(x[k] / s);
    q[k] = static_cast<int8_t>(std::min(std::max(v, -127.0f), 127.0f));
  }
  return s;
}

}  // namespace

std::string int8_linear(const void* x, int dtype, int64_t M, int64_t K, const int8_t* w, int64_t N,
                        const float* w_scale, const float* bias, void* y) {
  if (K >= (int64_t{1} << 31) / (127 * 127)) return "K is too large for exact int32 accumulation";
  std::vector<int8_t> xq(static_cast<size_t>(M * K));
  std::vector<float> xs(M);
  parallel_for(M, 4, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(K);
    for (int64_t m = m0; m < m1; ++m) {
      to_float(static_cast<const uint8_t*>(x) + m * K * dtype_size(dtype), dtype, K, row.data());
      xs[m] = quantize_row(row.data(), K, xq.data() + m * K);
    }
  });
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  parallel_for(blocks, 32, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kRowBlock;
      const int64_t rows = std::min<int64_t>(kRowBlock, N - n0);
      // A short last block repeats its first row rather than reading past the weights.
      const int8_t* wr[kRowBlock];
      for (int r = 0; r < kRowBlock; ++r) wr[r] = w + (n0 + (r < rows ? r : 0)) * K;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xm = xq.data() + m * K;
        int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < K; ++k) {
          const int32_t xv = xm[k];
          a0 += wr[0][k] * xv;
          a1 += wr[1][k] * xv;
          a2 += wr[2][k] * xv;
          a3 += wr[3][k] * xv;
        }
        const int32_t acc[kRowBlock] = {a0, a1, a2, a3};
        for (int64_t r = 0; r < rows; ++r) {
          float v = static_cast<float>(acc[r]) * xs[m];
          v = v * w_scale[n0 + r];
          if (bias) v = v + bias[n0 + r];
          store_from_float(y, dtype, m * N + n0 + r, v);
        }
      }
    }
  });
  return "";
}

}  // namespace sk
