// W8A8 kernels, compiled once per instruction set (CMakeLists.txt builds this file with
// -DSK_ISA_NS=isa_generic / isa_avx2 / isa_avx512 / isa_avx512vnni and the matching -m flags).
//
// The int8 x int8 dot products are exact in int32 on every path:
// * AVX-512 VNNI: vpdpbusd multiplies unsigned by signed bytes, so the weight bytes are
//   offset to u = w + 128 (one xor with 0x80) and the offset is taken back at the end:
//   sum u*x = sum w*x + 128 * sum x, with sum x computed once per activation row. int32 lanes
//   wrap, but the true result fits int32 (the caller bounds K), so the modular result is it.
// * AVX-512 / AVX2 without VNNI: both operands sign-extended to int16, vpmaddwd (pairs of
//   products below 2^15 each, summed in int32).
// * generic: plain integer loops.
//
// Register tiles: MR activation rows x NR weight rows (NR a multiple of 4), one int32 vector
// accumulator per pair, summed across lanes four at a time at the end. Weight rows are walked in blocks that stay in L2 while every
// activation tile passes over them, so each weight byte is read from memory once per call.
//
// Rescaling repeats the reference's fp32 operations in its order, (acc * s_x) * s_w + bias,
// so this file is built with -ffp-contract=off (no fused multiply-add may change a rounding).
#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common/half.h"
#include "cpu/int8_kernels.h"

#include "cpu/isa_build.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

// SK_INT8_SIMD: 0 scalar, 1 vpmaddwd (AVX2 / AVX-512), 2 vpdpbusd (AVX-512 VNNI).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SK_INT8_SIMD 2
constexpr int kStep = 64;  // bytes of K per vector step
using Acc = __m512i;
#elif defined(__AVX512BW__)
#define SK_INT8_SIMD 1
constexpr int kStep = 32;
using Acc = __m512i;
#elif defined(__AVX2__)
#define SK_INT8_SIMD 1
constexpr int kStep = 16;
using Acc = __m256i;
#else
#define SK_INT8_SIMD 0
#endif

constexpr int kMaxMR = 4, kMaxNR = 8;
constexpr int64_t kBlockBytes = 128 << 10;  // weight rows per block: about half an L2
constexpr int64_t kL1AheadBytes = 16 << 10;  // the largest weight tile prefetched into L1 (half of it)
// One activation tile (decode: one row, or two to four) against weight rows of at least this many
// bytes (VNNI): the tile's weight rows one after another, so the weight is read in address order
// and the hardware prefetcher keeps up, with no software prefetch (which slowed such a stream).
// Step by step across the tile's rows, each row a short stream of its own, the hardware
// prefetcher did not, and the tile-after-next prefetch below reached ~15-20 GB/s of the ~30 one
// core reads. One thread, Zen 4, weights evicted, median ms, across / in order, M = 1: 49152 x
// 4096 9.9-10.0 / 6.5-7.0, 14336 x 4096 3.0-3.1 / 2.1-2.2, 32000 x 2048 4.4-4.5 / 2.3-2.4, 32000 x
// 1024 2.15-2.24 / 1.66-1.77, 151936 x 896 7.7-7.9 / 6.3-6.6, 49152 x 768 2.23-2.27 / 1.80-1.86;
// level at K = 640-704, slower at 576 (SmolLM2's head, 1.29-1.44 / 1.41-2.10). M = 2 (the native
// head's two int8 rows a token): 49152 x 4096 12.6-13.0 / 8.3-8.9, 14336 x 4096 3.85 / 2.6-2.9,
// 32000 x 2048 4.1-4.7 / 2.9-3.4, 49152 x 1536 4.04-4.11 / 3.57-3.72; level at 1024-1280 and
// slower at 896 (4.9-5.2 / 6.1-6.6). Below these K the prefetch across the tile stays
// (bench/results/edge_decode/s65/experiments.txt). Without VNNI (vpmaddwd: AVX2, AVX-512) one
// row in order won at every K measured, 576 to 4096 (the same Zen 4 run on those ISAs,
// across / in order, M = 1: AVX2 151936 x 896 12.0-12.9 / 5.8-6.6, 49152 x 4096 12.9-13.1 /
// 7.8-8.5, 49152 x 576 1.41-1.67 / 1.18-1.28), two to four rows from the same K = 1536 (AVX2 M = 2
// 49152 x 4096 16.0-17.0 / 10.7, 32000 x 2048 6.2-6.3 / 2.9; bench/results/edge_decode/s66/).
constexpr int64_t kInOrderMinK = SK_INT8_SIMD == 2 ? 768 : 576;  // one activation row
constexpr int64_t kInOrderMinKRows = 1536;                      // two to four

