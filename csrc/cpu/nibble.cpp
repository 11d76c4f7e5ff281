#include "cpu/nibble.h"

#include <cstring>

#include "cpu/le_bytes.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SK_NIB_X86 1
#endif

namespace sk {
namespace {

// Per-call parameters of the row kernels.
struct Params {
  int nsym;
  int a;
  int count_of;  // -1: none
};

// Distance of exception x from the window (x outside [a, a + 15)), as a level-2 nibble (15: long).
inline int level2_of(int x, int a) {
  const int e = x >= a + kNibbleWindow ? 2 * (x - a - kNibbleWindow) : 2 * (a - 1 - x) + 1;
  return e < 15 ? e : 15;
}

// ---------------------------------------------------------------------------------------- scalar

// One row: level-1 nibbles into l1, exception symbols appended at xs[nx]; the row's largest symbol
// raises maxsym.
void encode_row_scalar(const uint8_t* s, int64_t d, const Params& p, uint8_t* l1, uint8_t* xs, int64_t& nx,
                       int& maxsym) {
  int lo = 0;
  for (int64_t c = 0; c < d; ++c) {
    const int v = s[c];
    maxsym = v > maxsym ? v : maxsym;
    const int t = v - p.a;
    int nib = 15;
    if (t >= 0 && t < kNibbleWindow) {
      nib = t;
    } else {
      xs[nx++] = static_cast<uint8_t>(v);
    }
    if (c & 1) {
      l1[c >> 1] = static_cast<uint8_t>(lo | nib << 4);
    } else {
      lo = nib;
    }
  }
  if (d & 1) l1[d >> 1] = static_cast<uint8_t>(lo);
}

// Level 2 and 3 of exceptions [i0, n): nibble i goes into l2 (index i), long ones append at l3[nl].
void encode_level2_scalar(const uint8_t* xs, int64_t i0, int64_t n, int a, uint8_t* l2, uint8_t* l3, int64_t& nl) {
  for (int64_t i = i0; i < n; ++i) {
    const int nib = level2_of(xs[i], a);
    if (nib == 15) l3[nl++] = xs[i];
    if (i & 1) {
      l2[i >> 1] = static_cast<uint8_t>(l2[i >> 1] | nib << 4);
    } else {
      l2[i >> 1] = static_cast<uint8_t>(nib);
    }
  }
}

// Exceptions [i0, n) from level 2 (and level 3 from l3[nl]) into xs. False when a short distance
// names a symbol outside the table or level 3 runs out.
bool decode_level2_scalar(const uint8_t* l2, int64_t i0, int64_t n, const uint8_t* l3, int64_t n_xx, int64_t& nl,
                          const Params& p, uint8_t* xs) {
  for (int64_t i = i0; i < n; ++i) {
    const int e = (l2[i >> 1] >> (4 * (i & 1))) & 15;
    int x;
    if (e == 15) {
      if (nl >= n_xx) return false;
      x = l3[nl++];
    } else {
      const int h = e >> 1;
      x = (e & 1) ? p.a - 1 - h : p.a + kNibbleWindow + h;
      if (x < 0 || x >= p.nsym) return false;
    }
    xs[i] = static_cast<uint8_t>(x);
  }
  return true;
}

// One row from level 1 and the exception symbols at xs[xi] (n_x of them in all). False when the
// exceptions run out, a symbol is outside the table or the padding nibble is not 0.
bool decode_row_scalar(const uint8_t* l1, int64_t d, const Params& p, const uint8_t* xs, int64_t n_x, int64_t& xi,
                       uint8_t* out, int64_t& count) {
  for (int64_t c = 0; c < d; ++c) {
    const int nib = (l1[c >> 1] >> (4 * (c & 1))) & 15;
    int v;
    if (nib == 15) {
      if (xi >= n_x) return false;
      v = xs[xi++];
    } else {
      v = p.a + nib;
      if (v >= p.nsym) return false;
    }
    count += v == p.count_of;
    out[c] = static_cast<uint8_t>(v);
  }
  return !(d & 1) || (l1[d >> 1] >> 4) == 0;
}

// --------------------------------------------------------------------------- AVX-512 BW + VBMI2
#ifdef SK_NIB_X86
#define SK_NIB_TARGET __attribute__((target("avx512f,avx512bw,avx512vbmi2")))

// 64 nibbles (u8 < 16 each) -> 32 bytes, the earlier of each pair in the low half. The asm keeps
// vpmovwb in its register form: with a memory operand it is microcoded and slow on AMD Zen 4.
SK_NIB_TARGET inline __m256i pack64(__m512i nib) {
  __m256i r = _mm512_cvtepi16_epi8(_mm512_or_si512(nib, _mm512_srli_epi16(nib, 4)));
  asm("" : "+v"(r));
  return r;
}

// 32 bytes -> their 64 nibbles in stream order.
SK_NIB_TARGET inline __m512i unpack64(const uint8_t* p) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(0x000f)),
                         _mm512_and_si512(_mm512_slli_epi16(w, 4), _mm512_set1_epi16(0x0f00)));
}

