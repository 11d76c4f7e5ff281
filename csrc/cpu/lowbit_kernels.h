// Internal interface between lowbit_linear.cpp (argument checks, activation layout, threads,
// ISA choice) and the per-ISA kernels in csrc/cpu/isa/, which are compiled once per
// instruction set and picked at run time from what the CPU reports.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cpu/aligned_vector.h"

namespace sk {

// One y[M, N] = x @ dequant(W)^T problem. Activations are prepared by the caller in the
// order the kernels decode codes (see decode_order in lowbit_linear.cpp).
struct LowbitProblem {
  const uint8_t* qweight;  // [N, row_bytes] packed codes
  int64_t row_bytes;
  int64_t N, K, G, group_size;
  int bits;
  bool phased;             // codes decoded phase by phase within each group (x permuted to match)
  const void* scale;       // [N, G] of scale_dtype
  const void* zero;
  int scale_dtype;
  int64_t M;
  const float* x32;        // [M, K] fp32 in decode order (fp32 kernels); packed where fp32_rows runs its
                           // GEMM (fp32_packs_x): tiles of tile_rows rows as [K, tile_rows], zeros past M.
                           // Phase layouts where fp32_in_place(bits, M): the value for code c of a unit scaled
                           // by 2^-(c * b) (b = bits), as the kernels mask codes in place (fused_code)
  const uint16_t* x16;     // [M, x_stride] bf16 in the bf16 kernels' order (bf16_position), zero-padded
  int64_t x_stride;
  const float* xsum;       // [M, G] group sums of the activations the kernel reads
  const int8_t* x8;        // VNNI path: digits of x / unit, in blocks of rows, chunk by chunk (VnniKernels);
                           // AMX digit path: its tiles (isa_amx::prepare_digits)
  const float* x8_unit;    // VNNI path: [M, G] power-of-two unit of each group; AMX digit path: its units
  int x8_digits;           // VNNI path: signed bytes per value, 3 or 4 (VnniActivations::digits)
  float* y;                // [M, N] fp32 result (fp32 kernels: before bias and the output dtype)
  uint16_t* y16;           // [M, N] bf16 result, bias added (bf16 kernels write it directly)
  float* y_parts;          // or [1, N] fp32: one fp32 row sent as M bf16 parts (dot form), bias added
  float* y32;              // or [M, N] fp32, bias added (bf16 kernels, fp32 activations rounded to bf16)
  const float* bias;       // fp32 [N] or null (bf16 kernels)
  void* w_out;             // [N, K] dequantised weight in natural order (dequantise)
  int w_dtype;             // kFloat32 or kBFloat16 (dequantise)
};

// Each function handles weight rows [n_begin, n_end) for all M activation rows.
using LowbitRowsFn = void (*)(const LowbitProblem&, int64_t n_begin, int64_t n_end);

struct LowbitKernels {
  const char* name;
  LowbitRowsFn fp32_rows;    // fp32 activations, any bits/group layout
  int64_t fused_rows;        // fp32_rows reads x rows as they are up to this M (phase layouts: codes into the FMAs)
  int64_t tile_rows;         // above that, activation rows per tile of its GEMM
  LowbitRowsFn bf16_rows;    // bf16 activations, exact integer codes x bf16 (nullptr if absent)
  LowbitRowsFn dequantize;   // writes w_out rows
};

// Whether fp32_rows reads x32 packed in tiles of k.tile_rows rows (its GEMM) for M rows.
inline bool fp32_packs_x(const LowbitKernels& k, int64_t M) { return M > k.fused_rows; }

// Up to this many activation rows the fp32 kernels' fused path masks each code where it sits in
// its unit, with no shift, and reads x32 scaled to match (phase layouts). With four rows the
// masks crowd AVX2's registers: W2 at M = 4 ran 12% slower on a Zen 3, W2/W3 at M = 1-3 1-16% faster.
constexpr int64_t kFp32InPlaceRows = 3;
// Whether that holds for M rows of `bits`-bit codes: 3-bit codes (eight masks a unit) only up to
// two rows, as at M = 3 the shifts were 5-9% faster on a Zen 3 (bench/results/ops/s36).
constexpr bool fp32_in_place(int bits, int64_t M) { return M <= (bits == 3 ? 2 : kFp32InPlaceRows); }

// How far ahead a kernel that reads one weight row at a time (long rows at M = 1: one
// sequential stream) asks for the weight. Where the other calls of a step had moved the weights
// out of cache, the hardware prefetcher alone left 4096 x 4096 W4 at M = 1 at 1.23x torch's
// int4pack time with bf16 rows and 1.08-1.27x with fp32 ones, against 0.90x and 0.82x with it
// (Intel Xeon, one thread; bench/results/ops/s46/experiments.txt).
constexpr int64_t kStreamPrefetchBytes = 2048;

// Codes per chunk, for the bf16 kernels and the VNNI path alike: 64 bytes of 8-, 4- or 2-bit codes
// (64, 128, 256), or 48 bytes of 128 3-bit codes.
constexpr int64_t chunk_codes(int bits) { return bits == 3 ? 128 : 512 / bits; }

// Whether bf16_rows handles this layout. A chunk is 64 bytes of codes (2/4/8 bits) or 128 codes
// in 48 bytes (3 bits, decoded with AVX-512 VBMI: only the *_vbmi build takes them). Its pair
// vectors' 16 lanes each hold codes of one run of `unit` codes: four bytes (32 / bits codes),
// or for 3 bits one of 8 runs of 16 (two lanes per run, see bf16_position). Groups must be
// whole chunks or divide a chunk into whole runs: 2/4/8 bits groups of 4..32 bytes or
// multiples of 64 bytes, 3 bits groups of 16, 32 or 64 codes or multiples of 128.
inline bool bf16_kernel_layout(int bits, int64_t group_size) {
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8) || group_size <= 0) return false;
  const int64_t chunk = chunk_codes(bits), unit = bits == 3 ? 16 : chunk / 16;
  return group_size % chunk == 0 || (group_size >= unit && chunk % group_size == 0);
}

