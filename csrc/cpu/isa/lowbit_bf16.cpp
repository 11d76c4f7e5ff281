// bf16-activation low-bit kernels for CPUs with AVX-512 BF16 (vdpbf16ps), compiled with the
// matching -m flags and called only when the CPU reports the feature.
//
// Codes are integers below 256, exact in bf16; vdpbf16ps forms exact products with the bf16
// activations and adds them in fp32, so each group's sum_k q_k x_k is exact up to fp32
// accumulation, and the group's scale and zero are applied afterwards:
// y = sum_g s_g * sum_k q_k x_k + sum_g z_g * sum_k x_k. Nothing is rounded but x itself.
//
// Decode: 64 packed bytes of 2- or 4-bit codes are one 16-lane vector of u32 (four bytes
// each); one shift and one and-or (vpternlogd, see kCodeOffset) turn a lane into the pair (code
// of byte t, code of byte t+2): four bytes give 2 * (8 / bits) pairs, and the activations are
// laid out in that pair order (bf16_position in lowbit_kernels.h). 8-bit codes are converted
// through fp32 in natural order (dot form: natural8_pairs; panel: natural8_lane_pair). 3-bit
// codes (the build with VBMI only, isa_avx512bf16vbmi) come in chunks of 128 codes (48 bytes):
// one vpermb and one shift sort the bits so that the same shift-and-mask steps apply (arrange3).
// Groups are whole chunks, or 4..32 bytes (3 bits: 16, 32 or 64 codes): then a chunk's lanes
// belong to several groups, and each lane's sum is scaled by its own group's scale (a vector of
// scales per chunk). A row's last chunk may be partial (masked loads; x is zero-padded).
//
// Two forms:
// * few activation rows (M < kBf16PanelMinRows): decode a chunk of R weight rows into
//   registers and dot it with every activation row (vdpbf16ps over k, horizontal sums at the
//   end); R rows at a time keep R * M independent accumulation chains in flight, where one
//   row's chain alone is bound by the vdpbf16ps latency. Each pair vector is decoded where it
//   is used (decode_pair), and where a chunk's activation vectors outnumber the registers the
//   pair loop runs outside the rows (see load_rows in dot_block). Where the M rows of x outgrow a
//   share of L1 (M >= 2 with long K), K is read in slices of whole groups, every weight row
//   meeting one slice of x while it stays in L1 (3 bits: larger slices; see dot_rows);
// * more rows: collect the same pairs for 64 or 32 weight rows into a panel (u32 element (kp, n);
//   8 bits: transposed as bytes, then converted through fp32, build_panel8) and run a 4 x 64 or
//   6 x 32 outer-product micro-kernel that broadcasts one activation pair per row; the rows'
//   scales sit in vector lanes, so groups are scaled in registers (see panel_rows).
// Both write the bf16 output (bias added) themselves.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "common/half.h"
#include "cpu/isa/avx512_rows.h"
#include "cpu/isa/bf16_codes.h"
#include "cpu/isa/transpose16.h"
#include "cpu/isa_build.h"
#include "cpu/lowbit_kernels.h"

namespace sk {
namespace SK_ISA_NS {
namespace {

constexpr int kDotRows = static_cast<int>(kBf16PanelMinRows) - 1;
// The dot form reads R weight rows side by side (R streams a row apart); each is prefetched
// this far ahead.
constexpr int64_t kPrefetchBytes = 512;
constexpr int kBlockN = 32, kWideBlockN = 64;  // panel columns (weight rows): see panel_rows

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

#if defined(__AVX512VBMI__)
// 3-bit codes: a chunk is 16 triples of bytes (8 codes each); in triple t, codes 8 t .. 8 t + 3
// are bits 0..11 of bytes (3 t, 3 t + 1) and codes 8 t + 4 .. 8 t + 7 bits 4..15 of bytes
// (3 t + 1, 3 t + 2). vpermb puts into u32 lane l = 2 a + p (p = 0, 1) the byte pair of parity p
// from triple 2 a (low half) and from triple 2 a + 1 (high half), so that in both halves the four
// codes sit at bit offsets 4 p + 3 j; the lanes of parity 1 are then shifted right by 4, which
// leaves code j at bit 3 j in every lane: pair vector j is one immediate shift (or rotate) and
// one and-or (vpternlogd), as in the 2/4-bit decode, with no per-lane shift counts held in
// registers. Lanes 2 a and 2 a + 1 hold codes 16 a .. 16 a + 15 (bf16_position).
inline __m512i arrange3(__m512i raw) {
  alignas(64) static constexpr auto order = [] {
    struct {
      uint8_t b[64];
    } t{};
    for (int l = 0; l < 16; ++l)
      for (int h = 0; h < 2; ++h)
        for (int i = 0; i < 2; ++i) t.b[4 * l + 2 * h + i] = static_cast<uint8_t>(3 * (l / 2 * 2 + h) + l % 2 + i);
    return t;
  }();
  const __m512i parity_shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  return _mm512_srlv_epi32(_mm512_permutexvar_epi8(_mm512_load_si512(order.b), raw), parity_shift);
}
#endif

// A chunk as decode_pair (8 bits: build_panel8) takes it: 2/4/8 bits the 64 bytes, 3 bits arranged
// (arrange3). Bytes past `bytes` (2/4/8 bits: a multiple of four, groups being whole four-byte
// lanes) read as zero and are not touched, but for a whole 3-bit chunk (48 bytes): that one is
// read with a 64-byte load where `room` (bytes from `chunk` to its row's end) allows it, arrange3
// dropping the 16 bytes past it: a masked load of every chunk made 4096 x 4096 W3 at M = 1 3x
// slower than W4 with the weights in memory on a Zen 5 (0.8 against 0.33 ms; warm 0.25 against
// 0.19; session 27).
template <int B>
inline __m512i load_chunk(const uint8_t* chunk, int64_t bytes, int64_t room) {
  static_assert(B == 8 || (B >= 2 && B <= 4), "2, 3, 4 or 8 bits");
  if constexpr (B == 3) {
#if defined(__AVX512VBMI__)
    const bool whole = bytes == 48 && room >= 64;
    return arrange3(whole ? _mm512_loadu_si512(chunk) : _mm512_maskz_loadu_epi8((1ull << bytes) - 1, chunk));
#else
    return _mm512_setzero_si512();  // not reached: only the build with VBMI takes 3-bit codes
#endif
  } else {
    const __mmask16 lm = static_cast<__mmask16>((1u << (bytes / 4)) - 1);
    return bytes >= 64 ? _mm512_loadu_si512(chunk) : _mm512_maskz_loadu_epi32(lm, chunk);
  }
}

// A compact vector of the last chunk (bf16_tail_lanes): `src` holds in each lane the chunk's u32
// lane it decodes, `counts` the shift of the pair vector it stands for (as in decode_pair; F:
// the rotate count).
template <int B, bool F>
inline __m512i decode_tail(__m512i src, __m512i counts) {
  return codes_as_bf16<B, F>(F ? _mm512_rorv_epi32(src, counts) : _mm512_srlv_epi32(src, counts));
}

// 16 pairs of 32 8-bit codes in natural order: u32 lane l holds the bf16 codes 2 l and 2 l + 1
// (vcvtne2ps2bf16 rounds nothing: codes are below 256). Bytes past `bytes` read as zero.
inline __m512i natural8_pairs(const uint8_t* src, __mmask32 bytes) {
  __m512 f[2];
  for (int i = 0; i < 2; ++i) {
    const uint8_t* part = src + 16 * i;
    const __m128i raw = bytes == ~0u ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(part))
                                     : _mm_maskz_loadu_epi8(static_cast<__mmask16>(bytes >> (16 * i)), part);
    f[i] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(raw));
  }
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[1], f[0]));
}

