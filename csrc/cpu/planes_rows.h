// Row kernels of the bit-plane coder (planes.h), built once per instruction set from
// csrc/cpu/isa/planes_rows.cpp (CMakeLists.txt: isa_generic, and isa_avx512vbmi2 with AVX-512 BW +
// VBMI2 and BMI2) and picked at run time by planes.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cpu/bit_io.h"

namespace sk {

constexpr int kPlanesLevels = 7;      // remainder bit levels: k <= 7
constexpr int kPlanesMaxPlanes = 17;  // quotient planes: min(q, top) <= 16 ones, then a zero

// Per-channel parameters as per-block byte vectors (64 lanes, padded with zeros) and lane masks,
// built once per writer or reader, and the scratch of one row.
struct PlanesLayout {
  int64_t d = 0, blocks = 0;
  int nsym = 0;
  // [blocks * 64]: centre, k, top, edge = top << k (u >= edge: an exception), low = 2^k - 1,
  // room = min(nsym - centre, 255) (an even u needs u / 2 < room)
  std::vector<uint8_t> centre, k, top, edge, low, room;
  std::vector<uint16_t> k_even, k_odd;  // [blocks * 32]: k of each 16-bit lane's low and high byte
  std::vector<uint64_t> full;           // [blocks]: the block's channels
  std::vector<uint64_t> level;          // [blocks * 7]: channels with k > l
  std::vector<uint8_t> level_bits;      // [blocks * 7]: popcount of level
  std::vector<uint8_t> levels;          // [blocks]: 1 + the highest level with a channel (0: none)
  // Scratch of one row, [blocks * 64 + 64] each: its quotients min(q, top), its remainders (decode),
  // and two dense arrays of a plane's survivors.
  std::vector<uint8_t> row, rem, dense[2];

  // "" or why the parameters are out of range (channel i takes centre[i % period], k[i % period]).
  std::string build(int64_t d, const uint8_t* centre, const uint8_t* k, int64_t period, int nsym);
};

struct PlanesRowKernels {
  // One row's remainders and quotient planes into w; its exception symbols appended at xs[nx]
  // (xs has 64 bytes of room past them); maxsym raised to the row's largest symbol.
  void (*encode)(const uint8_t* sym, PlanesLayout& layout, BitWriter& w, uint8_t* xs, int64_t& nx, int& maxsym);
  // One row from r into out [d]; exceptions from xs[xi] (n_x in all, 64 readable bytes past them).
  // False when the row is invalid; count += symbols equal to count_of (when >= 0).
  bool (*decode)(PlanesLayout& layout, BitReader& r, const uint8_t* xs, int64_t n_x, int64_t& xi, uint8_t* out,
                 int count_of, int64_t& count);
};

namespace isa_generic { const PlanesRowKernels& planes_row_kernels(); }
namespace isa_avx512vbmi2 { const PlanesRowKernels& planes_row_kernels(); }

}  // namespace sk
