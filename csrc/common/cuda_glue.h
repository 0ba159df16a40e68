// Tensor-side helpers for the *_cuda.cpp glue files (host C++, compiled by g++, not nvcc).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <string>

namespace dsa {

inline cudaStream_t current_stream(const at::Tensor& on) {
  return c10::cuda::getCurrentCUDAStream(on.device().index()).stream();
}

}  // namespace dsa

#ifndef DSA_CUDA_ARCHS
#define DSA_CUDA_ARCHS "?"
#endif

namespace dsa {
// " on sm_XY; this build has kernels for TORCH_CUDA_ARCH_LIST=..." for a launcher that found no
// kernel for the current device (cudaErrorNoKernelImageForDevice: no image in the build for it,
// or a kernel its loaded image cannot run, e.g. MXFP4 keys without FP8 MMA), else "".
inline std::string no_kernel_context(cudaError_t err) {
  if (err != cudaErrorNoKernelImageForDevice) return "";
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  return " on sm_" + std::to_string(major) + std::to_string(minor) + " (cuda:" + std::to_string(dev) +
         "); this build has kernels for TORCH_CUDA_ARCH_LIST=\"" DSA_CUDA_ARCHS
         "\" (python -m dsa_ext lists which kernel each op runs on this device)";
}
}  // namespace dsa

// Raise a RuntimeError carrying the CUDA error string of a launcher's return value (the launcher
// names the op; a missing kernel also names the device and the archs built).
#define DSA_CHECK_CUDA(expr)                                                         \
  do {                                                                               \
    cudaError_t dsa_err_ = (expr);                                                   \
    TORCH_CHECK(dsa_err_ == cudaSuccess, "dsa_ext CUDA error: ", cudaGetErrorString(dsa_err_), \
                " (", #expr, ")", ::dsa::no_kernel_context(dsa_err_));              \
  } while (0)
