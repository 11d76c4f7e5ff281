// Byte-level pieces of codec v2 frames (docs/FORMATS.md section 5.4) shared by the one-token and
// long frame paths: LEB128 varints as splitkernels/codec/frame_v2.py writes and reads them, and the
// finiteness of exact values as the reference checks it.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/half.h"

namespace sk {

constexpr int kMaxVarintBytes = 5;
constexpr int64_t kCrcBytes = 4;  // every frame ends in its CRC-32, little-endian

// The token form of one-token frames (section 5.4.1): one tag byte, bits 7-5 101, then the coder
// (bit 4, 0 = rANS, 1 = nibble), shifted (bit 3), raw (bit 2) and dtype (bits 1-0) fields, where a
// longer frame has magic, version, dtype byte, T and bitmap. A frame with a step scale (5.4.3) has
// 0b110 instead of 0b101, and the scale byte follows the tag; 0b100 and 0b111 are the same two
// with the rANS stream on four lanes (coder 6).
constexpr uint8_t kTokenTag = 0xA0, kScaledTokenTag = 0xC0, kTokenCoder = 0x10, kTokenShifted = 0x08, kTokenRaw = 0x04;
constexpr uint8_t kFourLaneTokenTag = 0x80, kScaledFourLaneTokenTag = 0xE0, kTokenMarkerMask = 0xE0;
constexpr uint8_t kScaleFlag = 0x04;  // in the long form's dtype byte: the scale byte follows it

// LEB128 of n at out; the number of bytes written.
inline int write_varint(uint64_t n, uint8_t* out) {
  int i = 0;
  for (; n >= 0x80; n >>= 7) out[i++] = static_cast<uint8_t>(n) | 0x80;
  out[i++] = static_cast<uint8_t>(n);
  return i;
}

// Bytes of n's LEB128.
inline int varint_bytes(uint64_t n) {
  int i = 1;
  for (; n >= 0x80; n >>= 7) ++i;
  return i;
}

// Canonical LEB128 of at most 5 bytes (no redundant zero group) at p[pos, end), as
// frame_v2._read_varint: false when it is not one; else value set and pos moved past it.
inline bool read_varint(const uint8_t* p, int64_t& pos, int64_t end, uint64_t& value) {
  uint64_t n = 0;
  for (int i = 0; i < kMaxVarintBytes; ++i) {
    if (pos + i >= end) return false;
    const uint8_t b = p[pos + i];
    n |= static_cast<uint64_t>(b & 0x7F) << (7 * i);
    if (!(b & 0x80)) {
      if (i && b == 0) return false;
      value = n;
      pos += i + 1;
      return true;
    }
  }
  return false;
}

// Whether every one of n values of `dtype` at p is finite (exponent not all ones), as torch.isfinite.
inline bool all_finite(const uint8_t* p, int64_t n, int dtype) {
  for (int64_t i = 0; i < n; ++i) {
    if (dtype == kFloat32) {
      uint32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      if ((v & 0x7F800000u) == 0x7F800000u) return false;
    } else {
      uint16_t v;
      std::memcpy(&v, p + 2 * i, 2);
      const uint16_t exp = dtype == kFloat16 ? 0x7C00 : 0x7F80;
      if ((v & exp) == exp) return false;
    }
  }
  return true;
}

}  // namespace sk