// The 8-bit decode of a 64-byte chunk, in natural order: pair vector v's u32 lane l holds the
// codes of bytes 32 v + 2 l and 32 v + 2 l + 1. Bytes past `bytes` read as zero.
inline void decode_natural8(const uint8_t* chunk, __mmask64 bytes, __m512i out[2]) {
  out[0] = natural8_pairs(chunk, static_cast<__mmask32>(bytes));
  out[1] = natural8_pairs(chunk + 32, static_cast<__mmask32>(bytes >> 32));
}

// ---- Few activation rows: decode in registers, dot over k -------------------------------

// How far ahead 8-bit rows' chunks are prefetched, into L2, in whole prefetch distances (the VNNI
// path's rule, isa/lowbit_vnni.cpp); other widths keep one distance ahead into L1. With the weights
// in memory 8-bit rows (twice the bytes per code) waited on them: one thread, bf16, median ms, L1
// one distance ahead / this, 4864 x 896 M = 4 0.45-0.48 / 0.35-0.41, M = 3 0.39-0.48 / 0.31-0.35,
// 1536 x 576 M = 4 0.10-0.12 / 0.10-0.11; 4096 x 4096 and 14336 x 4096 level, warm level. The same
// for 4-bit rows was 1-3% slower (bench/results/ops/s68/experiments.txt).
constexpr int64_t kMinAheadBytes8 = 8192;

