// cache family: torch-free device code (FP8 quantisation, indexer K cache, MLA KV cache).
//
// Every kernel is memory-bound: lanes move 16-byte chunks (8 bf16 / 8 fp32 in, 8 FP8 out),
// group abs-maxima are reduced with xor shuffles inside the sub-warp that owns the group, and
// values stay in registers between the abs-max and the store. FP8 rounding is cvt.rn.satfinite
// (cuda_fp8.h) applied after the fp32 clamp of common/quant_rules.h, which gives the bytes of
// c10::Float8_e4m3fn / torch (round to nearest even) used by the CPU kernels.
//
// Slots and block ids are untrusted: anything outside the cache is skipped by writers (no host
// synchronisation, CUDA-graph safe) and reads as zeros in readers. Byte offsets are int64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cache/mla_layout.h"
#include "common/cuda_utils.cuh"
#include "common/quant_rules.h"

namespace dsa::cache {

constexpr int kWarpSize = 32;
constexpr int kChunk = 8;                     // elements per lane per vector step
constexpr int kMlaRope = 64;

// ---- element I/O ------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// 8 consecutive inputs as fp32: one 16-byte load for bf16, two for fp32 (16-byte aligned).
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[kChunk]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const auto* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void load8(const float* p, float (&v)[kChunk]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// Two e4m3 bytes, low byte = a (cvt.rn.satfinite.e4m3x2.f32).
__device__ __forceinline__ uint32_t fp8x2(float a, float b) {
  return __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ uint8_t fp8x1(float a) {
  return __nv_cvt_float_to_fp8(a, __NV_SATFINITE, __NV_E4M3);
}

// Quantise 8 values with scale s and store their 8 FP8 bytes (8-byte aligned, global memory:
// st.global, since a pointer taken from a struct argument would otherwise become a generic store).
// pow2: s is a power of two, so x * (1 / s) replaces the per-element IEEE division (the same
// bits; see fp8_prequant_pow2). The division would cost ~20 instructions per element, enough
// to make these memory-bound kernels issue-bound.
__device__ __forceinline__ void store8_fp8(uint8_t* dst, const float (&v)[kChunk], float s,
                                           bool pow2) {
  float q[kChunk];
  if (pow2) {
    const float inv_s = 1.0f / s;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) q[i] = fp8_prequant_pow2(v[i], inv_s);
  } else {
#pragma unroll
    for (int i = 0; i < kChunk; ++i) q[i] = fp8_prequant(v[i], s);
  }
  uint32_t w[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    w[h] = fp8x2(q[4 * h], q[4 * h + 1]) | (fp8x2(q[4 * h + 2], q[4 * h + 3]) << 16);
  __stcg(reinterpret_cast<uint2*>(dst), make_uint2(w[0], w[1]));
}

// 8 values rounded to bf16 (nearest even), one 16-byte store.
__device__ __forceinline__ void store8_bf16(uint8_t* dst, const float (&v)[kChunk]) {
  uint4 raw;
  auto* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  __stcg(reinterpret_cast<uint4*>(dst), raw);
}

// A 4-byte store at an address that may be unaligned (scalar fallback paths).
__device__ __forceinline__ void store_f32_bytes(uint8_t* dst, float s) {
  const uint32_t b = __float_as_uint(s);
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = static_cast<uint8_t>(b >> (8 * i));
}

// Max over the TPG lanes (a power of two, aligned in the warp) named by mask.
template <int TPG>
__device__ __forceinline__ float subwarp_max(float v, unsigned mask) {
#pragma unroll
  for (int o = TPG / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(mask, v, o));
  return v;
}

template <int TPG>
__device__ __forceinline__ unsigned subwarp_mask(int lane) {
  if constexpr (TPG == kWarpSize) return 0xffffffffu;
  else return ((1u << TPG) - 1u) << (lane & ~(TPG - 1));
}

// ---- scale rules (common/quant_rules.h) ---------------------------------------------------------
// A rule maps a group's abs-max to its scale; pow2() says whether every scale it gives is a
// power of two.
struct IndexerScaleRule {
  bool ue8m0;
  __device__ __forceinline__ float operator()(float amax) const { return indexer_scale(amax, ue8m0); }
  __device__ __forceinline__ bool pow2() const { return ue8m0; }
};
struct MlaScaleRule {
  __device__ __forceinline__ float operator()(float amax) const { return mla_tile_scale(amax); }
  __device__ __forceinline__ bool pow2() const { return true; }
};

// One group of n_chunks * 8 values quantised by the TPG lanes of a sub-warp (lane_in_group in
// [0, TPG)); each lane holds up to CPL chunks in registers between the abs-max and the store.
// Returns the group's scale (in every lane). NaN is ignored by the abs-max (fmaxf).
template <int TPG, int CPL, typename T, typename Rule>
__device__ __forceinline__ float quantize_group_vec(const T* src, int n_chunks, uint8_t* dst,
                                                    Rule rule, unsigned mask, int lane_in_group) {
  float v[CPL][kChunk];
  float amax = 0.f;
#pragma unroll
  for (int c = 0; c < CPL; ++c) {
    const int chunk = lane_in_group + c * TPG;
    if (chunk < n_chunks) {
      load8(src + chunk * kChunk, v[c]);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) amax = fmaxf(amax, fabsf(v[c][i]));
    }
  }
  const float s = rule(subwarp_max<TPG>(amax, mask));
#pragma unroll
  for (int c = 0; c < CPL; ++c) {
    const int chunk = lane_in_group + c * TPG;
    if (chunk < n_chunks) store8_fp8(dst + chunk * kChunk, v[c], s, rule.pow2());
  }
  return s;
}

// ---- where each quantised group goes -----------------------------------------------------------
struct GroupDest {
  uint8_t* values;  // nullptr: skip this group
  uint8_t* scale;
};

// fp8_quantize: group g of a contiguous [num_groups, group_size] input.
struct DenseGroups {
  uint8_t* q;
  float* scale;
  int64_t group_size;
  __device__ __forceinline__ GroupDest operator()(int64_t g) const {
    return {q + g * group_size, reinterpret_cast<uint8_t*>(scale + g)};
  }
};

// indexer_k_cache_write: token i goes to slot slots[i] of the DeepGEMM-layout cache.
template <typename Idx>
struct IndexerCacheSlots {
  const Idx* slots;
  uint8_t* cache;
  int64_t num_slots, block_size, head_dim;
  __device__ __forceinline__ GroupDest operator()(int64_t i) const {
    const int64_t slot = slots[i];
    if (slot < 0 || slot >= num_slots) return {nullptr, nullptr};
    const int64_t blk = slot / block_size, off = slot % block_size;
    uint8_t* block = cache + blk * block_size * (head_dim + 4);
    return {block + off * head_dim, block + block_size * head_dim + 4 * off};
  }
};

// Vector path: TPG lanes per group, up to CPL chunks of 8 per lane; group_size % 8 == 0, the
// input 16-byte aligned, destinations 8-byte aligned, scale destinations 4-byte aligned.
template <typename T, int TPG, int CPL, typename Dest, typename Rule>
__global__ void __launch_bounds__(256) quantize_groups_vec_kernel(const T* __restrict__ src,
                                                                  int64_t num_groups,
                                                                  int group_size, Dest dest,
                                                                  Rule rule) {
  const int lane = threadIdx.x % kWarpSize;
  const int lane_in_group = lane % TPG;
  const unsigned mask = subwarp_mask<TPG>(lane);
  const int n_chunks = group_size / kChunk;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / TPG;
  for (int64_t g = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / TPG; g < num_groups;
       g += stride) {
    const GroupDest d = dest(g);
    if (d.values == nullptr) continue;  // uniform across the group's lanes
    const float s = quantize_group_vec<TPG, CPL>(src + g * group_size, n_chunks, d.values, rule,
                                                 mask, lane_in_group);
    if (lane_in_group == 0) __stcg(reinterpret_cast<float*>(d.scale), s);
  }
}

// Scalar fallback for any group size / alignment: one warp per group, the input read twice.
template <typename T, typename Dest, typename Rule>
__global__ void __launch_bounds__(256) quantize_groups_scalar_kernel(const T* __restrict__ src,
                                                                     int64_t num_groups,
                                                                     int64_t group_size, Dest dest,
                                                                     Rule rule) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t g = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; g < num_groups;
       g += stride) {
    const GroupDest d = dest(g);
    if (d.values == nullptr) continue;
    const T* x = src + g * group_size;
    float amax = 0.f;
    for (int64_t e = lane; e < group_size; e += kWarpSize) amax = fmaxf(amax, fabsf(to_float(x[e])));
    const float s = rule(subwarp_max<kWarpSize>(amax, 0xffffffffu));
    const float inv_s = 1.0f / s;
    for (int64_t e = lane; e < group_size; e += kWarpSize) {
      const float xe = to_float(x[e]);
      d.values[e] = fp8x1(rule.pow2() ? fp8_prequant_pow2(xe, inv_s) : fp8_prequant(xe, s));
    }
    if (lane == 0) store_f32_bytes(d.scale, s);
  }
}

