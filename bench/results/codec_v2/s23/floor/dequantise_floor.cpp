// Session 23: how fast can the fused decoder's dequantise step go on one core? The row kernel of
// csrc/cpu/codec_v2.cpp (v0: zero-extend, subtract kmax, convert, multiply, add, round to fp16) beside
// an 8-lane form (v1), a VBMI byte-spread form (v2) and, as a bound, the same without the fp16
// rounding (v3), over 512 rows of d = 4096 symbols held in L1, writing OUTROWS rows of output
// (4: L1, 64: L2, 512: the 4 MiB frame).
//   g++ -O3 -DOUTROWS=512 -o deq dequantise_floor.cpp && ./deq
#ifndef OUTROWS
#define OUTROWS 512
#endif
#include <immintrin.h>
#include <cstdint>
#include <cstdio>
#include <vector>
#include <chrono>
#include <cstring>
#include <algorithm>
#define A512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx2,f16c,fma")))
template <typename V> A512 inline V in_register(V v) { asm("" : "+v"(v)); return v; }
A512 void v0(const uint8_t* s, int64_t d, const float* step, const float* center, int kmax, uint8_t* out) {
  const __m512i kv = _mm512_set1_epi32(kmax);
  for (int64_t c = 0; c + 64 <= d; c += 64)
    for (int j = 0; j < 4; ++j) {
      const int64_t at = c + 16 * j;
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(s + at)));
      const __m512 qf = _mm512_cvtepi32_ps(_mm512_sub_epi32(w, kv));
      const __m512 y = _mm512_add_ps(_mm512_mul_ps(qf, _mm512_loadu_ps(step + at)), _mm512_loadu_ps(center + at));
      _mm256_storeu_si256((__m256i*)(out + 2 * at), in_register(_mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
}
A512 void v1(const uint8_t* s, int64_t d, const float* step, const float* center, int kmax, uint8_t* out) {
  const __m256i kv = _mm256_set1_epi32(kmax);
  for (int64_t c = 0; c + 64 <= d; c += 64)
    for (int j = 0; j < 8; ++j) {
      const int64_t at = c + 8 * j;
      const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(s + at)));
      const __m256 qf = _mm256_cvtepi32_ps(_mm256_sub_epi32(w, kv));
      const __m256 y = _mm256_add_ps(_mm256_mul_ps(qf, _mm256_loadu_ps(step + at)), _mm256_loadu_ps(center + at));
      _mm_storeu_si128((__m128i*)(out + 2 * at), in_register(_mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
}
// one 64-byte load, bytes spread with vpermb into dword lanes (VBMI) as float bits 2^23 + b
A512 void v2(const uint8_t* s, int64_t d, const float* step, const float* center, int kmax, uint8_t* out) {
  const __m512 bias = _mm512_set1_ps(8388608.0f + kmax);
  const __m512i hi = _mm512_set1_epi32(0x4B000000);
  for (int64_t c = 0; c + 64 <= d; c += 64) {
    const __m512i b = _mm512_loadu_si512(s + c);
    for (int j = 0; j < 4; ++j) {
      const int64_t at = c + 16 * j;
      const __m512i idx = _mm512_set_epi32(16*j+15,16*j+14,16*j+13,16*j+12,16*j+11,16*j+10,16*j+9,16*j+8,16*j+7,16*j+6,16*j+5,16*j+4,16*j+3,16*j+2,16*j+1,16*j);
      const __m512i w = _mm512_or_si512(_mm512_maskz_permutexvar_epi8(0x1111111111111111ull, idx, b), hi);
      const __m512 qf = _mm512_sub_ps(_mm512_castsi512_ps(w), bias);
      const __m512 y = _mm512_add_ps(_mm512_mul_ps(qf, _mm512_loadu_ps(step + at)), _mm512_loadu_ps(center + at));
      _mm256_storeu_si256((__m256i*)(out + 2 * at), in_register(_mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    }
  }
}
// fp32 output only (no conversion) to see cvtps2ph cost
A512 void v3(const uint8_t* s, int64_t d, const float* step, const float* center, int kmax, uint8_t* out) {
  const __m512i kv = _mm512_set1_epi32(kmax);
  for (int64_t c = 0; c + 64 <= d; c += 64)
    for (int j = 0; j < 4; ++j) {
      const int64_t at = c + 16 * j;
      const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(s + at)));
      const __m512 qf = _mm512_cvtepi32_ps(_mm512_sub_epi32(w, kv));
      const __m512 y = _mm512_add_ps(_mm512_mul_ps(qf, _mm512_loadu_ps(step + at)), _mm512_loadu_ps(center + at));
      _mm256_storeu_si256((__m256i*)(out + 2 * at), _mm512_castsi512_si256(_mm512_castps_si512(y)));
    }
}
int main() {
  const int64_t T = 512, d = 4096;
  std::vector<uint8_t> s(d); std::vector<float> step(d), center(d);
  for (int i = 0; i < d; ++i) { s[i] = (i * 7) % 31; step[i] = 0.01f + i * 1e-6f; center[i] = 0.1f * (i % 13); }
  std::vector<uint8_t> out(T * d * 2 + 64);
  using F = void (*)(const uint8_t*, int64_t, const float*, const float*, int, uint8_t*);
  F fs[] = {v0, v1, v2, v3};
  std::vector<uint8_t> ref(d * 2), got(d * 2);
  v0(s.data(), d, step.data(), center.data(), 15, ref.data());
  for (int f = 1; f < 3; ++f) { fs[f](s.data(), d, step.data(), center.data(), 15, got.data()); printf("v%d same %d\n", f, memcmp(ref.data(), got.data(), d*2) == 0); }
  for (int round = 0; round < 3; ++round)
    for (int f = 0; f < 4; ++f) {
      double best = 1e9;
      for (int r = 0; r < 200; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        for (int64_t t = 0; t < T; ++t) fs[f](s.data(), d, step.data(), center.data(), 15, out.data() + (t % OUTROWS) * d * 2);
        best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      printf("v%d %.3f ms\n", f, best);
    }
}
