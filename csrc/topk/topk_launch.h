// topk family: torch-free host launchers (raw pointers, sizes, strides, stream).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa {

// out [T, k] int32 contiguous; logits rows of S fp32 at row_stride elements; ks/ke [T] int32 or
// null; 1 <= k <= 4096. Exact for every input (see topk_kernels.cuh). CUDA-graph safe.
cudaError_t topk_indices_launch(const float* logits, int64_t T, int64_t S, int64_t row_stride,
                                const int32_t* ks, const int32_t* ke, int k, bool sorted,
                                int32_t* out, cudaStream_t stream);

// out [R, K] = slot ids of indices [R, K] through block_table [B, M] (row r -> r / (R / B)).
cudaError_t topk_slot_ids_launch(const int32_t* indices, int64_t R, int64_t K,
                                 const int32_t* block_table, int64_t B, int64_t M,
                                 int64_t block_size, int32_t* out, cudaStream_t stream);

}  // namespace dsa
