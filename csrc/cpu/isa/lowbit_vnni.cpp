// 8-bit (and 4-, 3- and 2-bit) codes x one or two bf16 or fp32 activation rows (the decode step) on CPUs with
// AVX-512 VNNI, with integer products: vpdpbusd multiplies 64 unsigned bytes (the codes, as they are
// packed) with 64 signed bytes and adds each four products into an int32 lane. 8-bit codes need no
// decode at all, against ten vector operations per 64 codes to make bf16 values of them
// (isa/lowbit_bf16.cpp); 4-bit codes one and, or one shift and one and, per 64 codes (each
// 64-byte chunk's low nibbles, codes 2 i, then its high ones against the odd activations).
// 4-bit rows here against the bf16 kernels' dot form, groups of 128, one thread, us: M = 1
// 576 x 1536 31.2-35.0 / 23.6-26.2, 4864 x 896 147 / 108, 896 x 896 30.0 / 22.8, 1536 x 1536 75.0 /
// 55.0; M = 2 48.8 / 37.7, 240 / 177 (two threads 21.0 / 17.2, 76.4 / 56.2, M = 2 121.8 / 91.9); on
// this Xeon limited to AVX-512 BF16 30.7 / 23.3, or to AVX-512 VNNI (fp32 kernels) 42.4 / 23.3.
// Groups of 64 codes take half a chunk's sum lanes each, so a row may end in half a chunk (K = 576):
// one thread, M = 1, 1536 x 576 0.037-0.039 -> 0.029-0.031 ms, 4864 x 896 0.152-0.161 ->
// 0.120-0.128, M = 2 1536 x 576 0.054-0.057 -> 0.047-0.049; two threads 1536 x 576 M = 1 0.021-0.023 ->
// 0.017-0.019. 2-bit codes the same way as four fields a byte
// (a shift and an and per 64 codes; groups of 128 as half a chunk), and with 4-bit codes at any K,
// also for bf16 rows (one thread, ms, before / this): bf16 W2 M = 1 576 x 1536 0.028 / 0.019, 4864
// x 896 0.159 / 0.103, M = 2 0.244 / 0.158, 4096 x 4096 0.493 / 0.327 (weights evicted 0.520-0.537
// / 0.354-0.361), M = 2 0.772 / 0.489; W4 4096 x 4096 M = 1 0.496 / 0.407-0.413 (evicted
// 0.533-0.534 / 0.464-0.479), M = 2 0.81-0.82 / 0.64-0.65, 896 x 4864 0.130 / 0.098; fp32 W2
// 4096 x 4096 M = 1 0.561 / 0.300, M = 2 0.752 / 0.471.
// Groups of a quarter or less of a chunk (session 55: W2 in groups of 64 and 32, W4 of 32 and 16,
// W8 of 32 and 16) take the same per-chunk step, each lane's unit * scale spread from the groups'
// (one permute): one thread, ms, the fp32 kernels or bf16 kernels before / this, fp32 rows: W2 g64
// M = 1 1536 x 576 0.042-0.051 / 0.032-0.035, 4864 x 896 0.220-0.237 / 0.115-0.131, 4096 x 4096
// 0.81-0.83 / 0.39-0.41 (weights evicted 0.92-1.00 / 0.65-0.81), M = 2 576 x 1536 0.074-0.079 /
// 0.036-0.042; W4 g32 M = 1 4864 x 896 0.246-0.265 / 0.136-0.150, M = 2 4096 x 4096 1.49-1.61 /
// 0.91-0.97; W8 g32 M = 2 1536 x 576 0.095-0.103 / 0.075-0.089; bf16 rows W2 g64 4096 x 4096
// 0.64-0.69 / 0.40-0.42, W4 g32 M = 1 0.87-0.93 / 0.50-0.63, 576 x 1536 0.036-0.044 / 0.030-0.032,
// W8 g32 M = 2 1536 x 576 0.143-0.166 / 0.091 (the AMX tiles before). Level: bf16 W4 g32 M = 2 1536
// x 576 0.066-0.081 / 0.069-0.072, fp32 W8 g32 M = 1 4096 x 4096 0.78-0.94 / 0.84-0.94.
// With VBMI (the same source built with -mavx512vbmi) 3-bit codes too: a chunk of 128 codes (48
// bytes) spreads into two planes of one byte per code (one vpermb for both, a vpmultishiftqb and an
// and each), each plane's lanes a group's units (unit_slot). fp32 rows, before / this: M = 1 4096 x
// 4096 g128 0.97-1.13 / 0.61-0.62, g32 2.13-2.20 / 0.80-1.14, 4864 x 896 0.264-0.275 / 0.179, 1536
// x 576 g64 0.073-0.076 / 0.050-0.064, g32 0.121-0.158 / 0.054-0.056; M = 2 4096 x 4096 1.19-1.20 /
// 1.02-1.03, g32 3.83-4.94 / 1.27-1.28, 1536 x 576 g64 0.117-0.162 / 0.080-0.102, 4864 x 896
// 0.309-0.312 / 0.289-0.302 (level; 576 x 1536 0.061-0.063 / 0.058-0.072); bf16 rows (the bf16
// kernels before): M = 1 4096 x 4096 g128 0.79-0.82 / 0.63-0.64, g64 0.89-0.96 / 0.73-0.78, g32
// 0.97-1.01 / 0.76-0.83, 4864 x 896 g32 0.256-0.266 / 0.226-0.235, 576 x 1536 0.046 / 0.037-0.038,
// g16 0.054-0.056 / 0.048-0.051, 1536 x 576 g64 0.061-0.062 / 0.053-0.056; M = 2 4096 x 4096
// 1.27-1.29 / 0.99-1.21, 4864 x 896 0.346-0.358 / 0.280-0.300, 1536 x 576 g64 0.091 / 0.084-0.087.
// (Chunks of 64 codes, one plane, spent as much on each chunk's scaling step as on its products:
// bf16 rows in groups of 32 ran 1.3-1.5x the bf16 kernels' time.)
//
// The activation row becomes integers per group: x = u * v with u a power of two chosen so
// that the group's largest |x| / u lies in [2^21, 2^22), v = round(x / u), written as three
// signed base-256 digits v = 65536 hi + 256 mid + lo (|hi| <= 64). Per group the sums
// sum_k q_k hi_k and sum_k q_k (256 mid_k + lo_k) are exact in int32 (a lane adds
// group_size / 16 products of at most 255 * 32896: below 2^31 for groups below 4096 codes,
// and the kernels take groups below kVnniMaxGroup = 2048, longer ones as parts, vnni_group), and
// y = sum_g u * (s_g * sum_k q_k v_k + z_g * sum_k v_k) is the layer applied to x~ = u * v up
// to fp32 rounding. A bf16 value carries eight
// significant bits, so every value of at least 2^-14 of its group's largest is exact; smaller
// ones move by at most u / 2 <= 2^-22 of the group's largest, as little as fp32 accumulation
// does. fp32 rows too, where no group's largest |x| lies below 2^-64 and none passes
// kDigitOutlierRatio<float> (32) times its mean |x| (the AMX digit tiles' rule, which keeps them
// within 1e-5), or one row with such groups as four digits (vnni_activations; other rows go to
// the fp32 kernels): one thread, ms, fp32 kernels / this, M = 1: 1536 x 576 g64
// W4 0.037 / 0.026, 576 x 1536 W4 0.036 / 0.018, 4864 x 896 W4 0.173 / 0.091, W8 0.166 / 0.133;
// M = 2 (there partly the AMX digits): 1536 x 576 g64 W4 0.064 / 0.045, 4864 x 896 W8 0.241 /
// 0.152; weights evicted 4864 x 896 W4 0.202 / 0.125-0.139. fp32 rows at any K (the fp32 kernels
// are slower than the bf16 ones there): 4096 x 4096 W4 M = 1 0.645 / 0.460 (weights evicted
// 0.66-0.70 / 0.59-0.63 median), M = 2 0.84 / 0.70, W8 M = 1 0.62 / 0.59, M = 2 1.00 / 0.78; 896
// x 4864 W4 0.180 / 0.113; two threads 4096 x 4096 W4 M = 1 0.309 / 0.209, 896 x 4864 0.089 /
// 0.045. (Two digits, 14 bits, or one int16 with vpdpwssd, 15 bits, were 10-30% faster but
// broke the op's 1e-3 promise on rows with outliers: the results are rounded to bf16, and
// small errors flip roundings. Measured here, 1.2-1.9e-3 against the reference op; three
// digits stay within 4e-4, the bf16 kernels' own level.)
//
// Three digits cost three vpdpbusd per 64 codes and activation row. One or two rows (the decode
// step, and two sequences or two draft tokens at once) take this path; from three rows the AMX
// digit tiles (isa/lowbit_amx.cpp) were faster (one thread, ms, tiles / this: M = 3 1536 x 576 g64
// 0.068 / 0.076, 576 x 1536 0.044 / 0.049; M = 4 0.069 / 0.100), at two 12-24% slower (M = 2
// 1536 x 576 g64 0.065 / 0.055, 4864 x 896 0.234 / 0.186, 2048 x 1024 g64 0.162 / 0.124; two
// threads 0.041 / 0.034, 0.116 / 0.099), as were the bf16 kernels (the same Xeon limited to them:
// AVX-512 BF16 0.083 / 0.055, 4864 x 896 0.369 / 0.185; AVX-512 VNNI's fp32 kernels 0.069 / 0.061,
// 0.268 / 0.184). Until session 55 bf16 rows of 8-bit codes took it below K = 2048 only: with
// longer rows (4096 x 4096) the weight streams from DRAM, and there this kernel was 1.1-1.7x
// slower than the bf16 one. Measured again (one thread, the fp32 kernels at M = 1 and the AMX
// digits at M = 2 before / this): 4096 x 4096 M = 1 0.88-1.21 / 0.70-0.76 (weights evicted
// 1.99-2.28 / 1.51-1.58), M = 2 1.33-1.43 / 0.86-0.94 (evicted 2.27-3.15 / 1.43-1.57), 896 x 4864
// 0.232-0.251 / 0.186-0.199 (evicted 0.55-0.70 / 0.40-0.45): now at any K.
// On CPUs without AMX tiles (AMD EPYC, Zen 4) fp32 rows from three up to 12-20 (by K) take this path
// too, in blocks of two rows (vnni_row_blocks): there the alternative is the fp32 FMA kernels,
// which it beat by 15-35% (one thread, 4096 x 4096 W4 M = 3 1.81 / 1.14 ms, M = 8 4.41 / 2.97) and
// from 9 rows by up to 2x (vnni_max_fp32_rows). bf16 rows stay at two:
// the bf16 kernels' vdpbf16ps ran 1.5-2x faster from three (M = 3 0.86 / 1.31, M = 4 1.07 / 1.96).
// Layouts: vnni_layout in lowbit_kernels.h.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "cpu/isa/avx512_rows.h"
#include "cpu/lowbit_kernels.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

