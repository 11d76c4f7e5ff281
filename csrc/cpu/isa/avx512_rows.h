// AVX-512 helpers shared by the dot-form low-bit kernels (isa/lowbit_bf16.cpp and
// isa/lowbit_vnni.cpp): output stores (bf16, or fp32 on request), scale loads, reductions of the per-row
// totals. Every function has internal linkage (anonymous namespace), so each kernel file gets
// its own copy compiled with its own -m flags.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/half.h"
#include "cpu/lowbit_kernels.h"

namespace sk {
namespace {

// 16 values of x (fp32 or bf16) from k as fp32.
inline __m512 load16(const float* x, int64_t k) { return _mm512_loadu_ps(x + k); }
inline __m512 load16(const uint16_t* x, int64_t k) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k))), 16));
}

// Sixteen fp32 values to bf16, round to nearest even, NaN kept quiet (as float_to_bf16).
inline __m256i to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one))),
      16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

// y16[0, count) = bf16(v + bias[0, count)), count <= 16 (bias may be null).
inline void store_bf16(uint16_t* y16, const float* v, const float* bias, int64_t count) {
  const __mmask16 m = static_cast<__mmask16>((1u << count) - 1);
  __m512 t = _mm512_maskz_loadu_ps(m, v);
  if (bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, bias));
  _mm256_mask_storeu_epi16(y16, m, to_bf16(t));
}

// Row m, columns [n, n + count) of the bf16 kernels' output (count <= 16): bf16 into y16, or fp32
// into y32 where the caller asked for it; bias added.
inline void store_out(const LowbitProblem& p, int64_t m, int64_t n, const float* v, int64_t count) {
  const float* bias = p.bias ? p.bias + n : nullptr;
  if (!p.y32) return store_bf16(p.y16 + m * p.N + n, v, bias, count);
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1);
  __m512 t = _mm512_maskz_loadu_ps(mask, v);
  if (bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(mask, bias));
  _mm512_mask_storeu_ps(p.y32 + m * p.N + n, mask, t);
}

// Sixteen (or `count` < 16) values of dtype at src + i as fp32. Sixteen are read unmasked and up
// to four fp32 through a 16-byte mask: with the scales in memory, 512-bit masked loads made a
// 4096 x 4096 W4 call at M = 1 with fp32 scales 6-18% slower (bench/results/ops/README.md, s32).
inline __m512 load_as_f32x16(const void* src, int dtype, int64_t i, int64_t count) {
  const __mmask16 m = static_cast<__mmask16>(count >= 16 ? 0xffff : (1u << count) - 1);
  if (dtype == kFloat32) {
    const float* src32 = static_cast<const float*>(src) + i;
    if (count >= 16) return _mm512_loadu_ps(src32);
    if (count <= 4) return _mm512_zextps128_ps512(_mm_maskz_loadu_ps(static_cast<__mmask8>(m), src32));
    return _mm512_maskz_loadu_ps(m, src32);
  }
  const uint16_t* src16 = static_cast<const uint16_t*>(src) + i;
  const __m256i h = count >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src16))
                                : _mm256_maskz_loadu_epi16(m, src16);
  return dtype == kBFloat16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

// Lane r (r < 4) = the sum of v[r]'s sixteen lanes.
inline __m128 reduce4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));  // v0 v1 v0 v1 per 128
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
  const __m512 c = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xee));  // v0 v1 v2 v3
  const __m256 d = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}

// out[m * ld + r] (+)= the lane sum of tot[r][m] (added where `add`, else written). The R * MR
// totals, flattened as i = m * R + r, are reduced four at a time: with R = 2 one reduction
// serves two activation rows (one per activation row left half its lanes idle).
template <int R, int MR>
inline void write_totals(const __m512 (&tot)[R][MR], float* out, int64_t ld, bool add) {
  constexpr int T = R * MR;
  if constexpr (T == 1) {
    const float v = _mm512_reduce_add_ps(tot[0][0]);
    out[0] = add ? out[0] + v : v;
  } else {
    for (int i0 = 0; i0 < T; i0 += 4) {
      const auto t = [&](int i) { i = std::min(i, T - 1); return tot[i % R][i / R]; };
      alignas(16) float lanes[4];
      _mm_store_ps(lanes, reduce4(t(i0), t(i0 + 1), t(i0 + 2), t(i0 + 3)));
      for (int j = 0; j < 4 && i0 + j < T; ++j) {
        float* d = out + (i0 + j) / R * ld + (i0 + j) % R;
        *d = add ? *d + lanes[j] : lanes[j];
      }
    }
  }
}

// The zero-point terms sum_g (z_g - offset * s_g) * xsum[m][g] of groups [g, g + count) (count <=
// 16, group g + i into lane i) for weight rows n0 .. n0 + R - 1 into the dot forms' totals. The
// codes are unsigned (or carry an offset), so where the activations sit far from zero (300 +
// randn) these terms nearly cancel the groups' scaled sums: added once after the last group, the
// totals' rounding put 11008 columns 9.5e-6 (VNNI path) and 4096 columns of 3-bit bf16 parts
// 1.7e-5 from float64; the dot forms add them after every kZeroTermGroups groups (1-2e-6). (A
// helper that added them from inside the group loop made GCC keep the totals on the stack: 4096 x
// 4096 W4 at M = 1 15% slower.)
constexpr int64_t kZeroTermGroups = 16;
template <int R, int MR>
inline void add_zero_terms(__m512 (&tot)[R][MR], const LowbitProblem& p, int64_t n0, const float* xsum, float offset,
                           int64_t g, int64_t count) {
  const __mmask16 gm = static_cast<__mmask16>(count >= 16 ? 0xffff : (1u << count) - 1);
  for (int r = 0; r < R; ++r) {
    const int64_t i = (n0 + r) * p.G + g;
    __m512 zv = load_as_f32x16(p.zero, p.scale_dtype, i, count);
    if (offset != 0.f)
      zv = _mm512_fnmadd_ps(_mm512_set1_ps(offset), load_as_f32x16(p.scale, p.scale_dtype, i, count), zv);
    for (int m = 0; m < MR; ++m)
      tot[r][m] = _mm512_fmadd_ps(zv, _mm512_maskz_loadu_ps(gm, xsum + m * p.G + g), tot[r][m]);
  }
}

