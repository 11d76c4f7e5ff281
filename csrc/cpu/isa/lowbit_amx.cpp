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
#include <vector>

#include "common/half.h"
#include "cpu/isa/bf16_codes.h"
#include "cpu/isa/transpose16.h"
#include "cpu/lowbit_kernels.h"

namespace sk {
namespace isa_amx {
namespace {

constexpr int64_t kBlockK = 32;    // codes per k-block: one A tile row, 16 VNNI pairs of a B tile
constexpr int64_t kPanelRows = 32;  // weight rows per panel: two A tiles
constexpr int kTileBytes = 1024;

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
  struct Tables {
    uint8_t bytes[64], fields[64];
  };
  alignas(64) static constexpr Tables t = [] {
    Tables t{};
    for (int l = 0; l < 8; ++l)
      for (int i = 0; i < 8; ++i) {
        t.bytes[8 * l + i] = static_cast<uint8_t>(l * B / 2 + i);  // codes 4 l .. from bit 4 l B
        // Byte 2 j of lane l: code 4 l + j's field, which starts (4 l B) % 8 + B j bits into the lane.
        const int at = 4 * (l * B % 2) + B * (i / 2) - kMantissaShift<B, F>;
        t.fields[8 * l + i] = static_cast<uint8_t>(i % 2 ? 0 : at & 63);
      }
    return t;
  }();
  const __m512i raw = _mm512_maskz_loadu_epi8((1ull << (4 * B)) - 1, src);
  const __m512i lanes = _mm512_permutexvar_epi8(_mm512_load_si512(t.bytes), raw);
  return codes_as_bf16<B, F>(_mm512_multishift_epi64_epi8(_mm512_load_si512(t.fields), lanes));
}

// One k-block of an 8-bit row: 32 bytes, one code each.
inline __m512i codes8(const uint8_t* src) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
  return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lanes 0-15 from lo
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

// Blocks [kb0, kb1) of weight rows [n0, n0 + 32) of B-bit codes as A tiles, [kb - kb0][32
// rows][32 codes]; rows past N are zeros. Natural codes: k in order (2-4 bits plus
// kCodeOffset<B, F>: natural_codes).
template <int B, bool F>
void decode_natural(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint16_t* out) {
  constexpr int64_t block_bytes = kBlockK * B / 8;
  const int64_t rows = std::min(kPanelRows, p.N - n0);
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint16_t* dst = out + r * kBlockK;
    const uint8_t* src = p.qweight + (n0 + r) * p.row_bytes + kb0 * block_bytes;
    prefetch_ahead(p, n0, r, kb0 * block_bytes, (kb1 - kb0) * block_bytes);
    for (int64_t kb = 0; kb < kb1 - kb0; ++kb) {
      __m512i codes = _mm512_setzero_si512();
      if (r < rows) {
        if constexpr (B == 8)
          codes = codes8(src + kb * block_bytes);
        else
          codes = natural_codes<B, F>(src + kb * block_bytes);
      }
      _mm512_store_si512(dst + kb * kPanelRows * kBlockK, codes);
    }
  }
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

template <bool F>
void decode_blocks(const LowbitProblem& p, bool pairs, int64_t n0, int64_t kb0, int64_t kb1, uint16_t* out) {
  switch (p.bits) {
    case 2: return decode_natural<2, F>(p, n0, kb0, kb1, out);
    case 3: return decode_natural<3, F>(p, n0, kb0, kb1, out);
    case 4: return pairs ? decode_pairs<F>(p, n0, kb0, kb1, out) : decode_natural<4, F>(p, n0, kb0, kb1, out);
    default: return decode_natural<8, F>(p, n0, kb0, kb1, out);
  }
}

void decode_blocks(AmxCodes codes, const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint16_t* out) {
  if (codes.fine)
    decode_blocks<true>(p, codes.pairs, n0, kb0, kb1, out);
  else
    decode_blocks<false>(p, codes.pairs, n0, kb0, kb1, out);
}

// One k-block of B-bit codes (src) as bf16 of q * s + z, in natural order.
template <int B>
inline __m512i scaled_codes(const uint8_t* src, __m512 s, __m512 z) {
  if constexpr (B == 8) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
    const __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s, z), _mm512_fmadd_ps(lo, s, z));
  } else {
    alignas(64) static constexpr uint16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                            21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                            11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    // u32 lane j of the decode holds codes 2 j (low half) and 2 j + 1 plus the offset, each exact
    // in fp32 once moved to the lane's top half, and exact again without the offset.
    const __m512i codes = natural_codes<B, false>(src);
    const __m512 off = _mm512_set1_ps(kCodeOffset<B>);
    const __m512 even = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_slli_epi32(codes, 16)), off);
    const __m512 odd = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_and_si512(codes, _mm512_set1_epi32(int(0xffff0000u)))), off);
    const __m512i w = (__m512i)_mm512_cvtne2ps_pbh(_mm512_fmadd_ps(odd, s, z), _mm512_fmadd_ps(even, s, z));
    return _mm512_permutexvar_epi16(_mm512_load_si512(interleave), w);
  }
}

