// zlib-compatible CRC-32 (reflected polynomial 0xEDB88320) of codec frames: carry-less-multiply
// folding (VPCLMULQDQ on 512-bit registers, else PCLMULQDQ) picked at run time by cpuid, and a
// table fallback. crc32(crc, p, n) == zlib.crc32(p[0:n], crc).
#pragma once

#include <cstdint>

namespace sk {

uint32_t crc32(uint32_t crc, const uint8_t* p, int64_t n);

// The table-only CRC (the fallback), kept callable so tests can compare both paths.
uint32_t crc32_table(uint32_t crc, const uint8_t* p, int64_t n);

}  // namespace sk
