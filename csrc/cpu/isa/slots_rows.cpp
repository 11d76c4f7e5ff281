// Row and group kernels of the slot coder (docs/FORMATS.md section 5.9). Built with AVX-512 BW +
// VBMI + VBMI2 and GFNI, a row's slot values and a full group's chunks take a handful of vector
// instructions per 64 channels (compress / expand for the escapes, a transpose for the group).
// Built with AVX2 + BMI2, the rows go 32 channels per step (escapes compressed and expanded 8 bytes
// at a time with pext / pdep) and a group channel by channel as a 64-bit word; the generic build
// goes lane by lane.
#include <algorithm>
#include <cstring>

#include "cpu/le_bytes.h"
#include "cpu/slots_rows.h"

#if defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VBMI2__) && defined(__GFNI__)
#include <immintrin.h>
#define SK_SLOTS_VECTOR 1
#elif defined(__AVX2__) && defined(__BMI2__)
#include <immintrin.h>
#define SK_SLOTS_AVX2 1
#endif

#include "cpu/isa_build.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

constexpr int kB = kSlotsBlock;

#ifdef SK_SLOTS_VECTOR

inline int popcount(uint64_t m) { return static_cast<int>(_mm_popcnt_u64(m)); }

inline uint64_t full_lanes(const SlotsLayout& L, int64_t at) {
  const int64_t n = L.d - at;
  return n >= kB ? ~uint64_t{0} : (uint64_t{1} << n) - 1;
}

void slot_row(const uint8_t* sym, const SlotsLayout& L, uint8_t* v, SlotsEscapes& x, int& maxsym) {
  SlotsEscapes e = x;
  __m512i maxv = _mm512_setzero_si512();
  const __m512i one = _mm512_set1_epi8(1), far_nibble = _mm512_set1_epi8(kSlotsFar);
  for (int64_t at = 0; at < L.stride; at += kB) {
    const uint64_t full = full_lanes(L, at);
    const __m512i s = _mm512_maskz_loadu_epi8(full, sym + at);
    maxv = _mm512_max_epu8(maxv, s);
    const __m512i a = _mm512_loadu_si512(L.start.data() + at), size = _mm512_loadu_si512(L.size.data() + at);
    const __m512i r = _mm512_sub_epi8(s, a);
    const __mmask64 inside = _mm512_cmplt_epu8_mask(r, size);
    _mm512_storeu_si512(v + at, _mm512_mask_blend_epi8(inside, size, r));
    // Escapes, branch-free (a block has some in most rows): the distance from the window,
    // 2 (s - a - W) above it and 2 (a - s) - 1 below it, saturated at 15; far ones as bytes.
    const __mmask64 esc = ~inside & full;
    const __mmask64 up = _mm512_cmpge_epu8_mask(s, a);
    const __m512i hi = _mm512_sub_epi8(r, size), lo = _mm512_sub_epi8(a, s);
    const __m512i dist = _mm512_min_epu8(
        _mm512_mask_blend_epi8(up, _mm512_sub_epi8(_mm512_adds_epu8(lo, lo), one), _mm512_adds_epu8(hi, hi)),
        far_nibble);
    _mm512_storeu_si512(e.dist + e.n_dist, _mm512_maskz_compress_epi8(esc, dist));
    e.n_dist += popcount(esc);
    const __mmask64 far = _mm512_mask_cmpeq_epi8_mask(esc, dist, far_nibble);
    if (far) {  // rare on calibrated codes, and a compress is slow on some cores (Zen 4)
      _mm512_storeu_si512(e.far + e.n_far, _mm512_maskz_compress_epi8(far, s));
      e.n_far += popcount(far);
    }
  }
  // The largest of the 64 lanes: halve the vector six times.
  maxv = _mm512_max_epu8(maxv, _mm512_shuffle_i64x2(maxv, maxv, 0x4e));
  maxv = _mm512_max_epu8(maxv, _mm512_shuffle_i64x2(maxv, maxv, 0xb1));
  __m128i m = _mm512_castsi512_si128(maxv);
  m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
  maxsym = std::max(maxsym, _mm_cvtsi128_si32(m) & 0xff);
  x = e;
}

// 8 x 8 transpose of 8-byte words across the 8 registers (word j of r[i] <-> word i of r[j]).
inline void transpose_words(__m512i r[8]) {
  __m512i t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi64(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi64(r[i], r[i + 1]);
  }
  __m512i u[8];
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      u[i + j] = _mm512_shuffle_i64x2(t[i + j], t[i + j + 2], 0x88);
      u[i + j + 2] = _mm512_shuffle_i64x2(t[i + j], t[i + j + 2], 0xdd);
    }
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_i64x2(u[j], u[j + 4], 0x88);
    r[j + 4] = _mm512_shuffle_i64x2(u[j], u[j + 4], 0xdd);
  }
}

