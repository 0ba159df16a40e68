// v4_compress, device code (SPEC 10.4): one CTA per compressed entry. Each thread owns pairs of
// adjacent channels (8-byte loads; a warp reads 256 contiguous bytes of a pool row) and runs an
// online softmax for both channels over the entry's pool rows; the pooled values, rounded to
// bf16, go to shared memory for the RMSNorm's sum of squares (one CTA reduction), then each
// thread normalises its pairs and ropes those in the last 64 dims. A rope pair (2i, 2i+1) is
// one thread's channel pair, so the rope needs no exchange. The step kernel (decode) writes its
// token into a ring buffer and, at a window's last token, runs the same entry code over the
// ring's rows: the same bits as the bulk kernel.
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

struct CompressStepParams {
  const float* kv;            // [B, c * d], the new token of each sequence
  const float* score;         // [B, c * d]
  const float* ape;           // [ratio, c * d]
  const float* norm_weight;   // [d]
  const float* rope_cos;      // [P, 32]
  const float* rope_sin;      // [P, 32]
  const int32_t* positions;   // [B], the token's position; negative: no token this step
  float* kv_state;            // [B, c * ratio, c * d]: token t's kv in ring row t % (c * ratio)
  float* score_state;         // [B, c * ratio, c * d]: its score + ape[t % ratio]
  __nv_bfloat16* out;         // [B, d]
  int64_t rope_rows;
  int d, c, ratio;
  float eps;
};