// out[m * ld + r] (+)= y of weight row n0 + r for activation row m0 + m (m < MR, r < R), over
// the slice's groups, before bias: added to out where `add`, else written. Scales and zeros
// are read straight from p.scale / p.zero (a copy converted to fp32 just before would be read
// back through masked loads that wait for the stores).
template <int B, int MR, int R, bool F>
void dot_block(const LowbitProblem& p, int64_t m0, int64_t n0, const DotSlice& slice, float* out, int64_t ld, bool add) {
  constexpr int nv = kPairs<B>;
  constexpr int64_t cc = kChunkCodes<B>, cb = kChunkBytes<B>;
  const int64_t G = p.G, xs = p.x_stride, code_bytes = p.K * B / 8, gsize = p.group_size;
  const uint16_t* x = p.x16 + m0 * xs;
  const float* xsum = p.xsum + m0 * G;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = p.qweight + (n0 + r) * p.row_bytes;
  __m512 tot[R][MR];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
  // Chunk c of the R rows, loaded (2-4 bits as load_chunk gives them, 8 bits decoded: two pairs)
  // for a pair loop outside the rows, which loads each activation vector once per chunk. With
  // the rows outside, the compiler keeps a chunk's nv * MR activation vectors live across them:
  // that spilled registers where a chunk has eight pair vectors (W2, M = 4: 32 live) and where
  // a group spans chunks (its accumulators live on too); bench/results/ops/README.md, session 26.
  // Chunks of several groups with four pair vectors or fewer keep the rows outside (below).
  __m512i raw[R], q8[R][2];
  const int64_t ahead =
      B == 8 ? slice.prefetch * ((kMinAheadBytes8 + slice.prefetch - 1) / slice.prefetch) : slice.prefetch;
  constexpr _mm_hint kAheadHint = B == 8 ? _MM_HINT_T1 : _MM_HINT_T0;
  const auto load_rows = [&](int64_t c, int64_t bytes) {
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(rows[r] + cb * c + ahead), kAheadHint);
      if constexpr (B == 8)
        decode_natural8(rows[r] + 64 * c, bytes == 64 ? ~0ull : (1ull << bytes) - 1, q8[r]);
      else
        raw[r] = load_chunk<B>(rows[r] + cb * c, bytes, p.row_bytes - cb * c);
    }
  };
  // body(v, q, m, xv) for pair vector v of the loaded chunks (q[r]: row r's) and activation row
  // m's matching vector xv.
  const auto each_pair = [&](const uint16_t* xc, auto&& body) {
    for_index<nv>([&](auto vi) {
      constexpr int v = decltype(vi)::value;
      __m512bh q[R];
      for (int r = 0; r < R; ++r) {
        if constexpr (B == 8)
          q[r] = as_bh(q8[r][v]);
        else
          q[r] = as_bh(decode_pair<B, F, v>(raw[r]));
      }
      for (int m = 0; m < MR; ++m) body(vi, q, m, as_bh(_mm512_loadu_si512(xc + m * xs + 32 * v)));
    });
  };
  constexpr float off = kCodeOffset<B, F>;  // folded into the zero terms (add_zero_terms)
  if (gsize >= cc) {
    // Whole chunks per group: sum a group's chunks, then scale.
    const int64_t per_group = gsize / cc;
    for (int64_t b0 = slice.g_begin; b0 < slice.g_end; b0 += kZeroTermGroups) {
      const int64_t b1 = std::min(slice.g_end, b0 + kZeroTermGroups);
      for (int64_t grp = b0; grp < b1; ++grp) {
        __m512 acc[R][MR];
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
        for (int64_t c = grp * per_group; c < (grp + 1) * per_group; ++c) {
          load_rows(c, cb);
          each_pair(x + c * cc, [&](auto, const __m512bh* q, int m, __m512bh xv) {
            for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], q[r], xv);
          });
        }
        for (int r = 0; r < R; ++r) {
          const __m512 sv = _mm512_set1_ps(load_as_float(p.scale, p.scale_dtype, (n0 + r) * G + grp));
          for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
        }
      }
      add_zero_terms<R, MR>(tot, p, n0, xsum, off, b0, b1 - b0);
    }
  } else {
    // Several groups per chunk: each u32 lane of a pair vector holds codes of one group, and
    // its sum is scaled by that group's scale (a permuted vector of the chunk's scales). The
    // lane's group: l * (chunk codes / 16) / g for the quad and 3-bit decodes (3 bits: lanes
    // 2 a, 2 a + 1 hold codes 16 a .. 16 a + 15, and g >= 16), byte (32 v + 2 l) / gbytes for 8 bits.
    const int64_t gbytes = gsize * B / 8, per_chunk = cc / gsize, chunks = (p.K + cc - 1) / cc;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i lane_group[2];  // per pair vector (8 bits: two, by parity; else one for all)
    if constexpr (B == 8) {
      const __m128i log_gbytes = _mm_cvtsi32_si128(__builtin_ctzll(gbytes));
      lane_group[0] = _mm512_srl_epi32(_mm512_slli_epi32(lane, 1), log_gbytes);
      lane_group[1] = _mm512_srl_epi32(_mm512_add_epi32(_mm512_slli_epi32(lane, 1), _mm512_set1_epi32(32)), log_gbytes);
    } else {
      lane_group[0] = lane_group[1] = _mm512_srl_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(cc / 16))),
                                                       _mm_cvtsi32_si128(__builtin_ctzll(gsize)));
    }
    // P partial sums per (row, activation row): with few chains in flight, two halve the chain of
    // dependent vdpbf16ps per chunk; with enough, one saves the add.
    constexpr int P = R * MR >= 8 ? 1 : 2;
    const int64_t tail_lanes = bf16_tail_lanes(B, p.K);  // 16: no compact last chunk (3/4/8 bits: always)
    // Blocks of whole chunks, kZeroTermGroups groups or fewer (a chunk holds at most 16: one per
    // lane), each followed by its zero terms.
    const int64_t loop_chunks = tail_lanes < 16 ? chunks - 1 : chunks;
    const int64_t block_chunks = std::max<int64_t>(1, kZeroTermGroups / per_chunk);
    for (int64_t c0 = 0; c0 < loop_chunks; c0 += block_chunks) {
      const int64_t c1 = std::min(loop_chunks, c0 + block_chunks);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t groups = std::min<int64_t>(per_chunk, G - c * per_chunk);
        const int64_t left = std::min<int64_t>(cb, code_bytes - cb * c);
        const uint16_t* xc = x + c * cc;
        const auto scales = [&](int r) {
          return load_as_f32x16(p.scale, p.scale_dtype, (n0 + r) * G + c * per_chunk, groups);
        };
        if constexpr (nv >= 8) {
          // Eight pair vectors (W2): the pairs outside the rows (see load_rows).
          load_rows(c, left);
          __m512 a[P][R][MR];
          each_pair(xc, [&](auto vi, const __m512bh* q, int m, __m512bh xv) {
            constexpr int v = decltype(vi)::value;
            for (int r = 0; r < R; ++r)
              a[v % P][r][m] = _mm512_dpbf16_ps(v < P ? _mm512_setzero_ps() : a[v % P][r][m], q[r], xv);
          });
          for (int r = 0; r < R; ++r) {
            const __m512 sv = _mm512_permutexvar_ps(lane_group[0], scales(r));
            for (int m = 0; m < MR; ++m)
              tot[r][m] =
                  _mm512_fmadd_ps(P == 2 ? _mm512_add_ps(a[0][r][m], a[P - 1][r][m]) : a[0][r][m], sv, tot[r][m]);
          }
          continue;
        }
        // Four pair vectors or fewer: the rows outside, every pair decoded first (a chunk's nv * MR
        // activation vectors stay in registers across the rows). Unrolled by hand: left to itself
        // the compiler kept the loop, with the totals in memory (3/4/8 bits at M = 4: 5-15% slower).
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(rows[r] + cb * c + ahead), kAheadHint);
          const __m512 sc = scales(r);
          __m512i q[nv];
          if constexpr (B == 8) {
            decode_natural8(rows[r] + 64 * c, left == 64 ? ~0ull : (1ull << left) - 1, q);
            const __m512 s0 = _mm512_permutexvar_ps(lane_group[0], sc), s1 = _mm512_permutexvar_ps(lane_group[1], sc);
            for (int m = 0; m < MR; ++m) {
              const __m512 a0 =
                  _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(q[0]), as_bh(_mm512_loadu_si512(xc + m * xs)));
              const __m512 a1 =
                  _mm512_dpbf16_ps(_mm512_setzero_ps(), as_bh(q[1]), as_bh(_mm512_loadu_si512(xc + m * xs + 32)));
              tot[r][m] = _mm512_fmadd_ps(a1, s1, _mm512_fmadd_ps(a0, s0, tot[r][m]));
            }
          } else {
            const __m512i raw_r = load_chunk<B>(rows[r] + cb * c, left, p.row_bytes - cb * c);
            for_index<nv>([&](auto v) { q[v] = decode_pair<B, F, decltype(v)::value>(raw_r); });
            const __m512 sv = _mm512_permutexvar_ps(lane_group[0], sc);
            for (int m = 0; m < MR; ++m) {
              __m512 a[P];
              for (int v = 0; v < nv; ++v)
                a[v % P] = _mm512_dpbf16_ps(v < P ? _mm512_setzero_ps() : a[v % P], as_bh(q[v]),
                                            as_bh(_mm512_loadu_si512(xc + m * xs + 32 * v)));
              tot[r][m] = _mm512_fmadd_ps(P == 2 ? _mm512_add_ps(a[0], a[P - 1]) : a[0], sv, tot[r][m]);
            }
          }
        }
      }
      add_zero_terms<R, MR>(tot, p, n0, xsum, off, c0 * per_chunk, std::min(G, c1 * per_chunk) - c0 * per_chunk);
    }
    if constexpr (B == 2) {
      if (tail_lanes < 16) {
        // The compact last chunk: lane s * TL + i of compact vector j decodes lane i as pair
        // vector v = j * per + s (lanes past per * TL meet zero activations).
        const int64_t c = chunks - 1, per = std::min<int64_t>(16 / tail_lanes, nv), vectors = nv / per;
        const __m512i in_tail = _mm512_and_si512(lane, _mm512_set1_epi32(static_cast<int>(tail_lanes - 1)));
        const __m512i slot = _mm512_srl_epi32(lane, _mm_cvtsi32_si128(__builtin_ctzll(tail_lanes)));
        const __m512i tail_group = _mm512_srl_epi32(
            _mm512_mullo_epi32(in_tail, _mm512_set1_epi32(static_cast<int>(cc / 16))), _mm_cvtsi32_si128(__builtin_ctzll(gsize)));
        __m512i counts[nv];
        for (int64_t j = 0; j < vectors; ++j) {
          const __m512i v = _mm512_add_epi32(slot, _mm512_set1_epi32(static_cast<int>(j * per)));
          const __m512i shift = _mm512_add_epi32(_mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(1)), 3),
                                                 _mm512_mullo_epi32(_mm512_srli_epi32(v, 1), _mm512_set1_epi32(B)));
          counts[j] = F ? _mm512_and_si512(_mm512_sub_epi32(shift, _mm512_set1_epi32(kMantissaShift<B, F>)),
                                           _mm512_set1_epi32(31))
                        : shift;
        }
        const int64_t groups = G - c * per_chunk, left = code_bytes - cb * c;
        const uint16_t* xc = x + c * cc;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512i src =
              _mm512_permutexvar_epi32(in_tail, load_chunk<B>(rows[r] + cb * c, left, p.row_bytes - cb * c));
          const __m512 sv = _mm512_permutexvar_ps(
              tail_group, load_as_f32x16(p.scale, p.scale_dtype, (n0 + r) * G + c * per_chunk, groups));
          __m512i q[nv];
          for (int64_t j = 0; j < vectors; ++j) q[j] = decode_tail<B, F>(src, counts[j]);
#pragma GCC unroll 8
          for (int m = 0; m < MR; ++m) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t j = 0; j < vectors; ++j)
              a = _mm512_dpbf16_ps(a, as_bh(q[j]), as_bh(_mm512_loadu_si512(xc + m * xs + 32 * j)));
            tot[r][m] = _mm512_fmadd_ps(a, sv, tot[r][m]);
          }
        }
        add_zero_terms<R, MR>(tot, p, n0, xsum, off, c * per_chunk, groups);
      }
    }
  }
  write_totals<R, MR>(tot, out, ld, add);
}

