// The long form of a codec v2 frame (docs/FORMATS.md section 5.4) in one C++ call for the fused
// coders (nibble, bit planes, slots): quantised and coded row by row (codec_v2.h), then framed --
// magic, version, dtype and coder byte, T, escape count, raw bitmap, escape values, raw rows, symbol
// stream, CRC; a one-token frame in the token form -- byte for byte as
// splitkernels/codec/frame_v2.assemble_frame (the reference) frames the same parts. Only frames
// without shifted rows or token ids take it (the caller checks).
#pragma once

#include <cstdint>
#include <string>

namespace sk {

constexpr int kCoderNibble = 1, kCoderPlanes = 4, kCoderSlots = 5;  // frame_v2.CODER_*

// The fused coder and its parameters: the nibble coder's window start, or the bit-plane (Rice
// centre, k) or slot (window start, width) coder's per-channel u8 [d] arrays.
struct FusedCoder {
  int code = kCoderSlots;
  int window = 0;
  const uint8_t* first = nullptr;
  const uint8_t* second = nullptr;
};

// What a long frame holds around its header; the pointers are into the caller's x and this
// thread's scratch (valid until the thread's next encode_long_parts).
struct LongFrameParts {
  int dtype = 0, code = 0;
  int64_t T = 0, d = 0;
  const uint8_t* raw = nullptr;  // [T] flags
  const uint8_t* escapes = nullptr;
  int64_t n_escapes = 0;
  const uint8_t* x = nullptr;  // [T, d] of dtype: the raw rows' values
  const uint8_t* stream = nullptr;
  int64_t stream_len = 0;
  const int8_t* offsets = nullptr;  // [d] center offsets (frame_center.h), or null
  int scale = 0;                    // the frame's step scale (section 5.4.3; x was coded with steps at it), 0 for none
};

// Quantises and codes x [T, d] (dtype 0 fp32, 1 fp16, 2 bf16, contiguous) with the coder into this
// thread's scratch, around the frame's center offsets where it takes them (frame_center.h), and
// describes the frame's parts: "" or why the arguments are out of range; *nonfinite set (and no
// parts) when x holds a NaN or infinity.
std::string encode_long_parts(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                              const float* step, int kmax, int64_t raw_limit, const FusedCoder& coder,
                              LongFrameParts* parts, bool* nonfinite);

// Bytes of the frame of these parts.
int64_t long_frame_size(const LongFrameParts& parts);

// Writes the frame (exactly long_frame_size bytes) with its CRC continuing crc_seed.
void write_long_frame(const LongFrameParts& parts, uint32_t crc_seed, uint8_t* out);

// A session config's side of the decoder: its CRC seed, d, kmax, step and center ([d] fp32) and
// each fused coder's parameters (the nibble window start; the bit planes' Rice centre and k; the
// slots' window start and width; u8 [d] each).
struct LongFrameConfig {
  uint32_t crc_seed = 0;
  int64_t d = 0;
  int kmax = 0;
  const float* step = nullptr;
  const float* center = nullptr;
  int window = 0;
  const uint8_t *planes_centre = nullptr, *planes_k = nullptr, *slots_start = nullptr, *slots_width = nullptr;
  int scale = 0;  // the step scale the frame must carry (step is already at it), 0 for none (section 5.4.3)
};

// Decodes data[0, len) into out [T, d] of `dtype` when it is a valid long frame of a fused coder
// with T tokens (center offsets or not), no shifted rows and at most max_escapes escapes (< 0: any): true then. As the
// one-token path (token_frame.h), the Python parser stays the reference: this accepts only frames
// it accepts, with the same values, and declines (false, out maybe partly written) everything
// else, after which the caller runs the reference, which decodes or raises its own error. The
// caller bounds T * d by the frame's size before allocating out.
bool v2_decode_long_frame(const uint8_t* data, int64_t len, const LongFrameConfig& config, int dtype, int64_t T,
                          int64_t max_escapes, void* out);

}  // namespace sk
