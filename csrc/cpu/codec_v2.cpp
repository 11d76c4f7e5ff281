#include "cpu/codec_v2.h"

#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SK_V2_X86 1
#endif

#include "common/half.h"
#include "cpu/nibble.h"
#include "cpu/planes.h"
#include "cpu/slots.h"

namespace sk {
namespace {

// ---------------------------------------------------------------------------------------- scalar

// One value of the quantiser (FORMATS 5.2); returns true when it escapes.
inline bool quantise_one(float xf, float center, float inv, float k, uint8_t& s, uint8_t esc_sym) {
  const float v = (xf - center) * inv;  // -ffp-contract=off: two roundings
  if (!(std::fabs(v) <= k)) {
    s = esc_sym;
    return true;
  }
  s = static_cast<uint8_t>(std::nearbyint(v) + k);  // ties to even (default rounding mode)
  return false;
}

// Symbols of values [c0, d) of one row; escaped values' bytes appended to ebuf. Returns escapes.
int64_t quantise_tail(const uint8_t* xr, int dtype, int64_t c0, int64_t d, const float* center, const float* inv,
                      int kmax, uint8_t* s, uint8_t* ebuf, int64_t& nonfinite) {
  const int item = dtype_size(dtype);
  const float k = static_cast<float>(kmax);
  const uint8_t esc_sym = static_cast<uint8_t>(2 * kmax + 1);
  int64_t count = 0;
  for (int64_t c = c0; c < d; ++c) {
    const float xf = load_as_float(xr, dtype, c);
    nonfinite += !(std::fabs(xf) <= FLT_MAX);
    if (quantise_one(xf, center[c], inv[c], k, s[c], esc_sym)) {
      std::memcpy(ebuf + count * item, xr + c * item, item);
      ++count;
    }
  }
  return count;
}

int64_t quantise_row_scalar(const uint8_t* xr, int dtype, int64_t d, const float* center, const float* inv, int kmax,
                            uint8_t* s, uint8_t* ebuf, int64_t& nonfinite) {
  return quantise_tail(xr, dtype, 0, d, center, inv, kmax, s, ebuf, nonfinite);
}

inline float dequantise_one(uint8_t s, int kmax, float step, float center) {
  const float prod = static_cast<float>(static_cast<int>(s) - kmax) * step;
  return prod + center;  // two roundings, no FMA
}

// Values [c0, d) of one row; escapes take the next exact value. False when escapes run out.
bool dequantise_tail(const uint8_t* s, int64_t c0, int64_t d, const float* step, const float* center, int kmax,
                     int dtype, uint8_t* out, const uint8_t* escapes, int64_t n_escapes, int64_t& used) {
  const int item = dtype_size(dtype);
  const uint8_t esc_sym = static_cast<uint8_t>(2 * kmax + 1);
  for (int64_t c = c0; c < d; ++c) {
    if (n_escapes >= 0 && s[c] == esc_sym) {
      if (used >= n_escapes) return false;
      std::memcpy(out + c * item, escapes + used * item, item);
      ++used;
    } else {
      store_from_float(out, dtype, c, dequantise_one(s[c], kmax, step[c], center[c]));
    }
  }
  return true;
}

bool dequantise_row_scalar(const uint8_t* s, int64_t d, const float* step, const float* center, int kmax, int dtype,
                           uint8_t* out, const uint8_t* escapes, int64_t n_escapes, int64_t& used) {
  return dequantise_tail(s, 0, d, step, center, kmax, dtype, out, escapes, n_escapes, used);
}

// ------------------------------------------------------------------------------------ AVX2 + F16C
#ifdef SK_V2_X86

template <int kDtype>
__attribute__((target("avx2,f16c"))) inline __m256 load8(const uint8_t* xr, int64_t c) {
  if (kDtype == kFloat32) return _mm256_loadu_ps(reinterpret_cast<const float*>(xr) + c);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xr + 2 * c));
  if (kDtype == kFloat16) return _mm256_cvtph_ps(h);  // exact, subnormals included
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// As the AVX-512 pass: a non-finite input always escapes (v is NaN or infinite), so finiteness is
// checked on the escaped values only, and the lanes that escape need no clamping before the
// conversion (whatever it gives them is replaced by the escape symbol); one instantiation per dtype.
template <int kDtype>
__attribute__((target("avx2,f16c"))) int64_t quantise_row_avx2_t(const uint8_t* xr, int64_t d, const float* center,
                                                                   const float* inv, int kmax, uint8_t* s,
                                                                   uint8_t* ebuf, int64_t& nonfinite) {
  constexpr int item = kDtype == kFloat32 ? 4 : 2;
  const __m256 k = _mm256_set1_ps(static_cast<float>(kmax));
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i kv = _mm256_set1_epi32(kmax);
  const __m256i esc = _mm256_set1_epi32(2 * kmax + 1);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t count = 0;
  int64_t c = 0;
  for (; c + 32 <= d; c += 32) {
    __m256i q[4];
    uint32_t escbits = 0;
    for (int j = 0; j < 4; ++j) {
      const int64_t at = c + 8 * j;
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(load8<kDtype>(xr, at), _mm256_loadu_ps(center + at)),
                                     _mm256_loadu_ps(inv + at));
      const __m256 ok = _mm256_cmp_ps(_mm256_and_ps(v, absmask), k, _CMP_LE_OQ);  // false for NaN: escape
      const __m256i r = _mm256_cvttps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      q[j] = _mm256_blendv_epi8(esc, _mm256_add_epi32(r, kv), _mm256_castps_si256(ok));
      escbits |= static_cast<uint32_t>(~_mm256_movemask_ps(ok) & 0xff) << (8 * j);
    }
    // 4 x 8 int32 codes (0..255) -> 32 bytes in order: saturating packs, then undo their lane interleave.
    const __m256i bytes = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(s + c), _mm256_permutevar8x32_epi32(bytes, order));
    while (escbits) {
      const int i = __builtin_ctz(escbits);
      escbits &= escbits - 1;
      nonfinite += !(std::fabs(load_as_float(xr, kDtype, c + i)) <= FLT_MAX);
      std::memcpy(ebuf + count * item, xr + (c + i) * item, item);
      ++count;
    }
  }
  return count + quantise_tail(xr, kDtype, c, d, center, inv, kmax, s, ebuf + count * item, nonfinite);
}

