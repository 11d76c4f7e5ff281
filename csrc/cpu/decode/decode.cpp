// The decode step of decode.h. Each layer is five thread-pool phases: Q|K|V rows, attention,
// output rows, gate|up rows with the SiLU product, down rows. A phase splits the rows of its
// projections into chunks (a low-bit chunk is one sk::lowbit_linear call on a row slice of the
// packed weight; inside a pool job that call runs inline on the claiming thread), so one
// wake-up of the pool serves all of a phase's matrices. The phases always run on the pool, not on
// torch's OpenMP team (thread_pool.h): a step's phases come back to back with no torch op between,
// and the team's workers would spin for milliseconds after each step beside the server's threads.
#include "cpu/decode/decode.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <mutex>

#include "common/half.h"
#include "cpu/decode/vec.h"
#include "cpu/int8_kernels.h"
#include "cpu/linear.h"
#include "cpu/thread_pool.h"

namespace sk {
namespace {

const DecodeVec& vec() {
#if defined(SK_HAVE_X86_ISAS)
  // Follows the low-bit kernels' choice, so set_lowbit_isa("generic") tests both.
  const std::string isa = lowbit_isa();
  if (isa.rfind("avx512", 0) == 0) return isa_avx512::decode_vec();
  if (isa == "avx2") return isa_avx2::decode_vec();
#endif
  return isa_generic::decode_vec();
}

std::string check_linear(const char* name, const DecodeLinear& l, int64_t N, int64_t K, bool head = false) {
  const std::string n = name;
  if (l.N != N || l.K != K)
    return n + " must be [" + std::to_string(N) + ", " + std::to_string(K) + "], got [" + std::to_string(l.N) +
           ", " + std::to_string(l.K) + "]";
  switch (l.kind) {
    case DecodeLinear::kLowbit:
      if (!l.qweight || !l.scale || !l.zero) return n + ": low-bit weight needs qweight, scale and zero";
      if (!(l.bits == 2 || l.bits == 3 || l.bits == 4 || l.bits == 8)) return n + ": bits must be one of (2, 3, 4, 8)";
      if (l.group_size <= 0 || K % l.group_size) return n + ": group_size must divide K";
      if (l.words * 32 < K * l.bits) return n + ": qweight has too few words per row";
      if (l.scale_dtype < kFloat32 || l.scale_dtype > kBFloat16) return n + ": scale dtype must be fp32, fp16 or bf16";
      return "";
    case DecodeLinear::kDense: return l.weight ? "" : n + ": dense weight is null";
    case DecodeLinear::kInt8:
      if (!head) return n + ": int8 weights are for the LM head only";
      if (K >= kInt8MaxK) return n + ": K is too large for exact int32 sums";
      return l.w8 && l.w8_scale ? "" : n + ": int8 weight needs w8 and w8_scale";
    default: return n + ": kind must be 0 (low-bit), 1 (dense fp32) or 2 (int8)";
  }
}

// y[m, n0:n1) of one projection for the M rows of x [M, K] (y is [M, N]) on the calling thread.
std::string linear_rows(const DecodeLinear& l, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  switch (l.kind) {
    case DecodeLinear::kLowbit: {
      // Row by row: a one-row call is what a single step makes, so a batched row equals it.
      const int64_t G = l.K / l.group_size, ss = dtype_size(l.scale_dtype);
      const float* bias = l.bias ? l.bias + n0 : nullptr;
      for (int64_t m = 0; m < M; ++m) {
        std::string e = lowbit_linear(x + m * l.K, kFloat32, 1, l.K, l.qweight + n0 * l.words, n1 - n0, l.words,
                                      static_cast<const uint8_t*>(l.scale) + n0 * G * ss,
                                      static_cast<const uint8_t*>(l.zero) + n0 * G * ss, l.scale_dtype, l.bits,
                                      l.group_size, bias, y + m * l.N + n0);
        if (!e.empty()) return e;
      }
      return "";
    }
    case DecodeLinear::kDense: vec().f32_rows_m(l.weight, l.K, x, l.K, M, l.bias, y, l.N, n0, n1); return "";
    default: return "int8 weights run only in the head";
  }
}

// Rows per chunk of a phase holding `total` rows: the whole matrix on one thread (each
// low-bit chunk prepares x once, so fewer chunks cost less), else about two chunks per thread
// in whole 32-row tiles, so a late worker delays little.
int64_t chunk_rows(int64_t total, int threads) {
  if (threads <= 1) return std::max<int64_t>(total, 1);
  const int64_t want = (total + 2 * threads - 1) / (2 * threads);
  return std::max<int64_t>(32, (want + 31) / 32 * 32);
}

struct Part {
  const DecodeLinear* l;
  const float* x;  // [M, l->K]
  float* y;        // [M, l->N]
};

// Runs the projections of one phase for M activation rows over the pool (a chunk is a range
// of weight rows for all M activation rows, so each weight is read once); `after(n0, n1)` runs
// on the same thread right after a chunk's rows [n0, n1) (parts listed together share their row
// ranges when `paired`: chunk c of every part covers the same rows, and `after` sees all of them).
std::string run_parts(const std::vector<Part>& parts, int64_t M, bool paired,
                      const std::function<void(int64_t, int64_t)>& after = nullptr) {
  const int threads = num_threads();
  struct Chunk {
    int part;
    int64_t n0, n1;
  };
  std::vector<Chunk> chunks;
  if (paired) {
    const int64_t N = parts[0].l->N, rows = chunk_rows(N, threads);
    for (int64_t n0 = 0; n0 < N; n0 += rows) chunks.push_back({-1, n0, std::min(N, n0 + rows)});
  } else {
    int64_t total = 0;
    for (const Part& p : parts) total += p.l->N;
    const int64_t rows = chunk_rows(total, threads);
    for (int i = 0; i < static_cast<int>(parts.size()); ++i) {
      const int64_t N = parts[i].l->N;
      for (int64_t n0 = 0; n0 < N; n0 += rows) chunks.push_back({i, n0, std::min(N, n0 + rows)});
    }
  }
  std::mutex mu;
  std::string err;
  parallel_for(static_cast<int64_t>(chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      for (int i = 0; i < static_cast<int>(parts.size()); ++i) {
        if (ch.part >= 0 && ch.part != i) continue;
        std::string e = linear_rows(*parts[i].l, parts[i].x, M, parts[i].y, ch.n0, ch.n1);
        if (!e.empty()) {
          std::lock_guard<std::mutex> lock(mu);
          err = e;
        }
      }
      if (after) after(ch.n0, ch.n1);
    }
  }, Team::kPool);
  return err;
}

void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  const float var = vec().dot(x, x, n) / static_cast<float>(n);
  const float inv = 1.0f / std::sqrt(var + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// LayerNorm of x [n]: (x - mean) / sqrt(var + eps) * w (+ b where b is given); the moments in
// double, so that they do not depend on the summation order.
void layer_norm(const float* x, const float* w, const float* b, float eps, int64_t n, float* out) {
  double sum = 0.0, sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const double mean = sum / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float mu = static_cast<float>(mean);
  const float inv = static_cast<float>(1.0 / std::sqrt(sq / static_cast<double>(n) + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - mu) * inv * w[i] + (b ? b[i] : 0.f);
}

// out [M, H] = each row of h normed with `norm` (an RMSNorm's weights, or with `layer` a
// LayerNorm's and its bias), or h as it is where there is no norm (families whose layers norm
// only the sublayers' outputs).
void norm_rows(const float* h, const float* norm, const float* bias, bool layer, float eps, int64_t M, int64_t H,
               float* out) {
  if (!norm) {
    std::copy_n(h, M * H, out);
    return;
  }
  for (int64_t m = 0; m < M; ++m) {
    if (layer)
      layer_norm(h + m * H, norm, bias, eps, H, out + m * H);
    else
      rms_norm(h + m * H, norm, eps, H, out + m * H);
  }
}

// h [M, H] += scale * y [M, H], each row of y RMS-normed with `norm` first where it is given.
void add_normed(float* h, float* y, const float* norm, float eps, float scale, int64_t M, int64_t H) {
  if (norm)
    for (int64_t m = 0; m < M; ++m) rms_norm(y + m * H, norm, eps, H, y + m * H);
  for (int64_t i = 0; i < M * H; ++i) h[i] += y[i] * scale;  // exact h + y at scale 1, fused or not
}

float activate(int act, float g) {
  if (act == kGeluTanh) {  // 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), as torch's gelu(approximate="tanh")
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.0f + std::tanh(inner));
  }
  if (act == kRelu2) return g > 0.f ? g * g : 0.f;
  if (act == kGelu) return 0.5f * g * (1.0f + std::erf(g * 0.7071067811865476f));
  if (act == kRelu) return g > 0.f ? g : 0.f;
  return g / (1.0f + std::exp(-g));
}

// x [heads, hd] rotated in place, rotate-half convention: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).
// Rotates the first `rot` values of each head (the rest pass as they are: partial rotary), as
// the halves (i, i + rot / 2) or with `interleaved` the pairs (2i, 2i + 1), by angle i: cos /
// sin hold rot values, the angles' twice over (the pairs read the first half).
void rotary(float* x, int64_t heads, int64_t hd, int64_t rot, const float* cos, const float* sin, bool interleaved) {
  const int64_t half = rot / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    if (interleaved) {
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * cos[i] - b * sin[i];
        v[2 * i + 1] = b * cos[i] + a * sin[i];
      }
      continue;
    }
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

// The int8 head is W8A8: the normed hidden state x is split into two int8 rows, x ~= s0 p0 +
// s1 p1 (p1 quantises the residual of p0, so x - (s0 p0 + s1 p1) is ~1/254 of one step of p0),
// and one pass of the VNNI kernels over the weight computes both dot products. Its logit A[n]
// differs from the fp32 one, L[n] = W[n] . x, by at most
//   sw[n] * (|x|_1 / 2                  each weight code is off by half a step
//            + 127 * |x - x~|_1)        each |code| <= 127 meets the activation residual
// plus fp32 rounding of both sides (K * 2^-23 * sum |w x| each, with |w| <= 127 sw[n], and a
// few ulps of A[n]). See exact_top.
struct HeadBound {
  float x_l1 = 0.f, act_err = 0.f;
  // Row n's bound is (sw[n] * spread + 4.8e-7 |A[n]|) * 1.001 (RowIntervals).
  float spread(const DecodeLinear& l) const {
    const float slack = 0.5f + 2.f * 127.f * static_cast<float>(l.K) * 1.2e-7f;
    return x_l1 * slack + 127.f * act_err;
  }
};

// Splits x [K] into xq [2, K] int8 rows with scales xs [2] and sums xsum [2] (see HeadBound);
// returns the bound's activation terms.
HeadBound split_activation(const Int8Kernels& k8, const float* x, int64_t K, int8_t* xq, float* xs, int32_t* xsum,
                           float* r) {
  HeadBound b;
  xs[0] = k8.quantize_row(x, K, xq, &xsum[0]);
  for (int64_t i = 0; i < K; ++i) r[i] = x[i] - xs[0] * static_cast<float>(xq[i]);
  xs[1] = k8.quantize_row(r, K, xq + K, &xsum[1]);
  for (int64_t i = 0; i < K; ++i) {
    b.x_l1 += std::fabs(x[i]);
    b.act_err += std::fabs(r[i] - xs[1] * static_cast<float>(xq[K + i]));
  }
  b.act_err += 1e-6f * b.x_l1;  // the residuals' own fp32 rounding
  return b;
}

// Row n's logit lies within (scale[n] * spread + 4.8e-7 |out[n]|) * 1.001 of out[n] (HeadBound),
// or is out[n] itself where scale is null (dense and low-bit heads are exact as stored). The two
// passes over the rows are functions of their own, with no call in their loops but in rare
// branches: inlined into the step, the loops kept the row index and bounds in stack slots
// (SmolLM2's server step, 49152 rows, one thread: 1.6-2.0 -> 1.53-1.65 ms).
struct RowIntervals {
  const float* out;
  const float* scale;
  float spread;
  float width(int64_t n) const { return scale ? (scale[n] * spread + 4.8e-7f * std::fabs(out[n])) * 1.001f : 0.f; }
};

// The k-th largest lower end of rows [0, N) (k <= N).
__attribute__((noinline)) float kth_lower(const RowIntervals& r, int64_t N, int64_t k) {
  std::vector<float> heap;  // min-heap of the k largest lower ends
  heap.reserve(k);
  int64_t n = 0;
  for (; n < k; ++n) heap.push_back(r.out[n] - r.width(n));
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  float floor = heap.front();
  for (; n < N; ++n) {
    const float lo = r.out[n] - r.width(n);
    if (lo > floor) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
      heap.back() = lo;
      std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      floor = heap.front();
    }
  }
  return floor;
}

// Rows whose upper end reaches `floor`.
__attribute__((noinline)) std::vector<int64_t> rows_reaching(const RowIntervals& r, int64_t N, float floor) {
  std::vector<int64_t> rows;
  for (int64_t n = 0; n < N; ++n)
    if (r.out[n] + r.width(n) >= floor) rows.push_back(n);
  return rows;
}

// The k rows of largest fp32 logit (ties: lower row first), from approximate logits `out`
// [N] within bound of the fp32 ones. Every row whose upper bound reaches the k-th largest
// lower bound is a candidate (the true top k are among them); candidates of an int8 head are
// recomputed from the fp32 weight, so their logits in `out` become exact. Writes ids/vals [k].
void exact_top(const DecodeLinear& l, const HeadBound& bound, const float* x, float* out, int64_t k, int64_t* ids,
               float* vals) {
  const RowIntervals r{out, l.kind == DecodeLinear::kInt8 ? l.w8_scale : nullptr, bound.spread(l)};
  std::vector<int64_t> cand = rows_reaching(r, l.N, kth_lower(r, l.N, k));
  if (l.kind == DecodeLinear::kInt8 && l.weight)
    for (int64_t n : cand) vec().f32_rows(l.weight, l.K, x, l.bias, out, n, n + 1);
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(),
                    [&](int64_t a, int64_t b) { return out[a] > out[b] || (out[a] == out[b] && a < b); });
  for (int64_t i = 0; i < k; ++i) {
    ids[i] = cand[i];
    if (vals) vals[i] = out[cand[i]];
  }
}

