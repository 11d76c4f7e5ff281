// The GEMV kernels for float activations (see lowbit_gemv_launch.cuh).
#include "lowbit_gemv_launch.cuh"

namespace sk {
namespace cuda {
namespace gemv_launch {

template void launch_gemv<float>(const GemvArgs&, int, bool);

}  // namespace gemv_launch
}  // namespace cuda
}  // namespace sk