// Activation bytes one K slice may hold (see sliced_rows): with room left in L1 for the weight
// stream, every x load of the slice hits L1.
constexpr int64_t kSliceBytes = 8 << 10;
constexpr int64_t kW3SliceBytes = 4 * kSliceBytes;  // 3-bit rows: see dot_rows

// Weight rows [n_begin, n_end) for activation rows [m0, m0 + MR), R rows at a time (see
// sliced_rows): K is read in slices where x outgrows kSliceBytes (3-bit codes: kW3SliceBytes)
// and groups are whole chunks (the small-group path reads every group). In 8 KiB slices, 3-bit
// rows ran 1.2-1.7x slower than whole with the weights in memory (one thread, ms: 4096 x 4096
// M = 2 0.68-0.73 -> 0.44-0.47, M = 3 0.93 -> 0.62, M = 4 1.16-1.27 -> 0.68-0.98; 11008 x 4096
// M = 2 1.24-1.38 -> 0.90-0.92), while 2-, 4- and 8-bit rows ran up to 1.6x slower whole; whole,
// 1024 x 14336 at M = 2 lost 20%, which 32 KiB slices win back (0.45-0.47 -> 0.31-0.37). The
// cause is not found (session 31: not the prefetch distance, which changed nothing).
// F: the fine decode (kCodeOffset).
template <int B, int MR, int R, bool F = false>
void dot_rows(const LowbitProblem& p, int64_t m0, int64_t n_begin, int64_t n_end) {
  const int64_t x_group_bytes = MR > 1 && p.group_size >= kChunkCodes<B> ? MR * p.group_size * 2 : 0;
  sliced_rows<MR, R, dot_block<B, MR, R, F>, dot_block<B, MR, 1, F>>(
      p, m0, n_begin, n_end, x_group_bytes, B == 3 ? kW3SliceBytes : kSliceBytes, kPrefetchBytes);
}

// One activation row meets rows from this length on one at a time: R rows a power-of-two length
// apart are R streams on the same few L1 sets, and at 4096 x 4096 (2 KiB rows, memory-bound) eight
// of them made the M = 1 call 1.7x slower than one row at a time (session 27, weights in memory,
// ms: one row 0.34-0.39, two 0.70-0.71, four 0.48, eight 0.42-0.44). Two activation rows take four
// weight rows at every length (4096 x 4096 W4 0.52-0.66 -> 0.36-0.41 ms with two rows at a time, W8
// 0.75-0.78 -> 0.51-0.54). 3-bit rows of 1.5 KiB were read one at a time as well while every 3-bit
// chunk took a masked load; with whole loads eight rows at a time are faster (W3 M = 1 0.39-0.45 ->
// 0.35 ms). Three and four activation rows (K sliced: dot_rows) take four and three long rows at
// a time, where two left the memory idle (4096 x 4096 W4 M = 3 0.67-0.75 -> 0.50-0.58 ms, M = 4
// 0.76-0.78 -> 0.66-0.70, W8 M = 4 1.1-1.2 -> 0.84-0.90, an fp32 row as three parts 0.77-0.90 ->
// 0.72-0.76), while 1 KiB rows (W2) were slower with four.
constexpr int64_t kLongRowBytes = 2048;
template <int B>
void dot_rows_m(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  // Short rows: R rows per block (accumulators: 2 * R * M zmm at most) keep the vdpbf16ps chains and
  // the per-row sums busy. How many depends on the path (dot_block): in groups of whole chunks each
  // row's loaded chunk, group sum and total stay live (3 R zmm besides the decoded pairs), so R = 6 /
  // 4 at M = 1 / 2; several groups per chunk (and W2, whose pairs run outside the rows) take 8 / 6.
  // At M = 3: four for 4-bit long rows and 8-bit whole chunks, three for short rows in groups of part
  // of a chunk (2-4 bits), else two; at M = 4: three for long rows and whole chunks (not 8-bit codes in
  // groups of 16-32), else two. Session 68 moved these to two where rows keep more vectors live (the
  // pair loop of whole-chunk groups and of W2: R x M sums beside R x M totals; 8-bit codes: two decoded
  // pairs a row) and registers spilled; one thread, bf16, median ms, before -> this: M = 4 W2 1536 x 576
  // g64 0.098 -> 0.085, 4864 x 896 0.371 -> 0.326, 4096 x 4096 1.034 -> 0.873; W8 4096 x 4096 g16 2.07-2.26
  // -> 1.88-1.95, 14336 x 4096 g32 7.49-7.77 -> 6.48-6.93; M = 3 W8 14336 x 4096 g32 6.90-6.99 ->
  // 5.88-6.15, W2 4096 x 4096 g256 0.79-0.81 -> 0.71-0.74, 11008 x 4096 g1024 2.16-2.32 -> 1.83-1.99, W3
  // (long from 1 KiB) 4096 x 4096 g128 0.91-0.94 -> 0.67, 14336 x 4096 3.47-3.53 -> 2.53-2.65, W4
  // 4864 x 896 g128 0.225-0.233 -> 0.203-0.205. Two were slower for W2 / W4 whole chunks at M = 4
  // (4096 x 4096 g256 1.03 -> 1.17), 4-bit long rows at M = 3 with the weight in memory (14336 x 4096
  // 3.41-3.53 -> 3.81-3.83: fewer streams in flight), 8-bit whole chunks (1-3%) and short rows in
  // smaller groups at M = 3 (W2 4096 x 4096 g128 0.68 -> 0.80) (bench/results/ops/s68). Against the
  // earlier 8 / 4 / 2 / 2 for every path (one
  // thread, ms, warm; session 33): 576 x 1536 W4 g128 M = 1 0.016-0.017 -> 0.010 (R = 4: 0.011), M = 3
  // 0.023-0.024 -> 0.020, M = 4 0.030-0.033 -> 0.027-0.028; 2048 x 2048 W4 M = 1 0.075-0.080 ->
  // 0.042-0.044, M = 4 0.13-0.14 -> 0.11-0.12; 4096 x 4096 W3 M = 1 0.27-0.28 -> 0.21 (R = 4: 0.24);
  // 1536 x 576 W4 g64 M = 2 0.023-0.025 -> 0.016-0.018, M = 3 0.032-0.033 -> 0.027-0.028. With the
  // weights in memory the same or faster (2048 x 2048 W4 M = 3 0.13-0.14 -> 0.11, M = 1 0.082-0.086 ->
  // 0.066-0.070, 576 x 1536 W8 M = 3 0.054-0.063 -> 0.043-0.045, 4096 x 4096 W3 M = 1 0.29-0.30 ->
  // 0.24). Fewer rows in several groups were slower at M = 1 (R = 4: 1536 x 576 W4 g64 0.016 ->
  // 0.019), and at M = 3 R = 4 equalled 3 with the weights in memory but ran 5-8% slower warm.
  // 3-bit rows of 1.5 KiB (4096 x 4096) in groups of whole chunks gained from the longer
  // blocks too at M = 3-4 (M = 3 0.93-1.37 -> 0.77-1.11 ms with the weights in memory, 0.59-0.79 ->
  // 0.53-0.69 warm); in groups of 64 they did not.
  const bool long_rows = p.row_bytes >= kLongRowBytes ||
                         (B == 3 && p.M > 2 && p.row_bytes >= 1024 && p.group_size % kChunkCodes<3> == 0);
  const bool whole = p.group_size >= kChunkCodes<B>;
  const bool small8 = B == 8 && !whole;  // 8-bit codes in groups of 16 or 32: two decoded pairs a row
  switch (p.M) {
    case 1:
      if (long_rows)
        dot_rows<B, 1, 1>(p, 0, n_begin, n_end);
      else if (whole)
        dot_rows<B, 1, 6>(p, 0, n_begin, n_end);
      else
        dot_rows<B, 1, 8>(p, 0, n_begin, n_end);
      break;
    case 2:
      whole || long_rows ? dot_rows<B, 2, 4>(p, 0, n_begin, n_end) : dot_rows<B, 2, 6>(p, 0, n_begin, n_end);
      break;
    case 3:  // also an fp32 row as three bf16 parts (p.y_parts), with the fine decode
      if (p.y_parts)
        long_rows ? dot_rows<B, 3, 4, true>(p, 0, n_begin, n_end) : dot_rows<B, 3, 2, true>(p, 0, n_begin, n_end);
      else
        (B == 4 && long_rows) || (B == 8 && whole) ? dot_rows<B, 3, 4>(p, 0, n_begin, n_end)
        : !long_rows && !whole && B != 8             ? dot_rows<B, 3, 3>(p, 0, n_begin, n_end)
                                                     : dot_rows<B, 3, 2>(p, 0, n_begin, n_end);
      break;
    default:
      (long_rows || whole) && !small8 ? dot_rows<B, kDotRows, 3>(p, 0, n_begin, n_end)
                                      : dot_rows<B, kDotRows, 2>(p, 0, n_begin, n_end);
  }
}

