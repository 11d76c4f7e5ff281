// Row-at-a-time symbol coders: the fused codec v2 passes (codec_v2.cpp) quantise a token and hand
// its symbols to a writer, or take a token's symbols from a reader and dequantise them, while the
// row is still in L1. The nibble (nibble.h) and bit-plane (planes.h) coders implement these.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace sk {

class RowWriter {
 public:
  virtual ~RowWriter() = default;
  virtual void row(const uint8_t* sym) = 0;  // the next coded row's d symbols
};

class RowReader {
 public:
  virtual ~RowReader() = default;
  virtual bool row(uint8_t* out) = 0;  // the next coded row's d symbols; false: the stream is invalid
};

// Per-thread scratch of n bytes plus 64 for whole-vector stores and loads (the coders' exception
// symbols), kept so a long frame does not allocate every call: one coder per thread at a time.
inline uint8_t* row_scratch(int64_t n) {
  thread_local std::vector<uint8_t> buf;
  if (static_cast<int64_t>(buf.size()) < n + 64) buf.resize(static_cast<size_t>(n + 64));
  return buf.data();
}

// Rows of [T, d] whose raw flag is 0 (raw may be null: every row).
inline int64_t coded_rows(int64_t T, const uint8_t* raw) {
  int64_t rows = 0;
  for (int64_t t = 0; t < T; ++t) rows += !(raw && raw[t]);
  return rows;
}

// The coded rows of sym [T, d] to an opened writer, in order.
inline void write_rows(RowWriter& w, const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw) {
  for (int64_t t = 0; t < T; ++t)
    if (!(raw && raw[t])) w.row(sym + t * d);
}

// out [T, d] from an opened reader: coded rows decoded in order, raw rows set to 0. False when a
// row is invalid.
inline bool read_rows(RowReader& r, int64_t T, int64_t d, const uint8_t* raw, uint8_t* out) {
  for (int64_t t = 0; t < T; ++t) {
    uint8_t* o = out + t * d;
    if (raw && raw[t]) {
      std::memset(o, 0, d);
    } else if (!r.row(o)) {
      return false;
    }
  }
  return true;
}

// The coded rows of sym [T, d] through a fresh Writer whose open() takes two per-channel parameter
// arrays (channel i takes entry i % period): the stream length, or -1 when T, a symbol or a
// parameter is out of range or out (capacity bytes) is too small.
template <class Writer>
int64_t encode_rows(const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw, const uint8_t* first,
                    const uint8_t* second, int64_t period, int nsym, uint8_t* out, int64_t capacity) {
  Writer w;
  if (!w.open(T < 0 ? -1 : coded_rows(T, raw), d, first, second, period, nsym, out, capacity).empty()) return -1;
  write_rows(w, sym, T, d, raw);
  return w.close();
}

// A stream of exactly len bytes into out [T, d] through a fresh Reader of the same parameters (raw
// rows set to 0): "" or why it is invalid (row_error when a row is); *count as Reader::close.
template <class Reader>
std::string decode_rows(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                        const uint8_t* first, const uint8_t* second, int64_t period, int nsym, uint8_t* out,
                        int count_of, int64_t* count, const char* row_error) {
  Reader r;
  std::string err = r.open(data, len, T < 0 ? -1 : coded_rows(T, raw), d, first, second, period, nsym, count_of);
  if (!err.empty()) return err;
  return read_rows(r, T, d, raw, out) ? r.close(count) : row_error;
}

}  // namespace sk