// Byte i of every 8-byte word holds 1 << i: the source of a bit-matrix transpose of each word.
inline __m512i bit_rows() { return _mm512_set1_epi64(0x8040201008040201ULL); }

uint8_t* pack_group(const uint8_t* v, const SlotsLayout& L, uint8_t* out) {
  // Byte 8 k + (7 - i) <- byte 8 i + k: channel k's 8 rows, the first row highest (the transpose
  // below reads the matrix's rows from the top byte down).
  alignas(64) uint8_t idx[kB];
  for (int k = 0; k < 8; ++k)
    for (int i = 0; i < 8; ++i) idx[8 * k + 7 - i] = static_cast<uint8_t>(8 * i + k);
  const __m512i to_channels = _mm512_load_si512(idx), rows = bit_rows();
  // Locals: the stores through out would otherwise make the compiler reload the layout's pointers.
  const uint64_t* chunk_mask = L.chunk_mask.data();
  const uint8_t* chunk_bytes = L.chunk_bytes.data();
  const int64_t stride = L.stride;
  for (int64_t b = 0; b < L.blocks; ++b) {
    __m512i r[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_loadu_si512(v + i * stride + b * kB);
    transpose_words(r);  // r[j]: word j (8 channels) of the 8 rows
    for (int j = 0; j < 8; ++j) {
      // Channel words, then byte l of each = bit l of the channel's slot in rows 0..7.
      const __m512i levels = _mm512_gf2p8affine_epi64_epi8(rows, _mm512_permutexvar_epi8(to_channels, r[j]), 0);
      const int64_t at = b * 8 + j;
      _mm512_storeu_si512(out, _mm512_maskz_compress_epi8(chunk_mask[at], levels));
      out += chunk_bytes[at];
    }
  }
  return out;
}

const uint8_t* unpack_group(const uint8_t* in, const SlotsLayout& L, uint8_t* v) {
  // Byte 8 i + k <- byte 8 k + i: row i's 8 channels.
  alignas(64) uint8_t idx[kB], rev[kB];
  for (int k = 0; k < 8; ++k)
    for (int i = 0; i < 8; ++i) {
      idx[8 * i + k] = static_cast<uint8_t>(8 * k + i);
      rev[8 * k + i] = static_cast<uint8_t>(8 * k + 7 - i);
    }
  const __m512i to_rows = _mm512_load_si512(idx), reverse = _mm512_load_si512(rev), rows = bit_rows();
  const uint64_t* chunk_mask = L.chunk_mask.data();
  const uint8_t* chunk_bytes = L.chunk_bytes.data();
  const int64_t stride = L.stride;
  for (int64_t b = 0; b < L.blocks; ++b) {
    __m512i r[8];
    for (int j = 0; j < 8; ++j) {
      const int64_t at = b * 8 + j;
      // The channel's level bytes, top level first, then per byte i: row i's slot.
      const __m512i levels = _mm512_maskz_expand_epi8(chunk_mask[at], _mm512_loadu_si512(in));
      in += chunk_bytes[at];
      r[j] = _mm512_permutexvar_epi8(
          to_rows, _mm512_gf2p8affine_epi64_epi8(rows, _mm512_shuffle_epi8(levels, reverse), 0));
    }
    transpose_words(r);
    for (int i = 0; i < 8; ++i) _mm512_storeu_si512(v + i * stride + b * kB, r[i]);
  }
  return in;
}

// kRanges: check that in-window slots and distance nibbles name symbols of the table (not needed
// when the layout is roomy). The row's checks are gathered and tested once at its end: the escape
// buffers have a row's worth of room past their ends (slots.h), so reading past them inside a
// row is safe, and a row that does is rejected.
template <bool kRanges>
bool symbol_row_impl(const uint8_t* v, const SlotsLayout& L, SlotsEscapes& x, uint8_t* out, int count_of,
                     int64_t& count) {
  const uint8_t *dist_in = x.dist + x.dist_at, *far_in = x.far + x.far_at;
  // Locals: the stores through out would otherwise make the compiler reload the layout's pointers.
  const uint8_t *start = L.start.data(), *sizes = L.size.data(), *room = L.room.data(), *above = L.above.data();
  const uint8_t *far_below = L.far_below.data(), *far_above = L.far_above.data();
  const int nsym_ = L.nsym;
  const int64_t stride = L.stride;
  int64_t c = 0;
  __mmask64 bad = 0;
  const __m512i one = _mm512_set1_epi8(1), far_nibble = _mm512_set1_epi8(kSlotsFar), eight = _mm512_set1_epi8(8);
  const __m512i nsym = _mm512_set1_epi8(static_cast<char>(nsym_));
  // Per distance nibble e < 15: e / 2 (even e, above the window, plus W) or -1 - e / 2 (odd e).
  const __m512i near_offset = _mm512_broadcast_i32x4(_mm_setr_epi8(0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5, -6, 6, -7, 7, 0));
  for (int64_t at = 0; at < stride; at += kB) {
    const uint64_t full = full_lanes(L, at);
    const __m512i slot = _mm512_loadu_si512(v + at);
    const __m512i a = _mm512_loadu_si512(start + at), size = _mm512_loadu_si512(sizes + at);
    const __mmask64 esc = _mm512_mask_cmpeq_epi8_mask(full, slot, size);
    if (kRanges) bad |= ~esc & full & _mm512_cmpge_epu8_mask(slot, _mm512_loadu_si512(room + at));
    __m512i s = _mm512_add_epi8(a, slot);
    if (esc) {
      const __m512i dist = _mm512_maskz_expand_epi8(esc, _mm512_loadu_si512(dist_in));
      dist_in += popcount(esc);
      const __mmask64 far = _mm512_mask_cmpeq_epi8_mask(esc, dist, far_nibble);
      const __mmask64 near = esc & ~far;
      const __mmask64 even = _mm512_mask_testn_epi8_mask(near, dist, one);
      // Above the window: a + W + e / 2 (e even); below it: a - 1 - e / 2 (e odd). One table
      // lookup gives e / 2 or -1 - e / 2, and the even ones add W.
      s = _mm512_mask_add_epi8(s, near, a, _mm512_shuffle_epi8(near_offset, dist));
      s = _mm512_mask_add_epi8(s, even, s, size);
      if (kRanges) {  // both inside the table
        const __m512i h = _mm512_and_si512(_mm512_srli_epi16(dist, 1), _mm512_set1_epi8(0x7f));
        bad |= (even & _mm512_cmpge_epu8_mask(h, _mm512_loadu_si512(above + at))) |
               (near & ~even & _mm512_cmpge_epu8_mask(h, a));
      }
      if (far) {  // rare on calibrated codes: a branch beats the work
        const __m512i f = _mm512_maskz_expand_epi8(far, _mm512_loadu_si512(far_in));
        far_in += popcount(far);
        s = _mm512_mask_mov_epi8(s, far, f);
        // Canonical far symbols: outside the window, at least 8 symbols away from it, in the table.
        if (kRanges) {
          const __m512i r = _mm512_sub_epi8(f, a);
          const __mmask64 up = _mm512_cmpge_epu8_mask(f, a);
          bad |= far & (_mm512_cmplt_epu8_mask(r, size) |
                        (up & _mm512_cmplt_epu8_mask(_mm512_sub_epi8(r, size), eight)) |
                        (~up & _mm512_cmplt_epu8_mask(_mm512_sub_epi8(a, f), eight)));
          if (nsym_ < 256) bad |= far & _mm512_cmpge_epu8_mask(f, nsym);
        } else {
          const __mmask64 below = _mm512_mask_cmplt_epu8_mask(far, f, _mm512_loadu_si512(far_below + at));
          const __mmask64 in_table = nsym_ < 256 ? _mm512_mask_cmplt_epu8_mask(far, f, nsym) : far;
          const __mmask64 above_ = _mm512_mask_cmpge_epu8_mask(in_table, f, _mm512_loadu_si512(far_above + at));
          bad |= far & ~(below | above_);
        }
      }
    }
    if (count_of >= 0) c += popcount(_mm512_cmpeq_epi8_mask(s, _mm512_set1_epi8(static_cast<char>(count_of))) & full);
    _mm512_mask_storeu_epi8(out + at, full, s);
  }
  const int64_t dist_at = dist_in - x.dist, far_at = far_in - x.far;
  if (bad || dist_at > x.n_dist || far_at > x.n_far) return false;
  x.dist_at = dist_at;
  x.far_at = far_at;
  count += c;
  return true;
}

void pack(const uint8_t* v, int64_t n, uint8_t* out) {
  const __m512i weights = _mm512_set1_epi16(0x1001);  // low byte * 1 + high byte * 16
  int64_t i = 0;
  for (; i + kB <= n; i += kB) {
    const __m512i pairs = _mm512_maddubs_epi16(_mm512_loadu_si512(v + i), weights);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2), _mm512_cvtepi16_epi8(pairs));
  }
  for (; i < n; i += 2) out[i / 2] = static_cast<uint8_t>(v[i] | (i + 1 < n ? v[i + 1] << 4 : 0));
}

