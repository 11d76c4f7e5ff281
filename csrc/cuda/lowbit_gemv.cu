// Launchers of the low-bit GEMV and dequantisation kernels.
#include "lowbit_gemv.cuh"
#include "launchers.h"

#include <atomic>

namespace sk {
namespace cuda {
namespace {

using namespace kernels;
static_assert(kGemvRowsPerBlock == kGemvTileRows, "launchers.h tells the glue the GEMV's tile height");

// The SM count of the current device, asked once per device.
int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  if (device < 0 || device >= kMaxDevices) throw std::runtime_error("lowbit_gemv: device index out of range");
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    check(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

struct GemvArgs {
  ptr_t x, qweight, scale, zero, bias, y, partial, tile_done;
  int m, k, group_size;
  std::int64_t n;
  GemvSplit split;
  cudaStream_t stream;
};

template <typename T>
void launch_gemv_tc(const GemvArgs& a) {
  const std::int64_t tiles = (a.n + kTcRowsPerBlock - 1) / kTcRowsPerBlock;
  const unsigned grid = static_cast<unsigned>(tiles * a.split.splits);
  gemv_tc_kernel<T><<<grid, kTcThreads, 0, a.stream>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<const std::uint32_t*>(a.qweight),
      reinterpret_cast<const T*>(a.scale), reinterpret_cast<const T*>(a.zero), reinterpret_cast<const T*>(a.bias),
      reinterpret_cast<T*>(a.y), reinterpret_cast<float*>(a.partial), reinterpret_cast<int*>(a.tile_done), a.m, a.n,
      a.k, a.group_size, a.split.splits, a.split.chunks);
}

template <typename T, int kBits, int kMaxM>
void launch_gemv_m(const GemvArgs& a) {
  const std::int64_t tiles = (a.n + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock;
  const unsigned grid = static_cast<unsigned>(tiles * a.split.splits);
  gemv_kernel<T, kBits, kMaxM><<<grid, kGemvThreads, 0, a.stream>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<const std::uint32_t*>(a.qweight),
      reinterpret_cast<const T*>(a.scale), reinterpret_cast<const T*>(a.zero), reinterpret_cast<const T*>(a.bias),
      reinterpret_cast<T*>(a.y), reinterpret_cast<float*>(a.partial), reinterpret_cast<int*>(a.tile_done), a.m, a.n,
      a.k, a.group_size, a.split.splits, a.split.chunks);
}

// One kernel per accumulator budget: M = 1 (the decode step), 2, 3..4, 5..8, 9..16.
template <typename T, int kBits>
void launch_gemv_bits(const GemvArgs& a) {
  if (a.m == 1) return launch_gemv_m<T, kBits, 1>(a);
  if (a.m == 2) return launch_gemv_m<T, kBits, 2>(a);
  if (a.m <= 4) return launch_gemv_m<T, kBits, 4>(a);
  if (a.m <= 8) return launch_gemv_m<T, kBits, 8>(a);
  return launch_gemv_m<T, kBits, 16>(a);
}

template <typename T>
void launch_gemv(const GemvArgs& a, int bits) {
  switch (bits) {
    case 2: return launch_gemv_bits<T, 2>(a);
    case 3: return launch_gemv_bits<T, 3>(a);
    case 4: return launch_gemv_bits<T, 4>(a);
    case 8: return launch_gemv_bits<T, 8>(a);
    default: throw std::invalid_argument("lowbit_gemv: bits must be 2, 3, 4 or 8, got " + std::to_string(bits));
  }
}

}  // namespace

int gemv_splits(std::int64_t m, std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, int dtype) {
  return gemv_splits_for_shape(m, n, k, bits, group_size, dtype, sm_count());
}

void lowbit_gemv(ptr_t x, ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t bias, ptr_t y, int dtype, std::int64_t m,
                 std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, int splits, ptr_t partial,
                 ptr_t tile_done, ptr_t stream) {
  if (m < 1 || m > kGemvMaxM) throw std::invalid_argument("lowbit_gemv: M must be in 1..16, got " + std::to_string(m));
  if (group_size <= 0 || group_size % 32 != 0 || k % group_size != 0 || k >= (std::int64_t{1} << 31)) {
    throw std::invalid_argument("lowbit_gemv: needs group_size % 32 == 0, group_size | K and K < 2^31");
  }
  if (splits < 1 || splits > kGemvMaxSplits) {
    throw std::invalid_argument("lowbit_gemv: splits must be in 1..16, got " + std::to_string(splits));
  }
  if (n == 0) return;
  if (n > (std::int64_t{1} << 34)) throw std::invalid_argument("lowbit_gemv: N is too large");
  for (ptr_t p : {x, qweight, scale, zero, y}) {
    if (p % 16 != 0) throw std::invalid_argument("lowbit_gemv: tensors must be 16-byte aligned");
  }
  const GemvSplit split = gemv_split(k, splits);
  if (split.splits > 1 && (partial == 0 || tile_done == 0)) {
    throw std::invalid_argument("lowbit_gemv: split-K needs the partial and tile_done workspaces");
  }
  const GemvArgs a{x, qweight, scale, zero, bias, y, partial, tile_done, static_cast<int>(m), static_cast<int>(k),
                   static_cast<int>(group_size), n, split, as_stream(stream)};
  if (gemv_uses_tc(m, bits, group_size, dtype)) {
    if (dtype == kFloat16) launch_gemv_tc<__half>(a);
    else launch_gemv_tc<__nv_bfloat16>(a);
    check_launch("lowbit_gemv launch");
    return;
  }
  switch (dtype) {
    case kFloat32: launch_gemv<float>(a, bits); break;
    case kFloat16: launch_gemv<__half>(a, bits); break;
    case kBFloat16: launch_gemv<__nv_bfloat16>(a, bits); break;
    default: throw std::invalid_argument("lowbit_gemv: unknown dtype code " + std::to_string(dtype));
  }
  check_launch("lowbit_gemv launch");
}

void dequantize_weight(ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t w, int dtype, std::int64_t n, std::int64_t k,
                       int bits, std::int64_t group_size, ptr_t stream) {
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8) {
    throw std::invalid_argument("dequantize_weight: bits must be 2, 3, 4 or 8, got " + std::to_string(bits));
  }
  if (group_size <= 0 || k % group_size != 0) throw std::invalid_argument("dequantize_weight: group_size must divide K");
  if (n * k == 0) return;
  const unsigned grid = grid_for(n * k, kDequantThreads);
  const auto* qp = reinterpret_cast<const std::uint32_t*>(qweight);
  auto* wp = reinterpret_cast<float*>(w);
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case kFloat32:
      dequantize_kernel<float><<<grid, kDequantThreads, 0, s>>>(qp, reinterpret_cast<const float*>(scale),
                                                          reinterpret_cast<const float*>(zero), wp, n, k, bits,
                                                          group_size);
      break;
    case kFloat16:
      dequantize_kernel<__half><<<grid, kDequantThreads, 0, s>>>(qp, reinterpret_cast<const __half*>(scale),
                                                           reinterpret_cast<const __half*>(zero), wp, n, k, bits,
                                                           group_size);
      break;
    case kBFloat16:
      dequantize_kernel<__nv_bfloat16><<<grid, kDequantThreads, 0, s>>>(qp, reinterpret_cast<const __nv_bfloat16*>(scale),
                                                                  reinterpret_cast<const __nv_bfloat16*>(zero), wp, n,
                                                                  k, bits, group_size);
      break;
    default:
      throw std::invalid_argument("dequantize_weight: unknown dtype code " + std::to_string(dtype));
  }
  check_launch("dequantize_weight launch");
}

}  // namespace cuda
}  // namespace sk
