// Rice coder of codec v2: see rice.h and docs/FORMATS.md section 5.7.
#include "cpu/rice.h"

#include <cstring>

#include "cpu/count.h"
#include "cpu/lanes_avx512.h"
#include "cpu/le_bytes.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace sk {
namespace {

constexpr uint32_t kL = 1u << 16;  // states live in [kL, 2^32)

// Branch-free: the sign of a code is a coin flip.
inline uint32_t zigzag(int32_t v) { return (static_cast<uint32_t>(v) << 1) ^ static_cast<uint32_t>(v >> 31); }
inline int32_t unzigzag(uint32_t u) { return static_cast<int32_t>(u >> 1) ^ -static_cast<int32_t>(u & 1); }

// Pushes symbol s (centre c, parameter k) onto state x; an exception's byte goes below exc.
inline void enc_put(uint32_t& x, uint32_t s, uint32_t c, uint32_t k, uint16_t*& words, uint8_t*& exc) {
  const uint32_t u = zigzag(int32_t(s) - int32_t(c)), q = u >> k, top = 16 - k;
  uint32_t code, len;
  if (q < top) {
    code = ((1u << q) - 1) | ((u & ((1u << k) - 1)) << (q + 1));
    len = q + 1 + k;
  } else {
    code = (1u << top) - 1;
    len = top;
    *--exc = static_cast<uint8_t>(s);
  }
  // Renormalising is a coin flip for the branch predictor: store the word always (the slot below
  // `words` is scratch until then; the head lies below the word area) and keep it when it counts.
  const uint32_t emit = (x >> (32 - len)) != 0;
  words[-1] = static_cast<uint16_t>(x);
  words -= emit;
  x >>= 16 * emit;
  x = (x << len) | code;
}

// An exception's byte, checked (< nsym, and canonical: its quotient reaches 16 - k); -1 if invalid.
inline int exception_symbol(uint32_t s, uint32_t c, uint32_t k, uint32_t nsym) {
  return s < nsym && (zigzag(int32_t(s) - int32_t(c)) >> k) >= 16 - k ? static_cast<int>(s) : -1;
}

// Pops one symbol from x into out; false when the stream is invalid there.
inline bool dec_put(uint32_t& x, uint32_t c, uint32_t k, uint32_t nsym, const uint8_t*& exc,
                    const uint8_t* exc_end, uint8_t* out) {
  const uint32_t top = 16 - k, t = ~x;
  const uint32_t q = t ? static_cast<uint32_t>(__builtin_ctz(t)) : 32u;
  if (q >= top) {
    const int s = exc < exc_end ? exception_symbol(*exc++, c, k, nsym) : -1;
    if (s < 0) return false;
    *out = static_cast<uint8_t>(s);
    x >>= top;
    return true;
  }
  const uint32_t u = (q << k) | ((x >> (q + 1)) & ((1u << k) - 1));
  const uint32_t s = c + static_cast<uint32_t>(unzigzag(u));
  if (s >= nsym) return false;
  *out = static_cast<uint8_t>(s);
  x >>= q + 1 + k;
  return true;
}

// Per-channel parameters repeated so that 32 channels from any c < period read without wrapping.
// The vector steps read them as dwords from one table of four rows of `stride` entries (centre, k,
// 16 - k, 2^k - 1): a load is cheaper than widening bytes and deriving them, and one base pointer
// keeps the loops within the general registers.
struct Params {
  enum Row { kC, kK, kTop, kMask };
  std::vector<uint8_t> c, k;
  std::vector<uint32_t> lanes;
  int64_t period, stride;
  Params(const uint8_t* centre, const uint8_t* kk, int64_t p)
      : c(p + kRiceLanes), k(p + kRiceLanes), lanes(4 * (p + kRiceLanes)), period(p), stride(p + kRiceLanes) {
    for (int64_t j = 0; j < stride; ++j) {
      c[j] = centre[j % p];
      k[j] = kk[j % p];
      lanes[kC * stride + j] = c[j];
      lanes[kK * stride + j] = k[j];
      lanes[kTop * stride + j] = 16u - k[j];
      lanes[kMask * stride + j] = (1u << k[j]) - 1;
    }
  }
};

// The channel of the first symbol of each group of 32, stepped a group at a time without a division.
struct GroupChannel {
  int64_t c, step, period;
  GroupChannel(int64_t first, int64_t p) : c(first % p), step(kRiceLanes % p), period(p) {}
  void back() {
    c -= step;
    c += c < 0 ? period : 0;
  }
  void next() {
    c += step;
    c -= c >= period ? period : 0;
  }
};

#if defined(__x86_64__) || defined(_M_X64)
#define SK_RICE_X86 1

// The 16 entries of row r of the table from channel j: `at` points at entry j of row 0.
SK_LANES_AVX512 inline __m512i row(const uint32_t* at, int64_t stride, int r) {
  return _mm512_loadu_si512(at + r * stride);
}

// One encoder step of 16 lanes (enc_put on each) from the table at channel `at`: exceptions' bytes
// and renormalising lanes' words go below exc and words in lane order.
SK_LANES_AVX512 inline __m512i enc_step16(__m512i x, const uint8_t* sym, const uint32_t* at, int64_t stride,
                                         uint16_t*& words, uint8_t*& exc) {
  const __m512i one = _mm512_set1_epi32(1), k = row(at, stride, Params::kK), top = row(at, stride, Params::kTop);
  const __m512i s = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sym)));
  const __m512i v = _mm512_sub_epi32(s, row(at, stride, Params::kC));
  const __m512i u = _mm512_xor_si512(_mm512_slli_epi32(v, 1), _mm512_srai_epi32(v, 31));
  const __m512i q = _mm512_srlv_epi32(u, k);
  const __mmask16 is_exc = _mm512_cmpge_epu32_mask(q, top);
  // code = ((2r + 1) << q) - 1: q ones, a zero, then r; an exception's code is top ones.
  const __m512i r21 = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(u, row(at, stride, Params::kMask)), 1), one);
  const __m512i code = _mm512_sub_epi32(_mm512_sllv_epi32(_mm512_mask_mov_epi32(r21, is_exc, one),
                                                          _mm512_mask_mov_epi32(q, is_exc, top)), one);
  const __m512i len = _mm512_mask_mov_epi32(_mm512_add_epi32(_mm512_add_epi32(q, one), k), is_exc, top);
  if (is_exc) {
    const int cnt = __builtin_popcount(is_exc);
    const __m128i packed = _mm512_cvtepi32_epi8(_mm512_maskz_compress_epi32(is_exc, s));
    exc -= cnt;
    _mm_mask_storeu_epi8(exc, static_cast<__mmask16>((1u << cnt) - 1), packed);
  }
  const __mmask16 emit = _mm512_test_epi32_mask(_mm512_srlv_epi32(x, _mm512_sub_epi32(_mm512_set1_epi32(32), len)),
                                                _mm512_set1_epi32(-1));
  x = emit_words16(x, emit, words);
  return _mm512_or_si512(_mm512_sllv_epi32(x, len), code);
}

