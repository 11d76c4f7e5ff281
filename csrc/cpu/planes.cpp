#include "cpu/planes.h"

#include <algorithm>
#include <cstring>

#include "cpu/isa_choice.h"
#include "cpu/le_bytes.h"
#include "cpu/planes_rows.h"

namespace sk {

std::string PlanesLayout::build(int64_t d_, const uint8_t* centre_, const uint8_t* k_, int64_t period, int nsym_) {
  if (d_ < 1 || (period != 1 && period != d_) || nsym_ < 2 || nsym_ > 256)
    return "bit-plane coder: d, the parameters' period or the table size is out of range";
  d = d_;
  nsym = nsym_;
  blocks = (d + kPlanesBlock - 1) / kPlanesBlock;
  const size_t lanes = static_cast<size_t>(blocks) * kPlanesBlock;
  for (auto* v : {&centre, &k, &top, &edge, &low, &room}) v->assign(lanes, 0);
  for (auto* v : {&row, &rem, &dense[0], &dense[1]}) v->assign(lanes + kPlanesBlock, 0);
  k_even.assign(lanes / 2, 0);
  k_odd.assign(lanes / 2, 0);
  full.assign(blocks, 0);
  level.assign(blocks * kPlanesLevels, 0);
  level_bits.assign(blocks * kPlanesLevels, 0);
  levels.assign(blocks, 0);
  for (int64_t i = 0; i < d; ++i) {
    const int c = centre_[i % period], kk = k_[i % period];
    if (kk > kPlanesLevels || c >= nsym) return "bit-plane coder: a centre is outside the table or a k above 7";
    const int t = std::min(16 - kk, 255 >> kk);
    centre[i] = static_cast<uint8_t>(c);
    k[i] = static_cast<uint8_t>(kk);
    top[i] = static_cast<uint8_t>(t);
    edge[i] = static_cast<uint8_t>(t << kk);
    low[i] = static_cast<uint8_t>((1 << kk) - 1);
    room[i] = static_cast<uint8_t>(std::min(nsym - c, 255));
    (i % 2 ? k_odd : k_even)[i / 2] = static_cast<uint16_t>(kk);
    const int64_t g = i / kPlanesBlock;
    const uint64_t bit = uint64_t{1} << (i % kPlanesBlock);
    full[g] |= bit;
    for (int l = 0; l < kk; ++l) level[g * kPlanesLevels + l] |= bit;
  }
  for (int64_t g = 0; g < blocks; ++g) {
    for (int l = 0; l < kPlanesLevels; ++l) {
      level_bits[g * kPlanesLevels + l] = static_cast<uint8_t>(__builtin_popcountll(level[g * kPlanesLevels + l]));
      if (level_bits[g * kPlanesLevels + l]) levels[g] = static_cast<uint8_t>(l + 1);
    }
  }
  return "";
}

namespace {

// The builds this CPU runs, best last.
IsaChoice<PlanesRowKernels>& choice() {
  static IsaChoice<PlanesRowKernels> builds = [] {
    std::vector<IsaChoice<PlanesRowKernels>::Build> out{{"scalar", &isa_generic::planes_row_kernels()}};
#if defined(__x86_64__) || defined(__i386__)
    if (cpu_runs_avx512_flags() && __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2") &&
        __builtin_cpu_supports("popcnt"))
      out.push_back({"avx512", &isa_avx512vbmi2::planes_row_kernels()});
#endif
    return IsaChoice<PlanesRowKernels>("planes", std::move(out));
  }();
  return builds;
}

}  // namespace

PlanesWriter::PlanesWriter() : layout_(std::make_unique<PlanesLayout>()) {}
PlanesWriter::~PlanesWriter() = default;

std::string PlanesWriter::open(int64_t max_rows, int64_t d, const uint8_t* centre, const uint8_t* k, int64_t period,
                               int nsym, uint8_t* out, int64_t capacity) {
  if (max_rows < 0) return "bit-plane encode: T must be >= 0";
  std::string err = layout_->build(d, centre, k, period, nsym);
  if (!err.empty()) return err;
  if (capacity < planes_capacity(max_rows, d)) return "bit-plane encode: output buffer too small";
  kernels_ = choice().kernels();
  out_ = out;
  bits_.start(out + kPlanesHead);
  xs_ = row_scratch(max_rows * d);
  nx_ = 0;
  maxsym_ = 0;
  return "";
}

void PlanesWriter::row(const uint8_t* sym) { kernels_->encode(sym, *layout_, bits_, xs_, nx_, maxsym_); }

int64_t PlanesWriter::close() {
  if (maxsym_ >= layout_->nsym) return -1;
  uint8_t* end = bits_.finish();
  std::memcpy(end, xs_, nx_);
  store_u32(out_, static_cast<uint32_t>(nx_));
  return (end - out_) + nx_;
}

PlanesReader::PlanesReader() : layout_(std::make_unique<PlanesLayout>()) {}
PlanesReader::~PlanesReader() = default;

std::string PlanesReader::open(const uint8_t* data, int64_t len, int64_t rows, int64_t d, const uint8_t* centre,
                               const uint8_t* k, int64_t period, int nsym, int count_of) {
  if (rows < 0) return "bit-plane decode: T must be >= 0";
  std::string err = layout_->build(d, centre, k, period, nsym);
  if (!err.empty()) return err;
  if (len < kPlanesHead) return "bit-plane stream shorter than its 4-byte head";
  if (rows * d > 8 * len) return "bit-plane stream too short for its rows";  // a symbol has >= 1 bit
  const int64_t n_x = load_u32(data);
  if (n_x > rows * d || n_x > len - kPlanesHead) return "bit-plane stream claims more exceptions than it can hold";
  kernels_ = choice().kernels();
  bits_ = BitReader{data + kPlanesHead, len - kPlanesHead - n_x, 0};
  uint8_t* xs = row_scratch(n_x);  // whole-vector loads may read 64 bytes past the exceptions
  std::memcpy(xs, data + len - n_x, n_x);
  xs_ = xs;
  n_x_ = n_x;
  xi_ = 0;
  count_ = 0;
  count_of_ = count_of >= 0 && count_of < 256 ? count_of : -1;
  return "";
}

bool PlanesReader::row(uint8_t* out) {
  return kernels_->decode(*layout_, bits_, xs_, n_x_, xi_, out, count_of_, count_);
}

std::string PlanesReader::close(int64_t* count) {
  if (xi_ != n_x_) return "bit-plane stream: fewer exceptions decoded than its head says";
  const int64_t used = (bits_.pos + 7) / 8;
  if (used != bits_.nbytes) return "bit-plane stream: its bits end before its bytes do";
  if (bits_.pos % 8 && (bits_.data[used - 1] >> (bits_.pos % 8)))
    return "bit-plane stream: padding bits are set";
  if (count && count_of_ >= 0) *count = count_;
  return "";
}

const char* const kPlanesRowError =
    "bit-plane stream: a row ends past its bits, names a symbol outside the table, carries a non-canonical "
    "exception or has more exceptions than its head says";

int64_t planes_encode(const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw, const uint8_t* centre,
                      const uint8_t* k, int64_t period, int nsym, uint8_t* out, int64_t capacity) {
  return encode_rows<PlanesWriter>(sym, T, d, raw, centre, k, period, nsym, out, capacity);
}

std::string planes_decode(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                          const uint8_t* centre, const uint8_t* k, int64_t period, int nsym, uint8_t* out,
                          int count_of, int64_t* count) {
  return decode_rows<PlanesReader>(data, len, T, d, raw, centre, k, period, nsym, out, count_of, count,
                                   kPlanesRowError);
}

std::vector<std::string> planes_isas() { return choice().names(); }

std::string planes_isa() { return choice().name(); }

std::string set_planes_isa(const std::string& name) { return choice().set(name); }

}  // namespace sk
