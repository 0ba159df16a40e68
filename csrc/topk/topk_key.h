// Order-preserving uint32 key of an fp32 logit, shared by the CPU and CUDA top-k kernels.
// Larger value -> larger key; -0.0 and +0.0 get the same key (they are equal values, so the
// index tie-break decides); every NaN gets key 0, below -inf (0x007FFFFF), as SPEC section 3
// requires. Key order plus "smaller index first" among equal keys is the whole selection rule.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace dsa {

DSA_HD uint32_t topk_key_from_bits(uint32_t bits) {
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0u;  // NaN, any sign or payload
  if (bits == 0x80000000u) bits = 0u;                 // -0.0 == +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// Clamp a row's [ks, ke) to [0, S]; an inverted range is empty (hi == lo).
DSA_HD void topk_row_range(const int32_t* ks, const int32_t* ke, int64_t row, int64_t S,
                           int64_t& lo, int64_t& hi) {
  lo = ks ? static_cast<int64_t>(ks[row]) : 0;
  hi = ke ? static_cast<int64_t>(ke[row]) : S;
  lo = lo < 0 ? 0 : (lo > S ? S : lo);
  hi = hi < lo ? lo : (hi > S ? S : hi);
}

// Global slot id of token position `pos` of a sequence whose block-table row is `table`
// (M entries); -1 for a negative position, a block past the table, a negative table entry,
// or a slot id that does not fit int32.
DSA_HD int32_t topk_slot_id(int32_t pos, const int32_t* table, int64_t M, int64_t block_size) {
  if (pos < 0) return -1;
  const int64_t blk = pos / block_size;
  if (blk >= M) return -1;
  const int64_t phys = table[blk];
  if (phys < 0) return -1;
  const int64_t slot = phys * block_size + pos % block_size;
  return slot > 0x7FFFFFFFLL ? -1 : static_cast<int32_t>(slot);
}

}  // namespace dsa
