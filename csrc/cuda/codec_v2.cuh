// Codec v2 quantiser and dequantiser on the GPU (docs/FORMATS.md sections 5.2 and 5.5), bit-exact
// with csrc/cpu/codec_v2.cpp and the PyTorch reference in splitkernels/codec/v2.py.
//
// Encode is three launches on one stream: v2_quantise_kernel (one block per token: symbols,
// escape and non-finite counts, the raw rule), v2_scan_kernel (one block: exclusive prefix sums
// of the per-token escape and raw counts, the totals) and v2_gather_kernel (one block per token:
// escaped values token-major in channel order, then the raw tokens). Decode is v2_count_kernel,
// the same scan, and v2_dequantise_kernel. A frame of one token (each decode step's) needs no
// scan: v2_encode_token_kernel does all three in one launch, and decode is v2_dequantise_kernel
// alone. Every output lands in one packed byte buffer whose layout splitkernels/codec/v2_device.py
// defines, so the host needs one copy of its prefix.
//
// Arithmetic as the CPU pass: IEEE fp32 subtraction and multiplication spelled with __f*_rn
// intrinsics (never contracted into an FMA), round half to even, exact fp16/bf16 widening and
// round-to-nearest-even narrowing.
#pragma once

#include <cfloat>

#include "block_ops.cuh"