// ---- indexer K cache gather ------------------------------------------------------------------------
// A sub-warp of tpg lanes (a power of two, log2 given) per output token, one VEC-byte chunk
// per lane per step; lane 0 also copies the scale. cu_seqlens [B+1] (int64, on the device) maps
// output rows to (sequence, position); positions fit in 32 bits (seq_lens is int32), so the
// per-token block lookup divides in 32 bits.
template <int VEC>
__global__ void __launch_bounds__(256) indexer_gather_kernel(
    const uint8_t* __restrict__ cache, int64_t num_blocks, int block_size, int head_dim,
    const int32_t* __restrict__ block_table, int64_t max_blocks,
    const int64_t* __restrict__ cu_seqlens, int64_t batch, int64_t total, int log2_tpg,
    uint8_t* __restrict__ out, float* __restrict__ out_scale) {
  using Vec = typename std::conditional<VEC == 16, uint4, uint8_t>::type;
  const int tpg = 1 << log2_tpg;
  const int chunks = head_dim / VEC;
  const int lane_in_group = threadIdx.x & (tpg - 1);
  const int64_t stride = (int64_t(gridDim.x) * blockDim.x) >> log2_tpg;
  for (int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> log2_tpg; t < total;
       t += stride) {
    int64_t lo = 0, hi = batch;  // the last sequence b with cu_seqlens[b] <= t
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (__ldg(cu_seqlens + mid) <= t) lo = mid; else hi = mid;
    }
    const uint32_t pos = uint32_t(t - __ldg(cu_seqlens + lo));
    const uint32_t blk_idx = pos / uint32_t(block_size), off = pos - blk_idx * uint32_t(block_size);
    const int64_t blk = __ldg(block_table + lo * max_blocks + blk_idx);
    Vec* dst = reinterpret_cast<Vec*>(out + t * head_dim);
    if (blk < 0 || blk >= num_blocks) {  // untrusted block id: zeros, never read
      for (int c = lane_in_group; c < chunks; c += tpg) dst[c] = Vec{};
      if (lane_in_group == 0) out_scale[t] = 0.f;
      continue;
    }
    const uint8_t* block = cache + blk * block_size * (head_dim + 4);
    const Vec* src = reinterpret_cast<const Vec*>(block + int64_t(off) * head_dim);
    for (int c = lane_in_group; c < chunks; c += tpg) dst[c] = src[c];
    if (lane_in_group == 0) {
      const uint8_t* sp = block + int64_t(block_size) * head_dim + 4 * off;
      uint32_t b = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) b |= uint32_t(sp[i]) << (8 * i);
      out_scale[t] = __uint_as_float(b);
    }
  }
}