// Prepares bf16 activations x [M, K] for the bf16 kernels: out [M, stride] in their order
// (out[m][pos[k]] = x[m][k], zeros in the padding, where pos (K entries, bf16_position) maps every
// chunk of `period` = chunk_codes(bits) values into itself) and xsum [M, K / group_size], the
// fp32 sum of each group.
using Bf16PrepareFn = void (*)(const uint16_t* x, int64_t M, int64_t K, int64_t stride, const int32_t* pos,
                               int64_t period, int64_t group_size, uint16_t* out, float* xsum);

// From this many activation rows the bf16 kernels use the panel form (see isa/lowbit_bf16.cpp).
constexpr int64_t kBf16PanelMinRows = 5;

// Activation rows from which the bf16 panel form multiplies the weights dequantised to bf16
// (scaled panels: q * scale + zero rounded to bf16, as a dense bf16 F.linear has them) instead of
// the exact codes with each group's scale and zero applied to its sums (see panel_rows).
constexpr int64_t kBf16ScaledPanelMinRows = 256;

// The same switch for the AMX tiles, by group size: the exact form scales every group's sums of
// every 16 x 16 tile, which costs more in small groups, so they switch earlier (one thread, W4 bf16
// at 1536 x 576, 576 x 1536, 4864 x 896, 4096 x 4096: groups of 32 scaled 3-10% faster at 8-16
// rows, 30% at 64; 64 at 80 rows 3-4%, at 96-128 rows 17-21%; 128 at 192 rows level at 4096 x 4096
// and 4-7% on the others; below these the exact form was level or ahead).
constexpr int64_t amx_scaled_min_rows(int64_t group_size) {
  return group_size <= 32 ? 8 : group_size <= 64 ? 80 : group_size <= 128 ? 192 : kBf16ScaledPanelMinRows;
}

// Weight rows per block of the bf16 panel form (M >= kBf16PanelMinRows) at M activation rows: 64
// in groups of 64 codes or more where M is above one 6-row tile of the 32-row form, or for scaled
// panels, else 32 (see panel_rows in isa/lowbit_bf16.cpp). A thread's share of N comes in whole
// blocks where it can.
inline int64_t bf16_panel_block(int64_t M, int64_t group_size) {
  return (group_size >= 64 || M >= kBf16ScaledPanelMinRows) && M > 6 ? 64 : 32;
}