#if SK_INT8_SIMD > 0
inline Acc zero() {
#if defined(__AVX512F__)
  return _mm512_setzero_si512();
#else
  return _mm256_setzero_si256();
#endif
}

// The lane sums of four accumulators as one vector {sum a, sum b, sum c, sum d}: two rounds
// of interleave-and-add leave each 128-bit lane holding partial sums of a, b, c, d in order.
inline __m128i reduce4(Acc a, Acc b, Acc c, Acc d) {
#if defined(__AVX512F__)
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
#else
  const __m256i ab = _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
  const __m256i cd = _mm256_add_epi32(_mm256_unpacklo_epi32(c, d), _mm256_unpackhi_epi32(c, d));
  const __m256i h = _mm256_add_epi32(_mm256_unpacklo_epi64(ab, cd), _mm256_unpackhi_epi64(ab, cd));
#endif
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
#endif

#if SK_INT8_SIMD == 2
// One step of K: acc[m][r] += x[m] . w[r] over 64 bytes (mask: the K tail, zeros elsewhere;
// a masked-out weight byte becomes 0x80 after the flip and meets a zero activation).
template <int MR, int NR>
inline void step(Acc acc[MR][NR], const int8_t* x, int64_t K, const int8_t* const* wr, int64_t k, __mmask64 mask) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i wv[NR];
  for (int r = 0; r < NR; ++r) wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, wr[r] + k), flip);
  for (int m = 0; m < MR; ++m) {
    const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + m * K + k);
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], wv[r], xv);
  }
}
#elif SK_INT8_SIMD == 1
inline Acc widen(const int8_t* p) {
#if defined(__AVX512BW__)
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
}

inline Acc madd_add(Acc acc, Acc a, Acc b) {
#if defined(__AVX512BW__)
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}
#endif

#if SK_INT8_SIMD > 0
// acc[m][r] += x row m . w row r over all of K, one weight row after another (kInOrderMinK);
// without VNNI the K tail past the last whole step is left to the caller, as in dot_tile.
template <int MR, int NR>
inline void rows_in_order(Acc acc[MR][NR], const int8_t* x, int64_t K, const int8_t* const* wr) {
  const int64_t whole = K / kStep * kStep;
#if SK_INT8_SIMD == 2
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int r = 0; r < NR; ++r)
    for (int64_t k = 0; k < whole; k += kStep) {
      const __m512i wv = _mm512_xor_si512(_mm512_loadu_si512(wr[r] + k), flip);
      for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], wv, _mm512_loadu_si512(x + m * K + k));
    }
  if (whole < K) step<MR, NR>(acc, x, K, wr, whole, ~__mmask64{0} >> (kStep - (K - whole)));
#else
  for (int r = 0; r < NR; ++r)
    for (int64_t k = 0; k < whole; k += kStep) {
      const Acc wv = widen(wr[r] + k);
      for (int m = 0; m < MR; ++m) acc[m][r] = madd_add(acc[m][r], wv, widen(x + m * K + k));
    }
#endif
}
#endif

