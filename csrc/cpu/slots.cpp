#include "cpu/slots.h"

#include <algorithm>
#include <cstring>

#include "cpu/isa_choice.h"
#include "cpu/le_bytes.h"

namespace sk {

std::string SlotsLayout::build(int64_t d_, const uint8_t* start_, const uint8_t* width_, int64_t period, int nsym_) {
  if (d_ < 1 || (period != 1 && period != d_) || nsym_ < 2 || nsym_ > 256)
    return "slot coder: d, the parameters' period or the table size is out of range";
  d = d_;
  nsym = nsym_;
  blocks = (d + kSlotsBlock - 1) / kSlotsBlock;
  stride = blocks * kSlotsBlock;
  for (auto* v : {&start, &size, &room, &above, &width, &far_below, &far_above}) v->assign(stride, 0);
  chunk_mask.assign(blocks * 8, 0);
  chunk_bytes.assign(blocks * 8, 0);
  // Locals throughout: the byte stores would otherwise make the compiler reload every member.
  uint8_t *st = start.data(), *sz = size.data(), *rm = room.data(), *ab = above.data(), *wd = width.data();
  uint8_t *fb = far_below.data(), *fa = far_above.data(), *cb = chunk_bytes.data();
  uint64_t* cm = chunk_mask.data();
  const int n = nsym_, top = std::min(n, 255);
  int64_t bits = 0;
  bool all_roomy = true;
  for (int64_t i = 0; i < d_; ++i) {
    const int64_t j = period == 1 ? 0 : i;  // not i % period: a division per channel costs more than the rest
    const int a = start_[j], w = width_[j];
    const int W = (1 << w) - 1;
    if (w < 1 || w > kSlotsLevels || a >= n || a + W > 256)
      return "slot coder: a width is outside 1..8 or a window starts outside the table or ends past 255";
    st[i] = static_cast<uint8_t>(a);
    sz[i] = static_cast<uint8_t>(W);
    rm[i] = static_cast<uint8_t>(std::min(n - a, 255));
    ab[i] = static_cast<uint8_t>(std::max(n - a - W, 0));
    wd[i] = static_cast<uint8_t>(w);
    all_roomy = all_roomy && a >= 8 && a + W + 8 <= top;
    fb[i] = static_cast<uint8_t>(std::max(a - 7, 0));
    fa[i] = static_cast<uint8_t>(std::min(a + W + 8, 255));
    bits += w;
    // Channel i is byte (i % 8) of word (i / 8): its level chunks are that word's bytes 0 .. w - 1.
    cm[i / 8] |= ((uint64_t{1} << w) - 1) << (8 * (i % 8));
    cb[i / 8] = static_cast<uint8_t>(cb[i / 8] + w);
  }
  row_bits = bits;
  roomy = all_roomy;
  return "";
}

std::shared_ptr<const SlotsLayout> SlotsLayout::shared(int64_t d, const uint8_t* start, const uint8_t* width,
                                                       int64_t period, int nsym, std::string* err) {
  struct Last {
    int64_t d = 0, period = 0;
    int nsym = 0;
    std::vector<uint8_t> start, width;
    std::shared_ptr<const SlotsLayout> layout;
  };
  thread_local Last last;
  const bool same = last.layout && last.d == d && last.period == period && last.nsym == nsym && period >= 1 &&
                    std::memcmp(last.start.data(), start, period) == 0 && std::memcmp(last.width.data(), width, period) == 0;
  if (same) return last.layout;
  auto layout = std::make_shared<SlotsLayout>();
  *err = layout->build(d, start, width, period, nsym);
  if (!err->empty()) return nullptr;
  last = Last{d, period, nsym, std::vector<uint8_t>(start, start + period), std::vector<uint8_t>(width, width + period),
              layout};
  return layout;
}

namespace {

// The builds this CPU runs, best last.
IsaChoice<SlotsRowKernels>& choice() {
  static IsaChoice<SlotsRowKernels> builds = [] {
    std::vector<IsaChoice<SlotsRowKernels>::Build> out{{"scalar", &isa_generic::slots_row_kernels()}};
#if defined(__x86_64__) || defined(__i386__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt"))
      out.push_back({"avx2", &isa_avx2::slots_row_kernels()});
    if (cpu_runs_avx512_flags() && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vbmi2") &&
        __builtin_cpu_supports("gfni") && __builtin_cpu_supports("popcnt"))
      out.push_back({"avx512", &isa_avx512gfni::slots_row_kernels()});
#endif
    return IsaChoice<SlotsRowKernels>("slots", std::move(out));
  }();
  return builds;
}

}  // namespace

std::string SlotsWriter::open(int64_t max_rows, int64_t d, const uint8_t* start, const uint8_t* width, int64_t period,
                              int nsym, uint8_t* out, int64_t capacity) {
  if (max_rows < 0) return "slot encode: T must be >= 0";
  std::string err;
  layout_ = SlotsLayout::shared(d, start, width, period, nsym, &err);
  if (!layout_) return err;
  if (capacity < slots_capacity(max_rows, d)) return "slot encode: output buffer too small";
  kernels_ = choice().kernels();
  out_ = out;
  at_ = out + kSlotsHead;
  group_.assign(kSlotsGroup * layout_->stride + 64, 0);
  rows_ = 0;
  const int64_t room = max_rows * d + 64;
  x_ = SlotsEscapes{row_scratch(2 * room), nullptr};
  x_.far = x_.dist + room;
  maxsym_ = 0;
  return "";
}

void SlotsWriter::row(const uint8_t* sym) {
  const int64_t i = rows_++ % kSlotsGroup;
  kernels_->slot_row(sym, *layout_, group_.data() + i * layout_->stride, x_, maxsym_);
  if (i == kSlotsGroup - 1) at_ = kernels_->pack_group(group_.data(), *layout_, at_);
}

int64_t SlotsWriter::close() {
  if (maxsym_ >= layout_->nsym) return -1;
  if (const int g = static_cast<int>(rows_ % kSlotsGroup)) {  // the last, short group
    BitWriter w;
    w.start(at_);
    pack_chunks(group_.data(), *layout_, g, w);
    at_ = w.finish();
  }
  kernels_->pack(x_.dist, x_.n_dist, at_);
  uint8_t* end = at_ + (x_.n_dist + 1) / 2;
  std::memcpy(end, x_.far, x_.n_far);
  store_u32(out_, static_cast<uint32_t>(x_.n_dist));
  store_u32(out_ + 4, static_cast<uint32_t>(x_.n_far));
  return (end - out_) + x_.n_far;
}

std::string SlotsReader::open(const uint8_t* data, int64_t len, int64_t rows, int64_t d, const uint8_t* start,
                              const uint8_t* width, int64_t period, int nsym, int count_of) {
  if (rows < 0) return "slot decode: T must be >= 0";
  std::string err;
  layout_ = SlotsLayout::shared(d, start, width, period, nsym, &err);
  if (!layout_) return err;
  if (len < kSlotsHead || rows > (8 * (len - kSlotsHead)) / layout_->row_bits)
    return "slot stream too short for its rows";  // checked before rows * row_bits can overflow
  const int64_t level1 = (rows * layout_->row_bits + 7) / 8;
  const int64_t n_x = load_u32(data), n_xx = load_u32(data + 4);
  if (n_x > rows * d || n_xx > n_x || len != kSlotsHead + level1 + (n_x + 1) / 2 + n_xx)
    return "slot stream length does not match its rows and escape counts";
  kernels_ = choice().kernels();
  in_ = data + kSlotsHead;
  end_ = in_ + level1;
  rows_ = rows;
  row_ = 0;
  group_.assign(kSlotsGroup * layout_->stride + 64, 0);
  // A row may read up to d escapes past each part's end before its check (slots_rows.h), plus 64
  // bytes of whole-vector loads.
  const int64_t slack = d + 64;
  uint8_t* scratch = row_scratch(n_x + n_xx + 2 * slack);
  if (!kernels_->unpack(end_, n_x, scratch)) return "slot stream: a padding nibble is set";
  std::memcpy(scratch + n_x + slack, data + len - n_xx, n_xx);
  x_ = SlotsEscapes{scratch, scratch + n_x + slack, n_x, n_xx};
  count_ = 0;
  count_of_ = count_of >= 0 && count_of < 256 ? count_of : -1;
  return "";
}

void SlotsReader::next_group() {
  const SlotsLayout& L = *layout_;
  const int64_t g = std::min<int64_t>(kSlotsGroup, rows_ - row_);
  const int64_t bytes = L.row_bits;  // a full group: 8 bits per chunk
  if (g == kSlotsGroup && in_ + bytes + 64 <= end_) {
    in_ = kernels_->unpack_group(in_, L, group_.data());
  } else if (g == kSlotsGroup) {  // the vector loads would read past the slots: from a copy
    tail_.assign(bytes + 64, 0);
    std::memcpy(tail_.data(), in_, bytes);
    kernels_->unpack_group(tail_.data(), L, group_.data());
    in_ += bytes;
  } else {
    BitReader r{in_, end_ - in_, 0};
    BitStream bits(r, 0);
    unpack_chunks(bits, L, static_cast<int>(g), group_.data());
    tail_bits_ = g * L.row_bits;
    in_ += (tail_bits_ + 7) / 8;
  }
}

bool SlotsReader::row(uint8_t* out) {
  const int64_t i = row_ % kSlotsGroup;
  if (i == 0) next_group();
  ++row_;
  return kernels_->symbol_row(group_.data() + i * layout_->stride, *layout_, x_, out, count_of_, count_);
}

std::string SlotsReader::close(int64_t* count) {
  if (x_.dist_at != x_.n_dist || x_.far_at != x_.n_far) return "slot stream: fewer escapes decoded than its head says";
  if (in_ != end_) return "slot stream: its slots end before their bytes do";
  if (tail_bits_ % 8 && (end_[-1] >> (tail_bits_ % 8))) return "slot stream: padding bits are set";
  if (count && count_of_ >= 0) *count = count_;
  return "";
}

const char* const kSlotsRowError =
    "slot stream: a row names a symbol outside the table, carries a non-canonical far symbol or has more escapes "
    "than its head says";

int64_t slots_encode(const uint8_t* sym, int64_t T, int64_t d, const uint8_t* raw, const uint8_t* start,
                     const uint8_t* width, int64_t period, int nsym, uint8_t* out, int64_t capacity) {
  return encode_rows<SlotsWriter>(sym, T, d, raw, start, width, period, nsym, out, capacity);
}

std::string slots_decode(const uint8_t* data, int64_t len, int64_t T, int64_t d, const uint8_t* raw,
                         const uint8_t* start, const uint8_t* width, int64_t period, int nsym, uint8_t* out,
                         int count_of, int64_t* count) {
  return decode_rows<SlotsReader>(data, len, T, d, raw, start, width, period, nsym, out, count_of, count,
                                  kSlotsRowError);
}

std::vector<std::string> slots_isas() { return choice().names(); }

std::string slots_isa() { return choice().name(); }

std::string set_slots_isa(const std::string& name) { return choice().set(name); }

}  // namespace sk