struct Scratch {
  std::vector<float> xn, q, k, v, attn, tmp, gate, up, head2, resid, expert, qkv, xm;
  std::vector<int8_t> xq;
};

// out [M, hidden] = the MLP of each row of x [M, hidden]: down(act(gate x) * up x), or
// down(act(up x)) without a gate (the width is up's rows).
std::string mlp(const DecodeShape& s, const DecodeLinear& gate_l, const DecodeLinear& up_l, const DecodeLinear& down_l,
                const float* x, int64_t M, float* out, Scratch& t) {
  const int64_t I = up_l.N;
  if (static_cast<int64_t>(t.gate.size()) < M * I) t.gate.resize(M * I);
  if (static_cast<int64_t>(t.up.size()) < M * I) t.up.resize(M * I);
  float* gate = t.gate.data();
  float* up = t.up.data();
  std::string err;
  if (s.gated)
    err = run_parts({{&gate_l, x, gate}, {&up_l, x, up}}, M, true, [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = m * I + n0; i < m * I + n1; ++i) gate[i] = activate(s.act, gate[i]) * up[i];
    });
  else
    err = run_parts({{&up_l, x, up}}, M, true, [&](int64_t n0, int64_t n1) {
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = m * I + n0; i < m * I + n1; ++i) up[i] = activate(s.act, up[i]);
    });
  if (!err.empty()) return err;
  return run_parts({{&down_l, s.gated ? gate : up, out}}, M, false);
}

