#include "cpu/rans.h"

#include <chrono>
#include <cstddef>
#include <cstring>

#include "cpu/count.h"
#include "cpu/lanes_avx512.h"
#include "cpu/le_bytes.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace sk {
namespace {

// An encoder step's renormalisation: whether state x emits its low word before coding s. The
// word is written unconditionally one below `words` and kept only when it does (no unpredictable
// branch); the slot below the first word is the states' area of the output, overwritten at the end.
inline bool emit_word(uint32_t x, const RansEncSymbol& s, uint16_t*& words) {
  const bool emit = x >= s.x_max;
  words[-1] = static_cast<uint16_t>(x);
  words -= emit;
  return emit;
}

// The coding step of a state v that needs no renormalisation: v + bias + floor(v / freq) * cmpl_freq.
inline uint32_t enc_code(uint32_t v, const RansEncSymbol& s) {
  const uint32_t q = static_cast<uint32_t>((static_cast<uint64_t>(v) * s.rcp_freq) >> (32 + s.rcp_shift));
  return v + s.bias + q * s.cmpl_freq;
}

// One encoder step.
inline void enc_put(uint32_t& x, const RansEncSymbol& s, uint16_t*& words) {
  x = enc_code(emit_word(x, s, words) ? x >> 16 : x, s);
}

// enc_put for a single state (one-token frames), where the serial chain sets the pace: the step is
// coded for both the kept and the renormalised state and the compare picks one at the end, so the
// chain is the two multiplies alone (~20% faster at d = 4096; with more lanes the doubled
// multiplies cost more than the chain saves: 32 lanes encoded 35% slower).
inline void enc_put_chain(uint32_t& x, const RansEncSymbol& s, uint16_t*& words) {
  const bool emit = emit_word(x, s, words);
  const uint32_t kept = enc_code(x, s), renormalised = enc_code(x >> 16, s);
  x = emit ? renormalised : kept;
}

// One decoder step without its renormalisation.
inline uint8_t dec_step(uint32_t& x, const RansTables& t) {
  const uint32_t slot = x & (kRansM - 1);
  const uint8_t s = t.sym[slot];
  const uint32_t e = t.fc[s];
  x = (e >> 16) * (x >> kRansPrecBits) + (slot - (e & 0xFFFF));
  return s;
}

// A step's renormalisation; `w` must have 2 readable bytes (the caller checks).
inline void renormalise(uint32_t& x, const uint8_t*& w) {
  const bool renorm = x < kRansL;
  const uint32_t next = (x << 16) | load_u16(w);
  x = renorm ? next : x;
  w += 2 * renorm;
}

}  // namespace

std::string rans_check_table(const uint32_t* freq, int nsym) {
  if (nsym < 2 || nsym > 256) return "rans table must have 2..256 symbols, got " + std::to_string(nsym);
  uint64_t sum = 0;
  for (int i = 0; i < nsym; ++i) {
    if (freq[i] < 1 || freq[i] > kRansM / 2) return "rans table entries must be in [1, 2^13]";
    sum += freq[i];
  }
  if (sum != kRansM) return "rans table must sum to 2^14, got " + std::to_string(sum);
  return "";
}

std::string rans_build_tables(const uint32_t* freq, int nsym, RansTables* t) {
  std::string err = rans_check_table(freq, nsym);
  if (!err.empty()) return err;
  std::memset(t, 0, sizeof(RansTables));
  t->nsym = nsym;
  uint32_t cum = 0;
  for (int s = 0; s < nsym; ++s) {
    const uint32_t f = freq[s];
    RansEncSymbol& e = t->enc[s];
    e.x_max = f << (32 - kRansPrecBits);
    e.cmpl_freq = static_cast<uint16_t>(kRansM - f);
    if (f < 2) {
      // q = x - 1 for every x >= 1: x + bias + q * (M - 1) = x * M + cum.
      e.rcp_freq = ~0u;
      e.rcp_shift = 0;
      e.bias = cum + kRansM - 1;
    } else {
      uint32_t shift = 0;
      while (f > (1u << shift)) ++shift;
      e.rcp_freq = static_cast<uint32_t>(((uint64_t(1) << (shift + 31)) + f - 1) / f);
      e.rcp_shift = static_cast<uint16_t>(shift - 1);
      e.bias = cum;
    }
    t->wide_enc[s] = (f | e.bias << 16) | uint64_t(e.rcp_freq) << 32;
    t->fc[s] = f << 16 | cum;
    for (uint32_t slot = cum; slot < cum + f; ++slot) {
      t->dec[slot] = f << 16 | (slot - cum);
      t->sym[slot] = static_cast<uint8_t>(s);
    }
    cum += f;
  }
  return "";
}

