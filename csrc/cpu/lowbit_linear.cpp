// Low-bit linear on the CPU: argument checks, activation layout, threads and the choice of
// instruction set. The kernels live in csrc/cpu/isa/ (one build per instruction set), and
// the best one the CPU supports is picked at load time, so one binary runs on any x86-64.
//
// Paths:
// * one or two bf16 or fp32 activation rows (fp32, and fp16 as fp32: up to 12-20 by K on CPUs
//   without AMX tiles, vnni_max_fp32_rows) on AVX-512 VNNI CPUs with 2-, 4- or 8-bit codes (with
//   VBMI also 3-bit codes) in groups of whole chunks (64 / 128 / 256 / 128 codes at 8 / 4 / 2 / 3
//   bits, K too; from 2048 codes as equal parts below that, vnni_group) or of a half, quarter, ...
//   of one down to 16 codes (lowbit_vnni): each row as three signed bytes of a per-group
//   22-bit fixed point against the codes as packed (vpdpbusd, exact int32 sums;
//   isa/lowbit_vnni.cpp; one fp32 row whose groups three bytes cannot carry within 1e-5 as four,
//   a 30-bit fixed point; more such rows go on below);
// * bf16 activations (and fp32 ones where the caller allows bf16 precision) on CPUs with AMX
//   tiles, bits 2/3/4/8 with K and groups multiples of 32, from 3 rows (8 bits: 2; 2 bits, and 4
//   bits in groups below 128: 4): exact codes x bf16 with tdpbf16ps (4-bit codes in groups of 128
//   decoded in the vector kernels' pair order),
//   each group's sums scaled in fp32 (from amx_scaled_min_rows bf16 rows, 8 to 256 by group size,
//   W dequantised to bf16, as below), fp32 activations from 3 rows as three bf16 parts
//   (isa/lowbit_amx.cpp, amx_min_rows); where K and
//   groups are multiples of 64, fp32 rows from 2 (in groups of 64: 3) and bf16 rows of 8-bit
//   codes from 2 or of the natural decode's 2-4-bit codes from 3, up to 5, as three int8 digit
//   planes of a per-group fixed point on the AMX-INT8 tiles instead (amx_fp32_digit_min_rows,
//   amx_bf16_digits);
// * bf16 activations on AVX-512 BF16 CPUs, bits 2/4/8 with groups of 4..32 bytes or whole
//   64-byte chunks, and on those with VBMI too bits 3 with groups of 16/32/64 codes or whole
//   128-code chunks (bf16_kernel_layout): exact integer codes x bf16 activations with vdpbf16ps
//   (isa/lowbit_bf16.cpp), at every M (on AMX CPUs not 8-bit codes below 5 rows); the kernels
//   write the bf16 output themselves. fp32 activations too where the caller allows bf16
//   precision (fp32_as_bf16; fp32 output), and one fp32 row of 2-4-bit codes as three bf16
//   parts (split_fp32_row; not on AMX CPUs, see Isa::fma_few_rows);
// * otherwise fp32 activations (fp16/bf16 converted): isa/lowbit_fp32.cpp, at every M (the
//   Python glue sends bf16 activations of large M to lowbit_dequantize + torch's bf16 matmul).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include "common/half.h"
#include "cpu/int8_kernels.h"
#include "cpu/isa_choice.h"
#include "cpu/linear.h"
#include "cpu/lowbit_kernels.h"
#include "cpu/thread_pool.h"

