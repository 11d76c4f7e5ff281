// 2-, 3-, 4- and 8-bit codes x bf16 activations on CPUs with AMX (Intel Xeon from Sapphire Rapids on):
// tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 fp32 sums, 16384
// products per instruction, where AVX-512 BF16 does 32. On such a CPU torch's dense bf16
// F.linear runs on these tiles through oneDNN, and the vector kernels fell 2-9x behind it from
// M = 16 (bench/results/ops/README.md, session 45).
//
// The weight rows are the A operand: sixteen rows of 32 consecutive codes each, decoded from the
// packed bytes into exact bf16 integers (2-4 bits: each code plus an offset, its field picked out
// of the bit stream by vpmultishiftqb; 8-bit codes go through fp32), one group of 32 weight rows
// (two A tiles) at a time into L1, where it serves every activation tile. The activations are the B operand,
// rearranged once per call into 1 KiB tiles of 16 pairs of k by 16 rows (the VNNI layout
// tdpbf16ps reads). Each group's tile sums are taken out of the tiles and scaled: y += scale *
// sum(x * q) + zero * sum(x), so the weight is never rounded (the op's 1e-3 promise for bf16
// activations holds, and fp32 rows sent as three bf16 parts keep the fp32 one). From 256 bf16
// rows (`scaled`) a panel's whole K is dequantised to bf16 instead and summed with no per-group
// step, as the vector kernels' scaled panels do.
//
// Layouts: bits 2, 3, 4 and 8, K and the group size multiples of 32 (whole 32-code k-blocks per
// group).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/half.h"
#include "cpu/isa/avx512_rows.h"
#include "cpu/isa/bf16_codes.h"
#include "cpu/isa/code_fields.h"
#include "cpu/isa/transpose16.h"
#include "cpu/lowbit_kernels.h"

namespace sk {
namespace isa_amx {
namespace {

constexpr int64_t kBlockK = 32;    // codes per k-block: one A tile row, 16 VNNI pairs of a B tile
// Where a panel's groups meet the tiles one at a time (rows, unblocked digit_rows), its codes are
// decoded this many bytes (whole groups) at a time: one decode call per group had cost 1536 x 576
// g64 M = 4 a third of its time; 16 or 32 KiB slowed 4096 x 4096 g128 M = 3-5 (bench/results/ops/s69).
constexpr int64_t kPanelDecodeBytes = 8 << 10;
constexpr int64_t kPanelRows = 32;  // weight rows per panel: two A tiles
constexpr int kTileBytes = 1024;

// Whole groups of a panel per decode call (kPanelDecodeBytes), each code decoded to `code_bytes`.
inline int64_t groups_per_decode(const LowbitProblem& p, int64_t code_bytes) {
  return std::clamp<int64_t>(kPanelDecodeBytes / (kPanelRows * p.group_size * code_bytes), 1, p.G);
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: sums (A tile a, B tile b at 2 b + a); 4-5: weight rows; 6-7: activations.
void load_tile_config() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// One k-block of a row of B-bit codes (B = 2, 3, 4; 4 B bytes from src, the row's little-endian
// bit stream) as bf16 codes plus kCodeOffset<B, F> in natural order: one masked load (no read
// past the block), one vpermb that gives u64 lane l the bytes holding codes 4 l .. 4 l + 3, one
// vpmultishiftqb that moves each code's field to the top of its u16 lane's mantissa
// (kMantissaShift; the rotate's wrapped bits fall outside the field) and one and-or
// (codes_as_bf16): four operations per 32 codes, any bits, any group of whole k-blocks.
template <int B, bool F>
inline __m512i natural_codes(const uint8_t* src) {
  alignas(64) static constexpr FieldTables t = [] {
    FieldTables t{};
    for (int l = 0; l < 8; ++l)
      for (int i = 0; i < 8; ++i) {
        t.bytes[8 * l + i] = static_cast<uint8_t>(l * B / 2 + i);  // codes 4 l .. from bit 4 l B
        // Byte 2 j of lane l: code 4 l + j's field, which starts (4 l B) % 8 + B j bits into the lane.
        const int at = 4 * (l * B % 2) + B * (i / 2) - kMantissaShift<B, F>;
        t.fields[8 * l + i] = static_cast<uint8_t>(i % 2 ? 0 : at & 63);
      }
    return t;
  }();
  return codes_as_bf16<B, F>(pick_fields(load_bytes<4 * B>(src), t));
}

// 16 8-bit codes from src as fp32.
inline __m512 codes8_fp32(const uint8_t* src) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}

// One k-block of an 8-bit row: 32 bytes, one code each.
inline __m512i codes8(const uint8_t* src) {
  return (__m512i)_mm512_cvtne2ps_pbh(codes8_fp32(src + 16), codes8_fp32(src));  // lanes 0-15 from src
}

// A panel's decode reads 32 rows a row apart, one group's bytes of each: 32 short streams that the
// hardware prefetcher left to memory latency. Each row asks for its bytes this far ahead, past the
// row's end in the same row of the panels after. One thread, weights from memory (a 512 MiB
// buffer written before each call), bf16 rows, none / 256 / 1024 bytes ahead, ms: 4096 x 4096 W4
// M = 4 1.55 / 1.37 / 1.35, M = 16 1.68 / 1.33 / 1.34, 4864 x 896 W4 M = 4 0.47 / 0.32 / 0.35,
// 896 x 4864 W4 M = 8 0.46 / 0.35-0.57 / 0.36, 1536 x 576 W4 g64 M = 4 0.18 / 0.13-0.15 / 0.16;
// 8-bit codes level (4096 x 4096 M = 4 2.05-2.21 for all three).
constexpr int64_t kAmxPrefetchBytes = 1024;

// Prefetches `bytes` of row n0 + r from byte `at` + kAmxPrefetchBytes (see there).
inline void prefetch_ahead(const LowbitProblem& p, int64_t n0, int64_t r, int64_t at, int64_t bytes) {
  int64_t row = n0 + r, ahead = at + kAmxPrefetchBytes;
  for (; ahead >= p.row_bytes; ahead -= p.row_bytes) row += kPanelRows;
  if (row >= p.N) return;
  for (int64_t b = 0; b < bytes; b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p.qweight + row * p.row_bytes + ahead + b), _MM_HINT_T0);
}

// fn(std::integral_constant<int, B>{}) for B = bits (2, 3, 4 or 8): kernels compiled per width.
template <typename Fn>
inline void with_bits(int bits, Fn&& fn) {
  switch (bits) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    default: return fn(std::integral_constant<int, 8>{});
  }
}

// Blocks [kb0, kb1) of weight rows [n0, n0 + 32) of B-bit codes, each block of `codes_per_block`
// codes decoded into 64 bytes by block(src) (an A tile row), as [kb - kb0][32 rows][64 bytes];
// rows past N are zeros.
template <int B, int64_t codes_per_block, typename Block>
void decode_rows(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, void* out, Block block) {
  constexpr int64_t block_bytes = codes_per_block * B / 8;
  const int64_t rows = std::min(kPanelRows, p.N - n0);
  auto* dst = static_cast<uint8_t*>(out);
  for (int64_t r = 0; r < kPanelRows; ++r) {
    const uint8_t* src = p.qweight + (n0 + r) * p.row_bytes + kb0 * block_bytes;
    prefetch_ahead(p, n0, r, kb0 * block_bytes, (kb1 - kb0) * block_bytes);
    for (int64_t kb = 0; kb < kb1 - kb0; ++kb)
      _mm512_store_si512(dst + (kb * kPanelRows + r) * 64, r < rows ? block(src + kb * block_bytes) : _mm512_setzero_si512());
  }
}

// decode_rows for bf16 A tiles: k in natural order (2-4 bits plus kCodeOffset<B, F>: natural_codes).
template <int B, bool F>
void decode_natural(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint16_t* out) {
  decode_rows<B, kBlockK>(p, n0, kb0, kb1, out, [](const uint8_t* src) {
    if constexpr (B == 8)
      return codes8(src);
    else
      return natural_codes<B, F>(src);
  });
}

// decode_natural's blocks for 4-bit codes in the bf16 kernels' pair order (AmxCodes::pairs; F:
// fine): a 64-byte chunk is four k-blocks, each one shift and one and-or (decode_pair), against
// four operations for each natural block. kb0 and kb1 are multiples of 4.
template <bool F>
void decode_pairs(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint16_t* out) {
  const int64_t rows = std::min(kPanelRows, p.N - n0);
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint16_t* dst = out + r * kBlockK;
    const uint8_t* src = p.qweight + (n0 + r) * p.row_bytes + kb0 * (kBlockK / 2);
    prefetch_ahead(p, n0, r, kb0 * (kBlockK / 2), (kb1 - kb0) * (kBlockK / 2));
    for (int64_t kb = 0; kb < kb1 - kb0; kb += kPairs<4>) {
      const __m512i raw = r < rows ? _mm512_loadu_si512(src + kb * (kBlockK / 2)) : _mm512_setzero_si512();
      for_index<kPairs<4>>([&](auto v) {
        constexpr int i = decltype(v)::value;
        // Rows past N: zero codes, not the offset (their sums would meet a zero scale anyway).
        const __m512i codes = r < rows ? decode_pair<4, F, i>(raw) : raw;
        _mm512_store_si512(dst + (kb + i) * kPanelRows * kBlockK, codes);
      });
    }
  }
}

