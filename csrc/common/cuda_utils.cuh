// Torch-free helpers for kernels and launchers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// Launchers return the launch status; the .cpp glue turns it into an exception.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

}  // namespace dsa
