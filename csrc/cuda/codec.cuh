// Fused TS + TAB-Q codec (docs/FORMATS.md section 3): one block per token row, no host sync,
// fixed-capacity outlier buffers. Every rounding step is spelled out with __*_rn intrinsics so
// that no FMA contraction or fast reciprocal changes a code.
#pragma once

#include "block_ops.cuh"

namespace sk {
namespace cuda {
namespace kernels {

constexpr int kCodecThreads = 256;
using CodecBlock = BlockOps<kCodecThreads>;

// Raw bit patterns of the element types, for raw tokens and exact outlier copies.
template <typename T> struct RawBits;
template <> struct RawBits<float> { using type = std::uint32_t; };
template <> struct RawBits<__half> { using type = std::uint16_t; };
template <> struct RawBits<__nv_bfloat16> { using type = std::uint16_t; };

// Largest fp16 value <= v, as fp32 (-inf below the fp16 range); mirrors ops/fp16_rounding.py.
__device__ float round_down_fp16(float v) {
  const __half h = __float2half_rn(v);
  if (!(__half2float(h) > v)) return __half2float(h);
  unsigned short b = __half_as_ushort(h);
  if (b & 0x8000u) {
    b = static_cast<unsigned short>(b + 1u);
  } else if (b == 0) {
    b = 0x8001u;
  } else {
    b = static_cast<unsigned short>(b - 1u);
  }
  return __half2float(__ushort_as_half(b));
}

// Smallest fp16 value >= v for v >= 0, as fp32 (+inf above the range).
__device__ float round_up_fp16(float v) {
  const __half h = __float2half_rn(v);
  if (!(__half2float(h) < v)) return __half2float(h);
  return __half2float(__ushort_as_half(static_cast<unsigned short>(__half_as_ushort(h) + 1u)));
}

__device__ float step_for(float lo16, float hi, int bits) {
  return round_up_fp16(__fdiv_rn(__fsub_rn(hi, lo16), static_cast<float>((1 << bits) - 1)));
}

// Per-row results that every thread of the block needs after the bit choice.
struct RowChoice {
  int bits;    // 1..8, or the raw width
  float lo;    // fp16-representable
  float step;  // fp16-representable, 0 for a constant row
};

template <typename T>
__global__ void __launch_bounds__(kCodecThreads)
    encode_kernel(const T* __restrict__ x, int d, bool abs_threshold, double threshold, int capacity, int bit_menu,
                  double eps, const std::uint8_t* __restrict__ forced_bits, std::uint8_t* __restrict__ bits_out,
                  __half* __restrict__ lo_out, __half* __restrict__ step_out, float* __restrict__ hi_out,
                  int* __restrict__ cnt_out, int* __restrict__ idx_out, T* __restrict__ val_out,
                  std::uint8_t* __restrict__ codes_out, int* __restrict__ nbytes_out) {
  using Raw = typename RawBits<T>::type;
  SK_DYNAMIC_SHARED(unsigned, outlier_mask);  // ceil(d / 32) words, bit i % 32 of word i / 32
  __shared__ double dscratch[CodecBlock::kWarps];
  __shared__ float fscratch[CodecBlock::kWarps];
  __shared__ int iscratch[CodecBlock::kWarps];
  __shared__ int hist[256];
  __shared__ unsigned radix_prefix;
  __shared__ int radix_remaining;
  __shared__ RowChoice choice;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const std::int64_t t = blockIdx.x;
  const T* row = x + t * d;
  const Raw* row_raw = reinterpret_cast<const Raw*>(row);
  constexpr int kRawWidth = static_cast<int>(sizeof(T)) * 8;

  // 1. Threshold: each square of an fp32 value is exact in float64.
  double tau = threshold;
  if (!abs_threshold) {
    double s = 0.0;
    for (int i = tid; i < d; i += kCodecThreads) {
      const double a = load_f32(row, i);
      s = __dadd_rn(s, __dmul_rn(a, a));
    }
    s = CodecBlock::all_reduce(s, dscratch, SumOp());
    tau = __dmul_rn(threshold, __dsqrt_rn(__ddiv_rn(s, static_cast<double>(d))));
  }

  // 2. Candidates |x| > tau. For an fp32 value a, (double)a > tau exactly when a > tau_down,
  // the largest float <= tau, so the per-element compares stay in fp32. Over capacity, a radix
  // select on the fp32 bit pattern of |x| (monotone for non-negative floats) finds the
  // capacity-th largest magnitude.
  const float tau_down = __double2float_rd(tau);
  int local = 0;
  for (int i = tid; i < d; i += kCodecThreads) local += fabsf(load_f32(row, i)) > tau_down;
  const int candidates = CodecBlock::all_reduce(local, iscratch, SumOp());
  const int kept_total = min(candidates, capacity);
  const bool select = candidates > capacity && capacity > 0;
  unsigned kth = 0;
  int take_equal = 0;  // how many of the entries equal to kth are kept (the lowest channels)
  if (select) {
    unsigned prefix = 0, prefix_mask = 0;
    int remaining = capacity;  // rank, from the top, of the wanted value among prefix matches
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kCodecThreads) hist[i] = 0;
      __syncthreads();
      for (int i = tid; i < d; i += kCodecThreads) {
        const float a = fabsf(load_f32(row, i));
        const unsigned ab = __float_as_uint(a);
        if (a > tau_down && (ab & prefix_mask) == prefix) atomicAdd(&hist[(ab >> shift) & 255u], 1);
      }
      __syncthreads();
      if (warp == 0) {
        // Lane l owns digits 255-8l .. 248-8l, so lower lanes hold larger magnitudes.
        int counts[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          counts[j] = hist[255 - (8 * lane + j)];
          sum += counts[j];
        }
        int inclusive = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const int up = __shfl_up_sync(kFullMask, inclusive, o);
          if (lane >= o) inclusive += up;
        }
        const int before = inclusive - sum;
        if (before < remaining && remaining <= inclusive) {
          int r = remaining - before;
          for (int j = 0; j < 8; ++j) {
            if (r <= counts[j]) {
              radix_prefix = prefix | (static_cast<unsigned>(255 - (8 * lane + j)) << shift);
              radix_remaining = r;
              break;
            }
            r -= counts[j];
          }
        }
      }
      __syncthreads();
      prefix = radix_prefix;
      remaining = radix_remaining;
      prefix_mask |= 255u << shift;
    }
    kth = prefix;
    take_equal = remaining;
  }

