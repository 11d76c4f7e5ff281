// Vector pieces of the 32-lane coders (static rANS, Rice): 16 u32 states per AVX-512 register,
// renormalised in 16-bit words (docs/FORMATS.md sections 5.3, 5.7).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstdint>

#define SK_LANES_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512cd")))

namespace sk {

// True when this CPU has every feature SK_LANES_AVX512 compiles for.
inline bool cpu_has_lanes_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
}

// Encoder: the low 16 bits of the lanes in `emit` go below `words` in lane order, and those lanes
// shift right by 16. Compressed in a register and stored under a mask: a compressing store is
// microcoded on Zen 4.
SK_LANES_AVX512 inline __m512i emit_words16(__m512i x, __mmask16 emit, uint16_t*& words) {
  const int cnt = __builtin_popcount(emit);
  const __m256i packed = _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(emit, x));
  words -= cnt;
  _mm256_mask_storeu_epi16(words, static_cast<__mmask16>((1u << cnt) - 1), packed);
  return _mm512_mask_srli_epi32(x, emit, x, 16);
}

// Decoder: the lanes below 2^16 take the next 16-bit words at w in lane order (one load, one
// expand); 16 words must be readable at w.
SK_LANES_AVX512 inline __m512i refill16(__m512i x, const uint8_t*& w) {
  const __mmask16 renorm = _mm512_cmplt_epu32_mask(x, _mm512_set1_epi32(1 << 16));
  const __m512i next = _mm512_maskz_expand_epi32(
      renorm, _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))));
  w += 2 * __builtin_popcount(renorm);
  return _mm512_mask_or_epi32(x, renorm, _mm512_slli_epi32(x, 16), next);
}

// The low bytes of 16 lanes, stored at out.
SK_LANES_AVX512 inline void store_bytes16(__m512i s, uint8_t* out) {
  // vpmovdb in its register form (with a memory operand it is microcoded on Zen 4).
  __m128i bytes = _mm512_cvtepi32_epi8(s);
  asm("" : "+v"(bytes));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
}

}  // namespace sk
#endif
