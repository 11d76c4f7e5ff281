// Launchers of the fused TS + TAB-Q codec kernels.
#include "codec.cuh"
#include "launchers.h"

namespace sk {
namespace cuda {
namespace {

using namespace kernels;

template <typename T>
void launch_encode(ptr_t x, std::int64_t t, std::int64_t d, bool abs_threshold, double threshold,
                   std::int64_t capacity, int bit_menu, double eps, ptr_t forced_bits, ptr_t bits, ptr_t lo,
                   ptr_t step, ptr_t hi, ptr_t cnt, ptr_t idx, ptr_t val, ptr_t codes, ptr_t nbytes, ptr_t stream) {
  const std::size_t smem = static_cast<std::size_t>((d + 31) / 32) * sizeof(unsigned);
  encode_kernel<T><<<static_cast<unsigned>(t), kCodecThreads, smem, as_stream(stream)>>>(
      reinterpret_cast<const T*>(x), static_cast<int>(d), abs_threshold, threshold, static_cast<int>(capacity),
      bit_menu, eps, reinterpret_cast<const std::uint8_t*>(forced_bits), reinterpret_cast<std::uint8_t*>(bits),
      reinterpret_cast<__half*>(lo), reinterpret_cast<__half*>(step), reinterpret_cast<float*>(hi),
      reinterpret_cast<int*>(cnt), reinterpret_cast<int*>(idx), reinterpret_cast<T*>(val),
      reinterpret_cast<std::uint8_t*>(codes), reinterpret_cast<int*>(nbytes));
  check_launch("ts_tabq_encode launch");
}

template <typename T>
void launch_decode(ptr_t bits, ptr_t lo, ptr_t step, ptr_t cnt, ptr_t idx, ptr_t val, ptr_t codes, std::int64_t t,
                   std::int64_t d, std::int64_t capacity, std::int64_t stride, ptr_t out, ptr_t stream) {
  decode_kernel<T><<<static_cast<unsigned>(t), kCodecThreads, 0, as_stream(stream)>>>(
      reinterpret_cast<const std::uint8_t*>(bits), reinterpret_cast<const __half*>(lo),
      reinterpret_cast<const __half*>(step), reinterpret_cast<const int*>(cnt), reinterpret_cast<const int*>(idx),
      reinterpret_cast<const T*>(val), reinterpret_cast<const std::uint8_t*>(codes), static_cast<int>(d),
      static_cast<int>(capacity), stride, reinterpret_cast<T*>(out));
  check_launch("ts_tabq_decode launch");
}

void check_rows(std::int64_t t, std::int64_t d) {
  if (t < 1 || t > 0x7fffffff) throw std::invalid_argument("codec kernels need 1 <= T < 2^31");
  if (d < 1 || d > kCodecMaxD) {
    throw std::invalid_argument("codec kernels need 1 <= d <= " + std::to_string(kCodecMaxD) + ", got " +
                                std::to_string(d));
  }
}

}  // namespace

void ts_tabq_encode(ptr_t x, int dtype, std::int64_t t, std::int64_t d, bool abs_threshold, double threshold,
                    std::int64_t capacity, int bit_menu, double eps, ptr_t forced_bits, ptr_t bits, ptr_t lo,
                    ptr_t step, ptr_t hi, ptr_t cnt, ptr_t idx, ptr_t val, ptr_t codes, ptr_t nbytes, ptr_t stream) {
  check_rows(t, d);
  if (capacity < 0 || capacity > d) throw std::invalid_argument("capacity must be in [0, d]");
  switch (dtype) {
    case kFloat32:
      return launch_encode<float>(x, t, d, abs_threshold, threshold, capacity, bit_menu, eps, forced_bits, bits, lo,
                                  step, hi, cnt, idx, val, codes, nbytes, stream);
    case kFloat16:
      return launch_encode<__half>(x, t, d, abs_threshold, threshold, capacity, bit_menu, eps, forced_bits, bits, lo,
                                   step, hi, cnt, idx, val, codes, nbytes, stream);
    case kBFloat16:
      return launch_encode<__nv_bfloat16>(x, t, d, abs_threshold, threshold, capacity, bit_menu, eps, forced_bits,
                                          bits, lo, step, hi, cnt, idx, val, codes, nbytes, stream);
    default:
      throw std::invalid_argument("ts_tabq_encode: unknown dtype code " + std::to_string(dtype));
  }
}

void ts_tabq_decode(ptr_t bits, ptr_t lo, ptr_t step, ptr_t cnt, ptr_t idx, ptr_t val, ptr_t codes, int dtype,
                    std::int64_t t, std::int64_t d, std::int64_t capacity, std::int64_t codes_stride, ptr_t out,
                    ptr_t stream) {
  check_rows(t, d);
  switch (dtype) {
    case kFloat32:
      return launch_decode<float>(bits, lo, step, cnt, idx, val, codes, t, d, capacity, codes_stride, out, stream);
    case kFloat16:
      return launch_decode<__half>(bits, lo, step, cnt, idx, val, codes, t, d, capacity, codes_stride, out, stream);
    case kBFloat16:
      return launch_decode<__nv_bfloat16>(bits, lo, step, cnt, idx, val, codes, t, d, capacity, codes_stride, out,
                                          stream);
    default:
      throw std::invalid_argument("ts_tabq_decode: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace cuda
}  // namespace sk