// Online softmax state of one channel: running max, sum of exp, exp-weighted kv.
struct SoftmaxAcc {
  float m = -INFINITY, s = 0.f, acc = 0.f;
  __device__ __forceinline__ void add(float z, float v) {
    const float m_new = fmaxf(m, z);
    if (m_new == -INFINITY) return;  // a -inf logit weighs nothing (and -inf - -inf is NaN)
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

// One entry: pooled by a CTA over rows.load(half, r, channel, kv, z) (half 0: the previous
// window's row r at channels [0, d); half 1: the entry's window, row r, at its channels), then
// rounded, normalised and roped at position window * ratio into out[0, d).
template <typename Rows>
__device__ __forceinline__ void compress_entry(const Rows& rows, bool has_prev, int ratio, int d,
                                               int64_t window, const float* norm_weight,
                                               float eps, const float* rope_cos,
                                               const float* rope_sin, __nv_bfloat16* out_entry) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* pooled = reinterpret_cast<float*>(smem_raw);      // [d], bf16-rounded values
  float* warp_sums = pooled + d;                             // [kCompressThreads / 32]
  const int pairs = d / 2;

  float sq = 0.f;
  for (int pair = threadIdx.x; pair < pairs; pair += kCompressThreads) {
    SoftmaxAcc a0, a1;
    for (int half = has_prev ? 0 : 1; half < 2; ++half)
      for (int r = 0; r < ratio; ++r) {
        float2 v, z;
        rows.load(half, r, 2 * pair, v, z);
        a0.add(z.x, v.x);
        a1.add(z.y, v.y);
      }
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
  const float inv = rsqrtf(total / static_cast<float>(d) + eps);

  const int first_rope_pair = pairs - kCompressRopePairs;
  const int64_t rope_row = window * ratio * kCompressRopePairs;
  __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(out_entry);
  for (int pair = threadIdx.x; pair < pairs; pair += kCompressThreads) {
    const float2 w = *reinterpret_cast<const float2*>(norm_weight + 2 * pair);
    float y0 = __bfloat162float(__float2bfloat16_rn(pooled[2 * pair] * inv * w.x));
    float y1 = __bfloat162float(__float2bfloat16_rn(pooled[2 * pair + 1] * inv * w.y));
    if (pair >= first_rope_pair) {
      const float c = rope_cos[rope_row + pair - first_rope_pair];
      const float s = rope_sin[rope_row + pair - first_rope_pair];
      const float x0 = y0;
      y0 = x0 * c - y1 * s;
      y1 = x0 * s + y1 * c;
    }
    out[pair] = __floats2bfloat162_rn(y0, y1);
  }
}

// Bulk rows: token rows of kv / score with ape added (z is computed where it is loaded).
struct BulkRows {
  const float* kv;
  const float* score;
  const float* ape;
  int64_t first_token, width;
  int ratio, cur_offset;
  __device__ __forceinline__ void load(int half, int r, int ch, float2& v, float2& z) const {
    const int offset = half ? cur_offset : 0;
    const int64_t at = (first_token + (half ? 0 : -ratio) + r) * width + offset + ch;
    v = *reinterpret_cast<const float2*>(kv + at);
    const float2 s = *reinterpret_cast<const float2*>(score + at);
    const float2 a = *reinterpret_cast<const float2*>(ape + r * width + offset + ch);
    z = make_float2(s.x + a.x, s.y + a.y);
  }
};

// Ring rows of one sequence's state: position t in row t % ring, z stored.
struct RingRows {
  const float* kv;
  const float* z;
  int64_t window, width;
  int ratio, ring, cur_offset;
  __device__ __forceinline__ void load(int half, int r, int ch, float2& v, float2& zz) const {
    const int offset = half ? cur_offset : 0;
    const int64_t row = ((window - 1 + half) * ratio + r) % ring;
    v = *reinterpret_cast<const float2*>(kv + row * width + offset + ch);
    zz = *reinterpret_cast<const float2*>(z + row * width + offset + ch);
  }
};

__global__ void __launch_bounds__(kCompressThreads) v4_compress_kernel(CompressParams p) {
  const int64_t entry = blockIdx.x;
  int64_t first_token = entry * p.ratio, window = entry;
  if (p.cu_seqlens != nullptr) {
    const int64_t b = compress_sequence_of(p.entry_offsets, p.batch, entry);
    window = entry - p.entry_offsets[b];
    first_token = p.cu_seqlens[b] + window * p.ratio;
  }
  const BulkRows rows{p.kv, p.score, p.ape, first_token, static_cast<int64_t>(p.c) * p.d,
                      p.ratio, p.c == 2 ? p.d : 0};
  compress_entry(rows, p.c == 2 && window > 0, p.ratio, p.d, window, p.norm_weight, p.eps,
                 p.rope_cos, p.rope_sin, p.out + entry * p.d);
}

// One CTA per sequence: store the token, then (at a window's last token) make the entry. The
// thread that stores a channel pair of the token is the one that reads it back for the pool.
__global__ void __launch_bounds__(kCompressThreads) v4_compress_step_kernel(CompressStepParams p) {
  const int64_t b = blockIdx.x;
  const int pos = p.positions[b];
  const int pairs = p.d / 2;
  __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(p.out + b * p.d);
  const __nv_bfloat162 zero2 = __floats2bfloat162_rn(0.f, 0.f);
  if (pos < 0) {
    for (int pair = threadIdx.x; pair < pairs; pair += kCompressThreads) out[pair] = zero2;
    return;
  }
  const int64_t width = static_cast<int64_t>(p.c) * p.d;
  const int ring = p.c * p.ratio;
  float* kv_state = p.kv_state + b * ring * width;
  float* z_state = p.score_state + b * ring * width;
  const int64_t slot = (pos % ring) * width;
  const float* ape = p.ape + (pos % p.ratio) * width;
  for (int pair = threadIdx.x; pair < pairs; pair += kCompressThreads)
    for (int h = 0; h < p.c; ++h) {
      const int64_t ch = h * p.d + 2 * pair;
      const float2 s = *reinterpret_cast<const float2*>(p.score + b * width + ch);
      const float2 a = *reinterpret_cast<const float2*>(ape + ch);
      *reinterpret_cast<float2*>(kv_state + slot + ch) =
          *reinterpret_cast<const float2*>(p.kv + b * width + ch);
      *reinterpret_cast<float2*>(z_state + slot + ch) = make_float2(s.x + a.x, s.y + a.y);
    }
  const int64_t window = pos / p.ratio;
  // Not a window's last token, or (CUDA checks no values on the host) no rope row for it: NaN
  // marks the latter.
  if ((pos + 1) % p.ratio != 0 || window * p.ratio >= p.rope_rows) {
    const bool missing_rope = (pos + 1) % p.ratio == 0;
    const __nv_bfloat162 fill = missing_rope ? __floats2bfloat162_rn(NAN, NAN) : zero2;
    for (int pair = threadIdx.x; pair < pairs; pair += kCompressThreads) out[pair] = fill;
    return;
  }
  const RingRows rows{kv_state, z_state, window, width, p.ratio, ring, p.c == 2 ? p.d : 0};
  compress_entry(rows, p.c == 2 && window > 0, p.ratio, p.d, window, p.norm_weight, p.eps,
                 p.rope_cos, p.rope_sin, p.out + b * p.d);
}

}  // namespace dsa
