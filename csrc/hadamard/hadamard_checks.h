// Input validation of hadamard_fp8_quantize, shared by the CPU and CUDA entry points.
#pragma once
#include "common/checks.h"

namespace dsa {

inline void check_hadamard_fp8_quantize(const at::Tensor& x, int64_t block_size) {
  check_dtype_in(x, "x", {at::kBFloat16, at::kFloat});
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension [..., D], got a scalar");
  const int64_t d = x.size(-1);
  TORCH_CHECK(d >= 2 && (d & (d - 1)) == 0 && d <= 1024,
              "x.size(-1) must be a power of two in [2, 1024] (the Hadamard size), got ", d);
  TORCH_CHECK_VALUE(block_size > 0 && d % block_size == 0,
                    "block_size must be positive and divide x.size(-1) = ", d, ", got ", block_size);
  check_contiguous(x, "x");
}

}  // namespace dsa