// Whether this build takes 3-bit codes: with VBMI, a 48-byte chunk of 128 codes spreads into two
// planes of one byte per code (vpermb, vpmultishiftqb and an and each), as 8-bit codes then.
#if defined(__AVX512VBMI__)
constexpr bool kThreeBits = true;
#else
constexpr bool kThreeBits = false;
#endif

// Planes per chunk and codes per chunk: 8 / 4 / 2 bits, one 64-byte vector of 64 / 128 / 256
// codes, each of a byte's codes a plane of its own; 3 bits, 48 bytes of 128 codes in two planes.
constexpr int planes_of(int bits) { return bits == 3 ? 2 : 8 / bits; }

// Where a 3-bit chunk's unit u (eight codes, three bytes) goes: u64 lane `lane` of plane `plane`.
// A plane's sum lanes must each hold one group's codes, so a group of g codes (g / 8 units) takes
// q = g / 16 lanes of each plane (16, 32 and 64 codes; whole chunks as 64) in turn: units 2 q j ..
// 2 q j + q - 1 of group j to plane 0, the next q to plane 1.
struct UnitSlot {
  int plane, lane;
};
constexpr UnitSlot unit_slot(int64_t u, int64_t group_size) {
  const int64_t q = std::min<int64_t>(group_size, 128) / 16, j = u / (2 * q), r = u % (2 * q);
  return {static_cast<int>(r / q), static_cast<int>(j * q + r % q)};
}

