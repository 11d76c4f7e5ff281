// C entry points running the CUDA kernels under cuda_emulation.h, with the launch shapes of
// the real launchers (csrc/cuda/*.cu). Loaded with ctypes by python_tests/test_cuda_backend.py.
#include "cuda_emulation.h"

#include <type_traits>

#include "../bitpack.cuh"
#include "../codec.cuh"
#include "../codec_v2.cuh"
#include "../launchers.h"
#include "../lowbit_gemv.cuh"

using namespace sk::cuda;
using namespace sk::cuda::kernels;

namespace {

template <typename F>
void by_dtype(int dtype, F f) {
  if (dtype == kFloat32) f(float{});
  if (dtype == kFloat16) f(__half{});
  if (dtype == kBFloat16) f(__nv_bfloat16{});
}

}  // namespace

extern "C" {

// Seeds the random interleaving of threads (SK_EMU_SEED sets the first one).
void emu_set_seed(std::uint64_t seed) { sk_emu::rng.seed(seed); }

void emu_pack_bits(const std::uint8_t* codes, std::uint8_t* packed, std::int64_t rows, std::int64_t n, int bits) {
  const std::int64_t nbytes = (n * bits + 7) / 8;
  sk_emu::launch((rows * nbytes + kPackThreads - 1) / kPackThreads, kPackThreads, 0,
                 [=] { pack_bits_kernel(codes, packed, rows, n, nbytes, bits); });
}

void emu_unpack_bits(const std::uint8_t* packed, std::uint8_t* codes, std::int64_t rows, std::int64_t n,
                     std::int64_t stride, int bits) {
  sk_emu::launch((rows * n + kPackThreads - 1) / kPackThreads, kPackThreads, 0,
                 [=] { unpack_bits_kernel(packed, codes, rows, n, stride, bits); });
}

void emu_ts_tabq_encode(const void* x, int dtype, std::int64_t t, std::int64_t d, bool abs_threshold,
                        double threshold, std::int64_t capacity, int bit_menu, double eps,
                        const std::uint8_t* forced_bits, std::uint8_t* bits, void* lo, void* step, float* hi, int* cnt,
                        int* idx, void* val, std::uint8_t* codes, int* nbytes) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sk_emu::launch(static_cast<unsigned>(t), kCodecThreads, (d + 31) / 32 * 4, [=] {
      encode_kernel<T>(static_cast<const T*>(x), static_cast<int>(d), abs_threshold, threshold,
                       static_cast<int>(capacity), bit_menu, eps, forced_bits, bits, static_cast<__half*>(lo),
                       static_cast<__half*>(step), hi, cnt, idx, static_cast<T*>(val), codes, nbytes);
    });
  });
}

void emu_ts_tabq_decode(const std::uint8_t* bits, const void* lo, const void* step, const int* cnt, const int* idx,
                        const void* val, const std::uint8_t* codes, int dtype, std::int64_t t, std::int64_t d,
                        std::int64_t capacity, std::int64_t stride, void* out) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sk_emu::launch(static_cast<unsigned>(t), kCodecThreads, 0, [=] {
      decode_kernel<T>(bits, static_cast<const __half*>(lo), static_cast<const __half*>(step), cnt, idx,
                       static_cast<const T*>(val), codes, static_cast<int>(d), static_cast<int>(capacity), stride,
                       static_cast<T*>(out));
    });
  });
}

// The GEMV with `splits` as the launcher normalises it (partial: fp32 [splits, M, N], tile_done:
// int32 [ceil(N / 16)], zero), on the kernel the launcher picks; emu_gemv_splits is the
// launcher's split count for a device of sm_count SMs.
// The launcher's tensor-core threshold (lowbit_gemv.cu: gemv_tc_min_m), for tests of small M.
static int emu_tc_min_m = kGemvTcMinM;
void emu_set_tc_min_m(int value) { emu_tc_min_m = value; }
// The kernel variants (lowbit_gemv.cu: gemv_variant), so tests check each one.
static int emu_variant = 0;
void emu_set_gemv_variant(int value) { emu_variant = value; }