__attribute__((target("avx2,f16c"))) int64_t quantise_row_avx2(const uint8_t* xr, int dtype, int64_t d,
                                                                 const float* center, const float* inv, int kmax,
                                                                 uint8_t* s, uint8_t* ebuf, int64_t& nonfinite) {
  if (dtype == kFloat16) return quantise_row_avx2_t<kFloat16>(xr, d, center, inv, kmax, s, ebuf, nonfinite);
  if (dtype == kBFloat16) return quantise_row_avx2_t<kBFloat16>(xr, d, center, inv, kmax, s, ebuf, nonfinite);
  return quantise_row_avx2_t<kFloat32>(xr, d, center, inv, kmax, s, ebuf, nonfinite);
}

__attribute__((target("avx2,f16c"))) bool dequantise_row_avx2(const uint8_t* s, int64_t d, const float* step,
                                                                const float* center, int kmax, int dtype, uint8_t* out,
                                                                const uint8_t* escapes, int64_t n_escapes,
                                                                int64_t& used) {
  const int item = dtype_size(dtype);
  const __m256i kv = _mm256_set1_epi32(kmax);
  const __m256i esc = _mm256_set1_epi8(static_cast<char>(2 * kmax + 1));
  const __m256i half_even = _mm256_set1_epi32(0x7fff);
  const __m256i one = _mm256_set1_epi32(1);
  int64_t c = 0;
  for (; c + 32 <= d; c += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + c));
    uint32_t escbits = n_escapes >= 0 ? static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, esc))) : 0;
    for (int j = 0; j < 4; ++j) {
      const int64_t at = c + 8 * j;
      const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + at)));
      const __m256 qf = _mm256_cvtepi32_ps(_mm256_sub_epi32(w, kv));
      const __m256 y = _mm256_add_ps(_mm256_mul_ps(qf, _mm256_loadu_ps(step + at)), _mm256_loadu_ps(center + at));
      if (dtype == kFloat32) {
        _mm256_storeu_ps(reinterpret_cast<float*>(out) + at, y);
      } else if (dtype == kFloat16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * at),
                         _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {  // bf16, round to nearest even (y is finite)
        __m256i u = _mm256_castps_si256(y);
        u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(half_even, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0x08);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * at), _mm256_castsi256_si128(packed));
      }
    }
    while (escbits) {
      const int i = __builtin_ctz(escbits);
      escbits &= escbits - 1;
      if (used >= n_escapes) return false;
      std::memcpy(out + (c + i) * item, escapes + used * item, item);
      ++used;
    }
  }
  return dequantise_tail(s, c, d, step, center, kmax, dtype, out, escapes, n_escapes, used);
}

