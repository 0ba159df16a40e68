// v4_compress, device code (SPEC 10.4): one CTA per compressed entry. Each thread owns pairs of
// adjacent channels (8-byte loads; a warp reads 256 contiguous bytes of a pool row) and runs an
// online softmax for both channels over the entry's pool rows; the pooled values, rounded to
// bf16, go to shared memory for the RMSNorm's sum of squares (one CTA reduction), then each
// thread normalises its pairs and ropes those in the last 64 dims. A rope pair (2i, 2i+1) is
// one thread's channel pair, so the rope needs no exchange.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace dsa {

constexpr int kCompressThreads = 128;
constexpr int kCompressRopePairs = 32;  // the last 64 dims, GPT-J pairs

struct CompressParams {
  const float* kv;            // [T, c * d]
  const float* score;         // [T, c * d]
  const float* ape;           // [ratio, c * d]
  const float* norm_weight;   // [d]
  const float* rope_cos;      // [P, 32]
  const float* rope_sin;      // [P, 32]
  const int32_t* cu_seqlens;  // [B + 1], or null: one sequence of T tokens
  const int64_t* entry_offsets;  // [B + 1], first entry of each sequence (null with cu_seqlens)
  __nv_bfloat16* out;         // [entries, d]
  int64_t batch;
  int d, c, ratio;
  float eps;
};

// Online softmax state of one channel: running max, sum of exp, exp-weighted kv.
struct SoftmaxAcc {
  float m = -INFINITY, s = 0.f, acc = 0.f;
  __device__ __forceinline__ void add(float z, float v) {
    const float m_new = fmaxf(m, z);
    const float scale = expf(m - m_new), p = expf(z - m_new);
    s = s * scale + p;
    acc = acc * scale + p * v;
    m = m_new;
  }
  __device__ __forceinline__ float value() const { return acc / s; }
};

// The sequence of entry e: the last b with entry_offsets[b] <= e (empty sequences share an
// offset with the next one and are skipped).
__device__ __forceinline__ int64_t compress_sequence_of(const int64_t* offsets, int64_t batch,
                                                        int64_t e) {
  int64_t lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= e) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kCompressThreads) v4_compress_kernel(CompressParams p) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* pooled = reinterpret_cast<float*>(smem_raw);      // [d], bf16-rounded values
  float* warp_sums = pooled + p.d;                           // [kCompressThreads / 32]

  const int64_t entry = blockIdx.x;
  int64_t first_token = entry * p.ratio, window = entry;
  if (p.cu_seqlens != nullptr) {
    const int64_t b = compress_sequence_of(p.entry_offsets, p.batch, entry);
    window = entry - p.entry_offsets[b];
    first_token = p.cu_seqlens[b] + window * p.ratio;
  }
  const int64_t width = static_cast<int64_t>(p.c) * p.d;
  const int cur_offset = p.c == 2 ? p.d : 0;
  const bool has_prev = p.c == 2 && window > 0;
  const int pairs = p.d / 2;

  float sq = 0.f;
  for (int pair = threadIdx.x; pair < pairs; pair += kCompressThreads) {
    SoftmaxAcc a0, a1;
    auto add_row = [&](int64_t t, int r, int offset) {
      const int64_t at = t * width + offset + 2 * pair;
      const float2 v = *reinterpret_cast<const float2*>(p.kv + at);
      const float2 z = *reinterpret_cast<const float2*>(p.score + at);
      const float2 w = *reinterpret_cast<const float2*>(p.ape + r * width + offset + 2 * pair);
      a0.add(z.x + w.x, v.x);
      a1.add(z.y + w.y, v.y);
    };
    if (has_prev)
      for (int r = 0; r < p.ratio; ++r) add_row(first_token - p.ratio + r, r, 0);
    for (int r = 0; r < p.ratio; ++r) add_row(first_token + r, r, cur_offset);
    const float e0 = __bfloat162float(__float2bfloat16_rn(a0.value()));
    const float e1 = __bfloat162float(__float2bfloat16_rn(a1.value()));
    pooled[2 * pair] = e0;
    pooled[2 * pair + 1] = e1;
    sq += e0 * e0 + e1 * e1;
  }
#pragma unroll
  for (int m = 16; m > 0; m /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, m);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sq;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kCompressThreads / 32; ++w) total += warp_sums[w];
  const float inv = rsqrtf(total / static_cast<float>(p.d) + p.eps);

  const int first_rope_pair = pairs - kCompressRopePairs;
  const int64_t rope_row = window * p.ratio * kCompressRopePairs;
  __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(p.out + entry * p.d);
  for (int pair = threadIdx.x; pair < pairs; pair += kCompressThreads) {
    const float2 w = *reinterpret_cast<const float2*>(p.norm_weight + 2 * pair);
    float y0 = __bfloat162float(__float2bfloat16_rn(pooled[2 * pair] * inv * w.x));
    float y1 = __bfloat162float(__float2bfloat16_rn(pooled[2 * pair + 1] * inv * w.y));
    if (pair >= first_rope_pair) {
      const float c = p.rope_cos[rope_row + pair - first_rope_pair];
      const float s = p.rope_sin[rope_row + pair - first_rope_pair];
      const float x0 = y0;
      y0 = x0 * c - y1 * s;
      y1 = x0 * s + y1 * c;
    }
    out[pair] = __floats2bfloat162_rn(y0, y1);
  }
}

}  // namespace dsa