  // 3. One ordered sweep: keep flags, slots in ascending channel order, the outlier mask and
  // the inlier statistics.
  for (int s = kept_total + tid; s < capacity; s += kCodecThreads) {
    idx_out[t * capacity + s] = 0;
    val_out[t * capacity + s] = T(0.0f);
  }
  int kept_before = 0, equal_before = 0;
  float lo32 = INFINITY, hi32 = -INFINITY;
  double sq = 0.0;
  for (int base = 0; base < d; base += kCodecThreads) {
    const int i = base + tid;
    const bool in_row = i < d;
    const float v = in_row ? load_f32(row, i) : 0.0f;
    const float a = fabsf(v);
    const bool candidate = in_row && a > tau_down;
    bool kept = candidate && capacity > 0;
    // Most tiles hold no outlier: one barrier-with-vote skips the ordered counts there.
    if (select) {
      const unsigned ab = __float_as_uint(a);
      const bool equal = candidate && ab == kth;
      int rank = 0;
      if (__syncthreads_or(equal)) {
        int equal_tile = 0;
        rank = equal_before + CodecBlock::exclusive_count(equal, iscratch, &equal_tile);
        equal_before += equal_tile;
      }
      kept = candidate && (ab > kth || (equal && rank < take_equal));
    }
    if (__syncthreads_or(kept)) {
      int kept_tile = 0;
      const int slot = kept_before + CodecBlock::exclusive_count(kept, iscratch, &kept_tile);
      kept_before += kept_tile;
      if (kept) {
        idx_out[t * capacity + slot] = i;
        val_out[t * capacity + slot] = row[i];
      }
    }
    const unsigned word = __ballot_sync(kFullMask, kept);
    if (lane == 0 && base + warp * 32 < d) outlier_mask[(base >> 5) + warp] = word;
    if (in_row && !kept) {
      lo32 = fminf(lo32, v);
      hi32 = fmaxf(hi32, v);
      const double vd = v;
      sq = __dadd_rn(sq, __dmul_rn(vd, vd));
    }
  }
  lo32 = CodecBlock::all_reduce(lo32, fscratch, MinOp());
  hi32 = CodecBlock::all_reduce(hi32, fscratch, MaxOp());
  sq = CodecBlock::all_reduce(sq, dscratch, SumOp());
  const int n_in = d - kept_total;