SK_NIB_TARGET void encode_row_avx512(const uint8_t* s, int64_t d, const Params& p, uint8_t* l1, uint8_t* xs,
                                     int64_t& nx, int& maxsym) {
  const __m512i a = _mm512_set1_epi8(static_cast<char>(p.a));
  const __m512i f15 = _mm512_set1_epi8(15);
  __m512i mx = _mm512_setzero_si512();
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    const __m512i v = _mm512_loadu_si512(s + c);
    mx = _mm512_max_epu8(mx, v);
    const __m512i nib = _mm512_min_epu8(_mm512_sub_epi8(v, a), f15);  // wraps below a: 15
    const __mmask64 k = _mm512_cmpeq_epi8_mask(nib, f15);
    _mm512_storeu_si512(xs + nx, _mm512_maskz_compress_epi8(k, v));
    nx += _mm_popcnt_u64(k);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(l1 + c / 2), pack64(nib));
  }
  alignas(64) uint8_t m[64];
  _mm512_store_si512(m, mx);
  for (int i = 0; i < 64; ++i) maxsym = m[i] > maxsym ? m[i] : maxsym;
  if (c < d) encode_row_scalar(s + c, d - c, p, l1 + c / 2, xs, nx, maxsym);
}

SK_NIB_TARGET void encode_level2_avx512(const uint8_t* xs, int64_t n, int a, uint8_t* l2, uint8_t* l3, int64_t& nl) {
  const int above_from = a + kNibbleWindow;  // may be 256: nothing above
  const __m512i f15 = _mm512_set1_epi8(15);
  const __m512i one = _mm512_set1_epi8(1);
  const __m512i hi0 = _mm512_set1_epi8(static_cast<char>(above_from > 255 ? 255 : above_from));
  const __m512i lo0 = _mm512_set1_epi8(static_cast<char>(a - 1));  // a = 0: nothing below, unused
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i x = _mm512_loadu_si512(xs + i);
    const __mmask64 above = above_from > 255 ? 0 : _mm512_cmpge_epu8_mask(x, hi0);
    const __m512i hi = _mm512_subs_epu8(x, hi0);
    const __m512i lo = _mm512_subs_epu8(lo0, x);
    const __m512i e = _mm512_mask_blend_epi8(above, _mm512_adds_epu8(_mm512_adds_epu8(lo, lo), one),
                                             _mm512_adds_epu8(hi, hi));
    const __m512i nib = _mm512_min_epu8(e, f15);
    const __mmask64 k = _mm512_cmpeq_epi8_mask(nib, f15);
    _mm512_storeu_si512(l3 + nl, _mm512_maskz_compress_epi8(k, x));
    nl += _mm_popcnt_u64(k);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(l2 + i / 2), pack64(nib));
  }
  encode_level2_scalar(xs, i, n, a, l2, l3, nl);
}

SK_NIB_TARGET bool decode_level2_avx512(const uint8_t* l2, int64_t n, const uint8_t* l3, int64_t n_xx, int64_t& nl,
                                        const Params& p, uint8_t* xs) {
  const __m512i f15 = _mm512_set1_epi8(15);
  const __m512i one = _mm512_set1_epi8(1);
  const __m512i low7 = _mm512_set1_epi8(0x7f);
  const __m512i above0 = _mm512_set1_epi8(static_cast<char>(p.a + kNibbleWindow));  // used where < nsym <= 256
  const __m512i below0 = _mm512_set1_epi8(static_cast<char>(p.a - 1));
  const __m512i above_room = _mm512_set1_epi8(static_cast<char>(p.nsym - p.a - kNibbleWindow));  // >= 0
  const __m512i below_room = _mm512_set1_epi8(static_cast<char>(p.a));
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const __m512i e = unpack64(l2 + i / 2);
    const __mmask64 lng = _mm512_cmpeq_epi8_mask(e, f15);
    const __mmask64 odd = _mm512_test_epi8_mask(e, one);
    const __m512i h = _mm512_and_si512(_mm512_srli_epi16(e, 1), low7);
    // A short distance must name a symbol of the table: a + 15 + h < nsym above, h < a below.
    const __mmask64 bad = (~lng & ~odd & _mm512_cmpge_epu8_mask(h, above_room)) |
                          (~lng & odd & _mm512_cmpge_epu8_mask(h, below_room));
    const int64_t nk = _mm_popcnt_u64(lng);
    if (bad || nl + nk > n_xx) return false;
    __m512i x = _mm512_mask_blend_epi8(odd, _mm512_add_epi8(above0, h), _mm512_sub_epi8(below0, h));
    x = _mm512_mask_expand_epi8(x, lng, _mm512_loadu_si512(l3 + nl));
    nl += nk;
    _mm512_storeu_si512(xs + i, x);
  }
  return decode_level2_scalar(l2, i, n, l3, n_xx, nl, p, xs);
}

