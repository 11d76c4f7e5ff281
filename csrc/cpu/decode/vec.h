// Vector primitives of the native decode step (csrc/cpu/decode/decode.cpp), compiled once per
// instruction set like the low-bit kernels (CMakeLists.txt builds vec.cpp with
// -DSK_ISA_NS=isa_generic / isa_avx2 / isa_avx512) and picked at run time from what the CPU
// reports. They promise a tolerance, not bit equality (FMA contraction is on).
#pragma once

#include <cstdint>

namespace sk {

struct DecodeVec {
  const char* name;
  // sum_i a[i] * b[i]
  float (*dot)(const float* a, const float* b, int64_t n);
  // y[n] = dot(W[n], x) (+ bias[n]) for rows [n0, n1) of a dense fp32 W [N, K].
  void (*f32_rows)(const float* w, int64_t K, const float* x, const float* bias, float* y, int64_t n0, int64_t n1);
  // The same for M activation rows x [M, ldx] -> y [M, ldy] (columns [n0, n1) of each row), one
  // pass over the weight rows; each y element equals f32_rows' for that row alone, bit for bit.
  void (*f32_rows_m)(const float* w, int64_t K, const float* x, int64_t ldx, int64_t M, const float* bias, float* y,
                     int64_t ldy, int64_t n0, int64_t n1);
  // out[h] = softmax(cap(scale * k q[h])) v for the `heads` query heads q [heads, hd] of one
  // key/value head over n >= 1 positions of its rows k, v [n, hd]; out [heads, hd]; p: heads n
  // floats of scratch (left holding the attention weights). cap(s) = softcap tanh(s / softcap)
  // for softcap > 0, else s. sinks (null: none): each head's sink, one more logit in the
  // softmax's denominator whose value weighs nothing. slopes (null: none): ALiBi, each head's
  // score of position j (of n, the last the query's own) gains slopes[h] (j - (n - 1)) after the cap.
  void (*attend)(const float* q, int64_t heads, const float* k, const float* v, int64_t n, int64_t hd, float scale,
                 float softcap, const float* sinks, const float* slopes, float* p, float* out);
};

namespace isa_generic { const DecodeVec& decode_vec(); }
namespace isa_avx2 { const DecodeVec& decode_vec(); }
namespace isa_avx512 { const DecodeVec& decode_vec(); }

}  // namespace sk