  // 4. Bit choice (thread 0), then broadcast.
  if (tid == 0) {
    if (n_in == 0) lo32 = hi32 = 0.0f;
    // Adding +0 turns a -0 extreme into +0 (FORMATS §3.3), whatever the reduction order.
    lo32 = __fadd_rn(lo32, 0.0f);
    hi32 = __fadd_rn(hi32, 0.0f);
    const float lo16 = round_down_fp16(lo32);
    int chosen = kRawWidth;
    float chosen_step = 0.0f;
    if (forced_bits != nullptr) {
      // A forced width outside 1..8 (the raw width included) travels raw.
      const int b = forced_bits[t];
      if (b >= 1 && b <= 8) {
        const float st = step_for(lo16, hi32, b);
        if (isfinite(lo16) && isfinite(st)) {
          chosen = b;
          chosen_step = st;
        }
      }
    } else if (isfinite(lo16)) {
      const double budget = __dmul_rn(__dmul_rn(eps, eps), sq);
      for (int b = 1; b <= 8; ++b) {
        if (!(bit_menu & (1 << (b - 1)))) continue;
        const float st = step_for(lo16, hi32, b);
        if (!isfinite(st)) continue;
        const double sd = st;
        const double err = __ddiv_rn(__dmul_rn(__dmul_rn(static_cast<double>(n_in), sd), sd), 12.0);
        if (err <= budget) {
          chosen = b;
          chosen_step = st;
          break;
        }
      }
    }
    const bool raw = chosen == kRawWidth;
    choice = RowChoice{chosen, raw ? 0.0f : lo16, raw ? 0.0f : chosen_step};
    bits_out[t] = static_cast<std::uint8_t>(chosen);
    lo_out[t] = __float2half_rn(choice.lo);
    step_out[t] = __float2half_rn(choice.step);
    hi_out[t] = hi32;
    cnt_out[t] = kept_total;
    nbytes_out[t] = raw ? d * static_cast<int>(sizeof(T)) : (d * chosen + 7) / 8;
  }
  __syncthreads();