// Activation values per row the bf16 kernels read: the row's codes in whole chunks.
inline int64_t bf16_row_stride(int bits, int64_t K) {
  const int64_t chunk = chunk_codes(bits);
  return (K + chunk - 1) / chunk * chunk;
}

// The dot form's compact last chunk: a row of 2-bit codes that ends in a partial chunk of at
// most 16 bytes (TL four-byte lanes of 16, TL rounded up to a power of two) has that chunk's 8
// pair vectors packed S = min(16 / TL, 8) to a vector (lane s * TL + i of compact vector j
// holds lane i of pair vector j * S + s), so the row's last chunk costs 8 / S vdpbf16ps per
// activation row instead of 8 that are mostly padding (K = 576: 2; M = 4 at 1536 x 576
// 0.08 -> 0.06 ms). 4-bit rows keep whole chunks: the same for them (at most 4 -> 1 vectors,
// and only for K = 1..32 past a multiple of 128) measured 3-8% slower at M = 1-2 on
// 1536 x 576, whose chunk it does not change (bench/results/ops/README.md, session 26).
// Returns TL, or 16 where the row has no such chunk.
inline int64_t bf16_tail_lanes(int bits, int64_t K) {
  const int64_t bytes = bits == 2 ? K / 4 % 64 : 0;
  if (bytes == 0 || bytes > 16) return 16;
  return bytes <= 4 ? 1 : bytes <= 8 ? 2 : 4;
}

// Position of a row's code k (natural order) in the bf16 kernels' activation order. A chunk of
// a weight row decodes into nv pair vectors of 16 u32 lanes (two bf16 codes per lane):
// * 2/4 bits: 64 bytes are 16 four-byte lanes (quads); the decode makes nv = 2 * (8 / bits)
//   pair vectors v = 2 * phase + t whose lane `quad` holds the codes of that phase from bytes
//   4 * quad + t and 4 * quad + t + 2 (h = 0, 1), see isa/lowbit_bf16.cpp;
// * 8 bits: natural order in both forms (pair kp holds codes 2 kp and 2 kp + 1): k itself;
// * 3 bits: 128 codes in 16 byte triples t (8 codes each); pair vector v = j (nv = 4) holds in
//   lane 2 a + p, half h the code 8 t + 4 p + j of triple t = 2 a + h (isa/lowbit_bf16.cpp).
// Then:
// * dot form (M < kBf16PanelMinRows): activations line up with the vector lanes, so pair
//   vector v of a chunk reads 32 consecutive values: v * 32 + 2 * lane + h; in a compact last
//   chunk (bf16_tail_lanes) (v / S) * 32 + 2 * ((v % S) * TL + lane) + h;
// * panel form: each pair is broadcast, so the pairs of one group are kept together (a chunk
//   holding several small groups lists group by group): the pair index is
//   (gi * nv + v) * lanes + ql for lane = gi * lanes + ql, lanes = lanes per group (<= 16).
// Both are the same when groups are whole chunks.
inline int64_t bf16_position(int bits, int64_t group_size, bool panel, int64_t K, int64_t k) {
  if (bits == 8) return k;
  int64_t base, v, lane, h, nv;
  if (bits == 3) {
    const int64_t kk = k % 128, t = kk / 8, par = kk % 8 / 4;
    base = k / 128 * 128, v = kk % 4, lane = t / 2 * 2 + par, h = t % 2, nv = 4;
  } else {
    const int64_t cpb = 8 / bits, byte = k / cpb, phase = k % cpb, in_chunk = byte % 64;
    base = byte / 64 * 64 * cpb, v = 2 * phase + in_chunk % 2, lane = in_chunk / 4, h = (in_chunk % 4) / 2;
    nv = 2 * cpb;
  }
  if (!panel) {
    const int64_t tl = bf16_tail_lanes(bits, K);
    if (tl < 16 && base + chunk_codes(bits) > K) {
      const int64_t per = std::min<int64_t>(16 / tl, nv);
      return base + v / per * 32 + 2 * (v % per * tl + lane) + h;
    }
    return base + v * 32 + 2 * lane + h;
  }
  const int64_t lanes = std::min<int64_t>(16, group_size / (chunk_codes(bits) / 16)), gi = lane / lanes,
                ql = lane % lanes;
  return base + 2 * ((gi * nv + v) * lanes + ql) + h;
}

