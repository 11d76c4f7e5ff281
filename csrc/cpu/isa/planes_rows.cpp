// Row kernels of the bit-plane coder (docs/FORMATS.md section 5.8): the plane loops once, the block
// steps per instruction set. Built with AVX-512 BW + VBMI2 and BMI2, a block step is a handful of
// byte-vector instructions (a compare into a mask, a compress or an expand) and a pext / pdep per
// remainder level; the generic build does the same lane by lane, branch-free where the data
// decides (about as fast as the scalar Rice coder).
//
// Quotient planes are coded on dense arrays: plane j's bits are those of the channels still alive
// (q > j - 1) in channel order, so the encoder compresses the survivors' q - 1 after each plane
// and every plane step handles 64 alive channels; the decoder finds each plane's size from the
// previous plane's popcount, then rebuilds q from the deepest plane up, expanding each plane's
// survivors back into its lanes.
#include <algorithm>
#include <cstring>

#include "cpu/planes_rows.h"

#if defined(__AVX512BW__) && defined(__AVX512VBMI2__) && defined(__BMI2__)
#include <immintrin.h>
#define SK_PLANES_VECTOR 1
#endif

#include "cpu/isa_build.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

constexpr int kB = 64;

// The layout's arrays as plain pointers in a local object: the kernels store bytes through
// pointers, which the compiler must assume may alias the vectors' own pointers (and the bit
// writer's fields) unless those live in locals whose address never escapes.
struct View {
  int64_t d, blocks;
  int nsym;
  const uint8_t *centre, *k, *top, *edge, *low, *room;
  const uint16_t *k_even, *k_odd;
  const uint64_t *full, *level;
  const uint8_t *level_bits, *levels;
  uint8_t *row, *rem, *dense0, *dense1;
};

View view_of(PlanesLayout& L) {
  return View{L.d,           L.blocks,          L.nsym,           L.centre.data(),     L.k.data(),
              L.top.data(),  L.edge.data(),     L.low.data(),     L.room.data(),       L.k_even.data(),
              L.k_odd.data(), L.full.data(),    L.level.data(),   L.level_bits.data(), L.levels.data(),
              L.row.data(),  L.rem.data(),      L.dense[0].data(), L.dense[1].data()};
}

// Zigzag distance of s from c (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), branch-free.
inline int zigzag(int s, int c) {
  const int delta = s - c;
  return (delta * 2) ^ (delta >> 31);
}

inline uint64_t first_lanes(int64_t n) { return n >= kB ? ~uint64_t{0} : (uint64_t{1} << n) - 1; }

#ifdef SK_PLANES_VECTOR

inline uint64_t pext(uint64_t v, uint64_t m) { return _pext_u64(v, m); }
inline uint64_t pdep(uint64_t v, uint64_t m) { return _pdep_u64(v, m); }
inline int popcount(uint64_t m) { return static_cast<int>(_mm_popcnt_u64(m)); }

// Zigzag distance of s from c per byte, saturated at 254-255 (beyond every edge).
inline __m512i zigzag64(__m512i s, __m512i c) {
  const __mmask64 ge = _mm512_cmpge_epu8_mask(s, c);
  const __m512i up = _mm512_subs_epu8(s, c), down = _mm512_subs_epu8(c, s);
  return _mm512_mask_blend_epi8(ge, _mm512_sub_epi8(_mm512_adds_epu8(down, down), _mm512_set1_epi8(1)),
                                _mm512_adds_epu8(up, up));
}

// Per-byte shifts by each lane's k: 16-bit shifts of the low and the high bytes.
inline __m512i shift_right(__m512i v, const View& L, int64_t at) {
  const __m512i lo8 = _mm512_set1_epi16(0x00ff);
  return _mm512_or_si512(_mm512_srlv_epi16(_mm512_and_si512(v, lo8), _mm512_loadu_si512(L.k_even + at / 2)),
                         _mm512_andnot_si512(lo8, _mm512_srlv_epi16(v, _mm512_loadu_si512(L.k_odd + at / 2))));
}

inline __m512i shift_left(__m512i v, const View& L, int64_t at) {
  const __m512i lo8 = _mm512_set1_epi16(0x00ff);
  return _mm512_or_si512(
      _mm512_and_si512(lo8, _mm512_sllv_epi16(_mm512_and_si512(v, lo8), _mm512_loadu_si512(L.k_even + at / 2))),
      _mm512_sllv_epi16(_mm512_andnot_si512(lo8, v), _mm512_loadu_si512(L.k_odd + at / 2)));
}

