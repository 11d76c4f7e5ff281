// Host launchers of the CUDA kernels. Torch-free and CUDA-header-free so the pybind11 bindings
// compile with the plain C++ compiler: device pointers and the stream travel as integers.
// Every launcher enqueues its work on `stream` without synchronising and throws
// std::runtime_error (with cudaGetErrorString) when the launch fails.
#pragma once

#include <cstdint>
#include <string>

namespace sk {
namespace cuda {

using ptr_t = std::uintptr_t;

// Number of visible devices as seen by this module's CUDA runtime; throws with the runtime's
// reason (for example a driver older than the toolkit) when it cannot tell.
int device_count();
// "runtime X.Y, driver X.Y" of this module's statically linked runtime and the installed driver.
std::string version_string();

// codes u8 [rows, n] -> packed u8 [rows, ceil(n*bits/8)] (docs/FORMATS.md section 1).
void pack_bits(ptr_t codes, ptr_t packed, std::int64_t rows, std::int64_t n, int bits, ptr_t stream);
// packed u8 [rows, packed_stride] (stride >= ceil(n*bits/8)) -> codes u8 [rows, n].
void unpack_bits(ptr_t packed, ptr_t codes, std::int64_t rows, std::int64_t n, std::int64_t packed_stride, int bits,
                 ptr_t stream);

// Widest row the codec kernels take: its outlier mask (one bit per channel) lives in 40 KiB of
// shared memory, leaving room for the static shared memory under the 48 KiB a block gets
// without opting in. The Python glue sends wider rows to the reference.
constexpr std::int64_t kCodecMaxD = 40 * 1024 * 8;

// Fused TS + TAB-Q encode of x [T, d] (dtype code in common.cuh), one block per token.
// bit_menu: bit b-1 set when width b (1..8) is in the menu. forced_bits: 0 or u8 [T].
// Outputs as splitkernels.ops.reference.ts_tabq_encode; every byte of every output is written.
void ts_tabq_encode(ptr_t x, int dtype, std::int64_t t, std::int64_t d, bool abs_threshold, double threshold,
                    std::int64_t capacity, int bit_menu, double eps, ptr_t forced_bits, ptr_t bits, ptr_t lo,
                    ptr_t step, ptr_t hi, ptr_t cnt, ptr_t idx, ptr_t val, ptr_t codes, ptr_t nbytes, ptr_t stream);

// Decode into out [T, d] (dtype of val). codes is u8 [T, codes_stride], stride >= d * itemsize.
void ts_tabq_decode(ptr_t bits, ptr_t lo, ptr_t step, ptr_t cnt, ptr_t idx, ptr_t val, ptr_t codes, int dtype,
                    std::int64_t t, std::int64_t d, std::int64_t capacity, std::int64_t codes_stride, ptr_t out,
                    ptr_t stream);

// Largest M the GEMV handles for every width and dtype (gemv_fused says which larger M it takes);
// larger M dequantises and uses a library matmul.
constexpr int kGemvMaxM = 16;
// Fewest output rows per GEMV block (a row tile); split-K counts finished splits per tile.
constexpr int kGemvTileRows = 16;

// Whether lowbit_gemv takes an M x K product: bits 2, 3, 4, 8, group_size % 32 == 0, group_size | K,
// K < 2^31 and M <= kGemvMaxM, or M <= 32 for W4 with fp16/bf16 activations and group_size % 128 == 0.
bool gemv_fused(std::int64_t m, std::int64_t k, int bits, std::int64_t group_size, int dtype);

// The smallest M that W4 fp16/bf16 products send to the tensor-core kernel (default 2; 33 turns
// it off, and M 17..32 then falls back too). value > 0 sets it (benchmarks compare both kernels at
// small M), 0 only reads; returns the previous value. gemv_fused and gemv_splits follow it, so a
// caller that caches their answers clears those caches.
int gemv_tc_min_m(int value);

// GEMV kernel variants that bench/gpu_gemv_sweep.py times against the defaults (0), as bits:
// kVariantCcPrefetch issues the CUDA-core kernel's next step of loads before the current step's
// arithmetic at M = 1. On an H200 it won unsplit at 4096 x 4096 (11.1 vs 12.5 us) and lost or
// tied elsewhere (bench/results/gpu-20261204), so the default does not take it. (The tensor-core
// kernel's prefetch and four-block steps lost at every shape and were removed.)
constexpr int kVariantCcPrefetch = 1;
constexpr int kVariantAll = 1;

// Sets the variants later GEMV launches take (value >= 0) or only reads them (-1); returns the
// previous value.
int gemv_variant(int value);

// How many blocks the GEMV splits K over for an M x N x K product on the current device
// (1..16): enough warps to fill its SMs (the SM count is asked once per device).
int gemv_splits(std::int64_t m, std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, int dtype);

// y [M, N] = x [M, K] @ dequant(W).T (+ bias), fp32 accumulation, for the shapes gemv_fused
// takes. W4 with fp16/bf16 activations, M >= 2 and group_size % 128 == 0 runs on tensor cores (exact products, fp32 sums), the rest on CUDA
// cores. x, scale, zero, bias and y share `dtype`; bias may be 0. All pointers but bias 16-byte
// aligned. With splits > 1 (from gemv_splits) the kernel needs partial, fp32 [splits, M, N], and
// tile_done, int32 [>= ceil(N / kGemvTileRows)] all zero, which it leaves zero again (one
// tile_done per stream: launches on one stream run in order).
void lowbit_gemv(ptr_t x, ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t bias, ptr_t y, int dtype, std::int64_t m,
                 std::int64_t n, std::int64_t k, int bits, std::int64_t group_size, int splits, ptr_t partial,
                 ptr_t tile_done, ptr_t stream);

// w [N, K] fp32 = q * scale + zero for any bits in {2, 3, 4, 8} and any group_size dividing K;
// scale/zero in `dtype`.
void dequantize_weight(ptr_t qweight, ptr_t scale, ptr_t zero, ptr_t w, int dtype, std::int64_t n, std::int64_t k,
                       int bits, std::int64_t group_size, ptr_t stream);

// Codec v2 (docs/FORMATS.md sections 5.2 and 5.5). Both directions work on one packed byte
// buffer laid out by splitkernels/codec/v2_device.py: an int64 header (escapes, raw tokens,
// non-finite inputs) in the first kV2HeaderBytes, raw flags u8 [T] right after, symbols u8 [T, d]
// at sym_off, then the values (dtype) at val_off: the escaped values of the coded tokens
// token-major in channel order, followed by the raw tokens. Offsets are multiples of 16.
// scratch is int64 [4 * T] on the device; a frame of one token needs none (it may be 0).
constexpr std::int64_t kV2HeaderBytes = 32;

// x [T, d] -> packed: symbols (escape symbol 2*kmax+1, raw tokens' rows 0), raw flags, header and
// values; center/inv are fp32 [d]. The header's three words, the flags, every symbol and the
// values up to the header's counts are written; alignment padding is not.
void v2_encode(ptr_t x, int dtype, std::int64_t t, std::int64_t d, ptr_t center, ptr_t inv, int kmax,
               std::int64_t raw_limit, ptr_t packed, std::int64_t sym_off, std::int64_t val_off, ptr_t scratch,
               ptr_t stream);

// packed (raw flags, symbols, n_escapes escaped values then the raw tokens) -> out [T, d] (dtype):
// fp32(fp32((s - kmax) * step) + center) rounded to dtype, escapes and raw tokens exact. The
// header's first two words are overwritten with the counts the kernels find (T > 1).
void v2_decode(ptr_t packed, std::int64_t sym_off, std::int64_t val_off, std::int64_t n_escapes, std::int64_t t,
               std::int64_t d, ptr_t step, ptr_t center, int kmax, int dtype, ptr_t out, ptr_t scratch,
               ptr_t stream);

}  // namespace cuda
}  // namespace sk
