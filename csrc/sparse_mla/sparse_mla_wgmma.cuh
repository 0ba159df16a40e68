// Sparse MLA forward on Hopper warpgroup MMA (wgmma, sm_90a only), for 64-head blocks and a
// latent width D of 576 or 512 (template parameter, as in sparse_mla_kernels.cuh: only the
// score loop's k steps and the row strides depend on it; V is the first 512 columns either way).
// Selected by DSA_SPARSE_MLA_FWD=wgmma (or the earlier DSA_SPARSE_MLA_WGMMA=1); the default
// 64-head forward on sm_90a is the warp-specialised one (sparse_mla_ws.cuh).
//
// One CTA per (token, 64 heads), 256 threads = two warpgroups, per 64-token block:
//   warpgroup 1 gathers the next block's 64 latent rows (16-byte cp.async, zero-fill for skipped
//   entries) into the other of two KV buffers while warpgroup 0 computes S of this block;
//   warpgroup 0: S = Q Kᵀ (D/16 = 36 or 32 wgmma m64n64k16, Q and K from shared memory), online softmax on the
//     fp32 accumulators (a row of S lives in the 4 lanes of a quad: no cross-warp reduction),
//     P (bf16) and each row's rescale factor to shared memory;
//   warpgroup w: O[:, 256 w, +256) = alpha O + P V (4 wgmma m64n256k16, P and V from shared
//     memory; V is the first 512 columns of the KV tile read MN-major, not copied).
//
// Tiles in shared memory use the no-swizzle "core matrix" layout of wgmma descriptors: 8 rows x
// 16 contiguous bytes per 128-byte core matrix, 8-row groups 128 bytes apart, 8-column groups
// R * 16 bytes apart for an R-row tile. csrc/sparse_mla/emu/wgmma_layout_check.py models this
// layout, the descriptors and the accumulator fragments and checks S and O against numpy.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/mma_sm80.cuh"
#include "common/wgmma_sm90.cuh"
#include "sparse_mla/sparse_mla_kernels.cuh"

