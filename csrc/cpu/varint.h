// LEB128 varints of codec v2 frames (docs/FORMATS.md section 5.4), as splitkernels/codec/frame_v2.py
// writes and reads them: shared by the one-token and long frame paths.
#pragma once

#include <cstdint>

namespace sk {

constexpr int kMaxVarintBytes = 5;

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

}  // namespace sk