// Weight rows [n0, n0 + 32) of B-bit codes dequantised to bf16 (q * scale + zero rounded, as a
// dense bf16 F.linear has them) as A tiles of the whole K, [K / 32][32 rows][32 values]; rows past
// N zeros.
template <int B>
void decode_scaled(const LowbitProblem& p, int64_t n0, const float* scale, const float* zero, uint16_t* out) {
  constexpr int64_t block_bytes = kBlockK * B / 8;
  const int64_t rows = std::min(kPanelRows, p.N - n0), blocks = p.K / kBlockK, per_group = p.group_size / kBlockK;
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint16_t* dst = out + r * kBlockK;
    const uint8_t* src = p.qweight + (n0 + r) * p.row_bytes;
    for (int64_t kb = 0; kb < blocks; ++kb) {
      const int64_t g = kb / per_group;
      const __m512i w = r < rows ? scaled_codes<B>(src + kb * block_bytes, _mm512_set1_ps(scale[r * p.G + g]),
                                                   _mm512_set1_ps(zero[r * p.G + g]))
                                 : _mm512_setzero_si512();
      _mm512_store_si512(dst + kb * kPanelRows * kBlockK, w);
    }
  }
}

void decode_scaled(const LowbitProblem& p, int64_t n0, const float* scale, const float* zero, uint16_t* out) {
  switch (p.bits) {
    case 2: return decode_scaled<2>(p, n0, scale, zero, out);
    case 3: return decode_scaled<3>(p, n0, scale, zero, out);
    case 4: return decode_scaled<4>(p, n0, scale, zero, out);
    default: return decode_scaled<8>(p, n0, scale, zero, out);
  }
}

// Sums over k-blocks [kb0, kb0 + blocks) (decoded in w from kb0 on: one group, or a scaled
// panel's whole K) for one panel and MTiles (1 or 2) activation tiles from mt, into ctmp: tile
// 2 b + a holds weight rows 16 a + i by activation rows 16 (mt + b) + j. With one activation
// tile over a long K (a scaled panel's), even and odd k-blocks go to separate tiles (2 and 3,
// added after) so that consecutive tdpbf16ps do not wait on each other's sums; over one group's
// few blocks the two extra tile stores and adds cost more than the wait (4096 x 4096 W4 in groups of
// 128, M = 4-16, one thread: 5-10% faster without).
template <int MTiles>
void tile_sums(const uint16_t* w, const uint16_t* xtiles, int64_t x_tiles, int64_t kb0, int64_t blocks, int64_t mt,
               float* ctmp) {
  const bool alternate = MTiles == 1 && blocks >= 16;
  _tile_zero(0);
  _tile_zero(1);
  if (MTiles == 2 || alternate) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const uint16_t* wk = w + kb * kPanelRows * kBlockK;
    const uint16_t* x = xtiles + ((kb0 + kb) * x_tiles + mt) * (kTileBytes / 2);
    _tile_loadd(4, wk, 64);
    _tile_loadd(5, wk + 16 * kBlockK, 64);
    _tile_loadd(6, x, 64);
    if (MTiles == 2) {
      _tile_loadd(7, x + kTileBytes / 2, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    } else if (!alternate || kb % 2 == 0) {
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 5, 6);
    } else {
      _tile_dpbf16ps(2, 4, 6);
      _tile_dpbf16ps(3, 5, 6);
    }
  }
  _tile_stored(0, ctmp, 64);
  _tile_stored(1, ctmp + 256, 64);
  if (MTiles == 1 && !alternate) return;
  _tile_stored(2, ctmp + 512, 64);
  _tile_stored(3, ctmp + 768, 64);
  if (MTiles == 1)
    for (int i = 0; i < 512; i += 16)
      _mm512_store_ps(ctmp + i, _mm512_add_ps(_mm512_load_ps(ctmp + i), _mm512_load_ps(ctmp + 512 + i)));
}

