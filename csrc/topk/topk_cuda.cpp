// topk family: CUDA tensor glue (validation, outputs, launch on the current stream).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "topk/indexer_topk.h"
#include "topk/topk_checks.h"
#include "topk/topk_launch.h"

namespace dsa {
namespace {

at::Tensor topk_indices_cuda(const at::Tensor& logits, int64_t k,
                             const std::optional<at::Tensor>& ks,
                             const std::optional<at::Tensor>& ke, bool sorted) {
  check_topk_indices(logits, k, ks, ke, kTopkMaxKCuda);
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor, got ", logits.device());
  c10::cuda::CUDAGuard guard(logits.device());
  const int64_t T = logits.size(0), S = logits.size(1);
  at::Tensor out = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return out;
  DSA_CHECK_CUDA(topk_indices_launch(
      logits.data_ptr<float>(), T, S, T > 1 ? logits.stride(0) : S,
      ks.has_value() ? ks->data_ptr<int32_t>() : nullptr,
      ke.has_value() ? ke->data_ptr<int32_t>() : nullptr, static_cast<int>(k), sorted,
      out.data_ptr<int32_t>(), current_stream(logits)));
  return out;
}

at::Tensor topk_slot_ids_cuda(const at::Tensor& indices, const at::Tensor& block_table,
                              int64_t block_size) {
  check_topk_slot_ids(indices, block_table, block_size);
  TORCH_CHECK(indices.is_cuda(), "indices must be a CUDA tensor, got ", indices.device());
  c10::cuda::CUDAGuard guard(indices.device());
  const int64_t R = topk_slot_rows(indices), K = indices.size(-1);
  at::Tensor out = at::empty(indices.sizes(), indices.options());
  if (R == 0 || K == 0) return out;
  DSA_CHECK_CUDA(topk_slot_ids_launch(indices.data_ptr<int32_t>(), R, K,
                                      block_table.data_ptr<int32_t>(), block_table.size(0),
                                      block_table.size(1), block_size, out.data_ptr<int32_t>(),
                                      current_stream(indices)));
  return out;
}

at::Tensor indexer_topk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                             const at::Tensor& weights, const at::Tensor& ks, const at::Tensor& ke,
                             int64_t topk, bool sorted, int64_t max_workspace_bytes) {
  // The dispatcher picks this kernel when any argument is on CUDA, so q may still be a CPU
  // tensor: CUDAGuard would then fail with a message that names no argument.
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  // Checked up front (topk_indices would raise it too, but only after the first chunk's logits
  // and naming its own argument, k).
  TORCH_CHECK_VALUE(topk <= kTopkMaxKCuda, "topk must be <= ", kTopkMaxKCuda, " on CUDA, got ",
                    topk);
  c10::cuda::CUDAGuard guard(q.device());
  return indexer_topk_chunked(q, k, k_scale, weights, ks, ke, topk, sorted, max_workspace_bytes);
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("topk_indices", &dsa::topk_indices_cuda);
  m.impl("topk_slot_ids", &dsa::topk_slot_ids_cuda);
  m.impl("indexer_topk", &dsa::indexer_topk_cuda);
}