// Codes the groups of 32 below `full` (a multiple of 32), from the last; x holds the 32 states.
// Pointers live in locals: a byte store may alias any memory, so pointers read through references
// would be reloaded after every store.
SK_LANES_AVX512 void encode_avx512(const uint8_t* sym, int64_t full, const Params& p, uint32_t* x, uint16_t*& words_io,
                                  uint8_t*& exc_io) {
  uint16_t* words = words_io;
  uint8_t* exc = exc_io;
  const uint32_t* const lanes = p.lanes.data();
  const int64_t stride = p.stride;
  __m512i lo = _mm512_loadu_si512(x), hi = _mm512_loadu_si512(x + 16);
  GroupChannel ch(full, p.period);
  for (int64_t g = full - kRiceLanes; g >= 0; g -= kRiceLanes) {
    ch.back();
    const int64_t c = ch.c;
    // The higher lanes first: the scalar order codes lane 31 down to 0, so their bytes lie above.
    hi = enc_step16(hi, sym + g + 16, lanes + c + 16, stride, words, exc);
    lo = enc_step16(lo, sym + g, lanes + c, stride, words, exc);
  }
  _mm512_storeu_si512(x, lo);
  _mm512_storeu_si512(x + 16, hi);
  words_io = words;
  exc_io = exc;
}