// tile_sums for the `tiles` (1 or 2) activation tiles from mt.
void tile_sums_for(int tiles, const uint16_t* w, const uint16_t* xtiles, int64_t x_tiles, int64_t kb0,
                   int64_t blocks, int64_t mt, float* ctmp) {
  if (tiles == 2)
    tile_sums<2>(w, xtiles, x_tiles, kb0, blocks, mt, ctmp);
  else
    tile_sums<1>(w, xtiles, x_tiles, kb0, blocks, mt, ctmp);
}

// A panel's sums acc [32 weight rows][16 x_tiles activation rows] (rows of it past `rows` unused)
// to y [activation row][weight row] (p.y32 where set, else p.y16), bias added, 16 x 16 at a time.
void store_rows(const LowbitProblem& p, int64_t n0, int64_t rows, const float* acc, int64_t x_tiles) {
  const int64_t Mp = 16 * x_tiles;
  for (int a = 0; a * 16 < rows; ++a) {
    const int64_t nr = std::min<int64_t>(16, rows - 16 * a);
    const __mmask16 keep = static_cast<__mmask16>((1u << nr) - 1);
    const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(keep, p.bias + n0 + 16 * a) : _mm512_setzero_ps();
    for (int64_t mt = 0; mt < x_tiles; ++mt) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(acc + (16 * a + i) * Mp + mt * 16);
      transpose16(v);
      for (int64_t j = 0; j < 16 && mt * 16 + j < p.M; ++j) {
        const int64_t m = mt * 16 + j;
        const __m512 y = _mm512_add_ps(_mm512_castsi512_ps(v[j]), bias);
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

// ---- fp32 rows as int8 digits (AMX-INT8) ----
// An fp32 activation row as kDigitPlanes signed base-256 digits of a fixed point per group (unit
// 2^e, |x| / unit < 2^22 for the group's largest |x|), each digit plane a B operand of tdpbusd
// against the weight's codes as unsigned bytes: exact int32 sums, 64 codes per instruction where
// tdpbf16ps takes 32, and a decode of one vpermb, one vpmultishiftqb and one and per 64 codes (8-bit
// codes: a copy). The sums of a group's three planes are combined in fp32 and scaled once:
// y += scale * unit * (C0 + 256 C1 + 65536 C2) + zero * sum(x), within 2^-23 of the group's
// largest |x| per value, as fp32 sums are.
constexpr int64_t kDigitBlockK = 64;  // codes per int8 k-block (one A tile row)
constexpr int kDigitPlanes = 3;

// One k-block of B-bit codes (B = 2, 3, 4; 8 B bytes from src) as 64 unsigned bytes in natural
// order: vpermb gives u64 lane l the bytes from B l (its eight codes start at bit 8 B l, a whole
// byte), vpmultishiftqb moves code i of the lane to byte i, an and keeps its B bits.
template <int B>
inline __m512i code_bytes(const uint8_t* src) {
  struct Tables {
    uint8_t bytes[64], fields[64];
  };
  alignas(64) static constexpr Tables t = [] {
    Tables t{};
    for (int l = 0; l < 8; ++l)
      for (int i = 0; i < 8; ++i) {
        t.bytes[8 * l + i] = static_cast<uint8_t>(B * l + i);
        t.fields[8 * l + i] = static_cast<uint8_t>(B * i);
      }
    return t;
  }();
  const __m512i raw = _mm512_maskz_loadu_epi8(~0ull >> (64 - 8 * B), src);
  const __m512i lanes = _mm512_permutexvar_epi8(_mm512_load_si512(t.bytes), raw);
  return _mm512_and_si512(_mm512_multishift_epi64_epi8(_mm512_load_si512(t.fields), lanes),
                          _mm512_set1_epi8(static_cast<char>((1 << B) - 1)));
}

// Blocks [kb0, kb1) of weight rows [n0, n0 + 32) as unsigned bytes, [kb - kb0][32 rows][64 codes];
// rows past N zeros.
template <int B>
void decode_bytes(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint8_t* out) {
  constexpr int64_t block_bytes = kDigitBlockK * B / 8;
  const int64_t rows = std::min(kPanelRows, p.N - n0);
  for (int64_t r = 0; r < kPanelRows; ++r) {
    uint8_t* dst = out + r * kDigitBlockK;
    const uint8_t* src = p.qweight + (n0 + r) * p.row_bytes + kb0 * block_bytes;
    prefetch_ahead(p, n0, r, kb0 * block_bytes, (kb1 - kb0) * block_bytes);
    for (int64_t kb = 0; kb < kb1 - kb0; ++kb) {
      __m512i codes = _mm512_setzero_si512();
      if (r < rows) {
        if constexpr (B == 8)
          codes = _mm512_loadu_si512(src + kb * block_bytes);
        else
          codes = code_bytes<B>(src + kb * block_bytes);
      }
      _mm512_store_si512(dst + kb * kPanelRows * kDigitBlockK, codes);
    }
  }
}

void decode_bytes(const LowbitProblem& p, int64_t n0, int64_t kb0, int64_t kb1, uint8_t* out) {
  switch (p.bits) {
    case 2: return decode_bytes<2>(p, n0, kb0, kb1, out);
    case 3: return decode_bytes<3>(p, n0, kb0, kb1, out);
    case 4: return decode_bytes<4>(p, n0, kb0, kb1, out);
    default: return decode_bytes<8>(p, n0, kb0, kb1, out);
  }
}

// The int32 sums of one 16-row half `a` of a decoded panel (w) with the kDigitPlanes planes of
// activation tile mt over k-blocks [kb0, kb0 + blocks), into ctmp (plane j at 256 j).
void digit_sums(const uint8_t* w, int a, const int8_t* xtiles, int64_t x_tiles, int64_t kb0, int64_t blocks,
                int64_t mt, int32_t* ctmp) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const int8_t* x = xtiles + ((kb0 + kb) * x_tiles + mt) * kDigitPlanes * kTileBytes;
    _tile_loadd(3, w + (kb * kPanelRows + 16 * a) * kDigitBlockK, 64);
    _tile_loadd(4, x, 64);
    _tile_loadd(5, x + kTileBytes, 64);
    _tile_loadd(6, x + 2 * kTileBytes, 64);
    _tile_dpbusd(0, 3, 4);
    _tile_dpbusd(1, 3, 5);
    _tile_dpbusd(2, 3, 6);
  }
  _tile_stored(0, ctmp, 64);
  _tile_stored(1, ctmp + 256, 64);
  _tile_stored(2, ctmp + 512, 64);
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

void rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end, bool scaled, AmxCodes codes) {
  const int64_t M = p.M, G = p.G, x_tiles = activation_tiles(M), Mp = 16 * x_tiles;
  const int64_t per_group = p.group_size / kBlockK;
  thread_local AlignedVector<uint16_t> wgroup;
  thread_local AlignedVector<float> acc, scale, zero;
  alignas(64) float ctmp[4 * 256];
  wgroup.resize(kPanelRows * (scaled ? p.K : p.group_size));
  acc.resize(kPanelRows * Mp);
  scale.resize(kPanelRows * G);
  zero.resize(kPanelRows * G);
  load_tile_config();
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, p.N - n0);
    const int64_t at = n0 * G * dtype_size(p.scale_dtype);
    to_float(static_cast<const uint8_t*>(p.scale) + at, p.scale_dtype, rows * G, scale.data());
    to_float(static_cast<const uint8_t*>(p.zero) + at, p.scale_dtype, rows * G, zero.data());
    std::fill(scale.begin() + rows * G, scale.end(), 0.f);
    std::fill(zero.begin() + rows * G, zero.end(), 0.f);
    if (p.bits != 8 && !scaled) {  // the codes carry an offset: s (off + q) + (z - off s) = s q + z
      const float off = static_cast<float>(1 << (codes.fine ? p.bits : 7));  // kCodeOffset<bits, fine>
      for (int64_t i = 0; i < rows * G; ++i) zero[i] -= off * scale[i];
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    if (scaled) {  // the panel's whole K once, each activation tile's sums straight to acc
      decode_scaled(p, n0, scale.data(), zero.data(), wgroup.data());
      for (int64_t mt = 0; mt < x_tiles; mt += 2) {
        const int tiles = x_tiles - mt >= 2 ? 2 : 1;
        tile_sums_for(tiles, wgroup.data(), p.x16, x_tiles, 0, p.K / kBlockK, mt, ctmp);
        for (int b = 0; b < tiles; ++b)
          for (int64_t r = 0; r < kPanelRows; ++r)
            _mm512_storeu_ps(acc.data() + r * Mp + (mt + b) * 16,
                             _mm512_load_ps(ctmp + (2 * b + r / 16) * 256 + r % 16 * 16));
      }
    }
    for (int64_t g = 0; g < G && !scaled; ++g) {
      // The group's codes are decoded once into L1 and serve every activation tile.
      decode_blocks(codes, p, n0, g * per_group, (g + 1) * per_group, wgroup.data());
      for (int64_t mt = 0; mt < x_tiles; mt += 2) {
        const int tiles = x_tiles - mt >= 2 ? 2 : 1;
        tile_sums_for(tiles, wgroup.data(), p.x16, x_tiles, g * per_group, per_group, mt, ctmp);
        for (int b = 0; b < tiles; ++b) {
          const __m512 xs = _mm512_loadu_ps(p.xsum + g * Mp + (mt + b) * 16);
          for (int a = 0; a < 2; ++a)
            for (int i = 0; i < 16; ++i) {
              const int64_t r = 16 * a + i;
              float* dst = acc.data() + r * Mp + (mt + b) * 16;
              const __m512 c = _mm512_load_ps(ctmp + (2 * b + a) * 256 + i * 16);
              __m512 v = _mm512_fmadd_ps(c, _mm512_set1_ps(scale[r * G + g]), _mm512_loadu_ps(dst));
              v = _mm512_fmadd_ps(xs, _mm512_set1_ps(zero[r * G + g]), v);
              _mm512_storeu_ps(dst, v);
            }
        }
      }
    }
    store_rows(p, n0, rows, acc.data(), x_tiles);
  }
  _tile_release();
}