// y [N] = x [K] @ w [K, N] (+ bias [N]) of an input-major fp32 weight, its columns split over the
// pool's threads (each row's slice of them read in turn).
void input_major_rows(const float* w, const float* x, int64_t K, int64_t N, const float* bias, float* y) {
  const int64_t cols = std::max<int64_t>(64, (N / num_threads() + 15) / 16 * 16);
  parallel_for((N + cols - 1) / cols, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * cols, n1 = std::min(N, c1 * cols);
    for (int64_t n = n0; n < n1; ++n) y[n] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float xk = x[k], *row = w + k * N;
      for (int64_t n = n0; n < n1; ++n) y[n] += xk * row[n];
    }
    if (bias)
      for (int64_t n = n0; n < n1; ++n) y[n] += bias[n];
  }, Team::kPool);
}

// y [hidden] = expert e of input-major experts on x [hidden] (see DecodeMoE).
void input_major_expert(const DecodeShape& s, const DecodeMoE& x, int64_t e, const float* xm, float* y, Scratch& t) {
  const int64_t H = s.hidden, F = x.expert_dim;
  t.gate.resize(std::max<size_t>(t.gate.size(), 2 * F));
  t.up.resize(std::max<size_t>(t.up.size(), F));
  float *gu = t.gate.data(), *a = t.up.data();
  input_major_rows(x.gate_up + e * H * 2 * F, xm, H, 2 * F, x.gate_up_bias ? x.gate_up_bias + e * 2 * F : nullptr,
                   gu);
  for (int64_t i = 0; i < F; ++i) {
    float g = x.alternate ? gu[2 * i] : gu[i], u = x.alternate ? gu[2 * i + 1] : gu[F + i];
    if (x.swiglu_limit > 0.f) {
      g = std::min(g, x.swiglu_limit), u = std::clamp(u, -x.swiglu_limit, x.swiglu_limit);
      a[i] = (u + 1.f) * (g / (1.f + std::exp(-x.swiglu_alpha * g)));
    } else {
      a[i] = activate(s.act, g) * u;
    }
  }
  input_major_rows(x.down + e * F * H, a, F, H, x.down_bias ? x.down_bias + e * H : nullptr, y);
}

