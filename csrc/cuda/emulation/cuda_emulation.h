// Host-side emulation of the few CUDA features the kernels in csrc/cuda use, so the CPU tests
// can run the exact kernel source against the reference where no GPU exists. Every thread of
// a block is a std::thread; blocks run one after another, so `__shared__` variables become
// function statics. Slow by design: meant for small shapes only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __restrict__ __restrict

namespace sk_emu {

inline thread_local dim3 thread_index;
inline thread_local dim3 block_index;
inline dim3 block_dim;
inline std::vector<unsigned char> dynamic_shared_memory;

struct Warp {
  explicit Warp() : barrier(32) {}
  std::barrier<> barrier;
  std::uint64_t slots[32];
};
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<Warp>> warps;

inline Warp& my_warp() { return *warps[thread_index.x / 32]; }

// Runs `body` for every thread of every block: blocks in order, threads of a block concurrently.
template <typename Body>
void launch(unsigned grid, unsigned block, std::size_t shared_bytes, Body body) {
  block_dim = dim3(block, 1, 1);
  dynamic_shared_memory.assign(shared_bytes + 16, 0xA5);  // poisoned: kernels must write before reading
  for (unsigned b = 0; b < grid; ++b) {
    block_barrier = std::make_unique<std::barrier<>>(block);
    warps.clear();
    for (unsigned w = 0; w < (block + 31) / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([=] {
        thread_index = dim3(t, 1, 1);
        block_index = dim3(b, 1, 1);
        body();
      });
    }
    for (auto& th : threads) th.join();
  }
}

template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
  Warp& w = my_warp();
  const int lane = thread_index.x % 32;
  std::uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  w.slots[lane] = raw;
  w.barrier.arrive_and_wait();
  T out;
  std::memcpy(&out, &w.slots[src_lane], sizeof(T));
  w.barrier.arrive_and_wait();
  return out;
}

}  // namespace sk_emu

#define threadIdx (sk_emu::thread_index)
#define blockIdx (sk_emu::block_index)
#define blockDim (sk_emu::block_dim)
#define SK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(sk_emu::dynamic_shared_memory.data())

inline void __syncthreads() { sk_emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return sk_emu::exchange(v, (sk_emu::thread_index.x % 32) ^ mask);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int delta) {
  const int lane = sk_emu::thread_index.x % 32;
  return sk_emu::exchange(v, lane >= delta ? lane - delta : lane);
}
inline int __syncthreads_or(int pred) {
  static std::atomic<int> vote{0};
  __syncthreads();  // the previous vote has been read and reset
  if (pred) vote.fetch_or(1);
  __syncthreads();
  const int out = vote.load();
  __syncthreads();
  if (sk_emu::thread_index.x == 0) vote.store(0);  // before thread 0 reaches the next first barrier
  return out;
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  auto& w = sk_emu::my_warp();
  const int lane = sk_emu::thread_index.x % 32;
  w.slots[lane] = pred;
  w.barrier.arrive_and_wait();
  unsigned out = 0;
  for (int i = 0; i < 32; ++i) out |= static_cast<unsigned>(w.slots[i] != 0) << i;
  w.barrier.arrive_and_wait();
  return out;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  return static_cast<unsigned>(((static_cast<std::uint64_t>(hi) << 32) | lo) >> (shift & 31));
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Built with -ffp-contract=off, so these are single IEEE operations as on the device.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __double2float_rd(double v) {
  const float f = static_cast<float>(v);  // round to nearest, then step down if it went up
  return static_cast<double>(f) > v ? std::nextafter(f, -INFINITY) : f;
}
template <typename T>
T __ldcs(const T* p) { return *p; }
using std::isfinite;
using std::max;
using std::min;