bool cpu_has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }

// --------------------------------------------------------------------------------- AVX-512 (F + BW)
#define SK_V2_AVX512 __attribute__((target("avx512f,avx512bw,avx2,f16c")))

// The narrowing conversions (vcvtps2ph, vpmov*) with a memory operand are microcoded and slow on
// some cores (AMD Zen 4); keeping the result in a register first makes the compiler emit the
// register form and a plain store.
template <typename V>
SK_V2_AVX512 inline V in_register(V v) {
  asm("" : "+v"(v));
  return v;
}

template <int kDtype>
SK_V2_AVX512 inline __m512 load16(const uint8_t* xr, int64_t c) {
  if (kDtype == kFloat32) return _mm512_loadu_ps(reinterpret_cast<const float*>(xr) + c);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 2 * c));
  if (kDtype == kFloat16) return _mm512_cvtph_ps(h);  // exact, subnormals included
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Fewer operations than the AVX2 pass: a non-finite input always escapes (v is NaN or infinite),
// so finiteness is checked on the escaped values only; and rint + convert is one conversion with
// embedded round-to-nearest-even, exact for every |v| <= kmax (other lanes are replaced by the
// escape symbol). One instantiation per dtype keeps the dtype test out of the loop, and 64 codes
// leave through two saturating packs and one dword permute, fewer operations than four narrowing
// moves.
template <int kDtype>
SK_V2_AVX512 int64_t quantise_row_avx512_t(const uint8_t* xr, int64_t d, const float* center, const float* inv,
                                           int kmax, uint8_t* s, uint8_t* ebuf, int64_t& nonfinite) {
  constexpr int item = kDtype == kFloat32 ? 4 : 2;
  const __m512 k = _mm512_set1_ps(static_cast<float>(kmax));
  const __m512i kv = _mm512_set1_epi32(kmax);
  const __m512i esc = _mm512_set1_epi32(2 * kmax + 1);
  // After the packs, dword 4 L + j holds 128-bit lane L of q[j]: back to q[0], q[1], q[2], q[3].
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  int64_t count = 0;
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    __m512i q[4];
    __mmask16 ok[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t at = c + 16 * j;
      const __m512 v = _mm512_mul_ps(_mm512_sub_ps(load16<kDtype>(xr, at), _mm512_loadu_ps(center + at)),
                                     _mm512_loadu_ps(inv + at));
      ok[j] = _mm512_cmp_ps_mask(_mm512_abs_ps(v), k, _CMP_LE_OQ);  // false for NaN: escape
      const __m512i r = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[j] = _mm512_mask_blend_epi32(ok[j], esc, _mm512_add_epi32(r, kv));
    }
    const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(q[0], q[1]), _mm512_packus_epi32(q[2], q[3]));
    _mm512_storeu_si512(s + c, _mm512_permutexvar_epi32(order, bytes));
    uint64_t escbits = ~_cvtmask64_u64(_mm512_kunpackd(_mm512_kunpackw(ok[3], ok[2]), _mm512_kunpackw(ok[1], ok[0])));
    while (escbits) {
      const int i = __builtin_ctzll(escbits);
      escbits &= escbits - 1;
      nonfinite += !(std::fabs(load_as_float(xr, kDtype, c + i)) <= FLT_MAX);
      std::memcpy(ebuf + count * item, xr + (c + i) * item, item);
      ++count;
    }
  }
  return count + quantise_tail(xr, kDtype, c, d, center, inv, kmax, s, ebuf + count * item, nonfinite);
}

SK_V2_AVX512 int64_t quantise_row_avx512(const uint8_t* xr, int dtype, int64_t d, const float* center,
                                         const float* inv, int kmax, uint8_t* s, uint8_t* ebuf, int64_t& nonfinite) {
  if (dtype == kFloat16) return quantise_row_avx512_t<kFloat16>(xr, d, center, inv, kmax, s, ebuf, nonfinite);
  if (dtype == kBFloat16) return quantise_row_avx512_t<kBFloat16>(xr, d, center, inv, kmax, s, ebuf, nonfinite);
  return quantise_row_avx512_t<kFloat32>(xr, d, center, inv, kmax, s, ebuf, nonfinite);
}

