// fp32-activation low-bit kernels, compiled once per instruction set (CMakeLists.txt builds
// this file with -DSK_ISA_NS=isa_generic / isa_avx2 / isa_avx512 and the matching -m flags),
// written with GCC/Clang vector types so each build uses its own vector width.
//
// Decode order: for bits 2, 4 and 8 a byte holds 8/b whole codes; within each group the codes
// are visited phase by phase (all low codes of the group's bytes, then the next codes, ...),
// which makes decoding a shift-and-mask over consecutive bytes. For 3 bits the unit is three
// bytes holding eight codes, with the same phase order over units (groups of whole units).
// Other layouts decode in natural order. The caller permutes x to match.
//
// Two paths, by the number of activation rows M:
// * M <= kFusedRows: each code feeds the FMAs of every activation row directly and a group's
//   scale and zero are applied to its partial sums: sum_k (q_k*s + z) x_k = s*sum q_k x_k +
//   z*sum x_k. Only the packed weight, its scales and x are read. One compiled variant per bits,
//   M and group size (32, 64, 128 as constants, others at run time) loops over a block of weight
//   rows. (Natural layouts: each weight row is dequantised once and dotted with the M rows.)
// * larger M: kPanelN weight rows are dequantised, a slice of K at a time, into a buffer in
//   row order; each activation tile (kTileRows rows packed by the caller as [K][kTileRows],
//   LowbitProblem::x32) is one vector per k and meets every block of kBlockN of those rows in
//   turn, and broadcasting a weight value into the FMA of every tile it meets gives kTileRows x
//   kBlockN x tiles products per step with no horizontal sums and no transposition. (Two forms
//   it replaced: a 4 x 4 dot form over K, which re-read x for every 4 weight rows, and a K-major
//   panel, whose decode-side transposes cost as much as the products at M = 8-16.)
//
// Built with -ffp-contract=fast: a*b + c becomes one FMA (these kernels promise a tolerance,
// not bit equality, see splitkernels/_backends/cpp.py).
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vector helpers are internal to this file

#include "common/half.h"
#include "cpu/bitpack.h"
#include "cpu/lowbit_kernels.h"

#include "cpu/isa_build.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

// Fused up to 6 rows: at M = 5-6 it ran in 0.75-0.85 of the GEMM's time on SmolLM2's layers and
// 4096 x 4096 (0.19 against 0.25 ms at 576 x 1536), at M = 7 the same, at M = 8 1.15-1.4 times
// (x of 8 rows outgrows L1 and is re-read per weight row).
constexpr int kFusedRows = 6;
// Above kFusedRows the activations come packed in tiles of kTileRows rows, one vector of a tile
// per k, and the products are kBlockN weight rows x up to kMaxTiles tiles per step (block_tiles):
// kMaxTiles * kBlockN accumulators, kMaxTiles activation vectors and a broadcast within the vector
// registers (32 at AVX-512, 16 at AVX2). Eight-lane vectors at AVX-512 too: Zen 4 runs two 256-bit
// FMAs per cycle or one 512-bit one, and 8-row tiles waste no lanes at M = 8.
constexpr int kTileRows = 8;
#if defined(__AVX512F__)
constexpr int kVL = 16;  // fp32 lanes of a vector register
constexpr int kBlockN = 8;
constexpr int kMaxTiles = 3;
#elif defined(__AVX2__)
constexpr int kVL = 8;
constexpr int kBlockN = 4;
constexpr int kMaxTiles = 3;
#else
constexpr int kVL = 4;
constexpr int kBlockN = 4;
constexpr int kMaxTiles = 2;
#endif
// Weight rows decoded per slice (kPanelN / kBlockN blocks): each block reads a slice of every
// activation tile of the row block, which comes from L2 for the panel's other blocks.
constexpr int kPanelN = 32;

// Code vectors at the build's own width (kVL lanes): wider generic vectors than the registers
// made GCC keep AVX2's accumulators on the stack, moved through general registers. Groups whose
// phases (3 bits: units) are not whole kVL-lane steps decode at half or a quarter of that width
// (kMinVL lanes at least), as one short step per group cost a scalar loop over the group: W2 in
// groups of 32 and W3 in groups of 64 at M = 2-4 took 4-7 times W4's time. On Zen 4 two 256-bit
// FMAs issue per cycle, so the half width costs nothing there.
template <int L>
struct Lanes {
  typedef float f __attribute__((vector_size(L * 4)));
  typedef uint32_t u __attribute__((vector_size(L * 4)));
  typedef int32_t i __attribute__((vector_size(L * 4)));
};
#if defined(__AVX2__) || defined(__AVX512F__)
constexpr int kMinVL = 4;
#else
constexpr int kMinVL = kVL;
#endif
typedef Lanes<kVL>::f vf;
typedef float vtile __attribute__((vector_size(kTileRows * 4)));

// The step width for phases (or 3-bit units) of `per_phase` bytes: the widest of kVL, kVL / 2,
// ..., kMinVL that divides it, else kVL (its steps take what fits, the rest goes one by one).
constexpr int step_lanes(int64_t per_phase) {
  for (int l = kVL; l >= kMinVL; l /= 2)
    if (per_phase % l == 0) return l;
  return kVL;
}

// f(std::integral_constant<int, L>{}) for L = step_lanes(per_phase).
template <typename F>
inline void with_step_lanes(int64_t per_phase, F&& f) {
  switch (step_lanes(per_phase)) {
    case kVL: f(std::integral_constant<int, kVL>{}); break;
#if defined(__AVX512F__)
    case 8: f(std::integral_constant<int, 8>{}); break;
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
    case 4: f(std::integral_constant<int, 4>{}); break;
#endif
    default: f(std::integral_constant<int, kVL>{}); break;
  }
}