// One decoder step of 16 lanes from the table at channel `at`; 16 words must be readable at w.
// Stores 16 symbols at out (the exception lanes, flagged in is_exc, are for the caller to fill);
// flags invalid symbols in bad.
SK_LANES_AVX512 inline __m512i dec_step16(__m512i x, const uint32_t* at, int64_t stride, __m512i nsym,
                                         const uint8_t*& w, uint8_t* out, __mmask16& is_exc, __mmask16& bad) {
  const __m512i one = _mm512_set1_epi32(1), k = row(at, stride, Params::kK), top = row(at, stride, Params::kTop);
  // Trailing ones of x: x ^ (x + 1) sets bits 0..q, so q = 31 - lzcnt (31 when x is all ones).
  const __m512i tz = _mm512_sub_epi32(_mm512_set1_epi32(31),
                                      _mm512_lzcnt_epi32(_mm512_xor_si512(x, _mm512_add_epi32(x, one))));
  const __m512i q = _mm512_min_epu32(tz, top), q1 = _mm512_add_epi32(q, one);
  is_exc = _mm512_cmpeq_epi32_mask(q, top);
  const __m512i u = _mm512_or_si512(_mm512_sllv_epi32(q, k), _mm512_and_si512(_mm512_srlv_epi32(x, q1),
                                                                              row(at, stride, Params::kMask)));
  // Zigzag back: (u >> 1) ^ -(u & 1).
  const __m512i v = _mm512_xor_si512(_mm512_srli_epi32(u, 1), _mm512_srai_epi32(_mm512_slli_epi32(u, 31), 31));
  const __m512i s = _mm512_add_epi32(row(at, stride, Params::kC), v);
  bad |= _mm512_mask_cmpge_epu32_mask(static_cast<__mmask16>(~is_exc), s, nsym);
  store_bytes16(s, out);
  return refill16(_mm512_srlv_epi32(x, _mm512_mask_mov_epi32(_mm512_add_epi32(q1, k), is_exc, top)), w);
}

// Fills the exception lanes (bit j of `lanes`: symbol out[j], channel c + j) from exc; returns the
// next exception byte, or null when one is missing or invalid. Out of line: exceptions are rare.
__attribute__((noinline)) const uint8_t* fill_exceptions(uint32_t lanes, uint8_t* out, const Params& p, int64_t c,
                                                         uint32_t nsym, const uint8_t* exc, const uint8_t* exc_end) {
  for (; lanes; lanes &= lanes - 1) {
    const int j = __builtin_ctz(lanes);
    const int s = exc < exc_end ? exception_symbol(*exc++, p.c[c + j], p.k[c + j], nsym) : -1;
    if (s < 0) return nullptr;
    out[j] = static_cast<uint8_t>(s);
  }
  return exc;
}

// Decodes whole groups while 32 words remain; returns the symbols decoded (a multiple of 32), or
// -1 when a symbol is invalid, and leaves the states in x and the read positions in w and exc.
SK_LANES_AVX512 int64_t decode_avx512(int64_t n, const Params& p, uint32_t nsym, uint32_t* x, const uint8_t*& w_io,
                                     const uint8_t* wend, const uint8_t*& exc_io, const uint8_t* exc_end, uint8_t* out) {
  const uint8_t* w = w_io;  // locals, as in encode_avx512
  const uint8_t* exc = exc_io;
  const uint32_t* const lanes = p.lanes.data();
  const int64_t stride = p.stride;
  __m512i lo = _mm512_loadu_si512(x), hi = _mm512_loadu_si512(x + 16);
  const __m512i ns = _mm512_set1_epi32(static_cast<int>(nsym));
  int64_t g = 0;
  __mmask16 bad = 0;
  for (GroupChannel ch(0, p.period); g + kRiceLanes <= n && wend - w >= 2 * kRiceLanes; g += kRiceLanes, ch.next()) {
    const int64_t c = ch.c;
    __mmask16 exc_lo, exc_hi;
    lo = dec_step16(lo, lanes + c, stride, ns, w, out + g, exc_lo, bad);
    hi = dec_step16(hi, lanes + c + 16, stride, ns, w, out + g + 16, exc_hi, bad);
    if (exc_lo | exc_hi) {
      exc = fill_exceptions(exc_lo | uint32_t(exc_hi) << 16, out + g, p, c, nsym, exc, exc_end);
      if (!exc) return -1;
    }
    if (bad) return -1;
  }
  _mm512_storeu_si512(x, lo);
  _mm512_storeu_si512(x + 16, hi);
  w_io = w;
  exc_io = exc;
  return g;
}

