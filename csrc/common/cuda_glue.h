// Tensor-side helpers for the *_cuda.cpp glue files (host C++, compiled by g++, not nvcc).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

namespace dsa {

inline cudaStream_t current_stream(const at::Tensor& on) {
  return c10::cuda::getCurrentCUDAStream(on.device().index()).stream();
}

}  // namespace dsa

// Raise a RuntimeError carrying the CUDA error string of a launcher's return value.
#define DSA_CHECK_CUDA(expr)                                                         \
  do {                                                                               \
    cudaError_t dsa_err_ = (expr);                                                   \
    TORCH_CHECK(dsa_err_ == cudaSuccess, "dsa_ext CUDA error: ", cudaGetErrorString(dsa_err_), \
                " (", #expr, ")");                                                   \
  } while (0)