SK_V2_AVX512 bool dequantise_row_avx512(const uint8_t* s, int64_t d, const float* step, const float* center, int kmax,
                                        int dtype, uint8_t* out, const uint8_t* escapes, int64_t n_escapes,
                                        int64_t& used) {
  const int item = dtype_size(dtype);
  const __m512i kv = _mm512_set1_epi32(kmax);
  const __m512i esc = _mm512_set1_epi8(static_cast<char>(2 * kmax + 1));
  const __m512i half_even = _mm512_set1_epi32(0x7fff);
  const __m512i one = _mm512_set1_epi32(1);
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) {
    uint64_t escbits = n_escapes >= 0 ? _mm512_cmpeq_epi8_mask(_mm512_loadu_si512(s + c), esc) : 0;
    for (int j = 0; j < 4; ++j) {
      const int64_t at = c + 16 * j;
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + at)));
      const __m512 qf = _mm512_cvtepi32_ps(_mm512_sub_epi32(w, kv));
      const __m512 y = _mm512_add_ps(_mm512_mul_ps(qf, _mm512_loadu_ps(step + at)), _mm512_loadu_ps(center + at));
      if (dtype == kFloat32) {
        _mm512_storeu_ps(reinterpret_cast<float*>(out) + at, y);
      } else if (dtype == kFloat16) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * at),
                            in_register(_mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
      } else {  // bf16, round to nearest even (y is finite)
        const __m512i u = _mm512_castps_si512(y);
        const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(half_even, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * at),
                            in_register(_mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16))));
      }
    }
    while (escbits) {
      const int i = __builtin_ctzll(escbits);
      escbits &= escbits - 1;
      if (used >= n_escapes) return false;
      std::memcpy(out + (c + i) * item, escapes + used * item, item);
      ++used;
    }
  }
  return dequantise_tail(s, c, d, step, center, kmax, dtype, out, escapes, n_escapes, used);
}

bool cpu_has_avx512() {
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
#else
bool cpu_has_avx2() { return false; }
bool cpu_has_avx512() { return false; }
#endif

using QuantiseRow = int64_t (*)(const uint8_t*, int, int64_t, const float*, const float*, int, uint8_t*, uint8_t*,
                                int64_t&);
using DequantiseRow = bool (*)(const uint8_t*, int64_t, const float*, const float*, int, int, uint8_t*, const uint8_t*,
                               int64_t, int64_t&);

struct Isa {
  const char* name;
  QuantiseRow quantise;
  DequantiseRow dequantise;
};

const Isa kScalar{"scalar", quantise_row_scalar, dequantise_row_scalar};
#ifdef SK_V2_X86
const Isa kAvx2{"avx2", quantise_row_avx2, dequantise_row_avx2};
const Isa kAvx512{"avx512", quantise_row_avx512, dequantise_row_avx512};
#endif

const Isa* best_isa() {
#ifdef SK_V2_X86
  if (cpu_has_avx512()) return &kAvx512;
  if (cpu_has_avx2()) return &kAvx2;
#endif
  return &kScalar;
}

const Isa* g_isa = best_isa();

std::string check_dtype(int dtype, const char* who) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) return std::string(who) + ": unknown dtype";
  return "";
}

}  // namespace

namespace {

// The quantise pass of v2_quantise. Each row's symbols go to sym (when not null) and, for a coded
// row, to the row coder (when not null) while the row is still in L1.
std::string quantise_rows(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                          int kmax, int64_t raw_limit, uint8_t* sym, RowWriter* writer, int32_t* n_esc,
                          uint8_t* raw, void* escapes, int64_t* totals, int64_t row_step = 1) {
  std::string err = check_dtype(dtype, "v2_quantise");
  if (!err.empty()) return err;
  if (kmax < 1 || kmax > 127) return "v2_quantise: kmax must be in [1, 127]";
  if (T < 0 || d < 1) return "v2_quantise: need T >= 0 and d >= 1";
  const int item = dtype_size(dtype);
  const Isa* isa = g_isa;
  std::vector<uint8_t> row_escapes(static_cast<size_t>(d) * item);  // one row's escaped values
  std::vector<uint8_t> row_sym(sym ? 0 : static_cast<size_t>(d));  // one row's symbols when sym is null
  int64_t written = 0, nonfinite = 0;
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* xr = static_cast<const uint8_t*>(x) + t * row_step * d * item;
    uint8_t* s = sym ? sym + t * d : row_sym.data();
    const int64_t count = isa->quantise(xr, dtype, d, center, inv, kmax, s, row_escapes.data(), nonfinite);
    n_esc[t] = static_cast<int32_t>(count);
    raw[t] = count > raw_limit;
    if (raw[t]) {
      if (sym) std::memset(s, 0, d);
      continue;
    }
    if (writer) writer->row(s);
    if (escapes && count) {
      std::memcpy(static_cast<uint8_t*>(escapes) + written * item, row_escapes.data(), count * item);
      written += count;
    }
  }
  totals[0] = written;
  totals[1] = nonfinite;
  return "";
}

}  // namespace

