// W{2,3,4,8} x A{16,32} GEMV for M = 1..16 and the dequantisation used above that
// (docs/FORMATS.md section 2). Decode-time matmuls are bound by weight bytes, so the GEMV is
// built to keep many weight loads in flight while spending few instructions per weight:
// * a warp owns kGemvRows rows, and lane l takes the 32-code chunks l, l + 32, ... of the warp's
//   K range in all of them: each activation chunk is loaded, converted and summed once per token
//   and used kGemvRows times;
// * all the weight loads of a step (kGemvRows rows x unroll chunks, 16 bytes each at W4) are
//   issued before any is used;
// * a code becomes a float with one LOP3 and its scale is applied with one FFMA (see
//   `dequant_code`); the group's zero point needs the chunk's activation sum, once per token;
// * when the rows alone give too few warps, the K range is split over several blocks (split-K):
//   each writes fp32 partials, and the last block of a row tile to finish adds them.
#pragma once

#include <cstring>

#include "common.cuh"
#include "mma.cuh"

namespace sk {
namespace cuda {
namespace kernels {

constexpr int kGemvThreads = 128;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvRows = 4;  // output rows per warp
constexpr int kGemvRowsPerBlock = kGemvWarps * kGemvRows;
constexpr int kGemvMaxSplits = 16;
// Split-K aims at this many resident warps per SM (four per scheduler) ...
constexpr int kGemvTargetWarpsPerSm = 16;
// ... while every split keeps at least one 32-code chunk per lane.
constexpr int kGemvMinSplitChunks = 32;
// Splits of the CUDA-core kernel are whole multiples of 32 chunks, so lanes get equal shares.
constexpr int kGemvSplitGranule = 32;
constexpr int kDequantThreads = 256;

// Chunks each lane loads per step: 16-byte weight loads at W4 and W8, and about 128 bytes in
// flight per lane over the warp's rows; halved for the widest M, whose accumulators fill the
// register file.
template <int kBits>
constexpr int kGemvUnrollBase = kBits == 2 ? 4 : kBits == 8 ? 1 : 2;
template <int kBits, int kMaxM>
constexpr int kGemvUnroll =
    kMaxM >= 8 && kGemvUnrollBase<kBits> > 1 ? kGemvUnrollBase<kBits> / 2 : kGemvUnrollBase<kBits>;

// How the K range of a launch is split: `splits` blocks per row tile, each taking `chunks`
// 32-code chunks (a multiple of the kernel's granule; the last split may get fewer).
struct GemvSplit {
  int splits;
  int chunks;
};

// The split for `requested` splits (clamped to 1..kGemvMaxSplits) in multiples of `granule`
// chunks; never more than requested.
inline GemvSplit gemv_split(std::int64_t k, int requested, int granule = kGemvSplitGranule) {
  const int chunks = static_cast<int>(k / 32);
  const int want = requested < 1 ? 1 : requested > kGemvMaxSplits ? kGemvMaxSplits : requested;
  int per = (chunks + want - 1) / want;
  per = (per + granule - 1) / granule * granule;
  if (per < 1) per = 1;
  return {chunks == 0 ? 1 : (chunks + per - 1) / per, per};
}

// The split count of a launch that wants `want` splits, at most one per `min_chunks` chunks of
// K and kGemvMaxSplits, at least one, in multiples of `granule` chunks.
inline int gemv_clamped_splits(std::int64_t k, std::int64_t want, int min_chunks, int granule) {
  const std::int64_t cap = k / 32 / min_chunks;
  std::int64_t s = want > cap ? cap : want;
  if (s > kGemvMaxSplits) s = kGemvMaxSplits;
  if (s < 1) s = 1;
  return gemv_split(k, static_cast<int>(s), granule).splits;
}

// Splits for an N x K GEMV whose blocks of 4 warps take rows_per_block rows, on a device with
// `sm_count` SMs: enough blocks for about kGemvTargetWarpsPerSm warps per SM, at least
// kGemvMinSplitChunks chunks per split.
inline int gemv_splits_for(std::int64_t n, std::int64_t k, int rows_per_block, int sm_count) {
  const std::int64_t tiles = (n + rows_per_block - 1) / rows_per_block;
  const std::int64_t warps = tiles * kGemvWarps;
  const std::int64_t want = static_cast<std::int64_t>(sm_count) * kGemvTargetWarpsPerSm;
  return gemv_clamped_splits(k, warps > 0 ? (want + warps - 1) / warps : 1, kGemvMinSplitChunks, kGemvSplitGranule);
}

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

// Code -> float without shifting every code down. Codes are read in windows of
// kCodesPerWindow = floor(23 / kBits) consecutive codes: the 32 bits of the chunk from the
// window's first code on. Code j sits at bit e = kBits * (j % kCodesPerWindow) of its window with
// e + kBits <= 23, so OR-ing in the exponent of 2^23 gives the fp32 2^23 + q * 2^e exactly (one
// LOP3), and fma(that, s, -2^23 s) = q * s * 2^e with a single rounding, as round(q * s) * 2^e.
// The activation that meets code j is multiplied by 2^-e (`code_exp`, exact) to compensate.
template <int kBits>
constexpr int kCodesPerWindow = 23 / kBits;

template <int kBits>
__device__ __forceinline__ constexpr int code_exp(int j) {
  return kBits * (j % kCodesPerWindow<kBits>);
}

// Bits [start, start + 32) of a chunk held in `kBits` words (start is known at compile time once
// the loops are unrolled, so this is a register move or one funnel shift). Plain shifts rather
// than the __funnelshift_r intrinsic, whose inline assembly the compiler would not merge across
// the codes of one window.
template <int kBits>
__device__ __forceinline__ std::uint32_t chunk_window(const std::uint32_t* w, int start) {
  const int word = start >> 5, shift = start & 31;
  if (shift == 0) return w[word];
  const std::uint32_t hi = word + 1 < kBits ? w[word + 1] : 0u;
  return (w[word] >> shift) | (hi << (32 - shift));
}

// q_j * s * 2^code_exp(j) for code j (0..31) of a chunk; neg_big_s = -2^23 * s.
template <int kBits>
__device__ __forceinline__ float dequant_code(const std::uint32_t* w, int j, float s, float neg_big_s) {
  const int e = code_exp<kBits>(j);
  const std::uint32_t v = chunk_window<kBits>(w, kBits * j - e);
  const float f = __uint_as_float((v & (((1u << kBits) - 1u) << e)) | 0x4B000000u);
  return fmaf(f, s, neg_big_s);
}

// 2^-e for 0 <= e < 127, exact.
__device__ __forceinline__ float exp2_neg(int e) { return __uint_as_float(static_cast<unsigned>(127 - e) << 23); }

// Sums kCount values per lane over the warp's 32 lanes while halving them: at each step a lane
// keeps one half (the upper one when its lane bit for the step is set) and adds its partner's
// copy of that half, so kCount values cost about kCount shuffles instead of 5 * kCount. Afterwards
// v[t] holds the sum of value gemv_reduced_index<kCount>(lane) + t.
template <int kCount, int kStep = 0>
__device__ __forceinline__ void warp_sum_halving(float* v, int lane) {
  if constexpr (kStep < 5) {
    constexpr int offset = 16 >> kStep;
    if constexpr (kCount > 1) {
      constexpr int half = kCount / 2;
      const bool upper = (lane & offset) != 0;
#pragma unroll
      for (int t = 0; t < half; ++t) {
        const float send = upper ? v[t] : v[t + half];
        const float keep = upper ? v[t + half] : v[t];
        v[t] = keep + __shfl_xor_sync(kFullMask, send, offset);
      }
      warp_sum_halving<half, kStep + 1>(v, lane);
    } else {
      v[0] += __shfl_xor_sync(kFullMask, v[0], offset);
      warp_sum_halving<1, kStep + 1>(v, lane);
    }
  }
}

template <int kCount>
__device__ __forceinline__ int gemv_reduced_index(int lane) {
  int index = 0, half = kCount;
#pragma unroll
  for (int step = 0; step < 5; ++step) {
    half >>= 1;
    if (half >= 1 && (lane & (16 >> step)) != 0) index += half;
  }
  return index;
}

// Split-K epilogue of a block whose fp32 partials [splits, M, N] are written: the block that
// completes its row tile's count adds the tile's partials in split order (+ bias) into y and
// leaves the count at zero for the next launch on the stream. Every thread of the block calls it.
template <int kRowsPerBlock, typename T>
__device__ __forceinline__ void finish_split(const float* __restrict__ partial, int* __restrict__ tile_done,
                                             const T* __restrict__ bias, T* __restrict__ y, int m, std::int64_t n,
                                             std::int64_t tile, int splits) {
  __shared__ int last;
  __threadfence();  // this block's partials are visible device-wide before its count
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(tile_done + tile, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int t = threadIdx.x; t < kRowsPerBlock * m; t += blockDim.x) {
    const int i = t / kRowsPerBlock;
    const std::int64_t row = tile * kRowsPerBlock + t % kRowsPerBlock;
    if (row < n) {
      float sum = 0.0f;
      for (int sp = 0; sp < splits; ++sp) sum += __ldcg(partial + (static_cast<std::int64_t>(sp) * m + i) * n + row);
      store_f32(y, static_cast<std::int64_t>(i) * n + row, sum + (bias != nullptr ? load_f32(bias, row) : 0.0f));
    }
  }
  if (threadIdx.x == 0) tile_done[tile] = 0;
}

// Block b takes row tile b % tiles (kGemvRowsPerBlock rows; warp w its rows 4w..4w+3) and
// chunks [split * split_chunks, (split + 1) * split_chunks) of K, split = b / tiles. With one
// split it writes y (+ bias); otherwise fp32 partials [splits, M, N] and a count per tile in
// tile_done (zero before the launch, zero again after it): the block that completes the count
// adds the partials in split order.
// The codes, scales and zeros of one step of a lane: kUnroll chunks of each of its kRows rows.
template <int kBits, int kUnroll, int kRows>
struct GemvStep {
  std::uint32_t w[kUnroll][kRows][kBits];
  float s[kUnroll][kRows], z[kUnroll][kRows];
};

template <typename T, int kBits, int kUnroll, int kRows>
__device__ __forceinline__ void gemv_load_step(GemvStep<kBits, kUnroll, kRows>& st,
                                               const std::uint32_t* (&wrow)[kRows], const T* (&srow)[kRows],
                                               const T* (&zrow)[kRows], int c0, int c_end, int chunks_per_group) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int c = c0 + 32 * u;
    if (c < c_end) {
      const int g = c / chunks_per_group;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        load_chunk<kBits>(wrow[r] + static_cast<std::int64_t>(c) * kBits, st.w[u][r]);
        st.s[u][r] = load_f32(srow[r], g);
        st.z[u][r] = load_f32(zrow[r], g);
      }
    }
  }
}