namespace {

// The table of each position: one table (kClasses false) or the table of channel i % period.
template <bool kClasses>
struct TableCursor {
  const RansTables* const* tabs;
  int64_t period;
  int64_t c;  // channel of the current position
  const RansTables& get() const { return kClasses ? *tabs[c] : *tabs[0]; }
  void next() {
    if (kClasses && ++c == period) c = 0;
  }
  void prev() {
    if (kClasses && c-- == 0) c = period - 1;
  }
};

// Symbol i is on lane i % kLanes; symbols are coded from the last to the first, so a stream's
// words come out in the order the decoder reads them once reversed.
template <bool kClasses, int kLanes>
int64_t encode_impl(const uint8_t* sym, int64_t n, TableCursor<kClasses> tc, uint8_t* out) {
  // Words are written backwards from the end of the word area, then moved behind the states.
  uint16_t* const end = reinterpret_cast<uint16_t*>(out + 4 * kLanes) + n;
  uint16_t* words = end;
  uint32_t x[kLanes];
  for (int j = 0; j < kLanes; ++j) x[j] = kRansL;
  tc.c = kClasses ? (n - 1) % tc.period : 0;
  if constexpr (kLanes == 1) {
    for (int64_t i = n - 1; i >= 0; --i, tc.prev()) enc_put_chain(x[0], tc.get().enc[sym[i]], words);
  } else {
    // With four lanes, whole groups take each lane at compile time, so the states stay in registers
    // (indexed by i % kLanes they lived in memory and four lanes encoded no faster than one). 32
    // states spill either way, and there the indexed loop was 5% faster.
    const int64_t grouped = kLanes < 8 ? n / kLanes * kLanes : 0;
    for (int64_t i = n - 1; i >= grouped; --i, tc.prev()) enc_put(x[i % kLanes], tc.get().enc[sym[i]], words);
    if constexpr (kLanes < 8) {
      for (int64_t g = grouped - kLanes; g >= 0; g -= kLanes) {
        for (int j = kLanes - 1; j >= 0; --j, tc.prev()) enc_put(x[j], tc.get().enc[sym[g + j]], words);
      }
    }
  }
  const int64_t nwords = end - words;
  for (int j = 0; j < kLanes; ++j) store_u32(out + 4 * j, x[j]);
  // Little-endian u16 words; memmove because source and destination may overlap.
  std::memmove(out + 4 * kLanes, words, 2 * nwords);
  return 4 * kLanes + 2 * nwords;
}

// Reads the kLanes states, runs `fast(x, w, wend)` (unchecked steps while enough words remain;
// returns how many symbols it decoded), then one checked step per remaining symbol (the stream's
// last words) and the checks that the stream ends where it should.
template <int kLanes, class Fast>
std::string decode_stream(const uint8_t* data, int64_t len, int64_t n, const RansTables* const* tables,
                          int64_t period, uint8_t* out, Fast fast) {
  if (len < 4 * kLanes || (len - 4 * kLanes) % 2) return "rANS stream is not its states plus 16-bit words";
  uint32_t x[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    x[j] = load_u32(data + 4 * j);
    if (x[j] < kRansL) return "rANS initial state below the renormalisation bound";
  }
  const uint8_t* w = data + 4 * kLanes;
  const uint8_t* const wend = data + len;
  for (int64_t i = fast(x, w, wend); i < n; ++i) {
    uint32_t& s = x[i % kLanes];
    out[i] = dec_step(s, *tables[i % period]);
    if (s < kRansL) {
      if (w >= wend) return "rANS stream ends early";
      s = (s << 16) | load_u16(w);
      w += 2;
    }
  }
  if (w != wend) return "rANS stream has unread words";
  for (int j = 0; j < kLanes; ++j)
    if (x[j] != kRansL) return "rANS stream does not end in the initial state (corrupted or wrong table)";
  return "";
}

template <bool kClasses, int kLanes>
std::string decode_impl(const uint8_t* data, int64_t len, int64_t n, TableCursor<kClasses> tc, uint8_t* out) {
  return decode_stream<kLanes>(data, len, n, tc.tabs, tc.period, out,
                               [&](uint32_t* x, const uint8_t*& w, const uint8_t* wend) {
    // Each step reads at most one word: while kLanes words remain, a group of kLanes steps needs no checks.
    int64_t i = 0;
    for (; i + kLanes <= n && wend - w >= 2 * kLanes; i += kLanes) {
      // A sub-group's table steps first, then their renormalisations: the word pointer is a
      // serial chain, and keeping it out of the table steps lets the lookups overlap (more lanes
      // at a time than eight spill the states: 32-lane streams decoded 25% slower).
      constexpr int kSub = kLanes < 8 ? kLanes : 8;
      for (int b = 0; b < kLanes; b += kSub) {
        for (int j = b; j < b + kSub; ++j, tc.next()) out[i + j] = dec_step(x[j], tc.get());
        for (int j = b; j < b + kSub; ++j) renormalise(x[j], w);
      }
    }
    return i;
  });
}

// Symbols per block whose table entries the wide encoder looks up before coding the block.
constexpr int64_t kWideBlock = 64 * kRansWideLanes;

// The wide coder's view of the tables: byte offsets from the lowest table, per channel, repeated
// so that a block of channels from any c < period reads without wrapping.
struct WideTables {
  const uint8_t* base;
  std::vector<int32_t> off;  // period + kWideBlock entries: offset of the table of channel k % period
  int64_t period;
};

// False when the tables lie too far apart for 32-bit gather offsets (the caller then runs the
// scalar coder; ClassTables allocates its tables in one block, so this does not happen there).
bool wide_tables(const RansTables* const* tables, int64_t period, WideTables* w) {
  uintptr_t lo = reinterpret_cast<uintptr_t>(tables[0]), hi = lo;
  for (int64_t c = 1; c < period; ++c) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(tables[c]);
    lo = p < lo ? p : lo;
    hi = p > hi ? p : hi;
  }
  if (hi - lo > (uintptr_t(1) << 31) - 2 * sizeof(RansTables)) return false;
  w->base = reinterpret_cast<const uint8_t*>(lo);
  w->period = period;
  w->off.resize(period + kWideBlock);
  for (int64_t k = 0; k < period + kWideBlock; ++k)
    w->off[k] = static_cast<int32_t>(reinterpret_cast<uintptr_t>(tables[k % period]) - lo);
  return true;
}

