// Shared helpers of the CUDA kernels: dtype codes, element loads/stores, launch checks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sk {
namespace cuda {

// Element dtypes as the Python glue passes them (see splitkernels/backends/cuda.py).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("splitkernels CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

// Catches launch-configuration errors now; asynchronous kernel faults surface at the next sync.
inline void check_launch(const char* what) { check(cudaGetLastError(), what); }

inline cudaStream_t as_stream(std::uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline unsigned grid_for(std::int64_t items, int threads) {
  return static_cast<unsigned>((items + threads - 1) / threads);
}

__device__ __forceinline__ float load_f32(const float* p, std::int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f32(const __half* p, std::int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }

// Round-to-nearest-even conversions, matching torch's .to(dtype).
__device__ __forceinline__ void store_f32(float* p, std::int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f32(__half* p, std::int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, std::int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

constexpr unsigned kFullMask = 0xffffffffu;

// q (< 2^23) as fp32 without the slow integer-to-float conversion: 2^23 + q is exact.
__device__ __forceinline__ float code_to_float(unsigned q) {
  return __fsub_rn(__uint_as_float(q | 0x4B000000u), 8388608.0f);
}

// Declares the launch's dynamic shared memory as `type name[]`. The host-side emulation that
// the CPU tests compile (csrc/cuda/emulation) supplies its own definition first.
#ifndef SK_DYNAMIC_SHARED
#define SK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

}  // namespace cuda
}  // namespace sk