namespace sk {
namespace {

struct Isa {
  const char* name;
  bool supported;
  const LowbitKernels* kernels;
  LowbitRowsFn bf16_rows;
  Bf16PrepareFn bf16_prepare;  // with bf16_rows: its activation order and group sums
  const Int8Kernels* int8;
  const VnniKernels* vnni;  // the VNNI path (isa/lowbit_vnni.cpp), or none
  bool bf16_w3;  // bf16_rows takes 3-bit codes (built with VBMI)
  bool amx = false;  // 2/3/4/8-bit codes from amx_min_rows activation rows on AMX tiles (isa/lowbit_amx.cpp)
  // Below the tiles the fp32 (FMA) kernels take one fp32 row of 2-4-bit codes (not three bf16
  // parts, split_fp32_row) and bf16 rows of 8-bit codes the VNNI path leaves (not bf16_rows, whose
  // 8-bit decode goes through fp32): on these CPUs two 512-bit FMA ports outrun vdpbf16ps.
  // Intel Xeon (AMX), one thread, bench/ops/ab_builds.py --cold: the one fp32 row took 0.39-0.68x
  // the parts' time (4096 x 4096, 4864 x 896, 1536 x 576, 576 x 1536; W2-W4), the 8-bit bf16 rows
  // 0.5-0.9x bf16_rows' at M = 1-3 (4096 x 4096, 896 x 4864) in 4 of 5 rounds, level at M = 4
  // (bench/results/ops/s46/experiments.txt).
  bool fma_few_rows = false;
};

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has(const char* what) {
  __builtin_cpu_init();
  const std::string w = what;
  if (w == "avx2") return cpu_runs_avx2_flags();
  if (w == "avx512") return cpu_runs_avx512_flags();
  if (w == "avx512_vnni") return cpu_has("avx512") && __builtin_cpu_supports("avx512vnni");
  if (w == "avx512_bf16") return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
  if (w == "avx512_vbmi") return cpu_has("avx512") && __builtin_cpu_supports("avx512vbmi");
  if (w == "avx512_bf16_vbmi") return cpu_has("avx512_bf16") && cpu_has("avx512_vbmi");
#if defined(SK_HAVE_AMX)
  if (w == "avx512_amx") return cpu_has("avx512_bf16") && isa_amx::available();
#endif
  return false;
}
#else
bool cpu_has(const char*) { return false; }
#endif

const std::vector<Isa>& isas() {
  static const std::vector<Isa> all = [] {
    std::vector<Isa> v{
        {"generic", true, &isa_generic::lowbit_kernels(), nullptr, nullptr, &isa_generic::int8_kernels(), nullptr,
         false}};
#if defined(SK_HAVE_X86_ISAS)
    v.push_back({"avx2", cpu_has("avx2"), &isa_avx2::lowbit_kernels(), nullptr, nullptr, &isa_avx2::int8_kernels(),
                 nullptr, false});
    v.push_back({"avx512", cpu_has("avx512"), &isa_avx512::lowbit_kernels(), nullptr, nullptr,
                 &isa_avx512::int8_kernels(), nullptr, false});
    // VNNI speeds up the int8 kernels and adds the VNNI path (with VBMI also for 3-bit codes);
    // BF16 the other lowbit kernels (and keeps VNNI where present).
    const bool vnni = cpu_has("avx512_vnni");
    const VnniKernels* vnni_path = !vnni                 ? nullptr
                                   : cpu_has("avx512_vbmi") ? &isa_avx512vnnivbmi::vnni_kernels()
                                                            : &isa_avx512vnni::vnni_kernels();
    const Int8Kernels* best512 = vnni ? &isa_avx512vnni::int8_kernels() : &isa_avx512::int8_kernels();
    v.push_back(
        {"avx512_vnni", vnni, &isa_avx512::lowbit_kernels(), nullptr, nullptr, &isa_avx512vnni::int8_kernels(),
         vnni_path, false});
    v.push_back({"avx512_bf16", cpu_has("avx512_bf16"), &isa_avx512::lowbit_kernels(), isa_avx512bf16::bf16_rows(),
                 isa_avx512bf16::bf16_prepare(), best512, vnni_path, false});
    // VBMI adds the 3-bit decode to the bf16 kernels (the same source built with -mavx512vbmi).
    v.push_back({"avx512_bf16_vbmi", cpu_has("avx512_bf16_vbmi"), &isa_avx512::lowbit_kernels(),
                 isa_avx512bf16vbmi::bf16_rows(), isa_avx512bf16vbmi::bf16_prepare(), best512, vnni_path, true});
    // AMX adds tiles for 2/3/4/8-bit codes at larger M to the best bf16 kernels.
    const bool vbmi = cpu_has("avx512_bf16_vbmi");
    v.push_back({"avx512_amx", cpu_has("avx512_amx"), &isa_avx512::lowbit_kernels(),
                 vbmi ? isa_avx512bf16vbmi::bf16_rows() : isa_avx512bf16::bf16_rows(),
                 vbmi ? isa_avx512bf16vbmi::bf16_prepare() : isa_avx512bf16::bf16_prepare(), best512, vnni_path, vbmi,
                 true, true});
#endif
    return v;
  }();
  return all;
}

std::atomic<int>& chosen() {
  static std::atomic<int> idx{[] {
    int best = 0;
    for (int i = 0; i < static_cast<int>(isas().size()); ++i)
      if (isas()[i].supported) best = i;
    return best;
  }()};
  return idx;
}

// Decode-order position of natural index j within a group (see isa/lowbit_fp32.cpp):
// code c of unit u (units of 8/b codes in a byte, or 8 codes in three bytes for 3 bits)
// goes to c * units + u.
struct DecodeOrder {
  bool phased;
  int64_t per_unit, units;
  int64_t operator()(int64_t j) const { return phased ? (j % per_unit) * units + j / per_unit : j; }
};

// Codes per unit: a byte's 8 / bits, or the 8 codes of 3 bits' three-byte unit.
int64_t codes_per_unit(int bits) { return bits == 3 ? 8 : 8 / bits; }

bool phase_layout(int bits, int64_t group_size) {
  if (bits == 3) return group_size % 8 == 0;  // whole units (the kernels finish a group's last units one by one)
  return (bits == 2 || bits == 4 || bits == 8) && group_size % (8 / bits) == 0;
}

std::string check_weight(int64_t K, int64_t words, int bits, int64_t group_size) {
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) return "bits must be one of (2, 3, 4, 8)";
  if (group_size <= 0 || K % group_size) return "group_size must divide K";
  if (words * 32 < K * bits) return "qweight has too few words per row for K codes";
  return "";
}

LowbitProblem weight_problem(int64_t K, const int32_t* qweight, int64_t N, int64_t words, const void* scale,
                             const void* zero, int scale_dtype, int bits, int64_t group_size) {
  LowbitProblem p{};
  p.qweight = reinterpret_cast<const uint8_t*>(qweight);
  p.row_bytes = words * 4;
  p.N = N;
  p.K = K;
  p.G = K / group_size;
  p.group_size = group_size;
  p.bits = bits;
  p.phased = phase_layout(bits, group_size);
  p.scale = scale;
  p.zero = zero;
  p.scale_dtype = scale_dtype;
  return p;
}

// Rows per parallel_for chunk: about eight chunks per thread (so a descheduled thread delays
// at most a small share), in whole 32-row tiles (every kernel's row tile divides 32), and at
// least kMinChunkMacs multiply-adds (M * K per row): waking a sleeping worker costs microseconds
// (more on a VM whose other vCPU is busy), as much as a whole small layer, so a layer of fewer
// than two such chunks runs on the calling thread alone. Of the sizes from that one to twice
// it, the one whose chunks split most evenly over the threads: 576 rows in 64-row chunks left
// one of two threads a fifth chunk (11% of an M = 512 call); 96-row chunks give each three.
// Where the kernel reads 64-row blocks (`block`, the bf16 panel form: bf16_panel_block), a chunk
// of an odd number of tiles ends in a 32-row block, counted 1/8 slower per row (the 32-row
// form's time at 4096 x 4096 and 1536 x 576, M = 512, session 28); so 1536 rows on two threads
// take 128-row chunks, 576 still 96-row ones, and 4096 rows on 16 threads 64-row ones.
constexpr int64_t kMinChunkMacs = int64_t{1} << 16;
int64_t chunk_rows(int64_t N, int64_t macs_per_row, int64_t block = 32) {
  const int64_t threads = std::max(1, num_threads());
  const int64_t by_threads = N / (8 * threads);
  const int64_t by_work = (kMinChunkMacs + macs_per_row - 1) / std::max<int64_t>(1, macs_per_row);
  const int64_t tiles = (N + 31) / 32, first = std::max<int64_t>(1, (std::max(by_threads, by_work) + 31) / 32);
  if (threads == 1 || first >= tiles) return first * 32;  // one thread, or one chunk: nothing to balance
  // Work on the busiest thread with chunks of s tiles, in eighths of a tile.
  const auto span = [&](int64_t s) {
    return ((tiles + s - 1) / s + threads - 1) / threads * (8 * s + (block == 64 && s % 2 == 1 ? 1 : 0));
  };
  int64_t best = first;
  for (int64_t s = first + 1; s <= 2 * first; ++s)
    if (span(s) < span(best)) best = s;
  return best * 32;
}

// Where each code of a row sits in a kernel's activation order, for the few layouts a process
// uses: computing the position per element per call costs several integer divisions each, as
// much as the M = 1 kernel at SmolLM2's sizes. Orders: the fp32 kernels' decode order
// (DecodeOrder), the bf16 kernels' (bf16_position) for their rows or their panel.
enum class ActOrder { kFp32, kBf16Rows, kBf16Panel };
const std::vector<int32_t>& act_positions(ActOrder order, int bits, int64_t group_size, int64_t K) {
  struct Entry {
    ActOrder order;
    int bits;
    int64_t group_size, K;
    std::vector<int32_t> pos;
  };
  thread_local std::vector<Entry> cache;
  for (const Entry& e : cache)
    if (e.order == order && e.bits == bits && e.group_size == group_size && e.K == K) return e.pos;
  if (cache.size() >= 16) cache.erase(cache.begin());
  Entry e{order, bits, group_size, K, std::vector<int32_t>(K)};
  const int64_t per_unit = codes_per_unit(bits);
  const DecodeOrder fp32{phase_layout(bits, group_size), per_unit, group_size / per_unit};
  for (int64_t k = 0; k < K; ++k)
    e.pos[k] = static_cast<int32_t>(order == ActOrder::kFp32
                                        ? k - k % group_size + fp32(k % group_size)
                                        : bf16_position(bits, group_size, order == ActOrder::kBf16Panel, K, k));
  cache.push_back(std::move(e));
  return cache.back().pos;
}

// Rows [MR][K] in the GEMM's tile order: value k of row r at out[pos[k] * MR + r]. Four k of
// four rows at a time, transposed as four vectors (one element at a time, this was 4% of a call
// at 576 x 1536, M = 512).
void pack_tile(const float* rows, int64_t MR, int64_t K, const int32_t* pos, float* out) {
  int64_t k = 0;
#if defined(__SSE__)
  if (MR % 4 == 0)
    for (; k + 4 <= K; k += 4)
      for (int64_t r = 0; r < MR; r += 4) {
        __m128 a = _mm_loadu_ps(rows + r * K + k), b = _mm_loadu_ps(rows + (r + 1) * K + k),
               c = _mm_loadu_ps(rows + (r + 2) * K + k), d = _mm_loadu_ps(rows + (r + 3) * K + k);
        _MM_TRANSPOSE4_PS(a, b, c, d);  // now a holds value k of the four rows, b value k + 1, ...
        _mm_storeu_ps(out + pos[k] * MR + r, a);
        _mm_storeu_ps(out + pos[k + 1] * MR + r, b);
        _mm_storeu_ps(out + pos[k + 2] * MR + r, c);
        _mm_storeu_ps(out + pos[k + 3] * MR + r, d);
      }
#endif
  for (; k < K; ++k)
    for (int64_t r = 0; r < MR; ++r) out[pos[k] * MR + r] = rows[r * K + k];
}

// Fills p.x16 (bf16 activations in the kernels' order, rows zero-padded to whole chunks),
// p.x_stride and p.xsum (fp32 group sums) from x [M, K] bf16, in per-thread buffers.
constexpr int64_t kPrepareChunkValues = int64_t{1} << 16;  // activation values per preparation chunk

void bf16_activations(const Isa& isa, const uint16_t* x, int64_t M, int64_t K, int bits, int64_t group_size,
                      LowbitProblem& p) {
  thread_local AlignedVector<uint16_t> x16;
  thread_local AlignedVector<float> xsum;
  const int64_t stride = bf16_row_stride(bits, K), G = K / group_size;
  const std::vector<int32_t>& pos =
      act_positions(M >= kBf16PanelMinRows ? ActOrder::kBf16Panel : ActOrder::kBf16Rows, bits, group_size, K);
  x16.resize(M * stride);
  xsum.resize(M * G);
  // Rows are prepared independently; a large M spreads them over the threads (at M = 512 the
  // preparation is a tenth of a call, serial on the caller).
  // (The buffers are thread_local: the body takes the caller's through pointers.)
  uint16_t* out = x16.data();
  float* sums = xsum.data();
  const int64_t rows_per_chunk = std::max<int64_t>(1, kPrepareChunkValues / K);
  parallel_for(M, rows_per_chunk, [&](int64_t m0, int64_t m1) {
    isa.bf16_prepare(x + m0 * K, m1 - m0, K, stride, pos.data(), chunk_codes(bits), group_size,
                     out + m0 * stride, sums + m0 * G);
  });
  p.x16 = x16.data();
  p.x_stride = stride;
  p.xsum = xsum.data();
}

// One fp32 row as kFp32Parts bf16 rows, largest first, whose sum is x to within 2^-27 of each
// value (each part holds the rounding error of the ones before): the bf16 kernels multiply exact
// codes by every part (with the fine decode, whose small code offset keeps the fp32 sums' bits:
// isa/lowbit_bf16.cpp) and add the fp32 sums. At M = 1 that is 1.3-1.6x faster than the fp32
// kernels with 4-bit codes and 7-10x with 2/3-bit ones (three activation rows share each decoded
// weight chunk), within ~1.6e-6 relative of float64 (AMD Zen 4/5; not on the AMX CPUs: see
// Isa::fma_few_rows); 8-bit codes gained nothing, so they stay on the fp32 kernels. False for a
// value that is not finite or whose first part would overflow bf16, and for a row whose nonzero
// values all lie below 2^-64: the AVX-512 bf16 dot product reads subnormal inputs as zero, and
// the later parts of such a row are subnormal (a row of 1e-37 lost 5% at 2 bits); the fp32
// kernels raise it instead.
constexpr int kFp32Parts = 3;
bool split_fp32_row(const float* x, int64_t K, uint16_t* parts) {
  float top = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    float rest = x[k];
    if (!std::isfinite(rest)) return false;
    top = std::max(top, std::fabs(rest));
    for (int j = 0; j < kFp32Parts; ++j) {
      const uint16_t b = float_to_bf16(rest);
      parts[j * K + k] = b;
      rest -= bf16_to_float(b);
    }
    if (!std::isfinite(bf16_to_float(parts[k]))) return false;
  }
  return top == 0.f || top >= std::ldexp(1.f, -64);
}

