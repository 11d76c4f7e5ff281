// W{2,3,4,8} x A{16,32} GEMV for M = 1..8 and the dequantisation used above that
// (docs/FORMATS.md section 2). Decode-time matmuls are bound by weight bytes: each warp streams
// one packed weight row once, 32 codes (= `bits` int32 words) per lane per step.
#pragma once

#include "common.cuh"

namespace sk {
namespace cuda {
namespace kernels {

constexpr int kGemvThreads = 256;
constexpr int kRowsPerBlock = kGemvThreads / 32;

// 8 consecutive activations starting at a 16-byte aligned address, as fp32.
__device__ __forceinline__ void load8(const float* p, float* out) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// The `kBits` words holding codes 32c .. 32c+31 of a row; streamed past L1 (read once).
template <int kBits>
__device__ __forceinline__ void load_chunk(const std::uint32_t* p, std::uint32_t* w) {
  if constexpr (kBits == 2) {
    const uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else if constexpr (kBits == 4 || kBits == 8) {
#pragma unroll
    for (int i = 0; i < kBits / 4; ++i) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p) + i);
      w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kBits; ++i) w[i] = __ldcs(p + i);
  }
}

// Code j (0..31) of a chunk; with the shifts known at compile time this is one or two
// funnel-shift/and instructions.
template <int kBits>
__device__ __forceinline__ unsigned chunk_code(const std::uint32_t* w, int j) {
  const int bit = j * kBits, word = bit >> 5, shift = bit & 31;
  if (shift + kBits <= 32) return (w[word] >> shift) & ((1u << kBits) - 1u);
  return __funnelshift_r(w[word], w[word + 1], shift) & ((1u << kBits) - 1u);
}

// One warp per output row; lanes take successive 32-code chunks. A chunk lies inside one
// group (group_size % 32 == 0), so the group's affine map is applied once per chunk:
// sum_j x_j (q_j s + z) = s * sum_j x_j q_j + z * sum_j x_j.
template <typename T, int kBits, int kMaxM>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const T* __restrict__ x, const std::uint32_t* __restrict__ qweight, const T* __restrict__ scale,
                const T* __restrict__ zero, const T* __restrict__ bias, T* __restrict__ y, int m, std::int64_t n,
                int k, int group_size) {
  const int lane = threadIdx.x & 31;
  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= n) return;  // whole warps leave; nothing below synchronises the block
  const int chunks = k / 32;
  const int chunks_per_group = group_size / 32;
  const int groups = k / group_size;
  const std::uint32_t* wrow = qweight + row * (static_cast<std::int64_t>(k) / 32 * kBits);
  const T* srow = scale + row * groups;
  const T* zrow = zero + row * groups;
  float acc[kMaxM];
#pragma unroll
  for (int i = 0; i < kMaxM; ++i) acc[i] = 0.0f;

  // All weight loads of kUnroll chunks are issued before any is used, so each lane keeps
  // several 16-byte requests in flight: a GEMV is a race for memory-level parallelism.
  constexpr int kUnroll = kMaxM == 1 ? 4 : 2;
  for (int c0 = lane; c0 < chunks; c0 += 32 * kUnroll) {
    std::uint32_t w[kUnroll][kBits];
    float s[kUnroll], z[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + 32 * u;
      if (c < chunks) {
        load_chunk<kBits>(wrow + static_cast<std::int64_t>(c) * kBits, w[u]);
        const int g = c / chunks_per_group;
        s[u] = load_f32(srow, g);
        z[u] = load_f32(zrow, g);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int c = c0 + 32 * u;
      if (c >= chunks) break;
      float q[32];
#pragma unroll
      for (int j = 0; j < 32; ++j) q[j] = code_to_float(chunk_code<kBits>(w[u], j));
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) {
        if (i < m) {
          const T* xr = x + static_cast<std::int64_t>(i) * k + static_cast<std::int64_t>(c) * 32;
          float dot = 0.0f, xsum = 0.0f;
#pragma unroll
          for (int part = 0; part < 4; ++part) {
            float xv[8];
            load8(xr + 8 * part, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              dot = fmaf(q[8 * part + j], xv[j], dot);
              xsum += xv[j];
            }
          }
          acc[i] = fmaf(s[u], dot, fmaf(z[u], xsum, acc[i]));
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < kMaxM; ++i) {
    for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(kFullMask, acc[i], o);
  }
  if (lane == 0) {
    const float b = bias != nullptr ? load_f32(bias, row) : 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      if (i < m) store_f32(y, static_cast<std::int64_t>(i) * n + row, acc[i] + b);
    }
  }
}

// One thread per weight; the reference's two roundings (q * scale, then + zero), no FMA.
template <typename T>
__global__ void dequantize_kernel(const std::uint32_t* __restrict__ qweight, const T* __restrict__ scale,
                                  const T* __restrict__ zero, float* __restrict__ w, std::int64_t n, std::int64_t k,
                                  int bits, std::int64_t group_size) {
  const std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * k) return;
  const std::int64_t row = i / k, col = i - row * k;
  const std::int64_t words = (k * bits + 31) / 32;
  const std::uint32_t* wrow = qweight + row * words;
  const std::int64_t bit = col * bits;
  const std::int64_t word = bit >> 5;
  const int shift = static_cast<int>(bit & 31);
  // A straddling code (bits = 3) always has its next word inside the row.
  const std::uint32_t hi = shift + bits > 32 ? wrow[word + 1] : 0u;
  const unsigned q = __funnelshift_r(wrow[word], hi, shift) & ((1u << bits) - 1u);
  const std::int64_t g = row * (k / group_size) + col / group_size;
  w[i] = __fadd_rn(__fmul_rn(static_cast<float>(q), load_f32(scale, g)), load_f32(zero, g));
}

}  // namespace kernels
}  // namespace cuda
}  // namespace sk