// f(std::integral_constant<int, GS>{}) with group size g as the constant GS where it is 32, 64 or
// 128, else GS = 0 (known only at run time): a group's phase offsets become immediates and its
// steps unroll (1536 x 576 W4 g64 at M = 1 spent half its time between groups in the fused path,
// a quarter of the GEMM's decode time went there at M = 16).
template <typename F>
inline void with_group_size(int64_t g, F&& f) {
  switch (g) {
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    case 128: f(std::integral_constant<int, 128>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

// f(std::integral_constant<int, L>{}) for the step width L of B-bit codes in groups of GS (0: g).
template <int B, int GS, typename F>
inline void with_group_lanes(int64_t g, F&& f) {
  if constexpr (GS != 0) {
    f(std::integral_constant<int, step_lanes(B == 3 ? GS / 8 : GS * B / 8)>{});
  } else {
    with_step_lanes(B == 3 ? g / 8 : g * B / 8, f);
  }
}

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The lanes' sum, halves added pairwise: lane after lane was a chain of dependent adds (about 30
// cycles at AVX2) at the end of every weight row of the fused kernels.
template <typename V>
inline float hsum(V v) {
  constexpr int n = sizeof(V) / 4;
  float t[n];
  std::memcpy(t, &v, sizeof v);
  for (int w = n / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// f(std::integral_constant<int, i>) for i = 0 .. N - 1, unrolled at compile time.
template <typename F, int... I>
inline void unrolled_seq(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
inline void unrolled(F&& f) {
  unrolled_seq(f, std::make_integer_sequence<int, N>{});
}

// Codes (below 2^31) as floats through the signed conversion: below AVX-512 there is no unsigned
// one, and GCC builds it from two conversions and an FMA per vector.
template <int L>
inline typename Lanes<L>::f codes_to_float(typename Lanes<L>::u v) {
  return __builtin_convertvector(reinterpret_cast<typename Lanes<L>::i>(v), typename Lanes<L>::f);
}

// L bytes zero-extended to L uint32 lanes (GCC lowers the generic conversion byte by byte).
template <int L>
inline typename Lanes<L>::u widen(const uint8_t* p) {
  typename Lanes<L>::u v;
#if defined(__AVX512F__)
  if constexpr (L == 16) {
    const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
  if constexpr (L == 8) {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
  if constexpr (L == 4) {
    int32_t four;
    std::memcpy(&four, p, 4);
    const __m128i w = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(four));
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
#endif
  for (int i = 0; i < L; ++i) v[i] = p[i];
  return v;
}

// Code `ph` of each lane of wv, whose lanes hold N codes of B bits and zeros above them (widened
// bytes, or 3-byte units): the top code needs no mask (one vector operation fewer per step).
template <int B, int N, typename U>
inline U lane_code(U wv, int ph) {
  const U v = wv >> (ph * B);
  return ph == N - 1 ? v : v & ((1u << B) - 1);
}

// Code c of each lane (or scalar) wv, which holds N codes of B bits and zeros above them, as the
// fused kernels for MB activation rows read it. Where fp32_in_place(B, MB) it is masked where it
// sits, at bit c * B, and the activations come scaled by 2^-(c * B) to match (LowbitProblem::x32):
// the product is exact, and the shift is saved (W3 decodes the eight codes of a unit with eight
// ANDs, not seven shifts and seven ANDs). With more rows it is shifted down (lane_code).
template <int B, int N, int MB, typename U>
inline U fused_code(U wv, int c) {
  if constexpr (!fp32_in_place(B, MB)) {
    return lane_code<B, N>(wv, c);
  } else if constexpr (N == 1) {
    return wv;
  } else {
    return wv & (((1u << B) - 1) << (c * B));
  }
}

inline uint32_t load_unit3(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16;
}

// L 3-byte units, one per uint32 lane. Where the row (ending at `end`) has room, a whole vector
// is loaded and the bytes past the 3L are dropped; else exactly the 3L bytes are read (masked
// loads), so a row's last group needs no scalar tail. (Masked loads of every step made 3-bit
// rows 1.5-2x slower than 4-bit ones with the weights in memory on a Zen 5: session 27.) The
// fourth byte of a lane is zero: codes sit at shifts 0..21. Each 128-bit lane's four units come
// from one 16-byte load (8 lanes; a dword permute of one 32-byte load instead was 3-9% slower at
// M = 1 on a Zen 3) or one dword permute (16 lanes), then one in-lane byte shuffle spreads them.
template <int L>
inline typename Lanes<L>::u units3(const uint8_t* p, const uint8_t* end) {
  typename Lanes<L>::u v;
#if defined(__AVX512F__)
  if constexpr (L == 16) {
    const __m512i raw = end - p >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(0x0fff, p);
    const __m512i quads = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12), raw);
    const __m512i idx = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
    const __m512i w = _mm512_shuffle_epi8(quads, idx);
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
  if constexpr (L == 8) {
    // Units 0-3 and 4-7 loaded into one 128-bit lane each (16 bytes from p: within the 24).
    const __m128i hi = end - p >= 28 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 12))
                                     : _mm_maskload_epi32(reinterpret_cast<const int*>(p + 12),
                                                          _mm_setr_epi32(-1, -1, -1, 0));
    const __m256i halves = _mm256_set_m128i(hi, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i idx = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1, 0, 1, 2, -1, 3, 4, 5, -1,
                                         6, 7, 8, -1, 9, 10, 11, -1);
    const __m256i w = _mm256_shuffle_epi8(halves, idx);
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
  if constexpr (L == 4) {
    const __m128i raw = end - p >= 16 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                      : _mm_maskload_epi32(reinterpret_cast<const int*>(p), _mm_setr_epi32(-1, -1, -1, 0));
    const __m128i w = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
    std::memcpy(&v, &w, sizeof v);
    return v;
  }
#endif
  for (int i = 0; i < L; ++i) v[i] = load_unit3(p + 3 * i);
  return v;
}

// A phase layout's unit: 2-, 4- and 8-bit codes a byte of 8 / B phases, 3-bit codes three bytes of
// eight (unit u of phase ph holds code ph * units + u of its group). load_units reads L of them,
// one per lane (row_end: where the row ends, for the 3-bit loads), load_unit one.
template <int B>
constexpr int kPhases = B == 3 ? 8 : 8 / B;
template <int B>
constexpr int kUnitBytes = B == 3 ? 3 : 1;
template <int B, int L>
inline typename Lanes<L>::u load_units(const uint8_t* p, const uint8_t* row_end) {
  if constexpr (B == 3)
    return units3<L>(p, row_end);
  else
    return widen<L>(p);
}
template <int B>
inline uint32_t load_unit(const uint8_t* p) {
  if constexpr (B == 3)
    return load_unit3(p);
  else
    return uint32_t{*p};
}

// Scales and zeros of rows [n, n + rows) as fp32, one conversion loop each (a dtype switch per
// value cost 576 x 1536 W4 g32 at M = 1 a fifth of its time on a Zen 3; row by row, the calls and
// short loops cost 1536 x 576 g64 at M = 1 3%): sz[i * G ..] row n + i's scales,
// sz[zeros + i * G ..] its zeros.
void load_affine_rows(const LowbitProblem& p, int64_t n, int64_t rows, float* sz, int64_t zeros) {
  const int64_t offset = n * p.G * dtype_size(p.scale_dtype);
  to_float(static_cast<const uint8_t*>(p.scale) + offset, p.scale_dtype, rows * p.G, sz);
  to_float(static_cast<const uint8_t*>(p.zero) + offset, p.scale_dtype, rows * p.G, sz + zeros);
}

// Row n's: sz[0, G) scales, sz[G, 2G) zeros.
void load_affine(const LowbitProblem& p, int64_t n, float* sz) { load_affine_rows(p, n, 1, sz, p.G); }

// The fused path converts scales and zeros this many rows at a time.
constexpr int64_t kAffineRows = 16;
// At M = 3-6 the fused path takes K a slice of about kFusedSliceBytes of activations at a time
// where the M rows hold more than kFusedSliceMinBytes: whole, each weight row read them from L2
// again, bound by that (4096 x 4096, M = 3-6: 20-23% faster, W3 7%). Only with the next weight row
// prefetched, as the row streams come one slice at a time (without, W8 ran 20% slower than
// unsliced). Rows of at most 36 KiB were as fast or 3-9% faster whole (576 x 1536 at M = 4-6); at
// M = 2 4096 x 14336 W8 ran 15% slower sliced, at M = 1 2048 x 8192 g32 20% (caches evicted).
// One thread on a Zen 3 (bench/results/ops/s40).
constexpr int64_t kFusedSliceBytes = 16 << 10;
constexpr int64_t kFusedSliceMinBytes = 40 << 10;
constexpr int kFusedSliceMinRows = 3;

// Asks for the cache lines of bytes [p, p + n) (n >= 1), into every level (Locality 3) or from L2
// outwards (2).
template <int Locality = 3>
inline void prefetch_bytes(const uint8_t* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(p + o, 0, Locality);
  __builtin_prefetch(p + n - 1, 0, Locality);
}

// Groups [g0, g1) of a row (phase order, ending at row_end) dequantised into w, from w[0]; steps
// of L units of each phase; group size GS (0: g, known only at run time).
template <int B, int L, int GS>
void decode_row_phase(const uint8_t* rb, const uint8_t* row_end, int64_t g0, int64_t g1, int64_t group_size,
                      const float* s, const float* z, float* w) {
  typedef typename Lanes<L>::f F;
  constexpr int cpb = kPhases<B>;
  constexpr unsigned mask = (1u << B) - 1;
  const int64_t g = GS ? GS : group_size, per_phase = g / cpb;
  const int64_t vec_end = per_phase / L * L;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const uint8_t* gb = rb + grp * per_phase * kUnitBytes<B>;
    float* wg = w + (grp - g0) * g;
    const float sc = s[grp], ze = z[grp];
    for (int64_t j = 0; j < vec_end; j += L) {
      const typename Lanes<L>::u wv = load_units<B, L>(gb + kUnitBytes<B> * j, row_end);
      for (int ph = 0; ph < cpb; ++ph) {
        const F v = codes_to_float<L>(lane_code<B, cpb>(wv, ph)) * sc + ze;
        std::memcpy(wg + ph * per_phase + j, &v, sizeof v);
      }
    }
    for (int64_t j = vec_end; j < per_phase; ++j) {
      const uint32_t v = load_unit<B>(gb + kUnitBytes<B> * j);
      for (int ph = 0; ph < cpb; ++ph) wg[ph * per_phase + j] = static_cast<float>((v >> (ph * B)) & mask) * sc + ze;
    }
  }
}

void decode_row_natural(const uint8_t* rb, int64_t K, int bits, int64_t g, const float* s, const float* z,
                        uint8_t* qbuf, float* w) {
  unpack_row(rb, K, bits, qbuf);
  for (int64_t grp = 0; grp < K / g; ++grp) {
    const float sc = s[grp], ze = z[grp];
    const uint8_t* q = qbuf + grp * g;
    float* wg = w + grp * g;
    for (int64_t j = 0; j < g; ++j) wg[j] = static_cast<float>(q[j]) * sc + ze;
  }
}

// Groups [g0, g1) of row n of W, dequantised in decode order into w (from w[0]), with the row's
// scales and zeros in sz (load_affine). Natural layouts decode whole rows only (g0 = 0, g1 = G).
void decode_groups(const LowbitProblem& p, int64_t n, int64_t g0, int64_t g1, const float* sz, uint8_t* qbuf,
                   float* w) {
  const uint8_t* rb = p.qweight + n * p.row_bytes;
  const float *s = sz, *z = sz + p.G;
  const int64_t g = p.group_size;
  if (!p.phased) return decode_row_natural(rb, p.K, p.bits, g, s, z, qbuf, w);
  // Group sizes as constants (with_group_size): the GEMM ran 8-13% faster at M = 7-16 and 4-6% at
  // M = 32-64 on SmolLM2's layers (one thread, Zen 3; bench/results/ops/s41).
  const auto by_bits = [&](auto bits) {
    constexpr int B = decltype(bits)::value;
    with_group_size(g, [&](auto group) {
      constexpr int GS = decltype(group)::value;
      with_group_lanes<B, GS>(g, [&](auto lanes) {
        constexpr int L = decltype(lanes)::value;
        decode_row_phase<B, L, GS>(rb, rb + p.K * B / 8, g0, g1, g, s, z, w);
      });
    });
  };
  switch (p.bits) {
    case 2: by_bits(std::integral_constant<int, 2>{}); break;
    case 3: by_bits(std::integral_constant<int, 3>{}); break;
    case 4: by_bits(std::integral_constant<int, 4>{}); break;
    default: by_bits(std::integral_constant<int, 8>{}); break;
  }
}

// Row n of W, dequantised in decode order into w[K].
void decode_row(const LowbitProblem& p, int64_t n, float* sz, uint8_t* qbuf, float* w) {
  load_affine(p, n, sz);
  decode_groups(p, n, 0, p.G, sz, qbuf, w);
}

// sum_k a[k] b[k] in fp32, four vector chains (one would wait on the FMA latency).
float dot(const float* a, const float* b, int64_t K) {
  vf acc[4] = {};
  int64_t k = 0;
  for (; k + 4 * kVL <= K; k += 4 * kVL)
    for (int c = 0; c < 4; ++c) acc[c] = load<vf>(a + k + c * kVL) * load<vf>(b + k + c * kVL) + acc[c];
  for (; k + kVL <= K; k += kVL) acc[0] = load<vf>(a + k) * load<vf>(b + k) + acc[0];
  float t = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; k < K; ++k) t += a[k] * b[k];
  return t;
}

// Independent partial sums per activation row in the fused path (M = 2-6): one row's products
// would otherwise form a single FMA chain, bound by the FMA latency (4 cycles per code vector). The
// chains are summed per group (a total per chain left too few registers: W3 at M = 3 ran 40% slower).
template <int MB, int L>
constexpr int kChains = std::max(1, std::min(8, 64 / (L * MB)));
// The 3-bit loop keeps more live (eight phases of a units vector): there the MB * C chains and MB
// totals keep to kSumRegs3 registers. At AVX2's 16, two chains per row at M = 4 spilled: one
// took 1536 x 576 W3 g64 from 0.32 to 0.28 ms and 4096 x 4096 from 4.4 to 4.1 on a Zen 3 (the
// same budget for the 2/4/8-bit loop made W4 and W8 at M = 4 5-7% slower, so it is not theirs).
#if defined(__AVX512F__)
constexpr int kSumRegs3 = 26;
#else
constexpr int kSumRegs3 = 10;
#endif
template <int MB, int L>
constexpr int kChains3 = std::max(1, std::min(kChains<MB, L>, kSumRegs3 / MB - 1));

// Weight rows the fused path takes at once (fused_wrows) for MB activation rows whose groups are
// `vectors` code vectors (g / L) each; 1: one weight row at a time (fused_rows, or fused_wrows at
// M = 1). At AVX2: at M = 1, R x C = 4 chains, four rows of one chain where a group is at most
// eight code vectors, else two rows of two chains (four rows of one chain at g128 were 1.5x
// slower); at M = 2 three rows of one chain (W2: two; three were 12% slower); at M = 3 two for
// W3 and W8, for W2 and W4 only in groups of eight vectors (1536 x 512 W4 g128 2.1x and g32 1.2x
// slower than one row, W2 g32 1.3x: bench/results/ops/s39). At M = 4 two rows gained nothing.
// One thread on a Zen 3, one weight row before, ms (bench/results/ops/s37):
// * M = 1: 1536 x 576 g64 W4 0.067 -> 0.051, W3 0.075 -> 0.056, W2 0.065 -> 0.049.
// * M = 2: 1536 x 576 g64 W4 0.091 -> 0.076, W3 0.108 -> 0.085; 576 x 1536 g32 W4 0.110 -> 0.088.
// * M = 3: 1536 x 576 g64 W4 0.114 -> 0.102, W3 0.132 -> 0.116.
// Other instruction sets keep one weight row (not measured there): four chains at M = 1.
constexpr int fused_weight_rows(int bits, int MB, int vectors) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  switch (MB) {
    case 1: return vectors <= 8 ? 4 : 2;
    case 2: return bits == 2 ? 2 : 3;
    case 3: return bits == 3 || bits == 8 || vectors == 8 ? 2 : 1;
    default: return 1;
  }
#else
  return 1;
#endif
}
// Chains per weight row at M = 1: R x C = 4, but at least two code vectors per chain and group,
// as each chain costs an FMA per group (its scale): one row in groups of four vectors (g32 at
// AVX2) took four chains of one product each, and with two of two W4 ran 6-8% faster (4096 x
// 4096 and 576 x 1536 g32, one thread, Zen 3: 1.07 -> 0.99, 0.064 -> 0.060 ms; W2 5%, W8 0-5%).
constexpr int fused_weight_chains(int MB, int rows, int vectors) {
  return MB == 1 ? std::max(1, std::min(4 / rows, vectors / 2)) : 1;
}
// Only rows this short go several at a time: with the weights in memory, R longer rows (R streams
// a row apart) ran much slower, software prefetch or not (Zen 3, one thread, evicted caches, ms:
// 4096 x 4096 W4 M = 1 0.91-0.98 -> 1.26-1.60, 1536 x 576 W8 M = 1 0.09 -> 0.14-0.16, 576 x 1536
// W4 g128 0.065 -> 0.090), while 288-byte rows (1536 x 576 W4 g64) were as fast or faster.
constexpr int64_t kSeveralRowsMaxBytes = 512;

// v[0] + ... + v[C - 1], pairwise.
template <int C, typename V>
inline V sum_chains(const V* v) {
  if constexpr (C == 1) {
    return v[0];
  } else {
    return sum_chains<C / 2>(v) + sum_chains<C - C / 2>(v + C / 2);
  }
}

// The fused kernels sum s * sum(q x) in vector lanes and z * sum(x) apart (ys). Codes are unsigned,
// so where the activations sit far from zero (300 + randn) the two nearly cancel group by group:
// totalled apart over a row they grew with K, and the rounding of the large totals put 4096
// columns 2e-5 and 11008 columns 5e-5 from float64. So the groups go in chunks of about
// kFoldCodes codes (fold_groups), and after each the chunk's zero terms join the lanes (spread
// over the T totals of L lanes): the totals stay within the sums of that many codes, 2-4e-6
// there (1024 codes: 4-7e-6). The totals are copied into chunk-local ones (kept in registers; a
// fold under a branch in the group loop made GCC keep them on the stack, W4 g32 at M = 2 10%
// slower). Cost, one thread: W3 4096 x 4096 at M = 1 9-16%, 4864 x 896 and W2 0-5%. Folding
// every group cost W3 at M = 1 up to 17% (C adds a group).
constexpr int64_t kFoldCodes = 512;
inline int64_t fold_groups(int64_t g) { return std::max<int64_t>(1, kFoldCodes / g); }

// One vector step of fused_rows: L units of each phase (from units) against the MB activation
// rows from x, code vector (u, ph) into chain (u * cpb + ph) % C. A function, not a lambda: with
// the sums captured by one, GCC kept a pointer per row and phase on the stack (W3 at M = 4 ran
// 12% slower; the 2/4/8-bit kernels, which had carried such a lambda, 7-27% faster without).
template <int B, int MB, int L, int C, int u, typename F>
__attribute__((always_inline)) inline void fused_step(F (&dv)[MB][C], const uint8_t* units, const uint8_t* row_end,
                                                      const float* x, int64_t K, int64_t per_phase) {
  constexpr int cpb = kPhases<B>;
  const typename Lanes<L>::u wv = load_units<B, L>(units, row_end);
  for (int ph = 0; ph < cpb; ++ph) {
    const F q = codes_to_float<L>(fused_code<B, cpb, MB>(wv, ph));
    for (int m = 0; m < MB; ++m) {
      F& d = dv[m][(u * cpb + ph) % C];
      d = q * load<F>(x + m * K + ph * per_phase) + d;
    }
  }
}

// Few activation rows (M = 2-6 where fused_weight_rows gives one weight row), phase layout:
// codes straight into the FMAs, one group at a time, in steps of L units of each phase.
template <int B, int MB, int L, int GS>
void fused_rows(const uint8_t* rb, int64_t K, int64_t group_size, const float* s, const float* z, const float* xp,
                const float* xsum, int64_t G, int64_t g0, int64_t g1, int64_t ahead, float* acc) {
  typedef typename Lanes<L>::f F;
  const int64_t g = GS ? GS : group_size;
  constexpr int cpb = kPhases<B>, C = B == 3 ? kChains3<MB, L> : kChains<MB, L>;
  constexpr int U = C > cpb ? C / cpb : 1;  // U: steps of L units per unrolled step
  const int64_t per_phase = g / cpb;
  const int64_t vec_end = per_phase / L * L;
  const uint8_t* row_end = rb + K * B / 8;
  F tot[MB];
  for (int m = 0; m < MB; ++m) tot[m] = F{};
  for (int64_t f0 = g0, fold = fold_groups(g); f0 < g1; f0 += fold) {
    F yv[MB];  // the totals through the chunk, its zero terms apart (ys) until it ends
    float ys[MB];
    for (int m = 0; m < MB; ++m) {
      yv[m] = tot[m];
      ys[m] = 0.f;
    }
    for (int64_t grp = f0; grp < std::min(g1, f0 + fold); ++grp) {
      const uint8_t* gb = rb + grp * per_phase * kUnitBytes<B>;
      const float* xg = xp + grp * g;
      if (ahead) prefetch_bytes(gb + ahead, per_phase * kUnitBytes<B>);
      F dv[MB][C];
      for (int m = 0; m < MB; ++m)
        for (int c = 0; c < C; ++c) dv[m][c] = F{};
      // Steps of U * L units, then single steps (fused_step).
      int64_t j = 0;
      if constexpr (U > 1)
        for (; j + L * U <= vec_end; j += L * U)
          unrolled<U>([&](auto u) {
            const int64_t at = j + L * decltype(u)::value;
            fused_step<B, MB, L, C, decltype(u)::value>(dv, gb + kUnitBytes<B> * at, row_end, xg + at, K, per_phase);
          });
      for (; j < vec_end; j += L)
        fused_step<B, MB, L, C, 0>(dv, gb + kUnitBytes<B> * j, row_end, xg + j, K, per_phase);
      float dt[MB];
      for (int m = 0; m < MB; ++m) dt[m] = 0.f;
      if constexpr (GS == 0 || (GS / cpb) % L != 0)  // units past whole steps
        for (int64_t t = vec_end; t < per_phase; ++t) {
          const uint32_t v = load_unit<B>(gb + kUnitBytes<B> * t);
          for (int ph = 0; ph < cpb; ++ph) {
            const float q = static_cast<float>(fused_code<B, cpb, MB>(v, ph));
            for (int m = 0; m < MB; ++m) dt[m] = q * xg[m * K + ph * per_phase + t] + dt[m];
          }
        }
      for (int m = 0; m < MB; ++m) {
        yv[m] = s[grp] * sum_chains<C>(dv[m]) + yv[m];
        ys[m] += z[grp] * xsum[m * G + grp];
        if constexpr (GS == 0 || (GS / cpb) % L != 0) ys[m] += s[grp] * dt[m];
      }
    }
    for (int m = 0; m < MB; ++m) tot[m] = yv[m] + ys[m] * (1.f / L);
  }
  for (int m = 0; m < MB; ++m) acc[m] = hsum(tot[m]);
}

// The end of a group in fused_wrows: each chain scaled by its weight row's scale into the
// totals (T == 1: the chains summed first), the zero times the activations' group sum, and with
// kTail the sum of the codes past whole steps (dt), into ys (see kFoldCodes).
template <int MB, int R, int C, int T, bool kTail, typename F>
__attribute__((always_inline)) inline void end_group(F (&yv)[MB][R][T], float (&ys)[MB][R], F (&dv)[MB][R][C],
                                                     const float (&dt)[MB][R], const float* s, const float* z,
                                                     const float* xsum, int64_t G, int64_t grp) {
  for (int r = 0; r < R; ++r) {
    const float sc = s[r * G + grp], ze = z[r * G + grp];
    for (int m = 0; m < MB; ++m) {
      if constexpr (T == 1) {
        yv[m][r][0] = sc * sum_chains<C>(dv[m][r]) + yv[m][r][0];
      } else {
        for (int c = 0; c < C; ++c) yv[m][r][c] = sc * dv[m][r][c] + yv[m][r][c];
      }
      ys[m][r] += ze * xsum[m * G + grp];
      if constexpr (kTail) ys[m][r] += sc * dt[m][r];
    }
  }
}

// One vector step of fused_wrows: L units of each phase of R weight rows (row r's from units +
// r * row_bytes, the row ending at row_end + r * row_bytes) against the MB activation rows from
// x, each activation vector loaded once for the R rows; code vector (u, ph) into chain
// (u * cpb + ph) % C (a function, as fused_step).
template <int B, int MB, int R, int L, int C, int u, typename F>
__attribute__((always_inline)) inline void fused_wstep(F (&dv)[MB][R][C], const uint8_t* units, int64_t row_bytes,
                                                       const uint8_t* row_end, const float* x, int64_t K,
                                                       int64_t per_phase) {
  constexpr int cpb = kPhases<B>;
  typename Lanes<L>::u wv[R];
  for (int r = 0; r < R; ++r) wv[r] = load_units<B, L>(units + r * row_bytes, row_end + r * row_bytes);
  for (int ph = 0; ph < cpb; ++ph) {
    F xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = load<F>(x + m * K + ph * per_phase);
    for (int r = 0; r < R; ++r) {
      const F q = codes_to_float<L>(fused_code<B, cpb, MB>(wv[r], ph));
      for (int m = 0; m < MB; ++m) {
        F& d = dv[m][r][(u * cpb + ph) % C];
        d = q * xv[m] + d;
      }
    }
  }
}

// Few activation rows, phase layout: fused_rows for R weight rows at once (row r at
// rb + r * row_bytes, its scales and zeros at s + r * G and z + r * G) with C chains per
// activation and weight row: each activation vector is loaded once for the R rows, each row's
// code vector converted once for the MB activation rows. (This loop at R = 1 ran 1.3x slower
// than fused_rows at M = 4, W4 g128: GCC kept its accumulators in memory.) At M = 1 each chain's
// group sum goes into a total of its own, so a group ends in independent FMAs (summing the
// chains first was a 25-cycle dependency per group: 10% slower); with more rows the chains are
// summed per group (a total per chain left too few registers: W3 at M = 3 ran 40% slower).
// acc[m * R + r] gets the sums.
template <int B, int MB, int L, int GS, int R, int C>
void fused_wrows(const uint8_t* rb, int64_t row_bytes, int64_t K, int64_t group_size, const float* s, const float* z,
                 const float* xp, const float* xsum, int64_t G, int64_t g0, int64_t g1, float* acc) {
  typedef typename Lanes<L>::f F;
  const int64_t g = GS ? GS : group_size;
  constexpr int cpb = kPhases<B>, T = MB == 1 ? C : 1;
  constexpr int U = C > cpb ? C / cpb : 1;  // U: steps of L units per unrolled step
  const int64_t per_phase = g / cpb;
  const int64_t vec_end = per_phase / L * L;
  const uint8_t* row_end = rb + K * B / 8;  // row 0's
  F tot[MB][R][T];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) tot[m][r][t] = F{};
  for (int64_t f0 = g0, fold = fold_groups(g); f0 < g1; f0 += fold) {
    F yv[MB][R][T];  // the totals through the chunk, its zero terms apart (ys) until it ends
    float ys[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) {
        for (int t = 0; t < T; ++t) yv[m][r][t] = tot[m][r][t];
        ys[m][r] = 0.f;
      }
    for (int64_t grp = f0; grp < std::min(g1, f0 + fold); ++grp) {
      const uint8_t* gb = rb + grp * per_phase * kUnitBytes<B>;
      const float* xg = xp + grp * g;
      if constexpr (MB == 1 && R == 1) prefetch_bytes(gb + kStreamPrefetchBytes, per_phase * kUnitBytes<B>);
      F dv[MB][R][C];
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r)
          for (int c = 0; c < C; ++c) dv[m][r][c] = F{};
      // Steps of U * L units, then single steps (fused_wstep).
      const auto step = [&](int64_t j, auto u) {
        fused_wstep<B, MB, R, L, C, decltype(u)::value>(dv, gb + kUnitBytes<B> * j, row_bytes, row_end, xg + j, K,
                                                        per_phase);
      };
      int64_t j = 0;
      const auto steps_at = [&](int64_t j0) { unrolled<U>([&](auto u) { step(j0 + L * decltype(u)::value, u); }); };
      // W4 and W8 at M = 2 unrolled whole: in a loop GCC kept the sums on the stack (1536 x 512 W4
      // g128 0.120 -> 0.062 ms, W8 0.072 -> 0.064); so W2 ran 15% slower, M = 3 up to 1.4x, M = 1
      // no faster.
      if constexpr (MB == 2 && B >= 4) {
#pragma GCC unroll 16
        for (; j + L * U <= vec_end; j += L * U) steps_at(j);
      } else if constexpr (U > 1) {
        for (; j + L * U <= vec_end; j += L * U) steps_at(j);
      }
      for (; j < vec_end; j += L)
        fused_wstep<B, MB, R, L, C, 0>(dv, gb + kUnitBytes<B> * j, row_bytes, row_end, xg + j, K, per_phase);
      float dt[MB][R] = {};
      if constexpr (GS == 0 || (GS / cpb) % L != 0)  // units past whole steps
        for (j = vec_end; j < per_phase; ++j)
          for (int r = 0; r < R; ++r) {
            const uint32_t v = load_unit<B>(gb + r * row_bytes + kUnitBytes<B> * j);
            for (int ph = 0; ph < cpb; ++ph) {
              const float q = static_cast<float>(fused_code<B, cpb, MB>(v, ph));
              for (int m = 0; m < MB; ++m) dt[m][r] = q * xg[m * K + ph * per_phase + j] + dt[m][r];
            }
          }
      end_group<MB, R, C, T, (GS == 0 || (GS / cpb) % L != 0)>(yv, ys, dv, dt, s, z, xsum, G, grp);
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < T; ++t) tot[m][r][t] = yv[m][r][t] + ys[m][r] * (1.f / (L * T));
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m * R + r] = hsum(sum_chains<T>(tot[m][r]));
}

// fused_rows as a function of its own, called per row (3-bit codes at M = 4): inlined into the row
// loop, it ran 13% slower (1536 x 576 W3 g64, one thread, Zen 3 AVX2: 0.179 against 0.156 ms); at
// M = 5 and 6 the call was 7-11% slower instead (bench/results/ops/s36).
template <int B, int MB, int L, int GS>
__attribute__((noinline)) void fused_rows_call(const uint8_t* rb, int64_t K, int64_t group_size, const float* s,
                                               const float* z, const float* xp, const float* xsum, int64_t G,
                                               int64_t g0, int64_t g1, int64_t ahead, float* acc) {
  fused_rows<B, MB, L, GS>(rb, K, group_size, s, z, xp, xsum, G, g0, g1, ahead, acc);
}

// Weight rows [n_begin, n_end) through fused_wrows / fused_rows for B bits, at the step width of
// group size g, known at compile time as GS where it is one of the common sizes (GS = 0: only at
// run time). The row loop is inside each variant: a call and dispatch per row, and the mask
// constants set up again, cost 1536 x 576 W3 g64 at M = 1 about a tenth of its time (nine groups
// a row). Scales and zeros come kAffineRows rows at a time (sz: 2 kAffineRows G floats).
template <int B, int MB, int GS>
void fused_bits(const LowbitProblem& p, int64_t n_begin, int64_t n_end, float* sz) {
  const int64_t g = p.group_size, G = p.G, zeros = kAffineRows * G;
  // fp32 scales and zeros are read where they lie (copied, they were an eighth of SmolLM2's decode
  // step at g32, the weights coming from memory); other dtypes are converted kAffineRows rows at a time.
  const bool fp32_affine = p.scale_dtype == kFloat32;
  const float *scales = sz, *zeros_at = sz + zeros;
  // Groups [g0, g1) of weight rows [n0 + i, n0 + i + RR) of a block through fused_wrows (C chains)
  // or, RR = 0, of row n0 + i through fused_rows: into y, or with `sums` added to
  // sums[(i + r) * MB + m]. `ahead`: the bytes to the row to prefetch (0: none).
  const auto rows_at = [&](int64_t n0, int64_t i, int64_t g0, int64_t g1, int64_t ahead, float* sums, auto lanes,
                           auto rr, auto chains) {
    constexpr int L = decltype(lanes)::value, RR = decltype(rr)::value, C = decltype(chains)::value;
    constexpr int rows = RR ? RR : 1;
    const uint8_t* rb = p.qweight + (n0 + i) * p.row_bytes;
    const float *s = scales + i * G, *z = zeros_at + i * G;
    float acc[MB * rows];
    if constexpr (RR == 0 && B == 3 && MB == 4) {
      fused_rows_call<B, MB, L, GS>(rb, p.K, g, s, z, p.x32, p.xsum, G, g0, g1, ahead, acc);
    } else if constexpr (RR == 0) {
      fused_rows<B, MB, L, GS>(rb, p.K, g, s, z, p.x32, p.xsum, G, g0, g1, ahead, acc);
    } else {
      fused_wrows<B, MB, L, GS, RR, C>(rb, p.row_bytes, p.K, g, s, z, p.x32, p.xsum, G, g0, g1, acc);
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < rows; ++r) {
        if (sums)
          sums[(i + r) * MB + m] += acc[m * rows + r];
        else
          p.y[m * p.N + n0 + i + r] = acc[m * rows + r];
      }
  };
  // Groups per slice of K (kFusedSliceBytes of activations) from M = kFusedSliceMinRows on, where
  // the activation rows hold more than kFusedSliceMinBytes: each slice goes through every weight
  // row of a block before the next, each row asking for the next row's groups as it reads its own.
  const int64_t slice_groups = MB < kFusedSliceMinRows || MB * 4 * p.K <= kFusedSliceMinBytes
                                   ? G
                                   : std::max<int64_t>(1, std::min<int64_t>(G, kFusedSliceBytes / (MB * 4 * g)));
  const auto run = [&](auto lanes) {
    constexpr int L = decltype(lanes)::value;
    // A group is g / L code vectors (GS = 0: taken as more than eight).
    constexpr int R = fused_weight_rows(B, MB, GS ? GS / L : 9), C = fused_weight_chains(MB, R, GS ? GS / L : 9);
    using One = std::integral_constant<int, MB == 1 ? 1 : 0>;  // one weight row: fused_wrows at M = 1
    using OneChains = std::integral_constant<int, fused_weight_chains(MB, 1, GS ? GS / L : 9)>;
    const bool several = R > 1 && p.row_bytes <= kSeveralRowsMaxBytes;
    // Rows [n0, n0 + rows), groups [g0, g1) (see rows_at).
    const auto block = [&](int64_t n0, int64_t rows, int64_t g0, int64_t g1, float* sums) {
      int64_t i = 0;
      if constexpr (R > 1)
        if (several)
          for (; i + R <= rows; i += R)
            rows_at(n0, i, g0, g1, 0, sums, lanes, std::integral_constant<int, R>{}, std::integral_constant<int, C>{});
      for (; i < rows; ++i) rows_at(n0, i, g0, g1, sums && i + 1 < rows ? p.row_bytes : 0, sums, lanes, One{}, OneChains{});
    };
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kAffineRows) {
      const int64_t rows = std::min(kAffineRows, n_end - n0);
      if (fp32_affine) {
        scales = static_cast<const float*>(p.scale) + n0 * G;
        zeros_at = static_cast<const float*>(p.zero) + n0 * G;
      } else {
        load_affine_rows(p, n0, rows, sz, zeros);
        // The next block's into L2 while this block's rows compute: converted in one burst, they had
        // come from memory with no work to hide the misses (into L1, the block's weight rows evicted
        // them first). 14336 x 4096 W4 g32, bf16 scales, M = 1, AVX2: 3.89-4.07 -> 3.53-3.71 ms.
        if (const int64_t next = std::min(kAffineRows, p.N - n0 - rows); next > 0) {
          const int64_t size = dtype_size(p.scale_dtype), at = (n0 + rows) * G * size;
          prefetch_bytes<2>(static_cast<const uint8_t*>(p.scale) + at, next * G * size);
          prefetch_bytes<2>(static_cast<const uint8_t*>(p.zero) + at, next * G * size);
        }
      }
      if (slice_groups == G) {
        block(n0, rows, 0, G, nullptr);
        continue;
      }
      float sums[kAffineRows * MB] = {};
      for (int64_t g0 = 0; g0 < G; g0 += slice_groups) block(n0, rows, g0, std::min(G, g0 + slice_groups), sums);
      for (int64_t i = 0; i < rows; ++i)
        for (int m = 0; m < MB; ++m) p.y[m * p.N + n0 + i] = sums[i * MB + m];
    }
  };
  with_group_lanes<B, GS>(g, run);
}

