// The index rules of the indexer ops, written once for the CPU and CUDA kernels (torch-free):
// how a row's key range is clamped, how long each paged query's visible context is, and where a
// cached token's bytes live in the DeepGEMM / vLLM indexer K cache (SPEC section 2).
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace dsa {
namespace indexer {

DSA_HD int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Row t of indexer_logits sees keys [lo, hi): ks/ke clamped to [0, S], empty when ks >= ke.
struct KeyRange {
  int64_t lo, hi;
};
DSA_HD KeyRange clamped_key_range(int32_t ks, int32_t ke, int64_t S) {
  const int64_t lo = clamp64(ks, 0, S);
  const int64_t hi = clamp64(ke, lo, S);
  return {lo, hi};
}

// How many positions query j of sequence b sees. `context_lens` is [B] (cached tokens including
// the N new ones: query j sees context_lens[b] - N + 1 + j) or [B, N] (per_query_lens: each
// query's length directly). Clamped to [0, max_context_len] so the output row bounds it.
DSA_HD int64_t visible_length(const int32_t* context_lens, bool per_query_lens, int64_t b,
                              int64_t j, int64_t N, int64_t max_context_len) {
  const int64_t len = per_query_lens ? static_cast<int64_t>(context_lens[b * N + j])
                                     : static_cast<int64_t>(context_lens[b]) - N + 1 + j;
  return clamp64(len, 0, max_context_len);
}

// Physical block of logical block `logical` of a sequence, or -1 when the block-table row has
// no such entry or the entry is outside [0, num_blocks) (that position is never read).
DSA_HD int64_t physical_block(const int32_t* block_table_row, int64_t logical, int64_t max_blocks,
                              int64_t num_blocks) {
  if (logical < 0 || logical >= max_blocks) return -1;
  const int64_t blk = block_table_row[logical];
  return (blk >= 0 && blk < num_blocks) ? blk : -1;
}

// Byte offsets inside the cache (int64: num_blocks * block_size * (D + 4) exceeds 2^31).
DSA_HD int64_t k_value_offset(int64_t blk, int64_t off, int64_t block_size, int64_t D) {
  return blk * block_size * (D + 4) + off * D;
}
DSA_HD int64_t k_scale_offset(int64_t blk, int64_t off, int64_t block_size, int64_t D) {
  return blk * block_size * (D + 4) + block_size * D + 4 * off;
}

}  // namespace indexer
}  // namespace dsa
