// Input validation of the training ops (SPEC section 7), shared by the CPU and CUDA glue.
// Value ranges that would need a device->host copy are not checked: ks/ke are clamped to [0, S]
// and an index that is -1, negative, >= S or at a position >= topk_length[t] is skipped, never
// read (the same rule as sparse_mla_fwd), so no input value can cause an out-of-bounds read.
// `allow_fp64` is true on CPU (float64 for gradcheck), false on CUDA.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <string>

#include "common/checks.h"

namespace dsa {

inline void check_training_dtype(const at::Tensor& t, const char* name, bool allow_fp64) {
  if (allow_fp64)
    check_dtype_in(t, name, {at::kBFloat16, at::kFloat, at::kDouble});
  else
    check_dtype_in(t, name, {at::kBFloat16, at::kFloat});
}

// The accumulation (and logits) dtype of an indexer computed from q: float64 for float64 q,
// float32 otherwise.
inline at::ScalarType training_acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct TrainIndexerShape {
  int64_t T, H, D, S;
};

// q [T, H, D], k [S, D] in q's dtype, weights [T, H] in q's dtype or float32.
inline TrainIndexerShape check_train_indexer_qkw(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& weights, bool allow_fp64) {
  check_same_device(k, "k", q, "q");
  check_same_device(weights, "weights", q, "q");
  check_training_dtype(q, "q", allow_fp64);
  check_dtype(k, "k", q.scalar_type());
  if (weights.scalar_type() != q.scalar_type()) check_dtype(weights, "weights", at::kFloat);
  check_dim(q, "q", 3, "[T, H, D]");
  check_dim(k, "k", 2, "[S, D]");
  check_dim(weights, "weights", 2, "[T, H]");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), S = k.size(0);
  TORCH_CHECK_VALUE(H > 0 && D > 0, "q must have H > 0 heads and D > 0 dims, got shape ",
                    q.sizes());
  check_size(k, "k", 1, D, "head dim D of q");
  check_size(weights, "weights", 0, T, "number of queries T of q");
  check_size(weights, "weights", 1, H, "number of heads H of q");
  check_contiguous(q, "q");
  check_contiguous(k, "k");
  check_contiguous(weights, "weights");
  return {T, H, D, S};
}

inline void check_row_ranges(const at::Tensor& ks, const at::Tensor& ke, const at::Tensor& q,
                             int64_t T) {
  check_same_device(ks, "ks", q, "q");
  check_same_device(ke, "ke", q, "q");
  check_dtype(ks, "ks", at::kInt);
  check_dtype(ke, "ke", at::kInt);
  check_dim(ks, "ks", 1, "[T]");
  check_dim(ke, "ke", 1, "[T]");
  check_size(ks, "ks", 0, T, "number of queries T of q");
  check_size(ke, "ke", 0, T, "number of queries T of q");
  check_contiguous(ks, "ks");
  check_contiguous(ke, "ke");
}

inline TrainIndexerShape check_indexer_train_logits_inputs(const at::Tensor& q,
                                                           const at::Tensor& k,
                                                           const at::Tensor& weights,
                                                           const at::Tensor& ks,
                                                           const at::Tensor& ke,
                                                           bool allow_fp64) {
  const auto sh = check_train_indexer_qkw(q, k, weights, allow_fp64);
  check_row_ranges(ks, ke, q, sh.T);
  return sh;
}

// grad [T, S] in the logits' dtype (float32; float64 for float64 q).
inline TrainIndexerShape check_indexer_train_logits_bwd_inputs(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights,
    const at::Tensor& ks, const at::Tensor& ke, bool allow_fp64) {
  const auto sh = check_indexer_train_logits_inputs(q, k, weights, ks, ke, allow_fp64);
  check_same_device(grad, "grad", q, "q");
  check_dtype(grad, "grad", training_acc_dtype(q));
  check_dim(grad, "grad", 2, "[T, S]");
  check_size(grad, "grad", 0, sh.T, "number of queries T of q");
  check_size(grad, "grad", 1, sh.S, "number of keys S of k");
  check_contiguous(grad, "grad");
  return sh;
}

struct SelectedEntriesShape {
  int64_t T, K;
};

// indices [T, 1, K] int32, topk_length [T] int32 (optional).
inline SelectedEntriesShape check_selected_entries(const at::Tensor& indices,
                                                   const c10::optional<at::Tensor>& topk_length,
                                                   const at::Tensor& q, int64_t T) {
  check_same_device(indices, "indices", q, "q");
  check_dtype(indices, "indices", at::kInt);
  check_dim(indices, "indices", 3, "[T, 1, K]");
  check_size(indices, "indices", 0, T, "number of queries T of q");
  check_size(indices, "indices", 1, 1, "one KV head");
  check_contiguous(indices, "indices");
  if (topk_length.has_value()) {
    const at::Tensor& tl = *topk_length;
    check_same_device(tl, "topk_length", q, "q");
    check_dtype(tl, "topk_length", at::kInt);
    check_dim(tl, "topk_length", 1, "[T]");
    check_size(tl, "topk_length", 0, T, "number of queries T of q");
    check_contiguous(tl, "topk_length");
  }
  return {T, indices.size(2)};
}

