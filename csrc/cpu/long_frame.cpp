#include "cpu/long_frame.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "cpu/codec_v2.h"
#include "cpu/crc32.h"
#include "cpu/frame_center.h"
#include "cpu/nibble.h"
#include "cpu/planes.h"
#include "cpu/slots.h"
#include "cpu/frame_bytes.h"
#include "cpu/le_bytes.h"

namespace sk {
namespace {

constexpr uint8_t kMagic[4] = {'S', 'K', 'T', 'Q'};
constexpr uint8_t kVersion = 2;
constexpr int64_t kHeadBytes = 6;

int64_t raw_rows(const LongFrameParts& p) { return std::count(p.raw, p.raw + p.T, uint8_t{1}); }

}  // namespace

std::string encode_long_parts(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                              const float* step, int kmax, int64_t raw_limit, const FusedCoder& coder,
                              LongFrameParts* parts, bool* nonfinite) {
  if (dtype < kFloat32 || dtype > kBFloat16 || T < 1 || d < 1 || raw_limit < 0)
    return "v2 long frame: unknown dtype, or T, d or raw_limit out of range";
  if (T == 1 && coder.code != kCoderNibble)
    return "v2 long frame: a one-token frame cannot carry the bit-plane or slot coder (its tag has one coder bit)";
  const int64_t item = dtype == kFloat32 ? 4 : 2;
  thread_local std::vector<int32_t> n_esc;
  thread_local std::vector<uint8_t> raw, escapes, stream;
  thread_local std::vector<int8_t> offsets;
  thread_local std::vector<float> centers;
  offsets.resize(d);
  centers.resize(d);
  const bool centered = fit_center_offsets(x, dtype, T, d, center, inv, kmax, raw_limit, offsets.data()) &&
                        frame_centers(center, step, offsets.data(), d, centers.data());
  if (centered) center = centers.data();
  n_esc.resize(T);
  raw.resize(T);
  escapes.resize(T * std::min(d, raw_limit) * item + item);  // a coded row has at most raw_limit escapes
  int64_t totals[3] = {0, 0, 0};
  std::string err;
  if (coder.code == kCoderNibble) {
    stream.resize(nibble_capacity(T, d) + kNibbleSlack);
    err = v2_encode_nibble(x, dtype, T, d, center, inv, kmax, raw_limit, coder.window, nullptr, n_esc.data(),
                           raw.data(), escapes.data(), stream.data(), static_cast<int64_t>(stream.size()), totals);
  } else if (coder.code == kCoderPlanes) {
    stream.resize(planes_capacity(T, d));
    err = v2_encode_planes(x, dtype, T, d, center, inv, kmax, raw_limit, coder.first, coder.second, nullptr,
                           n_esc.data(), raw.data(), escapes.data(), stream.data(), static_cast<int64_t>(stream.size()),
                           totals);
  } else if (coder.code == kCoderSlots) {
    stream.resize(slots_capacity(T, d));
    err = v2_encode_slots(x, dtype, T, d, center, inv, kmax, raw_limit, coder.first, coder.second, nullptr,
                          n_esc.data(), raw.data(), escapes.data(), stream.data(), static_cast<int64_t>(stream.size()),
                          totals);
  } else {
    return "v2 long frame: the coder must be nibble (1), bit planes (4) or slots (5)";
  }
  if (!err.empty()) return err;
  *nonfinite = totals[1] > 0;
  if (totals[2] < 0) return "v2 long frame: a coder parameter is out of range";
  *parts = LongFrameParts{dtype, coder.code, T, d, raw.data(), escapes.data(), totals[0],
                          static_cast<const uint8_t*>(x), stream.data(), totals[2],
                          centered ? offsets.data() : nullptr};
  return "";
}

int64_t long_frame_size(const LongFrameParts& p) {
  const int64_t item = p.dtype == kFloat32 ? 4 : 2;
  const int64_t head = (p.T == 1 ? 1 : kHeadBytes + varint_bytes(p.T) + (p.T + 7) / 8) + (p.scale ? 1 : 0) +
                       (p.offsets ? center_section_bytes(p.d) : 0);
  return head + varint_bytes(p.n_escapes) + p.n_escapes * item + raw_rows(p) * p.d * item + p.stream_len + kCrcBytes;
}

void write_long_frame(const LongFrameParts& p, uint32_t crc_seed, uint8_t* out) {
  const int64_t item = p.dtype == kFloat32 ? 4 : 2, row = p.d * item;
  uint8_t* at = out;
  if (p.T == 1) {  // the token form (only the nibble coder of the fused ones has a tag: T = 1 takes rANS otherwise)
    *at++ = static_cast<uint8_t>((p.scale ? kScaledTokenTag : kTokenTag) | (p.code == kCoderNibble ? kTokenCoder : 0) |
                                 (p.raw[0] ? kTokenRaw : 0) | p.dtype);
    if (p.scale) *at++ = static_cast<uint8_t>(p.scale);
    at += write_varint(p.n_escapes, at);
  } else {
    std::memcpy(at, kMagic, 4);
    at[4] = kVersion;
    at[5] = static_cast<uint8_t>(p.dtype | p.code << 4 | (p.offsets ? kCenterFlag : 0) | (p.scale ? kScaleFlag : 0));
    at += kHeadBytes;
    if (p.scale) *at++ = static_cast<uint8_t>(p.scale);
    at += write_varint(p.T, at);
    at += write_varint(p.n_escapes, at);
    for (int64_t t = 0; t < p.T; t += 8) {  // the raw bitmap, the first token lowest
      uint8_t byte = 0;
      for (int64_t i = t; i < std::min(t + 8, p.T); ++i) byte |= static_cast<uint8_t>((p.raw[i] != 0) << (i - t));
      *at++ = byte;
    }
    if (p.offsets) {
      pack_center_offsets(p.offsets, p.d, at);
      at += center_section_bytes(p.d);
    }
  }
  std::memcpy(at, p.escapes, p.n_escapes * item);
  at += p.n_escapes * item;
  for (int64_t t = 0; t < p.T; ++t) {
    if (!p.raw[t]) continue;
    std::memcpy(at, p.x + t * row, row);
    at += row;
  }
  std::memcpy(at, p.stream, p.stream_len);
  at += p.stream_len;
  const uint32_t crc = crc32(crc_seed, out, at - out);
  for (int i = 0; i < 4; ++i) at[i] = static_cast<uint8_t>(crc >> (8 * i));
}

bool v2_decode_long_frame(const uint8_t* data, int64_t len, const LongFrameConfig& cfg, int dtype, int64_t T,
                          int64_t max_escapes, void* out) {
  const int64_t d = cfg.d, item = dtype == kFloat32 ? 4 : 2, row = d * item;
  if (len < kHeadBytes + 2 + kCrcBytes || std::memcmp(data, kMagic, 4) != 0 || data[4] != kVersion) return false;
  const int code = data[5] >> 4;  // the shifted flag (bit 7) declines too: its frames take the reference
  const bool centered = data[5] & kCenterFlag;
  if ((data[5] & 0x03) != dtype || (code != kCoderNibble && code != kCoderPlanes && code != kCoderSlots)) return false;
  if (((data[5] & kScaleFlag) != 0) != (cfg.scale != 0) || (cfg.scale && data[6] != static_cast<uint8_t>(cfg.scale)))
    return false;
  const int64_t crc_at = len - kCrcBytes;
  if (crc32(cfg.crc_seed, data, crc_at) != load_u32(data + crc_at)) return false;
  int64_t pos = kHeadBytes + (cfg.scale ? 1 : 0);
  uint64_t t = 0, n_esc = 0;
  if (!read_varint(data, pos, crc_at, t) || static_cast<int64_t>(t) != T || T < 1) return false;
  if (!read_varint(data, pos, crc_at, n_esc) || (max_escapes >= 0 && static_cast<int64_t>(n_esc) > max_escapes))
    return false;
  const int64_t map_bytes = (T + 7) / 8;
  if (pos + map_bytes > crc_at) return false;
  thread_local std::vector<uint8_t> raw;
  raw.resize(T);
  for (int64_t i = 0; i < T; ++i) raw[i] = (data[pos + i / 8] >> (i % 8)) & 1;
  if (T % 8 && (data[pos + map_bytes - 1] >> (T % 8))) return false;  // bits beyond T
  pos += map_bytes;
  const float* center = cfg.center;
  if (centered) {  // a one-token frame carries none; an invalid section or center: the reference says why
    thread_local std::vector<int8_t> offsets;
    thread_local std::vector<float> centers;
    offsets.resize(d);
    centers.resize(d);
    if (T < 2 || center_section_bytes(d) > crc_at - pos || !unpack_center_offsets(data + pos, d, offsets.data()) ||
        !frame_centers(cfg.center, cfg.step, offsets.data(), d, centers.data()))
      return false;
    pos += center_section_bytes(d);
    center = centers.data();
  }
  const int64_t n_raw = std::count(raw.begin(), raw.end(), uint8_t{1});
  if (static_cast<int64_t>(n_esc) > (T - n_raw) * d) return false;
  const int64_t esc_bytes = static_cast<int64_t>(n_esc) * item, raw_bytes = n_raw * row;
  if (esc_bytes > crc_at - pos || raw_bytes > crc_at - pos - esc_bytes) return false;
  const uint8_t* escapes = data + pos;
  const uint8_t* raw_values = escapes + esc_bytes;
  if (!all_finite(escapes, static_cast<int64_t>(n_esc), dtype) || !all_finite(raw_values, n_raw * d, dtype)) return false;
  const uint8_t* stream = raw_values + raw_bytes;
  const int64_t stream_len = crc_at - (pos + esc_bytes + raw_bytes);
  std::string err;
  if (code == kCoderNibble) {
    err = v2_decode_nibble(stream, stream_len, T, d, raw.data(), cfg.window, cfg.step, center, cfg.kmax, dtype,
                           out, escapes, static_cast<int64_t>(n_esc));
  } else if (code == kCoderPlanes) {
    err = v2_decode_planes(stream, stream_len, T, d, raw.data(), cfg.planes_centre, cfg.planes_k, cfg.step, center,
                           cfg.kmax, dtype, out, escapes, static_cast<int64_t>(n_esc));
  } else {
    err = v2_decode_slots(stream, stream_len, T, d, raw.data(), cfg.slots_start, cfg.slots_width, cfg.step, center,
                          cfg.kmax, dtype, out, escapes, static_cast<int64_t>(n_esc));
  }
  if (!err.empty()) return false;
  const uint8_t* src = raw_values;
  for (int64_t i = 0; i < T; ++i) {
    if (!raw[i]) continue;
    std::memcpy(static_cast<uint8_t*>(out) + i * row, src, row);
    src += row;
  }
  return true;
}

}  // namespace sk