bool unpack(const uint8_t* in, int64_t n, uint8_t* out) {
  const __m512i low = _mm512_set1_epi16(0x000f), high = _mm512_set1_epi16(0x0f00);
  int64_t i = 0;
  for (; i + kB <= n; i += kB) {
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i / 2)));
    _mm512_storeu_si512(out + i, _mm512_or_si512(_mm512_and_si512(b, low), _mm512_and_si512(_mm512_slli_epi16(b, 4), high)));
  }
  for (; i < n; ++i) out[i] = (in[i / 2] >> (4 * (i % 2))) & 15;
  return n % 2 == 0 || (in[n / 2] >> 4) == 0;
}

#elif defined(SK_SLOTS_AVX2)

constexpr int kH = 32;  // lanes per AVX2 step

inline int popcount(uint64_t m) { return __builtin_popcountll(m); }

// Lanes [at, at + 32) that are channels.
inline uint32_t lanes_of(const SlotsLayout& L, int64_t at) {
  const int64_t n = L.d - at;
  return n >= kH ? ~uint32_t{0} : (uint32_t{1} << n) - 1;
}

// Byte masks from unsigned compares (AVX2 has only signed ones): x >= y.
inline __m256i ge(__m256i x, __m256i y) { return _mm256_cmpeq_epi8(_mm256_max_epu8(x, y), x); }
inline uint32_t bits(__m256i m) { return static_cast<uint32_t>(_mm256_movemask_epi8(m)); }

