#include "hadamard/hadamard_kernels.cuh"
#include "hadamard/hadamard_launch.h"

namespace dsa {
namespace {

template <typename T>
cudaError_t launch_typed(const T* x, uint8_t* out, float* scales, int64_t rows, int d, int block,
                         bool ue8m0, cudaStream_t stream) {
  constexpr int kWarps = 8;
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), threads(32 * kWarps);
  switch (d) {
#define DSA_HADAMARD_CASE(VPT)                                                                  \
  case 32 * VPT:                                                                                \
    hadamard_fp8_quantize_kernel<VPT, T><<<grid, threads, 0, stream>>>(x, out, scales, rows,    \
                                                                       block, ue8m0);           \
    break;
    DSA_HADAMARD_CASE(1)
    DSA_HADAMARD_CASE(2)
    DSA_HADAMARD_CASE(4)
    DSA_HADAMARD_CASE(8)
    DSA_HADAMARD_CASE(16)
    DSA_HADAMARD_CASE(32)
#undef DSA_HADAMARD_CASE
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_hadamard_fp8_quantize(const void* x, bool x_is_bf16, uint8_t* out, float* scales,
                                         int64_t rows, int d, int block, bool ue8m0,
                                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (x_is_bf16)
    return launch_typed(static_cast<const __nv_bfloat16*>(x), out, scales, rows, d, block, ue8m0, stream);
  return launch_typed(static_cast<const float*>(x), out, scales, rows, d, block, ue8m0, stream);
}

}  // namespace dsa
