#include "cpu/crc32.h"

#include <array>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SK_CRC_X86 1
#endif

namespace sk {
namespace {

constexpr uint32_t kPoly = 0xEDB88320u;

constexpr std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
    t[i] = c;
  }
  return t;
}

constexpr std::array<uint32_t, 256> kTable = make_table();

// The raw register (no pre/post inversion) over n bytes.
inline uint32_t raw_table(uint32_t c, const uint8_t* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) c = kTable[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c;
}

#ifdef SK_CRC_X86
// Folding (carry-less multiplication by x^k mod P, in the bit-reflected domain): four 128-bit
// accumulators advance 512 bits per step, then fold into one, 128 bits per step. The folded
// 128-bit value is congruent to the data it replaces, so the CRC of the rest is the table CRC of
// those 16 bytes (register 0) followed by the unfolded tail.
__attribute__((target("pclmul,sse4.1"))) inline __m128i fold(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}

__attribute__((target("pclmul,sse4.1"))) uint32_t raw_clmul(uint32_t c, const uint8_t* p, int64_t n) {
  const __m128i k512 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
  const __m128i k128 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
  auto load = [](const uint8_t* q) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)); };
  __m128i x0 = _mm_xor_si128(load(p), _mm_cvtsi32_si128(static_cast<int>(c)));
  __m128i x1 = load(p + 16), x2 = load(p + 32), x3 = load(p + 48);
  p += 64;
  n -= 64;
  for (; n >= 64; p += 64, n -= 64) {
    x0 = _mm_xor_si128(fold(x0, k512), load(p));
    x1 = _mm_xor_si128(fold(x1, k512), load(p + 16));
    x2 = _mm_xor_si128(fold(x2, k512), load(p + 32));
    x3 = _mm_xor_si128(fold(x3, k512), load(p + 48));
  }
  __m128i x = _mm_xor_si128(fold(x0, k128), x1);
  x = _mm_xor_si128(fold(x, k128), x2);
  x = _mm_xor_si128(fold(x, k128), x3);
  for (; n >= 16; p += 16, n -= 16) x = _mm_xor_si128(fold(x, k128), load(p));
  alignas(16) uint8_t rest[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(rest), x);
  return raw_table(raw_table(0, rest, 16), p, n);
}

// The same folding four 512-bit registers at a time (VPCLMULQDQ: four carry-less products per
// instruction), then 512 -> 128 bits. Fold constants for a distance of D bits are
// (x^(D+32) mod P, x^(D-32) mod P), bit-reflected and shifted left by one.
#define SK_CRC_ZMM __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.1")))

SK_CRC_ZMM inline __m512i fold512(__m512i x, __m512i k) {
  return _mm512_xor_si512(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11));
}

SK_CRC_ZMM uint32_t raw_vclmul(uint32_t c, const uint8_t* p, int64_t n) {
  const __m512i k2048 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1322d1430LL, 0x11542778aLL));
  const __m512i k512 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL));
  const __m128i k384 = _mm_set_epi64x(0x174359406LL, 0x3db1ecdcLL);
  const __m128i k256 = _mm_set_epi64x(0x15a546366LL, 0xf1da05aaLL);
  const __m128i k128 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
  __m512i z0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(c))));
  __m512i z1 = _mm512_loadu_si512(p + 64), z2 = _mm512_loadu_si512(p + 128), z3 = _mm512_loadu_si512(p + 192);
  p += 256;
  n -= 256;
  for (; n >= 256; p += 256, n -= 256) {
    z0 = _mm512_xor_si512(fold512(z0, k2048), _mm512_loadu_si512(p));
    z1 = _mm512_xor_si512(fold512(z1, k2048), _mm512_loadu_si512(p + 64));
    z2 = _mm512_xor_si512(fold512(z2, k2048), _mm512_loadu_si512(p + 128));
    z3 = _mm512_xor_si512(fold512(z3, k2048), _mm512_loadu_si512(p + 192));
  }
  __m512i z = _mm512_xor_si512(fold512(z0, k512), z1);
  z = _mm512_xor_si512(fold512(z, k512), z2);
  z = _mm512_xor_si512(fold512(z, k512), z3);
  for (; n >= 64; p += 64, n -= 64) z = _mm512_xor_si512(fold512(z, k512), _mm512_loadu_si512(p));
  __m128i x = _mm512_extracti32x4_epi32(z, 3);
  x = _mm_xor_si128(x, fold(_mm512_extracti32x4_epi32(z, 0), k384));
  x = _mm_xor_si128(x, fold(_mm512_extracti32x4_epi32(z, 1), k256));
  x = _mm_xor_si128(x, fold(_mm512_extracti32x4_epi32(z, 2), k128));
  for (; n >= 16; p += 16, n -= 16) x = _mm_xor_si128(fold(x, k128), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint8_t rest[16];
  _mm_store_si128(reinterpret_cast<__m128i*>(rest), x);
  return raw_table(raw_table(0, rest, 16), p, n);
}

bool cpu_has_clmul() { return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1"); }
bool cpu_has_vclmul() {
  return cpu_has_clmul() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq");
}
const bool g_clmul = cpu_has_clmul();
const bool g_vclmul = cpu_has_vclmul();
#endif

}  // namespace

uint32_t crc32_table(uint32_t crc, const uint8_t* p, int64_t n) { return ~raw_table(~crc, p, n); }

uint32_t crc32(uint32_t crc, const uint8_t* p, int64_t n) {
#ifdef SK_CRC_X86
  if (g_vclmul && n >= 256) return ~raw_vclmul(~crc, p, n);
  if (g_clmul && n >= 64) return ~raw_clmul(~crc, p, n);
#endif
  return crc32_table(crc, p, n);
}

}  // namespace sk
