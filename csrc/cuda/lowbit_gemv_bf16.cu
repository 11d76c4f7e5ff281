// The GEMV kernels for __nv_bfloat16 activations (see lowbit_gemv_launch.cuh).
#include "lowbit_gemv_launch.cuh"

namespace sk {
namespace cuda {
namespace gemv_launch {

template void launch_gemv<__nv_bfloat16>(const GemvArgs&, int, bool);

}  // namespace gemv_launch
}  // namespace cuda
}  // namespace sk
