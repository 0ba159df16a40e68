// Input validation of the MXFP4 quantiser and cache writer (csrc/indexer/mxfp4.h), shared by
// the CPU and CUDA glue. Messages name the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "indexer/mxfp4.h"

namespace dsa {

// mxfp4_quantize: x [..., D] bf16/fp32, D a positive multiple of 32.
inline void check_mxfp4_quantize(const at::Tensor& x) {
  check_dtype_in(x, "x", {at::kBFloat16, at::kFloat});
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension [..., D], got a 0-D tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0 && x.size(-1) % mxfp4::kGroup == 0,
                    "x.size(-1) must be a positive multiple of 32 (one ue8m0 scale per 32 values), got ",
                    x.size(-1));
}

struct Mxfp4CacheGeometry {
  int64_t num_blocks, block_size, head_dim;
  int64_t num_slots() const { return num_blocks * block_size; }
};

// mxfp4_indexer_k_cache_write: k [N, D] bf16/fp32 (D % 32 == 0), slot_mapping [N] int32/int64,
// kv_cache uint8 [num_blocks, block_size, 1, D/2 + D/32], contiguous.
inline Mxfp4CacheGeometry check_mxfp4_k_cache_write(const at::Tensor& k, const at::Tensor& slot_mapping,
                                                    const at::Tensor& kv_cache) {
  check_dtype_in(k, "k", {at::kBFloat16, at::kFloat});
  check_dim(k, "k", 2, "[N, D]");
  const int64_t D = k.size(1);
  TORCH_CHECK_VALUE(D > 0 && D % mxfp4::kGroup == 0, "k.size(1) = D must be a positive multiple of 32, got ", D);
  check_dtype(kv_cache, "kv_cache", at::kByte);
  check_dim(kv_cache, "kv_cache", 4, "[num_blocks, block_size, 1, D/2 + D/32]");
  check_size(kv_cache, "kv_cache", 2, 1, "one K head");
  check_size(kv_cache, "kv_cache", 3, mxfp4::cache_row_bytes(D),
             "D/2 + D/32 bytes per token (MXFP4: packed E2M1 values + ue8m0 scales, D of k)");
  check_contiguous(kv_cache, "kv_cache");
  check_dtype_in(slot_mapping, "slot_mapping", {at::kLong, at::kInt});
  check_dim(slot_mapping, "slot_mapping", 1, "[N]");
  check_size(slot_mapping, "slot_mapping", 0, k.size(0), "N = k.size(0)");
  check_same_device(slot_mapping, "slot_mapping", k, "k");
  check_same_device(kv_cache, "kv_cache", k, "k");
  return {kv_cache.size(0), kv_cache.size(1), D};
}

}  // namespace dsa
