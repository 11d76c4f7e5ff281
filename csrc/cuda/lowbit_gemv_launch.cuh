// GEMV launch templates, instantiated once per activation dtype in lowbit_gemv_{f32,f16,bf16}.cu
// so the kernels compile in parallel; lowbit_gemv.cu validates and dispatches.
#pragma once

#include <type_traits>

#include "launchers.h"
#include "lowbit_gemv.cuh"

namespace sk {
namespace cuda {
namespace gemv_launch {

using namespace kernels;

struct GemvArgs {
  ptr_t x, qweight, scale, zero, bias, y, partial, tile_done;
  int m, k, group_size;
  std::int64_t n;
  GemvSplit split;
  cudaStream_t stream;
  int variant;  // kVariant* bits (launchers.h); 0 = the default kernels
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

template <typename T, int kBits, int kMaxM, bool kPrefetch = false>
void launch_gemv_m(const GemvArgs& a) {
  const std::int64_t tiles = (a.n + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock;
  const unsigned grid = static_cast<unsigned>(tiles * a.split.splits);
  gemv_kernel<T, kBits, kMaxM, kPrefetch><<<grid, kGemvThreads, 0, a.stream>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<const std::uint32_t*>(a.qweight),
      reinterpret_cast<const T*>(a.scale), reinterpret_cast<const T*>(a.zero), reinterpret_cast<const T*>(a.bias),
      reinterpret_cast<T*>(a.y), reinterpret_cast<float*>(a.partial), reinterpret_cast<int*>(a.tile_done), a.m, a.n,
      a.k, a.group_size, a.split.splits, a.split.chunks);
}

// One kernel per accumulator budget: M = 1 (the decode step), 2, 3..4, 5..8, 9..16.
template <typename T, int kBits>
void launch_gemv_bits(const GemvArgs& a) {
  if (a.m == 1) {
    if (a.variant & kVariantCcPrefetch) return launch_gemv_m<T, kBits, 1, true>(a);
    return launch_gemv_m<T, kBits, 1>(a);
  }
  if (a.m == 2) return launch_gemv_m<T, kBits, 2>(a);
  if (a.m <= 4) return launch_gemv_m<T, kBits, 4>(a);
  if (a.m <= 8) return launch_gemv_m<T, kBits, 8>(a);
  return launch_gemv_m<T, kBits, 16>(a);
}

// Every GEMV launch for activations of type T; `tc` picks the tensor-core kernel (fp16/bf16).
template <typename T>
void launch_gemv(const GemvArgs& a, int bits, bool tc) {
  if constexpr (!std::is_same_v<T, float>) {
    if (tc) return launch_gemv_tc<T>(a);
  }
  switch (bits) {
    case 2: return launch_gemv_bits<T, 2>(a);
    case 3: return launch_gemv_bits<T, 3>(a);
    case 4: return launch_gemv_bits<T, 4>(a);
    case 8: return launch_gemv_bits<T, 8>(a);
    default: throw std::invalid_argument("lowbit_gemv: bits must be 2, 3, 4 or 8, got " + std::to_string(bits));
  }
}

extern template void launch_gemv<float>(const GemvArgs&, int, bool);
extern template void launch_gemv<__half>(const GemvArgs&, int, bool);
extern template void launch_gemv<__nv_bfloat16>(const GemvArgs&, int, bool);

}  // namespace gemv_launch
}  // namespace cuda
}  // namespace sk