template <typename T, int kBits, int kMaxM, bool kPrefetch = false>
__global__ void __launch_bounds__(kGemvThreads)
    gemv_kernel(const T* __restrict__ x, const std::uint32_t* __restrict__ qweight, const T* __restrict__ scale,
                const T* __restrict__ zero, const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial,
                int* __restrict__ tile_done, int m, std::int64_t n, int k, int group_size, int splits,
                int split_chunks) {
  constexpr int kR = kGemvRows;
  constexpr int kU = kGemvUnroll<kBits, kMaxM>;
  const int lane = threadIdx.x & 31;
  const std::int64_t tiles = (n + kGemvRowsPerBlock - 1) / kGemvRowsPerBlock;
  const std::int64_t tile = blockIdx.x % tiles;
  const int split = static_cast<int>(blockIdx.x / tiles);
  const std::int64_t row0 = tile * kGemvRowsPerBlock + (threadIdx.x >> 5) * kR;
  const int chunks = k / 32;
  const int chunks_per_group = group_size / 32;
  const int groups = k / group_size;
  const int c_begin = split * split_chunks;
  const int c_end = min(chunks, c_begin + split_chunks);

  // Rows past N read row N - 1 and are never stored: every lane stays for the shuffles.
  const std::uint32_t* wrow[kR];
  const T* srow[kR];
  const T* zrow[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const std::int64_t row = min(row0 + r, n - 1);
    wrow[r] = qweight + row * (static_cast<std::int64_t>(chunks) * kBits);
    srow[r] = scale + row * groups;
    zrow[r] = zero + row * groups;
  }
  float acc[kR][kMaxM];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) acc[r][i] = 0.0f;
  }

  GemvStep<kBits, kU, kR> st;
  [[maybe_unused]] GemvStep<kBits, kU, kR> next;
  if constexpr (kPrefetch) {
    gemv_load_step<T, kBits, kU, kR>(st, wrow, srow, zrow, c_begin + lane, c_end, chunks_per_group);
  }
  for (int c0 = c_begin + lane; c0 < c_end; c0 += 32 * kU) {
    if constexpr (kPrefetch) {
      // The next step's loads go out before this step's arithmetic, which then hides their latency.
      gemv_load_step<T, kBits, kU, kR>(next, wrow, srow, zrow, c0 + 32 * kU, c_end, chunks_per_group);
    } else {
      gemv_load_step<T, kBits, kU, kR>(st, wrow, srow, zrow, c0, c_end, chunks_per_group);
    }
    const auto& w = st.w;
    const auto& s = st.s;
    const auto& z = st.z;
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int c = c0 + 32 * u;
      if (c >= c_end) break;
      float neg_big_s[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) neg_big_s[r] = -8388608.0f * s[u][r];
      float xsum[kMaxM];
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) xsum[i] = 0.0f;
      // Eight codes at a time: their dequantised values for every row, then every token.
