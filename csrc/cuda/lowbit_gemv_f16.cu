// The GEMV kernels for __half activations (see lowbit_gemv_launch.cuh).
#include "lowbit_gemv_launch.cuh"

namespace sk {
namespace cuda {
namespace gemv_launch {

template void launch_gemv<__half>(const GemvArgs&, int, bool);

}  // namespace gemv_launch
}  // namespace cuda
}  // namespace sk