SK_NIB_TARGET bool decode_row_avx512(const uint8_t* l1, int64_t d, const Params& p, const uint8_t* xs, int64_t n_x,
                                     int64_t& xi, uint8_t* out, int64_t& count) {
  const __m512i a = _mm512_set1_epi8(static_cast<char>(p.a));
  const __m512i f15 = _mm512_set1_epi8(15);
  const __m512i nsym = _mm512_set1_epi8(static_cast<char>(p.nsym > 255 ? 255 : p.nsym));
  const __m512i target = _mm512_set1_epi8(static_cast<char>(p.count_of));
  const bool small = p.nsym < kNibbleWindow;  // only then can a window nibble lie outside the table
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    const __m512i nib = unpack64(l1 + c / 2);
    const __mmask64 k = _mm512_cmpeq_epi8_mask(nib, f15);
    const int64_t nk = _mm_popcnt_u64(k);
    if (xi + nk > n_x) return false;
    __m512i v = _mm512_add_epi8(nib, a);
    if (small && (~k & _mm512_cmpge_epu8_mask(v, nsym))) return false;
    v = _mm512_mask_expand_epi8(v, k, _mm512_loadu_si512(xs + xi));
    xi += nk;
    if (p.count_of >= 0) count += _mm_popcnt_u64(_mm512_cmpeq_epi8_mask(v, target));
    _mm512_storeu_si512(out + c, v);
  }
  return c == d || decode_row_scalar(l1 + c / 2, d - c, p, xs, n_x, xi, out + c, count);
}

bool cpu_has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi2");
}
#else
bool cpu_has_avx512() { return false; }
#endif

void encode_level2_scalar_all(const uint8_t* xs, int64_t n, int a, uint8_t* l2, uint8_t* l3, int64_t& nl) {
  encode_level2_scalar(xs, 0, n, a, l2, l3, nl);
}

bool decode_level2_scalar_all(const uint8_t* l2, int64_t n, const uint8_t* l3, int64_t n_xx, int64_t& nl,
                              const Params& p, uint8_t* xs) {
  return decode_level2_scalar(l2, 0, n, l3, n_xx, nl, p, xs);
}

}  // namespace

struct NibbleIsa {
  const char* name;
  void (*encode_row)(const uint8_t*, int64_t, const Params&, uint8_t*, uint8_t*, int64_t&, int&);
  void (*encode_level2)(const uint8_t*, int64_t, int, uint8_t*, uint8_t*, int64_t&);
  bool (*decode_level2)(const uint8_t*, int64_t, const uint8_t*, int64_t, int64_t&, const Params&, uint8_t*);
  bool (*decode_row)(const uint8_t*, int64_t, const Params&, const uint8_t*, int64_t, int64_t&, uint8_t*, int64_t&);
};

namespace {


const NibbleIsa kScalar{"scalar", encode_row_scalar, encode_level2_scalar_all, decode_level2_scalar_all, decode_row_scalar};
#ifdef SK_NIB_X86
const NibbleIsa kAvx512{"avx512", encode_row_avx512, encode_level2_avx512, decode_level2_avx512, decode_row_avx512};
#endif

const NibbleIsa* best_isa() {
#ifdef SK_NIB_X86
  if (cpu_has_avx512()) return &kAvx512;
#endif
  return &kScalar;
}

const NibbleIsa* g_isa = best_isa();

bool valid_table(int nsym, int a) {
  const int a_max = nsym > kNibbleWindow ? nsym - kNibbleWindow : 0;
  return nsym >= 2 && nsym <= 256 && a >= 0 && a <= a_max;
}

}  // namespace

std::string NibbleWriter::open(int64_t max_rows, int64_t d, int nsym, int a, uint8_t* out, int64_t capacity) {
  if (max_rows < 0 || d < 1 || !valid_table(nsym, a)) return "nibble encode: T, d or the table are out of range";
  if (capacity < nibble_capacity(max_rows, d) + kNibbleSlack) return "nibble encode: output buffer too small";
  isa_ = g_isa;
  d_ = d;
  nsym_ = nsym;
  a_ = a;
  out_ = out;
  l1_ = out + kNibbleHead;
  xs_ = row_scratch(max_rows * d);
  nx_ = 0;
  maxsym_ = 0;
  return "";
}