#if defined(__AVX512VBMI__)
// One vpermb gives each u64 lane both planes' units (unit_slot): plane 0's at bytes 0-2, plane 1's
// at 3-5, for q = 1, 2, 4, 8 (`bytes`); a vpmultishiftqb per plane then moves code i of its unit to
// byte i (`fields[plane]`). vpermb and vpmultishiftqb issue where vpdpbusd does (Zen 4: 8 vpdpbusd
// and 2 vpermb take 10 cycles, with 2 shifts 8): one vpermb a chunk instead of two.
struct ThreeBitTables {
  uint8_t bytes[4][64];
  uint8_t fields[2][64];
};
alignas(64) constexpr ThreeBitTables kThreeBitTables = [] {
  ThreeBitTables t{};
  for (int e = 0; e < 4; ++e)
    for (int u = 0; u < 16; ++u) {
      const UnitSlot s = unit_slot(u, 16 << e);
      for (int i = 0; i < 3; ++i) t.bytes[e][8 * s.lane + 3 * s.plane + i] = static_cast<uint8_t>(3 * u + i);
    }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 64; ++i) t.fields[h][i] = static_cast<uint8_t>(24 * h + 3 * (i % 8));
  return t;
}();
#endif

// Signed bytes per activation value (LowbitProblem::x8_digits): hi, mid, lo of a 22-bit fixed
// point, or four of a 30-bit one (fp32 rows with a group too far above its mean for 22 bits).
constexpr int kVnniMaxDigits = 4;
// Weight bytes that every block of activation rows passes over before the next (more than one
// block): a span that stays in L2 instead of each block reading the weight from memory again. Zen 4,
// one thread, weights evicted, fp32 rows, median ms, whole range / 256 KiB: 4096 x 4096 W8 M = 3
// 2.60-2.81 / 1.97-2.58, M = 8 5.73-7.02 / 4.22-4.66, W4 level (bench/results/ops/s56).
constexpr int64_t kVnniSpanBytes = 256 << 10;
// The prefetch distance sliced_rows starts from (DotSlice::prefetch): 2 KiB on in a row, as the
// other kernels' streams (kStreamPrefetchBytes), or where rows are shorter than four of that the
// same place in the next block of rows. 2 KiB against 512 bytes before (one thread, ms, weights
// evicted, fp32 rows: 4096 x 4096 W4 M = 1 0.92-1.01 / 0.71-0.81, 896 x 4864 0.27-0.28 /
// 0.22-0.24; weights in cache level, 4096 x 4096 bf16 W4 0.48-0.56 / 0.41-0.49).
constexpr int64_t kPrefetchBytes = 2048;
// 8-bit rows of kVnniSliceRowBytes and more (K >= 8192) read K in slices of kVnniSliceBytes of
// activation digits (sliced_rows), each slice against a span of rows while it sits in L1:
// whole, a row's digits (3 bytes a code: 24-43 KiB at K = 8192-14336) and the block's weight
// streams outgrew L1, and those rows ran at 0.55-0.6x the bytes per second of K = 4096 ones. One
// thread, Zen 4, min ms, whole / sliced, bf16 rows: 4096 x 8192 M = 1 1.66-1.75 / 1.03, M = 2 2.5 /
// 1.95-1.98, 4096 x 11008 M = 1 2.53-2.59 / 1.47, M = 2 3.38 / 2.61-2.73, 4096 x 14336 M = 2 4.2 /
// 3.5-3.6; fp32 rows 4096 x 11008 M = 1 2.33-2.68 / 1.56-1.61, M = 3 4.24-4.56 / 3.78-3.96; level
// where the weight stays in the caches (2048 x 8192, 1024 x 14336). Shorter rows lost 2-5% sliced
// (4096 x 4096 M = 2 0.85 / 0.88-0.90, 896 x 4864 M = 2 0.211 / 0.216-0.218), and 4-bit rows too
// (4096 x 11008 M = 1 1.07 / 1.15-1.19: twice the products per weight byte hide the reloads)
// (bench/results/ops/s62/experiments.txt).
constexpr int64_t kVnniSliceBytes = 16 << 10;
constexpr int64_t kVnniSliceRowBytes = 8192;
// Each chunk is prefetched into L2 (not L1) a whole number of those distances ahead, at least 8 KiB
// (the next block of rows, or the next but one where a block is shorter): one
// thread, weights evicted, bf16 rows, min ms, L1 one distance ahead / this: 4096 x 4096 M = 1 W4
// 0.58-0.74 / 0.44-0.45, W8 1.06-1.21 / 0.57-0.60 (fp32 rows 0.59-0.62), 4864 x 896 W4 0.18-0.19 /
// 0.14-0.15, 896 x 4864 0.13-0.18 / 0.12-0.13, 576 x 1536 0.039-0.040 / 0.033-0.035; M = 2 level.
// (L2 one distance ahead: 4096 x 4096 the same, 4864 x 896 0.20; 4 KiB: 4864 x 896 0.15-0.16, 16
// KiB level.) bench/results/ops/s59/experiments.txt.
constexpr int64_t kMinAheadBytes = 8192;
// How far ahead a row's scales and zeros are prefetched where groups are part of a chunk (two to
// eight groups a chunk: as many scale streams as weight rows, a quarter of the weight's bytes at
// 4-bit g32 with fp32 scales). One thread, weights evicted, ms, without / with: 4096 x 4096 W4 g32
// M = 1 1.13-1.35 / 1.11-1.21, g64 0.90-1.08 / 0.87-1.00 (bench/results/ops/s55/experiments.txt).
constexpr int64_t kAffinePrefetchBytes = 256;
// Weight rows per block at M = 1: four (measured at 1536 x 576 and 576 x 1536: 20-75% faster than
// two, 0-40% faster than three, twice as fast as six); at M = 2 two (vnni_row_blocks).
// out[r] = y of weight row n0 + r (r < R) before bias.
template <int B, int R, int MR, int P>
void vnni_block(const LowbitProblem& p, int64_t m0, int64_t n0, const DotSlice& slice, float* out, int64_t ld,
              bool add) {
  constexpr int kPlanes = planes_of(B);  // a chunk's planes (2-8 bits: a byte's codes, lowest bits first)
  constexpr int64_t kChunkBytes = chunk_codes(B) * B / 8;
  const int64_t G = p.G, chunks_per_group = p.group_size / chunk_codes(B);
  // Groups of part of a chunk (groups_per_chunk of them; 0 or 1: of whole chunks): sum lane i
  // belongs to the chunk's group i / (16 / groups_per_chunk).
  const int64_t groups_per_chunk = chunk_codes(B) / p.group_size;
  const int lane_shift = groups_per_chunk > 1 ? __builtin_ctzll(16 / groups_per_chunk) : 0;
  const __m512i lane_group = _mm512_srlv_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32(lane_shift));
  const int64_t scale_bytes = p.scale_dtype == kFloat32 ? 4 : 2;
  const __m512i field = _mm512_set1_epi8(static_cast<char>((1 << B) - 1));
