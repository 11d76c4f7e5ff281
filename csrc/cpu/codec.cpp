#include "cpu/codec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "cpu/bitpack.h"
#include "cpu/thread_pool.h"

namespace sk {
namespace {

constexpr int64_t kRowsPerChunk = 4;  // tokens per work item of the pool

// Per-chunk scratch, sized once per work item.
struct RowScratch {
  std::vector<float> xf;
  std::vector<uint8_t> outlier;
  std::vector<uint8_t> q;
  std::vector<int32_t> cand;
  explicit RowScratch(int64_t d) : xf(d), outlier(d), q(d), cand(d) {}
};

// Sum of squares in float64 (each square is exact there); lanes only reorder the additions.
double sum_squares(const float* x, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) {
    const double v = x[i];
    s += v * v;
  }
  return s;
}

struct Range {
  float lo32, hi;
  double sq;  // float64 sum of squared inliers
};

Range inlier_range(const float* x, const uint8_t* outlier, int64_t d, int64_t n_in) {
  if (n_in == 0) return {0.0f, 0.0f, 0.0};
  float mn = INFINITY, mx = -INFINITY;
  double sq = 0.0;
#pragma omp simd reduction(min : mn) reduction(max : mx) reduction(+ : sq)
  for (int64_t i = 0; i < d; ++i) {
    const float v = x[i];
    const bool in = !outlier[i];
    mn = in ? std::min(mn, v) : mn;
    mx = in ? std::max(mx, v) : mx;
    const double dv = in ? static_cast<double>(v) : 0.0;
    sq += dv * dv;
  }
  // Adding +0 turns a -0 extreme into +0 (FORMATS §3.3), whatever the order of the scan.
  return {mn + 0.0f, mx + 0.0f, sq};
}

inline float step_for(float lo16, float hi, int b) {
  return round_up_fp16((hi - lo16) / static_cast<float>((1 << b) - 1));
}

// Quantises the inliers of one row with width b into q (0 at outliers), per FORMATS step 6.
void quantise(const float* x, const uint8_t* outlier, int64_t d, float lo, float step, int b, uint8_t* q) {
  if (!(step > 0.0f)) {
    std::memset(q, 0, static_cast<size_t>(d));
    return;
  }
  const float qmax = static_cast<float>((1 << b) - 1);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    float v = std::nearbyint((x[i] - lo) / step);
    v = std::min(std::max(v, 0.0f), qmax);
    q[i] = outlier[i] ? 0 : static_cast<uint8_t>(v);
  }
}

void encode_row(const uint8_t* xrow, int dtype, int64_t d, bool abs_threshold, double threshold, int64_t capacity,
                const std::vector<int>& menu, double eps, int forced, int raw, RowScratch& s, int64_t t,
                const EncodeOutputs& o) {
  const int isz = dtype_size(dtype);
  const int64_t row_bytes = d * isz;
  const float* xf = reinterpret_cast<const float*>(xrow);
  if (dtype != kFloat32) {
    to_float(xrow, dtype, d, s.xf.data());
    xf = s.xf.data();
  }

  const double tau = abs_threshold ? threshold : threshold * std::sqrt(sum_squares(xf, d) / static_cast<double>(d));
  int64_t m = 0;
  for (int64_t i = 0; i < d; ++i)
    if (static_cast<double>(std::fabs(xf[i])) > tau) s.cand[m++] = static_cast<int32_t>(i);
  int32_t* cand = s.cand.data();
  if (m > capacity) {
    // Keep the `capacity` largest magnitudes, ties to the lower channel, then list by channel.
    auto before = [xf](int32_t a, int32_t b) {
      const float fa = std::fabs(xf[a]), fb = std::fabs(xf[b]);
      return fa > fb || (fa == fb && a < b);
    };
    std::nth_element(cand, cand + capacity, cand + m, before);
    std::sort(cand, cand + capacity);
    m = capacity;
  }

  int32_t* idx = o.idx + t * capacity;
  uint8_t* val = static_cast<uint8_t*>(o.val) + t * capacity * isz;
  std::memset(idx, 0, static_cast<size_t>(capacity) * 4);
  std::memset(val, 0, static_cast<size_t>(capacity * isz));
  uint8_t* outlier = s.outlier.data();
  std::memset(outlier, 0, static_cast<size_t>(d));
  for (int64_t j = 0; j < m; ++j) {
    idx[j] = cand[j];
    std::memcpy(val + j * isz, xrow + static_cast<int64_t>(cand[j]) * isz, isz);
    outlier[cand[j]] = 1;
  }
  o.cnt[t] = static_cast<int32_t>(m);

  const int64_t n_in = d - m;
  const Range r = inlier_range(xf, outlier, d, n_in);
  const float lo16 = round_down_fp16(r.lo32);
  o.hi[t] = r.hi;

  int b = raw;
  if (forced >= 0) {
    if (forced != raw && std::isfinite(lo16) && std::isfinite(step_for(lo16, r.hi, forced))) b = forced;
  } else {
    const double budget = eps * eps * r.sq;
    for (int cand_b : menu) {
      const double st = step_for(lo16, r.hi, cand_b);
      if (std::isfinite(lo16) && std::isfinite(st) && static_cast<double>(n_in) * st * st / 12.0 <= budget) {
        b = cand_b;
        break;
      }
    }
  }

  uint8_t* crow = o.codes + t * row_bytes;
  o.bits[t] = static_cast<uint8_t>(b);
  if (b == raw) {
    std::memcpy(crow, xrow, static_cast<size_t>(row_bytes));
    for (int64_t j = 0; j < m; ++j) std::memset(crow + static_cast<int64_t>(cand[j]) * isz, 0, isz);
    o.nbytes[t] = static_cast<int32_t>(row_bytes);
    o.lo[t] = 0;
    o.step[t] = 0;
    return;
  }
  const float step = step_for(lo16, r.hi, b);
  quantise(xf, outlier, d, lo16, step, b, s.q.data());
  const int64_t nb = packed_nbytes(d, b);
  pack_row(s.q.data(), d, b, crow);
  std::memset(crow + nb, 0, static_cast<size_t>(row_bytes - nb));
  o.nbytes[t] = static_cast<int32_t>(nb);
  o.lo[t] = float_to_half(lo16);
  o.step[t] = float_to_half(step);
}

}  // namespace

