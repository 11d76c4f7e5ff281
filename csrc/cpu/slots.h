// Slot coder of codec v2 (docs/FORMATS.md section 5.9), bit-exact with splitkernels/codec/slots.py.
//
// Each channel c has a window [a_c, a_c + W_c) of W_c = 2^w_c - 1 symbols, w_c in 1..8. A coded row
// (token) sends every channel's slot in w_c bits: s - a_c inside the window, W_c (all ones) outside,
// then a distance nibble e (15: the symbol as a byte). Rows go in groups of 8: for each channel and
// each of its levels l < w_c, a chunk of 8 bits, bit l of the channel's slot in each row, so a full
// group is B = sum(w_c) whole bytes: a byte transpose, a bit-matrix transpose (gf2p8affineqb) and a
// compress of the level bytes per 64 channels, with no bit-level packing.
// Stream: n_x u32 | n_xx u32 | rows * B slot bits, zero-padded to a byte | ceil(n_x / 2) bytes of
// distance nibbles | n_xx far symbol bytes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/bit_io.h"
#include "cpu/row_coder.h"
#include "cpu/slots_rows.h"

namespace sk {

constexpr int64_t kSlotsHead = 8;

// Bytes that always suffice for the stream of `rows` coded rows of d symbols (8 slot bits, a
// nibble and a byte per symbol at most), with room for whole-word and whole-vector stores.
inline int64_t slots_capacity(int64_t rows, int64_t d) { return kSlotsHead + 3 * rows * d + 64; }

// Row-at-a-time encoder: open (room for max_rows rows), row() per coded row in order, close() ->
// stream length (-1: a symbol was >= nsym). Channel i uses start[i % period], width[i % period]
// (period 1 or d). The scratch is per thread: one writer or reader per thread at a time.
class SlotsWriter : public RowWriter {
 public:
  std::string open(int64_t max_rows, int64_t d, const uint8_t* start, const uint8_t* width, int64_t period, int nsym,
                   uint8_t* out, int64_t capacity);
  void row(const uint8_t* sym) override;
  int64_t close();

 private:
  std::shared_ptr<const SlotsLayout> layout_;
  const SlotsRowKernels* kernels_ = nullptr;
  std::vector<uint8_t> group_;  // the slot values of the group's rows so far
  SlotsEscapes x_{};
  uint8_t *out_ = nullptr, *at_ = nullptr;
  int maxsym_ = 0;
  int64_t rows_ = 0;
};

// Row-at-a-time decoder: open validates the head and the exact length; row() writes the next coded
// row's d symbols (false: the stream is invalid); close() checks that every escape was used (and
// the padding is 0) and reports how many decoded symbols equal count_of.
class SlotsReader : public RowReader {
 public:
  std::string open(const uint8_t* data, int64_t len, int64_t rows, int64_t d, const uint8_t* start,
                   const uint8_t* width, int64_t period, int nsym, int count_of);
  bool row(uint8_t* out) override;
  std::string close(int64_t* count);

 private:
  void next_group();  // the next group's slot values into group_

  std::shared_ptr<const SlotsLayout> layout_;
  const SlotsRowKernels* kernels_ = nullptr;
  std::vector<uint8_t> group_, tail_;  // the group's slot values; a copy of the last group's chunks
  SlotsEscapes x_{};
  const uint8_t *in_ = nullptr, *end_ = nullptr;  // the next group's chunks, the end of the slots
  int64_t rows_ = 0, row_ = 0, tail_bits_ = 0, count_ = 0;
  int count_of_ = -1;
};

extern const char* const kSlotsRowError;  // why SlotsReader::row failed

// Encodes the rows of sym [T, d] whose raw[t] is 0 (raw may be null: every row). Returns the
// stream length, or -1 when a symbol or parameter is out of range or out (capacity bytes) is
// smaller than slots_capacity of the coded rows.
int64_t slots_encode(const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw, const uint8_t* start,
                     const uint8_t* width, int64_t period, int nsym, uint8_t* out, int64_t capacity);

// Decodes a stream of exactly len bytes into out [T, d]: the coded rows (raw[t] == 0), raw rows set
// to 0. Returns "" or why the stream is invalid. When count_of is in [0, 256), *count receives how
// many decoded symbols of coded rows equal it.
std::string slots_decode(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                         const uint8_t* start, const uint8_t* width, int64_t period, int nsym, uint8_t* out,
                         int count_of, int64_t* count);

// Instruction sets of the coder ("scalar", "avx2" where AVX2 + BMI2 run, then "avx512" where AVX-512
// BW + VBMI + VBMI2 and GFNI run), the one in use, and a switch between them ("" or why not).
std::vector<std::string> slots_isas();
std::string slots_isa();
std::string set_slots_isa(const std::string& name);

}  // namespace sk