#if defined(__AVX512VBMI__)
  // 3 bits: the vpermb table for this group size.
  const int64_t q = B == 3 ? std::min<int64_t>(p.group_size, 128) / 16 : 1;  // unit_slot's q
  const __m512i three_bit_bytes = _mm512_load_si512(kThreeBitTables.bytes[__builtin_ctzll(q)]);
  const uint8_t* const last_full_load = p.qweight + p.N * p.row_bytes - 64;
#endif
  // Rows [m0, m0 + MR): a block of the activations (vnni_row_blocks), [chunk][row][plane][digit][64 bytes].
  const int64_t chunks = (p.K + chunk_codes(B) - 1) / chunk_codes(B);
  const int8_t* x8 = p.x8 + m0 * chunks * 64 * P * kPlanes;
  const float* unit = p.x8_unit + m0 * G;  // [row][G]
  const float* xsum = p.xsum + m0 * G;     // [row][G]
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.qweight + (n0 + r) * p.row_bytes;
  __m512 tot[R][MR];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
  const __m512 f8 = _mm512_set1_ps(256.f), f16 = _mm512_set1_ps(65536.f);
  // y += unit * scale * (65536 high + (256 mid + lo)) per lane of the sums, the last two digits'
  // sum in int32 (see the top), high the first digit (of four: 256 hi + the second); `su` holds
  // each lane's unit * scale.
  const auto add_sums = [&](__m512i (&acc)[R][MR][P], int r, const auto& su) {
    for (int m = 0; m < MR; ++m) {
      const __m512i low = _mm512_add_epi32(_mm512_slli_epi32(acc[r][m][P - 2], 8), acc[r][m][P - 1]);
      __m512 high = _mm512_cvtepi32_ps(acc[r][m][0]);
      if constexpr (P == 4) high = _mm512_fmadd_ps(high, f8, _mm512_cvtepi32_ps(acc[r][m][1]));
      const __m512 q = _mm512_fmadd_ps(high, f16, _mm512_cvtepi32_ps(low));
      tot[r][m] = _mm512_fmadd_ps(q, su(m), tot[r][m]);
    }
  };
  const int64_t ahead = slice.prefetch * ((kMinAheadBytes + slice.prefetch - 1) / slice.prefetch);
  const auto chunk_sums = [&](__m512i (&acc)[R][MR][P], int64_t c, int64_t bytes) {
    const int8_t* xc = x8 + c * 64 * P * MR * kPlanes;
    for (int r = 0; r < R; ++r) {
      const uint8_t* src = rows[r] + kChunkBytes * c;
      _mm_prefetch(reinterpret_cast<const char*>(src + ahead), _MM_HINT_T1);
      __m512i w[kPlanes];
      if constexpr (B == 3) {
#if defined(__AVX512VBMI__)
        // A whole chunk's 48 bytes as a 64-byte load where 64 lie inside the weight (as the bf16
        // kernels' load_chunk), the vpermb dropping the rest: with a masked load of each, Zen 4,
        // one thread, min ms, fp32 rows 1536 x 576 g64 M = 2 0.069 / 0.063, M = 4 0.138 / 0.125,
        // 4096 x 4096 g128 M = 4 1.66-1.69 / 1.62-1.63; bf16 rows g32 M = 2 1.06 / 0.96.
        const __m512i units = _mm512_permutexvar_epi8(
            three_bit_bytes, bytes == kChunkBytes && src <= last_full_load
                                 ? _mm512_loadu_si512(src)
                                 : _mm512_maskz_loadu_epi8(~0ull >> (64 - bytes), src));
        for (int h = 0; h < kPlanes; ++h) {
          const __m512i fields = _mm512_load_si512(kThreeBitTables.fields[h]);
          w[h] = _mm512_and_si512(_mm512_multishift_epi64_epi8(fields, units), field);
        }
#endif
      } else {
        const __m512i v =
            bytes == 64 ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi8((__mmask64{1} << bytes) - 1, src);
        for (int h = 0; h < kPlanes; ++h)
          w[h] = B == 8 ? v : _mm512_and_si512(h ? _mm512_srli_epi16(v, B * h) : v, field);
      }
      for (int h = 0; h < kPlanes; ++h) {
        for (int m = 0; m < MR; ++m)
          for (int t = 0; t < P; ++t)
            acc[r][m][t] =
                _mm512_dpbusd_epi32(acc[r][m][t], w[h], _mm512_loadu_si512(xc + 64 * ((m * kPlanes + h) * P + t)));
      }
    }
  };
  const auto zero = [](__m512i (&acc)[R][MR][P]) {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MR; ++m)
        for (int t = 0; t < P; ++t) acc[r][m][t] = _mm512_setzero_si512();
  };
  // Blocks of kZeroTermGroups groups, each followed by its zero terms (add_zero_terms).
  for (int64_t b0 = slice.g_begin; b0 < slice.g_end; b0 += kZeroTermGroups) {
    const int64_t b1 = std::min(slice.g_end, b0 + kZeroTermGroups);
    if (groups_per_chunk > 1) {
      // Group g0 + j of chunk c in its sum lanes, each lane's unit * scale spread from the group's
      // (one vector per row, not a broadcast per group); a last chunk of fewer groups (K not a
      // multiple of a chunk) reads their bytes only.
      for (int64_t c = b0 / groups_per_chunk; c * groups_per_chunk < b1; ++c) {
        const int64_t g0 = c * groups_per_chunk, groups = std::min(groups_per_chunk, G - g0);
        const __mmask16 in_chunk = static_cast<__mmask16>((1u << groups) - 1);
        __m512i acc[R][MR][P];
        zero(acc);
        chunk_sums(acc, c, groups * kChunkBytes / groups_per_chunk);
        __m512 chunk_units[MR];
        for (int m = 0; m < MR; ++m) chunk_units[m] = _mm512_maskz_loadu_ps(in_chunk, unit + m * G + g0);
        for (int r = 0; r < R; ++r) {
          const int64_t at = ((n0 + r) * G + g0) * scale_bytes + kAffinePrefetchBytes;
          _mm_prefetch(static_cast<const char*>(p.scale) + at, _MM_HINT_T0);
          _mm_prefetch(static_cast<const char*>(p.zero) + at, _MM_HINT_T0);
          const __m512 s = load_as_f32x16(p.scale, p.scale_dtype, (n0 + r) * G + g0, groups);
          add_sums(acc, r, [&](int m) { return _mm512_permutexvar_ps(lane_group, _mm512_mul_ps(chunk_units[m], s)); });
        }
      }
    } else {
      for (int64_t grp = b0; grp < b1; ++grp) {
        __m512i acc[R][MR][P];
        zero(acc);
        // A group of one chunk without the loop: GCC kept the loop's sums in copies it moved every
        // pass (bench/results/ops/s60/experiments.txt); 2-bit codes' four planes spilled so.
        if (MR > 1 && kPlanes <= 2 && chunks_per_group == 1)
          chunk_sums(acc, grp, kChunkBytes);
        else
          for (int64_t c = grp * chunks_per_group; c < (grp + 1) * chunks_per_group; ++c)
            chunk_sums(acc, c, kChunkBytes);
        for (int r = 0; r < R; ++r) {
          const float s = load_as_float(p.scale, p.scale_dtype, (n0 + r) * G + grp);
          add_sums(acc, r, [&](int m) { return _mm512_set1_ps(unit[m * G + grp] * s); });
        }
      }
    }
    add_zero_terms<R, MR>(tot, p, n0, xsum, 0.f, b0, b1 - b0);
  }
  write_totals<R, MR>(tot, out, ld, add);
}

