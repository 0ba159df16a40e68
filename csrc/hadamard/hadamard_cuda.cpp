// hadamard_fp8_quantize, CUDA glue: checks, output allocation, launch on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "common/cuda_glue.h"
#include "hadamard/hadamard_checks.h"
#include "hadamard/hadamard_launch.h"

namespace dsa {
namespace {

std::tuple<at::Tensor, at::Tensor> hadamard_fp8_quantize_cuda(const at::Tensor& x,
                                                             int64_t block_size, bool ue8m0) {
  check_hadamard_fp8_quantize(x, block_size);
  const int64_t d = x.size(-1), rows = x.numel() / d;
  TORCH_CHECK(d >= 32, "x.size(-1) must be at least 32 on CUDA (one warp per row), got ", d);
  TORCH_CHECK_VALUE(block_size * 32 >= d, "block_size must be at least x.size(-1) / 32 = ", d / 32,
                    " on CUDA, got ", block_size);
  c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(x.sizes(), x.options().dtype(at::ScalarType::Float8_e4m3fn));
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = d / block_size;
  auto scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  DSA_CHECK_CUDA(launch_hadamard_fp8_quantize(
      x.data_ptr(), x.scalar_type() == at::kBFloat16, reinterpret_cast<uint8_t*>(out.data_ptr()),
      scale.data_ptr<float>(), rows, static_cast<int>(d), static_cast<int>(block_size), ue8m0,
      current_stream(x)));
  return {out, scale};
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CUDA, m) { m.impl("hadamard_fp8_quantize", &dsa::hadamard_fp8_quantize_cuda); }
