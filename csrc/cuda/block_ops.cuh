// Block-wide reductions and counts for kernels that run one block of kThreads per row.
// Each helper must be reached by every thread of the block (they contain __syncthreads).
#pragma once

#include "common.cuh"

namespace sk {
namespace cuda {

template <int kThreads>
struct BlockOps {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be whole warps");
  static constexpr int kWarps = kThreads / 32;

  // Every thread receives the same value: the per-warp partials are combined in a fixed order
  // by each thread, so a float64 sum is bit-identical across the block and across runs.
  template <typename T, typename Op>
  static __device__ T all_reduce(T v, T* scratch, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    T r = scratch[0];
    for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
    __syncthreads();  // scratch is reused by the next call
    return r;
  }

  // Number of threads with a lower threadIdx.x whose `flag` is set; `*total` gets the block count.
  static __device__ int exclusive_count(bool flag, int* scratch, int* total) {
    const unsigned ballot = __ballot_sync(kFullMask, flag);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) scratch[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = scratch[w];
      before += w < warp ? c : 0;
      all += c;
    }
    __syncthreads();
    *total = all;
    return before + __popc(ballot & ((1u << lane) - 1u));
  }
};

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  __device__ float operator()(float a, float b) const { return fminf(a, b); }
};
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

}  // namespace cuda
}  // namespace sk