namespace dsa::sparse_mla {

namespace wg = dsa;  // the wgmma helpers of common/wgmma_sm90.cuh

// Byte offset of element (r, c) of an R-row bf16 core-matrix tile.
template <int R>
__host__ __device__ constexpr uint32_t core_byte_offset(int r, int c) {
  return static_cast<uint32_t>((c >> 3) * (R * 16) + (r >> 3) * 128 + (r & 7) * 16 + (c & 7) * 2);
}

constexpr int kWgmmaHeadBlock = 64;

template <int D>
struct WgmmaFwdCfg {
  static constexpr int kHB = kWgmmaHeadBlock;
  static constexpr int kBN = 64;
  static constexpr int kThreads = 256;
  static constexpr uint32_t kRowGroupBytes = 128;             // SBO (K-major), LBO (MN-major)
  static constexpr uint32_t kColGroupBytes = 64 * 16;         // 8-column group of a 64-row tile
  static constexpr int kQBytes = kHB * D * 2;                 // 73,728 (D = 576)
  static constexpr int kKVBytes = kBN * D * 2;                // 73,728 (D = 576)
  static constexpr int kPBytes = kHB * kBN * 2;               // 8,192
  static constexpr int kQOff = 0;
  static constexpr int kKVOff = kQOff + kQBytes;              // two buffers
  static constexpr int kPOff = kKVOff + 2 * kKVBytes;
  static constexpr int kAlphaOff = kPOff + kPBytes;           // float [64]: rescale; final max
  static constexpr int kSumOff = kAlphaOff + kHB * 4;         // float [64]: final row sums
  static constexpr int kValidOff = kSumOff + kHB * 4;         // float [2][64]
  static constexpr int kSmemBytes = kValidOff + 2 * kBN * 4;  // 230,144 (D = 576)
  static_assert(kSmemBytes <= kMaxSmemPerBlock, "wgmma forward tiles exceed shared memory");
  static_assert(kQOff % 16 == 0 && kKVOff % 16 == 0 && kPOff % 16 == 0, "wgmma operands 16-aligned");
};

// Copies a kRows-row bf16 matrix (kChunks 16-byte chunks a row, even) into a kRows-row
// core-matrix tile. Thread pairs copy 32 contiguous bytes of one row (one full sector);
// consecutive pairs take consecutive rows. src_of(r) is row r's first element, or nullptr
// for a row to zero-fill without reading (`any` is then the never-read source address).
template <int kNThreads, int kRows, int kChunks, class Src>
__device__ __forceinline__ void copy_core_tile(int tid, uint32_t tile, const __nv_bfloat16* any,
                                               Src&& src_of) {
  static_assert((kRows & (kRows - 1)) == 0 && kChunks % 2 == 0, "row pairs of chunks");
  for (int c = tid; c < kRows * kChunks; c += kNThreads) {
    const int r = (c >> 1) & (kRows - 1), ch = 2 * (c / (2 * kRows)) + (c & 1);
    const __nv_bfloat16* row = src_of(r);
    cp_async_16_zfill(tile + core_byte_offset<kRows>(r, ch * 8), row != nullptr ? row + ch * 8 : any,
                      row != nullptr);
  }
}

// Gather a kBN-row block (block blk of the token's indices) into a core-matrix tile; a valid
// flag per row, and with `rows` the latent row index (-1: skipped entry, zero-filled).
template <int kNThreads, int D, int kBN = 64>
__device__ __forceinline__ void wgmma_gather_kv_block(int tid, uint32_t tile, float* valid,
                                                      const __nv_bfloat16* kv,
                                                      const int32_t* idx_row, int blk, int limit,
                                                      int64_t S, int32_t* rows = nullptr) {
  for (int r = tid; r < kBN; r += kNThreads) {
    const int64_t row = entry_row(idx_row, blk * kBN + r, limit, S);
    valid[r] = row >= 0 ? 1.f : 0.f;
    if (rows != nullptr) rows[r] = static_cast<int32_t>(row);
  }
  copy_core_tile<kNThreads, kBN, Latent<D>::kChunks>(tid, tile, kv, [&](int r) -> const __nv_bfloat16* {
    const int64_t row = entry_row(idx_row, blk * kBN + r, limit, S);
    return row >= 0 ? kv + row * D : nullptr;
  });
}

// S[64 heads x 64 tokens] = Q Kᵀ: D / 16 (36 or 32) wgmma m64n64k16, Q and the KV tile K-major
// core-matrix tiles in shared memory (a k step of 16 = two 8-column groups of each tile).
// Issues only: the caller fences before and commits / waits after.
template <int D>
__device__ __forceinline__ void wgmma_issue_scores(float (&s)[32], const uint8_t* q_s,
                                                   const uint8_t* kv_s) {
  using C = WgmmaFwdCfg<D>;
  const uint64_t a0 = wg::wgmma_desc(q_s, C::kHB * 16, C::kRowGroupBytes);
  const uint64_t b0 = wg::wgmma_desc(kv_s, C::kColGroupBytes, C::kRowGroupBytes);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    wg::wgmma_m64n64k16_kmajor_b(s, a0 + ((ks * 2 * C::kHB * 16) >> 4),
                                 b0 + ((ks * 2 * C::kColGroupBytes) >> 4), ks > 0);
}

// O rows row0 / row0 + 8 scaled by the online softmax's rescale factors before the next P V
// accumulates into them. The operand fence keeps the multiplies above the following
// wgmma.fence: moved below it (ptxas may, they touch registers only), they would make ptxas
// inject a warpgroup.arrive of its own before the wgmma (C7519).
__device__ __forceinline__ void wgmma_rescale_rows(float (&o)[128], float a_lo, float a_hi) {
#pragma unroll
  for (int i = 0; i < 128; i += 4) {
    o[i] *= a_lo; o[i + 1] *= a_lo;
    o[i + 2] *= a_hi; o[i + 3] *= a_hi;
  }
  wg::fence_operands(o);
}

// O[:, 256 wgi, +256) += P V: 4 wgmma m64n256k16, P a 64 x 64 K-major tile, V = KV[:, :512]
// as B[k = token][n = column], MN-major (LBO = between 8-token groups, SBO = between 8-column
// groups; V is not copied). Issues only. (The KV row stride is D but a core-matrix tile's
// column groups are R * 16 bytes apart whatever D is, so the descriptors do not depend on D.)
__device__ __forceinline__ void wgmma_issue_pv(float (&o)[128], const uint8_t* p_s,
                                               const uint8_t* kv_s, int wgi) {
  using C = WgmmaFwdCfg<576>;
  const uint64_t a0 = wg::wgmma_desc(p_s, C::kHB * 16, C::kRowGroupBytes);
  const uint64_t b0 = wg::wgmma_desc(kv_s + core_byte_offset<C::kBN>(0, wgi * (kDv / 2)),
                                     C::kRowGroupBytes, C::kColGroupBytes);
#pragma unroll
  for (int ks = 0; ks < C::kBN / 16; ++ks)
    wg::wgmma_m64n256k16_nmajor_b(o, a0 + ((ks * 2 * C::kHB * 16) >> 4),
                                  b0 + ((ks * 2 * C::kRowGroupBytes) >> 4), 1);
}

// The online softmax of one 64 x 64 score tile in a warpgroup's m64n64 accumulator layout
// (s[i]: row row0 + 8 ((i % 4) >= 2), token 8 (i / 4) + 2 c4 + (i & 1); a row lives in the 4
// lanes of a quad, so the row max needs two shuffles and no shared memory): masks skipped
// entries to -inf, scales into the log2 domain, updates the running max / sum of the thread's
// two rows, returns their rescale factors and stores P (bf16) into the 64 x 64 core-matrix tile
// at p_addr. Shared by the wgmma and the warp-specialised forward.
__device__ __forceinline__ void wgmma_online_softmax(float (&s)[32], const float* valid, float scale2,
                                                     int c4, int row0, float (&m_run)[2],
                                                     float (&l_run)[2], float (&alpha)[2],
                                                     uint32_t p_addr) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int tok = 8 * (i >> 2) + 2 * c4 + (i & 1);
    s[i] = valid[tok] != 0.f ? s[i] * scale2 : -INFINITY;
    mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
    mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
    const float m_new = fmaxf(m_run[hf], mx[hf]);
    alpha[hf] = exp2f(m_run[hf] - m_new);
    m_run[hf] = m_new;
    l_run[hf] *= alpha[hf];
  }