// ---- More activation rows: panel of 64 or 32 weight rows, outer-product micro-kernel -----
constexpr int64_t kPanelPrefetchBytes = 256;

// Byte `offset` of row `row` of the panel's block at n0 (rows past the end repeat the first); with
// `prefetch`, the row kPanelPrefetchBytes further on is prefetched into L2.
inline const uint8_t* panel_row(const LowbitProblem& p, int64_t n0, int64_t rows, int64_t row, int64_t offset,
                                bool prefetch) {
  const uint8_t* src = p.qweight + (n0 + (row < rows ? row : 0)) * p.row_bytes + offset;
  if (prefetch && offset + kPanelPrefetchBytes < p.row_bytes)
    _mm_prefetch(reinterpret_cast<const char*>(src + kPanelPrefetchBytes), _MM_HINT_T1);
  return src;
}

// Pair t (0 or 1) of each u32 lane of 8-bit codes in natural order: bytes 2 t and 2 t + 1 as
// bf16. A code's fp32 is exact with at most eight significant bits, so its low half is zero and
// its high half is its bf16: the pair is the second code's fp32 or'd with the first's shifted down.
template <int T>
inline __m512i natural8_lane_pair(__m512i v) {
  const __m512i byte = _mm512_set1_epi32(0xFF);
  const __m512i first = _mm512_and_si512(T == 0 ? v : _mm512_srli_epi32(v, 16), byte);
  const __m512i second = T == 0 ? _mm512_and_si512(_mm512_srli_epi32(v, 8), byte) : _mm512_srli_epi32(v, 24);
  return _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(first)), 16),
                         _mm512_castps_si512(_mm512_cvtepi32_ps(second)));
}

// The 8-bit panel, in natural pair order (pair kp = codes 2 kp, 2 kp + 1; bf16_position): each
// 16 rows' 64-byte chunk is transposed in registers (transpose16) as in build_panel, and each
// u32 lane of four codes becomes two pairs (natural8_lane_pair) with no further shuffles. Each
// row's chunk kPanelPrefetchBytes ahead is prefetched into L2 (into L1 the block's rows would
// evict each other). Only codes [k0, k1) (whole chunks; k1 may be K) go into the panel, from its
// start; a partial last chunk fills its 32 pairs, zeros past K.
void build_panel8(const LowbitProblem& p, int64_t n0, int64_t rows, int64_t width, int64_t k0, int64_t k1,
                  uint32_t* panel) {
  for (int64_t c = k0 / 64; c < (k1 + 63) / 64; ++c) {
    const int64_t left = std::min<int64_t>(64, p.K - 64 * c);
    uint32_t* dst = panel + (c - k0 / 64) * 32 * width;
    for (int64_t h = 0; h < width; h += 16) {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) v[r] = load_chunk<8>(panel_row(p, n0, rows, h + r, 64 * c, true), left, p.row_bytes - 64 * c);
      transpose16(v);  // v[quad] lane r: codes 4 quad .. 4 quad + 3 of row h + r
      for (int quad = 0; quad < 16; ++quad) {
        _mm512_storeu_si512(dst + 2 * quad * width + h, natural8_lane_pair<0>(v[quad]));
        _mm512_storeu_si512(dst + (2 * quad + 1) * width + h, natural8_lane_pair<1>(v[quad]));
      }
    }
  }
}

// The 2-, 3- and 4-bit panel: each 16 rows' current chunk is loaded (3 bits: arranged, arrange3)
// and transposed in registers (transpose16), which hands every quad (u32 lane) of the 16 rows to
// the decode at once; per-lane gathers from a staged copy took 1.7 times as long, and at M = 64 the
// panel was a sixth of the call. Each row's chunk kPanelPrefetchBytes ahead is prefetched into L2.
// Only codes [k0, k1) (whole chunks; k1 may be K) go into the panel, from its start.
template <int B>
void build_panel(const LowbitProblem& p, int64_t n0, int64_t rows, int64_t width, int64_t k0, int64_t k1,
                 uint32_t* panel) {
  constexpr int nv = kPairs<B>;
  constexpr int64_t cb = kChunkBytes<B>;
  const int64_t code_bytes = p.K * B / 8, c0 = k0 / kChunkCodes<B>;
  const int64_t lanes = std::min<int64_t>(16, p.group_size / (kChunkCodes<B> / 16));
  for (int64_t c = c0; c < (k1 + kChunkCodes<B> - 1) / kChunkCodes<B>; ++c) {
    const int64_t left = std::min<int64_t>(cb, code_bytes - cb * c);
    for (int64_t h = 0; h < width / 16; ++h) {
      __m512i v[16];
      for (int r = 0; r < 16; ++r) {
        const uint8_t* src = panel_row(p, n0, rows, 16 * h + r, cb * c, true);
        v[r] = load_chunk<B>(src, left, p.row_bytes - cb * c);
      }
      transpose16(v);  // v[quad] lane r: u32 lane `quad` of row 16 h + r
      for (int quad = 0; quad < 16; ++quad) {
        // Pair index of (pair vector, quad) in the panel form of bf16_position.
        const int64_t gi = quad / lanes, ql = quad % lanes;
        uint32_t* dst = panel + ((c - c0) * nv * 16 + gi * nv * lanes + ql) * width;
        for_index<nv>([&](auto j) {
          _mm512_storeu_si512(dst + j * lanes * width + 16 * h, decode_pair<B, false, decltype(j)::value>(v[quad]));
        });
      }
    }
  }
}