#define SK_RICE_AVX2 __attribute__((target("avx2,popcnt")))

// AVX2 has neither mask registers nor compress/expand: lane masks are 8-bit movemasks, and a
// table per mask gives the permutation that packs the selected lanes at the top (the encoder's
// words, written downwards) or spreads consecutive words onto the selected lanes (the decoder).
struct Avx2Tables {
  alignas(32) uint32_t pack_top[256][8];
  alignas(32) uint32_t spread[256][8];
  Avx2Tables() {
    for (int m = 0; m < 256; ++m) {
      const int cnt = __builtin_popcount(m);
      int r = 0;
      for (int j = 0; j < 8; ++j) {
        pack_top[m][j] = 0;
        spread[m][j] = 0;
      }
      for (int j = 0; j < 8; ++j) {
        if (!(m >> j & 1)) continue;
        pack_top[m][8 - cnt + r] = j;
        spread[m][j] = r++;
      }
    }
  }
};
const Avx2Tables kAvx2;

SK_RICE_AVX2 inline __m256i row8(const uint32_t* at, int64_t stride, int r) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at + r * stride));
}

SK_RICE_AVX2 inline int lane_mask(__m256i m) { return _mm256_movemask_ps(_mm256_castsi256_ps(m)); }

// enc_step16 on 8 lanes.
SK_RICE_AVX2 inline __m256i enc_step8(__m256i x, const uint8_t* sym, const uint32_t* at, int64_t stride,
                                      uint16_t*& words, uint8_t*& exc) {
  const __m256i one = _mm256_set1_epi32(1), k = row8(at, stride, Params::kK), top = row8(at, stride, Params::kTop);
  const __m256i s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sym)));
  const __m256i v = _mm256_sub_epi32(s, row8(at, stride, Params::kC));
  const __m256i u = _mm256_xor_si256(_mm256_slli_epi32(v, 1), _mm256_srai_epi32(v, 31));
  const __m256i q = _mm256_srlv_epi32(u, k);
  const __m256i is_exc = _mm256_xor_si256(_mm256_cmpgt_epi32(top, q), _mm256_set1_epi32(-1));  // q < 2^9: signed
  const __m256i r21 = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(u, row8(at, stride, Params::kMask)), 1), one);
  const __m256i code = _mm256_sub_epi32(_mm256_sllv_epi32(_mm256_blendv_epi8(r21, one, is_exc),
                                                          _mm256_blendv_epi8(q, top, is_exc)), one);
  const __m256i len = _mm256_blendv_epi8(_mm256_add_epi32(_mm256_add_epi32(q, one), k), top, is_exc);
  if (const int m = lane_mask(is_exc)) {  // rare: the exceptions' bytes one by one, in lane order
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), s);
    exc -= __builtin_popcount(m);
    uint8_t* e = exc;
    for (int j = 0; j < 8; ++j)
      if (m >> j & 1) *e++ = static_cast<uint8_t>(lanes[j]);
  }
  const __m256i emit = _mm256_xor_si256(
      _mm256_cmpeq_epi32(_mm256_srlv_epi32(x, _mm256_sub_epi32(_mm256_set1_epi32(32), len)), _mm256_setzero_si256()),
      _mm256_set1_epi32(-1));
  const int m = lane_mask(emit);
  // The emitting lanes' low halves, packed at the top of 8 words stored just below `words`: the
  // slots below the packed ones are scratch (still free, or the head, written last).
  const __m256i packed = _mm256_permutevar8x32_epi32(
      x, _mm256_load_si256(reinterpret_cast<const __m256i*>(kAvx2.pack_top[m])));
  const __m256i halves = _mm256_shuffle_epi8(packed, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1,
                                                                      -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1,
                                                                      -1, -1, -1, -1));
  const __m128i eight = _mm256_castsi256_si128(_mm256_permute4x64_epi64(halves, 0x08));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(words - 8), eight);
  words -= __builtin_popcount(m);
  x = _mm256_blendv_epi8(x, _mm256_srli_epi32(x, 16), emit);
  return _mm256_or_si256(_mm256_sllv_epi32(x, len), code);
}