// fused_bits with the group size as a constant where it is a common one (with_group_size).
template <int B, int MB>
void fused_group(const LowbitProblem& p, int64_t n_begin, int64_t n_end, float* sz) {
  with_group_size(p.group_size, [&](auto group) { fused_bits<B, MB, decltype(group)::value>(p, n_begin, n_end, sz); });
}

// Weight rows [n_begin, n_end) for M = MB activation rows, phase layouts (sz: 2 kAffineRows G floats).
template <int MB>
void fused_block(const LowbitProblem& p, int64_t n_begin, int64_t n_end, float* sz) {
  switch (p.bits) {
    case 2: fused_group<2, MB>(p, n_begin, n_end, sz); break;
    case 3: fused_group<3, MB>(p, n_begin, n_end, sz); break;
    case 4: fused_group<4, MB>(p, n_begin, n_end, sz); break;
    default: fused_group<8, MB>(p, n_begin, n_end, sz); break;
  }
}

// The weight is decoded a slice of whole groups, about kSliceK values, at a time: a block's
// decoded slice (8 KiB at AVX-512) stays in L1 and the row block's activation slice in L2 while
// every tile and block reads them (128 values per slice ran 3-8% slower at M = 8-64 on
// SmolLM2's layers; 512 about as fast at M = 8-16 and up to 10% slower at M = 64).
constexpr int64_t kSliceK = 256;
// Activation rows are taken about kBlockXBytes of them at a time (weight slices decoded again for
// each block): every slice reads all of the block's rows, which should come from the cache, not DRAM.
constexpr int64_t kBlockXBytes = int64_t{8} << 20;