// The bytes of v whose bit in m is set, packed to out (32 bytes of room past them); how many.
inline int compress32(__m256i v, uint32_t m, uint8_t* out) {
  alignas(32) uint64_t q[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(q), v);
  int n = 0;
  for (int k = 0; k < 4; ++k) {
    const uint64_t lanes = (m >> (8 * k)) & 0xff;
    store_u64(out + n, _pext_u64(q[k], _pdep_u64(lanes, 0x0101010101010101ULL) * 0xff));
    n += popcount(lanes);
  }
  return n;
}

// The inverse: the next popcount(m) bytes of in (32 readable bytes past them) to the lanes of m.
inline __m256i expand32(const uint8_t* in, uint32_t m) {
  uint64_t q[4];
  int n = 0;
  for (int k = 0; k < 4; ++k) {
    const uint64_t lanes = (m >> (8 * k)) & 0xff;
    q[k] = _pdep_u64(load_u64(in + n), _pdep_u64(lanes, 0x0101010101010101ULL) * 0xff);
    n += popcount(lanes);
  }
  return _mm256_setr_epi64x(static_cast<long long>(q[0]), static_cast<long long>(q[1]),
                            static_cast<long long>(q[2]), static_cast<long long>(q[3]));
}

void slot_row(const uint8_t* sym, const SlotsLayout& L, uint8_t* v, SlotsEscapes& x, int& maxsym) {
  SlotsEscapes e = x;
  // Locals: the stores through v would otherwise make the compiler reload the layout's pointers.
  const uint8_t *start = L.start.data(), *sizes = L.size.data();
  const int64_t d = L.d;
  __m256i maxv = _mm256_setzero_si256();
  const __m256i one = _mm256_set1_epi8(1), far_nibble = _mm256_set1_epi8(kSlotsFar);
  for (int64_t at = 0; at < d; at += kH) {
    const uint32_t full = lanes_of(L, at);
    __m256i s;
    if (full == ~uint32_t{0}) {
      s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sym + at));
    } else {  // the row's last channels: no read past them
      alignas(32) uint8_t tail[kH] = {};
      std::memcpy(tail, sym + at, d - at);
      s = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    }
    maxv = _mm256_max_epu8(maxv, s);
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(start + at));
    const __m256i size = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sizes + at));
    const __m256i r = _mm256_sub_epi8(s, a);
    const __m256i outside = ge(r, size);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + at), _mm256_blendv_epi8(r, size, outside));
    // Escapes: the distance from the window, 2 (s - a - W) above it and 2 (a - s) - 1 below it,
    // saturated at 15; far ones as bytes.
    const uint32_t esc = bits(outside) & full;
    const __m256i hi = _mm256_sub_epi8(r, size), lo = _mm256_sub_epi8(a, s);
    const __m256i dist = _mm256_min_epu8(
        _mm256_blendv_epi8(_mm256_sub_epi8(_mm256_adds_epu8(lo, lo), one), _mm256_adds_epu8(hi, hi), ge(s, a)),
        far_nibble);
    e.n_dist += compress32(dist, esc, e.dist + e.n_dist);
    const uint32_t far = esc & bits(_mm256_cmpeq_epi8(dist, far_nibble));
    if (far) e.n_far += compress32(s, far, e.far + e.n_far);  // rare on calibrated codes
  }
  // The largest of the 32 lanes: halve the vector five times.
  __m128i m = _mm_max_epu8(_mm256_castsi256_si128(maxv), _mm256_extracti128_si256(maxv, 1));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
  m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
  maxsym = std::max(maxsym, _mm_cvtsi128_si32(m) & 0xff);
  x = e;
}