// encode_avx512 on four vectors of 8 lanes.
SK_RICE_AVX2 void encode_avx2(const uint8_t* sym, int64_t full, const Params& p, uint32_t* x, uint16_t*& words_io,
                              uint8_t*& exc_io) {
  uint16_t* words = words_io;
  uint8_t* exc = exc_io;
  const uint32_t* const lanes = p.lanes.data();
  const int64_t stride = p.stride;
  __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
          x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8)),
          x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)),
          x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 24));
  GroupChannel ch(full, p.period);
  for (int64_t g = full - kRiceLanes; g >= 0; g -= kRiceLanes) {
    ch.back();
    const int64_t c = ch.c;
    x3 = enc_step8(x3, sym + g + 24, lanes + c + 24, stride, words, exc);
    x2 = enc_step8(x2, sym + g + 16, lanes + c + 16, stride, words, exc);
    x1 = enc_step8(x1, sym + g + 8, lanes + c + 8, stride, words, exc);
    x0 = enc_step8(x0, sym + g, lanes + c, stride, words, exc);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8), x1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 16), x2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 24), x3);
  words_io = words;
  exc_io = exc;
}

// dec_step16 on 8 lanes (`last`: the alphabet's last symbol in every lane); returns the exception
// lanes' mask in *is_exc and ORs invalid lanes into bad.
SK_RICE_AVX2 inline __m256i dec_step8(__m256i x, const uint32_t* at, int64_t stride, __m256i last, const uint8_t*& w,
                                      uint8_t* out, int* is_exc, __m256i& bad) {
  const __m256i one = _mm256_set1_epi32(1), k = row8(at, stride, Params::kK), top = row8(at, stride, Params::kTop);
  // Trailing ones of x: (x ^ (x + 1)) >> 1 is 2^q - 1, so 2^q is exact in fp32 and q its exponent
  // (2^31 converts as -2^31: the sign bit is masked off).
  const __m256i y = _mm256_add_epi32(_mm256_srli_epi32(_mm256_xor_si256(x, _mm256_add_epi32(x, one)), 1), one);
  const __m256i tz = _mm256_sub_epi32(
      _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(_mm256_cvtepi32_ps(y)), 23), _mm256_set1_epi32(0xFF)),
      _mm256_set1_epi32(127));
  const __m256i q = _mm256_min_epu32(tz, top), q1 = _mm256_add_epi32(q, one);
  const __m256i exc_lanes = _mm256_cmpeq_epi32(q, top);
  *is_exc = lane_mask(exc_lanes);
  const __m256i u = _mm256_or_si256(_mm256_sllv_epi32(q, k), _mm256_and_si256(_mm256_srlv_epi32(x, q1),
                                                                              row8(at, stride, Params::kMask)));
  const __m256i v = _mm256_xor_si256(_mm256_srli_epi32(u, 1), _mm256_srai_epi32(_mm256_slli_epi32(u, 31), 31));
  const __m256i s = _mm256_add_epi32(row8(at, stride, Params::kC), v);
  // s is valid in [0, nsym): anything else is negative or above `last` as a signed value.
  const __m256i outside = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), s), _mm256_cmpgt_epi32(s, last));
  bad = _mm256_or_si256(bad, _mm256_andnot_si256(exc_lanes, outside));
  x = _mm256_srlv_epi32(x, _mm256_blendv_epi8(_mm256_add_epi32(q1, k), top, exc_lanes));
  const __m256i renorm = _mm256_cmpeq_epi32(_mm256_srli_epi32(x, 16), _mm256_setzero_si256());
  const int m = lane_mask(renorm);
  const __m256i next = _mm256_permutevar8x32_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))),
      _mm256_load_si256(reinterpret_cast<const __m256i*>(kAvx2.spread[m])));
  x = _mm256_blendv_epi8(x, _mm256_or_si256(_mm256_slli_epi32(x, 16), next), renorm);
  w += 2 * __builtin_popcount(m);
  const __m256i bytes = _mm256_shuffle_epi8(s, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                                                -1, -1, -1, -1));
  const __m256i low = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(low));
  return x;
}

