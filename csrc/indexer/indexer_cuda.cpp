// indexer family: CUDA glue (checks, output allocation, launch on the current stream).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "common/cuda_glue.h"
#include "indexer/indexer_checks.h"
#include "indexer/indexer_launch.h"
#include "indexer/mxfp4_checks.h"

namespace dsa {
namespace {

void check_cuda_indexer_shape(int64_t heads, int64_t head_dim) {
  TORCH_CHECK_VALUE(indexer_cuda_supports(heads, head_dim),
                    "q: the CUDA indexer kernels serve H in {32, 64} heads and D = 128, got H = ",
                    heads, ", D = ", head_dim, " (the CPU kernels accept any H and D)");
}

void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must start on a 16-byte boundary (got a view with an unaligned storage offset)");
}

at::Tensor indexer_logits_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                               const at::Tensor& weights, const at::Tensor& ks,
                               const at::Tensor& ke, bool clean_logits) {
  const auto sh = check_indexer_logits_inputs(q, k, k_scale, weights, ks, ke);
  check_cuda_indexer_shape(sh.H, sh.D);
  c10::cuda::CUDAGuard guard(q.device());
  check_aligned(q, "q");
  check_aligned(k, "k");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(k_scale.data_ptr()) % 4 == 0, "k_scale must be 4-byte aligned");
  at::Tensor out = at::empty({sh.T, sh.S}, q.options().dtype(at::kFloat));
  if (sh.format == KeyFormat::kMxfp4) {
    DSA_CHECK_CUDA(launch_indexer_logits_mxfp4(
        reinterpret_cast<const uint8_t*>(q.data_ptr()), k.data_ptr<uint8_t>(), k_scale.data_ptr<uint8_t>(),
        weights.data_ptr<float>(), ks.data_ptr<int32_t>(), ke.data_ptr<int32_t>(), out.data_ptr<float>(),
        sh.T, sh.S, sh.H, clean_logits, current_stream(q)));
    return out;
  }
  DSA_CHECK_CUDA(launch_indexer_logits(
      reinterpret_cast<const uint8_t*>(q.data_ptr()), reinterpret_cast<const uint8_t*>(k.data_ptr()),
      k_scale.data_ptr<float>(), weights.data_ptr<float>(), ks.data_ptr<int32_t>(),
      ke.data_ptr<int32_t>(), out.data_ptr<float>(), sh.T, sh.S, sh.H, clean_logits,
      current_stream(q)));
  return out;
}

at::Tensor paged_indexer_logits_cuda(const at::Tensor& q, const at::Tensor& kv_cache,
                                     const at::Tensor& weights, const at::Tensor& context_lens,
                                     const at::Tensor& block_table, int64_t max_context_len,
                                     bool clean_logits) {
  const auto sh = check_paged_indexer_logits_inputs(q, kv_cache, weights, context_lens,
                                                    block_table, max_context_len);
  check_cuda_indexer_shape(sh.H, sh.D);
  TORCH_CHECK_VALUE(sh.block_size % 4 == 0,
                    "kv_cache: the CUDA kernel needs block_size % 4 == 0 (16-byte aligned token "
                    "rows), got block_size = ", sh.block_size);
  TORCH_CHECK_VALUE(max_context_len <= std::numeric_limits<int32_t>::max(),
                    "max_context_len must fit int32 on CUDA (32-bit key addressing), got ",
                    max_context_len);
  c10::cuda::CUDAGuard guard(q.device());
  check_aligned(q, "q");
  check_aligned(kv_cache, "kv_cache");
  at::Tensor out = at::empty({sh.B * sh.N, max_context_len}, q.options().dtype(at::kFloat));
  DSA_CHECK_CUDA((sh.format == KeyFormat::kMxfp4 ? launch_paged_indexer_logits_mxfp4 : launch_paged_indexer_logits)(
      reinterpret_cast<const uint8_t*>(q.data_ptr()), kv_cache.data_ptr<uint8_t>(),
      weights.data_ptr<float>(), context_lens.data_ptr<int32_t>(), sh.per_query_lens,
      block_table.data_ptr<int32_t>(), sh.block_table_stride, out.data_ptr<float>(), sh.B, sh.N,
      sh.H, sh.num_blocks, sh.block_size, sh.max_blocks, max_context_len, clean_logits,
      current_stream(q)));
  return out;
}

std::tuple<at::Tensor, at::Tensor> mxfp4_quantize_cuda(const at::Tensor& x_in) {
  check_mxfp4_quantize(x_in);
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto sizes = x.sizes().vec();
  sizes.back() = D / 2;
  at::Tensor packed = at::empty(sizes, x.options().dtype(at::kByte));
  sizes.back() = D / mxfp4::kGroup;
  at::Tensor scale = at::empty(sizes, x.options().dtype(at::kByte));
  DSA_CHECK_CUDA(launch_mxfp4_quantize(x.data_ptr(), x.scalar_type() == at::kBFloat16, rows, D,
                                       packed.data_ptr<uint8_t>(), scale.data_ptr<uint8_t>(), nullptr, 0, 0,
                                       current_stream(x)));
  return {packed, scale};
}

void mxfp4_indexer_k_cache_write_cuda(const at::Tensor& k_in, const at::Tensor& slot_in,
                                      const at::Tensor& kv_cache) {
  const auto geo = check_mxfp4_k_cache_write(k_in, slot_in, kv_cache);
  c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor k = k_in.contiguous(), slots = slot_in.contiguous().to(at::kLong);
  DSA_CHECK_CUDA(launch_mxfp4_quantize(k.data_ptr(), k.scalar_type() == at::kBFloat16, k.size(0),
                                       geo.head_dim, kv_cache.data_ptr<uint8_t>(), nullptr,
                                       slots.data_ptr<int64_t>(), geo.num_slots(), geo.block_size,
                                       current_stream(k)));
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("mxfp4_quantize", &dsa::mxfp4_quantize_cuda);
  m.impl("mxfp4_indexer_k_cache_write", &dsa::mxfp4_indexer_k_cache_write_cuda);
  m.impl("indexer_logits", &dsa::indexer_logits_cuda);
  m.impl("paged_indexer_logits", &dsa::paged_indexer_logits_cuda);
}
