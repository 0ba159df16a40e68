// indexer_topk: the lightning-indexer logits followed by top-k, without ever holding the full
// [T, S] fp32 matrix. One implementation for every backend: it processes row chunks whose
// [rows, S] fp32 logits stay within max_workspace_bytes (at least one row per chunk, so a
// single row of S fp32 values is the floor), calling dsa::indexer_logits and
// dsa::topk_indices through the dispatcher; the result equals
// topk_indices(indexer_logits(q, k, k_scale, weights, ks, ke), topk, ks, ke, sorted).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>

#include "common/checks.h"

namespace dsa {

inline at::Tensor indexer_topk_chunked(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& k_scale, const at::Tensor& weights,
                                       const at::Tensor& ks, const at::Tensor& ke, int64_t topk,
                                       bool sorted, int64_t max_workspace_bytes) {
  TORCH_CHECK_VALUE(topk >= 1, "topk must be >= 1, got ", topk);
  TORCH_CHECK_VALUE(max_workspace_bytes >= 1, "max_workspace_bytes must be >= 1, got ",
                    max_workspace_bytes);
  check_dim(q, "q", 3, "[T, H, D]");
  check_dim(k, "k", 2, "[S, D]");
  check_same_device(k, "k", q, "q");
  check_same_device(k_scale, "k_scale", q, "q");
  check_same_device(ks, "ks", q, "q");
  check_same_device(ke, "ke", q, "q");
  check_same_device(weights, "weights", q, "q");
  check_dim(ks, "ks", 1, "[T]");
  check_dim(ke, "ke", 1, "[T]");
  check_dim(weights, "weights", 2, "[T, H]");
  const int64_t T = q.size(0), S = k.size(0);
  check_size(ks, "ks", 0, T, "T, the rows of q");
  check_size(ke, "ke", 0, T, "T, the rows of q");
  check_size(weights, "weights", 0, T, "T, the rows of q");

  static auto logits_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dsa::indexer_logits", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  static auto topk_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("dsa::topk_indices", "")
                            .typed<at::Tensor(const at::Tensor&, int64_t,
                                              const std::optional<at::Tensor>&,
                                              const std::optional<at::Tensor>&, bool)>();

  at::Tensor out = at::empty({T, topk}, q.options().dtype(at::kInt));
  if (T == 0) return out;
  const int64_t row_bytes = std::max<int64_t>(S, 1) * static_cast<int64_t>(sizeof(float));
  const int64_t chunk = std::clamp<int64_t>(max_workspace_bytes / row_bytes, 1, T);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t rows = std::min(chunk, T - t0);
    if (rows == T) {  // one chunk: no slicing, no copy
      at::Tensor logits = logits_op.call(q, k, k_scale, weights, ks, ke, true);
      return topk_op.call(logits, topk, ks, ke, sorted);
    }
    const at::Tensor ks_c = ks.narrow(0, t0, rows), ke_c = ke.narrow(0, t0, rows);
    at::Tensor logits = logits_op.call(q.narrow(0, t0, rows), k, k_scale,
                                       weights.narrow(0, t0, rows), ks_c, ke_c, true);
    out.narrow(0, t0, rows).copy_(topk_op.call(logits, topk, ks_c, ke_c, sorted));
  }
  return out;
}

}  // namespace dsa
