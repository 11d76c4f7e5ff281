// Counting bytes of one value, for the symbol coders' escape counts.
#pragma once

#include <algorithm>
#include <cstdint>

namespace sk {

// How many of p[0, n) equal v. Byte counters over 64-byte blocks, emptied before they can wrap:
// a loop every compiler vectorises (a plain `count += p[i] == v` stayed scalar, 0.6 ns a byte).
inline int64_t count_equal(const uint8_t* p, int64_t n, uint8_t v) {
  int64_t total = 0, i = 0;
  while (n - i >= 64) {
    const int64_t blocks = std::min<int64_t>((n - i) / 64, 255);
    uint8_t acc[64] = {};
    for (int64_t b = 0; b < blocks; ++b, i += 64)
      for (int j = 0; j < 64; ++j) acc[j] += p[i + j] == v;
    for (int j = 0; j < 64; ++j) total += acc[j];
  }
  for (; i < n; ++i) total += p[i] == v;
  return total;
}

}  // namespace sk
