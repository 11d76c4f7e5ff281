#include "cpu/frame_center.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/half.h"
#include "cpu/codec_v2.h"

namespace sk {

bool fit_center_offsets(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                        int kmax, int64_t raw_limit, int8_t* offsets) {
  if (T < kCenterMinTokens) return false;
  const int64_t stride = std::max<int64_t>(1, T / kCenterSamples), item = dtype == kFloat32 ? 4 : 2;
  thread_local std::vector<uint8_t> sample, escapes;
  sample.resize(((T + stride - 1) / stride) * d);
  escapes.resize(d * item);
  int64_t n = 0;  // coded sampled tokens
  for (int64_t t = 0; t < T; t += stride) {
    int32_t n_esc = 0;
    uint8_t raw = 0;
    int64_t totals[3] = {0, 0, 0};
    const std::string err = v2_quantise(static_cast<const uint8_t*>(x) + t * d * item, dtype, 1, d, center, inv, kmax,
                                        raw_limit, sample.data() + n * d, &n_esc, &raw, escapes.data(), totals);
    if (!err.empty()) return false;
    n += raw ? 0 : 1;
  }
  if (n == 0) return false;
  // Per channel the smallest offset o in [-8, 7) whose count of symbols <= kmax + o reaches the
  // lower median's rank, else 7: a bisection over the 16 offsets, all channels at once.
  const int64_t rank = (n - 1) / 2 + 1;
  std::vector<int8_t> lo(d, kCenterLow), hi(d, kCenterHigh);
  std::vector<int16_t> threshold(d);
  std::vector<uint8_t> count(d);
  for (int step = 0; step < 4; ++step) {
    for (int64_t c = 0; c < d; ++c) threshold[c] = static_cast<int16_t>(kmax + ((lo[c] + hi[c]) >> 1));
    std::fill(count.begin(), count.end(), uint8_t{0});
    for (int64_t r = 0; r < n; ++r) {
      const uint8_t* s = sample.data() + r * d;
      for (int64_t c = 0; c < d; ++c) count[c] += static_cast<uint8_t>(s[c] <= threshold[c]);
    }
    for (int64_t c = 0; c < d; ++c) {
      const int8_t mid = static_cast<int8_t>((lo[c] + hi[c]) >> 1);
      if (count[c] >= rank) hi[c] = mid; else lo[c] = static_cast<int8_t>(mid + 1);
    }
  }
  bool any = false;
  for (int64_t c = 0; c < d; ++c) {
    offsets[c] = lo[c];
    any |= lo[c] != 0;
  }
  return any;
}

bool frame_centers(const float* center, const float* step, const int8_t* offsets, int64_t d, float* out) {
  bool finite = true;
  for (int64_t c = 0; c < d; ++c) {
    const float moved = static_cast<float>(offsets[c]) * step[c];  // -ffp-contract=off: two roundings
    out[c] = center[c] + moved;
    finite &= std::isfinite(out[c]);
  }
  return finite;
}

void pack_center_offsets(const int8_t* offsets, int64_t d, uint8_t* out) {
  for (int64_t c = 0; c < d; c += 2) {
    const uint8_t low = static_cast<uint8_t>(offsets[c]) & 15;
    const uint8_t high = c + 1 < d ? static_cast<uint8_t>(offsets[c + 1]) & 15 : 0;
    out[c / 2] = static_cast<uint8_t>(low | high << 4);
  }
}

bool unpack_center_offsets(const uint8_t* in, int64_t d, int8_t* offsets) {
  bool any = false;
  for (int64_t c = 0; c < d; ++c) {
    const int nib = (in[c / 2] >> (4 * (c % 2))) & 15;
    offsets[c] = static_cast<int8_t>((nib ^ 8) - 8);
    any |= nib != 0;
  }
  return any && !(d % 2 && (in[d / 2] >> 4));
}

}  // namespace sk