// Cache lines [begin, end) of the weight bytes the next panel build reads: `per_row` lines of each
// row from `first` (the first row's first byte), rows `row_bytes` apart. A tile prefetches its
// share into L2, a few lines before each group's products, so the next build's codes arrive while
// this one's products run. The build's own prefetch (256 bytes ahead in each of 32 or 64 rows)
// overlaps no products: in the bench's interleaved rounds 4096 x 4096 W4 at M = 6 took 1.8 ms
// (0.93 warm), 1.1-1.2 with this. A test per pair step cost 3-12% warm on SmolLM2's layers; per
// group, 0-4% (session 28).
struct NextLines {
  const uint8_t* first = nullptr;
  int64_t row_bytes = 0, per_row = 1, begin = 0, end = 0;
};

// Pairs of codes a group's sums run over before they join the totals (panel_tile): one fp32
// chain over a larger group rounds at the magnitude of its sum with the code offset (128 + q),
// which the zero term then cancels. bf16 rows of 3 + randn against 2-bit codes (M = 5-64, 4096 x
// 4096 in one group per row) came out 1.1e-2 from float64 as one chain, 2.0e-3 (their own
// rounding: 1.6e-3) in blocks of 256 pairs, at the same speed.
constexpr int64_t kFoldPairs = 256;

// acc[m][v] += the products of `pairs` pairs of the panel (from `panel`, NV vectors per pair) with
// activation rows m (from x, rows xs apart).
template <int MR, int NV>
__attribute__((always_inline)) inline void panel_products(const uint32_t* panel, const uint16_t* x, int64_t xs,
                                                           int64_t pairs, __m512 (&acc)[MR][NV]) {
  for (int64_t kp = 0; kp < pairs; ++kp) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = as_bh(_mm512_loadu_si512(panel + kp * NV * 16 + 16 * v));
    for (int m = 0; m < MR; ++m) {
      uint32_t pair;
      std::memcpy(&pair, x + m * xs + 2 * kp, 4);
      const __m512bh xb = as_bh(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], b[v], xb);
    }
  }
}

// The micro-kernel: MR activation rows times NV vectors of 16 panel columns, over groups
// [g0, g1) of G (the panel starting at group g0). Each group's sums are scaled in registers; the
// totals stay in registers too where they fit (NV = 2: 2 MR sums + 2 MR totals), else they are
// kept in y (NV = 4: 4 MR sums, and per group MR x NV loads, adds and stores). Per pair step NV
// panel vectors are loaded and MR pairs broadcast for MR * NV vdpbf16ps: at 4 x 4 a broadcast
// feeds four of them where 6 x 2 fed two, which measured 4-10% faster per flop on Zen 5 in groups
// of 64 or more (in groups of 32 the stores per group cost that back). With the totals in y,
// groups after the first add to them. A scaled panel (Scaled: the weights themselves, see
// scale_panel) is one group of g codes with no scale or zero, added to y's totals where `add`.
template <int MR, int NV, bool Scaled = false>
void panel_tile(const uint32_t* panel, const uint16_t* x, int64_t xs, const float* xsum, const float* sT,
                const float* zT, int64_t G, int64_t g0, int64_t g1, int64_t g, float* y, const NextLines& next,
                bool add = false) {
  constexpr int ld = NV * 16;
  constexpr bool totals_in_y = NV > 2;
  static_assert(totals_in_y || !Scaled, "scaled panels keep their totals in y");
  const int64_t kp0 = g0 * g / 2;
  int64_t pf_left = next.end - next.begin, pf_line = next.begin % next.per_row;
  const uint8_t* pf_row = next.first + next.begin / next.per_row * next.row_bytes;
  __m512 tot[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) tot[m][v] = _mm512_setzero_ps();
  for (int64_t grp = g0; grp < g1; ++grp) {
    __m512 acc[MR][NV];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
    // This group's share of the lines, issued before its products.
    for (int64_t n = (pf_left + g1 - grp - 1) / (g1 - grp); n > 0; --n, --pf_left) {
      _mm_prefetch(reinterpret_cast<const char*>(pf_row + 64 * pf_line), _MM_HINT_T1);
      if (++pf_line == next.per_row) {
        pf_line = 0;
        pf_row += next.row_bytes;
      }
    }
    // A group of more than kFoldPairs pairs: all but its last block of that many scaled into the
    // totals (the fold) before the next.
    int64_t kb = grp * g / 2;
    const int64_t group_end = (grp + 1) * g / 2;
    bool first = true;
    for (; group_end - kb > kFoldPairs; kb += kFoldPairs, first = false) {
      panel_products<MR, NV>(panel + (kb - kp0) * ld, x + 2 * kb, xs, kFoldPairs, acc);
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) {
          const __m512 s = Scaled ? _mm512_set1_ps(1.f) : _mm512_loadu_ps(sT + grp * ld + 16 * v);
          if constexpr (totals_in_y) {
            const bool from_zero = first && (Scaled ? !add : grp == 0);
            const __m512 prev = from_zero ? _mm512_setzero_ps() : _mm512_loadu_ps(y + m * ld + 16 * v);
            _mm512_storeu_ps(y + m * ld + 16 * v, _mm512_fmadd_ps(acc[m][v], s, prev));
          } else {
            tot[m][v] = _mm512_fmadd_ps(acc[m][v], s, tot[m][v]);
          }
          acc[m][v] = _mm512_setzero_ps();
        }
    }
    panel_products<MR, NV>(panel + (kb - kp0) * ld, x + 2 * kb, xs, group_end - kb, acc);
    if constexpr (Scaled) {
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) {
          const __m512 prev = add || !first ? _mm512_loadu_ps(y + m * ld + 16 * v) : _mm512_setzero_ps();
          _mm512_storeu_ps(y + m * ld + 16 * v, _mm512_add_ps(prev, acc[m][v]));
        }
      continue;
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 xsv = _mm512_set1_ps(xsum[m * G + grp]);
      for (int v = 0; v < NV; ++v) {
        const __m512 s = _mm512_loadu_ps(sT + grp * ld + 16 * v), z = _mm512_loadu_ps(zT + grp * ld + 16 * v);
        if constexpr (totals_in_y) {
          const __m512 prev = grp == 0 && first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + m * ld + 16 * v);
          _mm512_storeu_ps(y + m * ld + 16 * v, _mm512_fmadd_ps(z, xsv, _mm512_fmadd_ps(acc[m][v], s, prev)));
        } else {
          tot[m][v] = _mm512_fmadd_ps(z, xsv, _mm512_fmadd_ps(acc[m][v], s, tot[m][v]));
        }
      }
    }
  }
  if constexpr (!totals_in_y)
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + m * ld + 16 * v, tot[m][v]);
}

// The 32-column tile out of line: inlined into panel_rows beside the 64-column one, it ran 2-4%
// slower (4096 x 4096 in groups of 32, M = 512), while the 64-column one ran 1-5% slower out of line.
template <int MR>
[[gnu::noinline]] void narrow_tile(const uint32_t* panel, const uint16_t* x, int64_t xs, const float* xsum,
                                   const float* sT, const float* zT, int64_t G, int64_t g, float* y,
                                   const NextLines& next) {
  panel_tile<MR, 2>(panel, x, xs, xsum, sT, zT, G, 0, G, g, y, next);
}

