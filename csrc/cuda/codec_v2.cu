// Launchers of the codec v2 kernels (codec_v2.cuh): three launches per direction on one stream,
// one for a frame of one token.
#include "codec_v2.cuh"
#include "launchers.h"

namespace sk {
namespace cuda {
namespace {

using namespace kernels;

// The packed buffer (splitkernels/codec/v2_device.py): int64 header at 0, raw flags at
// kV2HeaderBytes, symbols at sym_off, values (escapes, then raw tokens) at val_off.
struct Packed {
  std::int64_t* header;
  std::uint8_t* raw;
  std::uint8_t* sym;
  std::uint8_t* values;
};

// Per-token scratch, int64 [4, T]: escape counts, non-finite counts, escape offsets, raw offsets
// (none for T = 1: the pointer may be 0).
struct Scratch {
  std::int64_t *cnt, *nonfinite, *esc_off, *raw_off;
};

Packed packed_at(ptr_t packed, std::int64_t t, std::int64_t d, std::int64_t sym_off, std::int64_t val_off) {
  if (sym_off < kV2HeaderBytes + t || sym_off % 16 || val_off < sym_off + t * d || val_off % 16) {
    throw std::invalid_argument("codec v2: packed buffer offsets do not fit T = " + std::to_string(t) +
                                ", d = " + std::to_string(d));
  }
  auto* base = reinterpret_cast<std::uint8_t*>(packed);
  return {reinterpret_cast<std::int64_t*>(base), base + kV2HeaderBytes, base + sym_off, base + val_off};
}

Scratch scratch_at(ptr_t scratch, std::int64_t t) {
  auto* s = reinterpret_cast<std::int64_t*>(scratch);
  return {s, s + t, s + 2 * t, s + 3 * t};
}

void check_v2(std::int64_t t, std::int64_t d, int kmax) {
  if (t < 1 || t > 0x7fffffff) throw std::invalid_argument("codec v2 kernels need 1 <= T < 2^31");
  if (d < 1 || d > 0x7fffffff) throw std::invalid_argument("codec v2 kernels need 1 <= d < 2^31");
  if (kmax < 1 || kmax > 127) throw std::invalid_argument("codec v2: kmax must be in [1, 127]");
}

template <typename T>
void launch_encode(ptr_t x, std::int64_t t, std::int64_t d, ptr_t center, ptr_t inv, int kmax, int raw_limit,
                   const Packed& p, const Scratch& s, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(t);
  const int di = static_cast<int>(d);
  if (t == 1) {
    v2_encode_token_kernel<T><<<1, kV2Threads, 0, stream>>>(
        reinterpret_cast<const T*>(x), di, reinterpret_cast<const float*>(center), reinterpret_cast<const float*>(inv),
        kmax, raw_limit, p.raw, p.sym, p.header, reinterpret_cast<T*>(p.values));
    return check_launch("v2_encode_token launch");
  }
  v2_quantise_kernel<T><<<grid, kV2Threads, 0, stream>>>(reinterpret_cast<const T*>(x), di,
                                                          reinterpret_cast<const float*>(center),
                                                          reinterpret_cast<const float*>(inv), kmax, raw_limit, p.raw,
                                                          p.sym, s.cnt, s.nonfinite);
  check_launch("v2_quantise launch");
  v2_scan_kernel<<<1, kV2Threads, 0, stream>>>(t, p.raw, s.cnt, s.nonfinite, s.esc_off, s.raw_off, p.header);
  check_launch("v2_scan launch");
  v2_gather_kernel<T><<<grid, kV2Threads, 0, stream>>>(reinterpret_cast<const T*>(x), di, kmax, p.raw, p.sym, s.cnt,
                                                        s.esc_off, s.raw_off, p.header,
                                                        reinterpret_cast<T*>(p.values));
  check_launch("v2_gather launch");
}

template <typename T>
void launch_decode(const Packed& p, std::int64_t n_escapes, std::int64_t t, std::int64_t d, ptr_t step, ptr_t center,
                   int kmax, ptr_t out, const Scratch& s, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(t);
  const int di = static_cast<int>(d);
  if (t == 1) {
    v2_dequantise_kernel<T><<<1, kV2Threads, 0, stream>>>(
        p.raw, p.sym, di, reinterpret_cast<const float*>(step), reinterpret_cast<const float*>(center), kmax,
        reinterpret_cast<const T*>(p.values), n_escapes, nullptr, nullptr, nullptr, reinterpret_cast<T*>(out));
    return check_launch("v2_dequantise launch");
  }
  v2_count_kernel<<<grid, kV2Threads, 0, stream>>>(p.sym, di, kmax, p.raw, s.cnt);
  check_launch("v2_count launch");
  v2_scan_kernel<<<1, kV2Threads, 0, stream>>>(t, p.raw, s.cnt, nullptr, s.esc_off, s.raw_off, p.header);
  check_launch("v2_scan launch");
  v2_dequantise_kernel<T><<<grid, kV2Threads, 0, stream>>>(
      p.raw, p.sym, di, reinterpret_cast<const float*>(step), reinterpret_cast<const float*>(center), kmax,
      reinterpret_cast<const T*>(p.values), n_escapes, s.cnt, s.esc_off, s.raw_off, reinterpret_cast<T*>(out));
  check_launch("v2_dequantise launch");
}

void check_dtype(int dtype, const char* who) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16) {
    throw std::invalid_argument(std::string(who) + ": unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace

void v2_encode(ptr_t x, int dtype, std::int64_t t, std::int64_t d, ptr_t center, ptr_t inv, int kmax,
               std::int64_t raw_limit, ptr_t packed, std::int64_t sym_off, std::int64_t val_off, ptr_t scratch,
               ptr_t stream) {
  check_v2(t, d, kmax);
  if (raw_limit < 0 || raw_limit > d) throw std::invalid_argument("codec v2: raw_limit must be in [0, d]");
  check_dtype(dtype, "v2_encode");
  const Packed p = packed_at(packed, t, d, sym_off, val_off);
  const Scratch s = scratch_at(scratch, t);
  const int rl = static_cast<int>(raw_limit);
  switch (dtype) {
    case kFloat32: return launch_encode<float>(x, t, d, center, inv, kmax, rl, p, s, as_stream(stream));
    case kFloat16: return launch_encode<__half>(x, t, d, center, inv, kmax, rl, p, s, as_stream(stream));
    default: return launch_encode<__nv_bfloat16>(x, t, d, center, inv, kmax, rl, p, s, as_stream(stream));
  }
}

void v2_decode(ptr_t packed, std::int64_t sym_off, std::int64_t val_off, std::int64_t n_escapes, std::int64_t t,
               std::int64_t d, ptr_t step, ptr_t center, int kmax, int dtype, ptr_t out, ptr_t scratch,
               ptr_t stream) {
  check_v2(t, d, kmax);
  if (n_escapes < 0) throw std::invalid_argument("codec v2: n_escapes must be >= 0");
  check_dtype(dtype, "v2_decode");
  const Packed p = packed_at(packed, t, d, sym_off, val_off);
  const Scratch s = scratch_at(scratch, t);
  switch (dtype) {
    case kFloat32: return launch_decode<float>(p, n_escapes, t, d, step, center, kmax, out, s, as_stream(stream));
    case kFloat16: return launch_decode<__half>(p, n_escapes, t, d, step, center, kmax, out, s, as_stream(stream));
    default:
      return launch_decode<__nv_bfloat16>(p, n_escapes, t, d, step, center, kmax, out, s, as_stream(stream));
  }
}

}  // namespace cuda
}  // namespace sk
