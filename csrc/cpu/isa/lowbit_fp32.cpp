// fp32-activation low-bit kernels, compiled once per instruction set (CMakeLists.txt builds
// this file with -DSK_ISA_NS=isa_generic / isa_avx2 / isa_avx512 and the matching -m flags),
// written with GCC/Clang vector types so each build uses its own vector width.
//
// Decode order: for bits 2, 4 and 8 a byte holds 8/b whole codes; within each group the codes
// are visited phase by phase (all low codes of the group's bytes, then the next codes, ...),
// which makes decoding a shift-and-mask over consecutive bytes. For 3 bits the unit is three
// bytes holding eight codes, with the same phase order over units (groups of a multiple of
// 128 codes). Other layouts decode in natural order. The caller permutes x to match.
//
// Two paths, by the number of activation rows M:
// * M <= kFusedRows: each code feeds the FMAs of every activation row directly and a group's
//   scale and zero are applied to its partial sums: sum_k (q_k*s + z) x_k = s*sum q_k x_k +
//   z*sum x_k. Only the packed weight, its scales and x are read.
// * larger M: kPanelN weight rows are dequantised, a slice of K at a time, into an L1-resident
//   fp32 panel laid out K-major (kPanelN consecutive values per k), and an outer-product
//   micro-kernel adds kPanelM activation rows (packed by the caller: LowbitProblem::x32) x
//   kPanelN columns per k: two vector loads of the panel and one broadcast per activation row
//   feed 2 kPanelM FMAs, with no horizontal sums. (The dot form it
//   replaced, 4 x 4 rows dotted over K, re-read x for every 4 weight rows and ran at half the FMA
//   rate at SmolLM2's sizes, 1.3-1.8x slower than torch's fp32 F.linear from M = 16.)
//
// Built with -ffp-contract=fast: a*b + c becomes one FMA (these kernels promise a tolerance,
// not bit equality, see splitkernels/_backends/cpp.py).
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#pragma GCC diagnostic ignored "-Wpsabi"  // vector helpers are internal to this file

#include "common/half.h"
#include "cpu/bitpack.h"
#include "cpu/lowbit_kernels.h"

#include "cpu/isa_build.h"
#if defined(__AVX512F__)
#include "cpu/isa/transpose16.h"
#endif

