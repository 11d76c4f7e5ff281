// Vector primitives of the decode step (see vec.h), written with GCC/Clang vector types of 16
// lanes so that each instruction-set build uses its own register width (one zmm, two ymm or
// four xmm registers per vector).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "cpu/decode/vec.h"

#pragma GCC diagnostic ignored "-Wpsabi"  // vector helpers are internal to this file

#include "cpu/isa_build.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
constexpr int kRows = 4;  // weight rows per pass: each activation load feeds four FMAs

inline f32x16 loadf(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(f32x16 v) {
  // A fixed tree of lane-wise halvings: a few vector adds on every register width instead of a
  // chain of 16 dependent scalar adds (once per output element, which adds up when a batched
  // step computes many rows per weight row), and the same order for every element.
  f32x8 a, b;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&v) + sizeof a, sizeof b);
  const f32x8 s8 = a + b;
  f32x4 c, d;
  std::memcpy(&c, &s8, sizeof c);
  std::memcpy(&d, reinterpret_cast<const char*>(&s8) + sizeof c, sizeof d);
  const f32x4 s4 = c + d;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

float dot(const float* a, const float* b, int64_t n) {
  f32x16 acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = loadf(a + i) * loadf(b + i) + acc0;
    acc1 = loadf(a + i + 16) * loadf(b + i + 16) + acc1;
  }
  for (; i + 16 <= n; i += 16) acc0 = loadf(a + i) * loadf(b + i) + acc0;
  float t = hsum(acc0 + acc1);
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

// One tile of y: R weight rows x C activation rows. Every y element is summed the same way
// whatever the tile (one 16-lane accumulator over K in order, then its lanes in order, then
// the tail), so a row's results do not depend on how many rows share the pass: a batched step
// equals each row's step alone, bit for bit.
//
// `next` (or null) is the first of the `R` weight rows the caller runs after this block: the
// tile prefetches columns [pf0, pf1) of each of them, one cache line per row per 16 columns it
// computes, so the next block's weights stream in while this block computes instead of
// stalling the next block's first tile on memory.
template <int R, int C>
inline void tile(const float* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n,
                 int64_t m, const float* next = nullptr, int64_t pf0 = 0, int64_t pf1 = 0) {
  const int64_t vec_end = K / 16 * 16;
  const float* r[R];
  const float* a[C];
  for (int j = 0; j < R; ++j) r[j] = w + (n + j) * K;
  for (int c = 0; c < C; ++c) a[c] = x + (m + c) * ldx;
  f32x16 acc[R][C] = {};
  for (int64_t k = 0; k < vec_end; k += 16) {
    if (next && pf0 + k < pf1)
      for (int j = 0; j < R; ++j) __builtin_prefetch(next + j * K + pf0 + k, 0, 3);
    f32x16 wv[R];
    for (int j = 0; j < R; ++j) wv[j] = loadf(r[j] + k);
    for (int c = 0; c < C; ++c) {
      const f32x16 xv = loadf(a[c] + k);
      for (int j = 0; j < R; ++j) acc[j][c] = wv[j] * xv + acc[j][c];
    }
  }
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < C; ++c) {
      float t = hsum(acc[j][c]);
      for (int64_t k = vec_end; k < K; ++k) t += r[j][k] * a[c][k];
      y[(m + c) * ldy + n + j] = t;
    }
}

// Activation rows per tile: each weight load feeds C FMAs (kRows x kCols accumulators must
// fit the vector registers: 16 of 32 zmm; with ymm or xmm halves fewer).
#if defined(__AVX512F__)
constexpr int kCols = 4;
#else
constexpr int kCols = 2;
#endif

// The tiles of a block share the prefetch of the next block (`next`, null at the end), each a
// slice of its columns, so the memory traffic is spread over the block's compute (the batched
// step of 16 rows: ~10% less CPU than without a prefetch; one row ~4%).
template <int R>
void row_block(const float* w, int64_t K, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n,
               const float* next) {
  const int64_t tiles = M / kCols + M % kCols;
  const int64_t share = (K + 16 * tiles - 1) / (16 * tiles) * 16;  // columns of `next` each tile prefetches
  int64_t m = 0, pf = 0;
  for (; m + kCols <= M; m += kCols, pf += share)
    tile<R, kCols>(w, K, x, ldx, y, ldy, n, m, next, pf, std::min(K, pf + share));
  for (; m < M; ++m, pf += share) tile<R, 1>(w, K, x, ldx, y, ldy, n, m, next, pf, std::min(K, pf + share));
}