// x [M, K] fp32 rounded to bf16 (to nearest even) into out, over the threads. False where a value
// is not finite or rounds beyond bf16's range (then the fp32 kernels carry x). Branch-free, so
// the compiler vectorises it (float_to_bf16 per value took 1.7 ns, a tenth of a 576-wide M = 512 call).
bool fp32_rows_to_bf16(const float* x, int64_t M, int64_t K, uint16_t* out) {
  std::atomic<bool> ok{true};
  parallel_for(M, std::max<int64_t>(1, kPrepareChunkValues / K), [&](int64_t m0, int64_t m1) {
    uint32_t bad = 0;
    for (int64_t i = m0 * K; i < m1 * K; ++i) {
      uint32_t u;
      std::memcpy(&u, x + i, 4);
      const uint32_t r = bf16_round_bits(u);
      out[i] = static_cast<uint16_t>(r);
      bad |= static_cast<uint32_t>((u & 0x7fffffffu) >= 0x7f800000u) | static_cast<uint32_t>((r & 0x7f80u) == 0x7f80u);
    }
    if (bad) ok = false;
  });
  return ok;
}

// Each of `groups` values `parts` times in a row (a long group's scale or zero for each of its
// parts, vnni_rows). A memcpy of 2-4 bytes per part before / this, one thread, fp32 rows, ms: 4096
// x 4096 W4 in groups of 4096 M = 1 0.336 / 0.283 (groups of 1024, no parts: 0.275-0.28), 896 x
// 4864 W4 per channel 0.156 / 0.091.
template <typename S>
void spread_parts(const S* from, S* to, int64_t groups, int64_t parts) {
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t j = 0; j < parts; ++j) to[g * parts + j] = from[g];
}

// Whether isa's VNNI path takes M rows of dtype against this layout (lowbit_vnni): fp32 rows (and
// fp16 rows, as fp32: fp16_vnni_rows) up to vnni_max_fp32_rows where no AMX tiles take them, else
// up to kVnniMaxRows.
bool vnni_takes(const Isa& isa, int dtype, int bits, int64_t group_size, int64_t M, int64_t K) {
  const bool fp32 = dtype == kFloat32 || dtype == kFloat16;
  const int64_t max_rows = fp32 && !isa.amx ? vnni_max_fp32_rows(K, bits) : kVnniMaxRows;
  return (dtype == kBFloat16 || fp32) && isa.vnni && M <= max_rows && vnni_layout(bits, group_size, K, isa.vnni->w3);
}