void decode_blocks(AmxCodes codes, const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint16_t* out) {
  if (codes.pairs)
    return codes.fine ? decode_pairs<true>(p, n0, kb0, kb1, out) : decode_pairs<false>(p, n0, kb0, kb1, out);
  with_bits(p.bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    if (codes.fine)
      decode_natural<B, true>(p, n0, kb0, kb1, out);
    else
      decode_natural<B, false>(p, n0, kb0, kb1, out);
  });
}

// Word permute that interleaves a vector's two 16-word halves: word 2 j <- j, 2 j + 1 <- 16 + j.
alignas(64) constexpr uint16_t kInterleaveHalves[32] = {0, 16, 1,  17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// One k-block of B-bit codes (src) as bf16 of q * s + z, in natural order.
template <int B>
inline __m512i scaled_codes(const uint8_t* src, __m512 s, __m512 z) {
  if constexpr (B == 8) {
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(codes8_fp32(src + 16), s, z),
                                        _mm512_fmadd_ps(codes8_fp32(src), s, z));
  } else {
    // u32 lane j of the decode holds codes 2 j (low half) and 2 j + 1 plus the offset, each exact
    // in fp32 once moved to the lane's top half, and exact again without the offset.
    const __m512i codes = natural_codes<B, false>(src);
    const __m512 off = _mm512_set1_ps(kCodeOffset<B>);
    const __m512 even = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_slli_epi32(codes, 16)), off);
    const __m512 odd = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_and_si512(codes, _mm512_set1_epi32(int(0xffff0000u)))), off);
    const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(odd, s, z), _mm512_fmadd_ps(even, s, z));
    return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleaveHalves), w);
  }
}

// Blocks [kb0, kb1) of weight rows [n0, n0 + 32) of B-bit codes dequantised to bf16 (q * scale +
// zero rounded, as a dense bf16 F.linear has them) as A tiles, [kb - kb0][32 rows][32 values]; rows
// past N zeros.
// k-blocks [kb0, kb1) of weight row n's B-bit codes as scaled_codes (scale and zero: the row's [G])
// at dst + (kb - kb0) * step.
template <int B>
inline void scaled_blocks(const LowbitProblem& p, int64_t n, int64_t kb0, int64_t kb1, const float* scale,
                          const float* zero, uint16_t* dst, int64_t step) {
  constexpr int64_t block_bytes = kBlockK * B / 8;
  const int64_t per_group = p.group_size / kBlockK;
  const uint8_t* src = p.qweight + n * p.row_bytes;
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t g = kb / per_group;
    _mm512_storeu_si512(dst + (kb - kb0) * step,
                        scaled_codes<B>(src + kb * block_bytes, _mm512_set1_ps(scale[g]), _mm512_set1_ps(zero[g])));
  }
}

template <int B>
void decode_scaled(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, const float* scale,
                   const float* zero, uint16_t* out) {
  const int64_t rows = std::min(kPanelRows, p.N - n0);
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint16_t* dst = out + r * kBlockK;
    if (r < rows) {
      scaled_blocks<B>(p, n0 + r, kb0, kb1, scale + r * p.G, zero + r * p.G, dst, kPanelRows * kBlockK);
    } else {
      for (int64_t kb = kb0; kb < kb1; ++kb) _mm512_store_si512(dst + (kb - kb0) * kPanelRows * kBlockK, _mm512_setzero_si512());
    }
  }
}

void decode_scaled(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, const float* scale,
                   const float* zero, uint16_t* out) {
  with_bits(p.bits, [&](auto b) { decode_scaled<decltype(b)::value>(p, n0, kb0, kb1, scale, zero, out); });
}

// Tile C += tile A x tile B: int8 (tdpbssd, signed A and B) or bf16 (tdpbf16ps). A macro, as the
// intrinsics take tile numbers as literal tokens.
#define SK_TILE_DOT(INT8, C, A, B) \
  do {                              \
    if constexpr (INT8)             \
      _tile_dpbssd(C, A, B);        \
    else                            \
      _tile_dpbf16ps(C, A, B);      \
  } while (0)