struct AttentionTargetShape {
  int64_t T, H, D, S, K;
};

// q [T, H, d_qk], kv [S, 1, d_qk] in q's dtype, indices [T, 1, K], lse [T, H] float32.
inline AttentionTargetShape check_sparse_attention_target_inputs(
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices, const at::Tensor& lse,
    double sm_scale, const c10::optional<at::Tensor>& topk_length, bool allow_fp64) {
  check_same_device(kv, "kv", q, "q");
  check_same_device(lse, "lse", q, "q");
  check_training_dtype(q, "q", allow_fp64);
  check_dtype(kv, "kv", q.scalar_type());
  check_dtype(lse, "lse", at::kFloat);
  check_dim(q, "q", 3, "[T, H, d_qk]");
  check_dim(kv, "kv", 3, "[S, 1, d_qk]");
  check_dim(lse, "lse", 2, "[T, H]");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), S = kv.size(0);
  TORCH_CHECK_VALUE(H > 0 && D > 0, "q must have H > 0 heads and d_qk > 0 dims, got shape ",
                    q.sizes());
  check_size(kv, "kv", 1, 1, "one KV head");
  check_size(kv, "kv", 2, D, "head dim d_qk of q");
  check_size(lse, "lse", 0, T, "number of queries T of q");
  check_size(lse, "lse", 1, H, "number of heads H of q");
  check_contiguous(q, "q");
  check_contiguous(kv, "kv");
  check_contiguous(lse, "lse");
  TORCH_CHECK_VALUE(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);
  const auto sel = check_selected_entries(indices, topk_length, q, T);
  return {T, H, D, S, sel.K};
}

// reduction: "sum" or "mean" (over the rows with at least one valid entry). Returns true for
// "mean".
inline bool check_kl_reduction(const std::string& reduction) {
  TORCH_CHECK_VALUE(reduction == "sum" || reduction == "mean",
                    "reduction must be \"sum\" or \"mean\", got \"", reduction, "\"");
  return reduction == "mean";
}

struct SparseKLShape {
  int64_t T, H, D, S, K;
};

// q, k, weights as the indexer; indices [T, 1, K] into k's rows; target [T, K] float32 (or
// float64 for float64 q).
inline SparseKLShape check_indexer_kl_loss_sparse_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights,
    const at::Tensor& indices, const at::Tensor& target,
    const c10::optional<at::Tensor>& topk_length, const std::string& reduction, bool allow_fp64) {
  const auto sh = check_train_indexer_qkw(q, k, weights, allow_fp64);
  const auto sel = check_selected_entries(indices, topk_length, q, sh.T);
  check_same_device(target, "target", q, "q");
  if (target.scalar_type() != at::kFloat) check_dtype(target, "target", training_acc_dtype(q));
  check_dim(target, "target", 2, "[T, K]");
  check_size(target, "target", 0, sh.T, "number of queries T of q");
  check_size(target, "target", 1, sel.K, "number of selected entries K of indices");
  check_contiguous(target, "target");
  check_kl_reduction(reduction);
  return {sh.T, sh.H, sh.D, sh.S, sel.K};
}

struct DenseKLShape {
  int64_t T, H, D, S, Hm, Dm;
};

// q, k, weights, ks, ke as the indexer; q_main [T, Hm, d] and kv_main [S, 1, d] (q_main's
// dtype) the main attention's inputs; block_size > 0 keys per streamed block.
inline DenseKLShape check_indexer_kl_loss_dense_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights, const at::Tensor& ks,
    const at::Tensor& ke, const at::Tensor& q_main, const at::Tensor& kv_main, double sm_scale,
    const std::string& reduction, int64_t block_size, bool allow_fp64) {
  const auto sh = check_indexer_train_logits_inputs(q, k, weights, ks, ke, allow_fp64);
  check_same_device(q_main, "q_main", q, "q");
  check_same_device(kv_main, "kv_main", q, "q");
  check_training_dtype(q_main, "q_main", allow_fp64);
  check_dtype(kv_main, "kv_main", q_main.scalar_type());
  check_dim(q_main, "q_main", 3, "[T, Hm, d]");
  check_dim(kv_main, "kv_main", 3, "[S, 1, d]");
  const int64_t Hm = q_main.size(1), Dm = q_main.size(2);
  check_size(q_main, "q_main", 0, sh.T, "number of queries T of q");
  TORCH_CHECK_VALUE(Hm > 0 && Dm > 0, "q_main must have Hm > 0 heads and d > 0 dims, got shape ",
                    q_main.sizes());
  check_size(kv_main, "kv_main", 0, sh.S, "number of keys S of k");
  check_size(kv_main, "kv_main", 1, 1, "one KV head");
  check_size(kv_main, "kv_main", 2, Dm, "head dim d of q_main");
  check_contiguous(q_main, "q_main");
  check_contiguous(kv_main, "kv_main");
  TORCH_CHECK_VALUE(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be > 0, got ", block_size);
  check_kl_reduction(reduction);
  return {sh.T, sh.H, sh.D, sh.S, Hm, Dm};
}

}  // namespace dsa