// t.tmp [M, hidden] = the mixture of experts of each row of in [M, hidden] (see DecodeMoE): the
// chosen experts' outputs added in ascending expert order, as the models' forwards add them.
std::string mixture(const DecodeShape& s, const DecodeMoE& x, const float* in, int64_t M, Scratch& t) {
  const int64_t H = s.hidden, E = x.experts, F = x.expert_dim;
  std::vector<float> prob(E), choice(E);
  std::vector<int64_t> order(E), ranked(x.groups);
  t.expert.resize(H);
  float* y = t.expert.data();
  DecodeLinear gate, up, down;  // one expert's slices of the 3-D weights
  gate.N = up.N = F, gate.K = up.K = H, down.N = H, down.K = F;
  std::string err;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = in + m * H;
    float* out = t.tmp.data() + m * H;
    std::fill_n(out, H, 0.f);
    float top = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t e = 0; e < E; ++e)
      top = std::max(top, prob[e] = vec().dot(x.router + e * H, xm, H) + (x.router_bias ? x.router_bias[e] : 0.f));
    if (x.choose_by_logit) choice = prob;
    if (x.sigmoid) {
      for (int64_t e = 0; e < E; ++e) prob[e] = 1.f / (1.f + std::exp(-prob[e]));
    } else {
      for (int64_t e = 0; e < E; ++e) sum += prob[e] = std::exp(prob[e] - top);
      for (int64_t e = 0; e < E; ++e) prob[e] /= sum;
    }
    for (int64_t e = 0; e < E; ++e)
      choice[e] = (x.choose_by_logit ? choice[e] : prob[e]) + (x.choice_bias ? x.choice_bias[e] : 0.f);
    if (x.groups > 1) {  // only the experts of the top_groups best groups stay eligible
      const int64_t per = E / x.groups;
      std::vector<float> group(x.groups);
      for (int64_t g = 0; g < x.groups; ++g) {
        float* c = choice.data() + g * per;
        float best = -std::numeric_limits<float>::infinity(), second = best;
        for (int64_t i = 0; i < per; ++i) {
          if (c[i] > best) second = best, best = c[i];
          else if (c[i] > second) second = c[i];
        }
        group[g] = best + second;
      }
      for (int64_t g = 0; g < x.groups; ++g) ranked[g] = g;
      std::partial_sort(ranked.begin(), ranked.begin() + x.top_groups, ranked.end(),
                        [&](int64_t a, int64_t b) { return group[a] > group[b] || (group[a] == group[b] && a < b); });
      std::vector<char> keep(x.groups, 0);
      for (int64_t j = 0; j < x.top_groups; ++j) keep[ranked[j]] = 1;
      for (int64_t e = 0; e < E; ++e)
        if (!keep[e / per]) choice[e] = -std::numeric_limits<float>::infinity();
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + x.top_k, order.end(),
                      [&](int64_t a, int64_t b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); });
    float chosen = 0.f;
    for (int64_t j = 0; j < x.top_k; ++j) chosen += prob[order[j]];
    std::sort(order.begin(), order.begin() + x.top_k);
    for (int64_t j = 0; j < x.top_k; ++j) {
      const int64_t e = order[j];
      const float w = (x.renormalize ? prob[e] / chosen : prob[e]) * x.routed_scale;
      if (x.input_major) {
        input_major_expert(s, x, e, xm, y, t);
      } else {
        gate.weight = x.gate_up + e * 2 * F * H, up.weight = gate.weight + F * H, down.weight = x.down + e * H * F;
        if (!(err = mlp(s, gate, up, down, xm, 1, y, t)).empty()) return err;
      }
      for (int64_t i = 0; i < H; ++i) out[i] += y[i] * w;
    }
    if (x.shared_up.N) {
      if (!(err = mlp(s, x.shared_gate, x.shared_up, x.shared_down, xm, 1, y, t)).empty()) return err;
      const float scale = x.shared_scale ? 1.f / (1.f + std::exp(-vec().dot(x.shared_scale, xm, H))) : 1.f;
      for (int64_t i = 0; i < H; ++i) out[i] += y[i] * scale;
    }
  }
  return "";
}

}  // namespace

