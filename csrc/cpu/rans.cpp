#include "cpu/rans.h"

#include <cstring>
#include <vector>

namespace sk {
namespace {

// Exact division of a 32-bit state by a frequency f < 2^14 with one 128-bit multiply
// (Granlund-Montgomery: m = ceil(2^(32+l) / f), l = ceil(log2 f), m < 2^33).
struct EncSymbol {
  uint64_t mul;
  uint32_t shift;
  uint32_t freq;
  uint32_t cum;
  uint32_t x_max;  // renormalise when the state reaches f << 18
};

EncSymbol make_enc(uint32_t f, uint32_t cum) {
  uint32_t l = 0;
  while ((1u << l) < f) ++l;
  const uint32_t shift = 32 + l;
  const unsigned __int128 one = 1;
  const uint64_t mul = static_cast<uint64_t>(((one << shift) + f - 1) / f);
  return {mul, shift, f, cum, f << (32 - kRansPrecBits)};
}

inline uint32_t div_by(uint32_t x, const EncSymbol& s) {
  return static_cast<uint32_t>((static_cast<unsigned __int128>(x) * s.mul) >> s.shift);
}

inline void enc_put(uint32_t& x, const EncSymbol& s, uint16_t*& words) {
  if (x >= s.x_max) {
    *--words = static_cast<uint16_t>(x & 0xFFFF);
    x >>= 16;
  }
  const uint32_t q = div_by(x, s);
  x = (q << kRansPrecBits) + (x - q * s.freq) + s.cum;
}

inline void store_u32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v);
  p[1] = static_cast<uint8_t>(v >> 8);
  p[2] = static_cast<uint8_t>(v >> 16);
  p[3] = static_cast<uint8_t>(v >> 24);
}

inline uint32_t load_u32(const uint8_t* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
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

int64_t rans_encode(const uint8_t* sym, int64_t n, const uint32_t* freq, int nsym, uint8_t* out, int64_t capacity) {
  if (n == 0) return 0;
  const int lanes = rans_lanes(n);
  if (capacity < 4 * lanes + 2 * n) return -1;
  EncSymbol table[256];
  uint32_t cum = 0;
  for (int s = 0; s < nsym; ++s) {
    table[s] = make_enc(freq[s], cum);
    cum += freq[s];
  }
  for (int64_t i = 0; i < n; ++i)
    if (sym[i] >= nsym) return -1;
  // Words are written backwards from the end of out, then moved behind the states.
  uint16_t* const end = reinterpret_cast<uint16_t*>(out + 4 * lanes) + n;
  uint16_t* words = end;
  uint32_t x[4] = {kRansL, kRansL, kRansL, kRansL};
  int64_t i = n - 1;
  if (lanes == 1) {
    for (; i >= 0; --i) enc_put(x[0], table[sym[i]], words);
  } else {
    // Symbol i belongs to lane i % 4; peel the tail so the main loop runs whole groups 3,2,1,0.
    for (; i >= 0 && (i % 4) != 3; --i) enc_put(x[i % 4], table[sym[i]], words);
    for (; i >= 3; i -= 4) {
      enc_put(x[3], table[sym[i]], words);
      enc_put(x[2], table[sym[i - 1]], words);
      enc_put(x[1], table[sym[i - 2]], words);
      enc_put(x[0], table[sym[i - 3]], words);
    }
  }
  const int64_t nwords = end - words;
  for (int j = 0; j < lanes; ++j) store_u32(out + 4 * j, x[j]);
  // Little-endian u16 words; memmove because source and destination may overlap.
  std::memmove(out + 4 * lanes, words, 2 * nwords);
  return 4 * lanes + 2 * nwords;
}

std::string rans_decode(const uint8_t* data, int64_t len, int64_t n, const uint32_t* freq, int nsym, uint8_t* out) {
  std::string err = rans_check_table(freq, nsym);
  if (!err.empty()) return err;
  if (n == 0) return len == 0 ? "" : "an empty symbol stream must have 0 bytes";
  const int lanes = rans_lanes(n);
  if (len < 4 * lanes || (len - 4 * lanes) % 2) return "rANS stream is not its states plus 16-bit words";
  std::vector<uint8_t> slot_sym(kRansM);
  uint32_t cum[256];
  uint32_t c = 0;
  for (int s = 0; s < nsym; ++s) {
    cum[s] = c;
    std::memset(slot_sym.data() + c, s, freq[s]);
    c += freq[s];
  }
  uint32_t x[4];
  for (int j = 0; j < lanes; ++j) {
    x[j] = load_u32(data + 4 * j);
    if (x[j] < kRansL) return "rANS initial state below the renormalisation bound";
  }
  const uint8_t* w = data + 4 * lanes;
  const uint8_t* const wend = data + len;
  const uint8_t* tab = slot_sym.data();
  for (int64_t i = 0; i < n; ++i) {
    uint32_t& s = x[lanes == 1 ? 0 : (i & 3)];
    const uint32_t slot = s & (kRansM - 1);
    const uint8_t sym = tab[slot];
    s = freq[sym] * (s >> kRansPrecBits) + slot - cum[sym];
    if (s < kRansL) {
      if (w >= wend) return "rANS stream ends early";
      s = (s << 16) | uint32_t(w[0]) | uint32_t(w[1]) << 8;
      w += 2;
    }
    out[i] = sym;
  }
  if (w != wend) return "rANS stream has unread words";
  for (int j = 0; j < lanes; ++j)
    if (x[j] != kRansL) return "rANS stream does not end in the initial state (corrupted or wrong table)";
  return "";
}

}  // namespace sk
