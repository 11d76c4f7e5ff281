// Launchers of the bit-stream kernels, and the runtime queries of the module.
#include "bitpack.cuh"
#include "launchers.h"

namespace sk {
namespace cuda {
namespace {

using namespace kernels;

void check_bits(int bits) {
  if (bits < 1 || bits > 8) throw std::invalid_argument("bits must be in 1..8, got " + std::to_string(bits));
}

}  // namespace

void pack_bits(ptr_t codes, ptr_t packed, std::int64_t rows, std::int64_t n, int bits, ptr_t stream) {
  check_bits(bits);
  const std::int64_t nbytes = (n * bits + 7) / 8;
  if (rows * nbytes == 0) return;
  pack_bits_kernel<<<grid_for(rows * nbytes, kPackThreads), kPackThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const std::uint8_t*>(codes), reinterpret_cast<std::uint8_t*>(packed), rows, n, nbytes, bits);
  check_launch("pack_bits launch");
}

void unpack_bits(ptr_t packed, ptr_t codes, std::int64_t rows, std::int64_t n, std::int64_t packed_stride, int bits,
                 ptr_t stream) {
  check_bits(bits);
  if (packed_stride < (n * bits + 7) / 8) throw std::invalid_argument("unpack_bits: packed rows are too short");
  if (rows * n == 0) return;
  unpack_bits_kernel<<<grid_for(rows * n, kPackThreads), kPackThreads, 0, as_stream(stream)>>>(
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
