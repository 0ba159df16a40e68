// sparse_mla_decode CUDA kernels (torch-free).
//
// One CTA of 8 warps per (query row b*s_q+s, block of HB heads, split of the entries).
// Templated on the cache format (Fmt: V3.2 FP8 656-byte records or bf16 576 for d_qk 576, V4 FP8
// 584-byte MODEL1 pages or bf16 512 for d_qk 512; token addresses from cache/mla_layout.h).
// The entries are the 64-entry tiles of the window list (indices / kv_cache) followed by those
// of the optional second list (extra_indices / extra_kv_cache, SPEC 10.3): one online softmax
// runs over both, so the second list costs nothing beyond its tiles. Tiles wholly past a
// list's length are skipped (CTA-uniform). Per step it gathers 64 selected cache tokens, dequantises them once into shared memory as
// bf16 (shared by all HB heads), then runs S = Q K^T and O += P V on bf16 tensor cores
// (mma.sync m16n8k16, or wgmma on sm_90a for 64-head blocks) with an online softmax. FP8 records are fetched with cp.async into a raw
// staging buffer one step ahead, so the gather of step t+1 overlaps the math of step t.
// Invalid entries (negative, >= num_slots, past topk_length) are never read: their shared-memory
// rows are zero-filled and their scores masked to -inf.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "mla_decode/mla_decode_launch.h"
#include "mla_decode/mla_decode_layout.h"
#include "mla_decode/mla_decode_mma.cuh"
#include "common/wgmma_sm90.cuh"