// The VNNI path for bf16 or fp32 rows x [M, K] (vnni_takes), output and bias already in p: false
// where the layout, M or the CPU do not allow it, or x holds a NaN, an infinity or (fp32, more than
// one row) a group three digits cannot carry (the other kernels carry them through).
template <typename T>
bool vnni_rows(const Isa& isa, const T* x, int64_t group_size, const LowbitProblem& p) {
  if (!vnni_takes(isa, std::is_same_v<T, float> ? kFloat32 : kBFloat16, p.bits, group_size, p.M, p.K)) return false;
  const VnniKernels& vnni = *isa.vnni;
  LowbitProblem q = p;
  q.group_size = vnni_group(p.bits, group_size);
  q.G = p.K / q.group_size;
  thread_local VnniActivations act;
  bool ok;
  if constexpr (std::is_same_v<T, float>)
    ok = vnni.fp32_activations(x, p.M, p.K, q.group_size, p.bits, act);
  else
    ok = vnni.bf16_activations(x, p.M, p.K, q.group_size, p.bits, act);
  if (!ok) return false;
  if (q.G != p.G) {
    // Longer groups as parts: each part's scale and zero its group's, copied per call (N x G values
    // each; 4096 x 4096 in groups of 4096 as parts of 1024: 64 KiB beside the weight's 8 MiB).
    thread_local AlignedVector<uint8_t> affine;
    const int64_t size = dtype_size(p.scale_dtype), bytes = p.N * q.G * size;
    affine.resize(2 * bytes);
    uint8_t* const scales = affine.data();
    parallel_for(p.N, std::max<int64_t>(1, kPrepareChunkValues / q.G), [&](int64_t n0, int64_t n1) {
      const int64_t from = n0 * p.G, groups = (n1 - n0) * p.G, parts = q.G / p.G;
      for (const auto& [src, dst] : {std::pair{p.scale, scales}, std::pair{p.zero, scales + bytes}}) {
        if (size == 4)
          spread_parts(static_cast<const uint32_t*>(src) + from, reinterpret_cast<uint32_t*>(dst) + from * parts,
                       groups, parts);
        else
          spread_parts(static_cast<const uint16_t*>(src) + from, reinterpret_cast<uint16_t*>(dst) + from * parts,
                       groups, parts);
      }
    });
    q.scale = scales;
    q.zero = scales + bytes;
  }
  q.x8 = act.x8.data();
  q.x8_unit = act.unit.data();
  q.x8_digits = act.digits;
  q.xsum = act.xsum.data();
  parallel_for(p.N, chunk_rows(p.N, p.M * p.K), [&](int64_t n0, int64_t n1) { vnni.rows(q, n0, n1); });
  return true;
}

// fp16 rows on the VNNI path as the fp32 rows they convert to exactly (vnni_takes), the result
// rounded to fp16 once. The fp32 FMA kernels took them before: one thread, ms, those / this,
// 4096 x 4096 W4 M = 1 0.80-0.89 / 0.43, W3 0.85 / 0.64, M = 2 1.07 / 0.75, M = 16 8.1 / 5.8, 1536
// x 576 g64 M = 1 0.061-0.083 / 0.033. False where vnni_takes does not hold (before any conversion)
// or the path declines (NaN, infinity, groups three digits cannot carry), for the fp32 kernels.
bool fp16_vnni_rows(const Isa& isa, const void* x, const LowbitProblem& p, void* y) {
  if (!vnni_takes(isa, kFloat16, p.bits, p.group_size, p.M, p.K)) return false;
  thread_local AlignedVector<float> x32, y32;
  x32.resize(p.M * p.K);
  y32.resize(p.M * p.N);
  isa.vnni->fp16_to_fp32(static_cast<const uint16_t*>(x), p.M * p.K, x32.data());
  LowbitProblem q = p;
  q.y32 = y32.data();
  if (!vnni_rows(isa, x32.data(), p.group_size, q)) return false;
  isa.vnni->fp32_to_fp16(y32.data(), p.M * p.N, static_cast<uint16_t*>(y));
  return true;
}

