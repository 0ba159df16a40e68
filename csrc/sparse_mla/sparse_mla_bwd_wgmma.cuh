// Sparse MLA backward on Hopper warpgroup MMA (wgmma, sm_90a only) for 64-head blocks (H = 64,
// 128) at d_qk 576 or 512: dQ and dKV, atomic (fp32, or fixed-point int64 for the deterministic
// mode) or into the chunked deterministic scratch (the same
// entries as sparse_mla_bwd_kernel, so the reductions of sparse_mla_kernels.cuh serve both).
// Selected by DSA_SPARSE_MLA_BWD (sparse_mla_launch.h).
//
// One CTA per (token, 64 heads), 256 threads = two warpgroups with the same program, 32 selected
// rows per step (two KV stages: 64 + 2 x 36 KB + Q 72 KB + dO 64 KB = 217 KB at D = 576, no room
// for 64-row stages). Per step, warpgroup w:
//   1. S and dP of its 16 tokens [16 w, +16): m64n16k16 wgmma, D/16 + 32 k steps (Q, dO and the
//      KV tile K-major); P = exp2(S scale2 - lse) and dS = P (dP - Delta) scale in fp32, exactly
//      as the mma.sync kernel, stored as bf16 [64 heads x 32 tokens] core-matrix tiles;
//   2. dQ[:, kDqCols w, +kDqCols) += dS K: m64n256k16 (+ m64n32k16 at D = 576) x 2 k steps,
//      dS K-major, the KV tile N-major (not copied); dQ stays in registers over the whole loop;
//   3. dKVᵀ [64 features x 32 tokens] tiles mt = w, w + 2, .. < D / 64: Qᵀ dS (+ dOᵀ P for
//      features < 512), 4 (+4) m64n32k16 with A MN-major (Q / dO read transposed through the
//      descriptor) and B N-major; then added to dkv_acc (fp32 atomics) or stored to the scratch.
//      Computing dKV transposed keeps M = 64 (wgmma's only M) with 32-token steps.
// One layout serves every role: a core matrix holds 8 rows x 8 contiguous columns, so a tile
// stored K-major for one product is the MN-major operand of the transposed one.
//
// MODEL (H100 SXM, 132 SMs at 1.83 GHz; not measured; T = 4096, S = 8192, H = 128, K = 2048,
// d_qk = 576, SPEC section 6; per CTA = per (token, 64 heads), 64 steps of 32 rows):
//   MMA per step: 64 x 32 x (576 + 512) (S, dP) + 64 x 576 x 32 (dQ) + 32 x (576 + 512) x 64
//     (dKV) = 2 x 64 x 32 x 2240 = 9.2 MFLOP; at 4096 dense bf16 FLOP/clk per SM: 2240 clocks.
//     The n16 S / dP wgmma (40% of the FLOPs) issue at a quarter of n64's work per instruction;
//     assume 70% tensor-core efficiency for them, 90% for the rest: ~2750 clocks per step.
//   Shared-memory operand reads per step: S/dP read Q + dO per warpgroup (2 x 137 KB) and the
//     KV tile once per warpgroup (2 x 36 KB); dQ reads dS (4 KB) + KV (36 KB) per warpgroup;
//     dKV reads Q + dO once over both warpgroups (137 KB) + dS / P per tile: ~520 KB at
//     128 B/clk = 4060 clocks. This, not the MMA, is the bound: the n16 S / dP tiles re-read
//     the 64-head Q and dO for every 16 tokens.
//   Atomics per step: 32 x 576 fp32 red.global per head block (the mma.sync kernel: the same
//     count as float2 red); L2 atomic throughput ~1 per clk per SM slice: ~600 clocks, hidden.
//   Gathers: 36 KB per step per CTA, overlapped (2 stages): 9 B/clk per SM, far under L2.
//   Estimate: ~4100 clocks per step + sync gaps (3 CTA barriers, 3 wgmma waits) ~10%: ~4500
//     clocks = 2.46 us per step per CTA; 8192 CTAs x 64 steps = 524,288 steps on 132 SMs
//     (1 CTA / SM): 9.8 ms. Work: 524,288 x 9.2 MFLOP = 4.8 TFLOP performed (494 TFLOP/s);
//     the SPEC's count, 2.5 x the forward's 2 T H K (d_qk + 512) = 2.5 x 2.34 = 5.8 TFLOP:
//     ~600 SPEC TFLOP/s upper estimate, vs the 350 target (~250 modelled for mma.sync).
//     Realistic (no producer / consumer overlap: the gather wait, three barriers and the dKV
//     atomics after each wait serialise): 350-450. Risks: red.global throughput on rows
//     shared by many tokens (hot rows serialise in L2), the n16 wgmma issue rate.
//   Deterministic mode: fixed point (the default; one pass where [S, D] int64 fits the budget,
//     else passes over row ranges) is this kernel with 64-bit integer reds in place of the fp32
//     ones (same count); the chunked mode
//     is this kernel with plain stores to the scratch, then the reduction (sparse_mla_launch.cu,
//     "time models of the deterministic designs").
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/mma_sm80.cuh"
#include "common/wgmma_sm90.cuh"
#include "sparse_mla/sparse_mla_kernels.cuh"
#include "sparse_mla/sparse_mla_wgmma.cuh"

