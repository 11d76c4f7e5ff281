// W8A8 linear: per-token int8 quantisation of x, exact int32 dot products against int8
// weights, fp32 rescale. Every floating-point step repeats the reference's operations in
// its order, so the result equals the reference bit for bit (not just within a tolerance).
// The kernels (isa/int8_dot.cpp) follow the instruction set chosen for the lowbit kernels.
#include <algorithm>

#include "common/half.h"
#include "cpu/aligned_vector.h"
#include "cpu/int8_kernels.h"
#include "cpu/linear.h"
#include "cpu/thread_pool.h"

namespace sk {

std::string int8_linear(const void* x, int dtype, int64_t M, int64_t K, const int8_t* w, int64_t N,
                        const float* w_scale, const float* bias, void* y) {
  if (K >= kInt8MaxK) return "K is too large for exact int32 accumulation";
  const Int8Kernels& kernels = current_int8_kernels();
  AlignedVector<int8_t> xq(static_cast<size_t>(M * K));
  AlignedVector<float> xs(M);
  AlignedVector<int32_t> xsum(M);
  parallel_for(M, 4, [&](int64_t m0, int64_t m1) {
    AlignedVector<float> row(dtype == kFloat32 ? 0 : K);
    for (int64_t m = m0; m < m1; ++m) {
      const uint8_t* src = static_cast<const uint8_t*>(x) + m * K * dtype_size(dtype);
      const float* xr = reinterpret_cast<const float*>(src);
      if (dtype != kFloat32) {
        to_float(src, dtype, K, row.data());
        xr = row.data();
      }
      xs[m] = kernels.quantize_row(xr, K, xq.data() + m * K, &xsum[m]);
    }
  });
  Int8Problem p{xq.data(), xsum.data(), xs.data(), w, w_scale, bias, M, N, K, y, dtype};
  // About eight chunks per thread (a descheduled thread delays at most a small share), in
  // whole 32-row tiles.
  const int64_t want = N / (8 * std::max(1, num_threads()));
  const int64_t grain = std::max<int64_t>(32, (want + 31) / 32 * 32);
  parallel_for(N, grain, [&](int64_t n0, int64_t n1) { kernels.rows(p, n0, n1); });
  return "";
}

}  // namespace sk
