// v4_compress, CUDA glue: checks, the per-sequence entry offsets, launch on the current stream.
// With cu_seqlens the output size depends on its values: one device-to-host copy of cu_seqlens
// (a host synchronisation, as indexer_k_cache_gather), which also lets the host validate the
// lengths and the rope rows. Without cu_seqlens nothing synchronises; v4_compress_step never.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <vector>

#include "common/cuda_glue.h"
#include "compress/compress_checks.h"
#include "compress/compress_launch.h"

namespace dsa {
namespace {

at::Tensor v4_compress_cuda(const at::Tensor& kv, const at::Tensor& score, const at::Tensor& ape,
                            const at::Tensor& norm_weight, double eps, const at::Tensor& rope_cos,
                            const at::Tensor& rope_sin,
                            const c10::optional<at::Tensor>& cu_seqlens) {
  const CompressShape s =
      check_v4_compress(kv, score, ape, norm_weight, eps, rope_cos, rope_sin, cu_seqlens);
  c10::cuda::CUDAGuard guard(kv.device());
  int64_t entries = s.tokens / s.ratio, batch = 1;
  at::Tensor offsets;
  if (cu_seqlens.has_value()) {
    const at::Tensor cu = cu_seqlens->cpu();
    batch = cu.size(0) - 1;
    check_compress_rope_rows(check_compress_lengths(cu.data_ptr<int32_t>(), batch, s), s);
    std::vector<int64_t> first(batch + 1, 0);
    const int32_t* c = cu.data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) first[b + 1] = first[b] + (c[b + 1] - c[b]) / s.ratio;
    entries = first[batch];
    offsets = at::from_blob(first.data(), {batch + 1}, at::TensorOptions().dtype(at::kLong))
                  .to(kv.device());
  } else {
    check_compress_rope_rows(entries, s);
  }
  TORCH_CHECK_VALUE(entries <= INT32_MAX, "v4_compress makes at most 2**31 - 1 entries, got ",
                    entries);
  auto out = at::empty({entries, s.d}, kv.options().dtype(at::kBFloat16));
  DSA_CHECK_CUDA(launch_v4_compress(
      kv.data_ptr<float>(), score.data_ptr<float>(), ape.data_ptr<float>(),
      norm_weight.data_ptr<float>(), static_cast<float>(eps), rope_cos.data_ptr<float>(),
      rope_sin.data_ptr<float>(),
      cu_seqlens.has_value() ? cu_seqlens->data_ptr<int32_t>() : nullptr,
      offsets.defined() ? offsets.data_ptr<int64_t>() : nullptr, batch, entries,
      static_cast<int>(s.d), static_cast<int>(s.c), static_cast<int>(s.ratio), out.data_ptr(),
      current_stream(kv)));
  return out;
}

// No host synchronisation: positions stay on the device, so a missing rope row is not raised
// here but marked by a NaN entry (the CPU op raises).
at::Tensor v4_compress_step_cuda(const at::Tensor& kv, const at::Tensor& score,
                                 const at::Tensor& ape, const at::Tensor& norm_weight, double eps,
                                 const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                                 const at::Tensor& positions, at::Tensor& kv_state,
                                 at::Tensor& score_state) {
  const CompressShape s = check_v4_compress_step(kv, score, ape, norm_weight, eps, rope_cos,
                                                 rope_sin, positions, kv_state, score_state);
  c10::cuda::CUDAGuard guard(kv.device());
  auto out = at::empty({s.tokens, s.d}, kv.options().dtype(at::kBFloat16));
  DSA_CHECK_CUDA(launch_v4_compress_step(
      kv.data_ptr<float>(), score.data_ptr<float>(), ape.data_ptr<float>(),
      norm_weight.data_ptr<float>(), static_cast<float>(eps), rope_cos.data_ptr<float>(),
      rope_sin.data_ptr<float>(), s.rope_rows, positions.data_ptr<int32_t>(),
      kv_state.data_ptr<float>(), score_state.data_ptr<float>(), s.tokens, static_cast<int>(s.d),
      static_cast<int>(s.c), static_cast<int>(s.ratio), out.data_ptr(), current_stream(kv)));
  return out;
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) {
  m.impl("v4_compress", &dsa::v4_compress_cuda);
  m.impl("v4_compress_step", &dsa::v4_compress_step_cuda);
}
