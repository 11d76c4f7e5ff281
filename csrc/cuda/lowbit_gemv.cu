// Launchers of the low-bit GEMV and dequantisation kernels.
#include "lowbit_gemv.cuh"
#include "launchers.h"

namespace sk {
namespace cuda {
namespace {

using namespace kernels;

template <typename T, int kBits>
void launch_gemv_bits(ptr_t x, ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t bias, ptr_t y, std::int64_t m,
                      std::int64_t n, std::int64_t k, std::int64_t group_size, cudaStream_t stream) {
  const unsigned grid = grid_for(n, kRowsPerBlock);
  const auto* xp = reinterpret_cast<const T*>(x);
  const auto* qp = reinterpret_cast<const std::uint32_t*>(qweight);
  const auto* sp = reinterpret_cast<const T*>(scale);
  const auto* zp = reinterpret_cast<const T*>(zero);
  const auto* bp = reinterpret_cast<const T*>(bias);
  auto* yp = reinterpret_cast<T*>(y);
  const int mi = static_cast<int>(m), ki = static_cast<int>(k), gi = static_cast<int>(group_size);
  // Two register budgets: M = 1 (the decode step) keeps occupancy high; 2..8 share one kernel.
  if (m == 1) {
    gemv_kernel<T, kBits, 1><<<grid, kGemvThreads, 0, stream>>>(xp, qp, sp, zp, bp, yp, mi, n, ki, gi);
  } else {
    gemv_kernel<T, kBits, kGemvMaxM><<<grid, kGemvThreads, 0, stream>>>(xp, qp, sp, zp, bp, yp, mi, n, ki, gi);
  }
}

template <typename T>
void launch_gemv(ptr_t x, ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t bias, ptr_t y, std::int64_t m,
                 std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, cudaStream_t stream) {
  switch (bits) {
    case 2: return launch_gemv_bits<T, 2>(x, qweight, scale, zero, bias, y, m, n, k, group_size, stream);
    case 3: return launch_gemv_bits<T, 3>(x, qweight, scale, zero, bias, y, m, n, k, group_size, stream);
    case 4: return launch_gemv_bits<T, 4>(x, qweight, scale, zero, bias, y, m, n, k, group_size, stream);
    case 8: return launch_gemv_bits<T, 8>(x, qweight, scale, zero, bias, y, m, n, k, group_size, stream);
    default: throw std::invalid_argument("lowbit_gemv: bits must be 2, 3, 4 or 8, got " + std::to_string(bits));
  }
}

}  // namespace

void lowbit_gemv(ptr_t x, ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t bias, ptr_t y, int dtype, std::int64_t m,
                 std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, ptr_t stream) {
  if (m < 1 || m > kGemvMaxM) throw std::invalid_argument("lowbit_gemv: M must be in 1..8");
  if (group_size <= 0 || group_size % 32 != 0 || k % group_size != 0 || k >= (std::int64_t{1} << 31)) {
    throw std::invalid_argument("lowbit_gemv: needs group_size % 32 == 0, group_size | K and K < 2^31");
  }
  if (n == 0) return;
  if (n > (std::int64_t{1} << 34)) throw std::invalid_argument("lowbit_gemv: N is too large");
  for (ptr_t p : {x, qweight, scale, zero, y}) {
    if (p % 16 != 0) throw std::invalid_argument("lowbit_gemv: tensors must be 16-byte aligned");
  }
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case kFloat32: launch_gemv<float>(x, qweight, scale, zero, bias, y, m, n, k, bits, group_size, s); break;
    case kFloat16: launch_gemv<__half>(x, qweight, scale, zero, bias, y, m, n, k, bits, group_size, s); break;
    case kBFloat16: launch_gemv<__nv_bfloat16>(x, qweight, scale, zero, bias, y, m, n, k, bits, group_size, s); break;
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
  const unsigned grid = grid_for(n * k, kGemvThreads);
  const auto* qp = reinterpret_cast<const std::uint32_t*>(qweight);
  auto* wp = reinterpret_cast<float*>(w);
  const cudaStream_t s = as_stream(stream);
  switch (dtype) {
    case kFloat32:
      dequantize_kernel<float><<<grid, kGemvThreads, 0, s>>>(qp, reinterpret_cast<const float*>(scale),
                                                          reinterpret_cast<const float*>(zero), wp, n, k, bits,
                                                          group_size);
      break;
    case kFloat16:
      dequantize_kernel<__half><<<grid, kGemvThreads, 0, s>>>(qp, reinterpret_cast<const __half*>(scale),
                                                           reinterpret_cast<const __half*>(zero), wp, n, k, bits,
                                                           group_size);
      break;
    case kBFloat16:
      dequantize_kernel<__nv_bfloat16><<<grid, kGemvThreads, 0, s>>>(qp, reinterpret_cast<const __nv_bfloat16*>(scale),
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
