// MXFP4 quantiser and paged-cache writer (csrc/indexer/mxfp4.h rules): torch-free CUDA kernels.
// One thread per 32-value group: it reads the group (bf16 bits or fp32), takes the ue8m0 scale
// and writes 16 packed bytes and one scale byte — either to dense [rows, D/2] / [rows, D/32]
// outputs or, through slot ids, to the paged cache. A group is 64-128 bytes of input, so one
// thread per group keeps the arithmetic (the rules are per group anyway) trivially identical
// to the CPU kernel's; the op is bandwidth-light next to the logits it feeds.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "indexer/mxfp4.h"

namespace dsa {
namespace mxfp4 {

struct QuantParams {
  const void* x;          // [rows, D] bf16 (as uint16 bits) or fp32
  bool bf16;
  int64_t rows, D;
  uint8_t* packed;        // dense: [rows, D/2]; paged: the cache
  uint8_t* scale;         // dense: [rows, D/32]; paged: unused
  const int64_t* slots;   // paged: [rows] slot ids (negative or >= num_slots: skipped)
  int64_t num_slots, block_size;
};

__global__ void __launch_bounds__(256) quantize_kernel(const QuantParams p) {
  const int64_t groups_per_row = p.D / kGroup;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.rows * groups_per_row) return;
  const int64_t r = g / groups_per_row, gi = g % groups_per_row;
  uint8_t* packed;
  uint8_t* scale;
  if (p.slots != nullptr) {
    const int64_t slot = p.slots[r];
    if (slot < 0 || slot >= p.num_slots) return;
    const int64_t blk = slot / p.block_size, off = slot % p.block_size;
    packed = p.packed + value_offset(blk, off, p.block_size, p.D) + gi * (kGroup / 2);
    scale = p.packed + scale_offset(blk, off, p.block_size, p.D) + gi;
  } else {
    packed = p.packed + r * (p.D / 2) + gi * (kGroup / 2);
    scale = p.scale + r * groups_per_row + gi;
  }
  const int64_t base = r * p.D + gi * kGroup;
  uint8_t out[kGroup / 2];
  uint32_t sb;
  if (p.bf16) {
    const uint16_t* x = static_cast<const uint16_t*>(p.x) + base;
    sb = quantize_group([&](int i) { return bits_to_float(static_cast<uint32_t>(x[i]) << 16); }, out);
  } else {
    const float* x = static_cast<const float*>(p.x) + base;
    sb = quantize_group([&](int i) { return x[i]; }, out);
  }
#pragma unroll
  for (int i = 0; i < kGroup / 2; ++i) packed[i] = out[i];
  *scale = static_cast<uint8_t>(sb);
}

}  // namespace mxfp4
}  // namespace dsa
