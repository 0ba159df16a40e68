// Input validation of the indexer ops (SPEC sections 3-4), shared by the CPU and CUDA glue.
// Value ranges that would need a device->host copy to check are not checked here; the kernels
// clamp them instead (ks/ke to [0, S], visible lengths to [0, max_context_len]) and skip
// block-table entries outside [0, num_blocks), so no input can cause an out-of-bounds read.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/checks.h"
#include "indexer/mxfp4.h"

namespace dsa {

// How the keys are stored (SPEC 3 FP8 keys with an fp32 scale a key; SPEC 10.5 MXFP4 keys,
// csrc/indexer/mxfp4.h). Told apart by k_scale's dtype (dense) or the cache's last dim (paged).
enum class KeyFormat { kFp8, kMxfp4 };

struct IndexerLogitsShape {
  int64_t T, H, D, S;
  KeyFormat format;
};

inline IndexerLogitsShape check_indexer_logits_inputs(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& k_scale,
                                                      const at::Tensor& weights,
                                                      const at::Tensor& ks,
                                                      const at::Tensor& ke) {
  check_same_device(k, "k", q, "q");
  check_same_device(k_scale, "k_scale", q, "q");
  check_same_device(weights, "weights", q, "q");
  check_same_device(ks, "ks", q, "q");
  check_same_device(ke, "ke", q, "q");
  check_dtype(q, "q", at::ScalarType::Float8_e4m3fn);
  // uint8 k_scale: MXFP4 keys (k [S, D/2] packed E2M1, k_scale [S, D/32] ue8m0 bytes).
  const bool mx = k_scale.scalar_type() == at::kByte;
  if (mx) {
    check_dtype(k, "k", at::kByte);
  } else {
    check_dtype(k, "k", at::ScalarType::Float8_e4m3fn);
    check_dtype(k_scale, "k_scale", at::kFloat);
  }
  check_dtype(weights, "weights", at::kFloat);
  check_dtype(ks, "ks", at::kInt);
  check_dtype(ke, "ke", at::kInt);
  check_dim(q, "q", 3, "[T, H, D]");
  check_dim(k, "k", 2, mx ? "[S, D / 2] (MXFP4: two E2M1 values a byte)" : "[S, D]");
  check_dim(k_scale, "k_scale", mx ? 2 : 1, mx ? "[S, D / 32] (MXFP4: a ue8m0 byte per 32 values)" : "[S]");
  check_dim(weights, "weights", 2, "[T, H]");
  check_dim(ks, "ks", 1, "[T]");
  check_dim(ke, "ke", 1, "[T]");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), S = k.size(0);
  TORCH_CHECK_VALUE(H > 0 && D > 0, "q must have H > 0 heads and D > 0 dims, got shape ",
                    q.sizes());
  if (mx) {
    TORCH_CHECK_VALUE(D % mxfp4::kGroup == 0, "q: MXFP4 keys need a head dim D that is a multiple of 32, got D = ", D);
    check_size(k, "k", 1, D / 2, "D / 2 packed bytes (MXFP4 keys, D of q)");
    check_size(k_scale, "k_scale", 1, D / mxfp4::kGroup, "D / 32 scale bytes (MXFP4 keys, D of q)");
  } else {
    check_size(k, "k", 1, D, "head dim D of q");
  }
  check_size(k_scale, "k_scale", 0, S, "number of keys S of k");
  check_size(weights, "weights", 0, T, "number of queries T of q");
  check_size(weights, "weights", 1, H, "number of heads H of q");
  check_size(ks, "ks", 0, T, "number of queries T of q");
  check_size(ke, "ke", 0, T, "number of queries T of q");
  check_contiguous(q, "q");
  check_contiguous(k, "k");
  check_contiguous(k_scale, "k_scale");
  check_contiguous(weights, "weights");
  check_contiguous(ks, "ks");
  check_contiguous(ke, "ke");
  return {T, H, D, S, mx ? KeyFormat::kMxfp4 : KeyFormat::kFp8};
}

