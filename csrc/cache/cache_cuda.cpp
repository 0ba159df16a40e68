// cache family: CUDA glue (validation, outputs, launch on the current stream).
//
// Writers never synchronise (CUDA-graph safe): slots past the cache are skipped in-kernel
// (the CPU kernels raise instead; checking here would cost a device sync per write).
// indexer_k_cache_gather is the one op that synchronises: its output size is sum(seq_lens),
// and the seq_lens range check rides on the same device-to-host copy.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "cache/cache_checks.h"
#include "cache/cache_launch.h"
#include "common/cuda_glue.h"

namespace dsa::cache {
namespace {

InputType input_type(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? InputType::kBFloat16 : InputType::kFloat32;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

// The CUDA kernels move 16-byte chunks: a V4 page pitch (stride(0)) must keep pages aligned
// (FlashMLA's pitch is a multiple of 576).
void check_page_pitch16(const MlaCacheLayout& l) {
  TORCH_CHECK(l.page_pitch % 16 == 0, "kv_cache: the CUDA kernels need a page pitch (stride(0)) "
              "that is a multiple of 16 bytes, got ", l.page_pitch);
}

void check_aligned16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
              " must be 16-byte aligned (its data_ptr is offset from its allocation)");
}

// A contiguous copy whose data pointer is 16-byte aligned (a fresh allocation is), so the
// kernels can use 16-byte loads.
at::Tensor contiguous_aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_cuda(const at::Tensor& x_in, int64_t block_size,
                                                     bool ue8m0) {
  check_fp8_quantize(x_in, block_size);
  check_cuda(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor x_fp8 = at::empty(x.sizes(), x.options().dtype(at::ScalarType::Float8_e4m3fn));
  auto scale_sizes = x.sizes().vec();
  scale_sizes.back() /= block_size;
  at::Tensor scale = at::empty(scale_sizes, x.options().dtype(at::kFloat));
  DSA_CHECK_CUDA(launch_fp8_quantize(x.const_data_ptr(), input_type(x), scale.numel(), block_size,
                                     ue8m0, x_fp8.data_ptr(), scale.data_ptr<float>(),
                                     current_stream(x)));
  return {x_fp8, scale};
}

void indexer_k_cache_write_cuda(const at::Tensor& k_in, const at::Tensor& slot_in,
                                const at::Tensor& kv_cache, bool ue8m0) {
  const auto geo = check_indexer_k_cache_write(k_in, slot_in, kv_cache);
  check_cuda(k_in, "k");
  c10::cuda::CUDAGuard guard(k_in.device());
  const at::Tensor k = k_in.contiguous(), slots = slot_in.contiguous();
  DSA_CHECK_CUDA(launch_indexer_k_cache_write(
      k.const_data_ptr(), input_type(k), slots.const_data_ptr(), slots.scalar_type() == at::kLong,
      k.size(0), geo.head_dim, ue8m0, kv_cache.data_ptr(), geo.num_blocks, geo.block_size,
      current_stream(k)));
}

std::tuple<at::Tensor, at::Tensor> indexer_k_cache_gather_cuda(const at::Tensor& kv_cache,
                                                               const at::Tensor& block_table_in,
                                                               const at::Tensor& seq_lens_in) {
  const auto geo = check_indexer_k_cache_gather(kv_cache, block_table_in, seq_lens_in);
  check_cuda(kv_cache, "kv_cache");
  c10::cuda::CUDAGuard guard(kv_cache.device());
  const at::Tensor block_table = block_table_in.contiguous(), seq_lens = seq_lens_in.contiguous();
  const int64_t B = seq_lens.size(0);
  at::Tensor cu_seqlens = at::zeros({B + 1}, seq_lens.options().dtype(at::kLong));
  int64_t total = 0;
  if (B > 0) {
    cu_seqlens.slice(0, 1).copy_(at::cumsum(seq_lens, 0, at::kLong));
    // The one host synchronisation of this family: sum(seq_lens) sizes the outputs.
    const at::Tensor stats =
        at::stack({cu_seqlens.select(0, B), seq_lens.min().to(at::kLong), seq_lens.max().to(at::kLong)})
            .cpu();
    const int64_t* st = stats.const_data_ptr<int64_t>();
    check_seq_len_range(st[1], st[2], block_table.size(1) * geo.block_size);
    total = st[0];
  }
  at::Tensor k_fp8 = at::empty({total, geo.head_dim}, kv_cache.options().dtype(at::ScalarType::Float8_e4m3fn));
  at::Tensor k_scale = at::empty({total}, kv_cache.options().dtype(at::kFloat));
  DSA_CHECK_CUDA(launch_indexer_k_cache_gather(
      kv_cache.const_data_ptr(), geo.num_blocks, geo.block_size, geo.head_dim,
      block_table.const_data_ptr<int32_t>(), block_table.size(1),
      cu_seqlens.const_data_ptr<int64_t>(), B, total, k_fp8.data_ptr(),
      k_scale.data_ptr<float>(), current_stream(kv_cache)));
  return {k_fp8, k_scale};
}

void mla_kv_cache_write_cuda(const at::Tensor& kv_in, const at::Tensor& slot_in,
                             const at::Tensor& kv_cache) {
  const auto layout = check_mla_kv_cache_write(kv_in, slot_in, kv_cache);
  check_cuda(kv_in, "kv");
  check_aligned16(kv_cache, "kv_cache");
  check_page_pitch16(layout);
  c10::cuda::CUDAGuard guard(kv_in.device());
  const at::Tensor kv = contiguous_aligned(kv_in), slots = slot_in.contiguous();
  DSA_CHECK_CUDA(launch_mla_kv_cache_write(kv.const_data_ptr(), input_type(kv),
                                           slots.const_data_ptr(),
                                           slots.scalar_type() == at::kLong, kv.size(0),
                                           kv_cache.data_ptr(), layout, current_stream(kv)));
}

at::Tensor mla_kv_cache_gather_cuda(const at::Tensor& kv_cache, const at::Tensor& slots_in) {
  const auto layout = check_mla_kv_cache_gather(kv_cache, slots_in);
  check_cuda(kv_cache, "kv_cache");
  check_aligned16(kv_cache, "kv_cache");
  check_page_pitch16(layout);
  c10::cuda::CUDAGuard guard(kv_cache.device());
  const at::Tensor slots = slots_in.contiguous();
  at::Tensor out = at::empty({slots.size(0), 1, layout.dim}, kv_cache.options().dtype(at::kBFloat16));
  DSA_CHECK_CUDA(launch_mla_kv_cache_gather(kv_cache.const_data_ptr(), layout,
                                            slots.const_data_ptr(),
                                            slots.scalar_type() == at::kLong, slots.size(0),
                                            out.data_ptr(), current_stream(kv_cache)));
  return out;
}

}  // namespace
}  // namespace dsa::cache

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("fp8_quantize", &dsa::cache::fp8_quantize_cuda);
  m.impl("indexer_k_cache_write", &dsa::cache::indexer_k_cache_write_cuda);
  m.impl("indexer_k_cache_gather", &dsa::cache::indexer_k_cache_gather_cuda);
  m.impl("mla_kv_cache_write", &dsa::cache::mla_kv_cache_write_cuda);
  m.impl("mla_kv_cache_gather", &dsa::cache::mla_kv_cache_gather_cuda);
}