// kRanges: check that in-window slots and distance nibbles name symbols of the table (not needed
// when the layout is roomy). As the AVX-512 build, a row's checks are tested once at its end.
template <bool kRanges>
bool symbol_row_impl(const uint8_t* v, const SlotsLayout& L, SlotsEscapes& x, uint8_t* out, int count_of,
                     int64_t& count) {
  const uint8_t *dist_in = x.dist + x.dist_at, *far_in = x.far + x.far_at;
  // Locals: the stores through out would otherwise make the compiler reload the layout's pointers.
  const uint8_t *start = L.start.data(), *sizes = L.size.data(), *room = L.room.data(), *above = L.above.data();
  const uint8_t *far_below = L.far_below.data(), *far_above = L.far_above.data();
  const int nsym_ = L.nsym;
  const int64_t d = L.d;
  int64_t c = 0;
  uint32_t bad = 0;
  const __m256i one = _mm256_set1_epi8(1), far_nibble = _mm256_set1_epi8(kSlotsFar), eight = _mm256_set1_epi8(8);
  const __m256i nsym = _mm256_set1_epi8(static_cast<char>(nsym_));
  // Per distance nibble e < 15: e / 2 (even e, above the window, plus W) or -1 - e / 2 (odd e).
  const __m256i near_offset = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, -1, 1, -2, 2, -3, 3, -4, 4, -5, 5, -6, 6, -7, 7, 0));
  auto vec = [](const uint8_t* p, int64_t at) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + at)); };
  for (int64_t at = 0; at < d; at += kH) {
    const uint32_t full = lanes_of(L, at);
    const __m256i slot = vec(v, at);
    const __m256i a = vec(start, at), size = vec(sizes, at);
    const __m256i esc_v = _mm256_cmpeq_epi8(slot, size);
    const uint32_t esc = bits(esc_v) & full;
    if (kRanges) bad |= ~esc & full & bits(ge(slot, vec(room, at)));
    __m256i s = _mm256_add_epi8(a, slot);
    if (esc) {
      const __m256i dist = expand32(dist_in, esc);
      dist_in += popcount(esc);
      const __m256i far_v = _mm256_and_si256(esc_v, _mm256_cmpeq_epi8(dist, far_nibble));
      const __m256i near_v = _mm256_andnot_si256(far_v, esc_v);
      const __m256i even_v = _mm256_andnot_si256(_mm256_cmpeq_epi8(_mm256_and_si256(dist, one), one), near_v);
      // Above the window: a + W + e / 2 (e even); below it: a - 1 - e / 2 (e odd).
      s = _mm256_blendv_epi8(s, _mm256_add_epi8(a, _mm256_shuffle_epi8(near_offset, dist)), near_v);
      s = _mm256_blendv_epi8(s, _mm256_add_epi8(s, size), even_v);
      const uint32_t far = bits(far_v) & full;
      if (kRanges) {  // both inside the table
        const uint32_t near = bits(near_v) & full, even = bits(even_v) & full;
        const __m256i h = _mm256_and_si256(_mm256_srli_epi16(dist, 1), _mm256_set1_epi8(0x7f));
        bad |= (even & bits(ge(h, vec(above, at)))) | (near & ~even & bits(ge(h, a)));
      }
      if (far) {  // rare on calibrated codes: a branch beats the work
        const __m256i f = expand32(far_in, far);
        far_in += popcount(far);
        s = _mm256_blendv_epi8(s, f, far_v);
        // Canonical far symbols: outside the window, at least 8 symbols away from it, in the table.
        const uint32_t in_table = nsym_ < 256 ? ~bits(ge(f, nsym)) : ~uint32_t{0};
        if (kRanges) {
          const __m256i r = _mm256_sub_epi8(f, a);
          const uint32_t up = bits(ge(f, a));
          bad |= far & (~bits(ge(r, size)) | (up & ~bits(ge(_mm256_sub_epi8(r, size), eight))) |
                        (~up & ~bits(ge(_mm256_sub_epi8(a, f), eight))) | ~in_table);
        } else {
          const uint32_t below = ~bits(ge(f, vec(far_below, at)));
          const uint32_t above_ = bits(ge(f, vec(far_above, at))) & in_table;
          bad |= far & ~(below | above_);
        }
      }
    }
    if (count_of >= 0) c += popcount(bits(_mm256_cmpeq_epi8(s, _mm256_set1_epi8(static_cast<char>(count_of)))) & full);
    if (full == ~uint32_t{0}) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + at), s);
    } else {
      alignas(32) uint8_t tail[kH];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tail), s);
      std::memcpy(out + at, tail, d - at);
    }
  }
  const int64_t dist_at = dist_in - x.dist, far_at = far_in - x.far;
  if (bad || dist_at > x.n_dist || far_at > x.n_far) return false;
  x.dist_at = dist_at;
  x.far_at = far_at;
  count += c;
  return true;
}