// out[m][r] = exact dot(x row m, w row r) over K for an MR x NR tile (InOrder: see kInOrderMinK).
template <int MR, int NR, bool InOrder>
void dot_tile(const int8_t* x, const int32_t* xsum, int64_t K, const int8_t* const* wr, int32_t out[kMaxMR][kMaxNR]) {
#if SK_INT8_SIMD > 0
  Acc acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = zero();
#if SK_INT8_SIMD == 2
  if constexpr (InOrder) {
    rows_in_order<MR, NR>(acc, x, K, wr);
  } else {
    int64_t k = 0;
    for (; k + kStep <= K; k += kStep) step<MR, NR>(acc, x, K, wr, k, ~__mmask64{0});
    if (k < K) step<MR, NR>(acc, x, K, wr, k, ~__mmask64{0} >> (kStep - (K - k)));
  }
  for (int m = 0; m < MR; ++m) {
    const __m128i offset = _mm_set1_epi32(static_cast<int32_t>(128u * static_cast<uint32_t>(xsum[m])));
    for (int r = 0; r < NR; r += 4) {
      const __m128i t = reduce4(acc[m][r], acc[m][r + 1], acc[m][r + 2], acc[m][r + 3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&out[m][r]), _mm_sub_epi32(t, offset));
    }
  }
#else
  (void)xsum;
  const int64_t vec_end = K / kStep * kStep;
  if constexpr (InOrder) {
    rows_in_order<MR, NR>(acc, x, K, wr);
  } else {
    for (int64_t k = 0; k < vec_end; k += kStep) {
      Acc wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = widen(wr[r] + k);
      for (int m = 0; m < MR; ++m) {
        const Acc xv = widen(x + m * K + k);
        for (int r = 0; r < NR; ++r) acc[m][r] = madd_add(acc[m][r], wv[r], xv);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; r += 4) {
      const __m128i t = reduce4(acc[m][r], acc[m][r + 1], acc[m][r + 2], acc[m][r + 3]);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(&out[m][r]), t);
      for (int i = r; i < r + 4; ++i)
        for (int64_t k = vec_end; k < K; ++k) out[m][i] += int32_t{x[m * K + k]} * wr[i][k];
    }
#endif
#else
  (void)xsum;
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const int8_t* xm = x + m * K;
      const int8_t* w = wr[r];
      int32_t t = 0;
      for (int64_t k = 0; k < K; ++k) t += int32_t{xm[k]} * w[k];
      out[m][r] = t;
    }
#endif
}

// dot_tile for the runtime row count mr <= MR.
template <int MR, int NR, bool InOrder>
void dot_tile_upto(int64_t mr, const int8_t* x, const int32_t* xsum, int64_t K, const int8_t* const* wr,
                   int32_t out[kMaxMR][kMaxNR]) {
  if (mr == MR) {
    dot_tile<MR, NR, InOrder>(x, xsum, K, wr, out);
  } else if constexpr (MR > 1) {
    dot_tile_upto<MR - 1, NR, InOrder>(mr, x, xsum, K, wr, out);
  }
}

// y = (acc * s_x) * s_w (+ bias), each step one rounded fp32 operation, as in the reference.
void store_tile(const Int8Problem& p, int64_t m0, int64_t mr, int64_t n0, int64_t nr, const int32_t out[kMaxMR][kMaxNR]) {
  for (int64_t m = 0; m < mr; ++m)
    for (int64_t r = 0; r < nr; ++r) {
      float v = static_cast<float>(out[m][r]) * p.xs[m0 + m];
      v = v * p.w_scale[n0 + r];
      if (p.bias) v = v + p.bias[n0 + r];
      store_from_float(p.y, p.dtype, (m0 + m) * p.N + n0 + r, v);
    }
}

