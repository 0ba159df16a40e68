// sparse_mla_decode on CUDA: tensor glue (checks, outputs, split workspace) around the
// torch-free launcher. No host synchronisation: the split plan depends on shapes only.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "common/cuda_glue.h"
#include "mla_decode/mla_decode_checks.h"
#include "mla_decode/mla_decode_launch.h"

namespace dsa::mla_decode {
namespace {

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cached{};   // per device; 0 = not asked yet
  if (device >= 0 && device < 64 && cached[device].load(std::memory_order_relaxed) > 0)
    return cached[device].load(std::memory_order_relaxed);
  int n = 0;
  DSA_CHECK_CUDA(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cached[device].store(n, std::memory_order_relaxed);
  return n;
}

void check_aligned16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0, name,
              " must start at a 16-byte aligned address (the kernel reads it in 16-byte vectors)");
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_decode_cuda(
    const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& indices, double sm_scale,
    int64_t d_v, const c10::optional<at::Tensor>& attn_sink,
    const c10::optional<at::Tensor>& topk_length, const c10::optional<at::Tensor>& extra_kv_cache,
    const c10::optional<at::Tensor>& extra_indices, const c10::optional<at::Tensor>& extra_topk_length) {
  const DecodeShape sh = check_sparse_mla_decode(q, kv_cache, indices, sm_scale, d_v, attn_sink, topk_length,
                                                 extra_kv_cache, extra_indices, extra_topk_length);
  check_aligned16(q, "q");
  check_aligned16(kv_cache, "kv_cache");
  if (sh.has_extra) check_aligned16(*extra_kv_cache, "extra_kv_cache");
  // V4 pages: the kernel reads a token's 576-byte row in 16-byte vectors from page + 576 off.
  for (const auto* l : {&sh.main.layout, &sh.extra.layout}) {
    TORCH_CHECK(l->kind != cache::MlaCacheKind::kV4Fp8 || l->page_pitch % 16 == 0,
                l == &sh.main.layout ? "kv_cache" : "extra_kv_cache",
                " (V4 FP8) page pitch stride(0) must be a multiple of 16 bytes on CUDA, got ", l->page_pitch,
                " (FlashMLA's padded pages are; dense pages need an even block_size)");
  }
  // The kernel counts entries and 64-entry tiles in int32 ((len + 63) / 64 must not wrap).
  TORCH_CHECK(sh.main.topk + sh.extra.topk <= INT32_MAX / 2, "indices.size(2) + extra_indices.size(2) (K + K2) must be <= ",
              INT32_MAX / 2, ", got ", sh.main.topk + sh.extra.topk);
  c10::cuda::CUDAGuard guard(q.device());

  at::Tensor out = at::empty({sh.batch, sh.s_q, sh.heads, kDV}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.s_q, sh.heads}, q.options().dtype(at::kFloat));
  const SplitPlan plan = plan_decode_splits(sh.batch, sh.s_q, sh.heads, sh.main.topk, sh.extra.topk,
                                              sm_count(q.get_device()));
  at::Tensor out_partial, lse_partial;
  if (plan.num_splits > 1) {
    out_partial = at::empty({plan.num_splits, sh.batch * sh.s_q, sh.heads, kDV}, q.options().dtype(at::kFloat));
    lse_partial = at::empty({plan.num_splits, sh.batch * sh.s_q, sh.heads}, q.options().dtype(at::kFloat));
  }
  DecodeParams p{};
  p.q = q.const_data_ptr();
  p.kv_cache = kv_cache.const_data_ptr();
  p.indices = indices.const_data_ptr<int32_t>();
  p.attn_sink = attn_sink ? attn_sink->const_data_ptr<float>() : nullptr;
  p.topk_length = topk_length ? topk_length->const_data_ptr<int32_t>() : nullptr;
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  p.out_partial = plan.num_splits > 1 ? out_partial.mutable_data_ptr<float>() : nullptr;
  p.lse_partial = plan.num_splits > 1 ? lse_partial.mutable_data_ptr<float>() : nullptr;
  p.batch = sh.batch;
  p.s_q = sh.s_q;
  p.heads = sh.heads;
  p.topk = sh.main.topk;
  p.num_slots = sh.main.layout.num_slots;
  p.fp8_cache = sh.main.layout.fp8();
  p.per_query_topk_length = sh.main.per_query_topk_length;
  p.layout = sh.main.layout;
  if (sh.has_extra) {
    p.extra_kv_cache = extra_kv_cache->const_data_ptr();
    p.extra_indices = extra_indices->const_data_ptr<int32_t>();
    p.extra_topk_length = extra_topk_length ? extra_topk_length->const_data_ptr<int32_t>() : nullptr;
    p.extra_topk = sh.extra.topk;
    p.per_query_extra_topk_length = sh.extra.per_query_topk_length;
    p.extra_layout = sh.extra.layout;
  }
  p.sm_scale = static_cast<float>(sm_scale);
  p.plan = plan;
  DSA_CHECK_CUDA(wgmma_opted_in(q.get_device(), &p.use_wgmma));
  DSA_CHECK_CUDA(launch_sparse_mla_decode(p, current_stream(q)));
  return {out, lse};
}

}  // namespace
}  // namespace dsa::mla_decode

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("sparse_mla_decode", &dsa::mla_decode::sparse_mla_decode_cuda);
}
