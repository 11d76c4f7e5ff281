// Vector primitives of the decode step (see vec.h), written with GCC/Clang vector types at the
// build's register width (16 lanes AVX-512, 8 AVX2, 4 otherwise): with 16-lane vectors on AVX2
// GCC kept the accumulators of the dense rows and of attention on the stack.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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
// step of 16 rows: ~10% less CPU than without a prefetch). One row on AVX-512 and AVX2 goes row by row
// (kRowByRow).
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

// One activation row (a decode step's) on AVX-512 and AVX2 goes row_block<1> row after row, each
// weight row read whole, so the weight streams in address order, which the hardware prefetcher
// follows. Four rows at once read as four short streams it does not follow, and the next block's
// prefetch did not make up for it: SmolLM2's server half (fp32 layers) at one row, Zen 4,
// 13.6-15.0 -> 9.3-12.1 ms a step in three runs, and on the AVX2 build 13.3-14.5 -> 8.5-10.6
// (bench/results/edge_decode/s65/, s66/experiments.txt). A lone row is one chain of one FMA per
// vector, 4 cycles a cache line at 16 lanes and 8 at 8 lanes; the generic build's 4 lanes
// (16 cycles) keep the blocks of kRows.
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr bool kRowByRow = true;
#else
constexpr bool kRowByRow = false;
#endif

void f32_rows_m(const float* w, int64_t K, const float* x, int64_t ldx, int64_t M, const float* bias, float* y,
                int64_t ldy, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (!(kRowByRow && M == 1))
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

typedef int32_t ivec __attribute__((vector_size(kLanes * 4)));
constexpr int kOutVecs = 8;            // attention output vectors summed per pass over the positions
constexpr int64_t kBlockPositions = 64;  // value rows per block (16 KiB at head_dim 64): in L1 for every head

// e^x lane by lane, within about 2 ulp: 2^n e^r with n = round(x / ln 2) and |r| <= ln 2 / 2, e^r
// by its Taylor polynomial to degree 7 (remainder below 6e-9). x is clamped to [-87, 88] (e^-87
// is 1.6e-38; a softmax term that small is nothing beside its largest, which is 1); NaN stays NaN.
inline fvec exp_lanes(fvec x) {
  const fvec lo = fvec{} - 87.0f, hi = fvec{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const fvec round = fvec{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const fvec n = (x * 1.44269504f + round) - round;
  const fvec r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts: r exact
  fvec e = fvec{} + 1.0f / 5040;
  e = e * r + 1.0f / 720;
  e = e * r + 1.0f / 120;
  e = e * r + 1.0f / 24;
  e = e * r + 1.0f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  fvec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// p[0, n) = softmax(p[0, n)), with `sink` one more logit in the denominator (an attention sink:
// -inf for none) whose weight is dropped.
inline void softmax(float* p, int64_t n, float sink) {
  const int64_t vec_end = n / kLanes * kLanes;
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (vec_end) {
    fvec m = loadv(p);
    for (j = kLanes; j < vec_end; j += kLanes) {
      const fvec v = loadv(p + j);
      m = v > m ? v : m;
    }
    for (int i = 0; i < kLanes; ++i) mx = std::max(mx, m[i]);
  }
  for (; j < n; ++j) mx = std::max(mx, p[j]);
  mx = std::max(mx, sink);
  fvec acc{};
  for (j = 0; j < vec_end; j += kLanes) {
    const fvec e = exp_lanes(loadv(p + j) - mx);
    std::memcpy(p + j, &e, sizeof e);
    acc += e;
  }
  float sum = hsum(acc);
  for (; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
  sum += std::exp(sink - mx);  // 0 without a sink
  const float inv = 1.0f / sum;
  for (j = 0; j < n; ++j) p[j] *= inv;
}

// out[d0 + i] (+)= sum_j p[j] * v[j * hd + d0 + i] for i < W kLanes (add: onto out): W accumulators
// stay in registers while the positions stream past (an axpy per position loaded and stored the
// output each time).
template <int W>
inline void weighted_columns(const float* p, const float* v, int64_t n, int64_t hd, int64_t d0, float* out,
                             bool add) {
  fvec acc[W];
  for (int c = 0; c < W; ++c) acc[c] = add ? loadv(out + d0 + c * kLanes) : fvec{};
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
                          bool add, std::integer_sequence<int, W...>) {
  ((vecs == W + 1 ? weighted_columns<W + 1>(p, v, n, hd, d0, out, add) : void()), ...);
}

// out[hd] (+)= sum_j p[j] v[j] over n value rows.
inline void weighted(const float* p, const float* v, int64_t n, int64_t hd, float* out, bool add) {
  const int64_t vec_end = hd / kLanes * kLanes;
  int64_t d = 0;
  for (; d + kOutVecs * kLanes <= vec_end; d += kOutVecs * kLanes) weighted_columns<kOutVecs>(p, v, n, hd, d, out, add);
  weighted_tail(static_cast<int>((vec_end - d) / kLanes), p, v, n, hd, d, out, add,
                std::make_integer_sequence<int, kOutVecs - 1>{});
  for (d = vec_end; d < hd; ++d) {
    float t = add ? out[d] : 0.f;
    for (int64_t j = 0; j < n; ++j) t += p[j] * v[j * hd + d];
    out[d] = t;
  }
}

// Query q against key rows k0..k0 + 3 hd (R = 4) or k0 alone (R = 1): R dot products, each query
// load feeding R independent FMA chains.
template <int R>
inline void scores(const float* q, const float* k0, int64_t hd, float scale, float* p) {
  const int64_t vec_end = hd / kLanes * kLanes;
  fvec acc[R];
  for (int r = 0; r < R; ++r) acc[r] = fvec{};
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

// The query heads of one key/value head take each block of keys and values in turn while it
// is in L1: the cache's rows come from memory once, not once per query head.
void attend(const float* q, int64_t heads, const float* k, const float* v, int64_t n, int64_t hd, float scale,
            float softcap, const float* sinks, const float* slopes, float* p, float* out) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4)
    for (int64_t h = 0; h < heads; ++h) scores<4>(q + h * hd, k + j * hd, hd, scale, p + h * n + j);
  for (; j < n; ++j)
    for (int64_t h = 0; h < heads; ++h) scores<1>(q + h * hd, k + j * hd, hd, scale, p + h * n + j);
  if (softcap > 0.f)  // as the model computes it: a division, tanh, a product
    for (int64_t i = 0; i < heads * n; ++i) p[i] = std::tanh(p[i] / softcap) * softcap;
  if (slopes)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < n; ++j) p[h * n + j] += slopes[h] * static_cast<float>(j - (n - 1));
  for (int64_t h = 0; h < heads; ++h)
    softmax(p + h * n, n, sinks ? sinks[h] : -std::numeric_limits<float>::infinity());
  for (int64_t j0 = 0; j0 < n; j0 += kBlockPositions) {
    const int64_t rows = std::min(kBlockPositions, n - j0);
    for (int64_t h = 0; h < heads; ++h) weighted(p + h * n + j0, v + j0 * hd, rows, hd, out + h * hd, j0 > 0);
  }
}

}  // namespace

const DecodeVec& decode_vec() {
  static const DecodeVec v{SK_ISA_NAME, dot, f32_rows, f32_rows_m, attend};
  return v;
}

}  // namespace SK_ISA_NS
}  // namespace sk