bool emu_gemv_fused(std::int64_t m, std::int64_t k, int bits, std::int64_t group_size, int dtype) {
  return gemv_supports(m, k, bits, group_size, dtype, emu_tc_min_m);
}

int emu_gemv_splits(std::int64_t m, std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, int dtype,
                    int sm_count) {
  return gemv_splits_for_shape(m, n, k, bits, group_size, dtype, sm_count, emu_tc_min_m);
}

void emu_lowbit_gemv(const void* x, const std::uint32_t* qweight, const void* scale, const void* zero,
                     const void* bias, void* y, int dtype, std::int64_t m, std::int64_t n, std::int64_t k, int bits,
                     std::int64_t group_size, int splits, float* partial, int* tile_done) {
  const GemvSplit split = gemv_split(k, splits, gemv_split_granule(m, bits, group_size, dtype, emu_tc_min_m));
  const int mi = static_cast<int>(m), ki = static_cast<int>(k), gi = static_cast<int>(group_size);
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* xp = static_cast<const T*>(x);
    const auto* sp = static_cast<const T*>(scale);
    const auto* zp = static_cast<const T*>(zero);
    const auto* bp = static_cast<const T*>(bias);
    auto* yp = static_cast<T*>(y);
    if constexpr (!std::is_same_v<T, float>) {  // the tensor-core kernel takes fp16/bf16 only
      if (gemv_uses_tc(m, bits, group_size, dtype, emu_tc_min_m)) {
        const unsigned grid = static_cast<unsigned>((n + kTcRowsPerBlock - 1) / kTcRowsPerBlock * split.splits);
        sk_emu::launch(grid, kTcThreads, 0, [=] {
          gemv_tc_kernel<T>(xp, qweight, sp, zp, bp, yp, partial, tile_done, mi, n, ki, gi, split.splits,
                            split.chunks);
        });
        return;
      }
    }
    const unsigned grid = static_cast<unsigned>((n + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock * split.splits);
    auto run = [&](auto bits_tag, auto m_tag, auto prefetch_tag) {
      constexpr int B = decltype(bits_tag)::value, kMaxM = decltype(m_tag)::value;
      constexpr bool kPrefetch = decltype(prefetch_tag)::value;
      sk_emu::launch(grid, kGemvThreads, 0, [=] {
        gemv_kernel<T, B, kMaxM, kPrefetch>(xp, qweight, sp, zp, bp, yp, partial, tile_done, mi, n, ki, gi,
                                            split.splits, split.chunks);
      });
    };
    auto by_m = [&](auto bits_tag) {  // the launcher's M buckets
      const std::false_type plain;
      if (m == 1 && (emu_variant & kVariantCcPrefetch)) run(bits_tag, std::integral_constant<int, 1>{}, std::true_type{});
      else if (m == 1) run(bits_tag, std::integral_constant<int, 1>{}, plain);
      else if (m == 2) run(bits_tag, std::integral_constant<int, 2>{}, plain);
      else if (m <= 4) run(bits_tag, std::integral_constant<int, 4>{}, plain);
      else if (m <= 8) run(bits_tag, std::integral_constant<int, 8>{}, plain);
      else run(bits_tag, std::integral_constant<int, 16>{}, plain);
    };
    if (bits == 2) by_m(std::integral_constant<int, 2>{});
    if (bits == 3) by_m(std::integral_constant<int, 3>{});
    if (bits == 4) by_m(std::integral_constant<int, 4>{});
    if (bits == 8) by_m(std::integral_constant<int, 8>{});
  });
}

