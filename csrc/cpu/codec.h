// Fused TS + TAB-Q codec on the CPU (docs/FORMATS.md section 3), one token row per task.
#pragma once

#include <cstdint>
#include <string>

namespace sk {

struct EncodeOutputs {
  uint8_t* bits;     // [T]
  uint16_t* lo;      // [T] fp16 bits
  uint16_t* step;    // [T] fp16 bits
  float* hi;         // [T]
  int32_t* cnt;      // [T]
  int32_t* idx;      // [T, C]
  void* val;         // [T, C] in the input dtype
  uint8_t* codes;    // [T, d * itemsize]
  int32_t* nbytes;   // [T]
};

// Encodes x [T, d] (dtype per sk::DType). `menu` lists the error-mode widths (any order,
// 1..8); `forced` (nullable, [T]) replaces the error-mode choice. Returns "" or an error message.
std::string ts_tabq_encode(const void* x, int dtype, int64_t T, int64_t d, bool abs_threshold, double threshold,
                           int64_t capacity, const int* menu, int n_menu, double eps, const uint8_t* forced,
                           const EncodeOutputs& out);

// Decodes into out [T, d] of `dtype`. lo/step are fp32 [T]; codes rows are `codes_stride`
// bytes apart; idx/val have `capacity` slots per row. Returns "" or an error message.
std::string ts_tabq_decode(const int32_t* bits, const float* lo, const float* step, const int32_t* cnt,
                           const int32_t* idx, const void* val, int64_t capacity, const uint8_t* codes,
                           int64_t codes_stride, int64_t T, int64_t d, int dtype, void* out);

}  // namespace sk
