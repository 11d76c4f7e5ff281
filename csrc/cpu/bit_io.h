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

// A byte range of bits read through BitStream; bits past its end read as 0 (the caller compares
// pos with 8 * nbytes).
struct BitReader {
  const uint8_t* data = nullptr;
  int64_t nbytes = 0;
  int64_t pos = 0;  // bits read so far

  // The little-endian word at byte 8 * i (bytes past the end read as 0).
  uint64_t word(int64_t i) const {
    if (8 * i + 8 <= nbytes) return load_u64(data + 8 * i);
    uint64_t v = 0;
    for (int64_t b = 8 * i; b < nbytes && b < 8 * i + 8; ++b) v |= uint64_t{data[b]} << (8 * (b - 8 * i));
    return v;
  }
};

// Sequential reads of up to 64 bits from position pos on, from two words in registers: a funnel
// shift per read and one word load each time 64 bits have been read (no bounds check per read).
class BitStream {
 public:
  BitStream(const BitReader& r, int64_t pos)
      : r_(r), word_(pos >> 6), sh_(static_cast<int>(pos & 63)), lo_(r.word(word_)), hi_(r.word(word_ + 1)) {}
  // n bits, n in [0, 64].
  uint64_t read(int n) {
    const uint64_t v = low_bits((lo_ >> sh_) | ((hi_ << 1) << (63 - sh_)), n);
    sh_ += n;
    if (sh_ >= 64) {
      sh_ -= 64;
      lo_ = hi_;
      hi_ = r_.word(++word_ + 1);
    }
    return v;
  }
  int64_t pos() const { return word_ * 64 + sh_; }

 private:
  const BitReader& r_;
  int64_t word_;
  int sh_;
  uint64_t lo_, hi_;
};

}  // namespace sk