template <int B, int R, int MR, int P>
void vnni_rows_t(const LowbitProblem& p, int64_t m0, int64_t n_begin, int64_t n_end) {
  // K slices of whole groups, of whole chunks each (a chunk's lanes hold all its groups' sums).
  const bool sliced = B == 8 && p.row_bytes >= kVnniSliceRowBytes && p.group_size >= chunk_codes(B);
  const int64_t x_group_bytes = sliced ? MR * P * p.group_size : 0;
  sliced_rows<MR, R, vnni_block<B, R, MR, P>, vnni_block<B, 1, MR, P>>(p, m0, n_begin, n_end, x_group_bytes,
                                                                       kVnniSliceBytes, kPrefetchBytes);
}

// Rows in blocks of kVnniBlockRows = 2 (the last may hold one), each over a span of weight rows
// (kVnniSpanBytes) before the next span:
// blocks of two weight rows against two activation rows (12 accumulators), one row against four
// weight rows. Two rows: four weight rows (24 accumulators) were 0-6% slower (one thread, 4864 x
// 896 0.184 / 0.172 ms, 576 x 1536 0.038 / 0.036). More rows (fp32 rows on CPUs without AMX,
// vnni_max_fp32_rows) as blocks of 2 against blocks of 3 or 4 (18 or 24 accumulators): AMD EPYC
// (Zen 4), one thread, fp32 rows, 4096 x 4096 W4 ms, M = 4 1.49 / 2.03 (blocks of 4), M = 8 2.97
// / 4.19, M = 6 2.23 / 2.82 (bench/results/ops/s56/experiments.txt).
template <int B, int P>
void vnni_row_blocks(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t span = p.M <= kVnniBlockRows ? n_end - n_begin
                                             : std::max<int64_t>(4, kVnniSpanBytes / p.row_bytes / 4 * 4);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += span) {
    const int64_t n1 = std::min(n_end, n0 + span);
    for (int64_t m0 = 0; m0 < p.M; m0 += kVnniBlockRows) {
      if (p.M - m0 == 1)
        vnni_rows_t<B, 4, 1, P>(p, m0, n0, n1);
      else
        vnni_rows_t<B, 2, 2, P>(p, m0, n0, n1);
    }
  }
}