// A block of 32 channels of a full group: the 8 rows' registers become channel words (byte i = row
// i) with three rounds of unpacks per 128-bit lane: register j then holds channels 2j, 2j + 1 of
// each lane, so channel k sits in word kChannelWord[k] of the 32 in register order.
inline void rows_to_channels(const __m256i r[8], __m256i c[8]) {
  __m256i t[8], u[8];
  t[0] = _mm256_unpacklo_epi8(r[0], r[1]);
  t[1] = _mm256_unpackhi_epi8(r[0], r[1]);
  t[2] = _mm256_unpacklo_epi8(r[2], r[3]);
  t[3] = _mm256_unpackhi_epi8(r[2], r[3]);
  t[4] = _mm256_unpacklo_epi8(r[4], r[5]);
  t[5] = _mm256_unpackhi_epi8(r[4], r[5]);
  t[6] = _mm256_unpacklo_epi8(r[6], r[7]);
  t[7] = _mm256_unpackhi_epi8(r[6], r[7]);
  for (int h = 0; h < 8; h += 4) {  // rows 0-3 (t0..t3), rows 4-7 (t4..t7)
    u[h] = _mm256_unpacklo_epi16(t[h], t[h + 2]);
    u[h + 1] = _mm256_unpackhi_epi16(t[h], t[h + 2]);
    u[h + 2] = _mm256_unpacklo_epi16(t[h + 1], t[h + 3]);
    u[h + 3] = _mm256_unpackhi_epi16(t[h + 1], t[h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    c[2 * j] = _mm256_unpacklo_epi32(u[j], u[j + 4]);
    c[2 * j + 1] = _mm256_unpackhi_epi32(u[j], u[j + 4]);
  }
}

// The inverse: channel words back to the 8 rows' registers (de-interleaving dwords, words, bytes).
inline void channels_to_rows(const __m256i c[8], __m256i r[8]) {
  __m256i u[8], t[8];
  for (int j = 0; j < 4; ++j) {
    const __m256 lo = _mm256_castsi256_ps(c[2 * j]), hi = _mm256_castsi256_ps(c[2 * j + 1]);
    u[j] = _mm256_castps_si256(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));
    u[j + 4] = _mm256_castps_si256(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  // Even 16-bit words to the low 8 bytes of each lane, odd ones to the high 8; then bytes alike.
  const __m256i words = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  for (int h = 0; h < 8; h += 4) {
    const __m256i a = _mm256_shuffle_epi8(u[h], words), b = _mm256_shuffle_epi8(u[h + 1], words);
    const __m256i x = _mm256_shuffle_epi8(u[h + 2], words), y = _mm256_shuffle_epi8(u[h + 3], words);
    t[h] = _mm256_unpacklo_epi64(a, b);
    t[h + 2] = _mm256_unpackhi_epi64(a, b);
    t[h + 1] = _mm256_unpacklo_epi64(x, y);
    t[h + 3] = _mm256_unpackhi_epi64(x, y);
  }
  for (int i = 0; i < 8; i += 2) {
    const __m256i a = _mm256_shuffle_epi8(t[i], bytes), b = _mm256_shuffle_epi8(t[i + 1], bytes);
    r[i] = _mm256_unpacklo_epi64(a, b);
    r[i + 1] = _mm256_unpackhi_epi64(a, b);
  }
}

// Transposes the 8 x 8 bit matrix of each of the four words of x (bit j of byte i <-> bit i of
// byte j), three delta swaps.
inline __m256i transpose8x4(__m256i x) {
  __m256i t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 7)), _mm256_set1_epi64x(0x00AA00AA00AA00AALL));
  x = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 7)));
  t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 14)), _mm256_set1_epi64x(0x0000CCCC0000CCCCLL));
  x = _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 14)));
  t = _mm256_and_si256(_mm256_xor_si256(x, _mm256_srli_epi64(x, 28)), _mm256_set1_epi64x(0x00000000F0F0F0F0LL));
  return _mm256_xor_si256(x, _mm256_xor_si256(t, _mm256_slli_epi64(t, 28)));
}