// Activation rows from which AMX tiles take bf16 rows of 2/3/4/8-bit codes (isa/lowbit_amx.cpp): below,
// the vector kernels are as fast or faster (their time grows with M, the tiles' hardly does up to
// 16 rows, but starts higher: 4096 x 4096 W4 M = 1 0.67-0.69 ms against 1.11-1.12, one thread,
// warm). Intel Xeon (AMX-BF16), one thread, weights out of L2, ms, the vector kernels (W8: the
// fp32 kernels, fma_few_rows) against the tiles after the pair-order decode (session 47): W4 M = 2
// 4096 x 4096 1.15 / 1.15, 1536 x 576 g64 0.083-0.098 / 0.099; M = 3 4096 x 4096 1.58-1.61 / 1.11;
// M = 4 1.98 / 1.05-1.10, 4864 x 896 0.51-0.52 / 0.24-0.26, 1536 x 576 g64 0.155-0.163 / 0.100; W8
// M = 2 4096 x 4096 1.51-1.80 / 1.50-1.61, 576 x 1536 0.115-0.153 / 0.088, M = 3 2.03-2.20 / 1.62-1.72
// (bench/results/ops/s47/experiments.txt). 4-bit codes in the natural decode (groups below 128
// codes) start at M = 4: 1536 x 576 g64 M = 3 0.103 / 0.102-0.164 (two threads 0.059-0.068 /
// 0.091-0.116), M = 4 0.127-0.136 / 0.105-0.117. 2- and 3-bit codes (natural decode, session 48):
// W3 from M = 3 (4096 x 4096 1.53-1.63 / 1.34-1.43, 576 x 1536 0.088-0.092 / 0.073-0.078,
// 1536 x 576 g64 0.111 / 0.116-0.126), W2 from M = 4 (M = 3 4096 x 4096 1.31-1.48 / 1.42-1.54,
// 1536 x 576 g64 0.089-0.092 / 0.120-0.132; M = 4 4096 x 4096 1.69-1.82 / 1.46-1.52, 4864 x 896
// 0.59-0.60 / 0.44-0.47, 1536 x 576 g64 0.110-0.117 / 0.124-0.133).
constexpr int64_t amx_min_rows(int bits, bool pair_codes) {
  return bits == 8 ? 2 : pair_codes || bits == 3 ? 3 : 4;
}
// fp32 rows as three bf16 parts each (amx_fp32_rows), against the fp32 kernels, same runs, ms: M = 3
// 4096 x 4096 W8 1.91-2.12 / 1.68-1.80, M = 4 4096 x 4096 W4 2.32-3.65 / 1.13-1.21, 4864 x 896
// 0.55-0.62 / 0.33-0.42, 576 x 1536 0.117-0.135 / 0.074-0.080, 1536 x 576 g64 0.152-0.178 /
// 0.126-0.142; M = 2 mixed (576 x 1536 W4 0.085-0.145 / 0.076-0.195, W8 0.078-0.105 / 0.098-0.110).
// The same holds for 2/3-bit codes (session 48): M = 3 4096 x 4096 W2 1.93-2.46 / 1.52-1.64, W3
// 1.97-2.12 / 1.42-1.46, 576 x 1536 W2 0.103-0.112 / 0.081-0.085, but 1536 x 576 g64 W2
// 0.108-0.116 / 0.138-0.143.
constexpr int64_t kAmxFp32MinRows = 3;
// Where the layout allows (isa_amx::digit_layout), fp32 rows go as three int8 digit planes on the
// AMX-INT8 tiles instead (amx_digits: 64 codes per tdpbssd, a 4-operation decode per 64 codes), five
// rows per tile, faster than the parts (session 48, one thread, ms, bf16 parts / digits): 4096 x
// 4096 W4 M = 3 1.02-1.04 / 0.90-1.08, M = 5 1.04-1.12 / 0.88-1.08, M = 16 2.29-2.45 / 1.60-1.64 (W2
// 2.87-2.98 / 1.58-1.63, W8 2.94-3.02 / 1.67-2.59), M = 64 7.5-9.0 / 4.98-5.11, W2 M = 3 1.25-1.38 /
// 0.97-1.05; 1536 x 576 g64 M = 4 0.106-0.117 / 0.084-0.091, M = 64 0.72-0.78 / 0.39-0.42; 576 x 1536
// M = 64 0.45-0.51 / 0.28-0.29. From M = 2 they lead the fp32 kernels with the weights from memory
// (ab_builds.py --cold --evict-mb 512, fp32 kernels / digits: 4096 x 4096 W8 1.53-1.84 / 1.07-1.32,
// W4 1.04-1.32 / 0.91-1.07, W3 1.29-1.42 / 0.88-0.94, 4864 x 896 W4 0.32-0.39 / 0.26-0.27, 896 x 4864
// W4 0.32-0.42 / 0.27-0.30, 576 x 1536 W8 0.10-0.13 / 0.085-0.099; 1536 x 576 g64 W4 0.098-0.115 /
// 0.125-0.142 the exception) and are level to 20% behind with them in cache (4096 x 4096 W8
// 0.96-1.07 / 1.14, W4 1.02-1.17 / 0.91-1.02); M = 1 stays on the fp32 kernels (4096 x 4096 W4 warm
// 0.76-0.84 / 0.93-1.07). In groups of 64 codes (one k-block, so each group's scaling step weighs
// double) M = 2 stays there too: in the table 1536 x 576 g64 at M = 2 went from 1.15-1.46 to
// 1.21-1.64 of torch's best on one thread, 1.33-1.61 to 1.67-1.97 on two.
constexpr int64_t amx_fp32_digit_min_rows(int64_t group_size) { return group_size >= 128 ? 2 : 3; }
// bf16 rows take the digits too where their codes would take the slower natural decode on the
// bf16 tiles (not the pair order) or the vector kernels, from 2 rows (W8, where the VNNI path,
// tried first, leaves them: groups it does not take) or 3 up to the five of one digit tile (ms, min of
// three rounds each, vector or bf16 tiles / digits): 4096 x 4096 W8 M =
// 2 1.30-1.51 / 0.93-1.05, M = 4 1.30-1.37 / 0.99-1.09, M = 8 1.27-1.34 / 1.20-1.33, M = 10
// 1.26-1.35 / 1.26-1.33; W2 M = 3 1.18-1.37 / 0.81-1.00, M = 8 1.11-1.34 / 1.05-1.20; W3 M = 3
// 1.18-1.23 / 0.82-0.95; W4 in groups of 64 M = 3 1.34-1.55 / 1.31-1.60, M = 8 1.72-2.06 /
// 1.75-2.02; 4864 x 896 W8 M = 2 0.33-0.35 / 0.23-0.26; 1536 x 576 g64 W4 M = 4 0.096-0.109 /
// 0.072-0.078; 576 x 1536 W2 M = 3 0.068-0.075 / 0.045-0.049. The pair order's W4 stays on the bf16
// tiles (with two planes: M = 4 1.04-1.10 / 1.26-1.55).
constexpr bool amx_bf16_digits(int bits, bool pair_codes, int64_t M) {
  return !pair_codes && M >= (bits == 8 ? 2 : 3) && M <= 5;
}

#if defined(SK_HAVE_AMX)
// Activation tiles (bf16, or int8 digits with their units) and group sums that a thread prepared
// for itself for one call: every thread of a call reads all the tiles, so where they fit L2 each
// reads its own copy rather than lines another core just wrote (amx_linear, amx_digits).
template <typename E>
struct ThreadTiles {
  uint64_t call = 0;  // the call they belong to (new_call), 0 for none
  AlignedVector<E> x;
  AlignedVector<float> unit, xsum;
};

// This thread's tiles of element type E.
template <typename E>
ThreadTiles<E>& thread_tiles() {
  thread_local ThreadTiles<E> t;
  return t;
}

// A number for each call with per-thread tiles.
uint64_t new_call() {
  static std::atomic<uint64_t> calls{0};
  return calls.fetch_add(1, std::memory_order_relaxed) + 1;
}

// parallel_for over N weight rows where each thread reads its own tiles: prepare(t) fills them when
// the thread first takes a chunk of `call` (the caller's may be filled already), then rows(t, n0, n1).
template <typename E, typename Prepare, typename Rows>
void rows_on_own_tiles(int64_t N, int64_t grain, uint64_t call, const Prepare& prepare, const Rows& rows) {
  parallel_for(N, grain, [&](int64_t n0, int64_t n1) {
    ThreadTiles<E>& t = thread_tiles<E>();
    if (t.call != call) {
      prepare(t);
      t.call = call;
    }
    rows(t, n0, n1);
  });
}

