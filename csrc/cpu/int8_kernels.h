// Internal interface between int8_linear.cpp (checks, activation conversion, threads, ISA
// choice) and the per-ISA W8A8 kernels of csrc/cpu/isa/int8_dot.cpp.
#pragma once

#include <cstdint>

namespace sk {

// Largest K (exclusive) whose int8 x int8 dot products are exact in int32.
constexpr int64_t kInt8MaxK = (int64_t{1} << 31) / (127 * 127);

// One y[M, N] = (xq @ w^T) * xs * w_scale (+ bias) problem with exact int32 dot products.
struct Int8Problem {
  const int8_t* xq;       // [M, K] quantised activations
  const int32_t* xsum;    // [M] sum of each xq row (kernels that offset the weights need it)
  const float* xs;        // [M] activation scales
  const int8_t* w;        // [N, K]
  const float* w_scale;   // [N]
  const float* bias;      // [N] or nullptr
  int64_t M, N, K;
  void* y;                // [M, N] of `dtype`
  int dtype;
};

struct Int8Kernels {
  // Quantises x[K] into q (symmetric, absmax / 127, round half to even) and sets *qsum to the
  // sum of q; returns the scale (1 for an all-zero row).
  float (*quantize_row)(const float* x, int64_t K, int8_t* q, int32_t* qsum);
  // Writes y rows' columns [n_begin, n_end) for all M activation rows.
  void (*rows)(const Int8Problem& p, int64_t n_begin, int64_t n_end);
};

namespace isa_generic { const Int8Kernels& int8_kernels(); }
namespace isa_avx2 { const Int8Kernels& int8_kernels(); }
namespace isa_avx512 { const Int8Kernels& int8_kernels(); }
namespace isa_avx512vnni { const Int8Kernels& int8_kernels(); }

// The kernels of the instruction set chosen for the lowbit kernels (set_lowbit_isa).
const Int8Kernels& current_int8_kernels();

}  // namespace sk