std::string v2_quantise(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                        int kmax, int64_t raw_limit, uint8_t* sym, int32_t* n_esc, uint8_t* raw, void* escapes,
                        int64_t* totals, int64_t row_step) {
  return quantise_rows(x, dtype, T, d, center, inv, kmax, raw_limit, sym, nullptr, n_esc, raw, escapes, totals,
                       row_step);
}

std::string v2_dequantise(const uint8_t* sym, int64_t T, int64_t d, const float* step, const float* center, int kmax,
                          int dtype, void* out, const uint8_t* raw, const void* escapes, int64_t n_escapes) {
  std::string err = check_dtype(dtype, "v2_dequantise");
  if (!err.empty()) return err;
  if (kmax < 1 || kmax > 127) return "v2_dequantise: kmax must be in [1, 127]";
  const int item = dtype_size(dtype);
  const Isa* isa = g_isa;
  int64_t used = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (raw && raw[t]) continue;
    if (!isa->dequantise(sym + t * d, d, step, center, kmax, dtype, static_cast<uint8_t*>(out) + t * d * item,
                         static_cast<const uint8_t*>(escapes), n_escapes, used))
      return "v2_dequantise: more escape symbols than escaped values";
  }
  if (n_escapes >= 0 && used != n_escapes) return "v2_dequantise: fewer escape symbols than escaped values";
  return "";
}

std::string v2_encode_nibble(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                             int kmax, int64_t raw_limit, int a, uint8_t* sym, int32_t* n_esc, uint8_t* raw,
                             void* escapes, uint8_t* out, int64_t capacity, int64_t* totals) {
  if (kmax < 1 || kmax > 127) return "v2_encode_nibble: kmax must be in [1, 127]";
  NibbleWriter writer;
  std::string err = writer.open(T, d, 2 * kmax + 2, a, out, capacity);
  if (!err.empty()) return err;
  err = quantise_rows(x, dtype, T, d, center, inv, kmax, raw_limit, sym, &writer, n_esc, raw, escapes, totals);
  if (!err.empty()) return err;
  totals[2] = writer.close();  // the quantiser's symbols are always < 2*kmax+2
  return "";
}

namespace {

// The decode pass of the fused decoders: each coded row (raw[t] == 0; raw may be null) from the
// opened reader, dequantised into out while its symbols are in L1, the n_escapes exact values
// placed at escape symbols. "" or why the stream is invalid (row_error: the reader's reason).
std::string dequantise_rows(RowReader& reader, const char* row_error, int64_t T, int64_t d, const uint8_t* raw,
                            const float* step, const float* center, int kmax, int dtype, void* out,
                            const void* escapes, int64_t n_escapes) {
  const int item = dtype_size(dtype);
  const Isa* isa = g_isa;
  std::vector<uint8_t> row_sym(static_cast<size_t>(d));
  int64_t used = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (raw && raw[t]) continue;
    if (!reader.row(row_sym.data())) return row_error;
    if (!isa->dequantise(row_sym.data(), d, step, center, kmax, dtype, static_cast<uint8_t*>(out) + t * d * item,
                         static_cast<const uint8_t*>(escapes), n_escapes, used))
      return "escape count does not match the escape symbols in the stream";
  }
  if (used != n_escapes) return "escape count does not match the escape symbols in the stream";
  return "";
}

}  // namespace

std::string v2_decode_nibble(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw, int a,
                             const float* step, const float* center, int kmax, int dtype, void* out,
                             const void* escapes, int64_t n_escapes) {
  std::string err = check_dtype(dtype, "v2_decode_nibble");
  if (!err.empty()) return err;
  if (kmax < 1 || kmax > 127 || T < 0 || d < 1) return "v2_decode_nibble: kmax, T or d out of range";
  NibbleReader reader;
  err = reader.open(data, len, coded_rows(T, raw), d, 2 * kmax + 2, a, -1);
  if (!err.empty()) return err;
  err = dequantise_rows(reader, kNibbleRowError, T, d, raw, step, center, kmax, dtype, out, escapes, n_escapes);
  return err.empty() ? reader.close(nullptr) : err;
}