#pragma unroll
      for (int part = 0; part < 4; ++part) {
        float wq[kR][8];
#pragma unroll
        for (int r = 0; r < kR; ++r) {
#pragma unroll
          for (int j = 0; j < 8; ++j) wq[r][j] = dequant_code<kBits>(w[u][r], 8 * part + j, s[u][r], neg_big_s[r]);
        }
#pragma unroll
        for (int i = 0; i < kMaxM; ++i) {
          if (i < m) {
            float xv[8];
            load8(x + static_cast<std::int64_t>(i) * k + static_cast<std::int64_t>(c) * 32 + 8 * part, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              xsum[i] += xv[j];
              xv[j] *= exp2_neg(code_exp<kBits>(8 * part + j));
            }
#pragma unroll
            for (int r = 0; r < kR; ++r) {
#pragma unroll
              for (int j = 0; j < 8; ++j) acc[r][i] = fmaf(wq[r][j], xv[j], acc[r][i]);
            }
          }
        }
      }
      // sum_j x_j (q_j s + z) = sum_j x_j q_j s + z * sum_j x_j: one chunk lies in one group.
#pragma unroll
      for (int i = 0; i < kMaxM; ++i) {
        if (i < m) {
#pragma unroll
          for (int r = 0; r < kR; ++r) acc[r][i] = fmaf(z[u][r], xsum[i], acc[r][i]);
        }
      }
    }
    if constexpr (kPrefetch) st = next;
  }

  constexpr int kValues = kR * kMaxM;
  float v[kValues];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) v[r * kMaxM + i] = acc[r][i];
  }
  warp_sum_halving<kValues>(v, lane);
  constexpr int kLeft = kValues >= 32 ? kValues / 32 : 1;
  // With fewer than 32 values, lanes that differ only in the low bits hold copies of one sum.
  const bool owner = kValues >= 32 || (lane & (32 / kValues - 1)) == 0;
  // splits is uniform over the grid, so either every thread of a block reaches finish_split's
  // barriers or none does.
  const int first = gemv_reduced_index<kValues>(lane);