// acc[t][r][m] (tile t's activation row m, weight row r) += sum_k x_t[k][m] w[r][k], k < kc,
// for T tiles of kTileRows packed activation rows (tile t at x + t * tile_stride, [k][kTileRows])
// and NB blocks of kBlockN decoded weight rows w (row stride kc; block b's sums at acc + b *
// acc_stride). Each weight value is broadcast into T FMAs. One tile goes with two blocks: with
// one tile's kBlockN accumulators the FMAs waited on each other (M = 8 took as long as M = 16).
template <int T, int NB = 1>
void block_tiles(const float* x, int64_t tile_stride, int64_t kc, const float* w, float* acc,
                 int64_t acc_stride = 0) {
  constexpr int R = NB * kBlockN;
  const auto at = [&](int t, int r) {
    return acc + (r / kBlockN) * acc_stride + (t * kBlockN + r % kBlockN) * kTileRows;
  };
  vtile a[T][R];
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) a[t][r] = load<vtile>(at(t, r));
  for (int64_t k = 0; k < kc; ++k) {
    vtile xv[T];
    for (int t = 0; t < T; ++t) xv[t] = load<vtile>(x + t * tile_stride + k * kTileRows);
    for (int r = 0; r < R; ++r) {
      const float wr = w[r * kc + k];
      for (int t = 0; t < T; ++t) a[t][r] = xv[t] * wr + a[t][r];
    }
  }
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) std::memcpy(at(t, r), &a[t][r], sizeof(vtile));
}

