// Host-side emulation of the few CUDA features the kernels in csrc/cuda use, so the CPU tests
// can run the exact kernel source against the reference where no GPU exists.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread. Fibers switch at
// the sync primitives (block barriers, warp exchanges and votes) and after every atomic, and
// the scheduler then resumes a *random* runnable fiber (seed: SK_EMU_SEED, default 1), so a
// thread may run many barrier-free steps ahead of another: a missing __syncthreads() or
// __syncwarp() shows up as wrong results for some seed. Blocks run one after another: the
// dynamic shared memory is refilled with 0xA5 bytes before each block, so a kernel that reads
// it before writing sees garbage, but static `__shared__` variables are function statics that
// keep the previous block's values (GCC will not move template statics into one section that
// could be poisoned). A barrier that some threads never reach (a divergent __syncthreads) is
// reported and aborts instead of hanging. Meant for small shapes in tests, one launch at a time
// per process.
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
#include <random>
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
  int waiting = -1;  // group the fiber waits on, or -1 when runnable
  unsigned long wait_generation = 0;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline std::vector<Group> groups;
inline int current = 0;
inline std::function<void()> kernel_body;
inline std::mt19937_64 rng{1};

inline void yield() { swapcontext(&fibers[current].context, &scheduler); }

inline void group_sync(int id) {
  Group& g = groups[id];
  Fiber& self = fibers[current];
  self.waiting = id;
  self.wait_generation = g.generation;
  if (++g.arrived == g.members) {
    g.arrived = 0;
    ++g.generation;
  }
  yield();  // the scheduler resumes this fiber once the group's generation has moved on
}

// A switch point without waiting (after atomics): another fiber may run in between.
inline void preempt() { yield(); }

inline void fiber_main() {
  kernel_body();
  fibers[current].done = true;
  // returning resumes uc_link, the scheduler
}

inline bool runnable(const Fiber& f) {
  return !f.done && (f.waiting < 0 || groups[f.waiting].generation != f.wait_generation);
}

// Fresh dynamic shared memory for a block, poisoned: kernels must write before reading.
inline void poison_shared(std::size_t dynamic_bytes) { dynamic_shared_memory.assign(dynamic_bytes + 16, 0xA5); }

// Runs `body` for every thread of every block, blocks in order, threads in a random interleaving.
template <typename Body>
void launch(unsigned grid, unsigned block, std::size_t shared_bytes, Body body) {
  static const bool seeded = [] {
    if (const char* seed = std::getenv("SK_EMU_SEED")) rng.seed(std::strtoull(seed, nullptr, 10));
    return true;
  }();
  (void)seeded;
  block_dim = dim3(block, 1, 1);
  kernel_body = body;
  fibers.resize(block);
  std::vector<int> ready;
  for (unsigned b = 0; b < grid; ++b) {
    block_index = dim3(b, 1, 1);
    poison_shared(shared_bytes);
    groups.assign(1 + (block + 31) / 32, Group{});
    groups[0].members = static_cast<int>(block);
    for (unsigned w = 0; w < (block + 31) / 32; ++w) groups[1 + w].members = static_cast<int>(std::min(32u, block - 32 * w));
    for (unsigned t = 0; t < block; ++t) {
      Fiber& f = fibers[t];
      f.done = false;
      f.waiting = -1;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &scheduler;
      makecontext(&f.context, fiber_main, 0);
    }
    for (;;) {
      ready.clear();
      bool all_done = true;
      for (unsigned t = 0; t < block; ++t) {
        all_done &= fibers[t].done;
        if (runnable(fibers[t])) ready.push_back(static_cast<int>(t));
      }
      if (all_done) break;
      if (ready.empty()) {
        std::fprintf(stderr, "cuda emulation: block %u deadlocked (a barrier not reached by every thread)\n", b);
        std::abort();
      }
      current = ready[std::uniform_int_distribution<std::size_t>(0, ready.size() - 1)(rng)];
      fibers[current].waiting = -1;
      thread_index = dim3(static_cast<unsigned>(current), 1, 1);
      swapcontext(&scheduler, &fibers[current].context);
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
// Fibers switch only at sync points, so the read-modify-write itself is atomic; the switch
// after it lets other threads interleave between atomics as they would on a GPU.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  sk_emu::preempt();
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// Byte i of the result is byte (s >> 4i) & 7 of the 8 bytes {y, x} (x the low word).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const std::uint64_t v = (static_cast<std::uint64_t>(y) << 32) | x;
  unsigned out = 0;
  for (int i = 0; i < 4; ++i) out |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return out;
}
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
template <typename T>
T __ldcg(const T* p) { return *p; }
// Blocks run one after another and fibers share one memory: every write is visible at once, so a
// fence only marks a point where another thread may run.
inline void __threadfence() { sk_emu::preempt(); }
// The warp's m16n8k16 MMA (csrc/cuda/mma.cuh gives the fragment layout): every lane posts its
// A and B registers, meets the warp, and computes its own four accumulators from everyone's
// registers, products and sums in fp32 in k order.
#define SK_MMA_EMULATED
namespace sk_emu {
template <typename T>
float mma_element(std::uint32_t pair, int which) {
  const std::uint16_t bits = static_cast<std::uint16_t>(which ? pair >> 16 : pair & 0xFFFF);
  T v;
  std::memcpy(&v, &bits, 2);
  return static_cast<float>(v);
}
}  // namespace sk_emu
namespace sk {
namespace cuda {
template <typename T>
void mma_m16n8k16(float* d, const std::uint32_t* a, const std::uint32_t* b) {
  static std::uint32_t slots[32][32][6];  // [warp][lane][a0..a3, b0, b1]
  const int warp = static_cast<int>(sk_emu::thread_index.x / 32), lane = static_cast<int>(sk_emu::thread_index.x % 32);
  for (int r = 0; r < 4; ++r) slots[warp][lane][r] = a[r];
  slots[warp][lane][4] = b[0];
  slots[warp][lane][5] = b[1];
  sk_emu::group_sync(1 + warp);
  const int g = lane / 4, t = lane % 4;
  auto A = [&](int row, int col) {  // A[row][col], row 0..15, col 0..15
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    return sk_emu::mma_element<T>(slots[warp][4 * (row % 8) + (col % 8) / 2][reg], col % 2);
  };
  auto B = [&](int row, int col) {  // B[row][col], row (k) 0..15, col (n) 0..7
    return sk_emu::mma_element<T>(slots[warp][4 * col + (row % 8) / 2][4 + (row >= 8 ? 1 : 0)], row % 2);
  };
  for (int c = 0; c < 4; ++c) {
    const int row = c < 2 ? g : g + 8, col = 2 * t + (c & 1);
    float sum = 0.0f;
    for (int kk = 0; kk < 16; ++kk) sum += A(row, kk) * B(kk, col);
    d[c] += sum;
  }
  sk_emu::group_sync(1 + warp);  // the slots are read before any lane posts its next MMA
}
}  // namespace cuda
}  // namespace sk
using std::isfinite;
using std::max;
using std::min;
