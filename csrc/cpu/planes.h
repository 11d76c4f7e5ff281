// Bit-plane Rice coder of codec v2 (docs/FORMATS.md section 5.8), bit-exact with
// splitkernels/codec/planes.py.
//
// Each coded row (token) of d symbols is sent as Rice codes cut into bit planes: the k-bit
// remainders of each block of 64 channels level by level, then the unary quotients plane by plane
// (plane j: "q > j" for every channel with q >= j), so that 64 symbols move per instruction: a byte
// compare into a 64-bit mask, then pext (remainders) and a compress of the survivors (quotients)
// on encode; pdep and an expand on decode.
// Stream: n_x u32 | bits, zero-padded to a byte | n_x exception bytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/bit_io.h"
#include "cpu/row_coder.h"

namespace sk {

constexpr int kPlanesBlock = 64;
constexpr int64_t kPlanesHead = 4;
constexpr int64_t kPlanesSlack = 16;  // the bit writer stores whole 8-byte words

// Bytes that always suffice for the stream of `rows` coded rows of d symbols (a code has at most
// 17 bits, top + 1 + k, and an exception one byte more).
inline int64_t planes_capacity(int64_t rows, int64_t d) { return kPlanesHead + 4 * rows * d + kPlanesSlack; }

struct PlanesLayout;      // per-channel parameters as per-block vectors and masks (planes_rows.h)
struct PlanesRowKernels;  // the row kernels of one instruction set (planes_rows.h)

// Row-at-a-time encoder: open (room for max_rows rows), row() per coded row in order, close() ->
// stream length (-1: a symbol was >= nsym). Symbol i of a row uses centre[i % period], k[i % period]
// (period 1 or d). The scratch is per thread: one writer or reader per thread at a time.
class PlanesWriter : public RowWriter {
 public:
  PlanesWriter();
  ~PlanesWriter() override;
  std::string open(int64_t max_rows, int64_t d, const uint8_t* centre, const uint8_t* k, int64_t period, int nsym,
                   uint8_t* out, int64_t capacity);
  void row(const uint8_t* sym) override;
  int64_t close();

 private:
  std::unique_ptr<PlanesLayout> layout_;
  const PlanesRowKernels* kernels_ = nullptr;
  BitWriter bits_;
  uint8_t *out_ = nullptr, *xs_ = nullptr;
  int maxsym_ = 0;
  int64_t nx_ = 0;
};

// Row-at-a-time decoder: open validates the head and sizes; row() writes the next coded row's d
// symbols (false: the stream is invalid); close() checks that every bit and exception was used
// (padding bits 0) and reports how many decoded symbols equal count_of.
class PlanesReader : public RowReader {
 public:
  PlanesReader();
  ~PlanesReader() override;
  std::string open(const uint8_t* data, int64_t len, int64_t rows, int64_t d, const uint8_t* centre, const uint8_t* k,
                   int64_t period, int nsym, int count_of);
  bool row(uint8_t* out) override;
  std::string close(int64_t* count);

 private:
  std::unique_ptr<PlanesLayout> layout_;
  const PlanesRowKernels* kernels_ = nullptr;
  BitReader bits_;
  const uint8_t* xs_ = nullptr;
  int64_t n_x_ = 0, xi_ = 0, count_ = 0;
  int count_of_ = -1;
};

extern const char* const kPlanesRowError;  // why PlanesReader::row failed

// Encodes the rows of sym [T, d] whose raw[t] is 0 (raw may be null: every row). Returns the
// stream length, or -1 when a symbol or parameter is out of range or out (capacity bytes) is
// smaller than planes_capacity of the coded rows.
int64_t planes_encode(const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw, const uint8_t* centre,
                      const uint8_t* k, int64_t period, int nsym, uint8_t* out, int64_t capacity);

// Decodes a stream of exactly len bytes into out [T, d]: the coded rows (raw[t] == 0), raw rows set
// to 0. Returns "" or why the stream is invalid. When count_of is in [0, 256), *count receives how
// many decoded symbols of coded rows equal it.
std::string planes_decode(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                          const uint8_t* centre, const uint8_t* k, int64_t period, int nsym, uint8_t* out,
                          int count_of, int64_t* count);

// Instruction sets of the coder ("scalar", then "avx512" where AVX-512 BW + VBMI2 and BMI2 run), the
// one in use, and a switch between them ("" or why not).
std::vector<std::string> planes_isas();
std::string planes_isa();
std::string set_planes_isa(const std::string& name);

}  // namespace sk
