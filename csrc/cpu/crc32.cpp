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

bool cpu_has_clmul() { return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1"); }
const bool g_clmul = cpu_has_clmul();
#endif

}  // namespace

uint32_t crc32_table(uint32_t crc, const uint8_t* p, int64_t n) { return ~raw_table(~crc, p, n); }

uint32_t crc32(uint32_t crc, const uint8_t* p, int64_t n) {
#ifdef SK_CRC_X86
  if (g_clmul && n >= 64) return ~raw_clmul(~crc, p, n);
#endif
  return crc32_table(crc, p, n);
}

}  // namespace sk