// Activations x [M, K] (fp32 or bf16) on the AMX-INT8 tiles as digit planes of a per-group fixed
// point (isa_amx::prepare_digits), output and bias already in p. False where a row has a value the
// fixed point cannot carry (other kernels then run).
template <typename T>
bool amx_digits(const T* x, LowbitProblem& p) {
  const int64_t tiles = isa_amx::digit_tiles(p.M), blocks = isa_amx::digit_blocks(p.M), Mp = 16 * blocks;
  const auto size = [&](ThreadTiles<int8_t>& t) {
    t.x.resize(tiles * 16 * p.K);
    t.unit.resize(p.G * Mp);
    t.xsum.resize(p.G * Mp);
  };
  const auto digit_rows = [&](ThreadTiles<int8_t>& t, int64_t n0, int64_t n1) {
    LowbitProblem q = p;
    q.x8 = t.x.data();
    q.x8_unit = t.unit.data();
    q.xsum = t.xsum.data();
    isa_amx::digit_rows(q, n0, n1);
  };
  ThreadTiles<int8_t>& mine = thread_tiles<int8_t>();
  size(mine);
  const int64_t grain = chunk_rows(p.N, p.M * p.K);
  if (num_threads() > 1 && tiles == 1) {
    // Each thread its own copy of the one tile (at most five rows), as amx_linear's tiles: the
    // caller's prepared here (which finds the rows the digits cannot carry), a worker's when it takes
    // its first chunk. Two threads, ms (shared / own): bf16 W8 M = 2 1536 x 576 g64 0.042-0.044 /
    // 0.037-0.038, 576 x 1536 0.031 / 0.024-0.025, 4864 x 896 0.111-0.116 / 0.104-0.108; W4 M = 3
    // 1536 x 576 g64 0.047-0.049 / 0.043-0.044; fp32 M = 3 0.048 / 0.043-0.045. More rows take
    // longer to prepare, and the caller prepared blocks of them in parallel: fp32 M = 16 1536 x 576
    // 0.061 / 0.062-0.064, M = 64 576 x 1536 0.138 / 0.166 with copies.
    const auto prepare = [&](ThreadTiles<int8_t>& t) {
      return isa_amx::prepare_digits(x, p.M, p.K, p.group_size, 0, blocks, t.x.data(), t.unit.data(), t.xsum.data());
    };
    if (!prepare(mine)) return false;
    const uint64_t call = mine.call = new_call();
    rows_on_own_tiles<int8_t>(p.N, grain, call, [&](ThreadTiles<int8_t>& t) {
      size(t);
      prepare(t);  // as the caller's: the digits carry every row
    }, digit_rows);
    return true;
  }
  int8_t* tiles_out = mine.x.data();  // the caller's buffers, which the workers fill too
  float *units = mine.unit.data(), *sums = mine.xsum.data();
  std::atomic<bool> ok{true};
  parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
    if (!isa_amx::prepare_digits(x, p.M, p.K, p.group_size, b0, b1, tiles_out, units, sums)) ok = false;
  });
  if (!ok) return false;
  parallel_for(p.N, grain, [&](int64_t n0, int64_t n1) { digit_rows(mine, n0, n1); });
  return true;
}

// Rows per parallel_for chunk of the AMX tiles' scaled form. Where its activation tiles outgrow L2,
// a call of isa_amx::rows streams them from L3 once per pass (isa_amx::scaled_pass_rows), so a
// thread's share of N comes in as few even chunks of at most a pass as it takes, not chunk_rows'
// eight a thread (two threads, M = 512, ms: 896 x 4864 2.40 -> 2.03, 2048 x 2048 1.79-1.81 ->
// 1.73; M = 256 896 x 4864 1.27-1.31 -> 1.11-1.12). Where they fit, chunk_rows' smaller chunks
// measured ahead (576 x 1536 M = 512 0.46-0.47 / 0.50, 4864 x 896 1.69-1.71 / 1.74-1.76).
int64_t amx_scaled_chunk_rows(int64_t N, int64_t M, int64_t K) {
  if (!isa_amx::tiles_outgrow_l2(M, K)) return chunk_rows(N, M * K);
  const int64_t threads = std::max(1, num_threads()), share = (N + threads - 1) / threads;
  const int64_t chunks = (share + isa_amx::scaled_pass_rows(M) - 1) / isa_amx::scaled_pass_rows(M);
  return ((share + chunks - 1) / chunks + 31) / 32 * 32;
}

// bf16 activations x [p.M, K] on the AMX tiles, output and bias already in p; `scaled` as for
// isa_amx::rows. `fine`: fp32 rows sent as bf16 parts (AmxCodes).
//
// Every thread reads all the activation tiles. Where they fit L2 (isa_amx::tiles_outgrow_l2) each
// thread prepares its own copy when it first takes a chunk, rather than reading the lines the other
// cores just wrote, and the call is one parallel region instead of two. Two threads, bf16, W4, ms
// (shared tiles / own): M = 8 576 x 1536 0.032 / 0.025; M = 16 1536 x 576 0.057 / 0.053; M = 64
// 576 x 1536 0.084 / 0.066, 1536 x 576 0.107 / 0.100, 4096 x 4096 1.08 / 1.05; M = 512 896 x 896
// 0.366 / 0.324, 576 x 1536 0.45 / 0.42, 1536 x 576 0.389 / 0.366. Larger tiles stay shared
// (4096 x 4096 M = 512 6.49 / 6.61-6.86).
void amx_linear(const uint16_t* x, LowbitProblem& p, bool scaled, bool fine) {
  const AmxCodes codes{!scaled && isa_amx::pair_layout(p.bits, p.group_size, p.K), fine};
  const int64_t tiles = isa_amx::activation_tiles(p.M);
  const int64_t grain = scaled ? amx_scaled_chunk_rows(p.N, p.M, p.K) : chunk_rows(p.N, p.M * p.K);
  const auto size = [&](ThreadTiles<uint16_t>& t) {
    t.x.resize(tiles * 16 * p.K);
    t.xsum.resize(scaled ? 0 : p.G * tiles * 16);
  };
  const auto tile_rows = [&](ThreadTiles<uint16_t>& t, int64_t n0, int64_t n1) {
    LowbitProblem q = p;
    q.x16 = t.x.data();
    q.xsum = scaled ? nullptr : t.xsum.data();
    isa_amx::rows(q, n0, n1, scaled, codes);
  };
  if (num_threads() > 1 && !isa_amx::tiles_outgrow_l2(p.M, p.K)) {
    rows_on_own_tiles<uint16_t>(p.N, grain, new_call(), [&](ThreadTiles<uint16_t>& t) {
      size(t);
      isa_amx::prepare(x, p.M, p.K, p.group_size, codes.pairs, 0, tiles, t.x.data(), scaled ? nullptr : t.xsum.data());
    }, tile_rows);
    return;
  }
  ThreadTiles<uint16_t>& mine = thread_tiles<uint16_t>();
  size(mine);
  uint16_t* tiles_out = mine.x.data();  // the caller's buffers, which the workers fill too
  float* sums = scaled ? nullptr : mine.xsum.data();
  parallel_for(tiles, 1, [&](int64_t t0, int64_t t1) {
    isa_amx::prepare(x, p.M, p.K, p.group_size, codes.pairs, t0, t1, tiles_out, sums);
  });
  parallel_for(p.N, grain, [&](int64_t n0, int64_t n1) { tile_rows(mine, n0, n1); });
}
#endif

// Whether bf16_rows takes M bf16 rows of bits-bit codes whose layout it has (Isa::fma_few_rows).
bool bf16_rows_take(const Isa& isa, int bits, int64_t M) {
  return bits != 8 || M >= kBf16PanelMinRows || !isa.fma_few_rows;
}

// Whether the AMX tiles take this call of M activation rows (the ISA, M and the layout): M bf16
// rows, or M fp32 rows as bf16 parts (`parts`).
bool amx_takes(const Isa& isa, const LowbitProblem& p, bool parts) {
#if defined(SK_HAVE_AMX)
  const bool pairs = isa_amx::pair_layout(p.bits, p.group_size, p.K);
  return isa.amx && p.M >= (parts ? kAmxFp32MinRows : amx_min_rows(p.bits, pairs)) &&
         isa_amx::layout(p.bits, p.group_size, p.K);
#else
  (void)isa, (void)p, (void)parts;
  return false;
#endif
}

