#include "cpu/frame_center.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/codec_v2.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SK_CENTER_X86 1
#endif

namespace sk {
namespace {

// count[c] = how many of the n sample rows [n, d] hold a symbol < limit[c] (n <= 255). Row by row,
// so the sample is read in order (a column walk at a stride of d bytes would keep hitting the same
// L1 sets), 64 channels (AVX-512 BW) or 32 (AVX2) at a time, the tail channel by channel.
void count_below_scalar(const uint8_t* sample, int64_t n, int64_t d, const uint8_t* limit, uint8_t* count,
                        int64_t c0 = 0) {
  for (int64_t c = c0; c < d; ++c) count[c] = 0;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = c0; c < d; ++c) count[c] = static_cast<uint8_t>(count[c] + (sample[r * d + c] < limit[c]));
}

#ifdef SK_CENTER_X86
__attribute__((target("avx512f,avx512bw"))) void count_below_avx512(const uint8_t* sample, int64_t n, int64_t d,
                                                                    const uint8_t* limit, uint8_t* count) {
  const int64_t full = d / 64 * 64;
  for (int64_t c = 0; c < full; c += 64) _mm512_storeu_si512(count + c, _mm512_setzero_si512());
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = sample + r * d;
    for (int64_t c = 0; c < full; c += 64) {
      const __mmask64 below = _mm512_cmplt_epu8_mask(_mm512_loadu_si512(row + c), _mm512_loadu_si512(limit + c));
      const __m512i counted = _mm512_loadu_si512(count + c);
      _mm512_storeu_si512(count + c, _mm512_mask_sub_epi8(counted, below, counted, _mm512_set1_epi8(-1)));
    }
  }
  count_below_scalar(sample, n, d, limit, count, full);
}

__attribute__((target("avx2"))) void count_below_avx2(const uint8_t* sample, int64_t n, int64_t d,
                                                      const uint8_t* limit, uint8_t* count) {
  const int64_t full = d / 32 * 32;
  for (int64_t c = 0; c < full; c += 32) _mm256_storeu_si256(reinterpret_cast<__m256i*>(count + c), _mm256_setzero_si256());
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* row = sample + r * d;
    for (int64_t c = 0; c < full; c += 32) {
      const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
      const __m256i lim = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(limit + c));
      const __m256i at_least = _mm256_cmpeq_epi8(_mm256_max_epu8(s, lim), s);  // s >= limit
      __m256i* counted = reinterpret_cast<__m256i*>(count + c);
      _mm256_storeu_si256(counted, _mm256_sub_epi8(_mm256_loadu_si256(counted),
                                                   _mm256_andnot_si256(at_least, _mm256_set1_epi8(-1))));
    }
  }
  count_below_scalar(sample, n, d, limit, count, full);
}
#endif

// The count pass of the instruction set the fused v2 passes use (v2_isa), so a test can run each.
void count_below(const uint8_t* sample, int64_t n, int64_t d, const uint8_t* limit, uint8_t* count) {
#ifdef SK_CENTER_X86
  const std::string isa = v2_isa();
  if (isa == "avx512") return count_below_avx512(sample, n, d, limit, count);
  if (isa == "avx2") return count_below_avx2(sample, n, d, limit, count);
#endif
  count_below_scalar(sample, n, d, limit, count);
}

}  // namespace

bool center_offsets_of_symbols(const uint8_t* sym, const uint8_t* raw, int64_t rows, int64_t d, int kmax,
                               int8_t* offsets) {
  if (rows < 1 || rows > kCenterMaxRows || d < 1) return false;
  const uint8_t* sample = sym;
  int64_t n = rows;  // the coded rows
  if (std::any_of(raw, raw + rows, [](uint8_t r) { return r != 0; })) {
    thread_local std::vector<uint8_t> coded;  // the coded rows packed to the front
    coded.resize(rows * d);
    n = 0;
    for (int64_t r = 0; r < rows; ++r)
      if (!raw[r]) std::memcpy(coded.data() + d * n++, sym + r * d, d);
    sample = coded.data();
  }
  if (n == 0) return false;
  // Per channel the smallest offset o in [-8, 7) whose count of symbols <= kmax + o reaches the
  // lower median's rank, else 7: a bisection over the 16 offsets, all channels at once, in bytes
  // (symbols < limit, limit = kmax + o + 1 in [0, 135]) so that the count pass is a byte compare.
  const uint8_t rank8 = static_cast<uint8_t>((n - 1) / 2 + 1);  // n <= 255
  thread_local std::vector<int8_t> lo_v, hi_v;
  thread_local std::vector<uint8_t> limit_v, count_v;
  lo_v.assign(d, kCenterLow);
  hi_v.assign(d, kCenterHigh);
  limit_v.resize(d);
  count_v.resize(d);
  // Local restrict pointers: the thread-local vectors' data would otherwise be reloaded per channel.
  int8_t* __restrict lo = lo_v.data();
  int8_t* __restrict hi = hi_v.data();
  uint8_t* __restrict limit = limit_v.data();
  uint8_t* __restrict count = count_v.data();
  for (int step = 0; step < 4; ++step) {
    for (int64_t c = 0; c < d; ++c) {
      const int bound = kmax + ((lo[c] + hi[c]) >> 1) + 1;
      limit[c] = static_cast<uint8_t>(bound < 0 ? 0 : bound);
    }
    count_below(sample, n, d, limit, count);
    for (int64_t c = 0; c < d; ++c) {  // branch-free, so that it vectorises: reached ? hi = mid : lo = mid + 1
      const int8_t mid = static_cast<int8_t>((lo[c] + hi[c]) >> 1);
      const int8_t reached = static_cast<int8_t>(-static_cast<int8_t>(count[c] >= rank8));
      hi[c] = static_cast<int8_t>((mid & reached) | (hi[c] & ~reached));
      lo[c] = static_cast<int8_t>(((mid + 1) & ~reached) | (lo[c] & reached));
    }
  }
  std::memcpy(offsets, lo, d);
  return std::any_of(lo, lo + d, [](int8_t o) { return o != 0; });
}

bool fit_center_offsets(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                        int kmax, int64_t raw_limit, int8_t* offsets) {
  if (T < kCenterMinTokens || d < 1) return false;
  const int64_t stride = std::max<int64_t>(1, T / kCenterSamples);
  const int64_t rows = (T + stride - 1) / stride;  // at most 80 from T = 256 on
  thread_local std::vector<uint8_t> sample, raw;
  thread_local std::vector<int32_t> n_esc;
  sample.resize(rows * d);
  raw.resize(rows);
  n_esc.resize(rows);
  int64_t totals[3] = {0, 0, 0};
  if (!v2_quantise(x, dtype, rows, d, center, inv, kmax, raw_limit, sample.data(), n_esc.data(), raw.data(), nullptr,
                   totals, stride)
           .empty())
    return false;
  return center_offsets_of_symbols(sample.data(), raw.data(), rows, d, kmax, offsets);
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