// Where a panel's fp32 sums live: weight row r's 16 sums for activation tile column mt at
// at + r * row_step + mt * tile_step. As rows [32][16 x_tiles] (row_step 16 x_tiles, tile_step 16)
// where per-group epilogues add into them, as tiles [x_tiles][32][16] (16, 512) where tile products
// load and store them: 1 KiB contiguous each, where rows 16 x_tiles floats apart (2 KiB at M = 512)
// put a tile's 16 lines into two L1 sets (1536 x 576 W4 M = 512 bf16: 3-7% faster).
struct PanelSums {
  float* at;
  int64_t row_step, tile_step;
  float* row(int64_t r, int64_t mt) const { return at + r * row_step + mt * tile_step; }
  PanelSums from(int64_t mt) const { return {row(0, mt), row_step, tile_step}; }  // tile columns from mt
  float* tile(int a, int b) const { return row(16 * a, b); }  // tile (a, b): rows 16 a.., column b
  int64_t stride() const { return row_step * static_cast<int64_t>(sizeof(float)); }
};

// A scratch of four 1 KiB tiles as tile columns 0 and 1.
inline PanelSums in_scratch(void* ctmp) { return {static_cast<float*>(ctmp), 16, 512}; }

// Sums over k-blocks [kb0, kb0 + blocks) (decoded in w from kb0 on) for one panel and MTiles (1 or
// 2) activation tiles from mt, into the tiles at c (`add`: added to what they hold, else set). Int8:
// codes as centred signed bytes (64 per k-block) against int8 digits with tdpbssd, int32 sums; else bf16
// codes (32 per k-block) with tdpbf16ps, fp32 sums. Either way a k-block of the panel is 2 KiB and
// an activation tile 1 KiB.
template <int MTiles, bool Int8>
void tile_sums(const uint8_t* w, const uint8_t* xtiles, int64_t x_tiles, int64_t kb0, int64_t blocks, int64_t mt,
               const PanelSums& c, bool add) {
  if (add) {
    _tile_loadd(0, c.tile(0, 0), c.stride());
    _tile_loadd(1, c.tile(1, 0), c.stride());
    if (MTiles == 2) {
      _tile_loadd(2, c.tile(0, 1), c.stride());
      _tile_loadd(3, c.tile(1, 1), c.stride());
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if (MTiles == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint8_t* wk = w + kb * kPanelRows * 64;
    const uint8_t* x = xtiles + ((kb0 + kb) * x_tiles + mt) * kTileBytes;
    _tile_loadd(4, wk, 64);
    _tile_loadd(5, wk + 16 * 64, 64);
    _tile_loadd(6, x, 64);
    if (MTiles == 2) _tile_loadd(7, x + kTileBytes, 64);
    SK_TILE_DOT(Int8, 0, 4, 6);
    SK_TILE_DOT(Int8, 1, 5, 6);
    if (MTiles == 2) {
      SK_TILE_DOT(Int8, 2, 4, 7);
      SK_TILE_DOT(Int8, 3, 5, 7);
    }
  }
  _tile_stored(0, c.tile(0, 0), c.stride());
  _tile_stored(1, c.tile(1, 0), c.stride());
  if (MTiles == 1) return;
  _tile_stored(2, c.tile(0, 1), c.stride());
  _tile_stored(3, c.tile(1, 1), c.stride());
}

#undef SK_TILE_DOT

// The three digit planes' sums (tiles mt .. mt + 2, apart) over k-blocks [kb0, kb0 + blocks) for
// one panel, into ctmp: weight rows 16 a + i by plane q at 256 (3 a + q) + 16 i. One A tile at a
// time against the three planes (tiles 0-2 the sums, 3 and 7 the weight rows, 4-6 the planes),
// the planes loaded once where the group is one k-block.
void plane_sums(const uint8_t* w, const uint8_t* xtiles, int64_t x_tiles, int64_t kb0, int64_t blocks, int64_t mt,
                int32_t* ctmp) {
  for (int a = 0; a < 2; ++a) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const uint8_t* x = xtiles + ((kb0 + kb) * x_tiles + mt) * kTileBytes;
      if (a == 0 || blocks > 1) {
        _tile_loadd(4, x, 64);
        _tile_loadd(5, x + kTileBytes, 64);
        _tile_loadd(6, x + 2 * kTileBytes, 64);
      }
      const uint8_t* wk = w + kb * kPanelRows * 64 + a * 16 * 64;
      if (a == 0) {
        _tile_loadd(3, wk, 64);
        _tile_dpbssd(0, 3, 4);
        _tile_dpbssd(1, 3, 5);
        _tile_dpbssd(2, 3, 6);
      } else {
        _tile_loadd(7, wk, 64);
        _tile_dpbssd(0, 7, 4);
        _tile_dpbssd(1, 7, 5);
        _tile_dpbssd(2, 7, 6);
      }
    }
    int32_t* c = ctmp + a * 768;
    _tile_stored(0, c, 64);
    _tile_stored(1, c + 256, 64);
    _tile_stored(2, c + 512, 64);
  }
}

// tile_sums for the `tiles` (1 or 2) activation tiles from mt.
template <bool Int8>
void tile_sums_for(int tiles, const void* w, const void* xtiles, int64_t x_tiles, int64_t kb0, int64_t blocks,
                   int64_t mt, const PanelSums& c, bool add = false) {
  const auto* wb = static_cast<const uint8_t*>(w);
  const auto* xb = static_cast<const uint8_t*>(xtiles);
  if (tiles == 2)
    tile_sums<2, Int8>(wb, xb, x_tiles, kb0, blocks, mt, c, add);
  else
    tile_sums<1, Int8>(wb, xb, x_tiles, kb0, blocks, mt, c, add);
}

// One group's sums of 16 activation columns (sums(a, i): weight row 16 a + i's, as fp32) added to
// the panel's acc [32 weight rows][Mp] at column `col`: acc += scale[r, g] * sums + zero[r, g] * xs.
template <typename Sums>
inline void add_group_sums(Sums sums, const float* scale, const float* zero, int64_t G, int64_t g, __m512 xs,
                           float* acc, int64_t Mp, int64_t col) {
  for (int a = 0; a < 2; ++a)
    for (int i = 0; i < 16; ++i) {
      const int64_t r = 16 * a + i;
      float* dst = acc + r * Mp + col;
      __m512 v = _mm512_fmadd_ps(sums(a, i), _mm512_set1_ps(scale[r * G + g]), _mm512_loadu_ps(dst));
      v = _mm512_fmadd_ps(xs, _mm512_set1_ps(zero[r * G + g]), v);
      _mm512_storeu_ps(dst, v);
    }
}

