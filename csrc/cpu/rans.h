// Static-table rANS coder of codec v2 (docs/FORMATS.md section 5.3): 32-bit states kept in
// [2^16, 2^32), 16-bit renormalisation words, 14-bit probabilities, 1, 4 or 32 interleaved lanes
// (32: the wide layout of long frames, coded 16 lanes per AVX-512 instruction where the CPU has it).
// Bit-exact with the Python reference splitkernels/codec/rans.py.
//
// The tables are built once per frequency table (RansTables, owned by the caller, e.g. cached per
// codec config) so a one-token frame pays nothing per call for them. A config with channel classes
// codes each channel with its class's table (the coder gets one table pointer per channel).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace sk {

constexpr int kRansPrecBits = 14;
constexpr uint32_t kRansM = 1u << kRansPrecBits;
constexpr uint32_t kRansL = 1u << 16;
constexpr int64_t kRansWideLanesFrom = 1 << 14;

constexpr int kRansLongLanes = 4;  // the narrow layout from kRansWideLanesFrom symbols; the four-lane layout
constexpr int kRansWideLanes = 32;

// Lanes of the narrow layout for n symbols: 1 below kRansWideLanesFrom symbols, else 4.
inline int rans_lanes(int64_t n) { return n >= kRansWideLanesFrom ? kRansLongLanes : 1; }

// True for the lane counts a stream may have: 1, 4 or kRansWideLanes.
inline bool rans_valid_lanes(int lanes) { return lanes == 1 || lanes == kRansLongLanes || lanes == kRansWideLanes; }

// Encoder entry of one symbol: x -> x + bias + q * cmpl_freq with q = floor(x / freq) computed by a
// 32-bit reciprocal, exact for every x < 2^31 (the state is below freq << 18 <= 2^31 when coded).
struct RansEncSymbol {
  uint32_t x_max;  // renormalise (emit 16 bits) when the state reaches freq << 18
  uint32_t rcp_freq;
  uint32_t bias;
  uint16_t cmpl_freq;
  uint16_t rcp_shift;
};

struct RansTables {
  RansEncSymbol enc[256];
  uint32_t dec[kRansM];  // per slot: freq << 16 | (slot - cum), gathered by the AVX-512 wide decoder
  uint8_t sym[kRansM];   // per slot: the symbol (the wide decoder reads 4 bytes here: wide_enc follows)
  // The wide encoder's entry per symbol, freq | bias << 16 | reciprocal << 32: one load per symbol.
  uint64_t wide_enc[256];
  // Per symbol: freq << 16 | cum. The scalar decoder's step reads sym[slot] and then this: 17 KiB a
  // table instead of dec's 64, so a state's serial chain waits on L1 or L2 rather than L3 (16
  // class tables of dec alone are 1 MiB).
  uint32_t fc[256];
  int32_t nsym;
};

// Checks a frequency table (2..256 entries, each 1..kRansM/2, sum kRansM); "" when valid.
std::string rans_check_table(const uint32_t* freq, int nsym);

// Fills tables for a valid frequency table; "" or why the table is invalid.
std::string rans_build_tables(const uint32_t* freq, int nsym, RansTables* tables);

// Encodes n symbols (each < nsym) on `lanes` interleaved states (rans_valid_lanes) into out
// (capacity bytes; 4*lanes + 2*n always suffices). Symbol i is coded with *tables[i % period]:
// period 1 is one table, period d one table per channel of token-major [T, d] symbols (every table
// has the same nsym). Returns the stream length in bytes, or -1 when a symbol is out of range,
// lanes is invalid, period < 1 or out is too small.
int64_t rans_encode(const uint8_t* sym, int64_t n, const RansTables* const* tables, int64_t period, int lanes,
                    uint8_t* out, int64_t capacity);

// Decodes exactly n symbols on `lanes` states from data[0, len), symbol i with *tables[i % period].
// Returns "" or why the stream is invalid (too short, wrong length, ends early, trailing words,
// final states differ from the initial state). When count_of is in [0, 256), *count receives how
// many decoded symbols equal it.
std::string rans_decode(const uint8_t* data, int64_t len, int64_t n, const RansTables* const* tables, int64_t period,
                        int lanes, uint8_t* out, int count_of, int64_t* count);

// Loads the tables the scalar decoder reads (sym and fc) of `count` distinct tables into the
// cache, unless this thread loaded the same `tables` array in the last 500 us. A one-token frame
// arrives after the model's forward pass has evicted them, and its steps would otherwise wait on
// one cache miss after another (d = 4096 on 16 class tables touches ~2600 of their lines, one
// lane's chain at a time); loaded ahead, their misses overlap. (The encoder reads few lines of
// its tables, mostly those of the central codes: loading them all measured no faster cold.)
void rans_prefetch_decoder(const RansTables* const* tables, int64_t count);

// Instruction sets of the wide (32-lane) coder this CPU supports, best last ("scalar", "avx512"),
// the one in use, and a switch for tests and benchmarks ("" or why the name is not supported).
std::vector<std::string> rans_isas();
std::string rans_isa();
std::string set_rans_isa(const std::string& name);

}  // namespace sk