// Block g: its remainders into w, its quotients min(q, top) into L.row, its exceptions to xs.
void encode_block(const uint8_t* sym, const View& L, int64_t g, BitWriter& w, uint8_t* xs, int64_t& nx,
                  __m512i& maxv) {
  const int64_t at = g * kB;
  const uint64_t full = L.full[g];
  const __m512i s = _mm512_maskz_loadu_epi8(full, sym + at);
  maxv = _mm512_max_epu8(maxv, s);
  const __m512i u = zigzag64(s, _mm512_loadu_si512(L.centre + at));
  const __m512i q = shift_right(u, L, at);
  const __m512i top = _mm512_loadu_si512(L.top + at);
  const __mmask64 exc = _mm512_cmpge_epu8_mask(q, top) & full;
  _mm512_storeu_si512(L.row + at, _mm512_min_epu8(q, top));
  _mm512_storeu_si512(xs + nx, _mm512_maskz_compress_epi8(exc, s));
  nx += popcount(exc);
  const __m512i rem = _mm512_maskz_mov_epi8(~exc, _mm512_and_si512(u, _mm512_loadu_si512(L.low + at)));
  for (int l = 0; l < L.levels[g]; ++l) {
    const uint64_t bits = _mm512_test_epi8_mask(rem, _mm512_set1_epi8(static_cast<char>(1 << l)));
    const int n = L.level_bits[g * kPlanesLevels + l];
    if (n == kB) {
      w.put64(bits);
    } else {
      w.put(pext(bits, L.level[g * kPlanesLevels + l]), n);
    }
  }
}

// One quotient plane of the dense values v[0, n): bit "v > 0" each; the survivors' v - 1 go to
// out (64 bytes of room past them). Returns how many survive.
int64_t encode_plane(const uint8_t* v, int64_t n, uint8_t* out, BitWriter& w) {
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi8(1);
  int64_t m = 0;
  int64_t b = 0;
  for (; b + kB <= n; b += kB) {
    const __m512i x = _mm512_loadu_si512(v + b);
    const uint64_t more = _mm512_cmpgt_epu8_mask(x, zero);
    w.put64(more);
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi8(more, _mm512_sub_epi8(x, one)));
    m += popcount(more);
  }
  if (b < n) {
    const __m512i x = _mm512_maskz_loadu_epi8(first_lanes(n - b), v + b);
    const uint64_t more = _mm512_cmpgt_epu8_mask(x, zero);
    w.put(more, static_cast<int>(n - b));
    _mm512_storeu_si512(out + m, _mm512_maskz_compress_epi8(more, _mm512_sub_epi8(x, one)));
    m += popcount(more);
  }
  return m;
}

void decode_remainders(const View& L, int64_t g, BitStream& r) {
  __m512i v = _mm512_setzero_si512();
  for (int l = 0; l < L.levels[g]; ++l) {
    const int i = static_cast<int>(g) * kPlanesLevels + l;
    const int n = L.level_bits[i];
    const uint64_t m = n == kB ? r.read(kB) : pdep(r.read(n), L.level[i]);
    v = _mm512_mask_add_epi8(v, m, v, _mm512_set1_epi8(static_cast<char>(1 << l)));  // distinct bits: add is or
  }
  _mm512_storeu_si512(L.rem + g * kB, v);
}

// Plane of n bits at pos: out[i] = bit i ? 1 + next[rank] : 0 (next: the deeper plane's values of
// the survivors, 64 readable bytes past them).
void decode_plane(const BitReader& r, int64_t pos, int64_t n, const uint8_t* next, uint8_t* out) {
  const __m512i one = _mm512_set1_epi8(1);
  int64_t m = 0;
  BitStream bits(r, pos);
  for (int64_t b = 0; b < n; b += kB) {
    const uint64_t more = bits.read(static_cast<int>(std::min<int64_t>(kB, n - b)));
    const __m512i x = _mm512_maskz_expand_epi8(more, _mm512_loadu_si512(next + m));
    _mm512_storeu_si512(out + b, _mm512_mask_add_epi8(x, more, x, one));
    m += popcount(more);
  }
}