// store_rows for bf16 tiles and bf16 results: each pair of weight rows converted at once, its words
// interleaved into u32 lanes, so that one 16 x 16 transpose of u32 per tile column hands each
// activation row its 32 results in one vector (half the shuffles of transposing fp32 halves).
void store_bf16_rows(const LowbitProblem& p, int64_t n0, int64_t rows, const PanelSums& acc) {
  alignas(64) float bias[kPanelRows] = {};
  for (int64_t r = 0; p.bias && r < rows; ++r) bias[r] = p.bias[n0 + r];
  const __mmask32 keep = static_cast<__mmask32>(rows >= 32 ? ~0ull : (1ull << rows) - 1);
  const __m512i halves = _mm512_load_si512(kInterleaveHalves);
  for (int64_t m0 = 0; m0 < p.M; m0 += 16) {
    __m512i v[16];  // v[i] u32 lane j: results of weight rows 2 i and 2 i + 1 for activation row m0 + j
    for (int i = 0; i < 16; ++i) {
      const __m512 lo = _mm512_add_ps(_mm512_load_ps(acc.row(2 * i, m0 / 16)), _mm512_set1_ps(bias[2 * i]));
      const __m512 hi = _mm512_add_ps(_mm512_load_ps(acc.row(2 * i + 1, m0 / 16)), _mm512_set1_ps(bias[2 * i + 1]));
      v[i] = _mm512_permutexvar_epi16(halves, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    transpose16(v);
    for (int64_t j = 0; j < 16 && m0 + j < p.M; ++j) _mm512_mask_storeu_epi16(p.y16 + (m0 + j) * p.N + n0, keep, v[j]);
  }
}

// A panel's sums acc (x_tiles activation tile columns; rows of it past `rows` unused) to y
// [activation row][weight row] (p.y32 where set, else p.y16), bias added, 16 x 16 at a time. Each
// tile holds 16 / planes activation rows, row j of tile mt the sum of its columns planes j ..
// planes j + planes - 1 (digit planes, least significant first; bf16 tiles: 1).
void store_rows(const LowbitProblem& p, int64_t n0, int64_t rows, const PanelSums& acc, int64_t x_tiles, int planes) {
  const int64_t per_tile = 16 / planes;
  if (!p.y32 && planes == 1) return store_bf16_rows(p, n0, rows, acc);
  // Both 16-row halves of a tile column in turn, so that each output row's 64-byte line of the
  // panel is written at once (1536 x 576 W4 M = 512 bf16: 0.85-0.87 -> 0.76-0.77 ms).
  for (int64_t mt = 0; mt < x_tiles; ++mt) {
    for (int a = 0; a * 16 < rows; ++a) {
      const __mmask16 keep = static_cast<__mmask16>((1u << std::min<int64_t>(16, rows - 16 * a)) - 1);
      const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(keep, p.bias + n0 + 16 * a) : _mm512_setzero_ps();
      __m512i v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(acc.row(16 * a + i, mt));
      transpose16(v);
      for (int64_t j = 0; j < per_tile && mt * per_tile + j < p.M; ++j) {
        const int64_t m = mt * per_tile + j;
        __m512 y = _mm512_castsi512_ps(v[planes * j]);
        for (int q = 1; q < planes; ++q) y = _mm512_add_ps(y, _mm512_castsi512_ps(v[planes * j + q]));
        y = _mm512_add_ps(y, bias);
        if (p.y32) {
          _mm512_mask_storeu_ps(p.y32 + m * p.N + n0 + 16 * a, keep, y);
        } else {
          const __m256i h = (__m256i)_mm512_cvtneps_pbh(y);
          _mm256_mask_storeu_epi16(p.y16 + m * p.N + n0 + 16 * a, keep, h);
        }
      }
    }
  }
}

// The large-M forms (scaled panels; digit planes whose tiles outgrow L2) work in blocks that stay
// in L2: a chunk of k-blocks of all activation tiles, at most this many bytes, serves a group of
// panels whose sums (acc) take at most as much (up to 8 panels).
constexpr int64_t kL2Bytes = 2 << 20;  // L2 per core of the Xeons with AMX (Sapphire Rapids on)
constexpr int64_t kL2BlockBytes = kL2Bytes / 4;
constexpr int64_t kBlockedDecodeBytes = 32 << 10;  // a blocked chunk's decoded codes, kept in L1
constexpr int64_t panels_in_l2(int64_t Mp) {
  return std::clamp<int64_t>(kL2BlockBytes / (kPanelRows * Mp * static_cast<int64_t>(sizeof(float))), 1, 8);
}

// A thread's buffers for one panel (or `panels` of them: sums and scales): its decoded codes (A
// tiles), sums of Mp activation columns (as rows, or as tiles where `tiled`), scales and zeros
// [32 rows][G], panel i's at the accessors.
struct PanelScratch {
  AlignedVector<uint8_t> codes;
  AlignedVector<float> acc, scale, zero;
  int64_t Mp = 0;
  bool tiled = false;
  PanelSums acc_of(int64_t i) {
    float* at = acc.data() + i * kPanelRows * Mp;
    return tiled ? PanelSums{at, 16, 16 * kPanelRows} : PanelSums{at, Mp, 16};
  }
  float* scale_of(int64_t i, int64_t G) { return scale.data() + i * kPanelRows * G; }
  float* zero_of(int64_t i, int64_t G) { return zero.data() + i * kPanelRows * G; }
};

// This thread's PanelScratch sized for `row_bytes` of decoded codes per weight row, Mp activation
// columns and `panels` panels, its sums as tiles where `tiled`.
PanelScratch& panel_scratch(const LowbitProblem& p, int64_t row_bytes, int64_t Mp, int64_t panels = 1,
                            bool tiled = false) {
  thread_local PanelScratch w;
  w.Mp = Mp;
  w.tiled = tiled;
  w.codes.resize(kPanelRows * row_bytes);
  w.acc.resize(panels * kPanelRows * Mp);
  w.scale.resize(panels * kPanelRows * p.G);
  w.zero.resize(panels * kPanelRows * p.G);
  return w;
}

// The fp32 scales and zeros [32 rows][G] of weight rows [n0, n0 + rows), zeros past them.
void panel_scales(const LowbitProblem& p, int64_t n0, int64_t rows, float* scale, float* zero) {
  const int64_t G = p.G, at = n0 * G * dtype_size(p.scale_dtype);
  to_float(static_cast<const uint8_t*>(p.scale) + at, p.scale_dtype, rows * G, scale);
  to_float(static_cast<const uint8_t*>(p.zero) + at, p.scale_dtype, rows * G, zero);
  std::fill(scale + rows * G, scale + kPanelRows * G, 0.f);
  std::fill(zero + rows * G, zero + kPanelRows * G, 0.f);
}

// Weight rows [n_begin, n_end) in groups of up to `panels` panels: each group's scales (and, with
// `zero_sums`, zeroed sums) into w, body(first row, panels in the group), then each panel's sums
// (x_tiles activation tile columns of `planes` planes, as store_rows) to y.
template <typename Body>
void panel_groups(const LowbitProblem& p, int64_t n_begin, int64_t n_end, int64_t panels, PanelScratch& w,
                  int64_t x_tiles, int planes, bool zero_sums, Body body) {
  const int64_t Mp = 16 * x_tiles;
  for (int64_t first = n_begin; first < n_end; first += panels * kPanelRows) {
    const int64_t count = std::min(panels, (n_end - first + kPanelRows - 1) / kPanelRows);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n0 = first + i * kPanelRows;
      panel_scales(p, n0, std::min(kPanelRows, p.N - n0), w.scale_of(i, p.G), w.zero_of(i, p.G));
      if (zero_sums) std::fill_n(w.acc_of(i).at, kPanelRows * Mp, 0.f);
    }
    body(first, count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n0 = first + i * kPanelRows;
      store_rows(p, n0, std::min(kPanelRows, p.N - n0), w.acc_of(i), x_tiles, planes);
    }
  }
}

// ---- activations as int8 digits (AMX-INT8) ----
// An activation row (fp32 or bf16) as kDigitPlanes signed base-256 digits of a fixed point per
// group (unit 2^e, |x| / unit < 2^22 for the group's largest |x|): each value within 2^-23 of that
// largest |x|, as fp32 sums are. (Two planes, 2^-15, would let a group's outlier of 100 times its
// other values cost bf16 rows their 1e-3.) An activation tile's 16 columns are five rows' planes
// side by side (the last column zero), the B operand of tdpbssd against the weight's codes as
// signed bytes q - 2^(B - 1) (decode_bytes, centre_zeros): exact int32 sums, 64 codes per
// instruction where tdpbf16ps takes 32, and a decode of one vpermb, one vpmultishiftqb, one and
// and one subtract per 64 codes (8-bit codes: an xor). Each group's column sums are scaled by
// their plane's unit 256^j 2^e, then as the bf16 tiles' sums: y += scale * sum(q x) + zero *
// sum(x), the planes added in store_rows (side by side, the group sum with the top plane, whose
// sums carry the group's magnitude, so the two cancel group by group; apart, below, before the
// scaling).
constexpr int64_t kDigitBlockK = 64;  // codes per int8 k-block (one A tile row)
constexpr int kDigitPlanes = 3;
// Or each plane of a block of 16 rows has a tile of its own (`apart`: tile 3 b + q holds plane q of
// block b's rows, one to a column), and each group's three plane sums are added before the
// scaling: 8 vector operations per 16 rows and weight row where side by side takes 12, for three
// tiles' products where side by side needs 16 / 5. A block apart cost about 2.5 tiles side by
// side, so it is taken where 5 blocks take at most 2 tiles' time: M = 11-16, 21-32 and from 36
// (session 49, fp32 rows, one thread, ms, side by side / apart: 4096 x 4096 W4 M = 6 0.98-1.03 /
// 1.06-1.19, M = 10 1.00-1.04 / 1.08-1.21, M = 11 1.23-1.36 / 1.07-1.14, M = 16 1.49-1.57 /
// 1.10-1.16, M = 20 1.51-1.61 / 1.73-1.83, M = 24 1.86-2.01 / 1.73-1.85, M = 40 2.66-2.85 /
// 2.52-2.87, M = 64 4.02-4.40 / 3.62-3.78; 1536 x 576 g64 M = 8 0.086-0.090 / 0.096-0.099, M =
// 16 0.143-0.147 / 0.093-0.097, M = 20 0.147-0.151 / 0.164-0.175, M = 64 0.369-0.378 /
// 0.284-0.308).
constexpr int64_t side_by_side_tiles(int64_t M) { return (M + 16 / kDigitPlanes - 1) / (16 / kDigitPlanes); }
constexpr bool digits_apart(int64_t M) { return 5 * ((M + 15) / 16) <= 2 * side_by_side_tiles(M); }
// Activation rows per block: one tile side by side, kDigitPlanes tiles apart.
constexpr int64_t digit_block_rows(bool apart) { return apart ? 16 : 16 / kDigitPlanes; }

// Blocks [kb0, kb1) of weight rows [n0, n0 + 32) as signed bytes q - 2^(B - 1) (centre_zeros),
// [kb - kb0][32 rows][64 codes]; rows past N zeros.
void decode_bytes(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint8_t* out) {
  with_bits(p.bits, [&](auto b) {
    constexpr int B = decltype(b)::value;
    const __m512i centre = _mm512_set1_epi8(static_cast<char>(1 << (B - 1)));
    decode_rows<B, kDigitBlockK>(p, n0, kb0, kb1, out, [&](const uint8_t* src) {
      if constexpr (B == 8)
        return _mm512_xor_si512(_mm512_loadu_si512(src), centre);
      else
        return _mm512_sub_epi8(code_bytes<B>(src), centre);
    });
  });
}

// The zeros of `count` panels for codes centred as decode_bytes gives them: s (q - c) + (z + c s)
// = s q + z. Unsigned codes against digits far from zero (300 + randn) made each group's scaled
// sum and its zero term two large values that nearly cancel, each rounded in fp32: 4096 columns
// ended 2e-5 and 11008 columns 8e-5 from float64; centred, both terms stay small.
void centre_zeros(const LowbitProblem& p, PanelScratch& w, int64_t count) {
  const float c = static_cast<float>(1 << (p.bits - 1));
  for (int64_t i = 0; i < count; ++i) {
    const float* scale = w.scale_of(i, p.G);
    float* zero = w.zero_of(i, p.G);
    for (int64_t j = 0; j < kPanelRows * p.G; ++j) zero[j] += c * scale[j];
  }
}

}  // namespace

