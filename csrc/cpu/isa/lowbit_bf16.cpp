// bf16-activation low-bit kernels for CPUs with AVX-512 BF16 (vdpbf16ps), compiled with the
// matching -m flags and called only when the CPU reports the feature.
//
// Codes are integers below 256, exact in bf16; vdpbf16ps forms exact products with the bf16
// activations and adds them in fp32, so each group's sum_k q_k x_k is exact up to fp32
// accumulation, and the group's scale and zero are applied afterwards:
// y = sum_g s_g * sum_k q_k x_k + sum_g z_g * sum_k x_k. Nothing is rounded but x itself.
//
// Decode: 64 packed bytes of a row are one 16-lane vector of u32 (four bytes each). vpermw
// looks up a 16-bit lane's low five bits in a 32-entry table of bf16 integers, so one shift
// and one lookup turn a lane into the pair (code of byte t, code of byte t+2): four bytes give
// 2 * (8 / bits) pairs, and the activations are laid out in that pair order
// (bf16_pair_position in lowbit_kernels.h), which needs groups of whole 64-byte chunks.
//
// Two forms:
// * few activation rows (M < kPanelMinRows): decode each row's chunk into registers and dot it
//   with every activation row (vdpbf16ps over k, horizontal sums at the end);
// * more rows: gather the same pairs for 32 weight rows into a panel (u32 element (kp, n))
//   and run an MR x 32 outer-product micro-kernel that broadcasts one activation pair per row;
//   the 32 rows' scales sit in vector lanes, so groups are scaled in registers.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/half.h"
#include "cpu/lowbit_kernels.h"

