// cache family: torch-free host launchers (raw pointers, sizes, cudaStream_t). Each returns
// the launch status; the glue (cache_cuda.cpp) turns it into an exception. Inputs are
// contiguous; shapes and dtypes have been validated by cache_checks.h.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cache/mla_layout.h"

namespace dsa::cache {

enum class InputType { kBFloat16, kFloat32 };

// x: [num_groups, group_size] (bf16/fp32) -> x_fp8 (same count of bytes), scale [num_groups].
cudaError_t launch_fp8_quantize(const void* x, InputType x_type, int64_t num_groups,
                                int64_t group_size, bool ue8m0, void* x_fp8, float* scale,
                                cudaStream_t stream);

// k [n, head_dim] into cache uint8 [num_blocks, block_size, 1, head_dim + 4] at slots [n]
// (int64 if slots_int64 else int32). Slots outside [0, num_blocks * block_size) are skipped.
cudaError_t launch_indexer_k_cache_write(const void* k, InputType k_type, const void* slots,
                                         bool slots_int64, int64_t n, int64_t head_dim,
                                         bool ue8m0, void* cache, int64_t num_blocks,
                                         int64_t block_size, cudaStream_t stream);

// cu_seqlens [batch + 1] int64 on the device, total = cu_seqlens[batch]; block_table
// [batch, max_blocks] int32. Writes k_fp8 [total, head_dim] bytes and k_scale [total].
cudaError_t launch_indexer_k_cache_gather(const void* cache, int64_t num_blocks,
                                          int64_t block_size, int64_t head_dim,
                                          const int32_t* block_table, int64_t max_blocks,
                                          const int64_t* cu_seqlens, int64_t batch, int64_t total,
                                          void* k_fp8, float* k_scale, cudaStream_t stream);

// kv [n, layout.dim] into an MLA cache of the given layout (mla_layout.h: V3.2 656-byte FP8
// records, V4 FP8 pages, or bf16 rows). Slots outside [0, layout.num_slots) are skipped.
cudaError_t launch_mla_kv_cache_write(const void* kv, InputType kv_type, const void* slots,
                                      bool slots_int64, int64_t n, void* cache,
                                      const MlaCacheLayout& layout, cudaStream_t stream);

// out [m, layout.dim] bf16, dequantised rows at slots [m]; slots outside the cache give zeros.
cudaError_t launch_mla_kv_cache_gather(const void* cache, const MlaCacheLayout& layout,
                                       const void* slots, bool slots_int64, int64_t m, void* out,
                                       cudaStream_t stream);

}  // namespace dsa::cache
