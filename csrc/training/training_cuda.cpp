// training family: CUDA glue (the shared checks of training_checks.h, output and workspace
// allocation, launch on the current stream; no host synchronisation).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "common/cuda_glue.h"
#include "training/training_checks.h"
#include "training/training_launch.h"

namespace dsa {
namespace {

using training::DType;

DType dtype_code(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32; }

// The deterministic mode's per-split dk partial sums (training_launch.h), or an undefined tensor.
at::Tensor dk_partial_workspace(const at::Tensor& q, int64_t T, int64_t S, int64_t D, bool deterministic) {
  if (!deterministic) return {};
  const int64_t splits = training::deterministic_dk_splits(T, S);
  if (splits <= 1) return {};
  return at::empty({splits, S, D}, q.options().dtype(at::kFloat));
}

float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

void check_indexer_cuda_shape(int64_t H, int64_t D) {
  TORCH_CHECK_VALUE(training::indexer_cuda_supports(H, D),
                    "q: the CUDA training-indexer kernels keep q[t] (H x D) and a 128-key tile in fp32 "
                    "shared memory (at most 227 KB, e.g. H * D <= 8192 at D = 128), got H = ",
                    H, ", D = ", D, " (the CPU kernels accept any H and D)");
}

at::Tensor indexer_train_logits_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights,
                                     const at::Tensor& ks, const at::Tensor& ke) {
  const auto sh = check_indexer_train_logits_inputs(q, k, weights, ks, ke, /*allow_fp64=*/false);
  check_indexer_cuda_shape(sh.H, sh.D);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({sh.T, sh.S}, q.options().dtype(at::kFloat));
  training::LogitsArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.w = weights.data_ptr();
  a.ks = ks.data_ptr<int32_t>();
  a.ke = ke.data_ptr<int32_t>();
  a.out = out.data_ptr<float>();
  a.T = sh.T;
  a.S = sh.S;
  a.H = static_cast<int>(sh.H);
  a.D = static_cast<int>(sh.D);
  DSA_CHECK_CUDA(training::launch_indexer_train_logits(a, dtype_code(q), dtype_code(weights), current_stream(q)));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_train_logits_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights,
    const at::Tensor& ks, const at::Tensor& ke, bool deterministic) {
  const auto sh = check_indexer_train_logits_bwd_inputs(grad, q, k, weights, ks, ke, /*allow_fp64=*/false);
  check_indexer_cuda_shape(sh.H, sh.D);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dw = at::empty_like(weights);
  at::Tensor dk32;
  if (!deterministic) dk32 = at::zeros({sh.S, sh.D}, q.options().dtype(at::kFloat));
  const at::Tensor dk_partial = dk_partial_workspace(q, sh.T, sh.S, sh.D, deterministic);
  training::LogitsBwdArgs a{};
  a.grad = grad.data_ptr<float>();
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.w = weights.data_ptr();
  a.ks = ks.data_ptr<int32_t>();
  a.ke = ke.data_ptr<int32_t>();
  a.dq = dq.data_ptr();
  a.dw = dw.data_ptr();
  a.dk = dk.data_ptr();
  a.dk32 = deterministic ? nullptr : dk32.data_ptr<float>();
  a.dk_partial = data_or_null(dk_partial);
  a.T = sh.T;
  a.S = sh.S;
  a.H = static_cast<int>(sh.H);
  a.D = static_cast<int>(sh.D);
  DSA_CHECK_CUDA(training::launch_indexer_train_logits_bwd(a, dtype_code(q), dtype_code(weights), deterministic,
                                                           current_stream(q)));
  return {dq, dk, dw};
}

at::Tensor sparse_attention_target_cuda(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& indices,
                                        const at::Tensor& lse, double sm_scale,
                                        const c10::optional<at::Tensor>& topk_length) {
  const auto sh = check_sparse_attention_target_inputs(q, kv, indices, lse, sm_scale, topk_length,
                                                       /*allow_fp64=*/false);
  TORCH_CHECK_VALUE(training::target_cuda_supports(sh.D),
                    "q: the CUDA sparse_attention_target kernel keeps one head of q and a kv row per warp "
                    "in 48 KB of shared memory, got d_qk = ", sh.D);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({sh.T, sh.K}, q.options().dtype(at::kFloat));
  training::TargetArgs a{};
  a.q = q.data_ptr();
  a.kv = kv.data_ptr();
  a.indices = indices.data_ptr<int32_t>();
  a.lse = lse.data_ptr<float>();
  a.topk_length = topk_length.has_value() ? topk_length->data_ptr<int32_t>() : nullptr;
  a.out = out.data_ptr<float>();
  a.T = sh.T;
  a.S = sh.S;
  a.K = sh.K;
  a.H = static_cast<int>(sh.H);
  a.D = static_cast<int>(sh.D);
  a.sm_scale = static_cast<float>(sm_scale);
  DSA_CHECK_CUDA(training::launch_sparse_attention_target(a, dtype_code(q), current_stream(q)));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_sparse_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights, const at::Tensor& indices,
    const at::Tensor& target, const c10::optional<at::Tensor>& topk_length, c10::string_view reduction,
    bool deterministic) {
  const std::string red(reduction);
  const auto sh = check_indexer_kl_loss_sparse_inputs(q, k, weights, indices, target, topk_length, red,
                                                      /*allow_fp64=*/false);
  check_indexer_cuda_shape(sh.H, sh.D);
  const bool mean = check_kl_reduction(red);
  c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dw = at::empty_like(weights);
  at::Tensor logits = at::empty({sh.T, sh.K}, f32), row_loss = at::empty({sh.T}, f32);
  at::Tensor count = at::zeros({1}, q.options().dtype(at::kInt));
  at::Tensor dk32 = at::zeros({sh.S, sh.D}, f32);
  at::Tensor entry_dk, entry_ints;
  if (deterministic) {
    int64_t sizes[2];
    training::sparse_loss_workspace(sh.T, sh.S, sh.K, sh.D, sizes);
    entry_dk = at::empty({sizes[0]}, f32);
    entry_ints = at::empty({sizes[1]}, q.options().dtype(at::kInt));
  }
  training::SparseLossArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.w = weights.data_ptr();
  a.indices = indices.data_ptr<int32_t>();
  a.target = target.data_ptr<float>();
  a.topk_length = topk_length.has_value() ? topk_length->data_ptr<int32_t>() : nullptr;
  a.logits = logits.data_ptr<float>();
  a.row_loss = row_loss.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dw = dw.data_ptr();
  a.dk32 = dk32.data_ptr<float>();
  a.entry_dk = data_or_null(entry_dk);
  a.entry_ints = entry_ints.defined() ? entry_ints.data_ptr<int32_t>() : nullptr;
  a.T = sh.T;
  a.S = sh.S;
  a.K = sh.K;
  a.H = static_cast<int>(sh.H);
  a.D = static_cast<int>(sh.D);
  DSA_CHECK_CUDA(training::launch_indexer_kl_loss_sparse(a, dtype_code(q), dtype_code(weights), mean, deterministic,
                                                         count.data_ptr<int32_t>(), loss.data_ptr<float>(),
                                                         dk.data_ptr(), current_stream(q)));
  return {loss, dq, dk, dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_dense_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights, const at::Tensor& ks, const at::Tensor& ke,
    const at::Tensor& q_main, const at::Tensor& kv_main, double sm_scale, c10::string_view reduction,
    int64_t block_size, bool deterministic) {
  const std::string red(reduction);
  const auto sh = check_indexer_kl_loss_dense_inputs(q, k, weights, ks, ke, q_main, kv_main, sm_scale, red,
                                                     block_size, /*allow_fp64=*/false);
  check_indexer_cuda_shape(sh.H, sh.D);
  TORCH_CHECK_VALUE(training::dense_loss_cuda_supports(sh.H, sh.D, sh.Dm),
                    "q_main: the CUDA dense-loss kernel keeps one head of q_main and a kv_main row per warp "
                    "beside the indexer's tiles in shared memory, got d = ", sh.Dm, " with H = ", sh.H,
                    ", D = ", sh.D);
  const bool mean = check_kl_reduction(red);
  c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dw = at::empty_like(weights);
  at::Tensor main_lse = at::empty({sh.T, sh.Hm}, f32), index_lse = at::empty({sh.T}, f32);
  at::Tensor row_loss = at::empty({sh.T}, f32);
  at::Tensor count = at::zeros({1}, q.options().dtype(at::kInt));
  at::Tensor dk32;
  if (!deterministic) dk32 = at::zeros({sh.S, sh.D}, f32);
  const at::Tensor dk_partial = dk_partial_workspace(q, sh.T, sh.S, sh.D, deterministic);
  training::DenseLossArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.w = weights.data_ptr();
  a.ks = ks.data_ptr<int32_t>();
  a.ke = ke.data_ptr<int32_t>();
  a.q_main = q_main.data_ptr();
  a.kv_main = kv_main.data_ptr();
  a.main_lse = main_lse.data_ptr<float>();
  a.index_lse = index_lse.data_ptr<float>();
  a.row_loss = row_loss.data_ptr<float>();
  a.dq = dq.data_ptr();
  a.dw = dw.data_ptr();
  a.dk32 = deterministic ? nullptr : dk32.data_ptr<float>();
  a.dk_partial = data_or_null(dk_partial);
  a.T = sh.T;
  a.S = sh.S;
  a.H = static_cast<int>(sh.H);
  a.D = static_cast<int>(sh.D);
  a.Hm = static_cast<int>(sh.Hm);
  a.Dm = static_cast<int>(sh.Dm);
  a.sm_scale = static_cast<float>(sm_scale);
  DSA_CHECK_CUDA(training::launch_indexer_kl_loss_dense(a, dtype_code(q), dtype_code(weights), dtype_code(q_main),
                                                        mean, deterministic, count.data_ptr<int32_t>(),
                                                        loss.data_ptr<float>(), dk.data_ptr(), current_stream(q)));
  return {loss, dq, dk, dw};
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("indexer_train_logits", &dsa::indexer_train_logits_cuda);
  m.impl("indexer_train_logits_bwd", &dsa::indexer_train_logits_bwd_cuda);
  m.impl("sparse_attention_target", &dsa::sparse_attention_target_cuda);
  m.impl("indexer_kl_loss_sparse", &dsa::indexer_kl_loss_sparse_cuda);
  m.impl("indexer_kl_loss_dense", &dsa::indexer_kl_loss_dense_cuda);
}
