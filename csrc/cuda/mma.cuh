// Warp-level tensor-core multiply-accumulate, m16n8k16 with fp16 or bf16 inputs and fp32
// accumulators: D [16, 8] += A [16, 16] @ B [16, 8]. With lane = 4 * g + t, each lane holds
// (pairs low element first):
//   a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]    a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   d[0..1] = D[g][2t, 2t+1] d[2..3] = D[g+8][2t, 2t+1]
// Every lane of the warp must call it together. The host-side emulation (csrc/cuda/emulation)
// supplies its own definition first.
#pragma once

#include "common.cuh"

namespace sk {
namespace cuda {

#ifndef SK_MMA_EMULATED
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float* d, const std::uint32_t* a, const std::uint32_t* b);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float* d, const std::uint32_t* a, const std::uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float* d, const std::uint32_t* a,
                                                           const std::uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

}  // namespace cuda
}  // namespace sk