void emu_dequantize_weight(const std::uint32_t* qweight, const void* scale, const void* zero, float* w, int dtype,
                           std::int64_t n, std::int64_t k, int bits, std::int64_t group_size) {
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    sk_emu::launch(static_cast<unsigned>((n * k + kDequantThreads - 1) / kDequantThreads), kDequantThreads, 0, [=] {
      dequantize_kernel<T>(qweight, static_cast<const T*>(scale), static_cast<const T*>(zero), w, n, k, bits,
                           group_size);
    });
  });
}

// The launch sequences of v2_encode / v2_decode (csrc/cuda/codec_v2.cu) on the packed layout of
// launchers.h; scratch is int64 [4 * T] (unused for T = 1: one launch each way).
void emu_v2_encode(const void* x, int dtype, std::int64_t t, std::int64_t d, const float* center, const float* inv,
                   int kmax, std::int64_t raw_limit, std::uint8_t* packed, std::int64_t sym_off, std::int64_t val_off,
                   std::int64_t* scratch) {
  auto* header = reinterpret_cast<std::int64_t*>(packed);
  std::uint8_t* raw = packed + kV2HeaderBytes;
  std::uint8_t* sym = packed + sym_off;
  std::int64_t *cnt = scratch, *bad = scratch + t, *esc_off = scratch + 2 * t, *raw_off = scratch + 3 * t;
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* xp = static_cast<const T*>(x);
    auto* values = reinterpret_cast<T*>(packed + val_off);
    const int di = static_cast<int>(d), rl = static_cast<int>(raw_limit);
    if (t == 1) {
      sk_emu::launch(1, kV2Threads, 0,
                     [=] { v2_encode_token_kernel<T>(xp, di, center, inv, kmax, rl, raw, sym, header, values); });
      return;
    }
    sk_emu::launch(static_cast<unsigned>(t), kV2Threads, 0,
                   [=] { v2_quantise_kernel<T>(xp, di, center, inv, kmax, rl, raw, sym, cnt, bad); });
    sk_emu::launch(1, kV2Threads, 0, [=] { v2_scan_kernel(t, raw, cnt, bad, esc_off, raw_off, header); });
    sk_emu::launch(static_cast<unsigned>(t), kV2Threads, 0,
                   [=] { v2_gather_kernel<T>(xp, di, kmax, raw, sym, cnt, esc_off, raw_off, header, values); });
  });
}

void emu_v2_decode(std::uint8_t* packed, std::int64_t sym_off, std::int64_t val_off, std::int64_t n_escapes,
                   std::int64_t t, std::int64_t d, const float* step, const float* center, int kmax, int dtype, void* out,
                   std::int64_t* scratch) {
  auto* header = reinterpret_cast<std::int64_t*>(packed);
  const std::uint8_t* raw = packed + kV2HeaderBytes;
  const std::uint8_t* sym = packed + sym_off;
  std::int64_t *cnt = scratch, *esc_off = scratch + 2 * t, *raw_off = scratch + 3 * t;
  by_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* values = reinterpret_cast<const T*>(packed + val_off);
    auto* op = static_cast<T*>(out);
    const int di = static_cast<int>(d);
    if (t == 1) {
      sk_emu::launch(1, kV2Threads, 0, [=] {
        v2_dequantise_kernel<T>(raw, sym, di, step, center, kmax, values, n_escapes, nullptr, nullptr, nullptr, op);
      });
      return;
    }
    sk_emu::launch(static_cast<unsigned>(t), kV2Threads, 0, [=] { v2_count_kernel(sym, di, kmax, raw, cnt); });
    sk_emu::launch(1, kV2Threads, 0, [=] { v2_scan_kernel(t, raw, cnt, nullptr, esc_off, raw_off, header); });
    sk_emu::launch(static_cast<unsigned>(t), kV2Threads, 0, [=] {
      v2_dequantise_kernel<T>(raw, sym, di, step, center, kmax, values, n_escapes, cnt, esc_off, raw_off, op);
    });
  });
}

}  // extern "C"
