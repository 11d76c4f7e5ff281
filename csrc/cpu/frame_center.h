// Center offsets of long codec v2 frames (docs/FORMATS.md section 5.4.2), bit-exact with
// splitkernels/codec/frame_center.py: frames of at least kCenterMinTokens tokens sample every
// max(1, T / kCenterSamples)-th token, quantise those with the config's center, and carry per channel
// the lower median of the coded samples' symbols minus kmax, clipped to [-8, 7], one nibble each;
// every value of the frame then codes around fp32(center + fp32(offset * step)).
#pragma once

#include <cstdint>

namespace sk {

constexpr int64_t kCenterMinTokens = 256, kCenterSamples = 64;
constexpr int kCenterLow = -8, kCenterHigh = 7;
constexpr int64_t kCenterMaxRows = 255;  // the count pass counts in bytes
constexpr uint8_t kCenterFlag = 0x08;  // in the long form's dtype byte

inline int64_t center_section_bytes(int64_t d) { return (d + 1) / 2; }

// The offsets of a frame of x [T, d] (contiguous, dtype 0 fp32, 1 fp16, 2 bf16) into offsets [d]:
// true when the frame carries them (T >= kCenterMinTokens, a sampled token is coded and an offset
// is not 0).
bool fit_center_offsets(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                        int kmax, int64_t raw_limit, int8_t* offsets);

// The offsets of the sampled rows' symbols sym [rows, d] with their raw flags raw [rows] (1 <= rows
// <= kCenterMaxRows): per channel the lower median of the coded rows' symbols minus kmax, clipped
// to [-8, 7]; true when a row is coded and an offset is not 0. fit_center_offsets' second half,
// for samples quantised elsewhere (a GPU).
bool center_offsets_of_symbols(const uint8_t* sym, const uint8_t* raw, int64_t rows, int64_t d, int kmax,
                               int8_t* offsets);

// out[c] = fp32(center[c] + fp32(offsets[c] * step[c])); false when one is not finite.
bool frame_centers(const float* center, const float* step, const int8_t* offsets, int64_t d, float* out);

// The section (center_section_bytes(d) bytes): the even channel in the low nibble, a padding nibble 0.
void pack_center_offsets(const int8_t* offsets, int64_t d, uint8_t* out);

// The offsets of a section; false when it is invalid (a set padding nibble, or every offset 0).
bool unpack_center_offsets(const uint8_t* in, int64_t d, int8_t* offsets);

}  // namespace sk
