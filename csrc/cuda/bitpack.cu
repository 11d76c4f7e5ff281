// pack_bits / unpack_bits: the little-endian bit stream of docs/FORMATS.md section 1, bits 1..8.
#include "common.cuh"
#include "launchers.h"

namespace sk {
namespace cuda {
namespace {

constexpr int kThreads = 256;

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

void check_bits(int bits) {
  if (bits < 1 || bits > 8) throw std::invalid_argument("bits must be in 1..8, got " + std::to_string(bits));
}

}  // namespace

void pack_bits(ptr_t codes, ptr_t packed, std::int64_t rows, std::int64_t n, int bits, ptr_t stream) {
  check_bits(bits);
  const std::int64_t nbytes = (n * bits + 7) / 8;
  if (rows * nbytes == 0) return;
  pack_bits_kernel<<<grid_for(rows * nbytes, kThreads), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const std::uint8_t*>(codes), reinterpret_cast<std::uint8_t*>(packed), rows, n, nbytes, bits);
  check_launch("pack_bits launch");
}

void unpack_bits(ptr_t packed, ptr_t codes, std::int64_t rows, std::int64_t n, std::int64_t packed_stride, int bits,
                 ptr_t stream) {
  check_bits(bits);
  if (packed_stride < (n * bits + 7) / 8) throw std::invalid_argument("unpack_bits: packed rows are too short");
  if (rows * n == 0) return;
  unpack_bits_kernel<<<grid_for(rows * n, kThreads), kThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const std::uint8_t*>(packed), reinterpret_cast<std::uint8_t*>(codes), rows, n, packed_stride,
      bits);
  check_launch("unpack_bits launch");
}

int device_count() {
  int count = 0;
  check(cudaGetDeviceCount(&count), "device query");
  return count;
}

std::string version_string() {
  int runtime = 0, driver = 0;
  check(cudaRuntimeGetVersion(&runtime), "runtime version query");
  check(cudaDriverGetVersion(&driver), "driver version query");
  auto fmt = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
  return "runtime " + fmt(runtime) + ", driver " + fmt(driver);
}

}  // namespace cuda
}  // namespace sk