#pragma unroll
  for (int i = 0; i < 32; i += 2) {
    const int hf = (i >> 1) & 1;
    const float p0 = exp2f(s[i] - m_run[hf]), p1 = exp2f(s[i + 1] - m_run[hf]);
    l_run[hf] += p0 + p1;
    st_shared_u32(p_addr + core_byte_offset<64>(row0 + 8 * hf, 8 * (i >> 2) + 2 * c4),
                  pack_bf16x2(p0, p1));
  }
}

// The consumer's final row sums (added across the quad) and maxima into shared memory, for
// wgmma_store_rows of both warpgroups. Shared by the wgmma and the warp-specialised forward.
__device__ __forceinline__ void wgmma_publish_row_stats(float (&l_run)[2], const float (&m_run)[2],
                                                        float* sum_s, float* max_s, int row0, int c4) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l_run[hf] += __shfl_xor_sync(0xffffffffu, l_run[hf], 1);
    l_run[hf] += __shfl_xor_sync(0xffffffffu, l_run[hf], 2);
    if (c4 == 0) {
      sum_s[row0 + 8 * hf] = l_run[hf];
      max_s[row0 + 8 * hf] = m_run[hf];
    }
  }
}

// Adds a finished head block's row sums across the quad, then writes out (bf16, normalised,
// the sink in the denominator) and lse for the thread's two rows of the 256 columns
// [256 wgi, +256) held in o (m64n256 accumulator layout). l / m: the row's sum and max.
__device__ __forceinline__ void wgmma_store_rows(const float (&o)[128], const float* sum_s,
                                                 const float* max_s, const float* attn_sink,
                                                 __nv_bfloat16* out, float* lse, int64_t t, int H,
                                                 int h0, int wgi, int row0, int c4) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = row0 + 8 * hf;
    const int h = h0 + r;
    const RowNorm norm = finish_row(sum_s[r], max_s[r], attn_sink, h);
    __nv_bfloat16* orow = out + (t * H + h) * kDv + wgi * (kDv / 2) + 2 * c4;
#pragma unroll
    for (int j = 0; j < 32; ++j)  // o[4 j + 2 hf + e]: column 8 j + 2 c4 + e
      *reinterpret_cast<uint32_t*>(orow + 8 * j) =
          pack_bf16x2(o[4 * j + 2 * hf] * norm.inv, o[4 * j + 2 * hf + 1] * norm.inv);
    if (wgi == 0 && c4 == 0) lse[t * H + h] = norm.lse;
  }
}