namespace sk {
namespace isa_avx512bf16 {
namespace {

constexpr int64_t kPanelMinRows = 5;
constexpr int kDotRows = kPanelMinRows - 1;
constexpr int kBlockN = 32;
constexpr int kPanelM = 6;  // 12 group sums + 12 totals + 2 panel vectors + 1 broadcast: 27 zmm

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// bf16 bits of an integer 1..255 (exact): exponent of its top bit, the next 7 bits as mantissa.
constexpr uint16_t bf16_of_small_int(int v) {
  int e = 0;
  while ((v >> (e + 1)) != 0) ++e;
  return static_cast<uint16_t>(((127 + e) << 7) | (((v << 7) >> e) & 0x7f));
}
static_assert(bf16_of_small_int(1) == 0x3f80 && bf16_of_small_int(3) == 0x4040 && bf16_of_small_int(15) == 0x4170,
              "bf16 bit patterns");

// Pair vectors of one 64-byte chunk (or 16 gathered quads): out[ph * 2 + t] holds, per u32
// lane, the bf16 codes of phase ph from bytes t and t + 2 of the lane's four bytes.
template <int B>
inline void decode_quads(__m512i v, __m512i out[2 * (8 / B)]) {
  constexpr int cpb = 8 / B;
  if constexpr (B == 8) {
    const __m512i lo8 = _mm512_set1_epi32(0xff), top = _mm512_set1_epi32(-65536);
    for (int t = 0; t < 2; ++t) {
      const __m512i c0 = _mm512_and_si512(_mm512_srli_epi32(v, 8 * t), lo8);
      const __m512i c1 = _mm512_and_si512(_mm512_srli_epi32(v, 8 * t + 16), lo8);
      // Integers below 256 are exact in bf16: the top half of their fp32 bits.
      const __m512i f0 = _mm512_castps_si512(_mm512_cvtepi32_ps(c0));
      const __m512i f1 = _mm512_castps_si512(_mm512_cvtepi32_ps(c1));
      out[t] = _mm512_or_si512(_mm512_srli_epi32(f0, 16), _mm512_and_si512(f1, top));
    }
  } else {
    // bf16 bit patterns of (i & mask) for i in 0..31: vpermw reads five index bits.
    alignas(64) static const uint16_t table[32] = {
#define SK_BF16_INT(i) static_cast<uint16_t>(((i) & ((1 << B) - 1)) == 0 ? 0 : bf16_of_small_int((i) & ((1 << B) - 1)))
        SK_BF16_INT(0),  SK_BF16_INT(1),  SK_BF16_INT(2),  SK_BF16_INT(3),  SK_BF16_INT(4),  SK_BF16_INT(5),
        SK_BF16_INT(6),  SK_BF16_INT(7),  SK_BF16_INT(8),  SK_BF16_INT(9),  SK_BF16_INT(10), SK_BF16_INT(11),
        SK_BF16_INT(12), SK_BF16_INT(13), SK_BF16_INT(14), SK_BF16_INT(15), SK_BF16_INT(16), SK_BF16_INT(17),
        SK_BF16_INT(18), SK_BF16_INT(19), SK_BF16_INT(20), SK_BF16_INT(21), SK_BF16_INT(22), SK_BF16_INT(23),
        SK_BF16_INT(24), SK_BF16_INT(25), SK_BF16_INT(26), SK_BF16_INT(27), SK_BF16_INT(28), SK_BF16_INT(29),
        SK_BF16_INT(30), SK_BF16_INT(31)};
#undef SK_BF16_INT
    const __m512i tbl = _mm512_load_si512(table);
    for (int ph = 0; ph < cpb; ++ph)
      for (int t = 0; t < 2; ++t) out[ph * 2 + t] = _mm512_permutexvar_epi16(_mm512_srli_epi32(v, 8 * t + B * ph), tbl);
  }
}

// ---- Few activation rows: decode in registers, dot over k -------------------------------
template <int B, int MR>
void dot_row(const LowbitProblem& p, const uint16_t* x16, const float* xsum, int64_t n, float* out) {
  constexpr int nv = 2 * (8 / B);
  const int64_t K = p.K, G = p.G, chunk_codes = 64 * (8 / B);
  const uint8_t* rb = p.qweight + n * p.row_bytes;
  __m512 tot[MR];
  for (int m = 0; m < MR; ++m) tot[m] = _mm512_setzero_ps();
  float zt[MR] = {};
  for (int64_t grp = 0; grp < G; ++grp) {
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k0 = grp * p.group_size; k0 < (grp + 1) * p.group_size; k0 += chunk_codes) {
      __m512i q[nv];
      decode_quads<B>(_mm512_loadu_si512(rb + k0 * B / 8), q);
      for (int v = 0; v < nv; ++v)
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm512_dpbf16_ps(acc[m], as_bh(q[v]), as_bh(_mm512_loadu_si512(x16 + m * K + k0 + 32 * v)));
    }
    const __m512 sv = _mm512_set1_ps(load_as_float(p.scale, p.scale_dtype, n * G + grp));
    const float z = load_as_float(p.zero, p.scale_dtype, n * G + grp);
    for (int m = 0; m < MR; ++m) {
      tot[m] = _mm512_fmadd_ps(acc[m], sv, tot[m]);
      zt[m] += z * xsum[m * G + grp];
    }
  }
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(tot[m]) + zt[m];
}

// Rows [n_begin, n_end) for activation rows [m0, m0 + mr), mr <= MR.
template <int B, int MR>
void dot_rows_t(const LowbitProblem& p, int64_t m0, int64_t mr, int64_t n_begin, int64_t n_end) {
  if (mr != MR) {
    if constexpr (MR > 1) dot_rows_t<B, MR - 1>(p, m0, mr, n_begin, n_end);
    return;
  }
  float out[MR];
  for (int64_t n = n_begin; n < n_end; ++n) {
    dot_row<B, MR>(p, p.x16 + m0 * p.K, p.xsum + m0 * p.G, n, out);
    for (int m = 0; m < MR; ++m) p.y[(m0 + m) * p.N + n] = out[m];
  }
}

// ---- More activation rows: panel of 32 weight rows, outer-product micro-kernel -----------
template <int B>
void build_panel(const LowbitProblem& p, int64_t n0, int64_t rows, uint32_t* panel) {
  constexpr int nv = 2 * (8 / B);
  // The 32 rows' current chunk is first copied side by side: rows of a power-of-two byte
  // stride share a few L1 sets, and gathering from them directly misses on every lane.
  alignas(64) uint8_t stage[kBlockN * 64];
  const __m512i lane_offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                  _mm512_set1_epi32(64));
  const int64_t chunks = p.K * B / 512;  // 64-byte chunks per row
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t r = 0; r < kBlockN; ++r)  // rows past the end repeat the first
      _mm512_store_si512(stage + 64 * r, _mm512_loadu_si512(p.qweight + (n0 + (r < rows ? r : 0)) * p.row_bytes + 64 * c));
    for (int quad = 0; quad < 16; ++quad)
      for (int h = 0; h < 2; ++h) {
        __m512i q[nv];
        decode_quads<B>(_mm512_i32gather_epi32(lane_offsets, stage + 16 * 64 * h + 4 * quad, 1), q);
        for (int v = 0; v < nv; ++v) _mm512_storeu_si512(panel + ((c * nv + v) * 16 + quad) * kBlockN + 16 * h, q[v]);
      }
  }
}

