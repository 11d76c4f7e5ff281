// Host-side emulation of the few CUDA features the kernels in csrc/cuda use, so the CPU tests
// can run the exact kernel source against the reference where no GPU exists.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; a block barrier
// or a warp exchange switches to the next fiber until every member has arrived. Blocks run one
// after another, so `__shared__` variables become function statics. A barrier that some
// threads never reach (a divergent __syncthreads) is reported and aborts instead of hanging.
// Meant for small shapes in tests, one launch at a time per process.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
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

inline dim3 thread_index, block_index, block_dim;
inline std::vector<unsigned char> dynamic_shared_memory;

// A set of fibers that synchronise together: the block (id 0) or one warp (id 1 + warp).
struct Group {
  int members = 0, arrived = 0;
  unsigned long generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack = std::vector<char>(256 * 1024);
  bool done = false;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<Group> groups;
inline int current = 0;
inline bool progress = false;
inline std::function<void()> kernel_body;

inline void yield() { swapcontext(&fibers[current].context, &scheduler); }

inline void group_sync(int id) {
  Group& g = groups[id];
  const unsigned long mine = g.generation;
  progress = true;
  if (++g.arrived == g.members) {
    g.arrived = 0;
    ++g.generation;
  }
  while (g.generation == mine) yield();
}

inline void fiber_main() {
  kernel_body();
  fibers[current].done = true;
  progress = true;
  // returning resumes uc_link, the scheduler
}

// Runs `body` for every thread of every block, blocks in order.
template <typename Body>
void launch(unsigned grid, unsigned block, std::size_t shared_bytes, Body body) {
  block_dim = dim3(block, 1, 1);
  kernel_body = body;
  fibers.resize(block);
  for (unsigned b = 0; b < grid; ++b) {
    block_index = dim3(b, 1, 1);
    dynamic_shared_memory.assign(shared_bytes + 16, 0xA5);  // poisoned: kernels must write before reading
    groups.assign(1 + (block + 31) / 32, Group{});
    groups[0].members = static_cast<int>(block);
    for (unsigned w = 0; w < (block + 31) / 32; ++w) groups[1 + w].members = static_cast<int>(std::min(32u, block - 32 * w));
    for (unsigned t = 0; t < block; ++t) {
      Fiber& f = fibers[t];
      f.done = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    for (unsigned remaining = block; remaining > 0;) {
      progress = false;
      remaining = 0;
      for (unsigned t = 0; t < block; ++t) {
        if (fibers[t].done) continue;
        current = static_cast<int>(t);
        thread_index = dim3(t, 1, 1);
        swapcontext(&scheduler, &fibers[t].context);
        remaining += !fibers[t].done;
      }
      if (remaining > 0 && !progress) {
        std::fprintf(stderr, "cuda emulation: block %u deadlocked (a barrier not reached by every thread)\n", b);
        std::abort();
      }
    }
  }
}

template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
  static std::uint64_t slots[1024];
  const int warp = static_cast<int>(thread_index.x / 32), lane = static_cast<int>(thread_index.x % 32);
  std::uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  slots[32 * warp + lane] = raw;
  group_sync(1 + warp);
  T out;
  std::memcpy(&out, &slots[32 * warp + src_lane], sizeof(T));
  group_sync(1 + warp);
  return out;
}

}  // namespace sk_emu

#define threadIdx (sk_emu::thread_index)
#define blockIdx (sk_emu::block_index)
#define blockDim (sk_emu::block_dim)
#define SK_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(sk_emu::dynamic_shared_memory.data())

inline void __syncthreads() { sk_emu::group_sync(0); }
inline int __syncthreads_or(int pred) {
  static int vote = 0;
  __syncthreads();  // the previous vote has been read and reset
  vote |= pred != 0;
  __syncthreads();
  const int out = vote;
  __syncthreads();
  vote = 0;
  return out;
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
  return sk_emu::exchange(v, static_cast<int>(sk_emu::thread_index.x % 32) ^ mask);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int delta) {
  const int lane = static_cast<int>(sk_emu::thread_index.x % 32);
  return sk_emu::exchange(v, lane >= delta ? lane - delta : lane);
}
inline unsigned __ballot_sync(unsigned, bool pred) {
  static bool votes[1024];
  const unsigned warp = sk_emu::thread_index.x / 32;
  votes[sk_emu::thread_index.x] = pred;
  sk_emu::group_sync(1 + static_cast<int>(warp));
  unsigned out = 0;
  for (unsigned lane = 0; lane < 32 && 32 * warp + lane < sk_emu::block_dim.x; ++lane) {
    out |= static_cast<unsigned>(votes[32 * warp + lane]) << lane;
  }
  sk_emu::group_sync(1 + static_cast<int>(warp));
  return out;
}
// Fibers switch only inside the sync primitives, so a plain add is atomic here.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}
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
