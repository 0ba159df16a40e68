// hadamard_fp8_quantize launcher (torch-free).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa {

// x: [rows, d] bf16 (x_is_bf16) or fp32, contiguous; d a power of two in [32, 1024];
// block divides d with block >= d / 32. Writes out [rows, d] e4m3 bytes, scales [rows, d / block].
cudaError_t launch_hadamard_fp8_quantize(const void* x, bool x_is_bf16, uint8_t* out, float* scales,
                                         int64_t rows, int d, int block, bool ue8m0,
                                         cudaStream_t stream);

}  // namespace dsa