template <int D>
__global__ void __launch_bounds__(WgmmaFwdCfg<D>::kThreads, 1)
    sparse_mla_fwd_wgmma_kernel(const __nv_bfloat16* __restrict__ q,
                                const __nv_bfloat16* __restrict__ kv,
                                const int32_t* __restrict__ indices,
                                const float* __restrict__ attn_sink,
                                const int32_t* __restrict__ topk_length,
                                __nv_bfloat16* __restrict__ out, float* __restrict__ lse, int64_t S,
                                int H, int K, float sm_scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgmmaFwdCfg<D>;
  DSA_DYNAMIC_SMEM(smem, 128);
  uint8_t* q_s = smem + C::kQOff;
  uint8_t* kv_s0 = smem + C::kKVOff;
  uint8_t* p_s = smem + C::kPOff;
  float* alpha_s = reinterpret_cast<float*>(smem + C::kAlphaOff);
  float* max_s = alpha_s;  // after the loop: each row's final max
  float* sum_s = reinterpret_cast<float*>(smem + C::kSumOff);
  float* valid_s = reinterpret_cast<float*>(smem + C::kValidOff);

  const int nhb = H / C::kHB;
  const int64_t t = blockIdx.x / nhb;
  const int h0 = static_cast<int>(blockIdx.x % nhb) * C::kHB;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wgi = warp >> 2;                       // warpgroup: output columns [256 wgi, +256)
  const int row0 = 16 * (warp & 3) + (lane >> 2);  // accumulator rows row0 and row0 + 8
  const int c4 = lane & 3;
  const int32_t* idx_row = indices + t * K;
  const int limit = row_limit(topk_length, t, K);
  const int nblocks = (limit + C::kBN - 1) / C::kBN;
  const float scale2 = sm_scale * kLog2e;

  // Q [64 x D] by every thread
  copy_core_tile<C::kThreads, C::kHB, Latent<D>::kChunks>(
      threadIdx.x, smem_u32(q_s), q, [&](int r) { return q + (t * H + h0 + r) * D; });
  if (nblocks > 0)
    wgmma_gather_kv_block<C::kThreads, D>(threadIdx.x, smem_u32(kv_s0), valid_s, kv, idx_row, 0, limit, S);
  cp_async_commit();
  cp_async_wait<0>();
  wg::fence_proxy_async_smem();  // this thread's cp.async writes -> wgmma (async proxy) reads
  __syncthreads();

  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  float m_run[2] = {kMaxInit, kMaxInit}, l_run[2] = {0.f, 0.f};  // warpgroup 0 only

  for (int blk = 0; blk < nblocks; ++blk) {
    const int stage = blk & 1;
    // Warpgroup 1 (idle during S and the softmax) gathers the next block into the other buffer,
    // so the index loads and copy issue stay off warpgroup 0's path; it waits for the copies
    // after its P V, before the barrier that ends this block.
    if (wgi == 1 && blk + 1 < nblocks)
      wgmma_gather_kv_block<C::kThreads / 2, D>(threadIdx.x - C::kThreads / 2,
                                             smem_u32(kv_s0 + (stage ^ 1) * C::kKVBytes),
                                             valid_s + (stage ^ 1) * C::kBN, kv, idx_row, blk + 1,
                                             limit, S);
    const uint8_t* kv_s = kv_s0 + stage * C::kKVBytes;
    const float* valid = valid_s + stage * C::kBN;

    if (wgi == 0) {  // warpgroup-uniform
      float s[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      wg::wgmma_fence();
      wgmma_issue_scores<D>(s, q_s, kv_s);
      wg::wgmma_commit();
      wg::wgmma_wait_all();

      float alpha[2];
      wgmma_online_softmax(s, valid, scale2, c4, row0, m_run, l_run, alpha, smem_u32(p_s));
      if (c4 == 0) {
        alpha_s[row0] = alpha[0];
        alpha_s[row0 + 8] = alpha[1];
      }
      wg::fence_proxy_async_smem();  // P stores -> wgmma reads
    }
    __syncthreads();

    {  // O[:, 256 wgi, +256) = alpha O + P V
      const float a_lo = alpha_s[row0], a_hi = alpha_s[row0 + 8];
      wgmma_rescale_rows(o, a_lo, a_hi);
      wg::wgmma_fence();
      wgmma_issue_pv(o, p_s, kv_s, wgi);
      wg::wgmma_commit();
      wg::wgmma_wait_all();
    }
    if (wgi == 1) {
      cp_async_commit();
      cp_async_wait<0>();
      wg::fence_proxy_async_smem();  // the next block's tile -> wgmma reads
    }
    __syncthreads();  // next block's tile ready; this block's KV buffer / P free for reuse
  }

  if (wgi == 0) {
    wgmma_publish_row_stats(l_run, m_run, sum_s, max_s, row0, c4);
  }
  __syncthreads();
  wgmma_store_rows(o, sum_s, max_s, attn_sink, out, lse, t, H, h0, wgi, row0, c4);
#else
  __trap();  // sm_90a only; the launcher never selects this kernel elsewhere
#endif
}

}  // namespace dsa::sparse_mla
