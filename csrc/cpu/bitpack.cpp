#include "cpu/bitpack.h"

#include <algorithm>
#include <cstring>

#include "cpu/thread_pool.h"

namespace sk {

void pack_row_bitwise(const uint8_t* codes, int64_t n, int bits, uint8_t* out) {
  const int64_t nbytes = packed_nbytes(n, bits);
  std::memset(out, 0, static_cast<size_t>(nbytes));
  for (int64_t k = 0; k < n; ++k)
    for (int j = 0; j < bits; ++j) {
      const int64_t i = k * bits + j;
      out[i / 8] = static_cast<uint8_t>(out[i / 8] | (((codes[k] >> j) & 1) << (i % 8)));
    }
}

void unpack_row_bitwise(const uint8_t* in, int64_t n, int bits, uint8_t* codes) {
  for (int64_t k = 0; k < n; ++k) {
    int v = 0;
    for (int j = 0; j < bits; ++j) {
      const int64_t i = k * bits + j;
      v |= ((in[i / 8] >> (i % 8)) & 1) << j;
    }
    codes[k] = static_cast<uint8_t>(v);
  }
}

namespace {
// Runs row(r) for every r < rows over the threads, in chunks of about 64K codes (n per row), so
// small frames stay on the calling thread.
template <class Row>
void each_row(int64_t rows, int64_t n, const Row& row) {
  const int64_t per_chunk = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, n));
  parallel_for(rows, per_chunk, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row(r);
  });
}
}  // namespace

void pack_rows(const uint8_t* codes, int64_t rows, int64_t n, int bits, uint8_t* out, bool bitwise) {
  const int64_t nb = packed_nbytes(n, bits);
  each_row(rows, n, [&](int64_t r) {
    if (bitwise)
      pack_row_bitwise(codes + r * n, n, bits, out + r * nb);
    else
      pack_row(codes + r * n, n, bits, out + r * nb);
  });
}

void unpack_rows(const uint8_t* packed, int64_t rows, int64_t in_stride, int64_t n, int bits, uint8_t* codes,
                 bool bitwise) {
  each_row(rows, n, [&](int64_t r) {
    if (bitwise)
      unpack_row_bitwise(packed + r * in_stride, n, bits, codes + r * n);
    else
      unpack_row(packed + r * in_stride, n, bits, codes + r * n);
  });
}

}  // namespace sk