  // 5. Quantise and pack: each thread writes whole 4-byte words of the row, so every byte of
  // the row (including the zero tail) is written exactly once.
  const RowChoice c = choice;
  const std::int64_t row_bytes = static_cast<std::int64_t>(d) * sizeof(T);
  std::uint8_t* out = codes_out + t * row_bytes;
  const bool aligned = (row_bytes & 3) == 0;
  const std::int64_t words = (row_bytes + 3) / 4;
  const std::int64_t stream_bytes = c.bits == kRawWidth ? row_bytes : (static_cast<std::int64_t>(d) * c.bits + 7) / 8;
  const float qmax_f = c.bits == kRawWidth ? 0.0f : static_cast<float>((1 << c.bits) - 1);
  for (std::int64_t j = tid; j < words; j += kCodecThreads) {
    std::uint32_t word = 0;
    if (4 * j < stream_bytes) {
      if (c.bits == kRawWidth) {
        // Element e covers bytes [e * size, (e + 1) * size); outlier channels travel as zero.
        constexpr int per_word = 4 / static_cast<int>(sizeof(T));
        for (int e = 0; e < per_word; ++e) {
          const std::int64_t ch = j * per_word + e;
          if (ch < d && !((outlier_mask[ch >> 5] >> (ch & 31)) & 1u)) {
            word |= static_cast<std::uint32_t>(row_raw[ch]) << (8 * sizeof(T) * e);
          }
        }
      } else {
        const std::int64_t bit0 = 32 * j;
        const std::int64_t first = bit0 / c.bits;
        const std::int64_t last = min(static_cast<std::int64_t>(d) - 1, (bit0 + 31) / c.bits);
        std::uint64_t acc = 0;
        for (std::int64_t ch = first; ch <= last; ++ch) {
          unsigned q = 0;
          if (c.step > 0.0f && !((outlier_mask[ch >> 5] >> (ch & 31)) & 1u)) {
            // clamp(rint(v)) == rint(clamp(v)), and adding 2^23 rounds a value in [0, 255] to
            // the nearest even integer in the low mantissa bits: no slow float-to-int convert.
            const float v = __fdiv_rn(__fsub_rn(load_f32(row, ch), c.lo), c.step);
            q = __float_as_uint(__fadd_rn(fminf(fmaxf(v, 0.0f), qmax_f), 8388608.0f)) - 0x4B000000u;
          }
          const int off = static_cast<int>(ch * c.bits - bit0);  // in (-bits, 32)
          acc |= off >= 0 ? static_cast<std::uint64_t>(q) << off : static_cast<std::uint64_t>(q >> -off);
        }
        word = static_cast<std::uint32_t>(acc);
      }
    }
    if (aligned) {
      reinterpret_cast<std::uint32_t*>(out)[j] = word;
    } else {
      for (int b = 0; b < 4 && 4 * j + b < row_bytes; ++b) out[4 * j + b] = static_cast<std::uint8_t>(word >> (8 * b));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCodecThreads)
    decode_kernel(const std::uint8_t* __restrict__ bits, const __half* __restrict__ lo, const __half* __restrict__ step,
                  const int* __restrict__ cnt, const int* __restrict__ idx, const T* __restrict__ val,
                  const std::uint8_t* __restrict__ codes, int d, int capacity, std::int64_t stride,
                  T* __restrict__ out) {
  const std::int64_t t = blockIdx.x;
  const int b = bits[t];
  constexpr int kRawWidth = static_cast<int>(sizeof(T)) * 8;
  const std::uint8_t* row = codes + t * stride;
  T* dst = out + t * d;
  if (b == kRawWidth) {
    // The glue guarantees stride % sizeof(T) == 0 and an aligned base.
    const T* src = reinterpret_cast<const T*>(row);
    for (int i = threadIdx.x; i < d; i += kCodecThreads) dst[i] = src[i];
  } else if (b >= 1 && b <= 8) {
    const float lo32 = __half2float(lo[t]), step32 = __half2float(step[t]);
    const unsigned mask = (1u << b) - 1u;
    for (int i = threadIdx.x; i < d; i += kCodecThreads) {
      const std::int64_t bit0 = static_cast<std::int64_t>(i) * b;
      const std::int64_t byte = bit0 >> 3;
      const int shift = static_cast<int>(bit0 & 7);
      unsigned v = row[byte];
      if (shift + b > 8) v |= static_cast<unsigned>(row[byte + 1]) << 8;
      const float q = code_to_float((v >> shift) & mask);
      store_f32(dst, i, __fadd_rn(__fmul_rn(q, step32), lo32));
    }
  } else {
    // Not a width any encoder produces (frames are validated before decoding): zeros.
    for (int i = threadIdx.x; i < d; i += kCodecThreads) store_f32(dst, i, 0.0f);
  }
  // The outlier writes must land after the dense writes of the same row.
  __syncthreads();
  const int n = min(max(cnt[t], 0), capacity);
  for (int s = threadIdx.x; s < n; s += kCodecThreads) {
    const int ch = idx[t * capacity + s];
    if (ch >= 0 && ch < d) dst[ch] = val[t * capacity + s];
  }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace sk