bool available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16") || !__builtin_cpu_supports("avx512vbmi") ||
        !__builtin_cpu_supports("amx-bf16") || !__builtin_cpu_supports("amx-int8") ||
        !__builtin_cpu_supports("amx-tile"))
      return false;
    // Linux hands out the tile state (8 KiB per thread) only on request (ARCH_REQ_XCOMP_PERM,
    // XFEATURE_XTILEDATA); without it the first tile instruction faults.
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

bool layout(int bits, int64_t group_size, int64_t K) {
  return (bits == 2 || bits == 3 || bits == 4 || bits == 8) && group_size % kBlockK == 0 && K % kBlockK == 0;
}

bool pair_layout(int bits, int64_t group_size, int64_t K) {
  return bits == 4 && group_size % kChunkCodes<4> == 0 && K % kChunkCodes<4> == 0;
}

int64_t activation_tiles(int64_t M) { return (M + 15) / 16; }

void prepare(const uint16_t* x, int64_t M, int64_t K, int64_t group_size, bool pairs, int64_t m_tile0,
             int64_t m_tile1, uint16_t* tiles, float* xsum) {
  const int64_t x_tiles = activation_tiles(M), blocks = K / kBlockK, G = K / group_size, Mp = 16 * x_tiles;
  // Pair order: k-block v of a 128-code chunk holds its codes 4 j + c (j < 32), c = 2 (v % 2) + v / 2
  // (bf16_position), picked from the chunk's four vectors two at a time.
  alignas(64) static constexpr auto pick = [] {
    struct {
      uint16_t v[kPairs<4>][32];
    } t{};
    for (int v = 0; v < kPairs<4>; ++v)
      for (int i = 0; i < 32; ++i) t.v[v][i] = static_cast<uint16_t>(4 * (i % 16) + 2 * (v % 2) + v / 2);
    return t;
  }();
  const auto block = [&](const uint16_t* row, int64_t kb) {
    if (!pairs) return _mm512_loadu_si512(row + kb * kBlockK);
    const uint16_t* chunk = row + kb / kPairs<4> * kChunkCodes<4>;
    const __m512i idx = _mm512_load_si512(pick.v[kb % kPairs<4>]);
    const __m512i lo = _mm512_permutex2var_epi16(_mm512_loadu_si512(chunk), idx, _mm512_loadu_si512(chunk + 32));
    const __m512i hi = _mm512_permutex2var_epi16(_mm512_loadu_si512(chunk + 64), idx, _mm512_loadu_si512(chunk + 96));
    return _mm512_mask_blend_epi16(0xffff0000u, lo, hi);
  };
  for (int64_t mt = m_tile0; mt < m_tile1; ++mt) {
    for (int64_t m = mt * 16; xsum && m < mt * 16 + 16; ++m)
      for (int64_t g = 0; g < G; ++g) xsum[g * Mp + m] = 0.f;
    for (int64_t kb = 0; kb < blocks; ++kb) {
      __m512i v[16];  // v[m] = row m's 16 pairs; transposed, v[j] = pair j of the 16 rows
      __m512 sum = _mm512_setzero_ps();
      for (int m = 0; m < 16; ++m) {
        const int64_t row = mt * 16 + m;
        v[m] = row < M ? block(x + row * K, kb) : _mm512_setzero_si512();
      }
      transpose16(v);
      for (int j = 0; j < 16; ++j) _mm512_store_si512(tiles + (kb * x_tiles + mt) * (kTileBytes / 2) + j * 32, v[j]);
      if (!xsum) continue;
      for (int j = 0; j < 16; ++j) {  // lane m of pair j: bf16 of k = 2j (low half) and 2j + 1
        const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(v[j], 16));
        const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(v[j], _mm512_set1_epi32(int(0xffff0000u))));
        sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
      }
      float* s = xsum + (kb * kBlockK / group_size) * Mp + mt * 16;
      _mm512_storeu_ps(s, _mm512_add_ps(_mm512_loadu_ps(s), sum));
    }
  }
}