template <int MR, int NV, bool Scaled = false>
void panel_tile_upto(int64_t mr, const uint32_t* panel, const uint16_t* x, int64_t xs, const float* xsum,
                     const float* sT, const float* zT, int64_t G, int64_t g0, int64_t g1, int64_t g, float* y,
                     const NextLines& next, bool add = false) {
  if (mr == MR) {
    if constexpr (NV == 2)
      narrow_tile<MR>(panel, x, xs, xsum, sT, zT, G, g, y, next);  // the whole of K: g0 = 0, g1 = G
    else
      panel_tile<MR, NV, Scaled>(panel, x, xs, xsum, sT, zT, G, g0, g1, g, y, next, add);
  } else if constexpr (MR > 1) {
    panel_tile_upto<MR - 1, NV, Scaled>(mr, panel, x, xs, xsum, sT, zT, G, g0, g1, g, y, next, add);
  }
}

// Activation rows per micro-kernel call at NV vectors of panel columns (see panel_tile):
// NV = 2: 12 group sums + 12 totals + 2 panel vectors + 1 broadcast, 27 zmm; NV = 4: 16 sums + 4
// panel vectors + 1 broadcast.
template <int NV>
constexpr int kPanelM = NV == 2 ? 6 : 4;

// A wide panel holds at most this many codes of K (whole groups and chunks): 256 KiB of panel,
// which stays in L2 beside the activations streaming past. The whole of K = 14336 (1.8 MiB) made
// 1024 x 14336 at M = 256 10-18% slower than 32 columns; slices of 4096 codes 16% faster than
// those, and 2048 another 0-7% at M = 16-512 (1024: the same as 2048; session 28, Zen 5).
constexpr int64_t kPanelSliceCodes = 2048;

void build_any_panel(const LowbitProblem& p, int64_t n0, int64_t rows, int64_t width, int64_t k0, int64_t k1,
                     uint32_t* panel) {
  switch (p.bits) {
    case 2: build_panel<2>(p, n0, rows, width, k0, k1, panel); break;
#if defined(__AVX512VBMI__)  // 3-bit codes: only the build with VBMI takes them
    case 3: build_panel<3>(p, n0, rows, width, k0, k1, panel); break;
#endif
    case 4: build_panel<4>(p, n0, rows, width, k0, k1, panel); break;
    default: build_panel8(p, n0, rows, width, k0, k1, panel); break;
  }
}

// Turns the first `pairs` pairs of a wide panel built from code k0 on into the weights they stand
// for, q * scale + zero (code * sT + zT, one fp32 FMA, as the group epilogue applies them) rounded
// to bf16 (round to nearest even): a group's pairs lie together in the panel form, so pair i is in
// group (k0 + 2 i) / g. With no step per group, M = 512 ran 16% faster in groups of 32 (4096 x 4096),
// 12% in groups of 64 (1536 x 576) and 2-5% in groups of 128; at M = 64-128 only groups of 32
// gained (session 30, Zen 5).
void scale_panel(uint32_t* panel, int64_t pairs, int64_t k0, int64_t g, const float* sT, const float* zT) {
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t gr = (k0 + 2 * i) / g;
    for (int64_t h = 0; h < kWideBlockN; h += 16) {
      uint32_t* at = panel + i * kWideBlockN + h;
      const __m512i both = _mm512_loadu_si512(at);
      const __m512 s = _mm512_loadu_ps(sT + gr * kWideBlockN + h), z = _mm512_loadu_ps(zT + gr * kWideBlockN + h);
      const __m512 lo = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(both, 16)), s, z);
      const __m512 hi = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(both, high)), s, z);
      const __m512i lo16 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(lo)));
      const __m512i hi16 = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(hi)));
      _mm512_storeu_si512(at, _mm512_or_si512(lo16, _mm512_slli_epi32(hi16, 16)));
    }
  }
}

// Panel blocks are kWideBlockN weight rows where groups are 64 codes or more, M is more than one
// narrow tile (at M = 5-6 a 4-row tile plus a 1-2-row one, latency-bound, was 4-5% slower) and the
// block has more than kBlockN rows (a thread's share comes in multiples of 32 rows); else kBlockN.
// A wide block runs K in slices (kPanelSliceCodes), every activation tile adding each slice to its
// totals in ybuf ([M][width]); a narrow one takes the whole of K per tile. From
// kBf16ScaledPanelMinRows rows on, every block is wide and its panels scaled (scale_panel).
void panel_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t G = p.G, M = p.M, xs = p.x_stride, g = p.group_size;
  const bool wide = bf16_panel_block(M, g) == kWideBlockN, scaled = M >= kBf16ScaledPanelMinRows;
  const int64_t unit = std::max<int64_t>(g, chunk_codes(p.bits));  // whole groups and chunks
  const int64_t slice = std::max<int64_t>(1, kPanelSliceCodes / unit) * unit;
  thread_local AlignedVector<uint32_t> panel;
  thread_local AlignedVector<float> sT, zT, ybuf;
  panel.resize(std::max(xs / 2 * kBlockN, wide ? std::min(xs, slice) / 2 * kWideBlockN : 0));
  sT.resize(G * kWideBlockN);
  zT.resize(G * kWideBlockN);
  ybuf.resize(wide ? M * kWideBlockN : kPanelM<2> * kBlockN);
  const float offset = p.bits == 8 ? kCodeOffset<8> : kCodeOffset<4>;  // 2, 3, 4 bits: 128
  // The lines of rows [n, n + rows), `bytes` bytes of each from byte `byte0`, that tile t of
  // `tiles` prefetches.
  const auto share = [&](int64_t n, int64_t rows, int64_t byte0, int64_t bytes, int64_t t, int64_t tiles) {
    NextLines next;
    if (rows <= 0 || bytes <= 0) return next;
    next.first = p.qweight + n * p.row_bytes + byte0;
    next.row_bytes = p.row_bytes;
    next.per_row = (bytes + 63) / 64;
    next.begin = rows * next.per_row * t / tiles;
    next.end = rows * next.per_row * (t + 1) / tiles;
    return next;
  };
  const auto block_width = [&](int64_t n) -> int64_t { return wide && n_end - n > kBlockN ? kWideBlockN : kBlockN; };
  const int64_t slice_bytes = slice * p.bits / 8;
  for (int64_t n0 = n_begin; n0 < n_end;) {
    const int64_t width = block_width(n0);
    const int64_t rows = std::min<int64_t>(width, n_end - n0);
    // The next block: its rows, and the bytes of each its first build reads.
    const int64_t n_next = n0 + rows, rows_next = n_next < n_end ? std::min(block_width(n_next), n_end - n_next) : 0;
    const int64_t bytes_next = block_width(n_next) == kBlockN ? p.row_bytes : std::min(p.row_bytes, slice_bytes);
    for (int64_t r = 0; r < width; ++r)
      for (int64_t gr = 0; gr < G; ++gr) {
        const int64_t n = n0 + (r < rows ? r : 0);
        const float sc = load_as_float(p.scale, p.scale_dtype, n * G + gr);
        sT[gr * width + r] = sc;
        zT[gr * width + r] = load_as_float(p.zero, p.scale_dtype, n * G + gr) - offset * sc;
      }
    if (width == kBlockN) {
      build_any_panel(p, n0, rows, width, 0, p.K, panel.data());
      const int64_t tiles = (M + kPanelM<2> - 1) / kPanelM<2>;
      for (int64_t m0 = 0; m0 < M; m0 += kPanelM<2>) {
        const int64_t mr = std::min<int64_t>(kPanelM<2>, M - m0);
        panel_tile_upto<kPanelM<2>, 2>(mr, panel.data(), p.x16 + m0 * xs, xs, p.xsum + m0 * G, sT.data(), zT.data(),
                                       G, 0, G, g, ybuf.data(),
                                       share(n_next, rows_next, 0, bytes_next, m0 / kPanelM<2>, tiles));
        for (int64_t m = 0; m < mr; ++m)
          for (int64_t r = 0; r < rows; r += 16)
            store_out(p, m0 + m, n0 + r, ybuf.data() + m * width + r, std::min<int64_t>(16, rows - r));
      }
    } else {
      const int64_t tiles = (M + kPanelM<4> - 1) / kPanelM<4>;
      for (int64_t k0 = 0; k0 < p.K; k0 += slice) {
        const int64_t k1 = std::min(p.K, k0 + slice);
        build_any_panel(p, n0, rows, width, k0, k1, panel.data());
        if (scaled) scale_panel(panel.data(), (k1 - k0) / 2, k0, g, sT.data(), zT.data());
        for (int64_t m0 = 0; m0 < M; m0 += kPanelM<4>) {
          const int64_t mr = std::min<int64_t>(kPanelM<4>, M - m0), t = m0 / kPanelM<4>;
          // The next build: this block's next slice, or after the last one the next block.
          const int64_t k1_byte = k1 * p.bits / 8;
          const NextLines next = k1 < p.K
                                     ? share(n0, rows, k1_byte, std::min(slice_bytes, p.row_bytes - k1_byte), t, tiles)
                                     : share(n_next, rows_next, 0, bytes_next, t, tiles);
          if (scaled)  // one group of the slice's codes
            panel_tile_upto<kPanelM<4>, 4, true>(mr, panel.data(), p.x16 + m0 * xs + k0, xs, nullptr, nullptr, nullptr,
                                                 1, 0, 1, k1 - k0, ybuf.data() + m0 * width, next, k0 > 0);
          else
            panel_tile_upto<kPanelM<4>, 4>(mr, panel.data(), p.x16 + m0 * xs, xs, p.xsum + m0 * G, sT.data(),
                                           zT.data(), G, k0 / g, k1 / g, g, ybuf.data() + m0 * width, next);
          // Each tile's rows go out after its last slice, between tiles: all M rows at the block's
          // end were a burst of store misses to y (1536 x 576 at M = 512 took 0-6% longer with y
          // out of the caches).
          if (k1 == p.K)
            for (int64_t m = m0; m < m0 + mr; ++m)
              for (int64_t r = 0; r < rows; r += 16)
                store_out(p, m, n0 + r, ybuf.data() + m * width + r, std::min<int64_t>(16, rows - r));
        }
      }
    }
    n0 += rows;
  }
}

