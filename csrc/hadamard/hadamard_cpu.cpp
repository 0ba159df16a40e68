// hadamard_fp8_quantize, CPU kernel: per row, an in-place fast Walsh-Hadamard transform in
// fp32 scaled by D^-0.5 (orthonormal, natural/Sylvester order), then FP8 quantisation per
// block with the fp8_quantize rule (common/quant_rules.h), so the bytes equal fp8_quantize of
// the rotated row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/quant_rules.h"
#include "hadamard/hadamard_checks.h"

namespace dsa {
namespace {

template <typename T>
void hadamard_quantize_rows(const T* x, uint8_t* out, float* scales, int64_t rows, int64_t d,
                            int64_t block, bool ue8m0) {
  const float norm = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(d);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * d;
      for (int64_t i = 0; i < d; ++i) v[i] = static_cast<float>(xr[i]);
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
        const float s = indexer_scale(amax, ue8m0);
        scales[r * (d / block) + g] = s;
        for (int64_t i = g * block; i < (g + 1) * block; ++i)
          out[r * d + i] = c10::Float8_e4m3fn(fp8_prequant(v[i], s)).x;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> hadamard_fp8_quantize_cpu(const at::Tensor& x,
                                                            int64_t block_size, bool ue8m0) {
  check_hadamard_fp8_quantize(x, block_size);
  const int64_t d = x.size(-1), rows = x.numel() / d;
  auto out = at::empty(x.sizes(), x.options().dtype(at::ScalarType::Float8_e4m3fn));
  auto scale_shape = x.sizes().vec();
  scale_shape.back() = d / block_size;
  auto scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  auto* o = reinterpret_cast<uint8_t*>(out.data_ptr());
  if (x.scalar_type() == at::kFloat)
    hadamard_quantize_rows(x.data_ptr<float>(), o, scale.data_ptr<float>(), rows, d, block_size, ue8m0);
  else
    hadamard_quantize_rows(x.data_ptr<at::BFloat16>(), o, scale.data_ptr<float>(), rows, d, block_size, ue8m0);
  return {out, scale};
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) { m.impl("hadamard_fp8_quantize", &dsa::hadamard_fp8_quantize_cpu); }