namespace dsa::sparse_mla {

template <int D>
struct WgmmaBwdCfg {
  static constexpr int kHB = kWgmmaHeadBlock;
  static constexpr int kBN = 32;  // = BwdCfg's: the deterministic entries are numbered alike
  static constexpr int kThreads = 256;
  static constexpr int kDqCols = D / 2;               // dQ columns per warpgroup: 288 or 256
  static constexpr int kDqTail = kDqCols - 256;       // 32 or 0: the m64n32 part of 288
  static constexpr int kMTiles = D / 64;              // dKVᵀ 64-feature tiles: 9 or 8
  static constexpr int kQBytes = kHB * D * 2;
  static constexpr int kDOBytes = kHB * kDv * 2;
  static constexpr int kKVBytes = kBN * D * 2;
  static constexpr int kPBytes = kHB * kBN * 2;       // P and dS: [64 heads x 32 tokens]
  static constexpr int kQOff = 0;
  static constexpr int kDOOff = kQOff + kQBytes;
  static constexpr int kKVOff = kDOOff + kDOBytes;    // two stages
  static constexpr int kPOff = kKVOff + 2 * kKVBytes;
  static constexpr int kDSOff = kPOff + kPBytes;
  static constexpr int kLseOff = kDSOff + kPBytes;    // float [64] (log2 domain)
  static constexpr int kDeltaOff = kLseOff + kHB * 4; // float [64]
  static constexpr int kValidOff = kDeltaOff + kHB * 4;   // float [2][32]
  static constexpr int kRowsOff = kValidOff + 2 * kBN * 4; // int32 [2][32]
  static constexpr int kSmemBytes = kRowsOff + 2 * kBN * 4;  // 222,208 (576), 205,824 (512)
  static_assert(kSmemBytes <= kMaxSmemPerBlock, "wgmma backward tiles exceed shared memory");
  static_assert(kKVOff % 16 == 0 && kPOff % 16 == 0 && kDSOff % 16 == 0, "wgmma operands 16-aligned");
  // Core-matrix strides (bytes): between 8-row groups, and between 8-column groups of a tile of
  // 64 rows (Q, dO, P, dS) or 32 rows (KV).
  static constexpr uint32_t kRowGroup = 128, kCols64 = 64 * 16, kCols32 = 32 * 16;
};

template <int D>
__global__ void __launch_bounds__(WgmmaBwdCfg<D>::kThreads, 1)
    sparse_mla_bwd_wgmma_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                                const __nv_bfloat16* __restrict__ out,
                                const __nv_bfloat16* __restrict__ dout,
                                const int32_t* __restrict__ indices, const float* __restrict__ lse,
                                const float* __restrict__ attn_sink,
                                const int32_t* __restrict__ topk_length, __nv_bfloat16* __restrict__ dq,
                                DkvTarget dkv, int64_t t_begin, int64_t chunk_tokens, int64_t S,
                                int H, int K, float sm_scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgmmaBwdCfg<D>;
  DSA_DYNAMIC_SMEM(smem, 128);
  const uint8_t* q_s = smem + C::kQOff;
  const uint8_t* do_s = smem + C::kDOOff;
  const uint8_t* p_s = smem + C::kPOff;
  const uint8_t* ds_s = smem + C::kDSOff;
  float* sLse = reinterpret_cast<float*>(smem + C::kLseOff);
  float* sDelta = reinterpret_cast<float*>(smem + C::kDeltaOff);
  float* sValid = reinterpret_cast<float*>(smem + C::kValidOff);
  int32_t* sRows = reinterpret_cast<int32_t*>(smem + C::kRowsOff);

  const int nhb = H / C::kHB;
  const int64_t tl = blockIdx.x / nhb;  // token within this launch's chunk
  const int64_t t = t_begin + tl;
  const int hb = static_cast<int>(blockIdx.x % nhb);
  const int h0 = hb * C::kHB;
  const DkvAdder<D> adder(dkv, sm_scale);
  const int lane = threadIdx.x & 31;
  const int wgi = uniform_warpgroup_index();
  const int row0 = 16 * ((threadIdx.x >> 5) & 3) + (lane >> 2);  // accumulator rows row0, row0 + 8
  const int c4 = lane & 3;
  const int32_t* idx_row = indices + t * K;
  const int limit = row_limit(topk_length, t, K);
  const int nblocks = (limit + C::kBN - 1) / C::kBN;
  const float scale2 = sm_scale * kLog2e;