struct PagedIndexerLogitsShape {
  int64_t B, N, H, D, num_blocks, block_size, max_blocks, block_table_stride, max_context_len;
  bool per_query_lens;  // context_lens is [B, N] (each query's visible length) rather than [B]
  KeyFormat format;     // FP8 cache (last dim D + 4) or MXFP4 cache (last dim D/2 + D/32)
};

inline PagedIndexerLogitsShape check_paged_indexer_logits_inputs(
    const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& weights,
    const at::Tensor& context_lens, const at::Tensor& block_table, int64_t max_context_len) {
  check_same_device(kv_cache, "kv_cache", q, "q");
  check_same_device(weights, "weights", q, "q");
  check_same_device(context_lens, "context_lens", q, "q");
  check_same_device(block_table, "block_table", q, "q");
  check_dtype(q, "q", at::ScalarType::Float8_e4m3fn);
  check_dtype(kv_cache, "kv_cache", at::kByte);
  check_dtype(weights, "weights", at::kFloat);
  check_dtype(context_lens, "context_lens", at::kInt);
  check_dtype(block_table, "block_table", at::kInt);
  check_dim(q, "q", 4, "[B, N, H, D]");
  check_dim(kv_cache, "kv_cache", 4, "[num_blocks, block_size, 1, D + 4 (FP8) or D/2 + D/32 (MXFP4)]");
  check_dim(weights, "weights", 2, "[B * N, H]");
  check_dim(block_table, "block_table", 2, "[B, max_blocks]");
  TORCH_CHECK(context_lens.dim() == 1 || context_lens.dim() == 2,
              "context_lens must be 1-D [B] or 2-D [B, N], got shape ", context_lens.sizes());
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK_VALUE(N > 0 && H > 0 && D > 0, "q must have N > 0, H > 0 and D > 0, got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(max_context_len >= 0, "max_context_len must be >= 0, got ",
                    max_context_len);
  check_size(kv_cache, "kv_cache", 2, 1, "one K head");
  const bool mx = D % mxfp4::kGroup == 0 && kv_cache.size(3) == mxfp4::cache_row_bytes(D);
  if (!mx)
    TORCH_CHECK_VALUE(kv_cache.size(3) == D + 4, "kv_cache.size(3) must be D + 4 = ", D + 4,
                      " (FP8 keys: D values + an fp32 scale)",
                      D % mxfp4::kGroup == 0 ? " or D/2 + D/32 = " : "",
                      D % mxfp4::kGroup == 0 ? std::to_string(mxfp4::cache_row_bytes(D)) : std::string(),
                      D % mxfp4::kGroup == 0 ? " (MXFP4 keys)" : "", " for D = ", D, " of q, got ",
                      kv_cache.size(3));
  TORCH_CHECK_VALUE(kv_cache.size(1) > 0, "kv_cache block_size must be > 0, got shape ",
                    kv_cache.sizes());
  check_size(weights, "weights", 0, B * N, "B * N queries of q");
  check_size(weights, "weights", 1, H, "number of heads H of q");
  check_size(context_lens, "context_lens", 0, B, "batch size B of q");
  if (context_lens.dim() == 2) check_size(context_lens, "context_lens", 1, N, "N queries per sequence of q");
  check_size(block_table, "block_table", 0, B, "batch size B of q");
  check_contiguous(q, "q");
  check_contiguous(kv_cache, "kv_cache");
  check_contiguous(weights, "weights");
  check_contiguous(context_lens, "context_lens");
  TORCH_CHECK(block_table.size(1) <= 1 || block_table.stride(1) == 1,
              "block_table rows must be contiguous (stride(1) == 1), got strides ",
              block_table.strides());
  return {B,
          N,
          H,
          D,
          kv_cache.size(0),
          kv_cache.size(1),
          block_table.size(1),
          block_table.size(0) > 1 ? block_table.stride(0) : block_table.size(1),
          max_context_len,
          context_lens.dim() == 2,
          mx ? KeyFormat::kMxfp4 : KeyFormat::kFp8};
}

}  // namespace dsa