std::string v2_encode_planes(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                             int kmax, int64_t raw_limit, const uint8_t* centre, const uint8_t* k, uint8_t* sym,
                             int32_t* n_esc, uint8_t* raw, void* escapes, uint8_t* out, int64_t capacity,
                             int64_t* totals) {
  if (kmax < 1 || kmax > 127) return "v2_encode_planes: kmax must be in [1, 127]";
  PlanesWriter writer;
  std::string err = writer.open(T, d, centre, k, d, 2 * kmax + 2, out, capacity);
  if (!err.empty()) return err;
  err = quantise_rows(x, dtype, T, d, center, inv, kmax, raw_limit, sym, &writer, n_esc, raw, escapes, totals);
  if (!err.empty()) return err;
  totals[2] = writer.close();  // the quantiser's symbols are always < 2*kmax+2
  return "";
}

std::string v2_decode_planes(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                             const uint8_t* centre, const uint8_t* k, const float* step, const float* center, int kmax,
                             int dtype, void* out, const void* escapes, int64_t n_escapes) {
  std::string err = check_dtype(dtype, "v2_decode_planes");
  if (!err.empty()) return err;
  if (kmax < 1 || kmax > 127 || T < 0 || d < 1) return "v2_decode_planes: kmax, T or d out of range";
  PlanesReader reader;
  err = reader.open(data, len, coded_rows(T, raw), d, centre, k, d, 2 * kmax + 2, -1);
  if (!err.empty()) return err;
  err = dequantise_rows(reader, kPlanesRowError, T, d, raw, step, center, kmax, dtype, out, escapes, n_escapes);
  return err.empty() ? reader.close(nullptr) : err;
}

std::string v2_encode_slots(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                            int kmax, int64_t raw_limit, const uint8_t* start, const uint8_t* width, uint8_t* sym,
                            int32_t* n_esc, uint8_t* raw, void* escapes, uint8_t* out, int64_t capacity,
                            int64_t* totals) {
  if (kmax < 1 || kmax > 127) return "v2_encode_slots: kmax must be in [1, 127]";
  SlotsWriter writer;
  std::string err = writer.open(T, d, start, width, d, 2 * kmax + 2, out, capacity);
  if (!err.empty()) return err;
  err = quantise_rows(x, dtype, T, d, center, inv, kmax, raw_limit, sym, &writer, n_esc, raw, escapes, totals);
  if (!err.empty()) return err;
  totals[2] = writer.close();  // the quantiser's symbols are always < 2*kmax+2
  return "";
}

std::string v2_decode_slots(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                            const uint8_t* start, const uint8_t* width, const float* step, const float* center,
                            int kmax, int dtype, void* out, const void* escapes, int64_t n_escapes) {
  std::string err = check_dtype(dtype, "v2_decode_slots");
  if (!err.empty()) return err;
  if (kmax < 1 || kmax > 127 || T < 0 || d < 1) return "v2_decode_slots: kmax, T or d out of range";
  SlotsReader reader;
  err = reader.open(data, len, coded_rows(T, raw), d, start, width, d, 2 * kmax + 2, -1);
  if (!err.empty()) return err;
  err = dequantise_rows(reader, kSlotsRowError, T, d, raw, step, center, kmax, dtype, out, escapes, n_escapes);
  return err.empty() ? reader.close(nullptr) : err;
}

std::vector<std::string> v2_isas() {
  std::vector<std::string> out{"scalar"};
  if (cpu_has_avx2()) out.push_back("avx2");
  if (cpu_has_avx512()) out.push_back("avx512");
  return out;
}

std::string v2_isa() { return g_isa->name; }

std::string set_v2_isa(const std::string& name) {
  if (name == "scalar") {
    g_isa = &kScalar;
    return "";
  }
#ifdef SK_V2_X86
  if (name == "avx2" && cpu_has_avx2()) {
    g_isa = &kAvx2;
    return "";
  }
  if (name == "avx512" && cpu_has_avx512()) {
    g_isa = &kAvx512;
    return "";
  }
#endif
  return "v2 isa must be one of the supported ones (see v2_isas()), got '" + name + "'";
}

}  // namespace sk
