// Rice coder of codec v2 (docs/FORMATS.md section 5.7): each symbol's zigzag distance from its
// table's mode as a Rice code (unary quotient, k-bit remainder) pushed onto one of 32 interleaved
// 32-bit bit stacks kept in [2^16, 2^32) with 16-bit renormalisation words: rANS with dyadic
// probabilities, so the layout and the word order are those of the wide rANS coder (section 5.3),
// and a step needs no table lookup, only shifts and a leading-zero count (16 lanes per AVX-512
// instruction or 8 per AVX2 instruction where the CPU has them). Symbols whose quotient reaches 16 - k are exceptions sent as
// bytes. Bit-exact with the Python reference splitkernels/codec/rice.py.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sk {

constexpr int kRiceLanes = 32;
constexpr int kRiceMaxK = 7;
constexpr int kRiceHeadBytes = 4 + 4 * kRiceLanes;  // exception count, then the lanes' states

// Bytes of out that rice_encode needs for n symbols.
inline int64_t rice_capacity(int64_t n) { return kRiceHeadBytes + 3 * n; }

// Encodes n symbols (each < nsym); symbol i uses centre[i % period] and k[i % period] (k <= 7).
// Returns the stream length, or -1 when a symbol or parameter is out of range or out is too small.
int64_t rice_encode(const uint8_t* sym, int64_t n, const uint8_t* centre, const uint8_t* k, int64_t period, int nsym,
                    uint8_t* out, int64_t capacity);

// Decodes exactly n symbols from data[0, len); returns "" or why the stream is invalid. When
// count_of is in [0, 256), *count receives how many decoded symbols equal it.
std::string rice_decode(const uint8_t* data, int64_t len, int64_t n, const uint8_t* centre, const uint8_t* k,
                        int64_t period, int nsym, uint8_t* out, int count_of, int64_t* count);

// Instruction sets of the coder this CPU supports, best last ("scalar", "avx2", "avx512"), the one in
// use, and a switch for tests and benchmarks ("" or why the name is not supported).
std::vector<std::string> rice_isas();
std::string rice_isa();
std::string set_rice_isa(const std::string& name);

}  // namespace sk
