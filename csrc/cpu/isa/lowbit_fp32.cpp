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
// * larger M: kTileN weight rows are dequantised into a cache-resident fp32 buffer once and
//   dotted with every activation row by a kTileM x kTileN register-blocked micro-kernel, so
//   each decoded weight is reused M times and each activation load feeds kTileN FMAs.
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

namespace sk {
namespace SK_ISA_NS {
namespace {

constexpr int kFusedRows = 4;
#if defined(__AVX512F__)
constexpr int kVL = 16;  // fp32 lanes of the micro-kernel's vectors
constexpr int kTileM = 4, kTileN = 4;
#elif defined(__AVX2__)
constexpr int kVL = 8;
constexpr int kTileM = 4, kTileN = 2;
#else
constexpr int kVL = 4;
constexpr int kTileM = 2, kTileN = 2;
#endif

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

void decode_row_phase3(const uint8_t* rb, int64_t row_bytes, int64_t K, int64_t g, const float* s, const float* z,
                       float* w) {
  const int64_t units = g / 8;
  for (int64_t grp = 0; grp < K / g; ++grp) {
    const int64_t offset = grp * units * 3;
    const uint8_t* gb = rb + offset;
    float* wg = w + grp * g;
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
void decode_row_phase(const uint8_t* rb, int64_t K, int64_t g, const float* s, const float* z, float* w) {
  constexpr int cpb = 8 / B;
  constexpr unsigned mask = (1u << B) - 1;
  const int64_t per_phase = g / cpb;
  const int64_t vec_end = per_phase / 16 * 16;
  for (int64_t grp = 0; grp < K / g; ++grp) {
    const uint8_t* gb = rb + grp * per_phase;
    float* wg = w + grp * g;
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

// Row n of W, dequantised in decode order into w[K].
void decode_row(const LowbitProblem& p, int64_t n, float* sz, uint8_t* qbuf, float* w) {
  load_affine(p, n, sz);
  const uint8_t* rb = p.qweight + n * p.row_bytes;
  const float *s = sz, *z = sz + p.G;
  switch (p.phased ? p.bits : 0) {
    case 2: decode_row_phase<2>(rb, p.K, p.group_size, s, z, w); break;
    case 3: decode_row_phase3(rb, p.row_bytes, p.K, p.group_size, s, z, w); break;
    case 4: decode_row_phase<4>(rb, p.K, p.group_size, s, z, w); break;
    case 8: decode_row_phase<8>(rb, p.K, p.group_size, s, z, w); break;
    default: decode_row_natural(rb, p.K, p.bits, p.group_size, s, z, qbuf, w);
  }
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

// out[m][r] = dot(x row m, w row r) over K for an MR x NR tile (rows kVL-aligned or not).
template <int MR, int NR>
void dot_tile(const float* x, int64_t K, const float* w, float out[kTileM][kTileN]) {
  vecf acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = vecf{};
  const int64_t vec_end = K / kVL * kVL;
  for (int64_t k = 0; k < vec_end; k += kVL) {
    vecf wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = load<vecf>(w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      const vecf xv = load<vecf>(x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = xv * wv[r] + acc[m][r];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      float t = hsum(acc[m][r]);
      for (int64_t k = vec_end; k < K; ++k) t += x[m * K + k] * w[r * K + k];
      out[m][r] = t;
    }
}

// dot_tile for the runtime row count mr <= MR.
template <int MR>
void dot_tile_upto(int64_t mr, const float* x, int64_t K, const float* w, float out[kTileM][kTileN]) {
  if (mr == MR) {
    dot_tile<MR, kTileN>(x, K, w, out);
  } else if constexpr (MR > 1) {
    dot_tile_upto<MR - 1>(mr, x, K, w, out);
  }
}

void fp32_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.K, G = p.G, M = p.M;
  thread_local std::vector<float> sz, wbuf;
  thread_local std::vector<uint8_t> qbuf;
  sz.resize(2 * G);
  if (p.phased && M <= kFusedRows) {
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
  wbuf.resize(kTileN * K);
  qbuf.resize(p.phased ? 0 : K);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileN) {
    const int64_t rows = std::min<int64_t>(kTileN, n_end - n0);
    // A short last tile repeats its first row: computed, never stored.
    for (int64_t r = 0; r < kTileN; ++r)
      if (r < rows)
        decode_row(p, n0 + r, sz.data(), qbuf.data(), wbuf.data() + r * K);
      else
        std::memcpy(wbuf.data() + r * K, wbuf.data(), K * sizeof(float));
    float out[kTileM][kTileN];
    for (int64_t m0 = 0; m0 < M; m0 += kTileM) {
      const int64_t mr = std::min<int64_t>(kTileM, M - m0);
      const float* x = p.x32 + m0 * K;
      dot_tile_upto<kTileM>(mr, x, K, wbuf.data(), out);
      for (int64_t m = 0; m < mr; ++m)
        for (int64_t r = 0; r < rows; ++r) p.y[(m0 + m) * p.N + n0 + r] = out[m][r];
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
        dst16[k] = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
      }
    }
  }
}

}  // namespace

const LowbitKernels& lowbit_kernels() {
  static const LowbitKernels k{SK_ISA_NAME, fp32_rows, kFusedRows, nullptr, dequantize};
  return k;
}

}  // namespace SK_ISA_NS
}  // namespace sk