std::string decode_isa() { return vec().name; }

std::string DecodeStack::add_layer(const DecodeLayer& l) {
  const DecodeShape& s = shape_;
  if (l.window < 0 || l.rope < 0) return "window and rope must be >= 0";
  const int64_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  std::string e;
  if (l.qkv.N) {
    if (l.q.N || l.k.N || l.v.N) return "q_proj, k_proj and v_proj must be empty beside a fused qkv";
    if (!(e = check_linear("qkv", l.qkv, qd + 2 * kvd, s.hidden)).empty()) return e;
    if (!l.qkv_rows) return "a fused qkv needs the order of its rows";
    std::vector<bool> seen(l.qkv.N, false);
    for (int64_t r = 0; r < l.qkv.N; ++r) {
      const int64_t j = l.qkv_rows[r];
      if (j < 0 || j >= l.qkv.N || seen[j]) return "qkv_rows must be a permutation of the qkv rows";
      seen[j] = true;
    }
  } else if (!(e = check_linear("q_proj", l.q, qd, s.hidden)).empty() ||
             !(e = check_linear("k_proj", l.k, kvd, s.hidden)).empty() ||
             !(e = check_linear("v_proj", l.v, kvd, s.hidden)).empty()) {
    return e;
  }
  if (!(e = check_linear("o_proj", l.o, s.hidden, qd)).empty()) return e;
  if ((l.q_norm_bias && !l.q_norm) || (l.k_norm_bias && !l.k_norm))
    return "a head norm's bias needs the norm's weights";
  if (l.head_norm_each && l.head_norm_whole) return "head norms are per head or over the whole projection, not both";
  const DecodeMoE& x = l.moe;
  if (x.experts) {
    if (!s.gated) return "a mixture of experts needs gated experts";
    if (x.experts < 1 || x.top_k < 1 || x.top_k > x.experts || x.expert_dim < 1)
      return "moe: experts, top_k (<= experts) and expert_dim must be positive";
    if (x.groups < 1 || x.experts % x.groups || (x.groups > 1 && x.experts / x.groups < 2) || x.top_groups < 1 ||
        x.top_groups > x.groups || x.top_groups * (x.experts / x.groups) < x.top_k || !std::isfinite(x.routed_scale))
      return "moe: groups must split the experts in twos or more, top_groups (<= groups) hold the top k, "
             "routed_scale finite";
    if (!x.router || !x.gate_up || !x.down) return "moe: router, gate_up and down must not be null";
    if (!x.input_major && (x.gate_up_bias || x.down_bias || x.router_bias || x.swiglu_limit != 0.f))
      return "moe: biases and the clamped SwiGLU are for input-major experts";
    if (!(std::isfinite(x.swiglu_alpha) && std::isfinite(x.swiglu_limit) && x.swiglu_limit >= 0.f))
      return "moe: swiglu_alpha must be finite and swiglu_limit finite and >= 0";
    if (x.shared_up.N) {
      const int64_t F = x.shared_up.N;
      if (!(e = check_linear("shared gate_proj", x.shared_gate, F, s.hidden)).empty() ||
          !(e = check_linear("shared up_proj", x.shared_up, F, s.hidden)).empty() ||
          !(e = check_linear("shared down_proj", x.shared_down, s.hidden, F)).empty())
        return e;
    }
  } else if ((s.gated && !(e = check_linear("gate_proj", l.gate, s.intermediate, s.hidden)).empty()) ||
             !(e = check_linear("up_proj", l.up, s.intermediate, s.hidden)).empty() ||
             !(e = check_linear("down_proj", l.down, s.hidden, s.intermediate)).empty()) {
    return e;
  }
  if (!s.gated && l.gate.N) return "gate_proj must be empty: the MLP is not gated";
  if (!s.layer_norm && (l.input_norm_bias || l.post_norm_bias || l.q_norm_bias || l.k_norm_bias))
    return "an RMSNorm has no bias";
  layers_.push_back(l);
  return "";
}

