// pack_bits / unpack_bits: the little-endian bit stream of docs/FORMATS.md section 1, bits 1..8.
#pragma once

#include "common.cuh"

namespace sk {
namespace cuda {
namespace kernels {

constexpr int kPackThreads = 256;

// One thread per output byte: it gathers the (at most 8) codes overlapping its 8 stream bits,
// so every byte is written exactly once and no atomics are needed.
__global__ void pack_bits_kernel(const std::uint8_t* __restrict__ codes, std::uint8_t* __restrict__ packed,
                                 std::int64_t rows, std::int64_t n, std::int64_t nbytes, int bits) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * nbytes) return;
  const std::int64_t row = i / nbytes;
  const std::int64_t byte = i - row * nbytes;
  const std::uint8_t* src = codes + row * n;
  const unsigned mask = (1u << bits) - 1u;
  const std::int64_t bit0 = byte * 8;
  const std::int64_t first = bit0 / bits;
  const std::int64_t last = min(n - 1, (bit0 + 7) / bits);
  unsigned acc = 0;
  for (std::int64_t c = first; c <= last; ++c) {
    const int off = static_cast<int>(c * bits - bit0);  // in (-bits, 8)
    const unsigned code = src[c] & mask;
    acc |= off >= 0 ? code << off : code >> -off;
  }
  packed[i] = static_cast<std::uint8_t>(acc & 0xffu);
}

// One thread per code; a code spans at most two bytes.
__global__ void unpack_bits_kernel(const std::uint8_t* __restrict__ packed, std::uint8_t* __restrict__ codes,
                                   std::int64_t rows, std::int64_t n, std::int64_t stride, int bits) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * n) return;
  const std::int64_t row = i / n;
  const std::int64_t c = i - row * n;
  const std::uint8_t* src = packed + row * stride;
  const std::int64_t bit0 = c * bits;
  const std::int64_t byte = bit0 >> 3;
  const int shift = static_cast<int>(bit0 & 7);
  unsigned v = src[byte];
  if (shift + bits > 8) v |= static_cast<unsigned>(src[byte + 1]) << 8;
  codes[i] = static_cast<std::uint8_t>((v >> shift) & ((1u << bits) - 1u));
}

}  // namespace kernels
}  // namespace cuda
}  // namespace sk
