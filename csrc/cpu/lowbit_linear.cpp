// Low-bit GEMV / small GEMM, y = x @ dequant(W)^T, streaming the packed weights once.
// Two paths, chosen by the number of activation rows M:
// * M <= kFusedRows (GEMV and small M): each code is decoded straight into the FMAs of every
//   activation row and the group's scale/zero are applied to the group's partial sums, so
//   nothing but the packed weight, its scales and x is read.
// * M > kFusedRows: each thread dequantises a block of kRowBlock weight rows into an fp32
//   buffer (cache resident) and dots it with every activation row.
//
// For bits 2, 4 and 8 a byte holds 8/b whole codes. Within each group the codes are
// visited phase by phase (all low codes of the group's bytes, then the next codes, ...), which
// makes the decode loop a plain shift-and-mask over consecutive bytes that the compiler
// vectorises; x is permuted into the same order once per call so the dot products are
// unchanged. For 3 bits the unit is three bytes holding eight codes, with the same phase
// order over units (groups of a multiple of 128 codes). Other groups decode in natural order.
//
// Rows are handed out dynamically in chunks: on a shared machine one OpenMP thread is often
// descheduled for a whole time slice, and a static split would leave its half undone.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The 64-byte vector helpers below are internal to this file; GCC's note that their ABI
// differs without AVX-512 concerns only calls across library boundaries.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "common/half.h"
#include "cpu/bitpack.h"
#include "cpu/linear.h"

namespace sk {
namespace {

constexpr int kRowBlock = 4;   // weight rows decoded together; each x element is loaded once per block
constexpr int kFusedRows = 4;  // up to this many activation rows decode codes straight into the FMAs

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// a*b + c, fused where the target has FMA (fp-contract is off for the codec's sake).
inline f32x16 fmadd(f32x16 a, f32x16 b, f32x16 c) {
#if defined(__AVX512F__)
  return reinterpret_cast<f32x16>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                  reinterpret_cast<__m512>(c)));
#else
  return a * b + c;
#endif
}

// 16 bytes zero-extended to 16 uint32 lanes (GCC lowers the generic conversion byte by byte).
inline u32x16 widen16(const uint8_t* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<u32x16>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  u32x16 v;
  for (int i = 0; i < 16; ++i) v[i] = p[i];
  return v;
#endif
}

inline float hsum(f32x16 v) {
  float t = 0.f;
  for (int i = 0; i < 16; ++i) t += v[i];
  return t;
}

// Codes per unit of whole bytes: a byte for 2, 4 and 8 bits, three bytes for 3 bits.
inline int codes_per_unit(int bits) { return bits == 3 ? 8 : 8 / bits; }

// 3-bit groups take the phase order only when they hold whole 16-unit vector steps; smaller
// ones decode faster in natural order.
bool phase_layout(int bits, int64_t group_size) {
  if (bits == 3) return group_size % 128 == 0;
  return (bits == 2 || bits == 4 || bits == 8) && group_size % codes_per_unit(bits) == 0;
}

inline uint32_t load_unit3(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16;
}

typedef uint8_t u8x64 __attribute__((vector_size(64)));

// Sixteen 3-byte units from 64 readable bytes, one per uint32 lane (a byte shuffle; vpermb
// where the target has AVX-512 VBMI). The fourth byte of a lane repeats the third and is
// never read: codes sit at shifts 0..21.
inline u32x16 units16(const uint8_t* p) {
  u8x64 raw;
  std::memcpy(&raw, p, sizeof raw);
  const u8x64 idx = {0, 1, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11, 11, 12, 13, 14, 14, 15, 16, 17, 17, 18, 19, 20, 20, 21, 22, 23, 23, 24, 25, 26, 26, 27, 28, 29, 29, 30, 31, 32, 32, 33, 34, 35, 35, 36, 37, 38, 38, 39, 40, 41, 41, 42, 43, 44, 44, 45, 46, 47, 47};
  return reinterpret_cast<u32x16>(__builtin_shuffle(raw, idx));
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
      for (int p = 0; p < 8; ++p) {
        const f32x16 scaled = __builtin_convertvector((wv >> (3 * p)) & 7u, f32x16) * sc;
        const f32x16 v = scaled + ze;
        std::memcpy(wg + p * units + u, &v, sizeof v);
      }
    }
    for (; u < units; ++u) {
      const uint32_t v = load_unit3(gb + 3 * u);
      for (int p = 0; p < 8; ++p) {
        const float scaled = static_cast<float>((v >> (3 * p)) & 7u) * sc;
        wg[p * units + u] = scaled + ze;
      }
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
    // Explicit 16-lane steps: short phases (16 bytes for 2-bit g64) defeat the auto-vectoriser.
    for (int64_t j = 0; j < vec_end; j += 16) {
      const u32x16 wv = widen16(gb + j);
      for (int p = 0; p < cpb; ++p) {
        const f32x16 scaled = __builtin_convertvector((wv >> (p * B)) & mask, f32x16) * sc;
        const f32x16 v = scaled + ze;  // same two roundings as the reference dequantisation
        std::memcpy(wg + p * per_phase + j, &v, sizeof v);
      }
    }
    for (int64_t j = vec_end; j < per_phase; ++j)
      for (int p = 0; p < cpb; ++p) {
        const float scaled = static_cast<float>((gb[j] >> (p * B)) & mask) * sc;
        wg[p * per_phase + j] = scaled + ze;
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
#pragma omp simd
    for (int64_t j = 0; j < g; ++j) {
      const float scaled = static_cast<float>(q[j]) * sc;
      wg[j] = scaled + ze;
    }
  }
}