std::string DecodeStack::set_head(const float* norm, float eps, const DecodeLinear& head, const float* norm_bias) {
  if (head.N <= 0) return "head must have at least one row";
  std::string e = check_linear("lm_head", head, head.N, shape_.hidden, true);
  if (!e.empty()) return e;
  if (norm_bias && (!norm || !shape_.layer_norm)) return "only a LayerNorm has a bias";
  has_head_ = true;
  head_norm_ = norm;
  head_norm_bias_ = norm_bias;
  head_eps_ = eps;
  head_ = head;
  return "";
}

std::string DecodeStack::step(float* h, int64_t pos, float* kv, int64_t capacity, const float* cos, const float* sin,
                              float* logits, int64_t k, int64_t* ids, float* vals) const {
  return step_batch(h, 1, &pos, &kv, &capacity, &cos, &sin, logits, k, ids, vals);
}

std::string DecodeStack::step_batch(float* h, int64_t M, const int64_t* pos, float* const* kv,
                                    const int64_t* capacity, const float* const* cos, const float* const* sin,
                                    float* logits, int64_t k, int64_t* ids, float* vals) const {
  const DecodeShape& s = shape_;
  if (M < 1) return "rows must be >= 1";
  for (int64_t m = 0; m < M; ++m) {
    if (pos[m] < 0 || pos[m] >= capacity[m]) return "pos must be in [0, capacity) in every row";
    if (!layers_.empty() && (!kv[m] || !cos[m] || !sin[m])) return "kv, cos and sin must not be null";
  }
  if (has_head() && (k < 1 || k > head_.N || !ids))
    return "top k must be in [1, " + std::to_string(head_.N) + "] with an ids buffer";
  const int64_t H = s.hidden, hd = s.head_dim, qd = s.heads * hd, kvd = s.kv_heads * hd, group = s.heads / s.kv_heads;
  const int64_t rot = s.rotary_dim ? s.rotary_dim : hd;
  thread_local Scratch scratch;
  Scratch& t = scratch;  // a reference: lambdas run on pool threads must see this thread's buffers
  t.xn.resize(M * H);
  t.q.resize(M * qd);
  t.k.resize(M * kvd);
  t.v.resize(M * kvd);
  t.attn.resize(M * qd);
  t.tmp.resize(M * std::max(H, has_head() ? head_.N : 0));
  const DecodeVec& V = vec();
  int64_t context = 0;  // positions attended over all rows (decides whether attention threads)
  for (int64_t m = 0; m < M; ++m) context += pos[m] + 1;
  std::string err;

  for (size_t li = 0; li < layers_.size(); ++li) {
    const DecodeLayer& L = layers_[li];
    norm_rows(h, L.input_norm, L.input_norm_bias, s.layer_norm, L.eps, M, H, t.xn.data());
    // A parallel layer with an MLP norm of its own norms the layer's input before h changes.
    const bool mlp_norms_input = s.parallel && L.post_norm;
    if (mlp_norms_input) {
      t.xm.resize(M * H);
      norm_rows(h, L.post_norm, L.post_norm_bias, s.layer_norm, L.eps, M, H, t.xm.data());
    }
    if (L.qkv.N) {
      t.qkv.resize(M * L.qkv.N);
      if (!(err = run_parts({{&L.qkv, t.xn.data(), t.qkv.data()}}, M, false)).empty()) return err;
      for (int64_t m = 0; m < M; ++m) {
        const float* src = t.qkv.data() + m * L.qkv.N;
        float *q = t.q.data() + m * qd, *k = t.k.data() + m * kvd, *v = t.v.data() + m * kvd;
        for (int64_t r = 0; r < L.qkv.N; ++r) {
          const int64_t j = L.qkv_rows[r];
          if (j < qd)
            q[j] = src[r];
          else if (j < qd + kvd)
            k[j - qd] = src[r];
          else
            v[j - qd - kvd] = src[r];
        }
      }
    } else if (!(err = run_parts({{&L.q, t.xn.data(), t.q.data()}, {&L.k, t.xn.data(), t.k.data()},
                                  {&L.v, t.xn.data(), t.v.data()}}, M, false)).empty()) {
      return err;
    }
    for (int64_t m = 0; m < M; ++m) {
      const int64_t plane = s.kv_heads * capacity[m] * hd;  // one of K or V of one layer
      float* kc = kv[m] + static_cast<int64_t>(li) * 2 * plane;
      float* vc = kc + plane;
      float* qm = t.q.data() + m * qd;
      float* km = t.k.data() + m * kvd;
      if (s.clip_qkv > 0.f)
        for (float* x : {qm, km, t.v.data() + m * kvd})
          for (int64_t i = 0, n = x == qm ? qd : kvd; i < n; ++i) x[i] = std::clamp(x[i], -s.clip_qkv, s.clip_qkv);
      // Per head, or over the whole projection (one "head" of all the widths).
      const int64_t qn = L.head_norm_whole ? qd : hd, kn = L.head_norm_whole ? kvd : hd;
      const int64_t each = L.head_norm_each ? hd : 0;  // the weights' stride from head to head
      auto head_norm = [&](float* x, int64_t n, int64_t width, const float* w, const float* b) {
        for (int64_t g = 0; g < n / width; ++g)
          norm_rows(x + g * width, w + g * each, b ? b + g * each : nullptr, s.layer_norm, L.eps, 1, width,
                    x + g * width);
      };
      if (L.q_norm) head_norm(qm, qd, qn, L.q_norm, L.q_norm_bias);
      if (L.k_norm) head_norm(km, kvd, kn, L.k_norm, L.k_norm_bias);
      rotary(qm, s.heads, hd, rot, cos[m] + L.rope * hd, sin[m] + L.rope * hd, s.rope_interleaved);
      rotary(km, s.kv_heads, hd, rot, cos[m] + L.rope * hd, sin[m] + L.rope * hd, s.rope_interleaved);
      for (int64_t g = 0; g < s.kv_heads; ++g) {
        std::copy_n(t.k.data() + m * kvd + g * hd, hd, kc + (g * capacity[m] + pos[m]) * hd);
        std::copy_n(t.v.data() + m * kvd + g * hd, hd, vc + (g * capacity[m] + pos[m]) * hd);
      }
    }

    // Attention in units of the query heads of one key/value head (the cache's rows read once for
    // them), or of one query head where that would leave the threads too few units.
    const bool threaded = context * s.heads * hd >= (int64_t{1} << 16);  // a pool wake-up costs microseconds
    const int64_t per_unit = threaded && M * s.kv_heads < 2 * num_threads() ? 1 : group;
    const int64_t row_units = s.heads / per_unit;
    auto attention = [&](int64_t i0, int64_t i1) {
      std::vector<float> p;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t m = i / row_units, h0 = i % row_units * per_unit;
        const int64_t first = L.window ? std::max<int64_t>(0, pos[m] + 1 - L.window) : 0, n = pos[m] + 1 - first;
        const int64_t plane = s.kv_heads * capacity[m] * hd;
        const float* kh =
            kv[m] + static_cast<int64_t>(li) * 2 * plane + (h0 / group * capacity[m] + first) * hd;
        const int64_t q0 = m * qd + h0 * hd;  // a key/value head's query heads are consecutive
        p.resize(per_unit * n);
        const float q_scale =  // a scale of the queries scales their scores
            s.q_pos_period ? 1.f + s.q_pos_beta * std::log(1.f + static_cast<float>(pos[m] / s.q_pos_period)) : 1.f;
        V.attend(t.q.data() + q0, per_unit, kh, kh + plane, n, hd, s.attn_scale * q_scale, s.attn_softcap,
                 L.sinks ? L.sinks + h0 : nullptr, L.alibi ? L.alibi + h0 : nullptr, p.data(), t.attn.data() + q0);
      }
    };
    if (threaded)
      parallel_for(M * row_units, 1, attention, Team::kPool);
    else
      attention(0, M * row_units);

    if (!(err = run_parts({{&L.o, t.attn.data(), t.tmp.data()}}, M, false)).empty()) return err;
    add_normed(h, t.tmp.data(), L.attn_out_norm, L.eps, s.residual_scale, M, H);

    // A parallel layer's MLP takes the attention's normed input, still in xn, or its own (xm).
    if (!s.parallel) norm_rows(h, L.post_norm, L.post_norm_bias, s.layer_norm, L.eps, M, H, t.xn.data());
    const float* mlp_in = mlp_norms_input ? t.xm.data() : t.xn.data();
    if (L.moe.experts)
      err = mixture(s, L.moe, mlp_in, M, t);
    else
      err = mlp(s, L.gate, L.up, L.down, mlp_in, M, t.tmp.data(), t);
    if (!err.empty()) return err;
    add_normed(h, t.tmp.data(), L.mlp_out_norm, L.eps, s.residual_scale, M, H);
  }

  if (!has_head()) return "";
  norm_rows(h, head_norm_, head_norm_bias_, shape_.layer_norm, head_eps_, M, H, t.xn.data());
  const int64_t N = head_.N, rows = chunk_rows(N, num_threads());
  float* out = logits ? logits : t.tmp.data();  // [M, N]
  std::vector<HeadBound> bound(M);
  // Asked for all logits, an int8 head with its fp32 weight computes them in fp32: sampling
  // from the full distribution then sees the model's own logits.
  DecodeLinear dense = head_;
  const bool all_fp32 = logits && head_.kind == DecodeLinear::kInt8 && head_.weight;
  if (all_fp32) dense.kind = DecodeLinear::kDense;
  const DecodeLinear& head = all_fp32 ? dense : head_;
  if (head.kind == DecodeLinear::kInt8) {
    const Int8Kernels& k8 = current_int8_kernels();
    t.xq.resize(2 * M * H);
    t.resid.resize(H);
    t.head2.resize(2 * M * N);
    std::vector<float> xs(2 * M);
    std::vector<int32_t> xsum(2 * M);
    for (int64_t m = 0; m < M; ++m)
      bound[m] = split_activation(k8, t.xn.data() + m * H, H, t.xq.data() + 2 * m * H, xs.data() + 2 * m,
                                  xsum.data() + 2 * m, t.resid.data());
    // Row m's two int8 rows are activation rows 2m and 2m + 1 of one pass over the weight.
    const Int8Problem p{t.xq.data(), xsum.data(), xs.data(), head_.w8, head_.w8_scale, nullptr, 2 * M, N, H,
                        t.head2.data(), kFloat32};
    const float* y = t.head2.data();
    parallel_for((N + rows - 1) / rows, 1, [&](int64_t c0, int64_t c1) {
      const int64_t n0 = c0 * rows, n1 = std::min(N, c1 * rows);
      k8.rows(p, n0, n1);
      for (int64_t m = 0; m < M; ++m) {
        const float* y0 = y + 2 * m * N;
        for (int64_t n = n0; n < n1; ++n) out[m * N + n] = y0[n] + y0[N + n] + (head_.bias ? head_.bias[n] : 0.f);
      }
    }, Team::kPool);
  } else if (!(err = run_parts({{&head, t.xn.data(), out}}, M, false)).empty()) {
    return err;
  }
  parallel_for(M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      exact_top(head, bound[m], t.xn.data() + m * H, out + m * N, k, ids + m * k, vals ? vals + m * k : nullptr);
  }, Team::kPool);
  return "";
}

}  // namespace sk