// Where a dot-form block reads: groups [g_begin, g_end), and how far ahead each row's chunk is
// prefetched.
struct DotSlice {
  int64_t g_begin, g_end;
  int64_t prefetch;
};

// Weight bytes a span of rows holds where K is read in slices (sliced_rows): every slice goes over
// one span before the next span starts, so the lines the hardware fetched past a row's slice are
// still in the caches when the next slice reads them. Over the whole range, a weight larger than
// the L3 lost them: one thread, Zen 4, weights evicted, bf16 rows, min ms, whole range / 1 MiB
// spans: 11008 x 4096 W8 M = 3 3.98-4.36 / 3.28-3.35, 14336 x 4096 W8 M = 3 5.46-6.08 / 4.29-4.40,
// 4096 x 11008 W4 M = 3 2.52-2.78 / 2.35; warm 4096 x 11008 W8 M = 1 (VNNI) 1.61-1.70 / 1.48-1.51;
// 4096 x 4096 level. 4 MiB spans were 4-10% slower than 1 MiB, 256 KiB ones lost 4096 x 4096 W4
// M = 3-4 by 4-9% (bench/results/ops/s63/experiments.txt).
constexpr int64_t kSliceSpanBytes = 1 << 20;

// Weight rows [n_begin, n_end) for activation rows [m0, m0 + MR) into fp32 sums per (m, n)
// through `block` (R rows at a time; `tail`, one row, for the rest), then the output (bias
// added, store_out), sixteen values at a time. Where `x_group_bytes` (the activation bytes of one
// group, all MR rows) times the groups outgrows `slice_bytes`, K is read slice by slice: every
// row of a span (kSliceSpanBytes) meets the slice of x while it sits in L1 (a whole row of x at M = 4,
// K = 4096 is 32 KiB, as large as L1, and reloading it from L2 for each weight row cost a
// quarter of the call), and each row's chunk is prefetched R rows ahead (its next chunk
// belongs to the next slice). So it is where R > 1 rows are short (under 4 `prefetch`): the
// block's rows lie side by side, and `prefetch` bytes ahead would land in the block itself (at
// 4864 x 896, 448-byte rows, M = 1 took 0.29-0.36 ms that way and 0.22-0.26 this way; long rows
// kept `prefetch`, which measured no worse). Otherwise `prefetch` bytes ahead in the row, and
// one row at a time (R = 1) kStreamPrefetchBytes ahead.
template <int MR, int R, auto block, auto tail>
void sliced_rows(const LowbitProblem& p, int64_t m0, int64_t n_begin, int64_t n_end, int64_t x_group_bytes,
                 int64_t slice_bytes, int64_t prefetch) {
  const int64_t rows = n_end - n_begin;
  const bool sliced = x_group_bytes > 0 && x_group_bytes * p.G > slice_bytes;
  const bool rows_ahead = sliced || (R > 1 && p.row_bytes < 4 * prefetch);
  const int64_t per_slice = sliced ? std::max<int64_t>(1, slice_bytes / x_group_bytes) : p.G;
  thread_local AlignedVector<float> sums;
  sums.resize(MR * rows);
  const int64_t span = sliced ? std::max<int64_t>(R, kSliceSpanBytes / p.row_bytes / R * R) : rows;
  for (int64_t s0 = n_begin; s0 < n_end; s0 += span) {
    const int64_t s1 = std::min(n_end, s0 + span);
    for (int64_t g0 = 0; g0 < p.G; g0 += per_slice) {
      const DotSlice slice{g0, std::min(p.G, g0 + per_slice),
                           rows_ahead ? R * p.row_bytes : R == 1 ? kStreamPrefetchBytes : prefetch};
      int64_t n = s0;
      for (; n + R <= s1; n += R) block(p, m0, n, slice, sums.data() + (n - n_begin), rows, g0 > 0);
      for (; n < s1; ++n) tail(p, m0, n, slice, sums.data() + (n - n_begin), rows, g0 > 0);
    }
  }
  if (p.y_parts) {  // the MR rows are bf16 parts of one fp32 row (smallest last): their sums add up
    for (int64_t r = 0; r < rows; ++r) {
      float v = sums[(MR - 1) * rows + r];
      for (int m = MR - 2; m >= 0; --m) v += sums[m * rows + r];
      p.y_parts[n_begin + r] = v + (p.bias ? p.bias[n_begin + r] : 0.f);
    }
    return;
  }
  for (int m = 0; m < MR; ++m)
    for (int64_t r = 0; r < rows; r += 16)
      store_out(p, m0 + m, n_begin + r, sums.data() + m * rows + r, std::min<int64_t>(16, rows - r));
}

}  // namespace
}  // namespace sk