namespace sk {
namespace SK_ISA_NS {
namespace {

constexpr int kFusedRows = 4;
// fp32 lanes of a vector, and the panel micro-kernel's activation rows: 2 kPanelM accumulators,
// two panel vectors and a broadcast within the vector registers (32 zmm, 16 ymm / xmm).
#if defined(__AVX512F__)
constexpr int kVL = 16;
constexpr int kPanelM = 8;
#elif defined(__AVX2__)
constexpr int kVL = 8;
constexpr int kPanelM = 6;
#else
constexpr int kVL = 4;
constexpr int kPanelM = 6;
#endif
constexpr int kPanelN = 2 * kVL;  // weight rows per panel

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x64 __attribute__((vector_size(64)));
typedef float vecf __attribute__((vector_size(kVL * 4)));

template <typename V>
inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V>
inline float hsum(V v) {
  float t = 0.f;
  for (unsigned i = 0; i < sizeof(V) / 4; ++i) t += v[i];
  return t;
}

// 16 bytes zero-extended to 16 uint32 lanes (GCC lowers the generic conversion byte by byte).
inline u32x16 widen16(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<u32x16>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  u32x16 v;
  const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  u32x16 v;
  for (int i = 0; i < 16; ++i) v[i] = p[i];
  return v;
#endif
}

inline uint32_t load_unit3(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16;
}

// Sixteen 3-byte units from 64 readable bytes, one per uint32 lane (a byte shuffle; vpermb
// where the target has AVX-512 VBMI). The fourth byte of a lane repeats the third and is
// never read: codes sit at shifts 0..21.
inline u32x16 units16(const uint8_t* p) {
  u8x64 raw;
  std::memcpy(&raw, p, sizeof raw);
  const u8x64 idx = {0,  1,  2,  2,  3,  4,  5,  5,  6,  7,  8,  8,  9,  10, 11, 11, 12, 13, 14, 14, 15, 16,
                     17, 17, 18, 19, 20, 20, 21, 22, 23, 23, 24, 25, 26, 26, 27, 28, 29, 29, 30, 31, 32, 32,
                     33, 34, 35, 35, 36, 37, 38, 38, 39, 40, 41, 41, 42, 43, 44, 44, 45, 46, 47, 47};
  return reinterpret_cast<u32x16>(__builtin_shuffle(raw, idx));
}

// Scales and zeros of row n as fp32: sz[0, G) scales, sz[G, 2G) zeros.
void load_affine(const LowbitProblem& p, int64_t n, float* sz) {
  for (int64_t g = 0; g < p.G; ++g) {
    sz[g] = load_as_float(p.scale, p.scale_dtype, n * p.G + g);
    sz[p.G + g] = load_as_float(p.zero, p.scale_dtype, n * p.G + g);
  }
}

// Groups [g0, g1) of a row (phase order) dequantised into w, from w[0].
void decode_row_phase3(const uint8_t* rb, int64_t row_bytes, int64_t g0, int64_t g1, int64_t g, const float* s,
                       const float* z, float* w) {
  const int64_t units = g / 8;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const int64_t offset = grp * units * 3;
    const uint8_t* gb = rb + offset;
    float* wg = w + (grp - g0) * g;
    const float sc = s[grp], ze = z[grp];
    int64_t u = 0;
    for (; u + 16 <= units && offset + 3 * u + 64 <= row_bytes; u += 16) {
      const u32x16 wv = units16(gb + 3 * u);
      for (int ph = 0; ph < 8; ++ph) {
        const f32x16 v = __builtin_convertvector((wv >> (3 * ph)) & 7u, f32x16) * sc + ze;
        std::memcpy(wg + ph * units + u, &v, sizeof v);
      }
    }
    for (; u < units; ++u) {
      const uint32_t v = load_unit3(gb + 3 * u);
      for (int ph = 0; ph < 8; ++ph) wg[ph * units + u] = static_cast<float>((v >> (3 * ph)) & 7u) * sc + ze;
    }
  }
}

template <int B>
void decode_row_phase(const uint8_t* rb, int64_t g0, int64_t g1, int64_t g, const float* s, const float* z, float* w) {
  constexpr int cpb = 8 / B;
  constexpr unsigned mask = (1u << B) - 1;
  const int64_t per_phase = g / cpb;
  const int64_t vec_end = per_phase / 16 * 16;
  for (int64_t grp = g0; grp < g1; ++grp) {
    const uint8_t* gb = rb + grp * per_phase;
    float* wg = w + (grp - g0) * g;
    const float sc = s[grp], ze = z[grp];
    for (int64_t j = 0; j < vec_end; j += 16) {
      const u32x16 wv = widen16(gb + j);
      for (int ph = 0; ph < cpb; ++ph) {
        const f32x16 v = __builtin_convertvector((wv >> (ph * B)) & mask, f32x16) * sc + ze;
        std::memcpy(wg + ph * per_phase + j, &v, sizeof v);
      }
    }
    for (int64_t j = vec_end; j < per_phase; ++j)
      for (int ph = 0; ph < cpb; ++ph) wg[ph * per_phase + j] = static_cast<float>((gb[j] >> (ph * B)) & mask) * sc + ze;
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
  switch (p.phased ? p.bits : 0) {
    case 2: decode_row_phase<2>(rb, g0, g1, p.group_size, s, z, w); break;
    case 3: decode_row_phase3(rb, p.row_bytes, g0, g1, p.group_size, s, z, w); break;
    case 4: decode_row_phase<4>(rb, g0, g1, p.group_size, s, z, w); break;
    case 8: decode_row_phase<8>(rb, g0, g1, p.group_size, s, z, w); break;
    default: decode_row_natural(rb, p.K, p.bits, p.group_size, s, z, qbuf, w);
  }
}

// Row n of W, dequantised in decode order into w[K].
void decode_row(const LowbitProblem& p, int64_t n, float* sz, uint8_t* qbuf, float* w) {
  load_affine(p, n, sz);
  decode_groups(p, n, 0, p.G, sz, qbuf, w);
}

// Few activation rows, phase layout: codes straight into the FMAs, one group at a time.
template <int B, int MB>
void fused_rows(const uint8_t* rb, int64_t K, int64_t g, const float* s, const float* z, const float* xp,
                const float* xsum, int64_t G, float* acc) {
  constexpr int cpb = 8 / B;
  constexpr uint32_t mask = (1u << B) - 1;
  const int64_t per_phase = g / cpb;
  const int64_t vec_end = per_phase / 16 * 16;
  f32x16 yv[MB];
  float ys[MB];
  for (int m = 0; m < MB; ++m) {
    yv[m] = f32x16{};
    ys[m] = 0.f;
  }
  for (int64_t grp = 0; grp < G; ++grp) {
    const uint8_t* gb = rb + grp * per_phase;
    const float* xg = xp + grp * g;
    f32x16 dv[MB];
    for (int m = 0; m < MB; ++m) dv[m] = f32x16{};
    for (int64_t j = 0; j < vec_end; j += 16) {
      const u32x16 wv = widen16(gb + j);
      for (int ph = 0; ph < cpb; ++ph) {
        const f32x16 q = __builtin_convertvector((wv >> (ph * B)) & mask, f32x16);
        for (int m = 0; m < MB; ++m) dv[m] = q * load<f32x16>(xg + m * K + ph * per_phase + j) + dv[m];
      }
    }
    float dt[MB];
    for (int m = 0; m < MB; ++m) dt[m] = 0.f;
    for (int64_t j = vec_end; j < per_phase; ++j)
      for (int ph = 0; ph < cpb; ++ph) {
        const float q = static_cast<float>((gb[j] >> (ph * B)) & mask);
        for (int m = 0; m < MB; ++m) dt[m] = q * xg[m * K + ph * per_phase + j] + dt[m];
      }
    for (int m = 0; m < MB; ++m) {
      yv[m] = s[grp] * dv[m] + yv[m];
      ys[m] += s[grp] * dt[m] + z[grp] * xsum[m * G + grp];
    }
  }
  for (int m = 0; m < MB; ++m) acc[m] = hsum(yv[m]) + ys[m];
}

// fused_rows for 3 bits: sixteen units (128 codes) per vector step, units past the last
// 64 readable bytes of the row one at a time.
template <int MB>
void fused_rows3(const uint8_t* rb, int64_t row_bytes, int64_t K, int64_t g, const float* s, const float* z,
                 const float* xp, const float* xsum, int64_t G, float* acc) {
  const int64_t units = g / 8;
  f32x16 yv[MB];
  float ys[MB];
  for (int m = 0; m < MB; ++m) {
    yv[m] = f32x16{};
    ys[m] = 0.f;
  }
  for (int64_t grp = 0; grp < G; ++grp) {
    const int64_t offset = grp * units * 3;
    const uint8_t* gb = rb + offset;
    const float* xg = xp + grp * g;
    f32x16 dv[MB];
    for (int m = 0; m < MB; ++m) dv[m] = f32x16{};
    int64_t u = 0;
    for (; u + 16 <= units && offset + 3 * u + 64 <= row_bytes; u += 16) {
      const u32x16 wv = units16(gb + 3 * u);
      for (int ph = 0; ph < 8; ++ph) {
        const f32x16 q = __builtin_convertvector((wv >> (3 * ph)) & 7u, f32x16);
        for (int m = 0; m < MB; ++m) dv[m] = q * load<f32x16>(xg + m * K + ph * units + u) + dv[m];
      }
    }
    float dt[MB];
    for (int m = 0; m < MB; ++m) dt[m] = 0.f;
    for (; u < units; ++u) {
      const uint32_t v = load_unit3(gb + 3 * u);
      for (int ph = 0; ph < 8; ++ph) {
        const float q = static_cast<float>((v >> (3 * ph)) & 7u);
        for (int m = 0; m < MB; ++m) dt[m] = q * xg[m * K + ph * units + u] + dt[m];
      }
    }
    for (int m = 0; m < MB; ++m) {
      yv[m] = s[grp] * dv[m] + yv[m];
      ys[m] += s[grp] * dt[m] + z[grp] * xsum[m * G + grp];
    }
  }
  for (int m = 0; m < MB; ++m) acc[m] = hsum(yv[m]) + ys[m];
}

template <int MB>
void fused_row(const LowbitProblem& p, const float* sz, const float* xsum, int64_t n, float* acc) {
  const uint8_t* rb = p.qweight + n * p.row_bytes;
  const float *s = sz, *z = sz + p.G;
  switch (p.bits) {
    case 2: fused_rows<2, MB>(rb, p.K, p.group_size, s, z, p.x32, xsum, p.G, acc); break;
    case 3: fused_rows3<MB>(rb, p.row_bytes, p.K, p.group_size, s, z, p.x32, xsum, p.G, acc); break;
    case 4: fused_rows<4, MB>(rb, p.K, p.group_size, s, z, p.x32, xsum, p.G, acc); break;
    default: fused_rows<8, MB>(rb, p.K, p.group_size, s, z, p.x32, xsum, p.G, acc); break;
  }
}

// The panel is built and used a slice of whole groups, about kPanelK values, at a time: the
// slice's decoded rows, its transposed copy (16 KiB each at AVX-512) and a tile's activations
// stay in L1 from decode to the last tile. Whole 1536-long rows (a 192 KiB panel, decoded,
// transposed and read through L2) cost as much as the products at M = 16 on SmolLM2's sizes.
constexpr int64_t kPanelK = 128;
// Activation rows are taken about kPanelXBytes of them at a time (panels decoded again for each
// block): every panel reads all of the block's rows, which should come from the cache, not DRAM.
constexpr int64_t kPanelXBytes = int64_t{8} << 20;

// y[m][c] (row stride ld) = (add ? y[m][c] : 0) + sum_k x[k][m] panel[k][c], k < kc, for a tile
// of kPanelM packed activation rows x [kc][kPanelM] and the panel's kPanelN columns: the first
// `rows` rows and `cols` columns are read and written (a short tile's rows are zeros).
void panel_tile(const float* x, int64_t kc, const float* panel, float* y, int64_t ld, int64_t rows, int64_t cols,
                bool add) {
  vecf acc[kPanelM][2];
  for (int m = 0; m < kPanelM; ++m) acc[m][0] = acc[m][1] = vecf{};
  alignas(64) float t[kPanelN] = {};
  for (int64_t m = 0; add && m < rows; ++m) {
    const float* src = y + m * ld;
    if (cols < kPanelN) src = static_cast<const float*>(std::memcpy(t, src, cols * sizeof(float)));
    acc[m][0] = load<vecf>(src);
    acc[m][1] = load<vecf>(src + kVL);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const vecf p0 = load<vecf>(panel + k * kPanelN), p1 = load<vecf>(panel + k * kPanelN + kVL);
    for (int m = 0; m < kPanelM; ++m) {
      const float xv = x[k * kPanelM + m];
      acc[m][0] = p0 * xv + acc[m][0];
      acc[m][1] = p1 * xv + acc[m][1];
    }
  }
  for (int64_t m = 0; m < rows; ++m) {
    float* dst = cols == kPanelN ? y + m * ld : t;
    std::memcpy(dst, &acc[m][0], sizeof(vecf));
    std::memcpy(dst + kVL, &acc[m][1], sizeof(vecf));
    if (dst == t) std::memcpy(y + m * ld, t, cols * sizeof(float));
  }
}

// rows[r][k] (kPanelN rows of K, row stride K) into panel[k][r].
void transpose_rows(const float* rows, int64_t K, float* panel) {
  int64_t k0 = 0;
#if defined(__AVX512F__)
  // 16 x 16 blocks in registers (scalar stores took as long as the products at M = 16).
  for (; k0 + 16 <= K; k0 += 16)
    for (int h = 0; h < kPanelN; h += 16) {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = _mm512_loadu_si512(rows + (h + r) * K + k0);
      transpose16(v);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel + (k0 + j) * kPanelN + h, v[j]);
    }
#endif
  for (; k0 < K; ++k0)
    for (int r = 0; r < kPanelN; ++r) panel[k0 * kPanelN + r] = rows[r * K + k0];
}

void fp32_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.K, G = p.G, M = p.M;
  if (!fp32_packs_x(lowbit_kernels(), p.phased, M)) {
    thread_local std::vector<float> sz;
    sz.resize(2 * G);
    float acc[kFusedRows];
    for (int64_t n = n_begin; n < n_end; ++n) {
      load_affine(p, n, sz.data());
      switch (M) {
        case 1: fused_row<1>(p, sz.data(), p.xsum, n, acc); break;
        case 2: fused_row<2>(p, sz.data(), p.xsum, n, acc); break;
        case 3: fused_row<3>(p, sz.data(), p.xsum, n, acc); break;
        default: fused_row<4>(p, sz.data(), p.xsum, n, acc); break;
      }
      for (int64_t m = 0; m < M; ++m) p.y[m * p.N + n] = acc[m];
    }
    return;
  }
  // Slices of whole groups (natural layouts: the whole row, which decode_groups needs).
  const int64_t g = p.group_size, per_slice = p.phased ? std::max<int64_t>(1, kPanelK / g) : G;
  const int64_t group_bytes = g * p.bits / 8;  // a group's packed bytes (phase layouts: whole bytes)
  thread_local std::vector<float> wbuf, panel, affine;
  thread_local std::vector<uint8_t> qbuf;
  wbuf.resize(kPanelN * per_slice * g);
  panel.resize(kPanelN * per_slice * g);
  affine.resize(kPanelN * 2 * G);
  qbuf.resize(p.phased ? 0 : K);
  const int64_t block_rows = std::max<int64_t>(1, kPanelXBytes / (K * 4 * kPanelM)) * kPanelM;
  for (int64_t b0 = 0; b0 < M; b0 += block_rows)
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanelN) {
      const int64_t rows = std::min<int64_t>(kPanelN, n_end - n0);
      for (int64_t r = 0; r < rows; ++r) load_affine(p, n0 + r, affine.data() + r * 2 * G);
      for (int64_t g0 = 0; g0 < G; g0 += per_slice) {
        const int64_t g1 = std::min(G, g0 + per_slice), k0 = g0 * g, kc = (g1 - g0) * g;
        const int64_t next_bytes = (std::min(G, g1 + per_slice) - g1) * group_bytes;  // the next slice's
        // A short last panel repeats its first row: computed, never stored. Each row's next
        // slice is prefetched: kPanelN rows read side by side are more streams than the hardware
        // prefetcher follows (W8 at 4096 x 4096, M = 16, took 1.8 times W4's time without).
        for (int64_t r = 0; r < kPanelN; ++r)
          if (r < rows) {
            const uint8_t* next = p.qweight + (n0 + r) * p.row_bytes + g1 * group_bytes;
            for (int64_t b = 0; b < next_bytes; b += 64) __builtin_prefetch(next + b);
            decode_groups(p, n0 + r, g0, g1, affine.data() + r * 2 * G, qbuf.data(), wbuf.data() + r * kc);
          } else {
            std::memcpy(wbuf.data() + r * kc, wbuf.data(), kc * sizeof(float));
          }
        transpose_rows(wbuf.data(), kc, panel.data());
        for (int64_t m0 = b0; m0 < std::min(M, b0 + block_rows); m0 += kPanelM)
          panel_tile(p.x32 + (m0 * K + k0 * kPanelM), kc, panel.data(), p.y + m0 * p.N + n0, p.N,
                     std::min<int64_t>(kPanelM, M - m0), rows, g0 > 0);
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
  thread_local std::vector<float> sz, row, nat;
  thread_local std::vector<uint8_t> qbuf;
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
  static const LowbitKernels k{SK_ISA_NAME, fp32_rows, kFusedRows, kPanelM, nullptr, dequantize};
  return k;
}

}  // namespace SK_ISA_NS
}  // namespace sk
