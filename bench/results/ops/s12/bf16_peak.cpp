// Peak vdpbf16ps throughput of one core: 12 independent accumulators, no memory traffic.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
int main() {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_setzero_ps();
  const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  const long iters = 50'000'000;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double flops = 12.0 * iters * 64;  // 16 lanes x 2 products x (mul + add)
    std::printf("%.1f GFLOPS (%.3f s)\n", flops / s / 1e9, s);
  }
  __m512 t = acc[0]; for (int i = 1; i < 12; ++i) t = _mm512_add_ps(t, acc[i]); float out[16]; _mm512_storeu_ps(out, t); std::printf("%g\n", out[0]);
}