// ---- MLA KV cache --------------------------------------------------------------------------------
// One warp per token; where its bytes go is mla_layout.h's MlaCacheLayout.
//   V3.2 FP8 records: half-warps quantise tiles (0,1) then (2,3), 16 lanes x 8 values per tile.
//   V4 FP8 pages: quarter-warps quantise tiles 0-3 then 4-6, 8 lanes x 8 values per 64-value tile;
//     ue8m0 scale bytes and the pad byte after the page's rows.
//   Either way lanes 0-7 copy the 64 rope values as bf16. bf16 caches: 16-byte chunks.
template <MlaCacheKind Kind, typename T>
__device__ __forceinline__ void write_mla_token(const T* row, const MlaCacheLayout& l, int64_t slot,
                                                uint8_t* cache, int lane) {
  uint8_t* values = cache + l.value_byte(slot);
  if constexpr (Kind == MlaCacheKind::kBf16) {
    for (int c = lane; c < l.dim / kChunk; c += kWarpSize) {
      float v[kChunk];
      load8(row + c * kChunk, v);
      store8_bf16(values + c * 2 * kChunk, v);
    }
  } else {
    constexpr bool kV4 = Kind == MlaCacheKind::kV4Fp8;
    constexpr int kTile = kV4 ? 64 : 128, kTiles = kV4 ? 7 : 4, kNope = kTile * kTiles;
    constexpr int kLanesPerTile = kTile / kChunk;              // 8 or 16
    constexpr int kTilesPerPass = kWarpSize / kLanesPerTile;   // 4 or 2
    uint8_t* scales = cache + l.scale_byte(slot);
    const int group = lane / kLanesPerTile, lane_in_tile = lane % kLanesPerTile;
    const unsigned mask = subwarp_mask<kLanesPerTile>(lane);
#pragma unroll
    for (int pass = 0; pass < (kTiles + kTilesPerPass - 1) / kTilesPerPass; ++pass) {
      const int tile = pass * kTilesPerPass + group;
      if (tile < kTiles) {   // uniform in a sub-warp: its shuffles see all their lanes
        const float s = quantize_group_vec<kLanesPerTile, 1>(row + tile * kTile, kLanesPerTile,
                                                             values + tile * kTile, MlaScaleRule{},
                                                             mask, lane_in_tile);
        if (lane_in_tile == 0) {
          if constexpr (kV4) scales[tile] = ue8m0_byte(s);
          else reinterpret_cast<float*>(scales)[tile] = s;
        }
      }
    }
    if constexpr (kV4) {
      if (lane == 0) scales[kTiles] = 0;   // the pad byte
    }
    if (lane < kMlaRope / kChunk) {
      float v[kChunk];
      load8(row + kNope + lane * kChunk, v);
      store8_bf16(cache + l.rope_byte(slot) + lane * 2 * kChunk, v);
    }
  }
}