bool finish_block(const View& L, int64_t g, const uint8_t* xs, int64_t n_x, int64_t& xi, uint8_t* out, int count_of,
                  int64_t& count) {
  const int64_t at = g * kB;
  const uint64_t full = L.full[g];
  const __m512i q = _mm512_loadu_si512(L.row + at);
  const __m512i top = _mm512_loadu_si512(L.top + at);
  const __m512i u = _mm512_or_si512(shift_left(q, L, at), _mm512_loadu_si512(L.rem + at));
  const __m512i edge = _mm512_loadu_si512(L.edge + at);
  const __m512i c = _mm512_loadu_si512(L.centre + at);
  const __m512i one = _mm512_set1_epi8(1);
  const __mmask64 exc = _mm512_cmpeq_epu8_mask(q, top) & full;
  const __mmask64 odd = _mm512_test_epi8_mask(u, one) & ~exc & full;
  const __mmask64 even = ~odd & ~exc & full;
  const __m512i h = _mm512_and_si512(_mm512_srli_epi16(u, 1), _mm512_set1_epi8(0x7f));
  // A quotient is at most top; an exception carries no remainder (u == edge); a code names a
  // symbol of the table.
  uint64_t bad = (full & _mm512_cmpgt_epu8_mask(q, top)) | (exc & _mm512_cmpneq_epu8_mask(u, edge)) |
                 (even & _mm512_cmpge_epu8_mask(h, _mm512_loadu_si512(L.room + at))) |
                 (odd & _mm512_cmpge_epu8_mask(h, c));
  __m512i s = _mm512_mask_blend_epi8(odd, _mm512_add_epi8(c, h), _mm512_sub_epi8(_mm512_sub_epi8(c, h), one));
  if (exc) {
    const int nx = popcount(exc);
    if (xi + nx > n_x) return false;
    s = _mm512_mask_expand_epi8(s, exc, _mm512_loadu_si512(xs + xi));
    xi += nx;
    // Canonical exceptions: inside the table and at least edge away from the centre.
    bad |= exc & _mm512_cmplt_epu8_mask(zigzag64(s, c), edge);
    if (L.nsym < 256) bad |= exc & _mm512_cmpge_epu8_mask(s, _mm512_set1_epi8(static_cast<char>(L.nsym)));
  }
  if (bad) return false;
  if (count_of >= 0) count += popcount(_mm512_cmpeq_epi8_mask(s, _mm512_set1_epi8(static_cast<char>(count_of))) & full);
  _mm512_mask_storeu_epi8(out, full, s);
  return true;
}

#else  // lane by lane

inline uint64_t pext(uint64_t v, uint64_t m) {
  uint64_t out = 0;
  for (int n = 0; m; m &= m - 1, ++n) out |= ((v >> __builtin_ctzll(m)) & 1) << n;
  return out;
}

inline uint64_t pdep(uint64_t v, uint64_t m) {
  uint64_t out = 0;
  for (; m; m &= m - 1, v >>= 1) out |= (v & 1) << __builtin_ctzll(m);
  return out;
}

inline int popcount(uint64_t m) { return __builtin_popcountll(m); }

void encode_block(const uint8_t* sym, const View& L, int64_t g, BitWriter& w, uint8_t* xs, int64_t& nx, int& maxsym) {
  const int64_t at = g * kB;
  const int n = static_cast<int>(std::min<int64_t>(kB, L.d - at));
  uint64_t bits[kPlanesLevels] = {};
  for (int i = 0; i < n; ++i) {
    const int64_t ch = at + i;
    const int s = sym[ch];
    maxsym = std::max(maxsym, s);
    const int u = zigzag(s, L.centre[ch]);
    const bool exc = u >= L.edge[ch];
    if (exc) xs[nx++] = static_cast<uint8_t>(s);  // rare
    L.row[ch] = static_cast<uint8_t>(exc ? L.top[ch] : u >> L.k[ch]);
    const int rem = exc ? 0 : u & L.low[ch];
    for (int l = 0; l < L.k[ch]; ++l) bits[l] |= uint64_t((rem >> l) & 1) << i;
  }
  for (int l = 0; l < L.levels[g]; ++l) {
    const int n = L.level_bits[g * kPlanesLevels + l];
    w.put(n == kB ? bits[l] : pext(bits[l], L.level[g * kPlanesLevels + l]), n);
  }
}

int64_t encode_plane(const uint8_t* v, int64_t n, uint8_t* out, BitWriter& w) {
  int64_t m = 0;
  for (int64_t b = 0; b < n; b += kB) {
    const int cnt = static_cast<int>(std::min<int64_t>(kB, n - b));
    uint64_t more = 0;
    for (int i = 0; i < cnt; ++i) {  // branch-free: half the survivors' bits are ones
      const int x = v[b + i], alive = x != 0;
      more |= uint64_t(alive) << i;
      out[m] = static_cast<uint8_t>(x - 1);
      m += alive;
    }
    w.put(more, cnt);
  }
  return m;
}

void decode_remainders(const View& L, int64_t g, BitStream& r) {
  uint8_t* u = L.rem + g * kB;
  std::memset(u, 0, kB);
  for (int l = 0; l < L.levels[g]; ++l) {
    const int i = static_cast<int>(g) * kPlanesLevels + l;
    const int n = L.level_bits[i];
    const uint64_t m = n == kB ? r.read(kB) : pdep(r.read(n), L.level[i]);
    for (int j = 0; j < kB; ++j) u[j] |= static_cast<uint8_t>(((m >> j) & 1) << l);
  }
}

