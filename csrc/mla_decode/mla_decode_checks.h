// Input validation of sparse_mla_decode, shared by the CPU and CUDA entry points.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>

#include "cache/cache_checks.h"
#include "common/checks.h"
#include "mla_decode/mla_decode_layout.h"

namespace dsa::mla_decode {

// One list of selected slots and the cache it indexes (SPEC 10.3: the window list of
// kv_cache and, optionally, the compressed list of extra_kv_cache).
struct DecodeList {
  cache::MlaCacheLayout layout;          // from cache/cache_checks.h (page pitch = stride(0))
  int64_t topk = 0;                      // K (or K2)
  bool per_query_topk_length = false;    // its lengths are [B, s_q] rather than [B]
};

// Sizes every kernel of the op needs, read off validated tensors.
struct DecodeShape {
  int64_t batch, s_q, heads, d_qk;       // B, s_q, H, 576 or 512
  DecodeList main, extra;                // extra.topk == 0 and has_extra false without the second list
  bool has_extra;
};

namespace detail {

inline void check_lengths(const c10::optional<at::Tensor>& len, const char* name, const at::Tensor& q,
                          bool* per_query) {
  *per_query = false;
  if (!len.has_value()) return;
  const auto& t = *len;
  TORCH_CHECK(t.dim() == 1 || t.dim() == 2, name, " must be 1-D [B] or 2-D [B, s_q], got shape ", t.sizes());
  check_same_device(t, name, q, "q");
  check_dtype(t, name, at::kInt);
  check_size(t, name, 0, q.size(0), "B of q");
  if (t.dim() == 2) check_size(t, name, 1, q.size(1), "s_q of q");
  check_contiguous(t, name);
  *per_query = t.dim() == 2;
}

inline void check_index_list(const at::Tensor& idx, const char* name, const at::Tensor& q) {
  check_dim(idx, name, 3, "[B, s_q, K]");
  check_same_device(idx, name, q, "q");
  check_dtype(idx, name, at::kInt);
  check_size(idx, name, 0, q.size(0), "B of q");
  check_size(idx, name, 1, q.size(1), "s_q of q");
  check_contiguous(idx, name);
}

// A cache of the model q belongs to: 656-byte V3.2 records / bf16 576 rows for d_qk 576, 584-byte
// V4 pages / bf16 512 rows for d_qk 512.
inline cache::MlaCacheLayout check_cache(const at::Tensor& c, const char* name, const at::Tensor& q) {
  const cache::MlaCacheLayout l = cache::check_mla_cache(c, name);
  check_same_device(c, name, q, "q");
  const char* what = l.kind == cache::MlaCacheKind::kV32Fp8 ? "656-byte V3.2 FP8 records"
                     : l.kind == cache::MlaCacheKind::kV4Fp8 ? "584-byte V4 FP8 pages"
                                                               : "bf16 rows";
  TORCH_CHECK(q.size(3) == l.dim, "q.size(3) (d_qk) must be ", l.dim, " for ", name, " with ", what,
              " of ", l.dim, " values a token, got ", q.size(3),
              " (d_qk 576 reads the V3.2 caches: uint8 656 or bf16 576; d_qk 512 the V4 caches: "
              "uint8 584 or bf16 512)");
  return l;
}

}  // namespace detail

inline DecodeShape check_sparse_mla_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                                           const at::Tensor& indices, double sm_scale,
                                           int64_t d_v,
                                           const c10::optional<at::Tensor>& attn_sink,
                                           const c10::optional<at::Tensor>& topk_length,
                                           const c10::optional<at::Tensor>& extra_kv_cache,
                                           const c10::optional<at::Tensor>& extra_indices,
                                           const c10::optional<at::Tensor>& extra_topk_length) {
  check_dim(q, "q", 4, "[B, s_q, H, d_qk]");
  check_dtype(q, "q", at::kBFloat16);
  TORCH_CHECK(q.size(3) == 576 || q.size(3) == 512,
              "q.size(3) (d_qk) must be 576 (512 nope + 64 rope, V3.2 / GLM-5) or 512 (448 nope + 64 "
              "rope, DeepSeek-V4), got ", q.size(3), " (shape ", q.sizes(), ")");
  check_contiguous(q, "q");

  DecodeShape sh{};
  sh.batch = q.size(0);
  sh.s_q = q.size(1);
  sh.heads = q.size(2);
  sh.d_qk = q.size(3);
  sh.main.layout = detail::check_cache(kv_cache, "kv_cache", q);
  detail::check_index_list(indices, "indices", q);
  sh.main.topk = indices.size(2);
  detail::check_lengths(topk_length, "topk_length", q, &sh.main.per_query_topk_length);

  TORCH_CHECK(extra_kv_cache.has_value() == extra_indices.has_value(),
              extra_kv_cache.has_value() ? "extra_kv_cache was given without extra_indices"
                                         : "extra_indices was given without extra_kv_cache",
              " (the second list of slots and its cache come together)");
  TORCH_CHECK(extra_kv_cache.has_value() || !extra_topk_length.has_value(),
              "extra_topk_length was given without extra_kv_cache and extra_indices");
  sh.has_extra = extra_kv_cache.has_value();
  if (sh.has_extra) {
    sh.extra.layout = detail::check_cache(*extra_kv_cache, "extra_kv_cache", q);
    TORCH_CHECK(sh.extra.layout.kind == sh.main.layout.kind,
                "extra_kv_cache must have the format of kv_cache (both FP8 or both bf16), got ",
                extra_kv_cache->scalar_type(), " ", extra_kv_cache->sizes(), " beside kv_cache ",
                kv_cache.scalar_type(), " ", kv_cache.sizes());
    detail::check_index_list(*extra_indices, "extra_indices", q);
    sh.extra.topk = extra_indices->size(2);
    detail::check_lengths(extra_topk_length, "extra_topk_length", q, &sh.extra.per_query_topk_length);
  }

  TORCH_CHECK_VALUE(d_v == kDV, "d_v must be ", kDV, " (V is the first 512 values of the latent row), got ", d_v);
  TORCH_CHECK_VALUE(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);

  if (attn_sink.has_value()) {
    const auto& s = *attn_sink;
    check_dim(s, "attn_sink", 1, "[H]");
    check_same_device(s, "attn_sink", q, "q");
    check_dtype(s, "attn_sink", at::kFloat);
    check_size(s, "attn_sink", 0, q.size(2), "H of q");
    check_contiguous(s, "attn_sink");
  }
  return sh;
}

}  // namespace dsa::mla_decode
