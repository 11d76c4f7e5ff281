// The commonest frame in one call each way (a decode step's hidden state): a codec v2 frame of one token whose symbols are rANS
// coded on one or four lanes (docs/FORMATS.md section 5.4.1, the token form, with the coder and shifted bits clear)
// parsed, checked, entropy decoded and dequantised.
//
// The Python parser (splitkernels/codec/frame_v2.py) stays the reference: this path accepts only
// frames it accepts and gives the same bits, and it declines everything else (another token
// count, another coder, a flag bit, any defect), after which the caller runs the reference,
// which raises the reference error. It never reports why it declined.
#pragma once

#include <cstdint>

#include "cpu/rans.h"

namespace sk {

struct TokenFrameConfig {
  uint32_t crc_seed;               // CRC-32 of the session config's digest (every frame's CRC starts there)
  int64_t d;                       // channels
  int kmax;                        // symbols 0..2*kmax are codes, 2*kmax+1 the escape
  const RansTables* const* tables;  // one table per channel of a period-`period` cycle
  int64_t period;
  const RansTables* const* classes;  // the distinct tables among them (the decoder loads them while it checks the frame)
  int64_t n_classes;
  const float* step;               // [d] fp32 (already scaled by the frame's scale)
  const float* center;             // [d] fp32
  int scale;                       // the frame's step scale (section 5.4.3): 0, or the byte after a 0b110 tag
};

constexpr int kMaxTokenShift = 6;                   // a position or token shift (section 5.2)
constexpr int64_t kMaxTokenStart = (1LL << 31) - 1;  // a frame's start position

// Decodes `data[0, len)` into out [1, d] of `dtype` (0 fp32, 1 fp16, 2 bf16) when it is a valid
// one-token rANS frame of that dtype and of config.scale with at most max_escapes escapes (< 0: any); true then.
// false: declined, out may be partly written. id_bytes: the length of the token-id section after
// the escape count (a config's prediction; 0 without), skipped here: the caller reads and checks it.
// shift > 0: the frame must be a coded token with the shifted bit and start position `start`, whose
// fine codes have that shift (the caller reads both from the frame and the config); 0: no shifted bit.
bool v2_decode_token_frame(const uint8_t* data, int64_t len, const TokenFrameConfig& config, int dtype,
                           int64_t max_escapes, int64_t id_bytes, int64_t start, int shift, void* out);

// The edge's side: x [1, d] of `src_dtype` (contiguous), rounded to `dtype` (to nearest even, as
// torch's .to(dtype)) where they differ (the session's wire dtype; the edge computes in fp32), as
// that frame of `dtype` -- quantised with inv (1/step, [d] fp32), escapes counted and kept exact,
// rANS coded, CRC'd -- byte for byte what the Python encoder writes. Returns the frame's length in
// out (capacity >= v2_token_frame_capacity(d, dtype, id_bytes)), 0 when the token has more than
// raw_limit escapes (it travels raw: the caller's general path writes it) and -1 when x (in
// `dtype`) holds a NaN or infinity or lanes is neither 1 nor 4 (the caller rejects it). lanes: the
// rANS layout the writer picked (4: the four-lane markers, coder 6). ids[0, id_bytes): the token-id
// section a config's prediction puts after the escape count (x is then the residual). shift > 0:
// the token's shift at position `start` (section 5.2), coded as fine codes with a residual section.
int64_t v2_encode_token_frame(const void* x, int src_dtype, const TokenFrameConfig& config, const float* inv,
                              int64_t raw_limit, int dtype, int lanes, const uint8_t* ids, int64_t id_bytes,
                              int64_t start, int shift, uint8_t* out);
int64_t v2_token_frame_capacity(int64_t d, int dtype, int64_t id_bytes);

}  // namespace sk