void NibbleWriter::row(const uint8_t* sym) {
  const Params p{nsym_, a_, -1};
  isa_->encode_row(sym, d_, p, l1_, xs_, nx_, maxsym_);
  l1_ += nibble_row_bytes(d_);
}

int64_t NibbleWriter::close() {
  if (maxsym_ >= nsym_) return -1;
  int64_t nl = 0;
  isa_->encode_level2(xs_, nx_, a_, l1_, l1_ + (nx_ + 1) / 2, nl);
  store_u32(out_, static_cast<uint32_t>(nx_));
  store_u32(out_ + 4, static_cast<uint32_t>(nl));
  return (l1_ - out_) + (nx_ + 1) / 2 + nl;
}

std::string NibbleReader::open(const uint8_t* data, int64_t len, int64_t rows, int64_t d, int nsym, int a,
                               int count_of) {
  if (rows < 0 || d < 1 || !valid_table(nsym, a)) return "nibble decode: T, d or the table are out of range";
  if (len < kNibbleHead) return "nibble stream shorter than its 8-byte head";
  const int64_t rb = nibble_row_bytes(d);
  if (rows > (len - kNibbleHead) / rb) return "nibble stream too short for its rows";
  const int64_t n_x = load_u32(data), n_xx = load_u32(data + 4);
  if (n_x > rows * d || n_xx > n_x || len != kNibbleHead + rows * rb + (n_x + 1) / 2 + n_xx)
    return "nibble stream length does not match its rows and exception counts";
  isa_ = g_isa;
  d_ = d;
  nsym_ = nsym;
  a_ = a;
  count_of_ = count_of >= 0 && count_of < 256 ? count_of : -1;
  l1_ = data + kNibbleHead;
  const uint8_t* l2 = l1_ + rows * rb;
  // Exceptions, then a copy of level 3: whole-vector loads may read 64 bytes past either.
  uint8_t* xs = row_scratch(n_x + 64 + n_xx);
  uint8_t* l3 = xs + n_x + 64;
  std::memcpy(l3, l2 + (n_x + 1) / 2, n_xx);
  for (int64_t i = 0; i < n_xx; ++i) {  // canonical long exceptions: distance >= 15, inside the table
    if (l3[i] >= nsym || level2_of(l3[i], a) != 15) return "nibble stream: a long exception is not canonical";
  }
  if ((n_x & 1) && (l2[n_x >> 1] >> 4)) return "nibble stream: level-2 padding nibble is not 0";
  int64_t nl = 0;
  if (!isa_->decode_level2(l2, n_x, l3, n_xx, nl, Params{nsym, a, -1}, xs) || nl != n_xx)
    return "nibble stream: level 2 names a symbol outside the table or disagrees with its long count";
  xs_ = xs;
  n_x_ = n_x;
  xi_ = 0;
  count_ = 0;
  return "";
}

bool NibbleReader::row(uint8_t* out) {
  if (!isa_->decode_row(l1_, d_, Params{nsym_, a_, count_of_}, xs_, n_x_, xi_, out, count_)) return false;
  l1_ += nibble_row_bytes(d_);
  return true;
}

std::string NibbleReader::close(int64_t* count) {
  if (xi_ != n_x_) return "nibble stream: level 1 holds fewer exceptions than its head says";
  if (count && count_of_ >= 0) *count = count_;
  return "";
}

const char* const kNibbleRowError =
    "nibble stream: level 1 disagrees with its exception count, names a symbol outside the table or has a padding "
    "nibble set";

int64_t nibble_encode(const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw, int nsym, int a, uint8_t* out,
                      int64_t capacity) {
  NibbleWriter w;
  if (T < 0 || !w.open(coded_rows(T, raw), d, nsym, a, out, capacity).empty()) return -1;
  write_rows(w, sym, T, d, raw);
  return w.close();
}

std::string nibble_decode(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw, int nsym, int a,
                          uint8_t* out, int count_of, int64_t* count) {
  if (T < 0) return "nibble decode: T must be >= 0";
  NibbleReader r;
  std::string err = r.open(data, len, coded_rows(T, raw), d, nsym, a, count_of);
  if (!err.empty()) return err;
  return read_rows(r, T, d, raw, out) ? r.close(count) : kNibbleRowError;
}

std::vector<std::string> nibble_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

std::string nibble_isa() { return g_isa->name; }

std::string set_nibble_isa(const std::string& name) {
  if (name == "scalar") {
    g_isa = &kScalar;
    return "";
  }
#ifdef SK_NIB_X86
  if (name == "avx512" && cpu_has_avx512()) {
    g_isa = &kAvx512;
    return "";
  }
#endif
  return "nibble isa must be one of the supported ones (see nibble_isas()), got '" + name + "'";
}

}  // namespace sk