bool split_fp32_rows(const float* x, int64_t m0, int64_t m1, int64_t K, int parts, uint16_t* out) {
  const __m512 tiny = _mm512_set1_ps(0x1p-64f);
  for (int64_t m = m0; m < m1; ++m) {
    __mmask16 bad = 0, big = 0, nonzero = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 keep = K - k >= 16 ? 0xffff : static_cast<__mmask16>((1u << (K - k)) - 1);
      __m512 rest = _mm512_maskz_loadu_ps(keep, x + m * K + k);
      const __m512 mag = _mm512_abs_ps(rest);
      big |= _mm512_cmp_ps_mask(mag, tiny, _CMP_GE_OQ);
      nonzero |= _mm512_cmp_ps_mask(mag, _mm512_setzero_ps(), _CMP_NEQ_UQ);
      for (int j = 0; j < parts; ++j) {
        const __m256i part = (__m256i)_mm512_cvtneps_pbh(rest);
        _mm256_mask_storeu_epi16(out + ((m * parts) + j) * K + k, keep, part);
        const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(part), 16));
        if (j == 0) bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(back), _mm512_set1_ps(3.4e38f), _CMP_NLE_UQ);
        rest = _mm512_sub_ps(rest, back);
      }
    }
    if (bad || (nonzero && !big)) return false;
  }
  return true;
}

namespace {

// Prefetches into L2 the bytes of k-blocks [kb0, kb1) of weight rows [n0, n0 + 32) (those below N).
void prefetch_codes(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1) {
  const int64_t block_bytes = kBlockK * p.bits / 8;
  for (int64_t r = 0; r < kPanelRows && n0 + r < p.N; ++r)
    for (int64_t b = kb0 * block_bytes; b < kb1 * block_bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p.qweight + (n0 + r) * p.row_bytes + b), _MM_HINT_T1);
}

// The scaled form in blocks (kL2BlockBytes). Its 2 x 2 tile products load 4 KiB per 64 cycles of
// products (four tdpbf16ps); before, each panel streamed every activation tile over the whole K
// (4 MiB at M = 512, K = 4096: from L3, once per panel). Now each panel's chunk of decoded weights
// (up to 48 KiB, kChunkBlocks) stays in L1 across the activation tiles, chunks of even size.
//
// A chunk's k-blocks at most: its decoded codes fill up to 48 KiB (the L1 of these CPUs), which
// halves the sums' loads and stores per panel where K is 576 against 16 blocks (measured 1-3% faster
// at M = 512).
constexpr int64_t kChunkBlocks = 24;

void scaled_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t G = p.G, x_tiles = activation_tiles(p.M), Mp = 16 * x_tiles, blocks = p.K / kBlockK;
  const int64_t most = std::clamp<int64_t>(kL2BlockBytes / (x_tiles * kTileBytes), 1, kChunkBlocks);
  const int64_t chunks = (blocks + most - 1) / most, chunk = (blocks + chunks - 1) / chunks;
  const int64_t panels = panels_in_l2(Mp);
  PanelScratch& w = panel_scratch(p, chunk * kBlockK * 2, Mp, panels, true);
  uint16_t* wchunk = reinterpret_cast<uint16_t*>(w.codes.data());
  load_tile_config();
  panel_groups(p, n_begin, n_end, panels, w, x_tiles, 1, false, [&](int64_t first, int64_t count) {
    for (int64_t kb0 = 0; kb0 < blocks; kb0 += chunk) {
      const int64_t kb1 = std::min(blocks, kb0 + chunk);
      for (int64_t i = 0; i < count; ++i) {
        decode_scaled(p, first + i * kPanelRows, kb0, kb1, w.scale_of(i, G), w.zero_of(i, G), wchunk);
        // The next decode's bytes (the next panel's, or the first panel's next chunk) meanwhile.
        if (i + 1 < count)
          prefetch_codes(p, first + (i + 1) * kPanelRows, kb0, kb1);
        else
          prefetch_codes(p, first, kb1, std::min(blocks, kb1 + chunk));
        for (int64_t mt = 0; mt < x_tiles; mt += 2) {  // the sums straight in acc, added from the second chunk
          tile_sums_for<false>(x_tiles - mt >= 2 ? 2 : 1, wchunk, p.x16, x_tiles, kb0, kb1 - kb0, mt,
                               w.acc_of(i).from(mt), kb0 > 0);
        }
      }
    }
  });
  _tile_release();
}

}  // namespace

void rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end, bool scaled, AmxCodes codes) {
  if (scaled) return scaled_rows(p, n_begin, n_end);
  const int64_t M = p.M, G = p.G, x_tiles = activation_tiles(M), Mp = 16 * x_tiles;
  const int64_t per_group = p.group_size / kBlockK;
  const int64_t chunk = groups_per_decode(p, 2);  // bf16 codes
  PanelScratch& w = panel_scratch(p, chunk * p.group_size * 2, Mp);
  auto &acc = w.acc, &scale = w.scale, &zero = w.zero;
  uint16_t* wchunk = reinterpret_cast<uint16_t*>(w.codes.data());
  alignas(64) float ctmp[4 * 256];
  load_tile_config();
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, p.N - n0);
    panel_scales(p, n0, rows, scale.data(), zero.data());
    if (p.bits != 8) {  // the codes carry an offset: s (off + q) + (z - off s) = s q + z
      const float off = code_offset(p.bits, codes.fine);
      for (int64_t i = 0; i < rows * G; ++i) zero[i] -= off * scale[i];
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g0 = 0; g0 < G; g0 += chunk) {
      // The chunk's codes are decoded once into L1 and serve every activation tile.
      const int64_t g1 = std::min(G, g0 + chunk);
      decode_blocks(codes, p, n0, g0 * per_group, g1 * per_group, wchunk);
      for (int64_t g = g0; g < g1; ++g) {
        const uint16_t* wgroup = wchunk + (g - g0) * per_group * kPanelRows * kBlockK;
        for (int64_t mt = 0; mt < x_tiles; mt += 2) {
          const int tiles = x_tiles - mt >= 2 ? 2 : 1;
          tile_sums_for<false>(tiles, wgroup, p.x16, x_tiles, g * per_group, per_group, mt, in_scratch(ctmp));
          for (int b = 0; b < tiles; ++b)
            add_group_sums([&](int a, int i) { return _mm512_load_ps(ctmp + (2 * b + a) * 256 + i * 16); },
                           scale.data(), zero.data(), G, g, _mm512_loadu_ps(p.xsum + g * Mp + (mt + b) * 16),
                           acc.data(), Mp, (mt + b) * 16);
        }
      }
    }
    store_rows(p, n0, rows, w.acc_of(0), x_tiles, 1);
  }
  _tile_release();
}

int64_t scaled_pass_rows(int64_t M) { return kPanelRows * panels_in_l2(16 * activation_tiles(M)); }

bool tiles_outgrow_l2(int64_t M, int64_t K) { return activation_tiles(M) * kTileBytes * (K / kBlockK) >= kL2Bytes; }

void dequantize_bf16(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  uint16_t* out = static_cast<uint16_t*>(p.w_out);
  thread_local AlignedVector<float> scale, zero;
  scale.resize(kPanelRows * p.G);
  zero.resize(kPanelRows * p.G);
  with_bits(p.bits, [&](auto b) {
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelRows) {
      const int64_t rows = std::min(kPanelRows, n_end - n0);
      panel_scales(p, n0, rows, scale.data(), zero.data());
      for (int64_t r = 0; r < rows; ++r)
        scaled_blocks<decltype(b)::value>(p, n0 + r, 0, p.K / kBlockK, scale.data() + r * p.G,
                                          zero.data() + r * p.G, out + (n0 + r) * p.K, kBlockK);
    }
  });
}

bool digit_layout(int bits, int64_t group_size, int64_t K) {
  // A group's int32 sums stay exact up to 65536 codes (65536 * 255 * 128 < 2^31).
  return layout(bits, group_size, K) && group_size % kDigitBlockK == 0 && K % kDigitBlockK == 0 &&
         group_size <= 65536;
}

int64_t digit_blocks(int64_t M) {
  const int64_t rows = digit_block_rows(digits_apart(M));
  return (M + rows - 1) / rows;
}

int64_t digit_tiles(int64_t M) { return digit_blocks(M) * (digits_apart(M) ? kDigitPlanes : 1); }

namespace {

// prepare_digits for T = float or uint16_t (bf16).
template <typename T>
bool prepare_digits(const T* x, int64_t M, int64_t K, int64_t group_size, int64_t block0, int64_t block1,
                    int8_t* tiles, float* unit, float* xsum) {
  constexpr int P = kDigitPlanes, fixed_bits = 8 * P - 2;  // top digit within [-65, 65]
  const bool apart = digits_apart(M);
  const int per_block = static_cast<int>(digit_block_rows(apart)), block_tiles = apart ? P : 1;
  const int64_t x_tiles = digit_tiles(M), G = K / group_size, Mp = 16 * digit_blocks(M);
  const int64_t per_group = group_size / kDigitBlockK;
  alignas(64) int8_t stage[P][16][kDigitBlockK];  // the block's tiles, [tile][column][k]
  float shift[16];                              // -log2(unit) of each row's current group, for vscalefps
  // Plane q of the block's row j: its tile and column (of unit and xsum too: apart, one per row).
  const auto tile_of = [&](int q) { return apart ? q : 0; };
  const auto column_of = [&](int j, int q) { return apart ? j : P * j + q; };
  for (int64_t mb = block0; mb < block1; ++mb) {
    std::fill(&stage[0][0][0], &stage[0][0][0] + sizeof(stage), int8_t{0});
    for (int64_t kb = 0; kb < K / kDigitBlockK; ++kb) {
      const int64_t g = kb / per_group;
      float *units = unit + g * Mp + mb * 16, *sums = xsum + g * Mp + mb * 16;
      for (int j = 0; j < per_block; ++j) {
        const int64_t row = mb * per_block + j;
        if (row >= M) {
          if (kb % per_group == 0)
            for (int q = 0; q < P; ++q) units[column_of(j, q)] = sums[column_of(j, q)] = 0.f;
          continue;
        }
        const T* xr = x + row * K;
        if (kb % per_group == 0) {  // the group's unit
          __m512 big = _mm512_setzero_ps(), total = _mm512_setzero_ps();
          __mmask16 bad = 0;
          for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 16) {
            const __m512 mag = _mm512_abs_ps(load16(xr, k));
            bad |= _mm512_cmp_ps_mask(mag, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ);  // NaN or infinity
            big = _mm512_max_ps(big, mag);
            total = _mm512_add_ps(total, mag);
          }
          const float most = _mm512_reduce_max_ps(big);
          // Non-finite values and groups the digits do not carry: the caller's other kernels run.
          if (bad || !digits_carry_group<T>(most, _mm512_reduce_add_ps(total), group_size)) return false;
          int e = 0;
          std::frexp(most, &e);  // most < 2^e
          const int u = most == 0.f ? 0 : e - fixed_bits;
          shift[j] = static_cast<float>(-u);
          for (int q = 0; q < P; ++q) {  // apart: the unit of plane 0 (digit_rows scales the others)
            units[column_of(j, q)] = std::ldexp(1.f, apart ? u : u + 8 * q);
            sums[column_of(j, q)] = 0.f;
          }
        }
        const __m512 s = _mm512_set1_ps(shift[j]);
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < kDigitBlockK / 16; ++c) {
          __m512i v = _mm512_cvtps_epi32(_mm512_scalef_ps(load16(xr, kb * kDigitBlockK + 16 * c), s));
          sum = _mm512_add_ps(sum, _mm512_cvtepi32_ps(v));
          for (int q = 0; q < P; ++q) {  // balanced digits, least significant first
            const __m512i d = q + 1 < P ? _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, _mm512_set1_epi32(128)),
                                                                            _mm512_set1_epi32(255)),
                                                           _mm512_set1_epi32(128))
                                        : v;
            _mm_store_si128(reinterpret_cast<__m128i*>(&stage[tile_of(q)][column_of(j, q)][16 * c]),
                            _mm512_cvtepi32_epi8(d));
            v = _mm512_srai_epi32(_mm512_sub_epi32(v, d), 8);
          }
        }
        // With the top plane's column: its sums carry the group's magnitude, which the zero term
        // cancels (side by side each plane's column is totalled apart until store_rows).
        sums[column_of(j, P - 1)] += _mm512_reduce_add_ps(sum) * std::ldexp(1.f, -static_cast<int>(shift[j]));
      }
      for (int b = 0; b < block_tiles; ++b) {
        __m512i v[16];  // a tile: 16 k-quads x 16 columns x 4 bytes
        for (int c = 0; c < 16; ++c) v[c] = _mm512_load_si512(stage[b][c]);
        transpose16(v);
        int8_t* t = tiles + (kb * x_tiles + mb * block_tiles + b) * kTileBytes;
        for (int i = 0; i < 16; ++i) _mm512_store_si512(t + 64 * i, v[i]);
      }
    }
  }
  return true;
}

}  // namespace

