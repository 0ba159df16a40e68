// hadamard_fp8_quantize, device code: one warp per row of D = 32 * VPT values; lane l holds
// the contiguous values [l*VPT, (l+1)*VPT), so the butterflies of stride < VPT stay inside a
// thread and those of stride >= VPT are lane exchanges (shfl_xor). The quantisation groups
// (block_size values) are then runs of block_size / VPT lanes, reduced the same way.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common/quant_rules.h"

namespace dsa {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int VPT, typename T>
__global__ void hadamard_fp8_quantize_kernel(const T* __restrict__ x, uint8_t* __restrict__ out,
                                             float* __restrict__ scales, int64_t rows,
                                             int block, bool ue8m0) {
  constexpr int D = 32 * VPT;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps exit together: rows are warp-uniform

  float v[VPT];
  const T* xr = x + row * D + lane * VPT;
#pragma unroll
  for (int j = 0; j < VPT; ++j) v[j] = to_float(xr[j]);

#pragma unroll
  for (int h = 1; h < VPT; h *= 2)
#pragma unroll
    for (int i = 0; i < VPT; i += 2 * h)
#pragma unroll
      for (int j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
#pragma unroll
  for (int m = 1; m < 32; m *= 2)
#pragma unroll
    for (int j = 0; j < VPT; ++j) {
      const float p = __shfl_xor_sync(0xffffffffu, v[j], m);
      v[j] = (lane & m) ? p - v[j] : v[j] + p;  // the upper lane of a pair holds (a - b)
    }

  const float norm = 1.0f / sqrtf(static_cast<float>(D));  // as the CPU kernel: same bits
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < VPT; ++j) {
    v[j] *= norm;
    amax = fmaxf(amax, fabsf(v[j]));
  }
  const int lanes_per_group = block / VPT;  // >= 1, a power of two (checked on the host)
  for (int m = 1; m < lanes_per_group; m *= 2)
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, m));
  const float s = indexer_scale(amax, ue8m0);
  if (lane % lanes_per_group == 0) scales[row * (D / block) + lane / lanes_per_group] = s;

  uint8_t q[VPT];
#pragma unroll
  for (int j = 0; j < VPT; ++j)
    q[j] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(fp8_prequant(v[j], s), __NV_SATFINITE, __NV_E4M3));
  uint8_t* orow = out + row * D + lane * VPT;
  if constexpr (VPT % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VPT; j += 4)
      *reinterpret_cast<uint32_t*>(orow + j) =
          q[j] | (q[j + 1] << 8) | (q[j + 2] << 16) | (static_cast<uint32_t>(q[j + 3]) << 24);
  } else {
#pragma unroll
    for (int j = 0; j < VPT; ++j) orow[j] = q[j];
  }
}

}  // namespace dsa