// decode_avx512 on four vectors of 8 lanes.
SK_RICE_AVX2 int64_t decode_avx2(int64_t n, const Params& p, uint32_t nsym, uint32_t* x, const uint8_t*& w_io,
                                 const uint8_t* wend, const uint8_t*& exc_io, const uint8_t* exc_end, uint8_t* out) {
  const uint8_t* w = w_io;
  const uint8_t* exc = exc_io;
  const uint32_t* const lanes = p.lanes.data();
  const int64_t stride = p.stride;
  __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
          x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 8)),
          x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16)),
          x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 24));
  const __m256i last = _mm256_set1_epi32(static_cast<int>(nsym) - 1);
  __m256i bad = _mm256_setzero_si256();
  int64_t g = 0;
  for (GroupChannel ch(0, p.period); g + kRiceLanes <= n && wend - w >= 2 * kRiceLanes; g += kRiceLanes, ch.next()) {
    const int64_t c = ch.c;
    int e0, e1, e2, e3;
    x0 = dec_step8(x0, lanes + c, stride, last, w, out + g, &e0, bad);
    x1 = dec_step8(x1, lanes + c + 8, stride, last, w, out + g + 8, &e1, bad);
    x2 = dec_step8(x2, lanes + c + 16, stride, last, w, out + g + 16, &e2, bad);
    x3 = dec_step8(x3, lanes + c + 24, stride, last, w, out + g + 24, &e3, bad);
    if (const uint32_t e = uint32_t(e0) | uint32_t(e1) << 8 | uint32_t(e2) << 16 | uint32_t(e3) << 24) {
      exc = fill_exceptions(e, out + g, p, c, nsym, exc, exc_end);
      if (!exc) return -1;
    }
    if (!_mm256_testz_si256(bad, bad)) return -1;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 8), x1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 16), x2);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + 24), x3);
  w_io = w;
  exc_io = exc;
  return g;
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt"); }

bool cpu_has_avx512() { return cpu_has_lanes_avx512(); }
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

enum class Isa { kScalar, kAvx2, kAvx512 };
Isa g_isa = cpu_has_avx512() ? Isa::kAvx512 : cpu_has_avx2() ? Isa::kAvx2 : Isa::kScalar;

bool valid_params(const uint8_t* centre, const uint8_t* k, int64_t period, int nsym) {
  if (period < 1 || nsym < 2 || nsym > 256) return false;
  for (int64_t j = 0; j < period; ++j)
    if (centre[j] >= nsym || k[j] > kRiceMaxK) return false;
  return true;
}

}  // namespace

int64_t rice_encode(const uint8_t* sym, int64_t n, const uint8_t* centre, const uint8_t* k, int64_t period, int nsym,
                    uint8_t* out, int64_t capacity) {
  if (n == 0) return 0;
  if (!valid_params(centre, k, period, nsym) || capacity < rice_capacity(n)) return -1;
  uint8_t most = 0;  // a max rather than an early exit: the loop vectorises
  for (int64_t i = 0; i < n; ++i) most = sym[i] > most ? sym[i] : most;
  if (most >= nsym) return -1;
  const Params p(centre, k, period);
  // Words grow down from the end of their area, exception bytes from the end of the buffer; both
  // come out in the decoder's order and move behind the states at the end.
  uint16_t* const wend = reinterpret_cast<uint16_t*>(out + kRiceHeadBytes) + n;
  uint8_t* const eend = out + rice_capacity(n);
  uint16_t* words = wend;
  uint8_t* exc = eend;
  uint32_t x[kRiceLanes];
  for (uint32_t& s : x) s = kL;
  const int64_t full = n / kRiceLanes * kRiceLanes;
  for (int64_t i = n - 1; i >= full; --i)  // the last, partial group one symbol at a time
    enc_put(x[i % kRiceLanes], sym[i], p.c[i % period], p.k[i % period], words, exc);
#ifdef SK_RICE_X86
  if (g_isa == Isa::kAvx512) {
    encode_avx512(sym, full, p, x, words, exc);
  } else if (g_isa == Isa::kAvx2) {
    encode_avx2(sym, full, p, x, words, exc);
  } else
#endif
  {
    int64_t c = full % period;
    for (int64_t i = full - 1; i >= 0; --i) {
      c = c == 0 ? period - 1 : c - 1;
      enc_put(x[i % kRiceLanes], sym[i], p.c[c], p.k[c], words, exc);
    }
  }
  const int64_t nwords = wend - words, nexc = eend - exc;
  store_u32(out, static_cast<uint32_t>(nexc));
  for (int j = 0; j < kRiceLanes; ++j) store_u32(out + 4 + 4 * j, x[j]);
  // Little-endian u16 words; memmove because the areas may overlap.
  std::memmove(out + kRiceHeadBytes, words, 2 * nwords);
  std::memmove(out + kRiceHeadBytes + 2 * nwords, exc, nexc);
  return kRiceHeadBytes + 2 * nwords + nexc;
}

