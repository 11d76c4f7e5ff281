// Launchers of the low-bit GEMV (checks and dispatch; the kernels are instantiated per dtype in
// lowbit_gemv_{f32,f16,bf16}.cu) and of the dequantisation kernel.
#include "lowbit_gemv_launch.cuh"

#include <atomic>

namespace sk {
namespace cuda {
namespace {

using namespace kernels;
using gemv_launch::GemvArgs;
using gemv_launch::launch_gemv;
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

// The smallest M the tensor-core kernel takes (gemv_tc_min_m moves it for benchmarks).
std::atomic<int> tc_min_m{kGemvTcMinM};
// The kernel variants launches take (gemv_variant sets it for bench/gpu_gemv_sweep.py).
std::atomic<int> variant{0};

}  // namespace

int gemv_tc_min_m(int value) {
  if (value < 0 || value > kGemvTcMaxM + 1) {
    throw std::invalid_argument("gemv_tc_min_m: value must be in 0..33 (0 reads), got " + std::to_string(value));
  }
  return value > 0 ? tc_min_m.exchange(value) : tc_min_m.load();
}

int gemv_variant(int value) {
  if (value < -1 || value > kVariantAll) {
    throw std::invalid_argument("gemv_variant: value must be in 0.." + std::to_string(kVariantAll) +
                                " (-1 reads), got " + std::to_string(value));
  }
  return value >= 0 ? variant.exchange(value) : variant.load();
}

bool gemv_fused(std::int64_t m, std::int64_t k, int bits, std::int64_t group_size, int dtype) {
  return gemv_supports(m, k, bits, group_size, dtype, tc_min_m.load());
}

int gemv_splits(std::int64_t m, std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, int dtype) {
  return gemv_splits_for_shape(m, n, k, bits, group_size, dtype, sm_count(), tc_min_m.load());
}

void lowbit_gemv(ptr_t x, ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t bias, ptr_t y, int dtype, std::int64_t m,
                 std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, int splits, ptr_t partial,
                 ptr_t tile_done, ptr_t stream) {
  const int min_m = tc_min_m.load();
  if (!gemv_supports(m, k, bits, group_size, dtype, min_m)) {
    throw std::invalid_argument(
        "lowbit_gemv: takes bits 2, 3, 4 or 8, M in 1..16 (up to 32 for W4 with fp16/bf16 activations and "
        "group_size % 128 == 0), group_size % 32 == 0, group_size | K and K < 2^31; got M = " + std::to_string(m) +
        ", K = " + std::to_string(k) + ", bits = " + std::to_string(bits) + ", group_size = " +
        std::to_string(group_size));
  }
  if (splits < 1 || splits > kGemvMaxSplits) {
    throw std::invalid_argument("lowbit_gemv: splits must be in 1..16, got " + std::to_string(splits));
  }
  if (n == 0) return;
  if (n > (std::int64_t{1} << 34)) throw std::invalid_argument("lowbit_gemv: N is too large");
  for (ptr_t p : {x, qweight, scale, zero, y}) {
    if (p % 16 != 0) throw std::invalid_argument("lowbit_gemv: tensors must be 16-byte aligned");
  }
  const GemvSplit split = gemv_split(k, splits, gemv_split_granule(m, bits, group_size, dtype, min_m));
  if (split.splits > 1 && (partial == 0 || tile_done == 0)) {
    throw std::invalid_argument("lowbit_gemv: split-K needs the partial and tile_done workspaces");
  }
  const GemvArgs a{x, qweight, scale, zero, bias, y, partial, tile_done, static_cast<int>(m), static_cast<int>(k),
                   static_cast<int>(group_size), n, split, as_stream(stream), variant.load()};
  const bool tc = gemv_uses_tc(m, bits, group_size, dtype, min_m);
  switch (dtype) {
    case kFloat32: launch_gemv<float>(a, bits, tc); break;
    case kFloat16: launch_gemv<__half>(a, bits, tc); break;
    case kBFloat16: launch_gemv<__nv_bfloat16>(a, bits, tc); break;
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
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    dequantize_kernel<T><<<grid, kDequantThreads, 0, s>>>(qp, reinterpret_cast<const T*>(scale),
                                                        reinterpret_cast<const T*>(zero), wp, n, k, bits, group_size);
  };
  switch (dtype) {
    case kFloat32: launch(float{}); break;
    case kFloat16: launch(__half{}); break;
    case kBFloat16: launch(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("dequantize_weight: unknown dtype code " + std::to_string(dtype));
  }
  check_launch("dequantize_weight launch");
}

}  // namespace cuda
}  // namespace sk
