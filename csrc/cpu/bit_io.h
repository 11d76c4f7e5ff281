// Bit streams, least significant bit first, read and written up to 64 bits at a time (the
// bit-plane coder's remainder and quotient planes, docs/FORMATS.md section 5.8).
#pragma once

#include <cstdint>

#include "cpu/le_bytes.h"

namespace sk {

// Low n bits of v, n in [0, 64].
inline uint64_t low_bits(uint64_t v, int n) { return n >= 64 ? v : v & ((uint64_t{1} << n) - 1); }

// Appends to a buffer in whole 8-byte stores: the buffer needs 8 bytes of room past the last
// whole byte written.
struct BitWriter {
  uint8_t* at = nullptr;  // where the next full word goes
  uint64_t acc = 0;       // bits not yet stored, fill of them
  int fill = 0;

  void start(uint8_t* p) {
    at = p;
    acc = 0;
    fill = 0;
  }
  // The low n bits of bits (n in [0, 64]; bits above n are 0). Branch-free: the word is stored
  // every time, and the pointer moves on when it is full (a branch here mispredicts about every
  // other call on variable-length puts).
  void put(uint64_t bits, int n) {
    acc |= bits << fill;
    store_u64(at, acc);
    const int total = fill + n;
    const uint64_t spill = (bits >> (63 - fill)) >> 1;  // the bits that did not fit (none when fill is 0)
    const uint64_t whole = static_cast<uint64_t>(total >> 6);  // 1: the word is full
    at += whole * 8;
    acc = (spill & (0 - whole)) | (acc & (whole - 1));  // masks, not a select: compilers turn that into a branch
    fill = total & 63;
  }
  // 64 bits: the fill stays, so the word in progress does not depend on the previous one.
  void put64(uint64_t bits) {
    store_u64(at, acc | (bits << fill));
    at += 8;
    acc = (bits >> (63 - fill)) >> 1;
  }
  // Stores the partial word; returns the end of the written bytes (the last one zero-padded).
  uint8_t* finish() {
    store_u64(at, acc);
    return at + (fill + 7) / 8;
  }
};

// Reads a byte range; bits past its end read as 0 (the caller compares pos with 8 * nbytes).
struct BitReader {
  const uint8_t* data = nullptr;
  int64_t nbytes = 0;
  int64_t pos = 0;  // bits read so far

  // n bits (n in [0, 64]) at bit position at, without moving.
  uint64_t peek(int64_t at, int n) const {
    const int64_t byte = at >> 3;
    const int sh = static_cast<int>(at & 7);
    uint64_t v;
    if (byte + 9 <= nbytes) {
      v = (load_u64(data + byte) >> sh) | ((uint64_t{data[byte + 8]} << (63 - sh)) << 1);
    } else {
      v = 0;
      for (int i = 0; i < 8 && byte + i < nbytes; ++i) v |= uint64_t{data[byte + i]} << (8 * i);
      v >>= sh;
      if (byte + 8 < nbytes) v |= (uint64_t{data[byte + 8]} << (63 - sh)) << 1;
    }
    return low_bits(v, n);
  }

  // The little-endian word at byte 8 * i (bytes past the end read as 0).
  uint64_t word(int64_t i) const {
    if (8 * i + 8 <= nbytes) return load_u64(data + 8 * i);
    uint64_t v = 0;
    for (int64_t b = 8 * i; b < nbytes && b < 8 * i + 8; ++b) v |= uint64_t{data[b]} << (8 * (b - 8 * i));
    return v;
  }

  uint64_t read(int n) {
    const uint64_t v = peek(pos, n);
    pos += n;
    return v;
  }
};

// Consecutive 64-bit chunks of the bits from position pos on: one word load and a funnel shift
// each (the shift stays the same along a run).
class BitChunks {
 public:
  BitChunks(const BitReader& r, int64_t pos) : r_(r), word_(pos >> 6), sh_(static_cast<int>(pos & 63)), lo_(r.word(word_)) {}
  uint64_t next() {
    const uint64_t hi = r_.word(++word_);
    const uint64_t v = (lo_ >> sh_) | ((hi << 1) << (63 - sh_));
    lo_ = hi;
    return v;
  }

 private:
  const BitReader& r_;
  int64_t word_;
  int sh_;
  uint64_t lo_;
};

}  // namespace sk
