// Row and group kernels of the slot coder (slots.h), built once per instruction set from
// csrc/cpu/isa/slots_rows.cpp (CMakeLists.txt: isa_generic, isa_avx2 with AVX2 + BMI2, and
// isa_avx512gfni with AVX-512 BW + VBMI + VBMI2 and GFNI) and picked at run time by slots.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/bit_io.h"

namespace sk {

constexpr int kSlotsBlock = 64;  // channels per vector block
constexpr int kSlotsLevels = 8;  // slot bit levels: w <= 8
constexpr int kSlotsGroup = 8;   // rows per group
constexpr int kSlotsFar = 15;    // distance nibble of a symbol sent as a byte

// Per-channel parameters as per-block byte vectors (64 lanes, padded with zeros) and masks, built
// once per writer or reader.
struct SlotsLayout {
  int64_t d = 0, blocks = 0, stride = 0, row_bits = 0;  // stride: blocks * 64, a row of slot values
  int nsym = 0;
  // Every window lies inside the table with 8 symbols of room on both sides (a >= 8 and
  // a + W + 8 <= min(nsym, 255)): no in-window slot or distance nibble can name a symbol outside
  // the table, and a far symbol f is canonical exactly when f < a - 7 or a + W + 8 <= f < nsym.
  bool roomy = false;
  // [stride]: start a, size W = 2^w - 1, room = min(nsym - a, 255) (a slot v < W needs v < room),
  // above = max(nsym - a - W, 0) (a symbol above the window is below a + W + above), width w
  std::vector<uint8_t> start, size, room, above, width;
  std::vector<uint8_t> far_below, far_above;  // [stride], roomy layouts: a - 7 and a + W + 8
  // [blocks * 8]: for the 8 channels of each 8-byte word of a block, the bytes l < w of their words
  // (the level chunks a full group sends), and how many
  std::vector<uint64_t> chunk_mask;
  std::vector<uint8_t> chunk_bytes;

  // "" or why the parameters are out of range (channel i takes start[i % period], width[i % period]).
  std::string build(int64_t d, const uint8_t* start, const uint8_t* width, int64_t period, int nsym);

  // The same, shared: the last layout built on this thread is handed out again while its
  // parameters stay the same (every frame of a session has the same ones), since building one
  // costs about as much as a row's coding. Null with *err set when the parameters are out of range.
  static std::shared_ptr<const SlotsLayout> shared(int64_t d, const uint8_t* start, const uint8_t* width, int64_t period,
                                                   int nsym, std::string* err);
};

// Where the escapes of rows go (encode) or come from (decode): distance bytes (one per escape,
// min(e, 15)) and far symbols, each with d + 64 bytes of room past the end: a row's escapes and a
// whole vector (a decoder checks a row's escape counts at the row's end).
struct SlotsEscapes {
  uint8_t* dist;
  uint8_t* far;
  int64_t n_dist = 0, n_far = 0;    // encode: written so far; decode: how many there are
  int64_t dist_at = 0, far_at = 0;  // decode: used so far
};

struct SlotsRowKernels {
  // One row's slot values into v [stride] (lanes past d arbitrary), its escapes appended to x;
  // maxsym raised to the row's largest symbol.
  void (*slot_row)(const uint8_t* sym, const SlotsLayout& layout, uint8_t* v, SlotsEscapes& x, int& maxsym);
  // The chunks of a full group (row i's slot values at v + i * stride) to out; returns the end.
  // Writes up to 64 bytes past the end.
  uint8_t* (*pack_group)(const uint8_t* v, const SlotsLayout& layout, uint8_t* out);
  // The inverse: a full group's chunks from in (64 readable bytes past them) into the 8 rows of v;
  // returns the end of the chunks.
  const uint8_t* (*unpack_group)(const uint8_t* in, const SlotsLayout& layout, uint8_t* v);
  // One row's symbols into out [d] from its slot values and x. False when the row is invalid;
  // count += symbols equal to count_of (when >= 0).
  bool (*symbol_row)(const uint8_t* v, const SlotsLayout& layout, SlotsEscapes& x, uint8_t* out, int count_of,
                     int64_t& count);
  // Nibbles: out[i / 2] holds v[i] (< 16) in its low half for even i, high for odd; n bytes in.
  void (*pack)(const uint8_t* v, int64_t n, uint8_t* out);
  // The inverse: n nibbles of in into bytes out (64 bytes of room past the end); false when a
  // padding nibble (odd n) is set.
  bool (*unpack)(const uint8_t* in, int64_t n, uint8_t* out);
};

// The chunks of a group of g rows (1..8), chunk by chunk: g bits each, the group's first row lowest.
inline void pack_chunks(const uint8_t* v, const SlotsLayout& L, int g, BitWriter& w) {
  for (int64_t c = 0; c < L.d; ++c) {
    for (int l = 0; l < L.width[c]; ++l) {
      uint64_t chunk = 0;
      for (int i = 0; i < g; ++i) chunk |= uint64_t((v[i * L.stride + c] >> l) & 1) << i;
      w.put(chunk, g);
    }
  }
}

inline void unpack_chunks(BitStream& r, const SlotsLayout& L, int g, uint8_t* v) {
  for (int i = 0; i < g; ++i)
    for (int64_t c = 0; c < L.d; ++c) v[i * L.stride + c] = 0;
  for (int64_t c = 0; c < L.d; ++c) {
    for (int l = 0; l < L.width[c]; ++l) {
      const uint64_t chunk = r.read(g);
      for (int i = 0; i < g; ++i) v[i * L.stride + c] |= static_cast<uint8_t>(((chunk >> i) & 1) << l);
    }
  }
}

namespace isa_generic { const SlotsRowKernels& slots_row_kernels(); }
namespace isa_avx2 { const SlotsRowKernels& slots_row_kernels(); }
namespace isa_avx512gfni { const SlotsRowKernels& slots_row_kernels(); }

}  // namespace sk