bool prepare_digits(const float* x, int64_t M, int64_t K, int64_t group_size, int64_t block0, int64_t block1,
                    int8_t* tiles, float* unit, float* xsum) {
  return prepare_digits<float>(x, M, K, group_size, block0, block1, tiles, unit, xsum);
}

bool prepare_digits(const uint16_t* x, int64_t M, int64_t K, int64_t group_size, int64_t block0, int64_t block1,
                    int8_t* tiles, float* unit, float* xsum) {
  return prepare_digits<uint16_t>(x, M, K, group_size, block0, block1, tiles, unit, xsum);
}

void digit_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const bool apart = digits_apart(p.M);
  const int64_t G = p.G, x_tiles = digit_tiles(p.M), blocks = digit_blocks(p.M), Mp = 16 * blocks;
  const int64_t per_group = p.group_size / kDigitBlockK, group_tile_bytes = per_group * x_tiles * kTileBytes;
  // Where the whole K of digit tiles outgrows L2, chunks of groups (tiles at most kL2BlockBytes,
  // decoded codes at most kBlockedDecodeBytes) serve a group of panels; else one panel at a time,
  // its groups decoded kPanelDecodeBytes at a time.
  const bool blocked = G * group_tile_bytes > kL2Bytes;
  const int64_t blocked_chunk_max = std::max<int64_t>(1, kBlockedDecodeBytes / (kPanelRows * p.group_size));
  const int64_t chunk = blocked ? std::clamp<int64_t>(kL2BlockBytes / group_tile_bytes, 1, blocked_chunk_max)
                                : groups_per_decode(p, 1);  // int8 codes
  const int64_t panels = blocked ? panels_in_l2(Mp) : 1;
  PanelScratch& w = panel_scratch(p, chunk * p.group_size, Mp, panels);
  alignas(64) int32_t ctmp[6 * 256];
  const auto sums_fp32 = [](const int32_t* c) { return _mm512_cvtepi32_ps(_mm512_load_si512(c)); };
  // Group g's sums for panel i, its codes decoded at wgroup, into w.acc_of(i).
  const auto group_sums = [&](int64_t i, int64_t g, const uint8_t* wgroup) {
    if (apart) {
      for (int64_t mt = 0; mt < x_tiles; mt += kDigitPlanes) {  // a block's three planes
        plane_sums(wgroup, reinterpret_cast<const uint8_t*>(p.x8), x_tiles, g * per_group, per_group, mt, ctmp);
        const int64_t col = mt / kDigitPlanes * 16;
        const __m512 u = _mm512_loadu_ps(p.x8_unit + g * Mp + col);
        add_group_sums(
            [&](int a, int r) {  // plane q's sums at c + 256 q
              const int32_t* c = ctmp + a * 768 + r * 16;
              const __m512 low = _mm512_fmadd_ps(sums_fp32(c + 256), _mm512_set1_ps(256.f), sums_fp32(c));
              return _mm512_mul_ps(_mm512_fmadd_ps(sums_fp32(c + 512), _mm512_set1_ps(65536.f), low), u);
            },
            w.scale_of(i, G), w.zero_of(i, G), G, g, _mm512_loadu_ps(p.xsum + g * Mp + col), w.acc_of(i).at, Mp, col);
      }
      return;
    }
    for (int64_t mt = 0; mt < x_tiles; mt += 2) {  // side by side
      const int tiles = x_tiles - mt >= 2 ? 2 : 1;
      tile_sums_for<true>(tiles, wgroup, p.x8, x_tiles, g * per_group, per_group, mt, in_scratch(ctmp));
      for (int b = 0; b < tiles; ++b) {
        const int64_t col = (mt + b) * 16;
        const __m512 u = _mm512_loadu_ps(p.x8_unit + g * Mp + col);
        add_group_sums([&](int a, int r) { return _mm512_mul_ps(sums_fp32(ctmp + (2 * b + a) * 256 + r * 16), u); },
                       w.scale_of(i, G), w.zero_of(i, G), G, g, _mm512_loadu_ps(p.xsum + g * Mp + col), w.acc_of(i).at, Mp, col);
      }
    }
  };
  load_tile_config();
  panel_groups(p, n_begin, n_end, panels, w, blocks, apart ? 1 : kDigitPlanes, true, [&](int64_t first, int64_t count) {
    centre_zeros(p, w, count);
    for (int64_t g0 = 0; g0 < G; g0 += chunk) {
      const int64_t g1 = std::min(G, g0 + chunk);
      for (int64_t i = 0; i < count; ++i) {
        decode_bytes(p, first + i * kPanelRows, g0 * per_group, g1 * per_group, w.codes.data());
        for (int64_t g = g0; g < g1; ++g)
          group_sums(i, g, w.codes.data() + (g - g0) * per_group * kPanelRows * 64);
      }
    }
  });
  _tile_release();
}

}  // namespace isa_amx
}  // namespace sk