// Few activation rows (M <= kFusedRows) with the phase layout: decode each code straight into
// the FMAs, one group at a time, and apply the group's affine map afterwards:
// sum_k (q_k*s + z) x_k = s * sum_k q_k x_k + z * sum_k x_k. No decoded row is stored.
// Written with GCC/Clang vector types (16 lanes; the compiler splits them on narrower ISAs)
// because the auto-vectoriser gives up on this loop nest.
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
      for (int p = 0; p < cpb; ++p) {
        const f32x16 q = __builtin_convertvector((wv >> (p * B)) & mask, f32x16);
        for (int m = 0; m < MB; ++m) dv[m] = fmadd(q, load16(xg + m * K + p * per_phase + j), dv[m]);
      }
    }
    float dt[MB];
    for (int m = 0; m < MB; ++m) dt[m] = 0.f;
    for (int64_t j = vec_end; j < per_phase; ++j)
      for (int p = 0; p < cpb; ++p) {
        const float q = static_cast<float>((gb[j] >> (p * B)) & mask);
        for (int m = 0; m < MB; ++m) dt[m] = std::fma(q, xg[m * K + p * per_phase + j], dt[m]);
      }
    const f32x16 sv = f32x16{} + s[grp];
    for (int m = 0; m < MB; ++m) {
      yv[m] = fmadd(sv, dv[m], yv[m]);
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
      for (int p = 0; p < 8; ++p) {
        const f32x16 q = __builtin_convertvector((wv >> (3 * p)) & 7u, f32x16);
        for (int m = 0; m < MB; ++m) dv[m] = fmadd(q, load16(xg + m * K + p * units + u), dv[m]);
      }
    }
    float dt[MB];
    for (int m = 0; m < MB; ++m) dt[m] = 0.f;
    for (; u < units; ++u) {
      const uint32_t v = load_unit3(gb + 3 * u);
      for (int p = 0; p < 8; ++p) {
        const float q = static_cast<float>((v >> (3 * p)) & 7u);
        for (int m = 0; m < MB; ++m) dt[m] = std::fma(q, xg[m * K + p * units + u], dt[m]);
      }
    }
    const f32x16 sv = f32x16{} + s[grp];
    for (int m = 0; m < MB; ++m) {
      yv[m] = fmadd(sv, dv[m], yv[m]);
      ys[m] += s[grp] * dt[m] + z[grp] * xsum[m * G + grp];
    }
  }
  for (int m = 0; m < MB; ++m) acc[m] = hsum(yv[m]) + ys[m];
}

void fused_rows3_dispatch(int64_t mb, const uint8_t* rb, int64_t row_bytes, int64_t K, int64_t g, const float* s,
                          const float* z, const float* xp, const float* xsum, int64_t G, float* acc) {
  switch (mb) {
    case 1: fused_rows3<1>(rb, row_bytes, K, g, s, z, xp, xsum, G, acc); break;
    case 2: fused_rows3<2>(rb, row_bytes, K, g, s, z, xp, xsum, G, acc); break;
    case 3: fused_rows3<3>(rb, row_bytes, K, g, s, z, xp, xsum, G, acc); break;
    default: fused_rows3<4>(rb, row_bytes, K, g, s, z, xp, xsum, G, acc); break;
  }
}

template <int B>
void fused_rows_dispatch(int64_t mb, const uint8_t* rb, int64_t K, int64_t g, const float* s, const float* z,
                         const float* xp, const float* xsum, int64_t G, float* acc) {
  switch (mb) {
    case 1: fused_rows<B, 1>(rb, K, g, s, z, xp, xsum, G, acc); break;
    case 2: fused_rows<B, 2>(rb, K, g, s, z, xp, xsum, G, acc); break;
    case 3: fused_rows<B, 3>(rb, K, g, s, z, xp, xsum, G, acc); break;
    default: fused_rows<B, 4>(rb, K, g, s, z, xp, xsum, G, acc); break;
  }
}

}  // namespace