void fp32_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.K, G = p.G, M = p.M;
  if (!fp32_packs_x(lowbit_kernels(), M)) {
    thread_local AlignedVector<float> sz, row;
    thread_local AlignedVector<uint8_t> qbuf;
    sz.resize(2 * (p.phased ? kAffineRows : 1) * G);
    row.resize(p.phased ? 0 : K);
    qbuf.resize(p.phased ? 0 : K);
    if (p.phased) {
      switch (M) {
        case 1: fused_block<1>(p, n_begin, n_end, sz.data()); break;
        case 2: fused_block<2>(p, n_begin, n_end, sz.data()); break;
        case 3: fused_block<3>(p, n_begin, n_end, sz.data()); break;
        case 4: fused_block<4>(p, n_begin, n_end, sz.data()); break;
        case 5: fused_block<5>(p, n_begin, n_end, sz.data()); break;
        default: fused_block<6>(p, n_begin, n_end, sz.data()); break;
      }
      return;
    }
    for (int64_t n = n_begin; n < n_end; ++n) {  // natural order: the row dequantised, then dotted with each x row
      decode_row(p, n, sz.data(), qbuf.data(), row.data());
      for (int64_t m = 0; m < M; ++m) p.y[m * p.N + n] = dot(row.data(), p.x32 + m * K, K);
    }
    return;
  }
  // Slices of whole groups (natural layouts: the whole row, which decode_groups needs).
  const int64_t g = p.group_size, per_slice = p.phased ? std::max<int64_t>(1, kSliceK / g) : G;
  const int64_t group_bytes = g * p.bits / 8;  // a group's packed bytes (phase layouts: whole bytes)
  const int64_t tile_stride = K * kTileRows, tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t block_tiles_n = std::min(tiles, std::max<int64_t>(1, kBlockXBytes / (K * 4 * kTileRows)));
  constexpr int64_t kBlocks = kPanelN / kBlockN;
  thread_local AlignedVector<float> wbuf, affine, acc;  // acc: [block][tile][kBlockN][kTileRows] sums
  thread_local AlignedVector<uint8_t> qbuf;
  wbuf.resize(kPanelN * per_slice * g);
  affine.resize(kPanelN * 2 * G);
  qbuf.resize(p.phased ? 0 : K);
  acc.resize(kBlocks * block_tiles_n * kBlockN * kTileRows);
  for (int64_t t0 = 0; t0 < tiles; t0 += block_tiles_n) {
    const int64_t t1 = std::min(tiles, t0 + block_tiles_n), nt = t1 - t0;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelN) {
      const int64_t rows = std::min<int64_t>(kPanelN, n_end - n0), blocks = (rows + kBlockN - 1) / kBlockN;
      for (int64_t r = 0; r < rows; ++r) load_affine(p, n0 + r, affine.data() + r * 2 * G);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g0 = 0; g0 < G; g0 += per_slice) {
        const int64_t g1 = std::min(G, g0 + per_slice), k0 = g0 * g, kc = (g1 - g0) * g;
        const int64_t next_bytes = (std::min(G, g1 + per_slice) - g1) * group_bytes;  // the next slice's
        // A short last block repeats the panel's first row: computed, never stored. Each row's
        // next slice is prefetched: rows read side by side are more streams than the hardware
        // prefetcher follows (W8 at 4096 x 4096, M = 16, took 1.8 times W4's time without).
        for (int64_t r = 0; r < blocks * kBlockN; ++r)
          if (r < rows) {
            const uint8_t* next = p.qweight + (n0 + r) * p.row_bytes + g1 * group_bytes;
            for (int64_t b = 0; b < next_bytes; b += 64) __builtin_prefetch(next + b);
            decode_groups(p, n0 + r, g0, g1, affine.data() + r * 2 * G, qbuf.data(), wbuf.data() + r * kc);
          } else {
            std::memcpy(wbuf.data() + r * kc, wbuf.data(), kc * sizeof(float));
          }
        // Each group of tiles meets every block of the panel while its slice is in L1 (blocks
        // outside, the slice of all tiles came from L3 again per block once it outgrew L2:
        // 4096 x 4096 W4 at M = 512 ran 9% slower, one thread, Zen 3).
        const float* xs = p.x32 + k0 * kTileRows;
        for (int64_t t = t0; t < t1; t += kMaxTiles)
          for (int64_t b = 0; b < blocks; ++b) {
            const float* xt = xs + t * tile_stride;
            const float* w = wbuf.data() + b * kBlockN * kc;
            float* at = acc.data() + (b * nt + t - t0) * kBlockN * kTileRows;
            if (t + 1 == t1 && b + 1 < blocks) {  // one tile: two blocks at a time
              block_tiles<1, 2>(xt, tile_stride, kc, w, at, nt * kBlockN * kTileRows);
              ++b;
              continue;
            }
            switch (std::min<int64_t>(kMaxTiles, t1 - t)) {
              case 1: block_tiles<1>(xt, tile_stride, kc, w, at); break;
              case 2: block_tiles<2>(xt, tile_stride, kc, w, at); break;
              default: block_tiles<kMaxTiles>(xt, tile_stride, kc, w, at); break;
            }
          }
      }
      // Sums to y: acc[b][t][r][m] is y[t * kTileRows + m][n0 + b * kBlockN + r].
      for (int64_t b = 0; b < blocks; ++b)
        for (int64_t t = t0; t < t1; ++t)
          for (int64_t m = 0; m < std::min<int64_t>(kTileRows, M - t * kTileRows); ++m) {
            float* yr = p.y + (t * kTileRows + m) * p.N + n0 + b * kBlockN;
            const float* a = acc.data() + (b * nt + t - t0) * kBlockN * kTileRows + m;
            for (int64_t r = 0; r < std::min<int64_t>(kBlockN, rows - b * kBlockN); ++r) yr[r] = a[r * kTileRows];
          }
    }
  }
}