// Word of channel k (0..31) among the 32 words of c[0..7] in register order.
inline int channel_word(int k) { return 4 * ((k % 16) / 2) + (k % 2) + 2 * (k / 16); }

uint8_t* pack_group(const uint8_t* v, const SlotsLayout& L, uint8_t* out) {
  const int64_t stride = L.stride;
  const uint8_t* width = L.width.data();
  for (int64_t at = 0; at < L.d; at += kH) {
    __m256i r[8], c[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i * stride + at));
    rows_to_channels(r, c);
    alignas(32) uint64_t words[kH];
    for (int j = 0; j < 8; ++j) _mm256_store_si256(reinterpret_cast<__m256i*>(words + 4 * j), transpose8x4(c[j]));
    const int n = static_cast<int>(std::min<int64_t>(kH, L.d - at));
    if (n == kH) {  // unrolled, so each channel's word index is a constant
#pragma GCC unroll 32
      for (int k = 0; k < kH; ++k) {  // levels 0 .. w - 1 of each channel (8 bytes stored, w kept)
        store_u64(out, words[channel_word(k)]);
        out += width[at + k];
      }
    } else {
      for (int k = 0; k < n; ++k) {
        store_u64(out, words[channel_word(k)]);
        out += width[at + k];
      }
    }
  }
  return out;
}

const uint8_t* unpack_group(const uint8_t* in, const SlotsLayout& L, uint8_t* v) {
  const int64_t stride = L.stride;
  const uint8_t* width = L.width.data();
  for (int64_t at = 0; at < L.d; at += kH) {
    alignas(32) uint64_t words[kH] = {};
    const int n = static_cast<int>(std::min<int64_t>(kH, L.d - at));
    if (n == kH) {  // unrolled, so each channel's word index is a constant
#pragma GCC unroll 32
      for (int k = 0; k < kH; ++k) {
        words[channel_word(k)] = _bzhi_u64(load_u64(in), 8 * width[at + k]);
        in += width[at + k];
      }
    } else {
      for (int k = 0; k < n; ++k) {
        words[channel_word(k)] = _bzhi_u64(load_u64(in), 8 * width[at + k]);
        in += width[at + k];
      }
    }
    __m256i c[8], r[8];
    for (int j = 0; j < 8; ++j) c[j] = transpose8x4(_mm256_load_si256(reinterpret_cast<const __m256i*>(words + 4 * j)));
    channels_to_rows(c, r);
    for (int i = 0; i < 8; ++i) _mm256_storeu_si256(reinterpret_cast<__m256i*>(v + i * stride + at), r[i]);
  }
  return in;
}

void pack(const uint8_t* v, int64_t n, uint8_t* out) {
  const __m256i weights = _mm256_set1_epi16(0x1001);  // low byte * 1 + high byte * 16
  int64_t i = 0;
  for (; i + 2 * kH <= n; i += 2 * kH) {
    const __m256i lo = _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i)), weights);
    const __m256i hi = _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i + kH)), weights);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i / 2),
                        _mm256_permute4x64_epi64(_mm256_packus_epi16(lo, hi), 0xd8));
  }
  for (; i < n; i += 2) out[i / 2] = static_cast<uint8_t>(v[i] | (i + 1 < n ? v[i + 1] << 4 : 0));
}

bool unpack(const uint8_t* in, int64_t n, uint8_t* out) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  int64_t i = 0;
  for (; i + 2 * kH <= n; i += 2 * kH) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i / 2));
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    const __m256i first = _mm256_unpacklo_epi8(lo, hi), second = _mm256_unpackhi_epi8(lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_permute2x128_si256(first, second, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + kH), _mm256_permute2x128_si256(first, second, 0x31));
  }
  for (; i < n; ++i) out[i] = (in[i / 2] >> (4 * (i % 2))) & 15;
  return n % 2 == 0 || (in[n / 2] >> 4) == 0;
}