template <int P>
void vnni_rows_of(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.bits == 2) return vnni_row_blocks<2, P>(p, n_begin, n_end);
  if (p.bits == 4) return vnni_row_blocks<4, P>(p, n_begin, n_end);
  if constexpr (kThreeBits)
    if (p.bits == 3) return vnni_row_blocks<3, P>(p, n_begin, n_end);
  vnni_row_blocks<8, P>(p, n_begin, n_end);
}

void run_vnni_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.x8_digits == kVnniMaxDigits) return vnni_rows_of<kVnniMaxDigits>(p, n_begin, n_end);
  vnni_rows_of<3>(p, n_begin, n_end);
}

// VnniKernels' activations for T = uint16_t (bf16) or float.
template <typename T>
bool vnni_activations(const T* x, int64_t M, int64_t K, int64_t group_size, int bits, VnniActivations& out) {
  const int planes = planes_of(bits), chunk = chunk_codes(bits);  // codes per byte, per chunk
  const int64_t chunks = (K + chunk - 1) / chunk;  // 2-4-bit rows may end in part of a chunk
  // b-bit codes: byte i of a 64-byte chunk holds codes planes i + j (j = 0 in its lowest bits), so
  // each 16 values go out as 16 / planes values to each plane j: those at j, j + planes, ...
  const __m128i by_plane = planes == 2 ? _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)
                                       : _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const int64_t G = K / group_size;
  out.unit.resize(M * G);
  out.xsum.resize(M * G);
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  // Each group's largest |x| (in `unit` until the unit replaces it) and the digits per value.
  // fp32 values carry more bits than three digits: a group more than kDigitOutlierRatio (32) times
  // above its mean |x| (as the AMX digits' rule) makes one row take four (each value within 2^-30
  // of its group's largest; every group passes, as its ratio is at most its size). More rows
  // decline: the fused FMA kernels were faster there. AMD EPYC (Zen 4), one thread, fp32 rows
  // with an outlier a group (ab_builds.py --outliers), ms, before / four digits: 4096 x 4096 M = 1
  // W4 0.97 / 0.54 (the bf16 parts before), W2 0.79 / 0.43, W3 0.85 / 0.68-0.75, W8 0.75-0.76 /
  // 0.64-0.66 (the FMA kernels), 896 x 4864 W2 g64 0.23 / 0.12; M = 2 1.01 / 1.15, M = 4 2.05 /
  // 2.32, 4864 x 896 M = 3 0.42 / 0.47 (bench/results/ops/s58/experiments.txt).
  static_assert(kVnniMaxGroup <= kDigitOutlierRatio<float> * 256);
  out.digits = 3;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const T* xg = x + m * K + g * group_size;
      __m512 amax = _mm512_setzero_ps(), total = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (int64_t k = 0; k < group_size; k += 16) {
        const __m512 v = _mm512_and_ps(load16(xg, k), abs_mask);
        bad |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN or infinity
        amax = _mm512_max_ps(amax, v);
        if (std::is_same_v<T, float>) total = _mm512_add_ps(total, v);
      }
      if (bad) return false;
      const float top = out.unit[m * G + g] = _mm512_reduce_max_ps(amax);
      if (std::is_same_v<T, float> && !digits_carry_group<float>(top, _mm512_reduce_add_ps(total), group_size)) {
        // Declined: subnormal units (the fp32 kernels raise such rows), or more than one row (faster there).
        if (top < 0x1p-64f || M > 1) return false;
        out.digits = kVnniMaxDigits;
      }
    }
  const int digits = out.digits;
  out.x8.resize(chunks * chunk * M * digits);
  const __m512i half = _mm512_set1_epi32(128), low_byte = _mm512_set1_epi32(255);
  for (int64_t m = 0; m < M; ++m) {
    // Row m's block of kVnniBlockRows rows (b0 its first, `rows` in it), each [chunk][row][plane][digit][64].
    const int64_t b0 = m / kVnniBlockRows * kVnniBlockRows, rows = std::min(kVnniBlockRows, M - b0);
    int8_t* const block = out.x8.data() + b0 * chunks * planes * 64 * digits;
    for (int64_t g = 0; g < G; ++g) {
      const T* xg = x + m * K + g * group_size;
      const float top = out.unit[m * G + g];
      // x / u = x * 2^e with top * 2^e in [2^21, 2^22) (four digits: [2^29, 2^30)); e stays where
      // 2^-e is a normal fp32 (groups below 2^-105 then keep fewer bits: far below any output's
      // rounding).
      const int e = top > 0.f ? std::clamp(8 * digits - 3 - std::ilogb(top), -126, 126) : 0;
      const __m512 scale_exp = _mm512_set1_ps(static_cast<float>(e));
      // The group's sum in int64 lanes: in int32 it overflowed from groups of 1024 (2^21 each).
      __m512i vsum = _mm512_setzero_si512();
      for (int64_t k = 0; k < group_size; k += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_scalef_ps(load16(xg, k), scale_exp));  // to nearest
        vsum = _mm512_add_epi64(vsum, _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                       _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
        const int64_t kk = g * group_size + k;
        int8_t* const chunk_row = block + ((kk / chunk) * rows + m - b0) * planes * 64 * digits;
        int8_t* dst = chunk_row + kk % chunk / planes;
        // 3 bits: the two units of these values, each to its plane and lane (unit_slot).
        UnitSlot first{}, second{};
        if (bits == 3) {
          first = unit_slot(kk % chunk / 8, group_size);
          second = unit_slot(kk % chunk / 8 + 1, group_size);
        }
        // Signed base-256 digits, lowest first: d = ((v + 128) & 255) - 128, v = (v - d) / 256
        // (exact); the first digit |v| <= 64.
        for (int t = digits - 1; t >= 0; --t) {
          const __m512i d = t == 0 ? v : _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, half), low_byte), half);
          const __m128i bytes = _mm512_cvtepi32_epi8(d);
          if (planes == 1) {
            _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 64 * t), bytes);
          } else if (bits == 3) {
            const auto at = [&](UnitSlot u) {
              return reinterpret_cast<__m128i*>(chunk_row + 64 * (u.plane * digits + t) + 8 * u.lane);
            };
            _mm_storel_epi64(at(first), bytes);
            _mm_storel_epi64(at(second), _mm_unpackhi_epi64(bytes, bytes));
          } else if (planes == 2) {
            const __m128i split = _mm_shuffle_epi8(bytes, by_plane);
            _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + 64 * t), split);
            _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + 64 * (digits + t)), _mm_unpackhi_epi64(split, split));
          } else {
            alignas(16) int32_t words[4];
            _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm_shuffle_epi8(bytes, by_plane));
            for (int j = 0; j < 4; ++j) std::memcpy(dst + 64 * (j * digits + t), &words[j], 4);
          }
          v = _mm512_srai_epi32(_mm512_sub_epi32(v, d), 8);
        }
      }
      const float unit = std::ldexp(1.f, -e);
      out.unit[m * G + g] = unit;
      out.xsum[m * G + g] = static_cast<float>(_mm512_reduce_add_epi64(vsum)) * unit;
    }
  }
  return true;
}

void fp16_to_fp32(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_as_f32x16(src, kFloat16, i, 16));
  const __mmask16 rest = static_cast<__mmask16>((1u << (n - i)) - 1);
  _mm512_mask_storeu_ps(dst + i, rest, load_as_f32x16(src, kFloat16, i, n - i));
}

void fp32_to_fp16(const float* src, int64_t n, uint16_t* dst) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), kNearest));
  const __mmask16 rest = static_cast<__mmask16>((1u << (n - i)) - 1);
  _mm256_mask_storeu_epi16(dst + i, rest, _mm512_cvtps_ph(_mm512_maskz_loadu_ps(rest, src + i), kNearest));
}

}  // namespace

const VnniKernels& vnni_kernels() {
  static const VnniKernels k{&vnni_activations<uint16_t>, &vnni_activations<float>, &run_vnni_rows, kThreeBits,
                             &fp16_to_fp32, &fp32_to_fp16};
  return k;
}

}  // namespace SK_ISA_NS
}  // namespace sk