template <int MR>
void panel_tile(const uint32_t* panel, const uint16_t* x, const float* xsum, const float* sT, const float* zT,
                int64_t K, int64_t G, int64_t g, float* y, int64_t ldy) {
  __m512 tot[MR][2];
  for (int m = 0; m < MR; ++m) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < G; ++grp) {
    __m512 acc[MR][2];
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    for (int64_t kp = grp * g / 2; kp < (grp + 1) * g / 2; ++kp) {
      const __m512bh b0 = as_bh(_mm512_loadu_si512(panel + kp * kBlockN));
      const __m512bh b1 = as_bh(_mm512_loadu_si512(panel + kp * kBlockN + 16));
      for (int m = 0; m < MR; ++m) {
        uint32_t pair;
        std::memcpy(&pair, x + m * K + 2 * kp, 4);
        const __m512bh xb = as_bh(_mm512_set1_epi32(static_cast<int>(pair)));
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], b0, xb);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], b1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(sT + grp * kBlockN), s1 = _mm512_loadu_ps(sT + grp * kBlockN + 16);
    const __m512 z0 = _mm512_loadu_ps(zT + grp * kBlockN), z1 = _mm512_loadu_ps(zT + grp * kBlockN + 16);
    for (int m = 0; m < MR; ++m) {
      const __m512 xs = _mm512_set1_ps(xsum[m * G + grp]);
      tot[m][0] = _mm512_fmadd_ps(z0, xs, _mm512_fmadd_ps(acc[m][0], s0, tot[m][0]));
      tot[m][1] = _mm512_fmadd_ps(z1, xs, _mm512_fmadd_ps(acc[m][1], s1, tot[m][1]));
    }
  }
  for (int m = 0; m < MR; ++m) {
    _mm512_storeu_ps(y + m * ldy, tot[m][0]);
    _mm512_storeu_ps(y + m * ldy + 16, tot[m][1]);
  }
}

template <int MR>
void panel_tile_upto(int64_t mr, const uint32_t* panel, const uint16_t* x, const float* xsum, const float* sT,
                     const float* zT, int64_t K, int64_t G, int64_t g, float* y, int64_t ldy) {
  if (mr == MR) {
    panel_tile<MR>(panel, x, xsum, sT, zT, K, G, g, y, ldy);
  } else if constexpr (MR > 1) {
    panel_tile_upto<MR - 1>(mr, panel, x, xsum, sT, zT, K, G, g, y, ldy);
  }
}

void panel_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t K = p.K, G = p.G, M = p.M;
  thread_local std::vector<uint32_t> panel;
  thread_local std::vector<float> sT, zT, ybuf;
  panel.resize(K / 2 * kBlockN);
  sT.resize(G * kBlockN);
  zT.resize(G * kBlockN);
  ybuf.resize(kPanelM * kBlockN);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kBlockN) {
    const int64_t rows = std::min<int64_t>(kBlockN, n_end - n0);
    switch (p.bits) {
      case 2: build_panel<2>(p, n0, rows, panel.data()); break;
      case 4: build_panel<4>(p, n0, rows, panel.data()); break;
      default: build_panel<8>(p, n0, rows, panel.data()); break;
    }
    for (int64_t r = 0; r < kBlockN; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t n = n0 + (r < rows ? r : 0);
        sT[g * kBlockN + r] = load_as_float(p.scale, p.scale_dtype, n * G + g);
        zT[g * kBlockN + r] = load_as_float(p.zero, p.scale_dtype, n * G + g);
      }
    // Full blocks store straight into y; a short last block goes through a 32-wide buffer.
    const bool full = rows == kBlockN;
    for (int64_t m0 = 0; m0 < M; m0 += kPanelM) {
      const int64_t mr = std::min<int64_t>(kPanelM, M - m0);
      float* dst = full ? p.y + m0 * p.N + n0 : ybuf.data();
      panel_tile_upto<kPanelM>(mr, panel.data(), p.x16 + m0 * K, p.xsum + m0 * G, sT.data(), zT.data(), K, G,
                               p.group_size, dst, full ? p.N : kBlockN);
      if (!full)
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t r = 0; r < rows; ++r) p.y[(m0 + m) * p.N + n0 + r] = ybuf[m * kBlockN + r];
    }
  }
}

template <int B>
void rows_t(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.M >= kPanelMinRows)
    panel_rows(p, n_begin, n_end);
  else
    dot_rows_t<B, kDotRows>(p, 0, p.M, n_begin, n_end);
}

void run_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.bits) {
    case 2: rows_t<2>(p, n_begin, n_end); break;
    case 4: rows_t<4>(p, n_begin, n_end); break;
    default: rows_t<8>(p, n_begin, n_end); break;
  }
}

}  // namespace

LowbitRowsFn bf16_rows() { return &run_rows; }

}  // namespace isa_avx512bf16
}  // namespace sk