template <typename T, typename Idx, MlaCacheKind Kind>
__global__ void __launch_bounds__(256) mla_write_kernel(const T* __restrict__ kv,
                                                        const Idx* __restrict__ slots, int64_t n,
                                                        uint8_t* __restrict__ cache,
                                                        const MlaCacheLayout layout) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; i < n;
       i += stride) {
    const int64_t slot = slots[i];
    if (slot < 0 || slot >= layout.num_slots) continue;  // warp-uniform
    write_mla_token<Kind>(kv + i * layout.dim, layout, slot, cache, lane);
  }
}

// The e4m3 values of one 16-byte chunk times s, as 16 bf16 (two 16-byte stores at dst).
__device__ __forceinline__ void dequantize16(uint4 raw, float s, uint4* dst) {
  const auto* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&raw);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float v[kChunk];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[4 * h + p], __NV_E4M3)));
      v[2 * p] = f.x * s;
      v[2 * p + 1] = f.y * s;
    }
    store8_bf16(reinterpret_cast<uint8_t*>(dst + h), v);
  }
}

// One warp per output row (dim bf16 values); a slot outside the cache gives a zero row.
//   V3.2 FP8: lane l dequantises nope values [16 l, 16 l + 16) of tile l / 8; lanes 0-7 copy rope.
//   V4 FP8: lanes 0-27 dequantise [16 l, 16 l + 16) of tile l / 4; lanes 28-31 copy the rope.
template <typename Idx, MlaCacheKind Kind>
__global__ void __launch_bounds__(256) mla_gather_kernel(const uint8_t* __restrict__ cache,
                                                         const MlaCacheLayout layout,
                                                         const Idx* __restrict__ slots, int64_t m,
                                                         uint8_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / kWarpSize;
  const int chunks = 2 * layout.dim / 16;                          // 16-byte output chunks
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; i < m;
       i += stride) {
    const int64_t slot = slots[i];
    uint4* dst = reinterpret_cast<uint4*>(out + i * (2 * layout.dim));
    if (slot < 0 || slot >= layout.num_slots) {
      for (int c = lane; c < chunks; c += kWarpSize) dst[c] = make_uint4(0, 0, 0, 0);
      continue;
    }
    const uint8_t* values = cache + layout.value_byte(slot);
    if constexpr (Kind == MlaCacheKind::kBf16) {
      const uint4* src = reinterpret_cast<const uint4*>(values);
      for (int c = lane; c < chunks; c += kWarpSize) dst[c] = __ldg(src + c);
    } else {
      constexpr bool kV4 = Kind == MlaCacheKind::kV4Fp8;
      constexpr int kNopeLanes = kV4 ? 28 : 32, kLanesPerTile = kV4 ? 4 : 8;
      const uint8_t* scales = cache + layout.scale_byte(slot);
      const uint4* rope = reinterpret_cast<const uint4*>(cache + layout.rope_byte(slot));
      if (lane < kNopeLanes) {
        const float s = kV4 ? ue8m0_value(__ldg(scales + lane / kLanesPerTile))
                            : __ldg(reinterpret_cast<const float*>(scales) + lane / kLanesPerTile);
        dequantize16(__ldg(reinterpret_cast<const uint4*>(values) + lane), s, dst + 2 * lane);
      }
      // 8 chunks of rope: lanes 0-7 (V3.2) or 28-31, two each (V4)
      constexpr int kRopeChunks = 2 * kMlaRope / 16, kRopeLane0 = kV4 ? kNopeLanes : 0;
      constexpr int kPerLane = kV4 ? 2 : 1;
      if (lane >= kRopeLane0 && lane < kRopeLane0 + kRopeChunks / kPerLane) {
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
          const int chunk = (lane - kRopeLane0) * kPerLane + c;
          dst[2 * kNopeLanes + chunk] = __ldg(rope + chunk);
        }
      }
    }
  }
}

}  // namespace dsa::cache