void decode_plane(const BitReader& r, int64_t pos, int64_t n, const uint8_t* next, uint8_t* out) {
  int64_t m = 0;
  BitStream bits(r, pos);
  for (int64_t b = 0; b < n; b += kB) {
    const int cnt = static_cast<int>(std::min<int64_t>(kB, n - b));
    const uint64_t more = bits.read(cnt);
    for (int i = 0; i < cnt; ++i) {
      const int bit = (more >> i) & 1;
      out[b + i] = static_cast<uint8_t>((1 + next[m]) & -bit);
      m += bit;
    }
  }
}

bool finish_block(const View& L, int64_t g, const uint8_t* xs, int64_t n_x, int64_t& xi, uint8_t* out, int count_of,
                  int64_t& count) {
  const int64_t at = g * kB;
  const int n = static_cast<int>(std::min<int64_t>(kB, L.d - at));
  for (int i = 0; i < n; ++i) {
    const int64_t ch = at + i;
    const int q = L.row[ch], top = L.top[ch], edge = L.edge[ch], c = L.centre[ch];
    if (q > top) return false;
    const int u = (q << L.k[ch]) | L.rem[ch];
    int s;
    if (q == top) {
      if (u != edge || xi >= n_x) return false;
      s = xs[xi++];
      if (s >= L.nsym || zigzag(s, c) < edge) return false;
    } else {
      s = c + ((u >> 1) ^ -(u & 1));  // c + u / 2 (u even) or c - (u + 1) / 2 (odd), branch-free
      if (s < 0 || s >= L.nsym) return false;
    }
    count += s == count_of;
    out[i] = static_cast<uint8_t>(s);
  }
  return true;
}

#endif

void encode_row(const uint8_t* sym, PlanesLayout& layout, BitWriter& writer, uint8_t* xs, int64_t& n_x,
                int& maxsym) {
  const View L = view_of(layout);
  BitWriter w = writer;
  int64_t nx = n_x;
#ifdef SK_PLANES_VECTOR
  __m512i maxv = _mm512_setzero_si512();
  for (int64_t g = 0; g < L.blocks; ++g) encode_block(sym, L, g, w, xs, nx, maxv);
  alignas(64) uint8_t lanes[kB];
  _mm512_store_si512(lanes, maxv);
  maxsym = std::max<int>(maxsym, *std::max_element(lanes, lanes + kB));
#else
  for (int64_t g = 0; g < L.blocks; ++g) encode_block(sym, L, g, w, xs, nx, maxsym);
#endif
  // Quotient planes: plane j holds "q > j" of the channels with q >= j, in channel order.
  const uint8_t* v = L.row;
  int64_t n = L.d;
  for (int j = 0; n; ++j) {
    uint8_t* next = j % 2 ? L.dense1 : L.dense0;
    n = encode_plane(v, n, next, w);
    v = next;
  }
  writer = w;
  n_x = nx;
}

bool decode_row(PlanesLayout& layout, BitReader& reader, const uint8_t* xs, int64_t n_x, int64_t& xi, uint8_t* out,
                int count_of, int64_t& count) {
  const View L = view_of(layout);
  BitReader r = reader;
  BitStream bits(r, r.pos);
  for (int64_t g = 0; g < L.blocks; ++g) decode_remainders(L, g, bits);
  // Plane sizes: plane j + 1 has as many bits as plane j has ones; after top <= 16 ones a zero.
  int64_t pos[kPlanesMaxPlanes], size[kPlanesMaxPlanes];
  int planes = 0;
  for (int64_t n = L.d; n;) {
    if (planes == kPlanesMaxPlanes || bits.pos() > 8 * r.nbytes) return false;
    pos[planes] = bits.pos();
    size[planes++] = n;
    int64_t ones = 0;
    for (int64_t b = 0; b < n; b += kB) ones += popcount(bits.read(static_cast<int>(std::min<int64_t>(kB, n - b))));
    n = ones;
  }
  r.pos = bits.pos();
  reader = r;
  if (r.pos > 8 * r.nbytes) return false;  // read past the bits: truncated
  // Quotients from the deepest plane (all zeros) up; plane 0's land in L.row.
  for (int j = planes - 1; j >= 0; --j) {
    uint8_t* dst = j == 0 ? L.row : (j % 2 ? L.dense1 : L.dense0);
    decode_plane(r, pos[j], size[j], j % 2 ? L.dense0 : L.dense1, dst);
  }
  int64_t x = xi, c = 0;
  for (int64_t g = 0; g < L.blocks; ++g)
    if (!finish_block(L, g, xs, n_x, x, out + g * kB, count_of, c)) return false;
  xi = x;
  count += c;
  return true;
}

const PlanesRowKernels kKernels{encode_row, decode_row};

}  // namespace

const PlanesRowKernels& planes_row_kernels() { return kKernels; }

}  // namespace SK_ISA_NS
}  // namespace sk
