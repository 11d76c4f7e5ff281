// Packed B-bit codes moved into byte (or word) fields with VBMI: vpermb gathers the bytes that hold
// a u64 lane's codes, vpmultishiftqb moves each code to its own field: any code width in natural
// order for the AMX A tiles (isa/lowbit_amx.cpp; the VNNI path's 3-bit decode shares one vpermb
// between two planes instead). Internal linkage, so a kernel file compiles its own copy with its
// own -m flags (VBMI among them).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace sk {
namespace {

// The index tables of pick_fields.
struct FieldTables {
  uint8_t bytes[64], fields[64];
};

// The first N bytes from src, read no further, in the narrowest vector that holds them: a wider
// masked load still reads the lines its whole width spans, and 16-byte blocks of 2-bit codes as
// 64-byte masked loads crossed a line three times in four (1536 x 576 W2 M = 16 fp32 rows took
// 1.3 times W4's time).
template <int N>
inline __m512i load_bytes(const uint8_t* src) {
  static_assert(N > 0 && N <= 64);
  if constexpr (N == 16)
    return _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  else if constexpr (N == 32)
    return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  else if constexpr (N < 16)
    return _mm512_zextsi128_si512(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << N) - 1), src));
  else if constexpr (N < 32)
    return _mm512_zextsi256_si512(_mm256_maskz_loadu_epi8((1u << N) - 1, src));
  else
    return _mm512_maskz_loadu_epi8(~0ull >> (64 - N), src);
}

// Bytes v moved by vpermb (output byte i from byte t.bytes[i]), then byte i of each u64 lane
// replaced by the 8 bits from bit t.fields[i] of the lane, rotating (vpmultishiftqb): the code
// fields of a block where the caller wants them.
inline __m512i pick_fields(__m512i v, const FieldTables& t) {
  const __m512i lanes = _mm512_permutexvar_epi8(_mm512_load_si512(t.bytes), v);
  return _mm512_multishift_epi64_epi8(_mm512_load_si512(t.fields), lanes);
}

// 64 B-bit codes (B = 2, 3, 4; 8 B bytes from src, a row's little-endian bit stream) as 64
// unsigned bytes in natural order: vpermb gives u64 lane l the bytes from B l (its eight codes
// start at bit 8 B l, a whole byte), vpmultishiftqb moves code i of the lane to byte i, an and
// keeps its B bits.
template <int B>
inline __m512i code_bytes(const uint8_t* src) {
  alignas(64) static constexpr FieldTables t = [] {
    FieldTables t{};
    for (int l = 0; l < 8; ++l)
      for (int i = 0; i < 8; ++i) {
        t.bytes[8 * l + i] = static_cast<uint8_t>(B * l + i);
        t.fields[8 * l + i] = static_cast<uint8_t>(B * i);
      }
    return t;
  }();
  return _mm512_and_si512(pick_fields(load_bytes<8 * B>(src), t), _mm512_set1_epi8(static_cast<char>((1 << B) - 1)));
}

}  // namespace
}  // namespace sk