#else  // lane by lane

void slot_row(const uint8_t* sym, const SlotsLayout& L, uint8_t* v, SlotsEscapes& x, int& maxsym) {
  for (int64_t c = 0; c < L.d; ++c) {
    const int s = sym[c], a = L.start[c], size = L.size[c];
    maxsym = std::max(maxsym, s);
    const bool inside = s >= a && s - a < size;
    v[c] = static_cast<uint8_t>(inside ? s - a : size);
    if (!inside) {
      const int e = std::min(s >= a ? 2 * (s - a - size) : 2 * (a - s) - 1, kSlotsFar);
      x.dist[x.n_dist++] = static_cast<uint8_t>(e);
      if (e == kSlotsFar) x.far[x.n_far++] = static_cast<uint8_t>(s);
    }
  }
}

bool symbol_row(const uint8_t* v, const SlotsLayout& L, SlotsEscapes& x, uint8_t* out, int count_of, int64_t& count) {
  for (int64_t c = 0; c < L.d; ++c) {
    const int a = L.start[c], size = L.size[c];
    int s;
    if (v[c] != size) {
      s = a + v[c];
    } else {
      if (x.dist_at >= x.n_dist) return false;
      const int e = x.dist[x.dist_at++];
      if (e != kSlotsFar) {
        s = e % 2 ? a - 1 - e / 2 : a + size + e / 2;
      } else {
        if (x.far_at >= x.n_far) return false;
        s = x.far[x.far_at++];
        const bool inside = s >= a && s - a < size;
        if (inside || (s >= a ? 2 * (s - a - size) : 2 * (a - s) - 1) < kSlotsFar) return false;
      }
    }
    if (s < 0 || s >= L.nsym) return false;
    count += s == count_of;
    out[c] = static_cast<uint8_t>(s);
  }
  return true;
}

void pack(const uint8_t* v, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; i += 2) out[i / 2] = static_cast<uint8_t>(v[i] | (i + 1 < n ? v[i + 1] << 4 : 0));
}

bool unpack(const uint8_t* in, int64_t n, uint8_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = (in[i / 2] >> (4 * (i % 2))) & 15;
  return n % 2 == 0 || (in[n / 2] >> 4) == 0;
}

#endif

#if defined(SK_SLOTS_VECTOR) || defined(SK_SLOTS_AVX2)

bool symbol_row(const uint8_t* v, const SlotsLayout& L, SlotsEscapes& x, uint8_t* out, int count_of, int64_t& count) {
  return L.roomy ? symbol_row_impl<false>(v, L, x, out, count_of, count)
                 : symbol_row_impl<true>(v, L, x, out, count_of, count);
}

#else  // the generic build's group kernels

// Transposes the 8 x 8 bit matrix whose row i is byte i of x (bit j of byte i <-> bit i of byte j).
inline uint64_t transpose8(uint64_t x) {
  uint64_t t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAULL;
  x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCULL;
  x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ULL;
  return x ^ t ^ (t << 28);
}

// A full group channel by channel: the 8 rows' slots as the bytes of a word, one bit-matrix
// transpose, and the first w bytes (levels 0 .. w - 1) out.
uint8_t* pack_group(const uint8_t* v, const SlotsLayout& L, uint8_t* out) {
  for (int64_t c = 0; c < L.d; ++c) {
    uint64_t rows = 0;
    for (int i = 0; i < 8; ++i) rows |= uint64_t{v[i * L.stride + c]} << (8 * i);
    const uint64_t levels = transpose8(rows);
    for (int l = 0; l < L.width[c]; ++l) *out++ = static_cast<uint8_t>(levels >> (8 * l));
  }
  return out;
}

const uint8_t* unpack_group(const uint8_t* in, const SlotsLayout& L, uint8_t* v) {
  for (int64_t c = 0; c < L.d; ++c) {
    uint64_t levels = 0;
    for (int l = 0; l < L.width[c]; ++l) levels |= uint64_t{*in++} << (8 * l);
    const uint64_t rows = transpose8(levels);
    for (int i = 0; i < 8; ++i) v[i * L.stride + c] = static_cast<uint8_t>(rows >> (8 * i));
  }
  return in;
}

#endif

const SlotsRowKernels kKernels{slot_row, pack_group, unpack_group, symbol_row, pack, unpack};

}  // namespace

const SlotsRowKernels& slots_row_kernels() { return kKernels; }

}  // namespace SK_ISA_NS
}  // namespace sk