  copy_core_tile<C::kThreads, C::kHB, Latent<D>::kChunks>(
      threadIdx.x, smem_u32(q_s), q, [&](int r) { return q + (t * H + h0 + r) * D; });
  copy_core_tile<C::kThreads, C::kHB, kVChunks>(
      threadIdx.x, smem_u32(do_s), dout, [&](int r) { return dout + (t * H + h0 + r) * kDv; });
  if (nblocks > 0)
    wgmma_gather_kv_block<C::kThreads, D, C::kBN>(threadIdx.x, smem_u32(smem + C::kKVOff), sValid,
                                                  kv, idx_row, 0, limit, S, sRows);
  cp_async_commit();
  bwd_row_stats<C::kHB, C::kThreads / 32>(out, dout, lse, attn_sink, t, H, h0, C::kHB, sDelta, sLse);

  float dq_main[128], dq_tail[C::kDqTail > 0 ? C::kDqTail / 2 : 1];
#pragma unroll
  for (int i = 0; i < 128; ++i) dq_main[i] = 0.f;
#pragma unroll
  for (int i = 0; i < (C::kDqTail > 0 ? C::kDqTail / 2 : 1); ++i) dq_tail[i] = 0.f;

  // descriptors that do not depend on the step
  const uint64_t q_kmajor = wg::wgmma_desc(q_s, C::kCols64, C::kRowGroup);
  const uint64_t do_kmajor = wg::wgmma_desc(do_s, C::kCols64, C::kRowGroup);
  const uint64_t ds_kmajor = wg::wgmma_desc(ds_s, C::kCols64, C::kRowGroup);
  const uint64_t ds_nmajor = wg::wgmma_desc(ds_s, C::kRowGroup, C::kCols64);
  const uint64_t p_nmajor = wg::wgmma_desc(p_s, C::kRowGroup, C::kCols64);

  for (int blk = 0; blk < nblocks; ++blk) {
    const int st = blk & 1;
    if (blk + 1 < nblocks)
      wgmma_gather_kv_block<C::kThreads, D, C::kBN>(
          threadIdx.x, smem_u32(smem + C::kKVOff + (st ^ 1) * C::kKVBytes), sValid + (st ^ 1) * C::kBN,
          kv, idx_row, blk + 1, limit, S, sRows + (st ^ 1) * C::kBN);
    cp_async_commit();
    cp_async_wait<1>();
    wg::fence_proxy_async_smem();  // this thread's copies of block blk -> wgmma reads
    __syncthreads();
    const uint8_t* kv_s = smem + C::kKVOff + st * C::kKVBytes;
    const float* valid = sValid + st * C::kBN;
    const int32_t* rows = sRows + st * C::kBN;

    {  // 1. S, dP of tokens [16 wgi, +16); P and dS into shared memory
      float s[8], dp[8];
      const uint64_t k_kmajor = wg::wgmma_desc(kv_s + core_byte_offset<C::kBN>(16 * wgi, 0),
                                               C::kCols32, C::kRowGroup);
      wg::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks)
        wg::wgmma_bf16<16, 0, 0>(s, q_kmajor + ((ks * 2 * C::kCols64) >> 4),
                                 k_kmajor + ((ks * 2 * C::kCols32) >> 4), ks > 0);
#pragma unroll
      for (int ks = 0; ks < kDv / 16; ++ks)
        wg::wgmma_bf16<16, 0, 0>(dp, do_kmajor + ((ks * 2 * C::kCols64) >> 4),
                                 k_kmajor + ((ks * 2 * C::kCols32) >> 4), ks > 0);
      wg::wgmma_commit();
      wg::wgmma_wait_all();
      wg::fence_operands(s);
      wg::fence_operands(dp);
#pragma unroll
      for (int i = 0; i < 8; i += 2) {
        const int r = row0 + 8 * ((i >> 1) & 1);
        const int tok = 16 * wgi + 8 * (i >> 2) + 2 * c4;
        float p[2], ds[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          p[e] = valid[tok + e] != 0.f ? exp2f(s[i + e] * scale2 - sLse[r]) : 0.f;
          ds[e] = p[e] * (dp[i + e] - sDelta[r]) * sm_scale;
        }
        const uint32_t off = core_byte_offset<C::kHB>(r, tok);
        *reinterpret_cast<uint32_t*>(smem + C::kPOff + off) = pack_bf16x2(p[0], p[1]);
        *reinterpret_cast<uint32_t*>(smem + C::kDSOff + off) = pack_bf16x2(ds[0], ds[1]);
      }
      wg::fence_proxy_async_smem();  // P, dS stores -> wgmma reads of both warpgroups
    }
    __syncthreads();

