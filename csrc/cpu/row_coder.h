// Row-at-a-time symbol coders: the fused codec v2 passes (codec_v2.cpp) quantise a token and hand
// its symbols to a writer, or take a token's symbols from a reader and dequantise them, while the
// row is still in L1. The nibble (nibble.h) and bit-plane (planes.h) coders implement these.
#pragma once

#include <cstdint>

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

}  // namespace sk