namespace dsa::mla_decode {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element (r, c) of a bf16 tile of R rows kept as 8x8 "core matrices" (8 rows of 16 contiguous
// bytes, 128 bytes each), column groups outermost. One ldmatrix 8x8 matrix is one core matrix
// (bank-conflict free), and it is the no-swizzle layout wgmma descriptors describe: stride
// between 8-row groups 128 bytes, between 8-column groups R * 16 bytes.
template <int R>
__device__ __forceinline__ int core_offset(int r, int c) {
  return ((c >> 3) * (R / 8) + (r >> 3)) * 64 + (r & 7) * 8 + (c & 7);
}
template <int R>
constexpr uint32_t core_column_group_bytes() { return R * 16; }
constexpr uint32_t kCoreRowGroupBytes = 128;

// A cache format the kernel reads: kind of layout and d_qk (the token's values, 576 or 512).
// kStageBytes: the FP8 staging bytes of one token (V3.2: the 656-byte record; V4: the 576-byte
// row, then 4 private copies of its 8 scale bytes, one per quarter-thread: see issue_tile_copy).
template <cache::MlaCacheKind kKind, int kDqk_>
struct Fmt {
  static constexpr cache::MlaCacheKind kind = kKind;
  static constexpr bool kFp8 = kKind != cache::MlaCacheKind::kBf16;
  static constexpr bool kV4 = kKind == cache::MlaCacheKind::kV4Fp8;
  static constexpr int kDqk = kDqk_;
  static constexpr int kNope = kDqk - kDRope;                   // 512 / 448
  static constexpr int kV4Stage = int(cache::kV4RowBytes) + 4 * int(cache::kV4ScaleBytes);   // 608
  static constexpr int kStageBytes = !kFp8 ? 0 : kV4 ? kV4Stage : kFp8RecordBytes;
  static_assert(kDqk == 576 || kDqk == 512, "d_qk");
  static_assert(!kFp8 || (kV4 ? kDqk == 512 : kDqk == 576), "FP8 layouts: V3.2 is 576, V4 is 512");
};
using FmtV32Fp8 = Fmt<cache::MlaCacheKind::kV32Fp8, 576>;
using FmtV4Fp8 = Fmt<cache::MlaCacheKind::kV4Fp8, 512>;
using FmtBf16x576 = Fmt<cache::MlaCacheKind::kBf16, 576>;
using FmtBf16x512 = Fmt<cache::MlaCacheKind::kBf16, 512>;

// Shared-memory layout of one CTA for a head block of HB heads (byte offsets, 16-aligned).
template <int HB, class F>
struct DecodeSmem {
  static constexpr int kSStride = kTokensPerTile + 4;   // fp32 scores, row-major
  static constexpr size_t kQ = 0;                                         // [HB x d_qk] core tiles
  static constexpr size_t kKV = kQ + size_t(HB) * F::kDqk * 2;            // [64 x d_qk] core tiles
  static constexpr size_t kS = kKV + size_t(kTokensPerTile) * F::kDqk * 2;
  static constexpr size_t kP = kS + size_t(HB) * kSStride * 4;            // [HB x 64] core tiles
  static constexpr size_t kRowAlpha = kP + size_t(HB) * kTokensPerTile * 2;   // per-row rescale
  static constexpr size_t kRowFinal = kRowAlpha + HB * 4;                     // per-row 1/denominator
  static constexpr size_t kValid = kRowFinal + HB * 4;                        // per-token validity
  static constexpr size_t kRaw = kValid + kTokensPerTile * 4;                 // FP8 staging
  static constexpr size_t kBytes = kRaw + size_t(kTokensPerTile) * F::kStageBytes;
};

// One list of a query row: its slots, valid length and cache.
struct RowList {
  const uint8_t* cache;
  const int32_t* indices;    // this row's K entries
  int len;                   // entries used, clamped to [0, K]
  cache::MlaCacheLayout layout;
};

// The slot of entry j of a row, or -1 when it must not be read.
__device__ __forceinline__ int64_t entry_slot(const int32_t* row_indices, int j, int len,
                                              int64_t num_slots) {
  if (j >= len) return -1;
  const int64_t slot = __ldg(row_indices + j);
  return (slot >= 0 && slot < num_slots) ? slot : -1;
}

// Thread -> (token, quarter of its record) for gathering and dequantising a tile. Consecutive
// threads take consecutive tokens so their 16-byte shared stores hit distinct banks.
__device__ __forceinline__ int tile_token() { return threadIdx.x % kTokensPerTile; }
__device__ __forceinline__ int tile_part() { return threadIdx.x / kTokensPerTile; }

// Issue the copies of one 64-entry tile. Each thread copies a quarter of its token: V3.2 FP8:
// nope tile `part` (8 chunks), its tile's scale and 2 rope chunks; V4 FP8: 7 chunks of the 448
// e4m3 values, 2 rope chunks and the token's 8 scale bytes (into its own copy) — both into the
// raw staging buffer, so each thread later reads only bytes it copied itself; bf16 rows go
// straight to the KV tile. Returns whether the token is valid (its copies zero-fill otherwise).
template <class F>
__device__ __forceinline__ bool issue_tile_copy(const RowList& list, int tile, uint8_t* raw, __nv_bfloat16* kv) {
  const int token = tile_token(), part = tile_part();
  const int64_t slot = entry_slot(list.indices, tile * kTokensPerTile + token, list.len, list.layout.num_slots);
  const bool valid = slot >= 0;
  const int64_t safe_slot = valid ? slot : 0;   // an invalid entry is zero-filled, never read
  const uint8_t* src = list.cache + list.layout.value_byte(safe_slot);
  if constexpr (F::kV4) {
    uint8_t* dst = raw + token * F::kStageBytes;
    constexpr int kChunks = F::kNope / 16 / 4;   // 7 chunks of 16 e4m3 values a quarter
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int off = (part * kChunks + c) * 16;
      cp_async_16(dst + off, src + off, valid);
    }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int off = F::kNope + 32 * part + 16 * c;
      cp_async_16(dst + off, src + off, valid);
    }
    // The scale bytes are 8-aligned only (page + bs * 576 + 8 off): two 4-byte copies.
    const uint8_t* scales = list.cache + list.layout.scale_byte(safe_slot);
    uint8_t* sdst = dst + cache::kV4RowBytes + cache::kV4ScaleBytes * part;
    cp_async_4(sdst, scales, valid);
    cp_async_4(sdst + 4, scales + 4, valid);
  } else if constexpr (F::kFp8) {
    uint8_t* dst = raw + token * kFp8RecordBytes;
#pragma unroll
    for (int c = 0; c < 8; ++c) cp_async_16(dst + part * kTile + 16 * c, src + part * kTile + 16 * c, valid);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int off = kRopeOffset + 32 * part + 16 * c;
      cp_async_16(dst + off, src + off, valid);
    }
    cp_async_4(dst + kScaleOffset + 4 * part, src + kScaleOffset + 4 * part, valid);
  } else {
    const auto* row = reinterpret_cast<const __nv_bfloat16*>(src);
    constexpr int kCols = F::kDqk / 4;   // 144 / 128 features, 18 / 16 chunks per thread
    // Not unrolled fully: this copy is issued while the 64-head kernel's accumulators are live,
    // and 16 precomputed addresses spilled it on sm_80.
#pragma unroll 2
    for (int c = 0; c < kCols / 8; ++c) {
      const int col = part * kCols + 8 * c;
      cp_async_16(kv + core_offset<kTokensPerTile>(token, col), row + col, valid);
    }
  }
  cp_async_commit();
  return valid;
}

