#include "cpu/token_frame.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/half.h"
#include "cpu/bit_io.h"
#include "cpu/codec_v2.h"
#include "cpu/crc32.h"
#include "cpu/frame_bytes.h"

namespace sk {
namespace {

// The token form's marker (the tag's bits 7-5) of a frame with or without a step scale, its rANS
// stream on four lanes (coder 6) or in the narrow layout (coder 0).
uint8_t token_marker(int scale, bool four) {
  return scale ? (four ? kScaledFourLaneTokenTag : kScaledTokenTag) : (four ? kFourLaneTokenTag : kTokenTag);
}

// Lanes of a token's stream of n symbols: four in coder 6, else coder 0's narrow rule (one lane
// below 2^14 symbols, four from there).
int token_lanes(bool four, int64_t n) { return four ? kRansLongLanes : rans_lanes(n); }

// Bytes of a shifted token's residual section: `shift` bits per channel, padded to a byte.
int64_t residual_section_bytes(int64_t d, int shift) { return (d * shift + 7) / 8; }

// A shifted token's fine codes (section 5.2): each coded value's symbol becomes the coarse code of
// fine = rint(v * 2^shift) (v as the plain quantiser's; the product is exact), and its residual
// fine - (coarse << shift), offset by 2^(shift-1), goes to `section` as `shift` bits, least significant
// first; an escape's residual is 0. Returns the section's end; `section` needs 8 bytes of room past it.
uint8_t* refine_token(const void* x, int dtype, int64_t d, const float* center, const float* inv, int kmax, int shift,
                      uint8_t* sym, uint8_t* section) {
  const int half = 1 << (shift - 1);
  const float scale = static_cast<float>(1 << shift);
  const uint8_t escape = static_cast<uint8_t>(2 * kmax + 1);
  BitWriter fields;
  fields.start(section);
  for (int64_t i = 0; i < d; ++i) {
    int field = half;
    if (sym[i] != escape) {
      const float v = (load_as_float(x, dtype, i) - center[i]) * inv[i];  // |v| <= kmax: not escaped
      const int fine = static_cast<int>(std::nearbyint(v * scale));      // ties to even (default rounding mode)
      const int coarse = (fine + half) >> shift;                          // arithmetic shift: floor
      sym[i] = static_cast<uint8_t>(coarse + kmax);
      field = fine - coarse * (1 << shift) + half;
    }
    fields.put(static_cast<uint64_t>(field), shift);
  }
  return fields.finish();
}

// The decoded shifted token (section 5.2): fine = ((symbol - kmax) << shift) + residual, value
// fp32(fp32(fine * fp32(step * 2^-shift)) + center) in dtype; the escapes' exact values in order.
// false when an escape's residual is not 0 or the escape symbols are not n_esc.
bool dequantise_shifted(const uint8_t* sym, const uint8_t* section, int64_t d, const float* step,
                        const float* center, int kmax, int shift, int dtype, const uint8_t* escapes, int64_t n_esc,
                        void* out) {
  const int half = 1 << (shift - 1), item = dtype_size(dtype);
  const float fine_step = std::ldexp(1.0f, -shift);  // step * 2^-shift is exact (the config rejects subnormal steps)
  const uint8_t escape = static_cast<uint8_t>(2 * kmax + 1);
  const BitReader reader{section, residual_section_bytes(d, shift), 0};
  BitStream fields(reader, 0);
  int64_t used = 0;
  for (int64_t i = 0; i < d; ++i) {
    const int field = static_cast<int>(fields.read(shift));
    if (sym[i] == escape) {
      if (field != half || used == n_esc) return false;
      std::memcpy(static_cast<uint8_t*>(out) + i * item, escapes + used++ * item, item);
      continue;
    }
    const int fine = (sym[i] - kmax) * (1 << shift) + field - half;
    const float scaled = static_cast<float>(fine) * (step[i] * fine_step);
    store_from_float(out, dtype, i, scaled + center[i]);
  }
  return used == n_esc;
}

}  // namespace

int64_t v2_token_frame_capacity(int64_t d, int dtype, int64_t id_bytes) {
  const int64_t item = dtype == kFloat32 ? 4 : 2;
  // tag, scale, start, escape count, token ids, escapes (at most d), residuals, rANS stream (rans_encode's
  // bound), CRC
  return 2 + 2 * kMaxVarintBytes + id_bytes + d * item + residual_section_bytes(d, kMaxTokenShift) +
         4 * kRansLongLanes + 2 * d + kCrcBytes;
}

int64_t v2_encode_token_frame(const void* x, int src_dtype, const TokenFrameConfig& cfg, const float* inv,
                              int64_t raw_limit, int dtype, int lanes, const uint8_t* ids, int64_t id_bytes,
                              int64_t start, int shift, uint8_t* out) {
  const int64_t d = cfg.d, item = dtype == kFloat32 ? 4 : 2;
  if (lanes != 1 && lanes != kRansLongLanes) return -1;
  if (shift < 0 || shift > kMaxTokenShift || start < 0 || start > kMaxTokenStart) return -1;
  thread_local std::vector<uint32_t> wire;  // x in the frame's dtype (an overflow to infinity declines below)
  if (src_dtype != dtype) {
    wire.resize((d * item + 3) / 4);
    for (int64_t i = 0; i < d; ++i) store_from_float(wire.data(), dtype, i, load_as_float(x, src_dtype, i));
    x = wire.data();
  }
  thread_local std::vector<uint8_t> sym;
  sym.resize(d);
  int32_t n_esc = 0;
  uint8_t raw = 0;
  int64_t totals[2] = {0, 0};
  const int64_t head = cfg.scale ? 2 : 1;  // the tag, and the scale byte of a scaled frame
  // escapes go here first, moved down after the start, the count and the ids
  int64_t pos = head + 2 * kMaxVarintBytes + id_bytes;
  uint8_t* escapes = out + pos;
  if (!v2_quantise(x, dtype, 1, d, cfg.center, inv, cfg.kmax, raw_limit, sym.data(), &n_esc, &raw, escapes, totals)
           .empty()) {
    return -1;
  }
  if (totals[1] > 0) return -1;
  if (raw) return 0;
  const bool four = lanes == kRansLongLanes;
  out[0] = static_cast<uint8_t>(token_marker(cfg.scale, four) | (shift ? kTokenShifted : 0) | dtype);  // rANS, coded
  out[1] = static_cast<uint8_t>(cfg.scale);  // overwritten by the start or escape count when there is no scale
  pos = head;
  if (shift) pos += write_varint(static_cast<uint64_t>(start), out + pos);
  pos += write_varint(static_cast<uint64_t>(totals[0]), out + pos);
  const int64_t esc_bytes = totals[0] * item;
  std::memmove(out + pos + id_bytes, escapes, esc_bytes);
  if (id_bytes > 0) std::memcpy(out + pos, ids, id_bytes);
  pos += id_bytes + esc_bytes;
  if (shift) {  // the rANS stream's room (at least 8 bytes) follows the section
    pos = refine_token(x, dtype, d, cfg.center, inv, cfg.kmax, shift, sym.data(), out + pos) - out;
  }
  const int64_t cap = v2_token_frame_capacity(d, dtype, id_bytes) - pos - kCrcBytes;
  const int64_t len = rans_encode(sym.data(), d, cfg.tables, cfg.period, token_lanes(four, d), out + pos, cap);
  if (len < 0) return -1;
  pos += len;
  const uint32_t crc = crc32(cfg.crc_seed, out, pos);
  std::memcpy(out + pos, &crc, 4);
  return pos + kCrcBytes;
}

bool v2_decode_token_frame(const uint8_t* data, int64_t len, const TokenFrameConfig& cfg, int dtype,
                           int64_t max_escapes, int64_t id_bytes, int64_t start, int shift, void* out) {
  const int64_t head = cfg.scale ? 2 : 1;
  if (dtype < kFloat32 || dtype > kBFloat16 || cfg.d < 1 || id_bytes < 0 || len < head + 1 + kCrcBytes) return false;
  if (shift < 0 || shift > kMaxTokenShift) return false;
  // A token-form tag of this dtype (scaled as the config says) with the rANS coder on one or four lanes, the
  // shifted bit exactly when the caller gives a shift; the raw bit either way, but not with a shift.
  const uint8_t marker = data[0] & kTokenMarkerMask;
  const bool four = marker == token_marker(cfg.scale, true);
  if (!four && marker != token_marker(cfg.scale, false)) return false;
  const uint8_t fields = data[0] & ~kTokenMarkerMask;  // coder, shifted, raw and dtype
  if (shift ? fields != (kTokenShifted | dtype) : (fields & ~kTokenRaw) != dtype) return false;
  if (cfg.scale && data[1] != static_cast<uint8_t>(cfg.scale)) return false;
  const bool raw = data[0] & kTokenRaw;
  if (!raw) rans_prefetch_decoder(cfg.classes, cfg.n_classes);  // arriving while the CRC is checked
  const int64_t crc_at = len - kCrcBytes;
  uint32_t crc;
  std::memcpy(&crc, data + crc_at, 4);
  if (crc32(cfg.crc_seed, data, crc_at) != crc) return false;
  int64_t pos = head;
  uint64_t at, n_esc;
  if (shift && (!read_varint(data, pos, crc_at, at) || at != static_cast<uint64_t>(start))) return false;
  if (!read_varint(data, pos, crc_at, n_esc)) return false;
  if (pos + id_bytes > crc_at) return false;
  pos += id_bytes;
  const int64_t d = cfg.d, item = dtype == kFloat32 ? 4 : 2;
  const int64_t n_sym = raw ? 0 : d;
  if (n_esc > static_cast<uint64_t>(n_sym) || (max_escapes >= 0 && n_esc > static_cast<uint64_t>(max_escapes))) {
    return false;
  }
  const int64_t esc_bytes = static_cast<int64_t>(n_esc) * item, raw_bytes = raw ? d * item : 0;
  const int64_t res_bytes = shift ? residual_section_bytes(d, shift) : 0;
  if (pos + esc_bytes + raw_bytes + res_bytes > crc_at) return false;
  const uint8_t* escapes = data + pos;
  const uint8_t* raw_values = escapes + esc_bytes;
  const uint8_t* residuals = raw_values + raw_bytes;
  const uint8_t* stream = residuals + res_bytes;
  const int64_t stream_len = crc_at - (pos + esc_bytes + raw_bytes + res_bytes);
  if (shift && (d * shift) % 8 && residuals[res_bytes - 1] >> ((d * shift) % 8)) return false;  // padding bits
  if (!all_finite(escapes, static_cast<int64_t>(n_esc), dtype)) return false;
  if (n_sym > 16 * stream_len + 64) return false;  // rans.max_symbols
  if (raw) {  // the token travels exact: no symbols, no escapes
    if (stream_len != 0 || !all_finite(raw_values, d, dtype)) return false;
    std::memcpy(out, raw_values, d * item);
    return true;
  }
  thread_local std::vector<uint8_t> sym;
  sym.resize(d);
  int64_t escape_symbols = -1;
  if (shift) {  // the fine codes: one pass over the channels with their residual fields
    return rans_decode(stream, stream_len, n_sym, cfg.tables, cfg.period, token_lanes(four, n_sym), sym.data(),
                       2 * cfg.kmax + 1, &escape_symbols)
               .empty() &&
           escape_symbols == static_cast<int64_t>(n_esc) &&
           dequantise_shifted(sym.data(), residuals, d, cfg.step, cfg.center, cfg.kmax, shift, dtype, escapes,
                              static_cast<int64_t>(n_esc), out);
  }
  thread_local std::vector<uint32_t> esc;  // the escape values, aligned for the dequantiser
  esc.resize((esc_bytes + 3) / 4);
  std::memcpy(esc.data(), escapes, esc_bytes);
  if (!rans_decode(stream, stream_len, n_sym, cfg.tables, cfg.period, token_lanes(four, n_sym), sym.data(),
                   2 * cfg.kmax + 1, &escape_symbols)
           .empty() ||
      escape_symbols != static_cast<int64_t>(n_esc)) {
    return false;
  }
  return v2_dequantise(sym.data(), 1, d, cfg.step, cfg.center, cfg.kmax, dtype, out, nullptr, esc.data(),
                       static_cast<int64_t>(n_esc))
      .empty();
}

}  // namespace sk