#pragma unroll
  for (int t = 0; t < kLeft; ++t) {
    const int r = (first + t) / kMaxM, i = (first + t) % kMaxM;
    const std::int64_t row = row0 + r;
    if (owner && i < m && row < n) {
      if (splits == 1) {
        store_f32(y, static_cast<std::int64_t>(i) * n + row, v[t] + (bias != nullptr ? load_f32(bias, row) : 0.0f));
      } else {
        partial[(static_cast<std::int64_t>(split) * m + i) * n + row] = v[t];
      }
    }
  }
  if (splits > 1) finish_split<kGemvRowsPerBlock>(partial, tile_done, bias, y, m, n, tile, splits);
}

// ---- Tensor-core GEMV: W4, fp16/bf16 activations, group_size % 128 == 0, kGemvTcMinM <= M <= kGemvTcMaxM.
// With M tokens the CUDA-core kernel above spends M FFMAs per weight; here the tokens are the 16
// rows of an m16n8k16 MMA (mma.cuh) and each warp owns kTcTiles tiles of 8 weight rows. A step
// of the K loop is a block of 128 codes, which lies in one group: lane (g, t) of the warp loads
// the 16-byte chunk t of the block of row 8 * tile + g, and it feeds the MMA's k slots 2t, 2t+1,
// 2t+8, 2t+9 from its own chunk (the order of k inside an MMA is free as long as A and B agree):
// step 2w + h (w = word 0..3, h = 0, 1) takes codes {2h, 2h+4} and {2h+1, 2h+5} of word w. Those
// pairs are exact fp16/bf16 integers from one LOP3 (the 2^10 / 2^7 magic) and one subtraction,
// and the activations at the same k come from one 16-byte load per word and a byte permute.
// Products q * x are exact in the fp32 accumulator; per block and row, the group's scale
// multiplies the MMA sum and its zero the activation sum, which one more MMA against ones gives.