#if defined(__x86_64__) || defined(_M_X64)
#define SK_RANS_X86 1

// One encoder step of 16 lanes from their wide_enc entries e[0..16): the wide form of enc_put.
// The words of the lanes that renormalise go below `words`, in lane order.
SK_LANES_AVX512 inline __m512i enc_step16(__m512i x, const uint64_t* e, uint16_t*& words) {
  const __m512i e0 = _mm512_loadu_si512(e), e1 = _mm512_loadu_si512(e + 8);
  const __m512i even_idx = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i fb = _mm512_permutex2var_epi32(e0, even_idx, e1);
  const __m512i rcp = _mm512_permutex2var_epi32(e0, _mm512_add_epi32(even_idx, _mm512_set1_epi32(1)), e1);
  const __m512i f = _mm512_and_si512(fb, _mm512_set1_epi32(0xFFFF));
  const __mmask16 emit = _mm512_cmpge_epu32_mask(x, _mm512_slli_epi32(f, 32 - kRansPrecBits));
  x = emit_words16(x, emit, words);
  // q = floor(x * rcp / 2^32) >> shift, shift = ceil(log2 f) - 1 (0 for f = 1, whose rcp is ~0).
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(x, rcp), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), _mm512_srli_epi64(rcp, 32));
  __m512i q = _mm512_mask_blend_epi32(0xAAAA, even, odd);
  const __m512i shift = _mm512_max_epi32(
      _mm512_sub_epi32(_mm512_set1_epi32(31), _mm512_lzcnt_epi32(_mm512_sub_epi32(f, _mm512_set1_epi32(1)))),
      _mm512_setzero_si512());
  q = _mm512_srlv_epi32(q, shift);
  const __m512i cmpl = _mm512_sub_epi32(_mm512_set1_epi32(kRansM), f);
  return _mm512_add_epi32(_mm512_add_epi32(x, _mm512_srli_epi32(fb, 16)), _mm512_mullo_epi32(q, cmpl));
}

