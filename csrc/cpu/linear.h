// Matmuls against compressed weights on the CPU: y [M, N] = x [M, K] @ W^T (+ bias).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sk {

// W is the packed low-bit weight of docs/FORMATS.md section 2: qweight int32 [N, words],
// scale/zero [N, K/group_size] of `scale_dtype`. x and y are [M, K] / [M, N] of `dtype`;
// bias (nullable) is fp32 [N]. Accumulates in fp32. Returns "" or an error message.
// fp32_as_bf16 (fp32 activations, M > 1): the caller allows bf16 precision for the products (torch's
// fp32 matmul precision "bf16"), so the bf16 kernels, where they take the layout, multiply the
// activations rounded to bf16 and write fp32 sums. Activations holding a value that is not
// finite or lies beyond bf16's range stay in fp32.
std::string lowbit_linear(const void* x, int dtype, int64_t M, int64_t K, const int32_t* qweight, int64_t N,
                          int64_t words, const void* scale, const void* zero, int scale_dtype, int bits,
                          int64_t group_size, const float* bias, void* y, bool fp32_as_bf16 = false);

// Whether lowbit_linear runs the bf16-activation kernels (exact codes x bf16 with vdpbf16ps,
// at every M) for this activation dtype and layout with the instruction set in use.
bool lowbit_bf16_kernel(int dtype, int bits, int64_t group_size);

// Whether lowbit_linear runs the VNNI path (one or two bf16 or fp32 activation rows, fp32 up to
// vnni_max_fp32_rows on CPUs without AMX tiles, each as a 22-bit fixed point per group (one fp32
// row with a group far above its mean: 30-bit), vpdpbusd against the packed 8-bit codes, the
// fields of 2- and 4-bit codes or, with VBMI, 3-bit codes spread into bytes) for `bits`-bit codes
// and M activation rows of K values, unless x holds a NaN or an infinity (then the bf16 kernels
// run), or fp32 rows (more than one) a group the 22-bit fixed point cannot carry within 1e-5 (then
// the fp32 kernels).
bool lowbit_vnni(int dtype, int bits, int64_t group_size, int64_t M, int64_t K);

// Dequantises W into out [N, K] (natural order) of out_dtype (float32 or bfloat16), for the
// large-M path that hands the matmul to a BLAS.
std::string lowbit_dequantize(const int32_t* qweight, int64_t N, int64_t words, int64_t K, const void* scale,
                              const void* zero, int scale_dtype, int bits, int64_t group_size, void* out,
                              int out_dtype);

// Instruction sets of the lowbit and int8 kernels: those this CPU supports (best last), the one
// in use, and a switch for tests and benchmarks (returns "" or an error message).
std::vector<std::string> lowbit_isas();
std::string lowbit_isa();
std::string set_lowbit_isa(const std::string& name);

// W8A8: x rows quantised to symmetric int8 (absmax / 127, round half to even), exact int32
// dot products with w [N, K] int8, y = acc * s_x * s_w (+ bias), each step an fp32 operation
// in the reference's order. bias (nullable) is fp32 [N].
std::string int8_linear(const void* x, int dtype, int64_t M, int64_t K, const int8_t* w, int64_t N,
                        const float* w_scale, const float* bias, void* y);

}  // namespace sk