// From two tokens on: on an H200 (bench/results/gpu-20261130/run3) the tensor-core kernel beat the
// CUDA-core one at M = 2 and 4 on every W4 shape (15.7 vs 18.5 us at 4096^2, M = 2), not at M = 1.
constexpr int kGemvTcMinM = 2;
constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
constexpr int kTcTiles = 2;  // 8-row tiles per warp
constexpr int kTcRowsPerBlock = kTcWarps * kTcTiles * 8;
constexpr int kTcUnroll = 2;  // 128-code blocks in flight per step

// M above 16 reads the weights once per 16 tokens, the second time mostly from L2: still ahead of
// a dense fp16 matmul at 32 tokens.
constexpr int kGemvTcMaxM = 32;
// Its splits are whole steps (kTcUnroll 128-code blocks = 8 chunks), and as many as one wave of
// blocks holds: kTcBlocksPerSm blocks of 128 threads at its 124 registers (sm_90). On an H200
// (bench/results/gpu-20261204, bench/gpu_gemv_sweep.py) 4096 x 4096 at M = 16 had 0.48 waves
// with 4 splits (22 us), 20 us with 8 (one wave), 26 us with 11 (1.3 waves, a tail); the best
// split count of every shape and M = 2..16 was the one-wave one or within 5% of it.
constexpr int kTcSplitGranule = 4 * kTcUnroll;
constexpr int kTcBlocksPerSm = 4;

// Whether an M x K GEMV with these codes and activations takes the tensor-core kernel; min_m is
// kGemvTcMinM unless a benchmark moves it (the kernel is correct for any M >= 1).
inline bool gemv_uses_tc(std::int64_t m, int bits, std::int64_t group_size, int dtype, int min_m = kGemvTcMinM) {
  return m >= min_m && m <= kGemvTcMaxM && bits == 4 && group_size % 128 == 0 &&
         (dtype == kFloat16 || dtype == kBFloat16);
}

// Whether the fused GEMV takes an M x K product (else: dequantise and a library matmul).
inline bool gemv_supports(std::int64_t m, std::int64_t k, int bits, std::int64_t group_size, int dtype,
                          int min_m = kGemvTcMinM) {
  const bool shape = k > 0 && group_size > 0 && group_size % 32 == 0 && k % group_size == 0 &&
                     k < (std::int64_t{1} << 31) && (bits == 2 || bits == 3 || bits == 4 || bits == 8);
  return shape && m >= 1 && (m <= 16 || gemv_uses_tc(m, bits, group_size, dtype, min_m));
}

// The split granule (chunks) and split count of the kernel an M x N x K GEMV takes (the
// launcher's choice).
inline int gemv_split_granule(std::int64_t m, int bits, std::int64_t group_size, int dtype, int min_m) {
  return gemv_uses_tc(m, bits, group_size, dtype, min_m) ? kTcSplitGranule : kGemvSplitGranule;
}
// Tensor-core splits: the most that keep the grid within one wave, at least one step each.
inline int gemv_tc_splits_for(std::int64_t n, std::int64_t k, int sm_count) {
  const std::int64_t tiles = (n + kTcRowsPerBlock - 1) / kTcRowsPerBlock;
  const std::int64_t want = static_cast<std::int64_t>(sm_count) * kTcBlocksPerSm / (tiles > 0 ? tiles : 1);
  return gemv_clamped_splits(k, want, kTcSplitGranule, kTcSplitGranule);
}
inline int gemv_splits_for_shape(std::int64_t m, std::int64_t n, std::int64_t k, int bits, std::int64_t group_size,
                                 int dtype, int sm_count, int min_m = kGemvTcMinM) {
  if (gemv_uses_tc(m, bits, group_size, dtype, min_m)) return gemv_tc_splits_for(n, k, sm_count);
  return gemv_splits_for(n, k, kGemvRowsPerBlock, sm_count);
}

