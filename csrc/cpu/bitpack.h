// Little-endian bit streams (docs/FORMATS.md section 1): code k of b bits occupies stream bits
// [k*b, (k+1)*b), stream bit i is bit i%8 of byte i/8.
//
// Eight b-bit codes fill exactly b bytes, so the kernels move 8 codes at a time through one
// 64-bit register (the width is a template parameter, so every shift is a constant) and
// handle the last n%8 codes separately.
#pragma once

#include <cstdint>
#include <cstring>

namespace sk {

inline int64_t packed_nbytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

template <int B>
inline void pack_row_t(const uint8_t* codes, int64_t n, uint8_t* out) {
  const int64_t full = n / 8, nbytes = packed_nbytes(n, B);
  for (int64_t c = 0; c < full; ++c) {
    uint64_t v = 0;
    for (int j = 0; j < 8; ++j) v |= static_cast<uint64_t>(codes[8 * c + j]) << (j * B);
    // Little-endian host: the low B bytes of v are the chunk. A whole-word store is cheaper
    // than a B-byte one; its zero high bytes are overwritten by the next chunk.
    if (B * c + 8 <= nbytes)
      std::memcpy(out + B * c, &v, 8);
    else
      std::memcpy(out + B * c, &v, B);
  }
  const int64_t rest = n - 8 * full;
  if (rest) {
    uint64_t v = 0;
    for (int64_t j = 0; j < rest; ++j) v |= static_cast<uint64_t>(codes[8 * full + j]) << (j * B);
    std::memcpy(out + B * full, &v, static_cast<size_t>((rest * B + 7) / 8));
  }
}

template <int B>
inline void unpack_row_t(const uint8_t* in, int64_t n, uint8_t* codes) {
  constexpr uint64_t mask = (1u << B) - 1;
  const int64_t full = n / 8, nbytes = packed_nbytes(n, B);
  for (int64_t c = 0; c < full; ++c) {
    uint64_t v = 0;
    // A whole-word load where the row has 8 bytes left: a B-byte copy through memory stalls
    // on store forwarding.
    if (B * c + 8 <= nbytes)
      std::memcpy(&v, in + B * c, 8);
    else
      std::memcpy(&v, in + B * c, B);
    for (int j = 0; j < 8; ++j) codes[8 * c + j] = static_cast<uint8_t>((v >> (j * B)) & mask);
  }
  const int64_t rest = n - 8 * full;
  if (rest) {
    uint64_t v = 0;
    std::memcpy(&v, in + B * full, static_cast<size_t>((rest * B + 7) / 8));
    for (int64_t j = 0; j < rest; ++j) codes[8 * full + j] = static_cast<uint8_t>((v >> (j * B)) & mask);
  }
}

// Packs one row of n codes (each < 2^bits) into ceil(n*bits/8) bytes; bits in 1..8.
inline void pack_row(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  switch (bits) {
    case 1: pack_row_t<1>(codes, n, out); break;
    case 2: pack_row_t<2>(codes, n, out); break;
    case 3: pack_row_t<3>(codes, n, out); break;
    case 4: pack_row_t<4>(codes, n, out); break;
    case 5: pack_row_t<5>(codes, n, out); break;
    case 6: pack_row_t<6>(codes, n, out); break;
    case 7: pack_row_t<7>(codes, n, out); break;
    default: std::memcpy(out, codes, static_cast<size_t>(n)); break;
  }
}

// Unpacks n codes of `bits` bits from a row of at least ceil(n*bits/8) bytes; bits in 1..8.
inline void unpack_row(const uint8_t* in, int64_t n, int bits, uint8_t* codes) {
  switch (bits) {
    case 1: unpack_row_t<1>(in, n, codes); break;
    case 2: unpack_row_t<2>(in, n, codes); break;
    case 3: unpack_row_t<3>(in, n, codes); break;
    case 4: unpack_row_t<4>(in, n, codes); break;
    case 5: unpack_row_t<5>(in, n, codes); break;
    case 6: unpack_row_t<6>(in, n, codes); break;
    case 7: unpack_row_t<7>(in, n, codes); break;
    default: std::memcpy(codes, in, static_cast<size_t>(n)); break;
  }
}

// Bit-at-a-time versions of the same streams: slow, written straight from the definition,
// and kept so the tests can check the word-at-a-time kernels against them byte for byte.
void pack_row_bitwise(const uint8_t* codes, int64_t n, int bits, uint8_t* out);
void unpack_row_bitwise(const uint8_t* in, int64_t n, int bits, uint8_t* codes);

// Row-parallel entry points: `rows` rows, input row stride `in_stride` bytes.
void pack_rows(const uint8_t* codes, int64_t rows, int64_t n, int bits, uint8_t* out, bool bitwise);
void unpack_rows(const uint8_t* packed, int64_t rows, int64_t in_stride, int64_t n, int bits, uint8_t* codes,
                 bool bitwise);

}  // namespace sk