// The per-group 22-bit fixed point of the AMX digit tiles and the VNNI path moves each value by up
// to 2^-22 of its group's largest |x| (half a unit), a relative output error of about 1.4e-7 times
// that largest |x| over the group's root mean square: groups of outliers further above their mean
// than this leave the digits to other kernels, so that fp32 rows keep their 1e-5 (a group with an
// outlier 10^4 times the rest that meets a zero weight measured 2e-4) and bf16 rows 1e-4 beside
// their own rounding (the VNNI path's bf16 rows need no bound: each of their values of at least
// 2^-14 of the group's largest is exact there).
template <typename T>
constexpr float kDigitOutlierRatio = std::is_same_v<T, float> ? 32.f : 512.f;
// Whether the digits of rows of T carry a group (its values finite) whose largest |x| is `most` and
// whose |x| add up to `sum_abs`: not where that largest is nonzero but below 2^-64 (the unit would
// be subnormal) or above kDigitOutlierRatio<T> times the group's mean |x|.
template <typename T>
constexpr bool digits_carry_group(float most, float sum_abs, int64_t group_size) {
  return !(most != 0.f && most < 0x1p-64f) && most * static_cast<float>(group_size) <= kDigitOutlierRatio<T> * sum_abs;
}

// The VNNI path (isa/lowbit_vnni.cpp): bf16 or fp32 activation rows as three signed bytes of a
// per-group fixed point (one fp32 row with a group far above its mean: four) against the 8-bit
// codes as they are packed (vpdpbusd), 2- and 4-bit codes split into their fields (a chunk's
// lowest, then the next, ...), or (`w3`: built with VBMI) 3-bit codes spread into bytes; groups of
// whole chunks (2-4 bits: K too) or of a half, quarter, ... of one (16 codes at least), at any K;
// the kernels take groups of fewer than kVnniMaxGroup codes (which keeps their int32 sums exact),
// longer ones as parts (vnni_group). Rows: up to kVnniMaxRows,
// and fp32 rows on CPUs without AMX tiles up to vnni_max_fp32_rows (lowbit_vnni in
// lowbit_linear.cpp). For more rows (AMX digit tiles or the bf16 kernels) the others were faster
// (measured: isa/lowbit_vnni.cpp; at M >= 4 also with a 16-bit fixed point,
// bench/results/ops/README.md, ninth session); without the tiles fp32 rows met only the fp32 FMA
// kernels, which this path beat up to 8 rows (AMD EPYC (Zen 4), one thread, ms, FMA kernels / this:
// 4096 x 4096 W4 M = 3 1.81 / 1.14, M = 4 2.53 / 1.49, M = 8 4.41 / 2.97, M = 16 7.3 / 6.1, M = 32
// 12.0 / 12.1; 1536 x 576 W3 g64 M = 4 0.124 / 0.143, the one loss; bench/results/ops/s56). bf16
// rows of 8-bit codes took it only below 2048 codes until session 55, when it measured ahead there
// too (4096 x 4096, weights evicted: M = 1 1.99-2.28 / 1.51-1.58 ms, M = 2 2.27-3.15 / 1.43-1.57).
constexpr int64_t kVnniMaxGroup = 2048;
constexpr int64_t kVnniMaxRows = 2;
// fp32 rows on CPUs without AMX tiles up to 12, 14 where K >= 768, 20 (3-bit codes 18) where K >=
// 1024. From 9 rows the FMA kernels' GEMM costs as much as at 16 (tiles of 8 rows): one thread, ms,
// FMA / this: M = 9 4096 x 4096 W4 7.15-7.37 / 3.36-3.56, W8 7.46-7.65 / 4.18-4.24, 1536 x 576 g64
// 0.370 / 0.240; M = 12 4096 x 4096 W4 7.28-7.38 / 4.52-4.72, W3 6.98-8.25 / 5.64-5.93, 576 x 1536
// 0.354-0.360 / 0.247-0.252, 1536 x 576 g64 0.375-0.379 / 0.318-0.319; M = 16 4096 x 4096 W4 7.32-7.39
// / 6.23-6.31, W2 6.82 / 5.40-5.57, W8 7.40-7.48 / 7.42-7.73, 2048 x 2048 1.70 / 1.46-1.47, 576 x 1536
// 0.363 / 0.334-0.336, but 1536 x 576 g64 0.379 / 0.427-0.430 (W8 0.38 / 0.49; M = 14 0.375 / 0.372);
// M = 24 level, M = 32 11.8 / 12.3 (bench/results/ops/s58/experiments.txt). 13-14 rows where K >= 768
// (session 61: W2-W8 g128, 4864 x 896 M = 13 W4 1.81 / 1.37, W8 1.85 / 1.54, M = 14 W3 1.82 /
// 1.68-1.73, 3072 x 768 M = 14 W3 0.98 / 0.95, W8 0.99 / 0.93, W4 g64 0.98 / 0.85); not at K = 576
// (1536 x 576 g64 M = 14 W3 0.39 / 0.43, W2 0.37 / 0.41), where rows end in half a chunk. Where K >=
// 1024 up to 20 (3-bit codes 18), where the FMA GEMM's third 8-row tile is at most half full and costs
// as a whole one: M = 17 4096 x 4096 W4 9.16 / 6.03, W8 9.43 / 6.84, 576 x 1536 W3 0.459 / 0.413, 1536
// x 1024 g64 W4 0.82 / 0.66; M = 20 4096 x 4096 W3 10.1 / 8.1, W8 9.2 / 8.0, 576 x 1536 W2 0.45 /
// 0.39, W8 0.46 / 0.45, but W3 1536 x 1024 g64 0.83 / 0.89. Not from 21 (W8 4096 x 4096 M = 24 9.4 /
// 10.1) nor at 25-28 (larger layers gained, 896 x 4864 M = 27 W4 2.94 / 2.56; 576 x 1536 M = 28 W8
// 0.60 / 0.63).
constexpr int64_t vnni_max_fp32_rows(int64_t K, int bits) {
  return K >= 1024 ? (bits == 3 ? 18 : 20) : K >= 768 ? 14 : 12;
}
// Rows per block of the activations (VnniActivations::x8); every block passes over a span of weight
// rows before the next span (kVnniSpanBytes, isa/lowbit_vnni.cpp).
constexpr int64_t kVnniBlockRows = 2;

