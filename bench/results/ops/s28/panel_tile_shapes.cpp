// Session 28: the bf16 panel micro-kernel's tile shapes in isolation (synthetic panel and
// activations, one thread, GFLOPS of vdpbf16ps work; best of 5 passes over M = 512 rows and N
// columns). reg6x2: 6 activation rows x 2 vectors of 16 columns, group totals in registers (the
// kernel before session 28); memRxV: R rows x V vectors, totals kept in memory (y) per group.
// Build: g++ -O3 -mavx512f -mavx512bf16 -mavx512bw -mavx512vl panel_tile_shapes.cpp
// Run:   ./a.out K GROUP M N   (results: panel_tile_shapes.txt)
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <vector>
#include <chrono>
#include <cstdlib>
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }
// One group's sums: acc[m][v] = the group's pairs of activation row m against panel vector v.
template <int MR, int NV>
inline void group_sums(const uint32_t* panel, const uint16_t* x, int64_t xs, int64_t grp, int64_t g,
                       __m512 acc[MR][NV]) {
  constexpr int LD = NV * 16;
  for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t kp = grp * g / 2; kp < (grp + 1) * g / 2; ++kp) {
    __m512bh b[NV];
    for (int v = 0; v < NV; ++v) b[v] = as_bh(_mm512_loadu_si512(panel + kp * LD + 16 * v));
    for (int m = 0; m < MR; ++m) {
      uint32_t pair; std::memcpy(&pair, x + m * xs + 2 * kp, 4);
      const __m512bh xb = as_bh(_mm512_set1_epi32((int)pair));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], b[v], xb);
    }
  }
}
// Totals in registers.
template <int MR, int NV>
__attribute__((noinline)) void tile_reg(const uint32_t* panel, const uint16_t* x, int64_t xs, const float* xsum,
    const float* sT, const float* zT, int64_t G, int64_t g, float* y) {
  constexpr int LD = NV * 16;
  __m512 tot[MR][NV];
  for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) tot[m][v] = _mm512_setzero_ps();
  for (int64_t grp = 0; grp < G; ++grp) {
    __m512 acc[MR][NV];
    group_sums<MR, NV>(panel, x, xs, grp, g, acc);
    for (int m = 0; m < MR; ++m) {
      const __m512 xsv = _mm512_set1_ps(xsum[m * G + grp]);
      for (int v = 0; v < NV; ++v)
        tot[m][v] = _mm512_fmadd_ps(_mm512_loadu_ps(zT + grp * LD + 16 * v), xsv,
                                    _mm512_fmadd_ps(acc[m][v], _mm512_loadu_ps(sT + grp * LD + 16 * v), tot[m][v]));
    }
  }
  for (int m = 0; m < MR; ++m) for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + m * LD + 16 * v, tot[m][v]);
}
// Totals in memory (y).
template <int MR, int NV>
__attribute__((noinline)) void tile_mem(const uint32_t* panel, const uint16_t* x, int64_t xs, const float* xsum,
    const float* sT, const float* zT, int64_t G, int64_t g, float* y) {
  constexpr int LD = NV * 16;
  for (int64_t grp = 0; grp < G; ++grp) {
    __m512 acc[MR][NV];
    group_sums<MR, NV>(panel, x, xs, grp, g, acc);
    for (int m = 0; m < MR; ++m) {
      const __m512 xsv = _mm512_set1_ps(xsum[m * G + grp]);
      for (int v = 0; v < NV; ++v) {
        __m512 t = _mm512_mul_ps(_mm512_loadu_ps(zT + grp * LD + 16 * v), xsv);
        t = _mm512_fmadd_ps(acc[m][v], _mm512_loadu_ps(sT + grp * LD + 16 * v), t);
        if (grp) t = _mm512_add_ps(t, _mm512_loadu_ps(y + m * LD + 16 * v));
        _mm512_storeu_ps(y + m * LD + 16 * v, t);
      }
    }
  }
}
template <int MR, int NV, bool MEM>
double run(int K, int g, int M, int N, int reps, int64_t xs) {
  const int cols = NV * 16; int G = K / g;
  std::vector<uint32_t> panel((size_t)K / 2 * cols, 0x3f803f80u);
  std::vector<uint16_t> x((size_t)M * xs, 0x3f80);
  std::vector<float> y(MR * cols), sT(G * cols, 1.f), zT(G * cols, 1.f), xsum(M * G, 1.f);
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    for (int n = 0; n < N; n += cols)
      for (int m0 = 0; m0 + MR <= M; m0 += MR)
        (MEM ? tile_mem<MR, NV> : tile_reg<MR, NV>)(panel.data(), x.data() + m0 * xs, xs, xsum.data() + m0 * G, sT.data(), zT.data(), G, g, y.data());
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < best) best = s;
  }
  int Mu = M / MR * MR;
  return 2.0 * Mu * N * K / best / 1e9;
}
int main(int argc, char** argv) {
  int K = atoi(argv[1]); int g = atoi(argv[2]); int M = atoi(argv[3]); int N = atoi(argv[4]);
  for (int i = 0; i < 3; ++i)
  printf("K=%d g=%d M=%d N=%d reg6x2 %.0f  mem3x4 %.0f  mem4x4 %.0f  mem5x4 %.0f mem4x3 %.0f\n", K, g, M, N,
    run<6,2,false>(K, g, M, N, 5, K), run<3,4,true>(K, g, M, N, 5, K), run<4,4,true>(K, g, M, N, 5, K),
    run<5,4,true>(K, g, M, N, 5, K), run<4,3,true>(K, g, M, N, 5, K));
}