SK_LANES_AVX512 inline __m512i load_off16(const int32_t* p) { return _mm512_loadu_si512(p); }

SK_LANES_AVX512 int64_t encode_wide_avx512(const uint8_t* sym, int64_t n, const WideTables& wt, uint8_t* out) {
  constexpr int L = kRansWideLanes;
  uint16_t* const end = reinterpret_cast<uint16_t*>(out + 4 * L) + n;
  uint16_t* words = end;
  uint32_t x[L];
  for (int j = 0; j < L; ++j) x[j] = kRansL;
  const int64_t full = n / L * L;
  // The last, partial group one symbol at a time (symbols are coded from the last).
  for (int64_t i = n - 1; i >= full; --i)
    enc_put(x[i % L], reinterpret_cast<const RansTables*>(wt.base + wt.off[i % wt.period])->enc[sym[i]], words);
  constexpr int NV = L / 16;
  __m512i xv[NV];
  for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_si512(x + 16 * v);
  alignas(64) uint64_t e[kWideBlock];
  const uint8_t* const wide_enc = wt.base + offsetof(RansTables, wide_enc);
  for (int64_t b1 = full; b1 > 0;) {
    const int64_t b0 = b1 > kWideBlock ? b1 - kWideBlock : 0;
    // The block's entries first, with plain loads: they beat AVX-512 gathers by far on Zen 4, and
    // they do not depend on the states.
    const int32_t* off = wt.off.data() + b0 % wt.period;
    const uint8_t* s = sym + b0;
    for (int64_t j = 0; j < b1 - b0; ++j) e[j] = *reinterpret_cast<const uint64_t*>(wide_enc + off[j] + 8 * s[j]);
    for (int64_t g = b1 - L; g >= b0; g -= L) {
      // The highest lanes first: the scalar order codes lane L-1 down to 0, so their words lie above.
      for (int v = NV - 1; v >= 0; --v) xv[v] = enc_step16(xv[v], e + (g - b0) + 16 * v, words);
    }
    b1 = b0;
  }
  for (int v = 0; v < NV; ++v) _mm512_storeu_si512(x + 16 * v, xv[v]);
  const int64_t nwords = end - words;
  for (int j = 0; j < L; ++j) store_u32(out + 4 * j, x[j]);
  std::memmove(out + 4 * L, words, 2 * nwords);
  return 4 * L + 2 * nwords;
}

// 16 u32 at byte offsets idx from p.
SK_LANES_AVX512 inline __m512i gather32(__m512i idx, const uint8_t* p) { return _mm512_i32gather_epi32(idx, p, 1); }