namespace sk {
namespace cuda {
namespace kernels {

constexpr int kV2Threads = 256;
using V2Block = BlockOps<kV2Threads>;

// Words of the packed buffer's int64 header, written by v2_scan_kernel.
constexpr int kV2HeaderEscapes = 0;    // escaped values of the coded tokens
constexpr int kV2HeaderRaw = 1;        // raw tokens
constexpr int kV2HeaderNonFinite = 2;  // NaN/Inf inputs (encode only)

// rint_half_even(v) for |v| < 2^22: the fp32 adder rounds v + 1.5 * 2^23 to an integer, ties to even.
__device__ __forceinline__ float v2_rint(float v) { return __fsub_rn(__fadd_rn(v, 12582912.0f), 12582912.0f); }

// Exclusive prefix sum of v over the block's threads in threadIdx.x order; *total gets the sum.
__device__ inline std::int64_t v2_block_exclusive_sum(std::int64_t v, std::int64_t* scratch, std::int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  std::int64_t inclusive = v;
  for (int o = 1; o < 32; o <<= 1) {
    const std::int64_t up = __shfl_up_sync(kFullMask, inclusive, o);
    if (lane >= o) inclusive += up;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  std::int64_t before = 0, all = 0;
  for (int w = 0; w < V2Block::kWarps; ++w) {
    before += w < warp ? scratch[w] : 0;
    all += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  *total = all;
  return before + inclusive - v;
}

// One token's row by the block: srow[i] = rint(v) + kmax, or the escape symbol 2*kmax+1 where
// !(|v| <= kmax), v = (fp32(x) - center) * inv; a token with more than raw_limit escapes is raw
// (symbols 0). Every thread gets the row's escapes (0 when raw), NaN/Inf count and raw flag.
struct V2RowCounts {
  int escapes, nonfinite;
  bool raw;
};

template <typename T>
__device__ inline V2RowCounts v2_quantise_row(const T* __restrict__ row, int d, const float* __restrict__ center,
                                              const float* __restrict__ inv, int kmax, int raw_limit,
                                              std::uint8_t* __restrict__ srow, int* iscratch) {
  const float k = static_cast<float>(kmax);
  const std::uint8_t esc = static_cast<std::uint8_t>(2 * kmax + 1);
  int n_esc = 0, n_bad = 0;
  for (int i = threadIdx.x; i < d; i += kV2Threads) {
    const float xf = load_f32(row, i);
    n_bad += !(fabsf(xf) <= FLT_MAX);
    const float v = __fmul_rn(__fsub_rn(xf, center[i]), inv[i]);
    const bool e = !(fabsf(v) <= k);  // NaN escapes
    n_esc += e;
    srow[i] = e ? esc : static_cast<std::uint8_t>(static_cast<int>(v2_rint(v)) + kmax);
  }
  n_esc = V2Block::all_reduce(n_esc, iscratch, SumOp());
  n_bad = V2Block::all_reduce(n_bad, iscratch, SumOp());
  const bool is_raw = n_esc > raw_limit;
  if (is_raw) {
    for (int i = threadIdx.x; i < d; i += kV2Threads) srow[i] = 0;  // the bytes this thread wrote
  }
  return {is_raw ? 0 : n_esc, n_bad, is_raw};
}

// One token's values by the block: a raw row whole at raw_dst; else its escaped values (escapes of
// them, symbols in srow) in channel order from values[next]. Exact element copies.
template <typename T>
__device__ inline void v2_gather_row(const T* __restrict__ row, int d, int kmax, bool is_raw, std::int64_t escapes,
                                     const std::uint8_t* __restrict__ srow, std::int64_t next, T* raw_dst, T* values,
                                     int* iscratch) {
  if (is_raw) {
    for (int i = threadIdx.x; i < d; i += kV2Threads) raw_dst[i] = row[i];
    return;
  }
  if (escapes == 0) return;  // uniform over the block
  const std::uint8_t esc = static_cast<std::uint8_t>(2 * kmax + 1);
  for (int base = 0; base < d; base += kV2Threads) {
    const int i = base + threadIdx.x;
    const bool e = i < d && srow[i] == esc;
    // Most tiles hold no escape: one barrier-with-vote skips the ordered count there.
    if (__syncthreads_or(e)) {
      int tile = 0;
      const int before = V2Block::exclusive_count(e, iscratch, &tile);
      if (e) values[next + before] = row[i];
      next += tile;
    }
  }
}

// One block per token: v2_quantise_row, then raw[t], cnt[t] = escapes of a coded token (0 when
// raw), nonfinite[t] = NaN/Inf.
template <typename T>
__global__ void __launch_bounds__(kV2Threads)
    v2_quantise_kernel(const T* __restrict__ x, int d, const float* __restrict__ center, const float* __restrict__ inv,
                       int kmax, int raw_limit, std::uint8_t* __restrict__ raw, std::uint8_t* __restrict__ sym,
                       std::int64_t* __restrict__ cnt, std::int64_t* __restrict__ nonfinite) {
  __shared__ int iscratch[V2Block::kWarps];
  const std::int64_t t = blockIdx.x;
  const V2RowCounts c = v2_quantise_row(x + t * d, d, center, inv, kmax, raw_limit, sym + t * d, iscratch);
  if (threadIdx.x == 0) {
    raw[t] = c.raw;
    cnt[t] = c.escapes;
    nonfinite[t] = c.nonfinite;
  }
}

// A frame of one token in one launch (the per-step encode): the token's row as v2_quantise_kernel,
// the header as v2_scan_kernel (its offsets are 0) and the values as v2_gather_kernel.
template <typename T>
__global__ void __launch_bounds__(kV2Threads)
    v2_encode_token_kernel(const T* __restrict__ x, int d, const float* __restrict__ center,
                           const float* __restrict__ inv, int kmax, int raw_limit, std::uint8_t* __restrict__ raw,
                           std::uint8_t* __restrict__ sym, std::int64_t* __restrict__ header, T* __restrict__ values) {
  __shared__ int iscratch[V2Block::kWarps];
  const V2RowCounts c = v2_quantise_row(x, d, center, inv, kmax, raw_limit, sym, iscratch);
  if (threadIdx.x == 0) {
    raw[0] = c.raw;
    header[kV2HeaderEscapes] = c.escapes;
    header[kV2HeaderRaw] = c.raw;
    header[kV2HeaderNonFinite] = c.nonfinite;
  }
  // No barrier needed: each thread gathers exactly the channels it quantised (both loops stride
  // kV2Threads from threadIdx.x), and the all-reduces' barriers order the shared scratch.
  v2_gather_row(x, d, kmax, c.raw, c.escapes, sym, 0, values, values, iscratch);
}

// Decode's counterpart of the quantiser's counts: cnt[t] = escape symbols of coded token t.
__global__ void __launch_bounds__(kV2Threads)
    v2_count_kernel(const std::uint8_t* __restrict__ sym, int d, int kmax, const std::uint8_t* __restrict__ raw,
                    std::int64_t* __restrict__ cnt) {
  __shared__ int iscratch[V2Block::kWarps];
  const std::int64_t t = blockIdx.x;
  if (raw[t]) {  // uniform over the block
    if (threadIdx.x == 0) cnt[t] = 0;
    return;
  }
  const std::uint8_t esc = static_cast<std::uint8_t>(2 * kmax + 1);
  int n = 0;
  for (int i = threadIdx.x; i < d; i += kV2Threads) n += sym[t * d + i] == esc;
  n = V2Block::all_reduce(n, iscratch, SumOp());
  if (threadIdx.x == 0) cnt[t] = n;
}

// One block: esc_off[t] / raw_off[t] = escapes of coded tokens / raw tokens before t, and the
// header totals. nonfinite may be null (decode).
__global__ void __launch_bounds__(kV2Threads)
    v2_scan_kernel(std::int64_t n, const std::uint8_t* __restrict__ raw, const std::int64_t* __restrict__ cnt,
                   const std::int64_t* __restrict__ nonfinite, std::int64_t* __restrict__ esc_off,
                   std::int64_t* __restrict__ raw_off, std::int64_t* __restrict__ header) {
  __shared__ std::int64_t scratch[V2Block::kWarps];
  std::int64_t carry_esc = 0, carry_raw = 0, bad = 0;
  for (std::int64_t base = 0; base < n; base += kV2Threads) {
    const std::int64_t t = base + threadIdx.x;
    const bool in = t < n;
    std::int64_t tile_esc = 0, tile_raw = 0;
    const std::int64_t pe = v2_block_exclusive_sum(in ? cnt[t] : 0, scratch, &tile_esc);
    const std::int64_t pr = v2_block_exclusive_sum(in ? raw[t] : 0, scratch, &tile_raw);
    if (in) {
      esc_off[t] = carry_esc + pe;
      raw_off[t] = carry_raw + pr;
      if (nonfinite != nullptr) bad += nonfinite[t];
    }
    carry_esc += tile_esc;
    carry_raw += tile_raw;
  }
  bad = V2Block::all_reduce(bad, scratch, SumOp());
  if (threadIdx.x == 0) {
    header[kV2HeaderEscapes] = carry_esc;
    header[kV2HeaderRaw] = carry_raw;
    header[kV2HeaderNonFinite] = bad;
  }
}

// One block per token: the escaped values of coded token t at values[esc_off[t]...] in channel
// order, a raw token's row at values[escapes total + raw_off[t] * d] (v2_gather_row).
template <typename T>
__global__ void __launch_bounds__(kV2Threads)
    v2_gather_kernel(const T* __restrict__ x, int d, int kmax, const std::uint8_t* __restrict__ raw,
                     const std::uint8_t* __restrict__ sym, const std::int64_t* __restrict__ cnt,
                     const std::int64_t* __restrict__ esc_off, const std::int64_t* __restrict__ raw_off,
                     const std::int64_t* __restrict__ header, T* __restrict__ values) {
  __shared__ int iscratch[V2Block::kWarps];
  const std::int64_t t = blockIdx.x;
  const bool is_raw = raw[t] != 0;  // only a raw token reads where its row goes
  T* raw_dst = is_raw ? values + header[kV2HeaderEscapes] + raw_off[t] * d : nullptr;
  v2_gather_row(x + t * d, d, kmax, is_raw, cnt[t], sym + t * d, esc_off[t], raw_dst, values, iscratch);
}

// One block per token: out = fp32(fp32((s - kmax) * step) + center) rounded to T for coded
// values; escape symbols take the next of the n_escapes exact values (token-major), a raw
// token its row from after them. Reads never pass n_escapes (a missing value gives 0; the host
// checks the count first) nor the raw section. Null cnt / esc_off / raw_off: a frame of one token
// (its offsets 0, its escapes n_escapes), launched without the count and scan.
template <typename T>
__global__ void __launch_bounds__(kV2Threads)
    v2_dequantise_kernel(const std::uint8_t* __restrict__ raw, const std::uint8_t* __restrict__ sym, int d,
                         const float* __restrict__ step, const float* __restrict__ center, int kmax,
                         const T* __restrict__ values, std::int64_t n_escapes, const std::int64_t* __restrict__ cnt,
                         const std::int64_t* __restrict__ esc_off, const std::int64_t* __restrict__ raw_off,
                         T* __restrict__ out) {
  __shared__ int iscratch[V2Block::kWarps];
  const std::int64_t t = blockIdx.x;
  T* dst = out + t * d;
  if (raw[t]) {
    const T* src = values + n_escapes + (raw_off != nullptr ? raw_off[t] : 0) * d;
    for (int i = threadIdx.x; i < d; i += kV2Threads) dst[i] = src[i];
    return;
  }
  const std::uint8_t* srow = sym + t * d;
  const std::uint8_t esc = static_cast<std::uint8_t>(2 * kmax + 1);
  const bool has_escapes = (cnt != nullptr ? cnt[t] : n_escapes) > 0;  // uniform over the block
  std::int64_t next = esc_off != nullptr ? esc_off[t] : 0;
  for (int base = 0; base < d; base += kV2Threads) {
    const int i = base + threadIdx.x;
    const int s = i < d ? srow[i] : 0;
    const bool e = i < d && s == esc;
    if (i < d && !e) {
      const float prod = __fmul_rn(static_cast<float>(s - kmax), step[i]);  // exact int -> fp32
      store_f32(dst, i, __fadd_rn(prod, center[i]));
    }
    if (has_escapes && __syncthreads_or(e)) {
      int tile = 0;
      const int before = V2Block::exclusive_count(e, iscratch, &tile);
      if (e) {
        const std::int64_t j = next + before;
        dst[i] = j < n_escapes ? values[j] : T(0.0f);
      }
      next += tile;
    }
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace sk