// The AMX path for bf16 activations x [M, K], output and bias already in p: int8 digit planes
// where amx_bf16_digits holds, else bf16 tiles; false where amx_takes does not hold either.
bool amx_rows(const Isa& isa, const uint16_t* x, LowbitProblem& p) {
#if defined(SK_HAVE_AMX)
  const bool pairs = isa_amx::pair_layout(p.bits, p.group_size, p.K);
  if (isa.amx && amx_bf16_digits(p.bits, pairs, p.M) && isa_amx::digit_layout(p.bits, p.group_size, p.K) &&
      amx_digits(x, p))
    return true;  // else (a value the digits cannot carry) the bf16 tiles or vector kernels
  if (!amx_takes(isa, p, false)) return false;
  // From amx_scaled_min_rows the weight is rounded to bf16, as the vector bf16 kernels do from 256.
  amx_linear(x, p, p.M >= amx_scaled_min_rows(p.group_size), false);
  return true;
#else
  (void)isa, (void)x, (void)p;
  return false;
#endif
}

// fp32 activations x [M, K] on the AMX tiles: as int8 digit planes where the layout allows, else
// as kFp32Parts bf16 rows each (as one fp32 row goes to the vector bf16 kernels, split_fp32_row),
// the parts' results added: within the fp32 kernels' error (1e-5), at the tiles' speed. False where
// amx_takes does not hold, or a row has a value the digits or parts cannot carry
// (isa_amx::prepare_digits, split_fp32_rows; the fp32 kernels then run).
bool amx_fp32_rows(const Isa& isa, const float* x, LowbitProblem& p, float* y) {
#if defined(SK_HAVE_AMX)
  if (isa.amx && p.M >= amx_fp32_digit_min_rows(p.group_size) && isa_amx::digit_layout(p.bits, p.group_size, p.K)) {
    LowbitProblem q = p;
    q.y32 = y;
    q.y16 = nullptr;
    if (amx_digits(x, q)) return true;  // else (outliers) the bf16 parts or the fp32 kernels
  }
  if (!amx_takes(isa, p, true)) return false;
  const int64_t M = p.M, K = p.K, N = p.N;
  thread_local AlignedVector<uint16_t> parts;
  thread_local AlignedVector<float> part_y;
  parts.resize(kFp32Parts * M * K);
  uint16_t* xp = parts.data();
  std::atomic<bool> ok{true};
  parallel_for(M, std::max<int64_t>(1, kPrepareChunkValues / K), [&](int64_t m0, int64_t m1) {
    if (!isa_amx::split_fp32_rows(x, m0, m1, K, kFp32Parts, xp)) ok = false;
  });
  if (!ok) return false;
  part_y.resize(kFp32Parts * M * N);
  float* py = part_y.data();
  LowbitProblem q = p;
  q.M = kFp32Parts * M;
  q.y32 = py;
  q.y16 = nullptr;
  q.bias = nullptr;
  amx_linear(xp, q, false, true);
  const float* bias = p.bias;
  parallel_for(M, std::max<int64_t>(1, kPrepareChunkValues / N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* part = py + m * kFp32Parts * N;  // smallest part first
      for (int64_t n = 0; n < N; ++n)
        y[m * N + n] = part[n] + (part[N + n] + part[2 * N + n]) + (bias ? bias[n] : 0.f);
    }
  });
  return true;
#else
  (void)isa, (void)x, (void)p, (void)y;
  return false;
#endif
}

}  // namespace

std::vector<std::string> lowbit_isas() {
  std::vector<std::string> out;
  for (const Isa& i : isas())
    if (i.supported) out.emplace_back(i.name);
  return out;
}

std::string lowbit_isa() { return isas()[chosen().load()].name; }

const Int8Kernels& current_int8_kernels() { return *isas()[chosen().load()].int8; }

std::string set_lowbit_isa(const std::string& name) {
  for (int i = 0; i < static_cast<int>(isas().size()); ++i)
    if (name == isas()[i].name) {
      if (!isas()[i].supported) return "isa '" + name + "' is not supported by this CPU";
      chosen().store(i);
      return "";
    }
  return "isa must be one of generic, avx2, avx512, avx512_vnni, avx512_bf16, avx512_bf16_vbmi, avx512_amx; got '" +
         name + "'";
}

bool lowbit_vnni(int dtype, int bits, int64_t group_size, int64_t M, int64_t K) {
  return vnni_takes(isas()[chosen().load()], dtype, bits, group_size, M, K);
}

bool lowbit_bf16_kernel(int dtype, int bits, int64_t group_size) {
  const Isa& isa = isas()[chosen().load()];
  return dtype == kBFloat16 && isa.bf16_rows != nullptr && (bits != 3 || isa.bf16_w3) &&
         bf16_kernel_layout(bits, group_size);
}

