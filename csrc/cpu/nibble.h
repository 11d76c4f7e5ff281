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

#include "cpu/row_coder.h"

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

struct NibbleIsa;  // the row kernels of one instruction set (nibble.cpp)

// Row-at-a-time encoder, so a pass can code each row while it is in L1: open (room for max_rows
// rows), row() per coded row in order, close() -> stream length (-1: a symbol was >= nsym). The
// exception scratch is per thread: one writer or reader per thread at a time.
class NibbleWriter : public RowWriter {
 public:
  std::string open(int64_t max_rows, int64_t d, int nsym, int a, uint8_t* out, int64_t capacity);
  void row(const uint8_t* sym) override;
  int64_t close();

 private:
  const NibbleIsa* isa_ = nullptr;
  int64_t d_ = 0, nx_ = 0;
  int nsym_ = 0, a_ = 0, maxsym_ = 0;
  uint8_t *out_ = nullptr, *l1_ = nullptr, *xs_ = nullptr;
};

// Row-at-a-time decoder: open validates the head, the sizes and levels 2 and 3 (every exception
// decoded); row() writes the next coded row's d symbols (false: the stream is invalid); close()
// checks every exception was used and reports how many symbols equal count_of.
class NibbleReader : public RowReader {
 public:
  std::string open(const uint8_t* data, int64_t len, int64_t rows, int64_t d, int nsym, int a, int count_of);
  bool row(uint8_t* out) override;
  std::string close(int64_t* count);

 private:
  const NibbleIsa* isa_ = nullptr;
  int64_t d_ = 0, n_x_ = 0, xi_ = 0, count_ = 0;
  int nsym_ = 0, a_ = 0, count_of_ = -1;
  const uint8_t *l1_ = nullptr, *xs_ = nullptr;
};

extern const char* const kNibbleRowError;  // why NibbleReader::row failed

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
