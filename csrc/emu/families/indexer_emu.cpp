// Emulator entry points of the indexer family (tests/test_emu_indexer.py): the real launchers
// of indexer_launch.cu (rewritten for the host by launch_rewrite.py), called with raw pointers
// exactly as indexer_cuda.cpp calls them once its checks have passed. The kernel path is the
// launcher's choice: DSA_INDEXER_MMA=sync (emu_set_env) selects mma.sync, else wgmma.
#include "indexer_launch.gen.cu"

extern "C" {

int emu_indexer_logits(const uint8_t* q, const uint8_t* k, const float* k_scale, const float* weights,
                       const int32_t* ks, const int32_t* ke, float* out, int64_t T, int64_t S,
                       int64_t heads, int clean_logits) {
  return dsa::launch_indexer_logits(q, k, k_scale, weights, ks, ke, out, T, S, heads, clean_logits != 0,
                                    nullptr);
}

int emu_paged_indexer_logits(const uint8_t* q, const uint8_t* kv_cache, const float* weights,
                             const int32_t* context_lens, int per_query_lens, const int32_t* block_table,
                             int64_t block_table_stride, float* out, int64_t B, int64_t N, int64_t heads,
                             int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                             int64_t max_context_len, int clean_logits) {
  return dsa::launch_paged_indexer_logits(q, kv_cache, weights, context_lens, per_query_lens != 0,
                                          block_table, block_table_stride, out, B, N, heads, num_blocks,
                                          block_size, max_blocks, max_context_len, clean_logits != 0,
                                          nullptr);
}

// MXFP4 keys (csrc/indexer/mxfp4.h): the same kernels with kMx, and the quantiser / cache writer.
int emu_indexer_logits_mxfp4(const uint8_t* q, const uint8_t* k_packed, const uint8_t* k_scale,
                             const float* weights, const int32_t* ks, const int32_t* ke, float* out,
                             int64_t T, int64_t S, int64_t heads, int clean_logits) {
  return dsa::launch_indexer_logits_mxfp4(q, k_packed, k_scale, weights, ks, ke, out, T, S, heads,
                                          clean_logits != 0, nullptr);
}

int emu_paged_indexer_logits_mxfp4(const uint8_t* q, const uint8_t* kv_cache, const float* weights,
                                   const int32_t* context_lens, int per_query_lens,
                                   const int32_t* block_table, int64_t block_table_stride, float* out,
                                   int64_t B, int64_t N, int64_t heads, int64_t num_blocks,
                                   int64_t block_size, int64_t max_blocks, int64_t max_context_len,
                                   int clean_logits) {
  return dsa::launch_paged_indexer_logits_mxfp4(q, kv_cache, weights, context_lens, per_query_lens != 0,
                                                block_table, block_table_stride, out, B, N, heads,
                                                num_blocks, block_size, max_blocks, max_context_len,
                                                clean_logits != 0, nullptr);
}

int emu_mxfp4_quantize(const void* x, int x_bf16, int64_t rows, int64_t D, uint8_t* packed, uint8_t* scale,
                       const int64_t* slots, int64_t num_slots, int64_t block_size) {
  return dsa::launch_mxfp4_quantize(x, x_bf16 != 0, rows, D, packed, scale, slots, num_slots, block_size,
                                    nullptr);
}

}  // extern "C"