// 16 e4m3 values (one uint4) times a power-of-two scale -> 16 bf16 at KV columns [col, col + 16).
__device__ __forceinline__ void dequantise_chunk(const uint4 v, float scale, __nv_bfloat16* kv, int token, int col) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  uint32_t packed[8];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    // e4m3 -> f16 is exact; times a power-of-two scale, bf16 holds the product exactly.
    const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[w] & 0xFFFF), __NV_E4M3);
    const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[w] >> 16), __NV_E4M3);
    const float2 flo = __half22float2(*reinterpret_cast<const __half2*>(&lo));
    const float2 fhi = __half22float2(*reinterpret_cast<const __half2*>(&hi));
    packed[2 * w] = pack_bf16x2(flo.x * scale, flo.y * scale);
    packed[2 * w + 1] = pack_bf16x2(fhi.x * scale, fhi.y * scale);
  }
  *reinterpret_cast<uint4*>(kv + core_offset<kTokensPerTile>(token, col)) =
      make_uint4(packed[0], packed[1], packed[2], packed[3]);
  *reinterpret_cast<uint4*>(kv + core_offset<kTokensPerTile>(token, col + 8)) =
      make_uint4(packed[4], packed[5], packed[6], packed[7]);
}

// FP8 staging -> bf16 KV tile: this thread's quarter of its token (the bytes it copied).
template <class F>
__device__ __forceinline__ void dequantise_tile_part(const uint8_t* raw, __nv_bfloat16* kv) {
  const int token = tile_token(), part = tile_part();
  const uint8_t* rec = raw + token * F::kStageBytes;
  int rope_src;
  if constexpr (F::kV4) {
    constexpr int kChunks = F::kNope / 16 / 4;
    const uint8_t* scales = rec + cache::kV4RowBytes + cache::kV4ScaleBytes * part;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int chunk = part * kChunks + c;   // 16 values of 64-value tile chunk / 4
      dequantise_chunk(*reinterpret_cast<const uint4*>(rec + 16 * chunk), cache::ue8m0_value(scales[chunk / 4]),
                       kv, token, 16 * chunk);
    }
    rope_src = F::kNope;
  } else {
    const float scale = reinterpret_cast<const float*>(rec + kScaleOffset)[part];
#pragma unroll
    for (int c = 0; c < 8; ++c)
      dequantise_chunk(*reinterpret_cast<const uint4*>(rec + part * kTile + 16 * c), scale, kv, token,
                       part * kTile + 16 * c);
    rope_src = kRopeOffset;
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int col = F::kNope + 16 * part + 8 * c;
    *reinterpret_cast<uint4*>(kv + core_offset<kTokensPerTile>(token, col)) =
        *reinterpret_cast<const uint4*>(rec + rope_src + 32 * part + 16 * c);
  }
}

