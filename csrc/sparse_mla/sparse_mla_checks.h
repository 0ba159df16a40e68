// Input validation of sparse_mla_fwd / sparse_mla_bwd, shared by the CPU and CUDA entry points
// (SPEC sections 3 and 4). Index values are not checked here: the kernels skip -1, negative and
// >= S entries. topk_length values are clamped to [0, K] by the kernels (checking them would
// need a device sync).
#pragma once
#include <c10/util/Optional.h>

#include <cmath>

#include "common/checks.h"

namespace dsa {

// The CUDA kernels are instantiated for two latent widths (SPEC 10.1): d_qk = 576 (DeepSeek-V3.2,
// GLM-5: 512 value dims + 64 rope dims) and d_qk = 512 (DeepSeek-V4: K == V, the whole row), both
// with d_v = 512, and for the head counts of tensor-parallel shards (heads go in blocks of 64, 32
// or 16; H = 8 is one 16-row block with 8 rows masked, no padding by the caller).
constexpr int64_t kSparseMlaCudaDv = 512;
inline bool sparse_mla_cuda_dqk_ok(int64_t d) { return d == 576 || d == 512; }
inline bool sparse_mla_cuda_heads_ok(int64_t h) {
  return h == 8 || h == 16 || h == 32 || h == 64 || h == 128;
}

struct SparseMlaSizes {
  int64_t T, H, D, S, K;
};

inline SparseMlaSizes check_sparse_mla_inputs(const at::Tensor& q, const at::Tensor& kv,
                                              const at::Tensor& indices, double sm_scale,
                                              int64_t d_v,
                                              const std::optional<at::Tensor>& attn_sink,
                                              const std::optional<at::Tensor>& topk_length) {
  const bool cuda = q.is_cuda();
  check_dim(q, "q", 3, "[T, H, d_qk]");
  check_dim(kv, "kv", 3, "[S, 1, d_qk]");
  check_dim(indices, "indices", 3, "[T, 1, K]");
  check_same_device(kv, "kv", q, "q");
  check_same_device(indices, "indices", q, "q");
  if (cuda) {
    check_dtype(q, "q", at::kBFloat16);
  } else {
    // float32 / float64 on the CPU serve gradcheck and exact comparisons.
    check_dtype_in(q, "q", {at::kBFloat16, at::kFloat, at::kDouble});
  }
  TORCH_CHECK(kv.scalar_type() == q.scalar_type(), "kv must have q's dtype (",
              dtype_name(q.scalar_type()), "), got ", dtype_name(kv.scalar_type()));
  check_dtype(indices, "indices", at::kInt);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), S = kv.size(0), K = indices.size(2);
  check_size(kv, "kv", 1, 1, "one latent KV head");
  check_size(kv, "kv", 2, D, "d_qk of q");
  check_size(indices, "indices", 0, T, "T of q");
  check_size(indices, "indices", 1, 1, "one KV head");
  TORCH_CHECK(H >= 1, "q must have at least one head, got shape ", q.sizes());
  TORCH_CHECK_VALUE(d_v >= 1 && d_v <= D, "d_v must be in [1, d_qk=", D, "], got ", d_v);
  TORCH_CHECK_VALUE(std::isfinite(sm_scale), "sm_scale must be finite, got ", sm_scale);
  if (cuda) {
    TORCH_CHECK(sparse_mla_cuda_dqk_ok(D), "q.size(2) (d_qk) must be one of {512, 576} on CUDA, got ",
                D);
    TORCH_CHECK_VALUE(d_v == kSparseMlaCudaDv, "d_v must be ", kSparseMlaCudaDv,
                      " on CUDA (d_qk ", D, "), got ", d_v);
    TORCH_CHECK(sparse_mla_cuda_heads_ok(H),
                "q.size(1) (heads) must be one of {8, 16, 32, 64, 128} on CUDA, got ", H);
  }
  check_contiguous(q, "q");
  check_contiguous(kv, "kv");
  check_contiguous(indices, "indices");
  if (attn_sink.has_value()) {
    const auto& s = *attn_sink;
    check_same_device(s, "attn_sink", q, "q");
    check_dtype(s, "attn_sink", at::kFloat);
    check_dim(s, "attn_sink", 1, "[H]");
    check_size(s, "attn_sink", 0, H, "heads of q");
    check_contiguous(s, "attn_sink");
  }
  if (topk_length.has_value()) {
    const auto& l = *topk_length;
    check_same_device(l, "topk_length", q, "q");
    check_dtype(l, "topk_length", at::kInt);
    check_dim(l, "topk_length", 1, "[T]");
    check_size(l, "topk_length", 0, T, "T of q");
    check_contiguous(l, "topk_length");
  }
  return {T, H, D, S, K};
}

inline SparseMlaSizes check_sparse_mla_bwd_inputs(
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& out, const at::Tensor& dout,
    const at::Tensor& indices, const at::Tensor& lse, double sm_scale, int64_t d_v,
    const std::optional<at::Tensor>& attn_sink, const std::optional<at::Tensor>& topk_length) {
  auto sz = check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, attn_sink, topk_length);
  check_dim(out, "out", 3, "[T, H, d_v]");
  check_dim(dout, "dout", 3, "[T, H, d_v]");
  check_dim(lse, "lse", 2, "[T, H]");
  check_same_device(out, "out", q, "q");
  check_same_device(dout, "dout", q, "q");
  check_same_device(lse, "lse", q, "q");
  TORCH_CHECK(out.scalar_type() == q.scalar_type(), "out must have q's dtype (",
              dtype_name(q.scalar_type()), "), got ", dtype_name(out.scalar_type()));
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "dout must have q's dtype (",
              dtype_name(q.scalar_type()), "), got ", dtype_name(dout.scalar_type()));
  check_dtype(lse, "lse", at::kFloat);
  const char* w = "[T, H, d_v]";
  check_size(out, "out", 0, sz.T, w);
  check_size(out, "out", 1, sz.H, w);
  check_size(out, "out", 2, d_v, w);
  check_size(dout, "dout", 0, sz.T, w);
  check_size(dout, "dout", 1, sz.H, w);
  check_size(dout, "dout", 2, d_v, w);
  check_size(lse, "lse", 0, sz.T, "[T, H]");
  check_size(lse, "lse", 1, sz.H, "[T, H]");
  check_contiguous(out, "out");
  check_contiguous(dout, "dout");
  check_contiguous(lse, "lse");
  return sz;
}

}  // namespace dsa