void f32_rows_m(const float* w, int64_t K, const float* x, int64_t ldx, int64_t M, const float* bias, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows)
    row_block<kRows>(w, K, x, ldx, M, y, ldy, n, n + 2 * kRows <= n1 ? w + (n + kRows) * K : nullptr);
  for (; n < n1; ++n) row_block<1>(w, K, x, ldx, M, y, ldy, n, nullptr);
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = n0; i < n1; ++i) y[m * ldy + i] += bias[i];
}

void f32_rows(const float* w, int64_t K, const float* x, const float* bias, float* y, int64_t n0, int64_t n1) {
  f32_rows_m(w, K, x, K, 1, bias, y, 0, n0, n1);
}

// The attention kernel works at the build's register width: with 16-lane vectors an AVX2 build
// kept its accumulators on the stack.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float fvec __attribute__((vector_size(kLanes * 4)));
constexpr int kOutVecs = 8;  // output vectors summed per pass over the positions

inline fvec loadv(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsumv(fvec v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// out[d0 + i] = sum_j p[j] * v[j * hd + d0 + i] for i < W kLanes: W accumulators stay in registers
// while the positions stream past (an axpy per position loaded and stored the output each time).
template <int W>
inline void weighted_columns(const float* p, const float* v, int64_t n, int64_t hd, int64_t d0, float* out) {
  fvec acc[W] = {};
  for (int64_t j = 0; j < n; ++j) {
    const fvec pj = fvec{} + p[j];
    const float* row = v + j * hd + d0;
#pragma GCC unroll 8
    for (int c = 0; c < W; ++c) acc[c] = pj * loadv(row + c * kLanes) + acc[c];
  }
  std::memcpy(out + d0, acc, sizeof acc);
}

template <int... W>
inline void weighted_tail(int vecs, const float* p, const float* v, int64_t n, int64_t hd, int64_t d0, float* out,
                          std::integer_sequence<int, W...>) {
  ((vecs == W + 1 ? weighted_columns<W + 1>(p, v, n, hd, d0, out) : void()), ...);
}

// Query q against key rows k0..k0 + 3 hd (R = 4) or k0 alone (R = 1): R dot products, each query
// load feeding R independent FMA chains.
template <int R>
inline void scores(const float* q, const float* k0, int64_t hd, float scale, float* p) {
  const int64_t vec_end = hd / kLanes * kLanes;
  fvec acc[R] = {};
  for (int64_t d = 0; d < vec_end; d += kLanes) {
    const fvec qv = loadv(q + d);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = qv * loadv(k0 + r * hd + d) + acc[r];
  }
  for (int r = 0; r < R; ++r) {
    float t = hsumv(acc[r]);
    for (int64_t d = vec_end; d < hd; ++d) t += q[d] * k0[r * hd + d];
    p[r] = t * scale;
  }
}

void attend(const float* q, const float* k, const float* v, int64_t n, int64_t hd, float scale, float* p,
            float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) scores<4>(q, k + j * hd, hd, scale, p + j);
  for (; j < n; ++j) scores<1>(q, k + j * hd, hd, scale, p + j);
  const float mx = *std::max_element(p, p + n);
  float sum = 0.f;
  for (j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
  const float inv = 1.0f / sum;
  for (j = 0; j < n; ++j) p[j] *= inv;
  const int64_t vec_end = hd / kLanes * kLanes;
  int64_t d = 0;
  for (; d + kOutVecs * kLanes <= vec_end; d += kOutVecs * kLanes) weighted_columns<kOutVecs>(p, v, n, hd, d, out);
  weighted_tail(static_cast<int>((vec_end - d) / kLanes), p, v, n, hd, d, out,
                std::make_integer_sequence<int, kOutVecs - 1>{});
  for (d = vec_end; d < hd; ++d) {
    float t = 0.f;
    for (j = 0; j < n; ++j) t += p[j] * v[j * hd + d];
    out[d] = t;
  }
}

}  // namespace

const DecodeVec& decode_vec() {
  static const DecodeVec v{SK_ISA_NAME, dot, f32_rows, f32_rows_m, attend};
  return v;
}

}  // namespace SK_ISA_NS
}  // namespace sk
