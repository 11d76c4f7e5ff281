// Bit-exact fp16 / bf16 <-> fp32 conversions and the directed fp16 roundings of the codec.
//
// Written with integer operations (plus one IEEE fp32 operation for fp16 subnormals) so the
// results never depend on compiler support for _Float16 or on the target's BF16 instructions; fp16
// -> fp32 takes F16C's instruction where the build has it (the same bits, but for signalling NaNs,
// which it quiets). Conversions to the narrow types round to nearest, ties to even, the way torch's
// .to(dtype) does; docs/FORMATS.md relies on that.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace sk {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Kernels built with F16C (the AVX2 and AVX-512 ones) convert with its instruction, which differs
// only in quieting signalling NaNs (as torch's conversion does); the rest branch-free (both forms
// computed, one picked by mask) so that conversion loops vectorise. With a branch per value, a
// 4-bit layer at Llama-3-8B's shape in groups of 32 took 28.6-28.9 ms with fp16 scales on the AVX2
// kernels, branch-free 17.2-17.3 (fp32 scales 13.3-13.6; one thread, Zen 4).
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t mag = h & 0x7fffu;
  // Normal: rebias the exponent by 112; inf / NaN (exponent 31) by 224 more, to fp32's 255.
  const uint32_t wide = (mag << 13) + (112u << 23) + static_cast<uint32_t>(mag >= 0x7c00u) * (112u << 23);
  // Subnormal (exponent 0): man * 2^-24, exact in fp32.
  const uint32_t sub = float_bits(static_cast<float>(static_cast<int32_t>(mag)) * 5.9604644775390625e-08f);
  const uint32_t is_sub = 0u - static_cast<uint32_t>(mag < 0x400u);
  return bits_float(sign | (sub & is_sub) | (wide & ~is_sub));
#endif
}

inline uint16_t float_to_half(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  // NaN
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {
    // Normal fp16: rebias the exponent (-112 << 23) and round the 13 dropped bits to even;
    // a carry out of the mantissa correctly bumps the exponent.
    ax += 0xc8000fffu + ((ax >> 13) & 1u);
    return static_cast<uint16_t>(sign | (ax >> 13));
  }
  // Below 2^-14: adding 0.5 puts the fp16 subnormal grid (2^-24) at fp32's last mantissa bit,
  // so the fp32 adder performs the round-to-nearest-even for us.
  const float t = bits_float(ax) + 0.5f;
  return static_cast<uint16_t>(sign | (float_bits(t) - 0x3f000000u));
}

inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// The bf16 bits of the fp32 bits u, rounded to nearest even; not for NaN (its payload may carry
// into the sign). Branch-free, so loops over it vectorise.
inline uint32_t bf16_round_bits(uint32_t u) { return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; }

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>(bf16_round_bits(x));
}

// Largest fp16 value <= v (as fp32; -inf below the fp16 range): the codec's `lo`.
inline float round_down_fp16(float v) {
  const uint16_t h = float_to_half(v);
  const float hf = half_to_float(h);
  if (!(hf > v)) return hf;
  uint16_t down;
  if (h & 0x8000u)
    down = static_cast<uint16_t>(h + 1);
  else
    down = h == 0 ? 0x8001u : static_cast<uint16_t>(h - 1);
  return half_to_float(down);
}

// Smallest fp16 value >= v for v >= 0 (as fp32; +inf above the fp16 range): the codec's `step`.
inline float round_up_fp16(float v) {
  const uint16_t h = float_to_half(v);
  const float hf = half_to_float(h);
  return hf < v ? half_to_float(static_cast<uint16_t>(h + 1)) : hf;
}

// Element types of the kernels' float tensors; the numbering is the codec frame's dtype byte.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

inline float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

inline void store_from_float(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<uint16_t*>(p)[i] = float_to_half(v); break;
    case kBFloat16: static_cast<uint16_t*>(p)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// Converts n values of `dtype` at `src` to fp32; a tight loop per dtype so it vectorises.
inline void to_float(const void* src, int dtype, int64_t n, float* dst) {
  if (dtype == kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else if (dtype == kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i))));
#endif
    for (; i < n; ++i) dst[i] = half_to_float(s[i]);
  }
}

inline void from_float(const float* src, int64_t n, int dtype, void* dst) {
  if (dtype == kFloat32) {
    std::memcpy(dst, src, static_cast<size_t>(n) * 4);
  } else if (dtype == kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(src[i]);
  }
}

}  // namespace sk