std::string rice_decode(const uint8_t* data, int64_t len, int64_t n, const uint8_t* centre, const uint8_t* k,
                        int64_t period, int nsym, uint8_t* out, int count_of, int64_t* count) {
  if (n == 0) return len == 0 ? "" : "an empty symbol stream must have 0 bytes";
  if (!valid_params(centre, k, period, nsym)) return "Rice parameters out of range";
  if (len < kRiceHeadBytes) return "Rice stream is shorter than its exception count and states";
  const int64_t nexc = load_u32(data);
  if (nexc > n || nexc > len - kRiceHeadBytes || (len - kRiceHeadBytes - nexc) % 2)
    return "Rice stream is not its states, 16-bit words and exception bytes";
  uint32_t x[kRiceLanes];
  for (int j = 0; j < kRiceLanes; ++j) {
    x[j] = load_u32(data + 4 + 4 * j);
    if (x[j] < kL) return "Rice initial state below the renormalisation bound";
  }
  const Params p(centre, k, period);
  const uint8_t* w = data + kRiceHeadBytes;
  const uint8_t* const wend = data + len - nexc;
  const uint8_t* exc = wend;
  const uint8_t* const exc_end = data + len;
  int64_t i = 0;
#ifdef SK_RICE_X86
  if (g_isa != Isa::kScalar) {
    i = (g_isa == Isa::kAvx512 ? decode_avx512 : decode_avx2)(n, p, static_cast<uint32_t>(nsym), x, w, wend, exc,
                                                              exc_end, out);
    if (i < 0) return "Rice stream names a symbol outside the table or an exception not coded canonically";
  }
#endif
  for (int64_t c = i % period; i < n; ++i, c = c + 1 == period ? 0 : c + 1) {
    uint32_t& s = x[i % kRiceLanes];
    if (!dec_put(s, p.c[c], p.k[c], static_cast<uint32_t>(nsym), exc, exc_end, out + i))
      return "Rice stream names a symbol outside the table or an exception not coded canonically";
    if (s < kL) {
      if (w >= wend) return "Rice stream ends early";
      s = (s << 16) | load_u16(w);
      w += 2;
    }
  }
  if (w != wend) return "Rice stream has unread words";
  if (exc != exc_end) return "Rice stream has unread exception bytes";
  for (int j = 0; j < kRiceLanes; ++j)
    if (x[j] != kL) return "Rice stream does not end in the initial state (corrupted or wrong config)";
  if (count && count_of >= 0 && count_of < 256) {
    *count = count_equal(out, n, static_cast<uint8_t>(count_of));
  }
  return "";
}

std::vector<std::string> rice_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

std::string rice_isa() { return g_isa == Isa::kAvx512 ? "avx512" : g_isa == Isa::kAvx2 ? "avx2" : "scalar"; }

std::string set_rice_isa(const std::string& name) {
  const bool known = name == "scalar" || (name == "avx2" && cpu_has_avx2()) || (name == "avx512" && cpu_has_avx512());
  if (known) {
    g_isa = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kScalar;
    return "";
  }
  return "rice isa must be one of the supported ones (see rice_isas()), got '" + name + "'";
}

}  // namespace sk
