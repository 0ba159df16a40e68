// sparse_mla family on CUDA: tensor glue (checks, outputs, workspace) around the torch-free
// launchers of sparse_mla_launch.h.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "common/cuda_glue.h"
#include "sparse_mla/sparse_mla_checks.h"
#include "sparse_mla/sparse_mla_launch.h"

namespace dsa {
namespace {

const float* opt_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}
const int32_t* opt_int(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int32_t>() : nullptr;
}

// The kernels copy rows with 16-byte cp.async: a contiguous view at an odd element offset
// would fault, so refuse it with a message instead.
void check_aligned16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start at a 16-byte aligned address on CUDA (got a view at an unaligned "
              "offset; pass .clone())");
}

void check_int32_sizes(const SparseMlaSizes& sz) {
  TORCH_CHECK(sz.K <= INT32_MAX / 2, "indices.size(2) (K) is too large: ", sz.K);
  TORCH_CHECK(sz.S < INT32_MAX, "kv.size(0) (S) must be below 2^31, got ", sz.S);
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_fwd_cuda(const at::Tensor& q, const at::Tensor& kv,
                                                       const at::Tensor& indices, double sm_scale,
                                                       int64_t d_v,
                                                       const std::optional<at::Tensor>& attn_sink,
                                                       const std::optional<at::Tensor>& topk_length) {
  const auto sz = check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, attn_sink, topk_length);
  check_int32_sizes(sz);
  check_aligned16(q, "q");
  check_aligned16(kv, "kv");
  c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({sz.T, sz.H, d_v}, q.options());
  auto lse = at::empty({sz.T, sz.H}, q.options().dtype(at::kFloat));
  if (sz.S == 0 || sz.K == 0) {  // every row is empty; kv may have no storage to point at
    out.zero_();
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  sparse_mla::FwdArgs a{};
  a.q = q.data_ptr();
  a.kv = kv.data_ptr();
  a.indices = indices.data_ptr<int32_t>();
  a.attn_sink = opt_float(attn_sink);
  a.topk_length = opt_int(topk_length);
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  a.T = sz.T;
  a.S = sz.S;
  a.H = static_cast<int>(sz.H);
  a.K = static_cast<int>(sz.K);
  a.D = static_cast<int>(sz.D);
  a.sm_scale = static_cast<float>(sm_scale);
  DSA_CHECK_CUDA(sparse_mla::fwd_kernel_selected(q.get_device(), a.H, &a.kernel));
  DSA_CHECK_CUDA(sparse_mla::sparse_mla_fwd_launch(a, current_stream(q)));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_bwd_cuda(
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& out, const at::Tensor& dout,
    const at::Tensor& indices, const at::Tensor& lse, double sm_scale, int64_t d_v,
    const std::optional<at::Tensor>& attn_sink, const std::optional<at::Tensor>& topk_length,
    bool deterministic) {
  const auto sz = check_sparse_mla_bwd_inputs(q, kv, out, dout, indices, lse, sm_scale, d_v,
                                               attn_sink, topk_length);
  check_int32_sizes(sz);
  check_aligned16(q, "q");
  check_aligned16(kv, "kv");
  check_aligned16(dout, "dout");
  check_aligned16(out, "out");
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(!deterministic || sz.K <= sparse_mla::kBwdDeterministicMaxK,
              "indices.size(2) (K) must be <= ", sparse_mla::kBwdDeterministicMaxK,
              " for deterministic=True on CUDA, got ", sz.K);
  auto dq = at::empty_like(q);
  auto dkv_acc = at::zeros({sz.S, sz.D}, kv.options().dtype(at::kFloat));
  if (sz.S == 0 || sz.K == 0) {  // nothing selected: zero gradients
    dq.zero_();
    return std::make_tuple(dq, dkv_acc.to(kv.scalar_type()).view({sz.S, 1, sz.D}));
  }
  sparse_mla::BwdArgs a{};
  a.q = q.data_ptr();
  a.kv = kv.data_ptr();
  a.out = out.data_ptr();
  a.dout = dout.data_ptr();
  a.indices = indices.data_ptr<int32_t>();
  a.lse = lse.data_ptr<float>();
  a.attn_sink = opt_float(attn_sink);
  a.topk_length = opt_int(topk_length);
  a.dq = dq.data_ptr();
  a.dkv_acc = dkv_acc.data_ptr<float>();
  a.T = sz.T;
  a.S = sz.S;
  a.H = static_cast<int>(sz.H);
  a.K = static_cast<int>(sz.K);
  a.D = static_cast<int>(sz.D);
  a.sm_scale = static_cast<float>(sm_scale);
  a.deterministic = deterministic;
  DSA_CHECK_CUDA(sparse_mla::bwd_kernel_selected(q.get_device(), a.H, &a.kernel));
  at::Tensor scratch, ints;
  if (deterministic && sz.T > 0) {
    // scratch <= the budget (64 MiB unless DSA_SPARSE_MLA_DET_SCRATCH_MB): see BwdWorkspace
    // (fixed point: the [S, D] int64 sums; chunked: the contributions of a token chunk)
    a.scratch_budget = sparse_mla::sparse_mla_bwd_scratch_budget();
    const auto w = sparse_mla::sparse_mla_bwd_workspace(sz.T, sz.S, a.H, a.K, a.D,
                                                          a.scratch_budget);
    scratch = at::empty({w.scratch_rows, sz.D}, kv.options().dtype(at::kFloat));
    const int64_t list = w.list_len;
    ints = at::empty({sparse_mla::bwd_int_words(sz.S, list)}, kv.options().dtype(at::kInt));
    a.scratch = scratch.data_ptr<float>();
    sparse_mla::bind_bwd_ints(a, ints.data_ptr<int32_t>(), sz.S, list);
  }
  DSA_CHECK_CUDA(sparse_mla::sparse_mla_bwd_launch(a, current_stream(q)));
  at::Tensor dkv = dkv_acc.to(kv.scalar_type()).view({sz.S, 1, sz.D});
  return std::make_tuple(dq, dkv);
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("sparse_mla_fwd", &dsa::sparse_mla_fwd_cuda);
  m.impl("sparse_mla_bwd", &dsa::sparse_mla_bwd_cuda);
}