inline bool vnni_layout(int bits, int64_t group_size, int64_t K, bool w3) {
  // Groups of whole chunks, or of a half, quarter, ... of one (at least 16 codes: the activations
  // are prepared 16 values at a time).
  const int64_t chunk = chunk_codes(bits);
  const bool whole = group_size % chunk == 0 && K % chunk == 0;
  const bool part = group_size % 16 == 0 && chunk % group_size == 0;
  return (bits == 2 || bits == 4 || bits == 8 || (bits == 3 && w3)) && (whole || part);
}
// The group length the VNNI kernels see: the group itself below kVnniMaxGroup codes, else the
// longest whole number of chunks below that which divides it (each part takes its group's scale
// and zero, vnni_rows in lowbit_linear.cpp). Per-channel layouts went to the fp32 FMA or bf16
// kernels before: one thread, fp32 rows, ms, those / this: 4096 x 4096 W8 g4096 M = 1 0.75 / 0.39,
// M = 2 1.18 / 0.83, W4 0.66 / 0.33, 896 x 4864 W8 g4864 0.196 / 0.093 (bench/results/ops/s59).
// (A loop over parts inside the kernels cost 15-20% on every layout: 4096 x 4096 W4 g128 0.39 -> 0.46.)
inline int64_t vnni_group(int bits, int64_t group_size) {
  if (group_size < kVnniMaxGroup) return group_size;
  const int64_t chunk = chunk_codes(bits), chunks = group_size / chunk;
  int64_t part = (kVnniMaxGroup - 1) / chunk;
  while (chunks % part) --part;
  return part * chunk;
}
// Activations of the VNNI path (see LowbitProblem::x8, x8_unit, xsum).
struct VnniActivations {
  AlignedVector<int8_t> x8;
  AlignedVector<float> unit, xsum;
  int digits;  // per value: 3 (a 22-bit fixed point), or 4 (30 bits: an fp32 row with a group far above its mean)
};