bool digit_layout(int bits, int64_t group_size, int64_t K) {
  // A group's int32 sums stay exact up to 65536 codes (65536 * 255 * 128 < 2^31).
  return layout(bits, group_size, K) && group_size % kDigitBlockK == 0 && K % kDigitBlockK == 0 &&
         group_size <= 65536;
}

bool prepare_digits(const float* x, int64_t M, int64_t K, int64_t group_size, int64_t m_tile0, int64_t m_tile1,
                    int8_t* tiles, float* unit, float* xsum) {
  const int64_t x_tiles = activation_tiles(M), G = K / group_size, Mp = 16 * x_tiles;
  const int64_t per_group = group_size / kDigitBlockK;
  constexpr int kFixedBits = 22;  // |x| / unit < 2^22: the top digit stays within [-64, 64]
  alignas(64) int8_t stage[kDigitPlanes][16][kDigitBlockK];
  std::vector<float> shift(16 * G);  // -log2(unit) per row and group, for vscalefps
  for (int64_t mt = m_tile0; mt < m_tile1; ++mt) {
    for (int m = 0; m < 16; ++m) {
      const int64_t row = mt * 16 + m;
      for (int64_t g = 0; g < G; ++g) {
        __m512 big = _mm512_setzero_ps();
        for (int64_t k = g * group_size; row < M && k < (g + 1) * group_size; k += 16)
          big = _mm512_max_ps(big, _mm512_abs_ps(_mm512_loadu_ps(x + row * K + k)));  // NaN: max keeps big
        const float most = _mm512_reduce_max_ps(big);
        __mmask16 bad = 0;
        for (int64_t k = g * group_size; row < M && k < (g + 1) * group_size; k += 16)
          bad |= _mm512_cmp_ps_mask(_mm512_loadu_ps(x + row * K + k), _mm512_loadu_ps(x + row * K + k), _CMP_UNORD_Q) |
                 _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(x + row * K + k)), _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
        // Non-finite values, and groups so small that the unit would be subnormal: the caller's
        // other kernels run.
        if (bad || (most != 0.f && most < 0x1p-64f)) return false;
        int e = 0;
        std::frexp(most, &e);  // most < 2^e
        const int u = most == 0.f ? 0 : e - kFixedBits;
        shift[m * G + g] = static_cast<float>(-u);
        unit[g * Mp + mt * 16 + m] = std::ldexp(1.f, u);
        xsum[g * Mp + mt * 16 + m] = 0.f;
      }
    }
    for (int64_t kb = 0; kb < K / kDigitBlockK; ++kb) {
      const int64_t g = kb / per_group;
      for (int m = 0; m < 16; ++m) {
        const int64_t row = mt * 16 + m;
        const __m512 s = _mm512_set1_ps(shift[m * G + g]);
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < kDigitBlockK / 16; ++c) {
          __m512i v = row < M ? _mm512_cvtps_epi32(_mm512_scalef_ps(_mm512_loadu_ps(x + row * K + kb * kDigitBlockK + 16 * c), s))
                              : _mm512_setzero_si512();
          sum = _mm512_add_ps(sum, _mm512_cvtepi32_ps(v));
          for (int j = 0; j < kDigitPlanes; ++j) {  // balanced digits, least significant first
            const __m512i d = j + 1 < kDigitPlanes
                                  ? _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, _mm512_set1_epi32(128)),
                                                                      _mm512_set1_epi32(255)),
                                                     _mm512_set1_epi32(128))
                                  : v;
            _mm_store_si128(reinterpret_cast<__m128i*>(&stage[j][m][16 * c]), _mm512_cvtepi32_epi8(d));
            v = _mm512_srai_epi32(_mm512_sub_epi32(v, d), 8);
          }
        }
        float* xs = xsum + g * Mp + mt * 16 + m;
        *xs += _mm512_reduce_add_ps(sum) * std::ldexp(1.f, -static_cast<int>(shift[m * G + g]));
      }
      for (int j = 0; j < kDigitPlanes; ++j) {  // plane j's tile: 16 k-quads x 16 rows x 4 bytes
        __m512i v[16];
        for (int m = 0; m < 16; ++m) v[m] = _mm512_load_si512(stage[j][m]);
        transpose16(v);
        int8_t* t = tiles + ((kb * x_tiles + mt) * kDigitPlanes + j) * kTileBytes;
        for (int i = 0; i < 16; ++i) _mm512_store_si512(t + 64 * i, v[i]);
      }
    }
  }
  return true;
}