template <typename T>
struct TcCodes;
template <>
struct TcCodes<__half> {
  using T2 = __half2;
  static constexpr std::uint32_t kMagic = 0x64006400u;  // (1024, 1024): codes in the low mantissa bits
  static constexpr std::uint32_t kOnes = 0x3C003C00u;
};
template <>
struct TcCodes<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr std::uint32_t kMagic = 0x43004300u;  // (128, 128)
  static constexpr std::uint32_t kOnes = 0x3F803F80u;
};

// Codes (i, i + 4) of an 8-code word as a pair of exact T values.
template <typename T>
__device__ __forceinline__ std::uint32_t tc_code_pair(std::uint32_t word, int i) {
  using C = TcCodes<T>;
  const std::uint32_t v = ((word >> (4 * i)) & 0x000F000Fu) | C::kMagic, base = C::kMagic;
  typename C::T2 h, magic;
  memcpy(&h, &v, 4);
  memcpy(&magic, &base, 4);
  h = __hsub2(h, magic);
  std::uint32_t out;
  memcpy(&out, &h, 4);
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    gemv_tc_kernel(const T* __restrict__ x, const std::uint32_t* __restrict__ qweight, const T* __restrict__ scale,
                   const T* __restrict__ zero, const T* __restrict__ bias, T* __restrict__ y,
                   float* __restrict__ partial, int* __restrict__ tile_done, int m, std::int64_t n, int k,
                   int group_size, int splits, int split_chunks) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const std::int64_t tiles = (n + kTcRowsPerBlock - 1) / kTcRowsPerBlock;
  const std::int64_t tile = blockIdx.x % tiles;
  const int split = static_cast<int>(blockIdx.x / tiles);
  const std::int64_t warp_row0 = tile * kTcRowsPerBlock + (threadIdx.x >> 5) * (kTcTiles * 8);
  const int groups = k / group_size;
  const int blocks_per_group = group_size / 128;
  // split_chunks is a multiple of kTcSplitGranule chunks, so splits end on 128-code blocks.
  const int b_begin = split * (split_chunks / 4);
  const int b_end = min(k / 128, b_begin + split_chunks / 4);
  const std::int64_t words = k / 8;

  // B side: row 8 * tile + g; accumulator side: rows 8 * tile + 2t + e. Rows past N read row
  // N - 1 and are never stored: every lane stays for the MMAs.
  const std::uint32_t* wrow[kTcTiles];
  const T* srow[kTcTiles][2];
  const T* zrow[kTcTiles][2];
#pragma unroll
  for (int tl = 0; tl < kTcTiles; ++tl) {
    wrow[tl] = qweight + min(warp_row0 + 8 * tl + g, n - 1) * words + 4 * t;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const std::int64_t row = min(warp_row0 + 8 * tl + 2 * t + e, n - 1);
      srow[tl][e] = scale + row * groups;
      zrow[tl][e] = zero + row * groups;
    }
  }
  std::uint32_t ones[2];
  ones[0] = ones[1] = TcCodes<T>::kOnes;

  // Up to 16 tokens per pass over the weights (later passes mostly hit L2).
  for (int m0 = 0; m0 < m; m0 += 16) {
    // A side: tokens m0 + g and m0 + g + 8 (absent tokens are zeros), the chunk t of each block.
    const bool has_lo = m0 + g < m, has_hi = m0 + g + 8 < m;
    const T* x_lo = x + static_cast<std::int64_t>(has_lo ? m0 + g : 0) * k + 32 * t;
    const T* x_hi = x + static_cast<std::int64_t>(has_hi ? m0 + g + 8 : 0) * k + 32 * t;

    float acc[kTcTiles][4];
#pragma unroll
    for (int tl = 0; tl < kTcTiles; ++tl) {
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[tl][c] = 0.0f;
    }

    for (int b0 = b_begin; b0 < b_end; b0 += kTcUnroll) {
      std::uint32_t w[kTcUnroll][kTcTiles][4];
      float s[kTcUnroll][kTcTiles][2], z[kTcUnroll][kTcTiles][2];
#pragma unroll
      for (int u = 0; u < kTcUnroll; ++u) {
        const int b = b0 + u;
        if (b < b_end) {
          const int gi = b / blocks_per_group;
#pragma unroll
          for (int tl = 0; tl < kTcTiles; ++tl) {
            const uint4 v = __ldcs(reinterpret_cast<const uint4*>(wrow[tl] + 16 * static_cast<std::int64_t>(b)));
            w[u][tl][0] = v.x; w[u][tl][1] = v.y; w[u][tl][2] = v.z; w[u][tl][3] = v.w;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              s[u][tl][e] = load_f32(srow[tl][e], gi);
              z[u][tl][e] = load_f32(zrow[tl][e], gi);
            }
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kTcUnroll; ++u) {
        const int b = b0 + u;
        if (b >= b_end) break;  // uniform over the warp
        float dq[kTcTiles][4], dsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int tl = 0; tl < kTcTiles; ++tl) {
#pragma unroll
          for (int c = 0; c < 4; ++c) dq[tl][c] = 0.0f;
        }
#pragma unroll
        for (int wd = 0; wd < 4; ++wd) {
          uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = make_uint4(0u, 0u, 0u, 0u);
          if (has_lo) lo = *reinterpret_cast<const uint4*>(x_lo + 128 * static_cast<std::int64_t>(b) + 8 * wd);
          if (has_hi) hi = *reinterpret_cast<const uint4*>(x_hi + 128 * static_cast<std::int64_t>(b) + 8 * wd);
          const std::uint32_t xl[4] = {lo.x, lo.y, lo.z, lo.w}, xh[4] = {hi.x, hi.y, hi.z, hi.w};
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            // k slots (2t, 2t+1) = codes (2h, 2h+4), slots (2t+8, 2t+9) = codes (2h+1, 2h+5) of word wd.
            std::uint32_t a[4];
            a[0] = __byte_perm(xl[h], xl[h + 2], 0x5410);
            a[1] = __byte_perm(xh[h], xh[h + 2], 0x5410);
            a[2] = __byte_perm(xl[h], xl[h + 2], 0x7632);
            a[3] = __byte_perm(xh[h], xh[h + 2], 0x7632);
#pragma unroll
            for (int tl = 0; tl < kTcTiles; ++tl) {
              std::uint32_t bq[2];
              bq[0] = tc_code_pair<T>(w[u][tl][wd], 2 * h);
              bq[1] = tc_code_pair<T>(w[u][tl][wd], 2 * h + 1);
              mma_m16n8k16<T>(dq[tl], a, bq);
            }
            mma_m16n8k16<T>(dsum, a, ones);
          }
        }
        // d[e] is token g, row 2t + e; d[2 + e] token g + 8, the same row.
#pragma unroll
        for (int tl = 0; tl < kTcTiles; ++tl) {
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            acc[tl][c] = fmaf(s[u][tl][c & 1], dq[tl][c], fmaf(z[u][tl][c & 1], dsum[c], acc[tl][c]));
          }
        }
      }
    }

#pragma unroll
    for (int tl = 0; tl < kTcTiles; ++tl) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = m0 + (c < 2 ? g : g + 8);
        const std::int64_t row = warp_row0 + 8 * tl + 2 * t + (c & 1);
        if (i < m && row < n) {
          if (splits == 1) {
            store_f32(y, static_cast<std::int64_t>(i) * n + row,
                      acc[tl][c] + (bias != nullptr ? load_f32(bias, row) : 0.0f));
          } else {
            partial[(static_cast<std::int64_t>(split) * m + i) * n + row] = acc[tl][c];
          }
        }
      }
    }
  }
  if (splits > 1) finish_split<kTcRowsPerBlock>(partial, tile_done, bias, y, m, n, tile, splits);
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
