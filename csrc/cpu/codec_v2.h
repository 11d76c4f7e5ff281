// Codec v2 quantiser on the CPU (docs/FORMATS.md section 5.2), bit-exact with splitkernels/codec/v2.py.
#pragma once

#include <cstdint>
#include <string>

namespace sk {

// One fused pass over x [T, d] (dtype per sk::DType): v = (fp32(x) - center) * inv, escape symbol
// 2*kmax+1 where !(|v| <= kmax), else rint_half_even(v) + kmax; per-token escape counts, and
// tokens with more than raw_limit escapes marked raw with an all-zero symbol row.
std::string v2_quantise(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                        int kmax, int64_t raw_limit, uint8_t* sym, int32_t* n_esc, uint8_t* raw);

// out [T, d] (dtype) = fp32(fp32((sym - kmax) * step) + center) for every value; escape positions
// and raw rows are written the same way and are the caller's to overwrite with exact values.
std::string v2_dequantise(const uint8_t* sym, int64_t T, int64_t d, const float* step, const float* center, int kmax,
                          int dtype, void* out);

}  // namespace sk
