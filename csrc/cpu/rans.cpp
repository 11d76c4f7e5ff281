#include "cpu/rans.h"

#include <cstring>

namespace sk {
namespace {

inline void store_u32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}

inline uint32_t load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

inline uint32_t load_u16(const uint8_t* p) { return uint32_t(p[0]) | uint32_t(p[1]) << 8; }

// One encoder step. The word is written unconditionally one below `words` and kept only when the
// state renormalises (no unpredictable branch); the slot below the first word is the states'
// area of the output, overwritten at the end.
inline void enc_put(uint32_t& x, const RansEncSymbol& s, uint16_t*& words) {
  const bool emit = x >= s.x_max;
  words[-1] = static_cast<uint16_t>(x);
  words -= emit;
  x = emit ? x >> 16 : x;
  const uint32_t q = static_cast<uint32_t>((static_cast<uint64_t>(x) * s.rcp_freq) >> 32) >> s.rcp_shift;
  x = x + s.bias + q * s.cmpl_freq;
}

// One decoder step with its renormalisation; `w` must have 2 readable bytes (the caller checks).
inline uint8_t dec_get(uint32_t& x, const RansTables& t, const uint8_t*& w) {
  const uint32_t slot = x & (kRansM - 1);
  const uint32_t e = t.dec[slot];
  x = (e >> 16) * (x >> kRansPrecBits) + (e & 0xFFFF);
  const bool renorm = x < kRansL;
  const uint32_t next = (x << 16) | load_u16(w);
  x = renorm ? next : x;
  w += 2 * renorm;
  return t.sym[slot];
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

template <bool kClasses>
int64_t encode_impl(const uint8_t* sym, int64_t n, TableCursor<kClasses> tc, uint8_t* out) {
  const int lanes = rans_lanes(n);
  // Words are written backwards from the end of the word area, then moved behind the states.
  uint16_t* const end = reinterpret_cast<uint16_t*>(out + 4 * lanes) + n;
  uint16_t* words = end;
  uint32_t x[4] = {kRansL, kRansL, kRansL, kRansL};
  int64_t i = n - 1;
  tc.c = kClasses ? i % tc.period : 0;
  if (lanes == 1) {
    for (; i >= 0; --i, tc.prev()) enc_put(x[0], tc.get().enc[sym[i]], words);
  } else {
    // Symbol i belongs to lane i % 4; peel the tail so the main loop runs whole groups 3,2,1,0.
    for (; i >= 0 && (i % 4) != 3; --i, tc.prev()) enc_put(x[i % 4], tc.get().enc[sym[i]], words);
    for (; i >= 3; i -= 4) {
      for (int j = 3; j >= 0; --j, tc.prev()) enc_put(x[j], tc.get().enc[sym[i - 3 + j]], words);
    }
  }
  const int64_t nwords = end - words;
  for (int j = 0; j < lanes; ++j) store_u32(out + 4 * j, x[j]);
  // Little-endian u16 words; memmove because source and destination may overlap.
  std::memmove(out + 4 * lanes, words, 2 * nwords);
  return 4 * lanes + 2 * nwords;
}

}  // namespace

int64_t rans_encode(const uint8_t* sym, int64_t n, const RansTables* const* tables, int64_t period, uint8_t* out,
                    int64_t capacity) {
  if (n == 0) return 0;
  if (period < 1 || capacity < 4 * rans_lanes(n) + 2 * n) return -1;
  const int nsym = tables[0]->nsym;
  for (int64_t i = 0; i < n; ++i)
    if (sym[i] >= nsym) return -1;
  if (period == 1) return encode_impl<false>(sym, n, TableCursor<false>{tables, 1, 0}, out);
  return encode_impl<true>(sym, n, TableCursor<true>{tables, period, 0}, out);
}

namespace {

template <bool kClasses>
std::string decode_impl(const uint8_t* data, int64_t len, int64_t n, TableCursor<kClasses> tc, uint8_t* out) {
  const int lanes = rans_lanes(n);
  if (len < 4 * lanes || (len - 4 * lanes) % 2) return "rANS stream is not its states plus 16-bit words";
  uint32_t x[4];
  for (int j = 0; j < lanes; ++j) {
    x[j] = load_u32(data + 4 * j);
    if (x[j] < kRansL) return "rANS initial state below the renormalisation bound";
  }
  const uint8_t* w = data + 4 * lanes;
  const uint8_t* const wend = data + len;
  int64_t i = 0;
  // Each step reads at most one word: while 4 words remain, a group of 4 steps needs no checks.
  if (lanes == 4) {
    for (; i + 4 <= n && wend - w >= 8; i += 4) {
      for (int j = 0; j < 4; ++j, tc.next()) out[i + j] = dec_get(x[j], tc.get(), w);
    }
  } else {
    for (; i < n && wend - w >= 2; ++i, tc.next()) out[i] = dec_get(x[0], tc.get(), w);
  }
  for (; i < n; ++i, tc.next()) {  // the last words: checked steps
    const RansTables& t = tc.get();
    uint32_t& s = x[lanes == 1 ? 0 : (i & 3)];
    const uint32_t slot = s & (kRansM - 1);
    const uint32_t e = t.dec[slot];
    s = (e >> 16) * (s >> kRansPrecBits) + (e & 0xFFFF);
    if (s < kRansL) {
      if (w >= wend) return "rANS stream ends early";
      s = (s << 16) | load_u16(w);
      w += 2;
    }
    out[i] = t.sym[slot];
  }
  if (w != wend) return "rANS stream has unread words";
  for (int j = 0; j < lanes; ++j)
    if (x[j] != kRansL) return "rANS stream does not end in the initial state (corrupted or wrong table)";
  return "";
}

}  // namespace

std::string rans_decode(const uint8_t* data, int64_t len, int64_t n, const RansTables* const* tables, int64_t period,
                        uint8_t* out, int count_of, int64_t* count) {
  if (n == 0) return len == 0 ? "" : "an empty symbol stream must have 0 bytes";
  if (period < 1) return "rANS table period must be >= 1";
  std::string err = period == 1 ? decode_impl<false>(data, len, n, TableCursor<false>{tables, 1, 0}, out)
                                : decode_impl<true>(data, len, n, TableCursor<true>{tables, period, 0}, out);
  if (!err.empty()) return err;
  if (count && count_of >= 0 && count_of < 256) {
    int64_t c = 0;
    for (int64_t k = 0; k < n; ++k) c += out[k] == count_of;
    *count = c;
  }
  return "";
}

}  // namespace sk
