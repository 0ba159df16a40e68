// Input validation of sparse_mla_decode, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "common/checks.h"
#include "mla_decode/mla_decode_layout.h"

namespace dsa::mla_decode {

// Sizes every kernel of the op needs, read off validated tensors.
struct DecodeShape {
  int64_t batch, s_q, heads, topk;       // B, s_q, H, K
  int64_t num_blocks, block_size;
  bool fp8_cache;                        // uint8 656-byte records, else bf16 576-value rows
  bool per_query_topk_length;            // topk_length [B, s_q] rather than [B]
  int64_t num_slots() const { return num_blocks * block_size; }
};

inline DecodeShape check_sparse_mla_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                                           const at::Tensor& indices, double sm_scale,
                                           int64_t d_v,
                                           const c10::optional<at::Tensor>& attn_sink,
                                           const c10::optional<at::Tensor>& topk_length) {
  check_dim(q, "q", 4, "[B, s_q, H, 576]");
  check_dtype(q, "q", at::kBFloat16);
  check_size(q, "q", 3, kDQK, "d_qk = 512 nope + 64 rope");
  check_contiguous(q, "q");

  check_dim(kv_cache, "kv_cache", 4, "[num_blocks, block_size, 1, record]");
  check_same_device(kv_cache, "kv_cache", q, "q");
  check_dtype_in(kv_cache, "kv_cache", {at::kByte, at::kBFloat16});
  const bool fp8 = kv_cache.scalar_type() == at::kByte;
  check_size(kv_cache, "kv_cache", 2, 1, "one latent KV head");
  check_size(kv_cache, "kv_cache", 3, fp8 ? kFp8RecordBytes : kDQK,
             fp8 ? "bytes of an FP8 MLA record" : "bf16 values of an MLA row");
  check_contiguous(kv_cache, "kv_cache");

  check_dim(indices, "indices", 3, "[B, s_q, K]");
  check_same_device(indices, "indices", q, "q");
  check_dtype(indices, "indices", at::kInt);
  check_size(indices, "indices", 0, q.size(0), "B of q");
  check_size(indices, "indices", 1, q.size(1), "s_q of q");
  check_contiguous(indices, "indices");

  TORCH_CHECK_VALUE(d_v == kDV, "d_v must be ", kDV, " (V is the 512 nope values of the cache), got ", d_v);
  TORCH_CHECK_VALUE(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);

  if (attn_sink.has_value()) {
    const auto& s = *attn_sink;
    check_dim(s, "attn_sink", 1, "[H]");
    check_same_device(s, "attn_sink", q, "q");
    check_dtype(s, "attn_sink", at::kFloat);
    check_size(s, "attn_sink", 0, q.size(2), "H of q");
    check_contiguous(s, "attn_sink");
  }
  bool per_query = false;
  if (topk_length.has_value()) {
    const auto& t = *topk_length;
    TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "topk_length must be 1-D [B] or 2-D [B, s_q], got shape ",
                t.sizes());
    check_same_device(t, "topk_length", q, "q");
    check_dtype(t, "topk_length", at::kInt);
    check_size(t, "topk_length", 0, q.size(0), "B of q");
    if (t.dim() == 2) check_size(t, "topk_length", 1, q.size(1), "s_q of q");
    check_contiguous(t, "topk_length");
    per_query = t.dim() == 2;
  }
  return DecodeShape{q.size(0), q.size(1), q.size(2), indices.size(2),
                     kv_cache.size(0), kv_cache.size(1), fp8, per_query};
}

}  // namespace dsa::mla_decode
