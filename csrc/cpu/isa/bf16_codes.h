// The 2-, 3- and 4-bit decode of packed codes into bf16 integers (plus an offset) with one shift
// and one and-or per vector of 32, shared by the kernels that multiply exact codes with bf16
// instructions (isa/lowbit_bf16.cpp: vdpbf16ps; isa/lowbit_amx.cpp: the AMX tiles). Internal
// linkage, so each kernel file compiles its own copy with its own -m flags.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <utility>

namespace sk {
namespace {

// Codes per chunk (64 bytes; 3 bits: 128 codes in 48 bytes), bytes per chunk and pair vectors
// per chunk (see bf16_position in lowbit_kernels.h).
template <int B>
constexpr int64_t kChunkCodes = B == 3 ? 128 : 512 / B;
template <int B>
constexpr int64_t kChunkBytes = kChunkCodes<B> * B / 8;
template <int B>
constexpr int kPairs = static_cast<int>(kChunkCodes<B> / 32);

// The 2-, 3- and 4-bit decode yields an offset plus q instead of q: bf16 0x4300 | q is exactly
// 128 + q for q < 128 (eight significant bits), so a code becomes its bf16 value with one shift
// and one and-or (vpternlogd), no table lookup. The kernels fold the offset into the zero point:
// s * sum (128 + q) x + (z - 128 s) * sum x = s * sum q x + z * sum x. The offset's terms cancel
// in fp32, which costs bits where fp32 is promised: the F ("fine") decode, for fp32 activations
// sent as bf16 parts, uses 2^B, the bf16 of 2^B with q in the top B of its mantissa bits (2-bit
// sums lost 1.5e-5 relative with 128, about 2e-6 with 2^B), at one rotate more per chunk.
// The offset's exponent and the offset of `bits`-bit codes (F: `fine`), also for callers that know
// the width only at run time.
constexpr int offset_exponent(int bits, bool fine) { return fine ? bits : 7; }
constexpr float code_offset(int bits, bool fine) {
  return bits == 8 ? 0.f : static_cast<float>(1 << offset_exponent(bits, fine));
}
template <int B, bool F = false>
constexpr float kCodeOffset = code_offset(B, F);
// kCodeOffset<B, F> in bf16 (its exponent, mantissa clear) in both halves of a u32 lane, and the
// shift that puts a code from bit 0 at the top of its half's mantissa (0 for 128 + q).
template <int B, bool F>
constexpr uint32_t kOffsetBits = (0x3F80u + (offset_exponent(B, F) << 7)) * 0x10001u;
template <int B, bool F>
constexpr int kMantissaShift = F ? 7 - B : 0;

// The codes at bit s of each half of v's u32 lanes moved to kMantissaShift<B, F>: a shift, or for F
// a right or left rotate (the bits that wrap land outside both halves' code fields).
template <int B, bool F, int S>
inline __m512i code_at_mantissa(__m512i v) {
  if constexpr (F)
    return _mm512_ror_epi32(v, (S - kMantissaShift<B, F>) & 31);
  else
    return _mm512_srli_epi32(v, S);
}

// The bf16 codes (plus kCodeOffset) of both halves of each u32 lane, from `moved`, whose code
// fields already sit at the top of the mantissa (kMantissaShift<B, F>): (moved & code_bits) | offset.
template <int B, bool F>
inline __m512i codes_as_bf16(__m512i moved) {
  constexpr uint32_t mask = (1u << B) - 1;
  const __m512i code_bits = _mm512_set1_epi32(static_cast<int>((mask << 16 | mask) << kMantissaShift<B, F>));
  const __m512i offset = _mm512_set1_epi32(static_cast<int>(kOffsetBits<B, F>));
  return _mm512_ternarylogic_epi32(moved, code_bits, offset, 0xea);
}

// Pair vector I (of kPairs<B>) of a loaded chunk, or of 16 transposed lanes (the panel): per u32
// lane, the codes at bit S of both halves moved to the mantissa by an immediate shift, then
// codes_as_bf16. 2/4 bits: phase I / 2 of bytes t = I % 2 and t + 2 of the lane's four bytes,
// S = 8 t + B (I / 2); 3 bits (arranged by load_chunk): S = 3 I. Decoding one pair where it is
// used keeps one decoded vector live instead of kPairs<B> (W2: eight), which spilled registers in
// the dot form. (8-bit codes are decoded in natural order: natural8_pairs.)
template <int B, bool F, int I>
inline __m512i decode_pair(__m512i v) {
  constexpr int S = B == 3 ? 3 * I : 8 * (I % 2) + B * (I / 2);
  return codes_as_bf16<B, F>(code_at_mantissa<B, F, S>(v));
}

// fn(std::integral_constant<int, I>{}) for I = 0 .. N - 1, in order: loop bodies whose index must
// be a compile-time constant (immediate shift counts).
template <typename Fn, int... I>
inline void for_index_in(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, typename Fn>
inline void for_index(Fn&& fn) {
  for_index_in(fn, std::make_integer_sequence<int, N>{});
}

}  // namespace
}  // namespace sk
