// Internal interface between lowbit_linear.cpp (argument checks, activation layout, threads,
// ISA choice) and the per-ISA kernels in csrc/cpu/isa/, which are compiled once per
// instruction set and picked at run time from what the CPU reports.
#pragma once

#include <cstdint>

namespace sk {

// One y[M, N] = x @ dequant(W)^T problem. Activations are prepared by the caller in the
// order the kernels decode codes (see decode_order in lowbit_linear.cpp).
struct LowbitProblem {
  const uint8_t* qweight;  // [N, row_bytes] packed codes
  int64_t row_bytes;
  int64_t N, K, G, group_size;
  int bits;
  bool phased;             // codes decoded phase by phase within each group (x permuted to match)
  const void* scale;       // [N, G] of scale_dtype
  const void* zero;
  int scale_dtype;
  int64_t M;
  const float* x32;        // [M, K] fp32 in decode order (fp32 kernels)
  const uint16_t* x16;     // [M, K] bf16 in decode order (bf16 kernels)
  const float* xsum;       // [M, G] group sums of the activations the kernel reads
  float* y;                // [M, N] fp32 result (before bias and the output dtype)
  void* w_out;             // [N, K] dequantised weight in natural order (dequantise)
  int w_dtype;             // kFloat32 or kBFloat16 (dequantise)
};

// Each function handles weight rows [n_begin, n_end) for all M activation rows.
using LowbitRowsFn = void (*)(const LowbitProblem&, int64_t n_begin, int64_t n_end);

struct LowbitKernels {
  const char* name;
  LowbitRowsFn fp32_rows;    // fp32 activations, any bits/group layout
  int64_t fused_rows;        // fp32_rows reads codes straight into the FMAs up to this M (phase layouts)
  LowbitRowsFn bf16_rows;    // bf16 activations, exact integer codes x bf16 (nullptr if absent)
  LowbitRowsFn dequantize;   // writes w_out rows
};

// Whether bf16_rows handles this layout: bits 2/4/8 and groups of whole 64-byte chunks.
inline bool bf16_kernel_layout(int bits, int64_t group_size) {
  return (bits == 2 || bits == 4 || bits == 8) && (group_size * bits) % 512 == 0;
}

// Position of a group's code j (natural order) in the bf16 kernels' activation order: within
// each 64-byte chunk, the pair vectors v = 2 * phase + t (t = 0, 1) hold, for each four-byte
// quad q, the codes of that phase from bytes 4q + t and 4q + t + 2 (see isa/lowbit_bf16.cpp).
inline int64_t bf16_pair_position(int bits, int64_t j) {
  const int64_t cpb = 8 / bits, byte = j / cpb, phase = j % cpb;
  const int64_t chunk = byte / 64, in_chunk = byte % 64, quad = in_chunk / 4, t = in_chunk % 2, h = (in_chunk % 4) / 2;
  return chunk * 64 * cpb + (2 * phase + t) * 32 + 2 * quad + h;
}

namespace isa_generic { const LowbitKernels& lowbit_kernels(); }
namespace isa_avx2 { const LowbitKernels& lowbit_kernels(); }
namespace isa_avx512 { const LowbitKernels& lowbit_kernels(); }
// AVX-512 BF16 adds bf16_rows to the AVX-512 fp32 kernels.
namespace isa_avx512bf16 { LowbitRowsFn bf16_rows(); }

}  // namespace sk