// kWgmma (HB = 64 only): warpgroup 0 computes S = Q K^T and each warpgroup O += P V for 256
// output columns, with wgmma from shared memory; otherwise each warp issues mma.sync.
// Accumulators are laid out alike: acc[(m * kAccN + n) * 4 + i] is the m16n8 fragment (m, n)
// of the lane, rows acc_row0(m) + g (+8), columns acc_col0(n) + 2 t4 (+1).
template <int HB, class F, bool kWgmma>
__global__ void __launch_bounds__(kThreads, 1) sparse_mla_decode_kernel(const DecodeParams p) {
  using Smem = DecodeSmem<HB, F>;
  constexpr bool kFp8 = F::kFp8;
  constexpr int kDQK = F::kDqk;   // shadows the V3.2 constant: this format's d_qk
  constexpr int MT = HB / 16;                  // 16-row MMA tiles of heads
  constexpr int kTPR = kThreads / HB;          // softmax threads per head row
  constexpr int kVPT = kTokensPerTile / kTPR;  // scores per softmax thread
  constexpr int kSS = Smem::kSStride;
  constexpr int kColsPerWarp = kDV / kWarps;   // 64 output columns per warp (mma.sync P V)
  constexpr int kAccM = kWgmma ? 1 : MT;
  constexpr int kAccN = kWgmma ? kDV / 2 / 8 : kColsPerWarp / 8;
  static_assert(HB % 16 == 0 && kThreads % HB == 0 && kColsPerWarp == 64, "tile shape");
  static_assert(!kWgmma || HB == 64, "the wgmma path covers 64 heads with two warpgroups");

  DSA_DYNAMIC_SMEM(smem, 128);
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem + Smem::kQ);
  auto* kv_s = reinterpret_cast<__nv_bfloat16*>(smem + Smem::kKV);
  auto* s_s = reinterpret_cast<float*>(smem + Smem::kS);
  auto* p_s = reinterpret_cast<__nv_bfloat16*>(smem + Smem::kP);
  auto* alpha_s = reinterpret_cast<float*>(smem + Smem::kRowAlpha);
  auto* final_s = reinterpret_cast<float*>(smem + Smem::kRowFinal);
  auto* valid_s = reinterpret_cast<int*>(smem + Smem::kValid);
  uint8_t* raw_s = smem + Smem::kRaw;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;       // MMA fragment row / column-pair of this lane
  const int64_t row = blockIdx.x;              // b * s_q + s
  const int h0 = blockIdx.y * HB;
  const int split = blockIdx.z;
  const int64_t b = row / p.s_q;
  auto acc_row0 = [&](int m) { return kWgmma ? (warp % 4) * 16 : m * 16; };
  auto acc_col0 = [&](int n) { return kWgmma ? (warp / 4) * (kDV / 2) + n * 8 : warp * kColsPerWarp + n * 8; };

  // The row's two lists (the second empty without extra_kv_cache) and their tiles: list 0 owns
  // global tiles [0, T0), list 1 [T0, T0 + T1) (T from K and K2 only: the split plan's tiles).
  auto row_len = [&](const int32_t* lengths, bool per_query, int64_t k) {
    int n = static_cast<int>(k);
    if (lengths != nullptr) n = min(max(__ldg(lengths + (per_query ? row : b)), 0), n);
    return n;
  };
  const bool has_extra = p.extra_kv_cache != nullptr;
  const RowList list0{static_cast<const uint8_t*>(p.kv_cache), p.indices + row * p.topk,
                      row_len(p.topk_length, p.per_query_topk_length, p.topk), p.layout};
  const RowList list1{static_cast<const uint8_t*>(p.extra_kv_cache), p.extra_indices + row * p.extra_topk,
                      has_extra ? row_len(p.extra_topk_length, p.per_query_extra_topk_length, p.extra_topk) : 0,
                      p.extra_layout};
  const int T0 = static_cast<int>((p.topk + kTokensPerTile - 1) / kTokensPerTile);
  const int T1 = has_extra ? static_cast<int>((p.extra_topk + kTokensPerTile - 1) / kTokensPerTile) : 0;
  const int L0 = (list0.len + kTokensPerTile - 1) / kTokensPerTile;   // tiles of list 0 with entries
  const int L1 = (list1.len + kTokensPerTile - 1) / kTokensPerTile;
  // The next tile at or after t that has entries: tiles [L0, T0) are skipped.
  auto live = [&](int t) { return (t >= L0 && t < T0) ? T0 : t; };
  const int tile_begin = split * p.plan.tiles_per_split;
  const int tile_end = min(min(tile_begin + p.plan.tiles_per_split, T0 + T1), T0 + L1);
  auto issue = [&](int t) {
    return t < T0 ? issue_tile_copy<F>(list0, t, raw_s, kv_s) : issue_tile_copy<F>(list1, t - T0, raw_s, kv_s);
  };

  // Q of the head block (rows past H are zero and never stored).
  {
    const auto* q_g = static_cast<const __nv_bfloat16*>(p.q) + (row * p.heads + h0) * kDQK;
    for (int c = tid; c < HB * (kDQK / 8); c += kThreads) {
      const int r = c % HB, col = (c / HB) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (h0 + r < p.heads) v = __ldg(reinterpret_cast<const uint4*>(q_g + r * kDQK + col));
      *reinterpret_cast<uint4*>(q_s + core_offset<HB>(r, col)) = v;
    }
  }

  const float score_scale = p.sm_scale * kLog2e;   // scores kept in log2 units
  const int soft_row = tid / kTPR, soft_part = tid % kTPR;
  float m_run = -INFINITY, l_run = 0.f;            // owned by the kTPR threads of soft_row
  float acc[kAccM * kAccN * 4];