// One decoder step of 16 lanes; 16 words must be readable at w (the caller checks). Stores the 16
// symbols at out.
SK_LANES_AVX512 inline __m512i dec_step16(__m512i x, __m512i off, const uint8_t* base, const uint8_t*& w,
                                         uint8_t* out) {
  const __m512i slot = _mm512_and_si512(x, _mm512_set1_epi32(kRansM - 1));
  // Both lookups take the slot, so they run side by side. 4 bytes from sym[slot]: the arrays
  // after sym keep the read inside the table.
  const __m512i s = _mm512_and_si512(gather32(_mm512_add_epi32(off, slot), base + offsetof(RansTables, sym)),
                                     _mm512_set1_epi32(0xFF));
  const __m512i e = gather32(_mm512_add_epi32(off, _mm512_slli_epi32(slot, 2)), base + offsetof(RansTables, dec));
  x = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(e, 16), _mm512_srli_epi32(x, kRansPrecBits)),
                       _mm512_and_si512(e, _mm512_set1_epi32(0xFFFF)));
  store_bytes16(s, out);
  return refill16(x, w);
}

// Decodes whole groups while 32 words remain; returns the symbols decoded (a multiple of 32) and
// leaves the states in x and the read position in w for the checked scalar steps.
SK_LANES_AVX512 int64_t decode_wide_avx512(int64_t n, const WideTables& wt, uint32_t* x, const uint8_t*& w,
                                          const uint8_t* wend, uint8_t* out) {
  constexpr int L = kRansWideLanes, NV = L / 16;
  __m512i xv[NV];
  for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_si512(x + 16 * v);
  int64_t g = 0, c = 0;  // c = g % period, kept without a division per group
  const int64_t step = L % wt.period;
  for (; g + L <= n && wend - w >= 2 * L; g += L) {
    const int32_t* off = wt.off.data() + c;
    for (int v = 0; v < NV; ++v) xv[v] = dec_step16(xv[v], load_off16(off + 16 * v), wt.base, w, out + g + 16 * v);
    c += step;
    c -= c >= wt.period ? wt.period : 0;
  }
  for (int v = 0; v < NV; ++v) _mm512_storeu_si512(x + 16 * v, xv[v]);
  return g;
}

bool cpu_has_avx512() { return cpu_has_lanes_avx512(); }
#else
bool cpu_has_avx512() { return false; }
#endif

bool g_wide_simd = cpu_has_avx512();

template <bool kClasses>
int64_t encode_lanes(const uint8_t* sym, int64_t n, TableCursor<kClasses> tc, int lanes, uint8_t* out) {
  if (lanes == 1) return encode_impl<kClasses, 1>(sym, n, tc, out);
  if (lanes == 4) return encode_impl<kClasses, 4>(sym, n, tc, out);
  return encode_impl<kClasses, kRansWideLanes>(sym, n, tc, out);
}

template <bool kClasses>
std::string decode_lanes(const uint8_t* data, int64_t len, int64_t n, TableCursor<kClasses> tc, int lanes,
                         uint8_t* out) {
  if (lanes == 1) return decode_impl<kClasses, 1>(data, len, n, tc, out);
  if (lanes == 4) return decode_impl<kClasses, 4>(data, len, n, tc, out);
  return decode_impl<kClasses, kRansWideLanes>(data, len, n, tc, out);
}

}  // namespace

int64_t rans_encode(const uint8_t* sym, int64_t n, const RansTables* const* tables, int64_t period, int lanes,
                    uint8_t* out, int64_t capacity) {
  if (n == 0) return 0;
  if (period < 1 || !rans_valid_lanes(lanes) || capacity < 4 * lanes + 2 * n) return -1;
  uint8_t top = 0;  // a max rather than an early exit: the loop vectorises
  for (int64_t i = 0; i < n; ++i) top = sym[i] > top ? sym[i] : top;
  if (top >= tables[0]->nsym) return -1;
#ifdef SK_RANS_X86
  WideTables wt;
  if (lanes == kRansWideLanes && g_wide_simd && wide_tables(tables, period, &wt))
    return encode_wide_avx512(sym, n, wt, out);
#endif
  if (period == 1) return encode_lanes<false>(sym, n, TableCursor<false>{tables, 1, 0}, lanes, out);
  return encode_lanes<true>(sym, n, TableCursor<true>{tables, period, 0}, lanes, out);
}

