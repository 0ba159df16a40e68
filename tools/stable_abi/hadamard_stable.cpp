// Probe, not product: hadamard_fp8_quantize's CPU glue written against the LibTorch stable ABI
// (torch/csrc/stable, torch/headeronly), to measure what a port of dsa_ext's glue needs. It is
// built by tools/stable_abi/probe.sh only, never by CMakeLists.txt, and registers under its
// own namespace (dsa_stable_probe) so it can sit next to dsa_ext. The row kernel restates
// csrc/hadamard/hadamard_cpu.cpp's loop because that one is written on at::parallel_for; the
// probe checks its bytes against the real op (probe.sh), so the two cannot drift unnoticed.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Float8_e4m3fn.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/quant_rules.h"

namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

template <typename T>
void rows(const T* x, uint8_t* out, float* scales, int64_t n, int64_t d, int64_t block, bool ue8m0) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(d));
  torch::stable::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(d);
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < d; ++i) v[i] = static_cast<float>(x[r * d + i]);
      for (int64_t h = 1; h < d; h *= 2)
        for (int64_t i = 0; i < d; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) {
            const float a = v[j], b = v[j + h];
            v[j] = a + b;
            v[j + h] = a - b;
          }
      for (int64_t g = 0; g < d / block; ++g) {
        float amax = 0.f;
        for (int64_t i = g * block; i < (g + 1) * block; ++i) {
          v[i] *= norm;
          amax = std::fmax(amax, std::fabs(v[i]));
        }
        const float s = dsa::indexer_scale(amax, ue8m0);
        scales[r * (d / block) + g] = s;
        for (int64_t i = g * block; i < (g + 1) * block; ++i)
          out[r * d + i] = torch::headeronly::Float8_e4m3fn(dsa::fp8_prequant(v[i], s)).x;
      }
    }
  });
}

std::tuple<Tensor, Tensor> hadamard_fp8_quantize(Tensor x, int64_t block_size, bool ue8m0) {
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::BFloat16 || x.scalar_type() == ScalarType::Float,
                  "x must be bfloat16 or float32");
  STD_TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension [..., D], got a scalar");
  const int64_t d = x.size(-1);
  STD_TORCH_CHECK(d >= 2 && (d & (d - 1)) == 0 && d <= 1024,
                  "x.size(-1) must be a power of two in [2, 1024], got ", d);
  STD_TORCH_CHECK(block_size > 0 && d % block_size == 0,
                  "block_size must be positive and divide x.size(-1) = ", d, ", got ", block_size);
  STD_TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const int64_t n = x.numel() / d;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  Tensor out = torch::stable::empty(shape, ScalarType::Float8_e4m3fn, std::nullopt, x.device());
  shape.back() = d / block_size;
  Tensor scale = torch::stable::empty(shape, ScalarType::Float, std::nullopt, x.device());
  auto* o = static_cast<uint8_t*>(out.data_ptr());
  auto* s = static_cast<float*>(scale.data_ptr());
  if (x.scalar_type() == ScalarType::Float)
    rows(static_cast<const float*>(x.data_ptr()), o, s, n, d, block_size, ue8m0);
  else
    rows(static_cast<const torch::headeronly::BFloat16*>(x.data_ptr()), o, s, n, d, block_size, ue8m0);
  return {out, scale};
}

}  // namespace

STABLE_TORCH_LIBRARY(dsa_stable_probe, m) {
  m.def("hadamard_fp8_quantize(Tensor x, int block_size=128, bool ue8m0=True) -> (Tensor x_fp8, Tensor scale)");
}

STABLE_TORCH_LIBRARY_IMPL(dsa_stable_probe, CPU, m) {
  m.impl("hadamard_fp8_quantize", TORCH_BOX(&hadamard_fp8_quantize));
}