#pragma unroll
  for (int i = 0; i < kAccM * kAccN * 4; ++i) acc[i] = 0.f;

  bool pending_valid = false;
  int tile = live(tile_begin);
  if (tile < tile_end) pending_valid = issue(tile);

  while (tile < tile_end) {
    const int next = live(tile + 1);
    cp_async_wait<0>();
    if (tid < kTokensPerTile) valid_s[tid] = pending_valid;   // part-0 threads own the tokens
    if constexpr (kFp8) {
      dequantise_tile_part<F>(raw_s, kv_s);
      // Each thread re-fills only staging bytes it alone reads, so the next copy can start now.
      if (next < tile_end) pending_valid = issue(next);
    }
    if constexpr (kWgmma) fence_proxy_async_smem();   // Q / KV stores -> wgmma reads
    __syncthreads();

    // S = Q K^T, scaled to log2 units, into s_s. mma.sync: warp -> 16 heads x (8 * MT) keys.
    // wgmma: warpgroup 0 alone -> 64 heads x 64 keys (n = 64 keeps the shared-memory operand
    // traffic under the tensor cores' rate; n = 32 per warpgroup would not); warpgroup 1 waits.
    {
      constexpr int kSNT = kWgmma ? kTokensPerTile / 8 : MT;   // 8-key tiles per warp
      const int mt = warp % MT, n0 = kWgmma ? 0 : (warp / MT) * MT * 8;
      const bool s_warp = !kWgmma || warp < 4;
      float sacc[kSNT * 4];
#pragma unroll
      for (int i = 0; i < kSNT * 4; ++i) sacc[i] = 0.f;
      if constexpr (kWgmma) {
        if (s_warp) {   // warpgroup-uniform
          const uint64_t a0 = wgmma_desc(q_s, core_column_group_bytes<HB>(), kCoreRowGroupBytes);
          const uint64_t b0 = wgmma_desc(kv_s, core_column_group_bytes<kTokensPerTile>(), kCoreRowGroupBytes);
          wgmma_fence();
#pragma unroll   // all 36 issued back to back; one wait at the end
          for (int ks = 0; ks < kDQK / 16; ++ks) {
            // K step 16 = 2 column groups of both core-matrix tiles.
            wgmma_m64n64k16_kmajor_b(sacc, a0 + ((ks * 2 * core_column_group_bytes<HB>()) >> 4),
                                     b0 + ((ks * 2 * core_column_group_bytes<kTokensPerTile>()) >> 4), ks > 0);
          }
          wgmma_commit();
          wgmma_wait_all();
        }
      } else {
#pragma unroll 4
        for (int ks = 0; ks < kDQK / 16; ++ks) {
          uint32_t a[4];
          ldmatrix_x4(a, q_s + core_offset<HB>(mt * 16 + lane % 16, ks * 16 + (lane / 16) * 8));
          if constexpr (MT == 1) {
            uint32_t bb[2];
            ldmatrix_x2(bb, kv_s + core_offset<kTokensPerTile>(n0 + lane % 8, ks * 16 + ((lane / 8) % 2) * 8));
            mma_bf16_16816(sacc, a, bb[0], bb[1]);
          } else {
#pragma unroll
            for (int np = 0; np < MT / 2; ++np) {
              uint32_t bb[4];
              ldmatrix_x4(bb, kv_s + core_offset<kTokensPerTile>(n0 + np * 16 + (lane / 16) * 8 + lane % 8,
                                                                 ks * 16 + ((lane / 8) % 2) * 8));
              mma_bf16_16816(*reinterpret_cast<float(*)[4]>(sacc + 8 * np), a, bb[0], bb[1]);
              mma_bf16_16816(*reinterpret_cast<float(*)[4]>(sacc + 8 * np + 4), a, bb[2], bb[3]);
            }
          }
        }
      }
      if (s_warp) {
#pragma unroll
        for (int nt = 0; nt < kSNT; ++nt) {
          float* s0 = s_s + (mt * 16 + g) * kSS + n0 + nt * 8 + 2 * t4;
          s0[0] = sacc[nt * 4 + 0] * score_scale;
          s0[1] = sacc[nt * 4 + 1] * score_scale;
          s0[8 * kSS] = sacc[nt * 4 + 2] * score_scale;
          s0[8 * kSS + 1] = sacc[nt * 4 + 3] * score_scale;
        }
      }
    }
    __syncthreads();

    // Online softmax: kTPR adjacent lanes own one head row.
    {
      float sv[kVPT];
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kVPT; ++i) {
        const int j = soft_part * kVPT + i;
        sv[i] = valid_s[j] ? s_s[soft_row * kSS + j] : -INFINITY;
        mx = fmaxf(mx, sv[i]);
      }
#pragma unroll
      for (int o = kTPR / 2; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m_run, mx);
      const bool none = m_new == -INFINITY;        // nothing valid in this row yet
      const float alpha = none ? 1.f : exp2f(m_run - m_new);
      float sum = 0.f;
      // fmaxf drops NaN, so a row whose only valid scores are NaN still has m = -inf: its p
      // stays NaN (not 0) so that the NaN reaches out and lse instead of an "empty" row.
      auto p_of = [&](float x) { return none ? (x != x ? x : 0.f) : exp2f(x - m_new); };
#pragma unroll
      for (int i = 0; i < kVPT; i += 2) {
        const float p0 = p_of(sv[i]);
        const float p1 = p_of(sv[i + 1]);
        sum += p0 + p1;
        *reinterpret_cast<uint32_t*>(p_s + core_offset<HB>(soft_row, soft_part * kVPT + i)) = pack_bf16x2(p0, p1);
      }
#pragma unroll
      for (int o = kTPR / 2; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      if (soft_part == 0) alpha_s[soft_row] = alpha;
    }
    if constexpr (kWgmma) fence_proxy_async_smem();   // P stores -> wgmma reads
    __syncthreads();

    // O = alpha O + P V.
    {
#pragma unroll
      for (int m = 0; m < kAccM; ++m) {
        const float a_lo = alpha_s[acc_row0(m) + g], a_hi = alpha_s[acc_row0(m) + g + 8];
#pragma unroll
        for (int n = 0; n < kAccN; ++n) {
          float* f = acc + (m * kAccN + n) * 4;
          f[0] *= a_lo; f[1] *= a_lo; f[2] *= a_hi; f[3] *= a_hi;
        }
      }
      if constexpr (kWgmma) {
        // Warpgroup wg: 64 heads x output columns [256 wg, 256 wg + 256); V is N-major.
        const uint64_t a0 = wgmma_desc(p_s, core_column_group_bytes<HB>(), kCoreRowGroupBytes);
        const uint64_t b0 = wgmma_desc(kv_s + core_offset<kTokensPerTile>(0, (warp / 4) * (kDV / 2)),
                                       kCoreRowGroupBytes, core_column_group_bytes<kTokensPerTile>());
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kTokensPerTile / 16; ++ks)
          wgmma_m64n256k16_nmajor_b(acc, a0 + ((ks * 2 * core_column_group_bytes<HB>()) >> 4),
                                    b0 + ((ks * 2 * kCoreRowGroupBytes) >> 4), 1);
        wgmma_commit();
        wgmma_wait_all();
      } else {
#pragma unroll
        for (int ks = 0; ks < kTokensPerTile / 16; ++ks) {
          uint32_t a[MT][4];
#pragma unroll
          for (int mt = 0; mt < MT; ++mt)
            ldmatrix_x4(a[mt], p_s + core_offset<HB>(mt * 16 + lane % 16, ks * 16 + (lane / 16) * 8));
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            uint32_t bb[4];
            ldmatrix_x4_trans(bb, kv_s + core_offset<kTokensPerTile>(ks * 16 + lane % 8 + ((lane / 8) % 2) * 8,
                                                                     acc_col0(2 * np) + (lane / 16) * 8));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              mma_bf16_16816(*reinterpret_cast<float(*)[4]>(acc + (mt * kAccN + 2 * np) * 4), a[mt], bb[0], bb[1]);
              mma_bf16_16816(*reinterpret_cast<float(*)[4]>(acc + (mt * kAccN + 2 * np + 1) * 4), a[mt], bb[2], bb[3]);
            }
          }
        }
      }
    }
    __syncthreads();   // KV, P and alpha are rewritten by the next step
    if constexpr (!kFp8) {
      if (next < tile_end) pending_valid = issue(next);
    }
    tile = next;
  }

  // Finish: lse in natural log; out = O / (l + sink term) unsplit, O / l as a partial.
  const bool split_mode = p.plan.num_splits > 1;
  if (soft_part == 0) {
    const int h = h0 + soft_row;
    float inv = 0.f, lse = -INFINITY;
    if (l_run != 0.f) {   // 0 only for a row with no valid entry; NaN (a NaN score) propagates
      lse = (m_run + log2f(l_run)) * kLn2;
      float denom = l_run;
      if (!split_mode && p.attn_sink != nullptr && h < p.heads)
        denom += exp2f(__ldg(p.attn_sink + h) * kLog2e - m_run);
      inv = 1.f / denom;
    }
    final_s[soft_row] = inv;
    if (h < p.heads) {
      const int64_t o = row * p.heads + h;
      if (split_mode) p.lse_partial[int64_t(split) * p.batch * p.s_q * p.heads + o] = lse;
      else p.lse[o] = lse;
    }
  }
  __syncthreads();