std::string lowbit_linear(const void* x, int dtype, int64_t M, int64_t K, const int32_t* qweight, int64_t N,
                          int64_t words, const void* scale, const void* zero, int scale_dtype, int bits,
                          int64_t group_size, const float* bias, void* y) {
  if (!(bits == 2 || bits == 3 || bits == 4 || bits == 8)) return "bits must be one of (2, 3, 4, 8)";
  if (group_size <= 0 || K % group_size) return "group_size must divide K";
  if (words * 32 < K * bits) return "qweight has too few words per row for K codes";
  const int64_t G = K / group_size;
  const bool phased = phase_layout(bits, group_size);

  // Activations to fp32, permuted into the decoded-row order.
  std::vector<float> xp(static_cast<size_t>(M * K));
  {
    std::vector<float> row(K);
    for (int64_t m = 0; m < M; ++m) {
      to_float(static_cast<const uint8_t*>(x) + m * K * dtype_size(dtype), dtype, K, row.data());
      float* dst = xp.data() + m * K;
      if (phased) {
        const int64_t cpb = codes_per_unit(bits), per_phase = group_size / cpb;
        for (int64_t g0 = 0; g0 < K; g0 += group_size)
          for (int64_t j = 0; j < per_phase; ++j)
            for (int64_t p = 0; p < cpb; ++p) dst[g0 + p * per_phase + j] = row[g0 + j * cpb + p];
      } else
        std::memcpy(dst, row.data(), static_cast<size_t>(K) * 4);
    }
  }

  auto load_row_affine = [&](int64_t n, float* sz) {
    for (int64_t grp = 0; grp < G; ++grp) {
      sz[grp] = load_as_float(scale, scale_dtype, n * G + grp);
      sz[G + grp] = load_as_float(zero, scale_dtype, n * G + grp);
    }
  };
  auto store = [&](int64_t m, int64_t n, float v) {
    if (bias) v += bias[n];
    store_from_float(y, dtype, m * N + n, v);
  };

  if (phased && M <= kFusedRows) {
    std::vector<float> xsum(static_cast<size_t>(M * G));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t grp = 0; grp < G; ++grp) {
        float t = 0.f;
        for (int64_t j = 0; j < group_size; ++j) t += xp[m * K + grp * group_size + j];
        xsum[m * G + grp] = t;
      }
#pragma omp parallel
    {
      std::vector<float> sz(static_cast<size_t>(2 * G));
      float acc[kFusedRows];
#pragma omp for schedule(dynamic, 32)
      for (int64_t n = 0; n < N; ++n) {
        load_row_affine(n, sz.data());
        const uint8_t* rb = reinterpret_cast<const uint8_t*>(qweight + n * words);
        const float *s = sz.data(), *z = sz.data() + G;
        switch (bits) {
          case 2: fused_rows_dispatch<2>(M, rb, K, group_size, s, z, xp.data(), xsum.data(), G, acc); break;
          case 3:
            fused_rows3_dispatch(M, rb, words * 4, K, group_size, s, z, xp.data(), xsum.data(), G, acc);
            break;
          case 4: fused_rows_dispatch<4>(M, rb, K, group_size, s, z, xp.data(), xsum.data(), G, acc); break;
          default: fused_rows_dispatch<8>(M, rb, K, group_size, s, z, xp.data(), xsum.data(), G, acc); break;
        }
        for (int64_t m = 0; m < M; ++m) store(m, n, acc[m]);
      }
    }
    return "";
  }

  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
#pragma omp parallel
  {
    std::vector<float> wbuf(static_cast<size_t>(kRowBlock * K), 0.0f);
    std::vector<float> sz(static_cast<size_t>(2 * G));
    std::vector<uint8_t> qbuf(phased ? 0 : K);
#pragma omp for schedule(dynamic, 8)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * kRowBlock;
      const int64_t rows = std::min<int64_t>(kRowBlock, N - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = n0 + r;
        load_row_affine(n, sz.data());
        const uint8_t* rb = reinterpret_cast<const uint8_t*>(qweight + n * words);
        float* w = wbuf.data() + r * K;
        switch (phased ? bits : 0) {
          case 2: decode_row_phase<2>(rb, K, group_size, sz.data(), sz.data() + G, w); break;
          case 3: decode_row_phase3(rb, words * 4, K, group_size, sz.data(), sz.data() + G, w); break;
          case 4: decode_row_phase<4>(rb, K, group_size, sz.data(), sz.data() + G, w); break;
          case 8: decode_row_phase<8>(rb, K, group_size, sz.data(), sz.data() + G, w); break;
          default: decode_row_natural(rb, K, bits, group_size, sz.data(), sz.data() + G, qbuf.data(), w);
        }
      }
      // In a short last block the rows past N hold stale values: computed, never stored.
      const float* w0 = wbuf.data();
      const float* w1 = w0 + K;
      const float* w2 = w1 + K;
      const float* w3 = w2 + K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xp.data() + m * K;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (int64_t k = 0; k < K; ++k) {
          const float xv = xm[k];
          s0 = std::fma(w0[k], xv, s0);
          s1 = std::fma(w1[k], xv, s1);
          s2 = std::fma(w2[k], xv, s2);
          s3 = std::fma(w3[k], xv, s3);
        }
        const float acc[kRowBlock] = {s0, s1, s2, s3};
        for (int64_t r = 0; r < rows; ++r) store(m, n0 + r, acc[r]);
      }
    }
  }
  return "";
}

}  // namespace sk