// Columns [n_begin, n_end): weight rows in L2-sized blocks; per block, every activation tile
// meets every NR-row weight tile.
template <int MR, int NR, bool InOrder = false>
void rows_t(const Int8Problem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.K;
  const int64_t block = std::max<int64_t>(NR, kBlockBytes / std::max<int64_t>(K, 1) / NR * NR);
  int32_t out[kMaxMR][kMaxNR];
  for (int64_t b0 = n_begin; b0 < n_end; b0 += block) {
    const int64_t b1 = std::min(n_end, b0 + block);
    for (int64_t m0 = 0; m0 < p.M; m0 += MR) {
      const int64_t mr = std::min<int64_t>(MR, p.M - m0);
      for (int64_t n0 = b0; n0 < b1; n0 += NR) {
        const int64_t nr = std::min<int64_t>(NR, b1 - n0);
#if SK_INT8_SIMD > 0
        // One activation tile (decode): each weight byte is used once, and the hardware
        // prefetcher does not keep up with the tile's row streams, so fetch the tile after next
        // (2.5-3x faster on SmolLM2's 49152 x 576 head at M = 1 and 2, one thread): into L1
        // where two tiles fit half of it, else into L2 (a 32 KiB tile at K = 4096 pushed the
        // current one out of L1: 49152 x 4096 at M = 1 10.4-11.1 -> 9.6-10.0 ms, M = 2 13.0-13.8
        // -> 12.1-12.9).
        if (!InOrder && p.M <= MR) {
          const char* ahead = reinterpret_cast<const char*>(p.w + (n0 + 2 * NR) * K);
          const char* end = reinterpret_cast<const char*>(p.w + n_end * K);
          if (NR * K <= kL1AheadBytes) {
            for (int64_t off = 0; off < NR * K && ahead + off < end; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
          } else {
            for (int64_t off = 0; off < NR * K && ahead + off < end; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T1);
          }
        }
#endif
        // A short last tile repeats its first row: computed, never stored.
        const int8_t* wr[NR];
        for (int r = 0; r < NR; ++r) wr[r] = p.w + (n0 + (r < nr ? r : 0)) * K;
        dot_tile_upto<MR, NR, InOrder>(mr, p.xq + m0 * K, p.xsum + m0, K, wr, out);
        store_tile(p, m0, mr, n0, nr, out);
      }
    }
  }
}

void rows(const Int8Problem& p, int64_t n_begin, int64_t n_end) {
  // One activation row streams eight weight rows at a time; more rows share 4 x 4 tiles.
#if SK_INT8_SIMD > 0
  const bool in_order = p.K >= (p.M == 1 ? kInOrderMinK : kInOrderMinKRows) && p.M <= 4;
#else
  const bool in_order = false;
#endif
  if (p.M == 1)
    in_order ? rows_t<1, 8, true>(p, n_begin, n_end) : rows_t<1, 8>(p, n_begin, n_end);
  else
    in_order ? rows_t<4, 4, true>(p, n_begin, n_end) : rows_t<4, 4>(p, n_begin, n_end);
#if defined(__AVX__)
  // The caller's code is SSE (the package's baseline), and GCC left out the vzeroupper at the
  // end of the 4 x 4 tiles: with the upper halves dirty, the native step's scalar code after the
  // head ran up to 3x slower on Zen 4 (bench/results/edge_decode/s66/experiments.txt).
  _mm256_zeroupper();
#endif
}

// q = clamp(round_half_even(x / s), -127, 127) with s = amax / 127: an IEEE division per
// element, as the reference computes it (a reciprocal would round differently).
float quantize_row(const float* x, int64_t K, int8_t* q, int32_t* qsum) {
  int64_t k = 0;
  float amax = 0.f;
#if defined(__AVX512F__)
  __m512 vmax = _mm512_setzero_ps();
  for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  amax = _mm512_reduce_max_ps(vmax);
#endif
  for (; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  float s = amax / 127.0f;
  if (!(s > 0.0f)) s = 1.0f;
  k = 0;
  int32_t sum = 0;
#if defined(__AVX512F__)
  const __m512 sv = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  __m512i vsum = _mm512_setzero_si512();
  for (; k + 16 <= K; k += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + k), sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i qi = _mm512_cvttps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi));
    vsum = _mm512_add_epi32(vsum, qi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(qi));
  }
  sum = _mm512_reduce_add_epi32(vsum);
#endif
  for (; k < K; ++k) {
    const float v = std::nearbyint(x[k] / s);
    q[k] = static_cast<int8_t>(std::min(std::max(v, -127.0f), 127.0f));
    sum += q[k];
  }
  *qsum = sum;
  return s;
}

}  // namespace

const Int8Kernels& int8_kernels() {
  static const Int8Kernels k{quantize_row, rows};
  return k;
}

}  // namespace SK_ISA_NS
}  // namespace sk
