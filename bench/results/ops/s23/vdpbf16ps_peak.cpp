// Session 23: one core's vdpbf16ps (and fp32 FMA) throughput, 24 independent zmm chains, for the
// ceiling of the bf16 panel GEMM at large M.   g++ -O2 -o peak vdpbf16ps_peak.cpp && ./peak
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#define T __attribute__((target("avx512f,avx512bf16,avx512bw,avx512vl,fma")))
T double run_dp(long iters) {
  __m512 acc[24]; for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(i);
  __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f803f81);
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 24
    for (int j = 0; j < 24; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
    asm volatile("" : "+v"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sink = 0; for (int i = 0; i < 24; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  if (sink == 1.2345f) printf("x");
  return s;
}
T double run_fma(long iters) {
  __m512 acc[24]; for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(i);
  __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
#pragma GCC unroll 24
    for (int j = 0; j < 24; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
    asm volatile("" : "+v"(a));
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float sink = 0; for (int i = 0; i < 24; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  if (sink == 1.2345f) printf("x");
  return s;
}
int main() {
  const long it = 20000000;
  for (int r = 0; r < 3; ++r) {
    double d = run_dp(it), f = run_fma(it);
    printf("dpbf16 zmm: %.2f G instr/s -> %.0f GFLOPS; fma zmm: %.2f G instr/s -> %.0f GFLOPS\n", 24.0 * it / d / 1e9, 64 * 24.0 * it / d / 1e9, 24.0 * it / f / 1e9, 32 * 24.0 * it / f / 1e9);
  }
}