namespace isa_generic { const LowbitKernels& lowbit_kernels(); }
namespace isa_avx2 { const LowbitKernels& lowbit_kernels(); }
namespace isa_avx512 { const LowbitKernels& lowbit_kernels(); }
// AVX-512 BF16 adds bf16_rows to the AVX-512 fp32 kernels; the same source built with VBMI
// too (isa_avx512bf16vbmi) also takes 3-bit codes.
namespace isa_avx512bf16 { LowbitRowsFn bf16_rows(); Bf16PrepareFn bf16_prepare(); }
// How isa_amx::rows decodes 2-4-bit codes into A tiles: in natural order (the activations as they
// come), or 4-bit codes in groups of 128 or more in the bf16 kernels' pair order (ActOrder::kBf16Rows:
// `pairs`), each code plus an offset (kCodeOffset in isa/bf16_codes.h) that the zero point takes
// back: 128 for bf16 activations, 2^bits (`fine`) for fp32 rows sent as bf16 parts, whose sums
// would lose fp32 bits to the larger offset. 8-bit codes: natural, no offset.
struct AmxCodes {
  bool pairs = false, fine = false;
};
// AMX tiles for 2/3/4/8-bit codes x bf16 activations (isa/lowbit_amx.cpp; built where the compiler
// takes -mamx-tile, SK_HAVE_AMX).
namespace isa_amx {
// Whether this CPU and OS run AMX-BF16 and AMX-INT8 tiles with AVX-512 VBMI (asks Linux for the
// tile state on the first call).
bool available();
// Whether rows() takes the layout: bits 2, 3, 4 or 8, K and group_size multiples of 32.
bool layout(int bits, int64_t group_size, int64_t K);
// Whether rows() can take the layout's codes in pair order: 4 bits, K and group_size multiples of
// 128 (a 64-byte chunk's four k-blocks mix its codes, so a chunk must lie in one group).
bool pair_layout(int bits, int64_t group_size, int64_t K);
// Activation tiles of 16 rows for M rows.
int64_t activation_tiles(int64_t M);
// bf16 x [M, K] (natural order) as the kernel's activation tiles [K / 32][activation_tiles(M)][16 pairs
// of k][16 rows] (rows past M zero; k in natural order, or in the pair order of AmxCodes::pairs) and xsum
// [K / group_size][16 * activation_tiles(M)], the fp32 sum of each group (none where xsum is null:
// rows() in its `scaled` form reads no sums), for tiles [m_tile0, m_tile1).
void prepare(const uint16_t* x, int64_t M, int64_t K, int64_t group_size, bool pairs, int64_t m_tile0,
             int64_t m_tile1, uint16_t* tiles, float* xsum);
// fp32 rows [m0, m1) of x [M, K] as `parts` bf16 rows each into out [M * parts, K] (row m * parts + j:
// part j, each the rounding error of the ones before; the sum is x to within 2^-27 of each value
// for three). False where a value is not finite, a first part overflows bf16, or a row's nonzero
// values all lie below 2^-64 (the tiles read subnormal inputs as zero, and its later parts are).
bool split_fp32_rows(const float* x, int64_t m0, int64_t m1, int64_t K, int parts, uint16_t* out);
// Weight rows [n_begin, n_end) (n_begin a multiple of 32) of p with p.x16 and p.xsum from prepare()
// with the same codes.pairs; writes p.y32 where set, else p.y16, bias added. `scaled` (natural codes
// only): the weight dequantised to bf16 (q * scale + zero rounded, as a dense bf16 F.linear
// multiplies it) and summed over the whole K, instead of exact codes with each group's sums
// scaled in fp32.
void rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end, bool scaled, AmxCodes codes);
// Whether prepare()'s activation tiles of M rows of K outgrow L2 (the scaled form's passes then read
// them from L3), and the weight rows that form sums per pass over them (the panels whose sums fit
// its share of L2).
bool tiles_outgrow_l2(int64_t M, int64_t K);
int64_t scaled_pass_rows(int64_t M);
// Weight rows [n_begin, n_end) of p (a layout() layout) dequantised to bf16 as rows() in its `scaled`
// form has them (q * scale + zero rounded), in natural order into p.w_out [N, K].
void dequantize_bf16(const LowbitProblem& p, int64_t n_begin, int64_t n_end);
// Activations (fp32 or bf16) as three int8 digit planes of a per-group fixed point (AMX-INT8,
// tdpbssd against the codes as centred signed bytes). Whether digit_rows() takes the layout (that of
// rows() with K and group_size multiples of 64, groups of at most 65536 codes).
bool digit_layout(int bits, int64_t group_size, int64_t K);
// Blocks of activation rows for M rows (five rows each, their planes side by side in one tile;
// from 11 rows, where that takes no more tiles, 16 rows each, one tile per plane) and their tiles.
int64_t digit_blocks(int64_t M);
int64_t digit_tiles(int64_t M);
// x [M, K] as digit tiles [K / 64][digit_tiles(M)][16 k-quads][16 columns][4 bytes] (side by side,
// column c: plane c % 3 of the block's row c / 3; apart, tile 3 b + q: plane q of block b's rows;
// zeros past M), unit [G][16 digit_blocks] (side by side, each column's 256^plane times its row
// and group's power of two; apart, each row's power of two) and xsum (the same shape: the sum of
// the values the digits hold, in plane 0's column, else 0) for blocks [block0, block1). False where
// a value is not finite, a group's largest |x| is nonzero but below 2^-64, or above 32 (fp32) or
// 512 (bf16) times the group's mean |x| (kDigitOutlierRatio: the digits' error, up to 2^-23 of that
// largest, would pass the dtype's promise).
bool prepare_digits(const float* x, int64_t M, int64_t K, int64_t group_size, int64_t block0, int64_t block1,
                    int8_t* tiles, float* unit, float* xsum);