// Decode order back to natural order: code c of unit u of a group sits at c * units + u.
template <int CPU>
void to_natural(const float* row, int64_t K, int64_t g, float* out) {
  const int64_t units = g / CPU;
  for (int64_t g0 = 0; g0 < K; g0 += g)
    for (int64_t u = 0; u < units; ++u)
      for (int c = 0; c < CPU; ++c) out[g0 + u * CPU + c] = row[g0 + c * units + u];
}

// Rows of W dequantised in natural order (fp32 or bf16), for the large-M BLAS path.
void dequantize(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.K, g = p.group_size;
  thread_local AlignedVector<float> sz, row, nat;
  thread_local AlignedVector<uint8_t> qbuf;
  sz.resize(2 * p.G);
  row.resize(K);
  nat.resize(K);
  qbuf.resize(p.phased ? 0 : K);
  for (int64_t n = n_begin; n < n_end; ++n) {
    float* dst32 = p.w_dtype == kFloat32 ? static_cast<float*>(p.w_out) + n * K : nat.data();
    decode_row(p, n, sz.data(), qbuf.data(), p.phased ? row.data() : dst32);
    if (p.phased) switch (p.bits) {
        case 2: to_natural<4>(row.data(), K, g, dst32); break;
        case 4: to_natural<2>(row.data(), K, g, dst32); break;
        case 8: to_natural<1>(row.data(), K, g, dst32); break;
        default: to_natural<8>(row.data(), K, g, dst32); break;
      }
    if (p.w_dtype != kFloat32) {
      // Round to nearest even (weights are finite: the NaN case of float_to_bf16 is not needed).
      uint16_t* dst16 = static_cast<uint16_t*>(p.w_out) + n * K;
      for (int64_t k = 0; k < K; ++k) {
        uint32_t u;
        std::memcpy(&u, dst32 + k, 4);
        dst16[k] = static_cast<uint16_t>(bf16_round_bits(u));
      }
    }
  }
}

}  // namespace

const LowbitKernels& lowbit_kernels() {
  static const LowbitKernels k{SK_ISA_NAME, fp32_rows, kFusedRows, kTileRows, nullptr, dequantize};
  return k;
}

}  // namespace SK_ISA_NS
}  // namespace sk