template <int B>
void rows_t(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.M >= kBf16PanelMinRows)
    panel_rows(p, n_begin, n_end);
  else
    dot_rows_m<B>(p, n_begin, n_end);
}

void run_rows(const LowbitProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.bits) {
    case 2: rows_t<2>(p, n_begin, n_end); break;
#if defined(__AVX512VBMI__)  // 3-bit codes: only the build with VBMI takes them
    case 3: rows_t<3>(p, n_begin, n_end); break;
#endif
    case 4: rows_t<4>(p, n_begin, n_end); break;
    default: rows_t<8>(p, n_begin, n_end); break;
  }
}

// Bf16PrepareFn. The order permutes values only within a chunk, so each whole chunk (128 or 256
// values: 4 or 8 vectors of 32) is rearranged in registers: every output vector takes its values
// from each pair of input vectors with one two-source word permute, masked to the outputs whose
// source lies in that pair. The scalar scatter this replaces cost ~0.6 ns per value, as much as
// the products of a 4096-wide layer at M = 512 with N = 64 (bench/results/ops/README.md, tenth
// session). A partial last chunk is zero-filled and scattered one value at a time. Group sums
// take 16 values per add (groups of 16 or more), else eight interleaved scalar sums.
float group_sum(const uint16_t* v, int64_t n) {
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16)
      acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(
                                   _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i))), 16)));
    return _mm512_reduce_add_ps(acc);
  }
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += bf16_to_float(v[i + j]);
  float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  for (; i < n; ++i) sum += bf16_to_float(v[i]);
  return sum;
}

void prepare(const uint16_t* x, int64_t M, int64_t K, int64_t stride, const int32_t* pos, int64_t period,
             int64_t group_size, uint16_t* out, float* xsum) {
  constexpr int kMaxVectors = 256 / 32;
  const bool vectorised = period % 64 == 0 && period / 32 <= kMaxVectors && K >= period;
  const int64_t full = vectorised ? K / period : 0;
  const int vectors = static_cast<int>(period / 32), pairs = vectors / 2;
  alignas(64) uint16_t idx[kMaxVectors][kMaxVectors / 2][32];
  __mmask32 mask[kMaxVectors][kMaxVectors / 2] = {};
  if (vectorised) {
    int32_t source[256];  // source[o]: the value of a chunk that lands at its position o
    for (int64_t k = 0; k < period; ++k) source[pos[k]] = static_cast<int32_t>(k);
    for (int q = 0; q < vectors; ++q)
      for (int s = 0; s < pairs; ++s)
        for (int j = 0; j < 32; ++j) {
          const int32_t src = source[32 * q + j];
          idx[q][s][j] = static_cast<uint16_t>(src & 63);
          if (src / 64 == s) mask[q][s] |= 1u << j;
        }
  }
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* row = x + m * K;
    uint16_t* dst = out + m * stride;
    for (int64_t c = 0; c < full; ++c) {
      __m512i in[kMaxVectors];
      for (int v = 0; v < vectors; ++v) in[v] = _mm512_loadu_si512(row + c * period + 32 * v);
      for (int q = 0; q < vectors; ++q) {
        __m512i r = _mm512_setzero_si512();
        for (int s = 0; s < pairs; ++s)
          r = _mm512_mask_mov_epi16(
              r, mask[q][s], _mm512_permutex2var_epi16(in[2 * s], _mm512_load_si512(idx[q][s]), in[2 * s + 1]));
        _mm512_storeu_si512(dst + c * period + 32 * q, r);
      }
    }
    const int64_t done = full * period;
    std::memset(dst + done, 0, static_cast<size_t>(stride - done) * sizeof(uint16_t));
    for (int64_t k = done; k < K; ++k) dst[pos[k]] = row[k];
    const int64_t G = K / group_size;
    for (int64_t g = 0; g < G; ++g) xsum[m * G + g] = group_sum(row + g * group_size, group_size);
  }
}

}  // namespace

LowbitRowsFn bf16_rows() { return &run_rows; }
Bf16PrepareFn bf16_prepare() { return &prepare; }

}  // namespace SK_ISA_NS
}  // namespace sk