namespace {

#ifdef SK_RANS_X86
// The wide decoder: vector groups, then decode_stream's checked steps for the rest.
std::string decode_wide(const uint8_t* data, int64_t len, int64_t n, const WideTables& wt,
                        const RansTables* const* tables, uint8_t* out) {
  return decode_stream<kRansWideLanes>(data, len, n, tables, wt.period, out,
                                       [&](uint32_t* x, const uint8_t*& w, const uint8_t* wend) {
    return decode_wide_avx512(n, wt, x, w, wend, out);
  });
}
#endif

}  // namespace

std::string rans_decode(const uint8_t* data, int64_t len, int64_t n, const RansTables* const* tables, int64_t period,
                        int lanes, uint8_t* out, int count_of, int64_t* count) {
  if (n == 0) return len == 0 ? "" : "an empty symbol stream must have 0 bytes";
  if (period < 1) return "rANS table period must be >= 1";
  if (!rans_valid_lanes(lanes)) return "rANS lanes must be 1, 4 or 32";
  std::string err;
#ifdef SK_RANS_X86
  WideTables wt;
  if (lanes == kRansWideLanes && g_wide_simd && wide_tables(tables, period, &wt)) {
    err = decode_wide(data, len, n, wt, tables, out);
  } else
#endif
  {
    err = period == 1 ? decode_lanes<false>(data, len, n, TableCursor<false>{tables, 1, 0}, lanes, out)
                      : decode_lanes<true>(data, len, n, TableCursor<true>{tables, period, 0}, lanes, out);
  }
  if (!err.empty()) return err;
  if (count && count_of >= 0 && count_of < 256) {
    *count = count_equal(out, n, static_cast<uint8_t>(count_of));
  }
  return "";
}

namespace {

// Loads one byte of each 64-byte line of [p, p + bytes): independent loads, many in flight at
// once. (Prefetch instructions, T0 or T1, left the cold decode as slow as without them on a Zen 3.)
void touch_lines(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  uint32_t acc = 0;
  for (size_t off = 0; off < bytes; off += 64) acc |= static_cast<uint8_t>(c[off]);
  asm volatile("" ::"r"(acc));  // keeps the loads
}

// When this thread last loaded or used a table set: frames of one step decoded back to back find
// their tables still in the cache, and loading them again costs ~1.5 us at d = 4096 on 16 tables.
struct LastUse {
  const void* key = nullptr;
  std::chrono::steady_clock::time_point at;

  // True when `key` was used less than 500 us ago; records this use.
  bool recent(const void* k) {
    const auto now = std::chrono::steady_clock::now();
    const bool warm = k == key && now - at < std::chrono::microseconds(500);
    key = k;
    at = now;
    return warm;
  }
};

}  // namespace

void rans_prefetch_decoder(const RansTables* const* tables, int64_t count) {
  thread_local LastUse last;
  if (count < 1 || last.recent(tables)) return;
  for (int64_t k = 0; k < count; ++k) touch_lines(tables[k]->fc, sizeof(tables[k]->fc));  // read on every step
  for (int64_t k = 0; k < count; ++k) touch_lines(tables[k]->sym, sizeof(tables[k]->sym));
}

std::vector<std::string> rans_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

std::string rans_isa() { return g_wide_simd ? "avx512" : "scalar"; }

std::string set_rans_isa(const std::string& name) {
  if (name == "scalar" || (name == "avx512" && cpu_has_avx512())) {
    g_wide_simd = name == "avx512";
    return "";
  }
  return "rans isa must be one of the supported ones (see rans_isas()), got '" + name + "'";
}

}  // namespace sk
