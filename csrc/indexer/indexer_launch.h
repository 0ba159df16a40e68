// indexer family: torch-free host launchers of the CUDA kernels (called by indexer_cuda.cpp).
// Shapes the kernels serve: H in {32, 64}, D = 128, FP8 operands passed as raw bytes; all
// pointers 16-byte aligned (the paged cache additionally needs block_size % 4 == 0 so that
// every token's 128 FP8 bytes start on a 16-byte boundary). Index values (ks/ke, context
// lengths, block-table entries) are not trusted: the kernels clamp or skip them.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa {

// Whether the CUDA kernels serve this many heads and this head dim.
bool indexer_cuda_supports(int64_t heads, int64_t head_dim);

cudaError_t launch_indexer_logits(const uint8_t* q, const uint8_t* k, const float* k_scale,
                                  const float* weights, const int32_t* ks, const int32_t* ke,
                                  float* out, int64_t T, int64_t S, int64_t heads,
                                  bool clean_logits, cudaStream_t stream);

cudaError_t launch_paged_indexer_logits(const uint8_t* q, const uint8_t* kv_cache,
                                        const float* weights, const int32_t* context_lens,
                                        bool per_query_lens, const int32_t* block_table,
                                        int64_t block_table_stride, float* out, int64_t B,
                                        int64_t N, int64_t heads, int64_t num_blocks,
                                        int64_t block_size, int64_t max_blocks,
                                        int64_t max_context_len, bool clean_logits,
                                        cudaStream_t stream);

// MXFP4 keys (csrc/indexer/mxfp4.h): k_packed [S, D/2] and k_scale [S, D/32] bytes (dense), or
// a cache of D/2 + D/32 bytes a token (paged, same geometry rules as the FP8 cache).
cudaError_t launch_indexer_logits_mxfp4(const uint8_t* q, const uint8_t* k_packed,
                                        const uint8_t* k_scale, const float* weights,
                                        const int32_t* ks, const int32_t* ke, float* out, int64_t T,
                                        int64_t S, int64_t heads, bool clean_logits,
                                        cudaStream_t stream);

cudaError_t launch_paged_indexer_logits_mxfp4(const uint8_t* q, const uint8_t* kv_cache,
                                              const float* weights, const int32_t* context_lens,
                                              bool per_query_lens, const int32_t* block_table,
                                              int64_t block_table_stride, float* out, int64_t B,
                                              int64_t N, int64_t heads, int64_t num_blocks,
                                              int64_t block_size, int64_t max_blocks,
                                              int64_t max_context_len, bool clean_logits,
                                              cudaStream_t stream);

// MXFP4 quantiser: rows x D (bf16 bits or fp32) into packed [rows, D/2] / scale [rows, D/32]
// (slots == nullptr), or into the paged cache `packed` at slots[rows] (int64; a slot < 0 or
// >= num_slots is skipped; `scale` unused).
cudaError_t launch_mxfp4_quantize(const void* x, bool x_bf16, int64_t rows, int64_t D, uint8_t* packed,
                                  uint8_t* scale, const int64_t* slots, int64_t num_slots,
                                  int64_t block_size, cudaStream_t stream);

}  // namespace dsa