void digit_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t M = p.M, G = p.G, x_tiles = activation_tiles(M), Mp = 16 * x_tiles;
  const int64_t per_group = p.group_size / kDigitBlockK;
  const int8_t* xtiles = p.x8;
  thread_local AlignedVector<uint8_t> wgroup;
  thread_local AlignedVector<float> acc, scale, zero;
  alignas(64) int32_t ctmp[kDigitPlanes * 256];
  wgroup.resize(kPanelRows * p.group_size);
  acc.resize(kPanelRows * Mp);
  scale.resize(kPanelRows * G);
  zero.resize(kPanelRows * G);
  load_tile_config();
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, p.N - n0);
    const int64_t at = n0 * G * dtype_size(p.scale_dtype);
    to_float(static_cast<const uint8_t*>(p.scale) + at, p.scale_dtype, rows * G, scale.data());
    to_float(static_cast<const uint8_t*>(p.zero) + at, p.scale_dtype, rows * G, zero.data());
    std::fill(scale.begin() + rows * G, scale.end(), 0.f);
    std::fill(zero.begin() + rows * G, zero.end(), 0.f);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < G; ++g) {
      decode_bytes(p, n0, g * per_group, (g + 1) * per_group, wgroup.data());
      for (int64_t mt = 0; mt < x_tiles; ++mt) {
        const __m512 u = _mm512_loadu_ps(p.x8_unit + g * Mp + mt * 16);
        const __m512 xs = _mm512_loadu_ps(p.xsum + g * Mp + mt * 16);
        for (int a = 0; a < 2; ++a) {
          digit_sums(wgroup.data(), a, xtiles, x_tiles, g * per_group, per_group, mt, ctmp);
          for (int i = 0; i < 16; ++i) {
            const int64_t r = 16 * a + i;
            float* dst = acc.data() + r * Mp + mt * 16;
            const __m512 c0 = _mm512_cvtepi32_ps(_mm512_load_si512(ctmp + i * 16));
            const __m512 c1 = _mm512_cvtepi32_ps(_mm512_load_si512(ctmp + 256 + i * 16));
            const __m512 c2 = _mm512_cvtepi32_ps(_mm512_load_si512(ctmp + 512 + i * 16));
            const __m512 c = _mm512_mul_ps(
                _mm512_fmadd_ps(c2, _mm512_set1_ps(65536.f), _mm512_fmadd_ps(c1, _mm512_set1_ps(256.f), c0)), u);
            __m512 v = _mm512_fmadd_ps(c, _mm512_set1_ps(scale[r * G + g]), _mm512_loadu_ps(dst));
            v = _mm512_fmadd_ps(xs, _mm512_set1_ps(zero[r * G + g]), v);
            _mm512_storeu_ps(dst, v);
          }
        }
      }
    }
    store_rows(p, n0, rows, acc.data(), x_tiles);
  }
  _tile_release();
}

}  // namespace isa_amx
}  // namespace sk
