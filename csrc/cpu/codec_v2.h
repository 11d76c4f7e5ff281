// Codec v2 quantiser on the CPU (docs/FORMATS.md section 5.2), bit-exact with splitkernels/codec/v2.py.
//
// Each pass is one sweep over the rows with an AVX2 + F16C path and a scalar fallback, chosen at run
// time (cpuid; set_v2_isa forces one for tests and benchmarks). Both give identical bytes: IEEE fp32
// subtraction and multiplication (no FMA), round-half-to-even, exact fp16/bf16 conversions.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sk {

// One fused pass over x [T, d] (dtype per sk::DType): v = (fp32(x) - center) * inv, escape symbol
// 2*kmax+1 where !(|v| <= kmax), else rint_half_even(v) + kmax; per-token escape counts n_esc, and
// tokens with more than raw_limit escapes marked raw (raw[t] = 1) with an all-zero symbol row.
// When escapes is not null, the exact escaped values of the coded (not raw) tokens are written
// there in the input dtype, token-major, channel ascending (room for T*d values suffices).
// totals[0] = escaped values written, totals[1] = non-finite inputs seen (the caller rejects > 0).
// row_step > 1: the T rows quantised are rows 0, row_step, 2 * row_step, ... of x (a sample).
std::string v2_quantise(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                        int kmax, int64_t raw_limit, uint8_t* sym, int32_t* n_esc, uint8_t* raw, void* escapes,
                        int64_t* totals, int64_t row_step = 1);

// out [T, d] (dtype) = fp32(fp32((sym - kmax) * step) + center) for every coded value. Rows with
// raw[t] != 0 are skipped (raw may be null: no raw rows). When n_escapes >= 0, escape symbols take
// the next of the n_escapes exact values at escapes (dtype) in token-major order instead, and using
// other than exactly n_escapes of them is an error; n_escapes < 0 places none.
std::string v2_dequantise(const uint8_t* sym, int64_t T, int64_t d, const float* step, const float* center, int kmax,
                          int dtype, void* out, const uint8_t* raw, const void* escapes, int64_t n_escapes);

// v2_quantise with the nibble coder (window start a) fused in: each coded row is nibble-coded while
// in L1, the stream goes to out (capacity >= nibble_capacity(T, d) + kNibbleSlack). sym may be null
// (no symbol matrix). totals[2] = stream length.
std::string v2_encode_nibble(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                             int kmax, int64_t raw_limit, int a, uint8_t* sym, int32_t* n_esc, uint8_t* raw,
                             void* escapes, uint8_t* out, int64_t capacity, int64_t* totals);

// A nibble stream of exactly len bytes decoded and dequantised row by row into out [T, d] (dtype):
// coded rows (raw[t] == 0; raw may be null) only, the n_escapes exact values placed at escape
// symbols. "" or why the stream is invalid (as nibble_decode, or an escape count mismatch).
std::string v2_decode_nibble(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw, int a,
                             const float* step, const float* center, int kmax, int dtype, void* out,
                             const void* escapes, int64_t n_escapes);

// v2_quantise with the bit-plane coder fused in (channel i with Rice parameters centre[i], k[i]):
// each coded row is coded while in L1, the stream goes to out (capacity >= planes_capacity(T, d)).
// sym may be null. totals[2] = stream length.
std::string v2_encode_planes(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                             int kmax, int64_t raw_limit, const uint8_t* centre, const uint8_t* k, uint8_t* sym,
                             int32_t* n_esc, uint8_t* raw, void* escapes, uint8_t* out, int64_t capacity,
                             int64_t* totals);

// A bit-plane stream of exactly len bytes decoded and dequantised row by row into out [T, d]
// (dtype), as v2_decode_nibble.
std::string v2_decode_planes(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                             const uint8_t* centre, const uint8_t* k, const float* step, const float* center, int kmax,
                             int dtype, void* out, const void* escapes, int64_t n_escapes);

// v2_quantise with the slot coder fused in (channel i with window start[i], width[i]), as
// v2_encode_planes (capacity >= slots_capacity(T, d)).
std::string v2_encode_slots(const void* x, int dtype, int64_t T, int64_t d, const float* center, const float* inv,
                            int kmax, int64_t raw_limit, const uint8_t* start, const uint8_t* width, uint8_t* sym,
                            int32_t* n_esc, uint8_t* raw, void* escapes, uint8_t* out, int64_t capacity,
                            int64_t* totals);

// A slot stream of exactly len bytes decoded and dequantised row by row into out [T, d] (dtype),
// as v2_decode_nibble.
std::string v2_decode_slots(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                            const uint8_t* start, const uint8_t* width, const float* step, const float* center,
                            int kmax, int dtype, void* out, const void* escapes, int64_t n_escapes);

// Instruction sets the v2 passes can use here ("scalar", then "avx2" and "avx512" when supported), the one in use,
// and a switch between them ("" or why not).
std::vector<std::string> v2_isas();
std::string v2_isa();
std::string set_v2_isa(const std::string& name);

}  // namespace sk
