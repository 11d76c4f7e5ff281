// Nibble coder of codec v2 (docs/FORMATS.md section 5.6), bit-exact with splitkernels/codec/nibble.py.
//
// Symbols in the window [a, a + 15) cost one 4-bit nibble (s - a); every other symbol is an
// exception: nibble 15 in level 1, then a level-2 nibble with its distance from the window (< 15),
// or nibble 15 there too and the symbol itself as a level-3 byte. Stream:
//   n_x u32 | n_xx u32 | level 1: rows * ceil(d/2) bytes | level 2: ceil(n_x/2) bytes | level 3: n_xx bytes
// Each pass has an AVX-512 (BW + VBMI2) path and a scalar fallback, picked at run time by cpuid.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sk {

constexpr int kNibbleWindow = 15;
constexpr int64_t kNibbleHead = 8;
constexpr int64_t kNibbleSlack = 64;  // whole-vector stores may run this far past the stream's end

inline int64_t nibble_row_bytes(int64_t d) { return (d + 1) / 2; }

// Bytes that always suffice for the stream of `rows` coded rows of d symbols.
inline int64_t nibble_capacity(int64_t rows, int64_t d) {
  const int64_t s = rows * d;
  return kNibbleHead + rows * nibble_row_bytes(d) + (s + 1) / 2 + s;
}

// Encodes the rows of sym [T, d] whose raw[t] is 0 (raw may be null: every row) with window start
// a of an nsym-symbol table. Returns the stream length, or -1 when a symbol is >= nsym, the
// arguments are out of range or out (capacity bytes) is smaller than nibble_capacity + kNibbleSlack.
int64_t nibble_encode(const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw, int nsym, int a, uint8_t* out,
                      int64_t capacity);

// Decodes a stream of exactly len bytes into out [T, d]: the coded rows (raw[t] == 0), raw rows set
// to 0. Returns "" or why the stream is invalid (sizes, counts, padding, a symbol outside the table,
// a non-canonical exception). When count_of is in [0, 256), *count receives how many decoded
// symbols equal it.
std::string nibble_decode(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw, int nsym, int a,
                          uint8_t* out, int count_of, int64_t* count);

// Instruction sets of the coder ("scalar", then "avx512" when supported), the one in use, and a
// switch between them ("" or why not).
std::vector<std::string> nibble_isas();
std::string nibble_isa();
std::string set_nibble_isa(const std::string& name);

}  // namespace sk