    {  // 2. dQ[:, kDqCols wgi, +kDqCols) += dS K; in flight during 3
      const uint64_t kv_nmajor = wg::wgmma_desc(kv_s + core_byte_offset<C::kBN>(0, C::kDqCols * wgi),
                                                C::kRowGroup, C::kCols32);
      wg::wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < C::kBN / 16; ++ks) {
        const uint64_t a = ds_kmajor + ((ks * 2 * C::kCols64) >> 4);
        const uint64_t b = kv_nmajor + ((ks * 2 * C::kRowGroup) >> 4);
        wg::wgmma_bf16<256, 0, 1>(dq_main, a, b, 1);
        if constexpr (C::kDqTail > 0)
          wg::wgmma_bf16<C::kDqTail, 0, 1>(dq_tail, a, b + ((32 * C::kCols32) >> 4), 1);
      }
      wg::wgmma_commit();
    }

    // 3. dKVᵀ tiles: the value tiles (features < 512: Qᵀ dS + dOᵀ P) alternate between the
    // warpgroups; the rope tile of D = 576 (Qᵀ dS only) is warpgroup 0's. No branch inside a
    // tile's wgmma sequence: one there makes ptxas inject a warpgroup.arrive (C7519).
    const auto dkv_tile = [&](int mt, auto with_value) {
      float acc[16];
      const uint64_t qt = wg::wgmma_desc(q_s + core_byte_offset<C::kHB>(0, 64 * mt), C::kRowGroup, C::kCols64);
      wg::wgmma_fence();
#pragma unroll
      for (int kh = 0; kh < C::kHB / 16; ++kh)
        wg::wgmma_bf16<32, 1, 1>(acc, qt + ((kh * 2 * C::kRowGroup) >> 4),
                                 ds_nmajor + ((kh * 2 * C::kRowGroup) >> 4), kh > 0);
      if constexpr (decltype(with_value)::value) {
        const uint64_t dot = wg::wgmma_desc(do_s + core_byte_offset<C::kHB>(0, 64 * mt), C::kRowGroup,
                                            C::kCols64);
#pragma unroll
        for (int kh = 0; kh < C::kHB / 16; ++kh)
          wg::wgmma_bf16<32, 1, 1>(acc, dot + ((kh * 2 * C::kRowGroup) >> 4),
                                   p_nmajor + ((kh * 2 * C::kRowGroup) >> 4), 1);
      }
      wg::wgmma_commit();
      wg::wgmma_wait_all();
      wg::fence_operands(acc);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int tok = 8 * (i >> 2) + 2 * c4 + (i & 1);
        if (valid[tok] == 0.f) continue;
        const int f = 64 * mt + row0 + 8 * ((i >> 1) & 1);
        if (dkv.scratch) {
          const int64_t entry = (static_cast<int64_t>(hb) * chunk_tokens + tl) * K + blk * C::kBN + tok;
          dkv.scratch[entry * D + f] = acc[i];
        } else {
          adder.add(rows[tok], f, acc[i]);
        }
      }
    };
#pragma unroll 1
    for (int mt = wgi; mt < kDv / 64; mt += 2) dkv_tile(mt, std::true_type{});
    if constexpr (C::kMTiles > kDv / 64) {
      if (wgi == 0) dkv_tile(kDv / 64, std::false_type{});
    }
    wg::wgmma_wait_all();  // dQ's group (already retired by the tiles' waits; kept explicit)
    wg::fence_operands(dq_main);
    wg::fence_operands(dq_tail);
    __syncthreads();  // P, dS and this KV stage are rewritten by the next step
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 128; i += 2) {
    const int r = row0 + 8 * ((i >> 1) & 1);
    const int col = C::kDqCols * wgi + 8 * (i >> 2) + 2 * c4;
    *reinterpret_cast<uint32_t*>(dq + (t * H + h0 + r) * D + col) = pack_bf16x2(dq_main[i], dq_main[i + 1]);
  }
  if constexpr (C::kDqTail > 0) {
#pragma unroll
    for (int i = 0; i < C::kDqTail / 2; i += 2) {
      const int r = row0 + 8 * ((i >> 1) & 1);
      const int col = C::kDqCols * wgi + 256 + 8 * (i >> 2) + 2 * c4;
      *reinterpret_cast<uint32_t*>(dq + (t * H + h0 + r) * D + col) = pack_bf16x2(dq_tail[i], dq_tail[i + 1]);
    }
  }
#else
  __trap();  // sm_90a only; the launcher never selects this kernel elsewhere
#endif
}

}  // namespace dsa::sparse_mla