#pragma unroll
  for (int m = 0; m < kAccM; ++m) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = acc_row0(m) + g + 8 * half;
      if (h0 + r >= p.heads) continue;
      const float inv = final_s[r];
      const int64_t o = (row * p.heads + h0 + r) * kDV + 2 * t4;
#pragma unroll
      for (int n = 0; n < kAccN; ++n) {
        const float* f = acc + (m * kAccN + n) * 4;
        const float v0 = f[2 * half] * inv, v1 = f[2 * half + 1] * inv;
        if (split_mode) {
          float* dst = p.out_partial + int64_t(split) * p.batch * p.s_q * p.heads * kDV + o + acc_col0(n);
          *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
        } else {
          *reinterpret_cast<uint32_t*>(static_cast<__nv_bfloat16*>(p.out) + o + acc_col0(n)) = pack_bf16x2(v0, v1);
        }
      }
    }
  }
}

// Merge the per-split partials of one (row, head) by their lse weights; applies the sink.
// 128 threads, 4 output columns each.
__global__ void __launch_bounds__(128) sparse_mla_decode_combine_kernel(const DecodeParams p) {
  const int64_t rh = blockIdx.x;                       // (b * s_q + s) * H + h
  const int h = static_cast<int>(rh % p.heads);
  const int64_t stride_lse = p.batch * p.s_q * p.heads;
  const int splits = p.plan.num_splits;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) {   // a NaN partial (a NaN score) must reach the output
    const float v = p.lse_partial[s * stride_lse + rh];
    mx = (v > mx || v != v) ? v : mx;
  }
  const int c = threadIdx.x * 4;
  auto* out = static_cast<__nv_bfloat16*>(p.out) + rh * kDV + c;
  if (mx == -INFINITY) {
    *reinterpret_cast<uint2*>(out) = make_uint2(0, 0);
    if (threadIdx.x == 0) p.lse[rh] = -INFINITY;
    return;
  }
  float sum = 0.f;
  for (int s = 0; s < splits; ++s) sum += __expf(p.lse_partial[s * stride_lse + rh] - mx);
  const float lse = mx + __logf(sum);
  const float sink_factor = p.attn_sink ? 1.f / (1.f + __expf(__ldg(p.attn_sink + h) - lse)) : 1.f;
  float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int s = 0; s < splits; ++s) {
    const float w = __expf(p.lse_partial[s * stride_lse + rh] - lse);
    if (w == 0.f) continue;
    const float4 v = *reinterpret_cast<const float4*>(p.out_partial + (s * stride_lse + rh) * kDV + c);
    o.x += w * v.x; o.y += w * v.y; o.z += w * v.z; o.w += w * v.w;
  }
  *reinterpret_cast<uint2*>(out) = make_uint2(pack_bf16x2(o.x * sink_factor, o.y * sink_factor),
                                              pack_bf16x2(o.z * sink_factor, o.w * sink_factor));
  if (threadIdx.x == 0) p.lse[rh] = lse;
}

}  // namespace dsa::mla_decode