std::string ts_tabq_encode(const void* x, int dtype, int64_t T, int64_t d, bool abs_threshold, double threshold,
                           int64_t capacity, const int* menu, int n_menu, double eps, const uint8_t* forced,
                           const EncodeOutputs& out) {
  const int raw = 8 * dtype_size(dtype);
  if (forced)
    for (int64_t t = 0; t < T; ++t)
      if (!((forced[t] >= 1 && forced[t] <= 8) || forced[t] == raw))
        return "forced_bits entries must be in 1..8 or the raw width " + std::to_string(raw) + ", got " +
               std::to_string(forced[t]);
  // The smallest width that passes wins, so try them in ascending order.
  std::vector<int> widths(menu, menu + n_menu);
  std::sort(widths.begin(), widths.end());
  widths.erase(std::unique(widths.begin(), widths.end()), widths.end());
  const uint8_t* xb = static_cast<const uint8_t*>(x);
  const int64_t row_bytes = d * dtype_size(dtype);
  // The worker pool, not OpenMP: its waits never spin on a core another process holds.
  parallel_for(T, kRowsPerChunk, [&](int64_t t0, int64_t t1) {
    RowScratch s(d);
    for (int64_t t = t0; t < t1; ++t)
      encode_row(xb + t * row_bytes, dtype, d, abs_threshold, threshold, capacity, widths, eps,
                 forced ? forced[t] : -1, raw, s, t, out);
  });
  return "";
}

std::string ts_tabq_decode(const int32_t* bits, const float* lo, const float* step, const int32_t* cnt,
                           const int32_t* idx, const void* val, int64_t capacity, const uint8_t* codes,
                           int64_t codes_stride, int64_t T, int64_t d, int dtype, void* out) {
  const int isz = dtype_size(dtype);
  const int raw = 8 * isz;
  // Validate everything first so a bad buffer never leads to a write out of bounds.
  for (int64_t t = 0; t < T; ++t) {
    const int b = bits[t];
    if (!((b >= 1 && b <= 8) || b == raw))
      return "bits entries must be in 1..8 or the raw width " + std::to_string(raw) + ", got " + std::to_string(b);
    const int64_t need = b == raw ? d * isz : packed_nbytes(d, b);
    if (need > codes_stride)
      return "codes has " + std::to_string(codes_stride) + " bytes per row, token " + std::to_string(t) +
             " needs " + std::to_string(need);
    if (cnt[t] < 0 || cnt[t] > capacity)
      return "cnt entries must be in [0, " + std::to_string(capacity) + "], got " + std::to_string(cnt[t]);
    for (int32_t j = 0; j < cnt[t]; ++j) {
      const int32_t i = idx[t * capacity + j];
      if (i < 0 || i >= d) return "idx entries must be in [0, d=" + std::to_string(d) + "), got " + std::to_string(i);
    }
  }
  uint8_t* ob = static_cast<uint8_t*>(out);
  const uint8_t* vb = static_cast<const uint8_t*>(val);
  parallel_for(T, kRowsPerChunk, [&](int64_t t0, int64_t t1) {
    std::vector<uint8_t> q(d);
    std::vector<float> y(d);
    for (int64_t t = t0; t < t1; ++t) {
      const int b = bits[t];
      uint8_t* orow = ob + t * d * isz;
      const uint8_t* crow = codes + t * codes_stride;
      if (b == raw) {
        std::memcpy(orow, crow, static_cast<size_t>(d * isz));
      } else {
        unpack_row(crow, d, b, q.data());
        const float st = step[t], l = lo[t];
        float* yp = dtype == kFloat32 ? reinterpret_cast<float*>(orow) : y.data();
        const uint8_t* qp = q.data();
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) {
          const float scaled = static_cast<float>(qp[i]) * st;  // two roundings: no FMA (FORMATS step 8)
          yp[i] = scaled + l;
        }
        if (dtype != kFloat32) from_float(yp, d, dtype, orow);
      }
      for (int32_t j = 0; j < cnt[t]; ++j)
        std::memcpy(orow + static_cast<int64_t>(idx[t * capacity + j]) * isz, vb + (t * capacity + j) * isz, isz);
    }
  });
  return "";
}

}  // namespace sk