bool prepare_digits(const uint16_t* x, int64_t M, int64_t K, int64_t group_size, int64_t block0, int64_t block1,
                    int8_t* tiles, float* unit, float* xsum);
// Weight rows [n_begin, n_end) (n_begin a multiple of 32) of p with p.x8, p.x8_unit and p.xsum from
// prepare_digits(); writes p.y32 where set, else p.y16, bias added.
void digit_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end);
}
namespace isa_avx512bf16vbmi { LowbitRowsFn bf16_rows(); Bf16PrepareFn bf16_prepare(); }
// AVX-512 VNNI adds the VNNI path, built twice: without VBMI (2-, 4- and 8-bit codes) and with it
// (`w3`: 3-bit codes too). `activations` fill `out` from rows x [M, K] bf16 or fp32 for
// `bits`-bit codes (vnni_layout): digits in blocks of kVnniBlockRows rows (the last may hold fewer),
// each [chunk][row][plane][3][64] (8 bits: 64 codes a chunk, one plane; 4 bits: 128 codes, the
// even ones then the odd ones; 2 bits: 256 codes, those at 4 i, then 4 i + 1, ...; 3 bits: 128
// codes in two planes, each unit of eight where unit_slot puts it; [4] where a row takes four
// digits), units and sums [M][G]; false (and nothing to run) when x holds a NaN or an infinity,
// or (fp32) a group whose largest |x| is nonzero but below 2^-64, or (fp32, M > 1) one above
// kDigitOutlierRatio times its mean (one such row takes four digits).
struct VnniKernels {
  bool (*bf16_activations)(const uint16_t* x, int64_t M, int64_t K, int64_t group_size, int bits, VnniActivations& out);
  bool (*fp32_activations)(const float* x, int64_t M, int64_t K, int64_t group_size, int bits, VnniActivations& out);
  LowbitRowsFn rows;
  bool w3;
  // fp16 rows go as the fp32 rows they convert to exactly, the result rounded back (to nearest,
  // ties to even): n values each way with F16C, which every AVX-512 CPU has.
  void (*fp16_to_fp32)(const uint16_t* src, int64_t n, float* dst);
  void (*fp32_to_fp16)(const float* src, int64_t n, uint16_t* dst);
};
namespace isa_avx512vnni { const VnniKernels& vnni_kernels(); }
namespace isa_avx512vnnivbmi { const VnniKernels& vnni_kernels(); }

}  // namespace sk
