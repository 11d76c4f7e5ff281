// Vector primitives of the decode step (see vec.h), written with GCC/Clang vector types at the
// build's register width (16 lanes AVX-512, 8 AVX2, 4 otherwise): with 16-lane vectors on AVX2
// GCC kept the accumulators of the dense rows and of attention on the stack.
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

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float fvec __attribute__((vector_size(kLanes * 4)));
constexpr int kLine = 16;                   // floats of a cache line
constexpr int kLineVecs = kLine / kLanes;   // vectors of a cache line
constexpr int kRows = 4;  // weight rows per pass: each activation load feeds four FMAs

inline fvec loadv(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A fixed tree of lane-wise halvings: a few adds instead of a chain of dependent ones (once per
// output element, which adds up when a batched step computes many rows per weight row), and the
// same order for every element.
inline float hsum(fvec v) {
  float t[kLanes];
  std::memcpy(t, &v, sizeof v);
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

float dot(const float* a, const float* b, int64_t n) {
  fvec acc0{}, acc1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    acc0 = loadv(a + i) * loadv(b + i) + acc0;
    acc1 = loadv(a + i + kLanes) * loadv(b + i + kLanes) + acc1;
  }
  for (; i + kLanes <= n; i += kLanes) acc0 = loadv(a + i) * loadv(b + i) + acc0;
  float t = hsum(acc0 + acc1);
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

// One tile of y: R weight rows x C activation rows. Every y element is summed the same way
// whatever the tile (one accumulator over K in order, then its lanes in order, then the tail),
// so a row's results do not depend on how many rows share the pass: a batched step equals each
// row's step alone, bit for bit.
//
// `next` (or null) is the first of the `R` weight rows the caller runs after this block: the
// tile prefetches columns [pf0, pf1) of each of them, one cache line per row per line it
// computes, so the next block's weights stream in while this block computes instead of
// stalling the next block's first tile on memory.
template <int R, int C>
inline void tile(const float* w, int64_t K, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n,
                 int64_t m, const float* next = nullptr, int64_t pf0 = 0, int64_t pf1 = 0) {
  const int64_t vec_end = K / kLine * kLine;
  const float* r[R];
  const float* a[C];
  for (int j = 0; j < R; ++j) r[j] = w + (n + j) * K;
  for (int c = 0; c < C; ++c) a[c] = x + (m + c) * ldx;
  fvec acc[R][C] = {};
  for (int64_t k = 0; k < vec_end; k += kLine) {
    if (next && pf0 + k < pf1)
      for (int j = 0; j < R; ++j) __builtin_prefetch(next + j * K + pf0 + k, 0, 3);
    for (int v = 0; v < kLineVecs; ++v) {
      const int64_t kv = k + v * kLanes;
      if constexpr (C == 1) {  // no weight vectors held: R accumulators, R loads, one activation
        const fvec xv = loadv(a[0] + kv);
        for (int j = 0; j < R; ++j) acc[j][0] = loadv(r[j] + kv) * xv + acc[j][0];
      } else {
        fvec wv[R];
        for (int j = 0; j < R; ++j) wv[j] = loadv(r[j] + kv);
        for (int c = 0; c < C; ++c) {
          const fvec xv = loadv(a[c] + kv);
          for (int j = 0; j < R; ++j) acc[j][c] = wv[j] * xv + acc[j][c];
        }
      }
    }
  }
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < C; ++c) {
      float t = hsum(acc[j][c]);
      for (int64_t k = vec_end; k < K; ++k) t += r[j][k] * a[c][k];
      y[(m + c) * ldy + n + j] = t;
    }
}

// Activation rows per tile: each weight load feeds C FMAs (kRows x kCols accumulators and kRows
// weight vectors must fit the vector registers: 16 + 4 of 32 zmm, 8 + 4 of 16 ymm or xmm).
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
  const int64_t share = (K + kLine * tiles - 1) / (kLine * tiles) * kLine;  // columns of `next` each tile prefetches
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

constexpr int kOutVecs = 8;  // attention output vectors summed per pass over the positions

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
    float t = hsum(acc[r]);
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