std::string lowbit_linear(const void* x, int dtype, int64_t M, int64_t K, const int32_t* qweight, int64_t N,
                          int64_t words, const void* scale, const void* zero, int scale_dtype, int bits,
                          int64_t group_size, const float* bias, void* y, bool fp32_as_bf16) {
  std::string err = check_weight(K, words, bits, group_size);
  if (!err.empty()) return err;
  if (M <= 0 || N <= 0) return "";  // nothing to compute (the kernels assume a row of each)
  const Isa& isa = isas()[chosen().load()];
  LowbitProblem p = weight_problem(K, qweight, N, words, scale, zero, scale_dtype, bits, group_size);
  p.M = M;
  p.bias = bias;
  if (dtype == kBFloat16) {
    p.y16 = static_cast<uint16_t*>(y);
    if (vnni_rows(isa, static_cast<const uint16_t*>(x), group_size, p)) return "";
    if (amx_rows(isa, static_cast<const uint16_t*>(x), p)) return "";
  }
  if (lowbit_bf16_kernel(dtype, bits, group_size) && bf16_rows_take(isa, bits, M)) {
    bf16_activations(isa, static_cast<const uint16_t*>(x), M, K, bits, group_size, p);
    parallel_for(N, chunk_rows(N, M * K, bf16_panel_block(M, group_size)),
                 [&](int64_t n0, int64_t n1) { isa.bf16_rows(p, n0, n1); });
    return "";
  }
  if (dtype == kFloat32 && fp32_as_bf16 && lowbit_bf16_kernel(kBFloat16, bits, group_size)) {
    thread_local AlignedVector<uint16_t> x16;
    x16.resize(M * K);
    if (fp32_rows_to_bf16(static_cast<const float*>(x), M, K, x16.data())) {
      p.y32 = static_cast<float*>(y);
      if (vnni_rows(isa, x16.data(), group_size, p)) return "";
      if (amx_rows(isa, x16.data(), p)) return "";
      if (bf16_rows_take(isa, bits, M)) {
        bf16_activations(isa, x16.data(), M, K, bits, group_size, p);
        parallel_for(N, chunk_rows(N, M * K, bf16_panel_block(M, group_size)),
                     [&](int64_t n0, int64_t n1) { isa.bf16_rows(p, n0, n1); });
        return "";
      }
    }  // else the fp32 kernels take x as it is
  }
  if (dtype == kFloat32) {
    LowbitProblem q = p;
    q.y32 = static_cast<float*>(y);
    if (vnni_rows(isa, static_cast<const float*>(x), group_size, q)) return "";
    if (amx_fp32_rows(isa, static_cast<const float*>(x), p, static_cast<float*>(y))) return "";
  }
  if (dtype == kFloat16 && fp16_vnni_rows(isa, x, p, y)) return "";
  if (dtype == kFloat32 && M == 1 && bits < 8 && !isa.fma_few_rows && lowbit_bf16_kernel(kBFloat16, bits, group_size)) {
    thread_local AlignedVector<uint16_t> parts;
    parts.resize(kFp32Parts * K);
    if (split_fp32_row(static_cast<const float*>(x), K, parts.data())) {
      bf16_activations(isa, parts.data(), kFp32Parts, K, bits, group_size, p);
      p.M = kFp32Parts;
      p.y_parts = static_cast<float*>(y);
      parallel_for(N, chunk_rows(N, K), [&](int64_t n0, int64_t n1) { isa.bf16_rows(p, n0, n1); });
      return "";
    }  // NaN, infinity or a value beyond bf16: the fp32 kernels carry it through
  }
  // Activations in decode order as fp32, spread over the threads: rows for the fused path (with
  // group sums where codes go straight into the FMAs: phase layouts), or packed in tiles of MR
  // rows for the GEMM (value k of row m at tile m / MR, [k][m % MR]: one row of MR values per k,
  // so a tile's rows are converted together and each k stores MR values side by side). Buffers
  // per thread; a short last tile is zero-padded.
  const int64_t G = p.G;
  const bool packed = fp32_packs_x(*isa.kernels, M);
  const int64_t MR = packed ? isa.kernels->tile_rows : 1, tiles = (M + MR - 1) / MR;
  const std::vector<int32_t>& pos = act_positions(ActOrder::kFp32, bits, group_size, K);
  thread_local AlignedVector<float> x32, xsum;
  x32.resize(tiles * MR * K);
  const bool with_sums = !packed && p.phased;
  xsum.resize(with_sums ? M * G : 0);
  // The fused path's scaling for codes in place (down to 2^-21, below) would make the values of a
  // row below 2^-64 subnormal and inexact (a row of 1e-37 lost 0.4% at 3 bits): such a row is
  // raised by 2^64, and its result lowered.
  const float tiny = std::ldexp(1.f, -64), raise = std::ldexp(1.f, 64);
  bool raised[kFp32InPlaceRows] = {};
  {
    float* xp = x32.data();
    float* sums = xsum.data();
    // Code c of a unit sits at bit c * bits.
    const bool in_place_codes = with_sums && fp32_in_place(bits, M);
    const int64_t per_unit = codes_per_unit(bits);
    float in_place[8];
    for (int64_t c = 0; c < per_unit; ++c) in_place[c] = std::ldexp(1.f, static_cast<int>(-bits * c));
    const size_t row_bytes = K * dtype_size(dtype);
    parallel_for(tiles, std::max<int64_t>(1, kPrepareChunkValues / (MR * K)), [&](int64_t t0, int64_t t1) {
      thread_local AlignedVector<float> rows;
      rows.resize(MR * K);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m0 = t * MR, mr = std::min(MR, M - m0);
        const uint8_t* xm = static_cast<const uint8_t*>(x) + m0 * row_bytes;
        float* xt = xp + m0 * K;
        if (packed && dtype == kFloat32 && mr == MR) {  // a whole fp32 tile: packed from x itself
          pack_tile(reinterpret_cast<const float*>(xm), MR, K, pos.data(), xt);
          continue;
        }
        to_float(xm, dtype, mr * K, rows.data());
        std::fill(rows.begin() + mr * K, rows.end(), 0.f);
        if (in_place_codes) {  // one row (MR = 1), scaled for codes masked in place (LowbitProblem::x32)
          float top = 0.f;
          for (int64_t k = 0; k < K; ++k) top = std::max(top, std::fabs(rows[k]));  // NaN: skipped
          raised[t] = top < tiny;
          if (raised[t])
            for (int64_t k = 0; k < K; ++k) rows[k] *= raise;
          for (int64_t k = 0; k < K; k += per_unit)
            for (int64_t c = 0; c < per_unit; ++c) xt[pos[k + c]] = rows[k + c] * in_place[c];
        } else {
          pack_tile(rows.data(), MR, K, pos.data(), xt);
        }
        // Group sums in double, rounded once: the zero times the sum nearly cancels the group's
        // scaled code sum where the activations sit far from zero, so its error counts 100x.
        for (int64_t m = 0; with_sums && m < mr; ++m)
          for (int64_t g = 0; g < G; ++g) {
            double sum = 0.;
            for (int64_t j = 0; j < group_size; ++j) sum += rows[m * K + g * group_size + j];
            sums[(m0 + m) * G + g] = static_cast<float>(sum);
          }
      }
    });
  }
  p.x32 = x32.data();
  p.xsum = xsum.data();
  thread_local AlignedVector<float> y32;
  y32.resize(dtype == kFloat32 ? 0 : M * N);
  p.y = dtype == kFloat32 ? static_cast<float*>(y) : y32.data();

  parallel_for(N, chunk_rows(N, M * K), [&](int64_t n0, int64_t n1) { isa.kernels->fp32_rows(p, n0, n1); });

  for (int64_t m = 0; m < std::min(M, kFp32InPlaceRows); ++m)
    if (raised[m])
      for (int64_t n = 0; n < N; ++n) p.y[m * N + n] *= tiny;
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) p.y[m * N + n] += bias[n];
  if (dtype != kFloat32) from_float(p.y, M * N, dtype, y);
  return "";
}

std::string lowbit_dequantize(const int32_t* qweight, int64_t N, int64_t words, int64_t K, const void* scale,
                              const void* zero, int scale_dtype, int bits, int64_t group_size, void* out,
                              int out_dtype) {
  std::string err = check_weight(K, words, bits, group_size);
  if (!err.empty()) return err;
  if (out_dtype != kFloat32 && out_dtype != kBFloat16) return "out dtype must be float32 or bfloat16";
  LowbitProblem p = weight_problem(K, qweight, N, words, scale, zero, scale_dtype, bits, group_size);
  p.w_out = out;
  p.w_dtype = out_dtype;
  const Isa& isa = isas()[chosen().load()];
#if defined(SK_HAVE_AMX)
  if (out_dtype == kBFloat16 && isa.amx && isa_amx::layout(bits, group_size, K)) {
    parallel_for(N, chunk_rows(N, K), [&](int64_t n0, int64_t n1) { isa_amx::dequantize_bf16(p, n0, n1); });
    return "";
  }
#endif
  parallel_for(N, 16, [&](int64_t n0, int64_t n1) { isa.kernels->dequantize(p, n0, n1); });
  return "";
}

}  // namespace sk
