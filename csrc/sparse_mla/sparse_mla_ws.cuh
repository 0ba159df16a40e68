// Warp-specialised sparse MLA forward on Hopper (wgmma, sm_90a only) for 64-head blocks
// (H = 64, 128) at d_qk 576 or 512. Selected by DSA_SPARSE_MLA_FWD=ws (sparse_mla_launch.cu).
//
// One CTA per (token, 64 heads), 256 threads = two warpgroups with distinct roles, synchronised
// by mbarriers only (no CTA barrier inside the block loop):
//   producer (warpgroup 1): gathers the indexed latent rows of 64-token block b + 1 into KV
//     stage (b + 1) & 1 (16-byte cp.async, zero-fill for skipped entries, a valid flag per row)
//     once consumer 0 released the stage (empty[], 128 arrivals), then runs the right half
//     O[:, 256:512) += P(b) V(b) once P(b) is ready (pready[], 128 arrivals), and publishes
//     block b + 1 (cp.async.wait_group, fence.proxy.async, full[], 128 arrivals) while its P V
//     runs: the gather of b + 1 overlaps the scores and softmax of b.
//   consumer 0 (warpgroup 0): S = Q Kᵀ (m64n64k16 x D/16), the online softmax, P (bf16) into
//     the stage's P tile with the rows' rescale factors, and the left half O[:, 0:256) += P V.
//     Software-pipelined as in FA3: in iteration b it issues S(b + 1) and then P(b) V(b) back
//     to back (one wgmma.fence, two commit groups), waits for S(b + 1) only
//     (wgmma.wait_group 1) and runs the softmax of block b + 1 while P(b) V(b) is still on the
//     tensor cores, then waits for it and releases the stage.
// P lives in the KV stage's rope columns 512..575 when D = 576 (S has read them by then; the
// producer refills the stage only after consumer 0 released it), in two separate 8 KB tiles
// when D = 512: 222,768 / 213,552 bytes of shared memory.
// Why not a separate producer warp / warpgroup (FlashMLA: 384 threads, setmaxnreg 216/72): the
// CPU emulator does not model setmaxnreg (csrc/emu/ptx.cpp has none), and without it a
// 288-thread CTA (2 warpgroups + 1 warp) is capped at 168 registers per thread like a
// 384-thread one (9 warps on 4 SM sub-partitions: 3 warps share one sub-partition's 16K
// registers), below O's 128 + S's 32 accumulators plus the softmax (ptxas spilled 576 bytes).
// So the warpgroup with the lighter MMA load (the right P V: 4 of the block's 44 wgmma per
// warpgroup pair) is the producer, and both keep up to 255 registers.
//
// MODEL (H100 SXM, 132 SMs at 1.83 GHz boost; not measured; T = 4096, K = 2048, H = 128, S = 32K,
// d_qk = 576; per CTA = per (token, 64 heads), 32 blocks of 64 tokens):
//   MMA: per block 36 m64n64k16 (S) + 2 x 4 m64n256k16 (P V) = 64 x 64 x (576 + 512) x 2 =
//     8.9 MFLOP; at the dense bf16 rate of 1024 FLOP/clk per SM sub-partition (4096 per SM)
//     2176 clocks per block. SPEC FLOPs 2 T H K (d_qk + d_v) = 2.34 TFLOP per call (8192 CTAs x
//     32 blocks x 8.9 MFLOP): 2.36 ms at the 989 TFLOP/s peak, 3.34 ms at the 700 target.
//     (Corrected 2026-12-03: this model said 4.67 TFLOP and derived its TFLOP/s from that.)
//   Shared-memory operand traffic (wgmma reads its SS operands from shared memory through the
//     async proxy; the emulator counts wavefronts of the generic accesses only): per block
//     S reads Q (73.7 KB) + K (73.7 KB), P V reads P twice (16 KB) + V once per warpgroup half
//     (64 KB): 227 KB, at 128 B/clk = 1780 clocks < 2176: under the MMA time, not the bound.
//     Generic accesses per block (emulator counters of the wgmma kernel at this tile: 64 x 64
//     P stores of 4 bytes by 128 threads = 32 wavefronts, 64 rescale-factor stores/loads, the
//     valid flags): < 100 wavefronts, negligible.
//   Gathers: 73.7 KB per block per CTA; both head blocks of a token gather the same rows, so
//     L2 -> SM traffic is 2 x 4096 x 2048 x 1152 B = 19.3 GB per call (HBM: each of the S = 32K
//     rows, 37.7 MB, fits the 50 MB L2 and is read from HBM about once). At the 2.36 ms MMA time
//     that is 8.2 TB/s, beyond L2. Anchor: FlashMLA's sparse prefill gathers the same 19.3 GB
//     (64 heads a CTA too) at 640 TFLOP/s on H800, i.e. L2 -> SM sustains >= 5.3 TB/s for these
//     1152-byte rows. Bound: L2, 3.4-3.9 ms (5.0-5.7 TB/s) = 600-690 TFLOP/s.
//   Softmax: 64 x 64 exp2 per block on 128 threads = 32 MUFU ops per thread + ~150 FP32/ALU
//     instructions: ~400 issue clocks per block, hidden behind P(b) V(b) and S(b + 1) by the
//     pipelining above (the mma.sync and plain wgmma kernels serialise it: 15-20% of a block).
//   Estimate, unpaired (kPair = false; H = 64, or DSA_SPARSE_MLA_FWD=ws): the L2 bound plus the
//     per-CTA prologue (Q 73.7 KB load, first gather latency ~2 us without overlap across CTAs
//     at 1 CTA / SM: 2 us x 8192 / 132 = 0.12 ms) and ~10% issue gaps / mbarrier round trips:
//     ~3.9-4.4 ms = 530-600 TFLOP/s, 15-25% short of the SPEC's 700 (about FlashMLA's 640).
//   Paired (kPair, the default at H = 128): each CTA gathers 32 of a block's 64 rows and
//     forwards them to its peer by st.async, so L2 -> SM is 9.65 GB (1.7-1.9 ms at 5-5.7 TB/s)
//     and as much crosses the SM-to-SM network: 9.65 GB at ~3.3 TB/s aggregate (ASSUMPTION, Luo
//     et al. arXiv 2402.13499 as recalled; the decode crossover relies on the same) = 2.9 ms.
//     Shared memory per block grows to 227 KB of operand reads + 36.9 KB of cp.async writes +
//     36.9 KB read back for forwarding + 36.9 KB arriving from the peer = 338 KB = 2640 clocks
//     at 128 B/clk (over the 2176 MMA clocks): 2.87 ms. Co-bound DSMEM / shared memory ~2.9 ms
//     + 0.12 ms prologue + ~10%: ~3.3-3.5 ms = 670-710 TFLOP/s, at the SPEC's 700 only if the
//     DSMEM figure holds (2x faster: shared-memory bound, ~720; 2x slower: 5.8 ms, worse than
//     unpaired; the first GPU run times ws-pair beside ws). Producer issue per block per
//     thread: 18 cp.async + 18 ld.shared + 18 st.async (2304 chunks / 128 threads at 576).
//     Not built: TMA-multicast gathers (Hopper's bulk copies cannot write the swizzled / core-
//     matrix layouts row by row), setmaxnreg (the emulator does not model it).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cluster_sync.cuh"
#include "common/mma_sm80.cuh"
#include "common/wgmma_sm90.cuh"
#include "sparse_mla/sparse_mla_kernels.cuh"
#include "sparse_mla/sparse_mla_wgmma.cuh"

#if defined(DSA_EMULATOR)
#include "emu/ptx.h"
#endif

namespace dsa::sparse_mla {

namespace ws {
// CTA-scope mbarrier arrive / wait (PTX 9.7.13.15.13, .15.16) and wgmma.wait_group 1
// (PTX 9.7.15.8), the pieces common/cluster_sync.cuh and common/wgmma_sm90.cuh do not have.
__device__ __forceinline__ void arrive(uint32_t bar) {
#if defined(DSA_EMULATOR)
  (void)::emu::ptx::mbarrier_arrive(bar);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
#endif
}
__device__ __forceinline__ void wait(uint32_t bar, uint32_t parity) {
#if defined(DSA_EMULATOR)
  while (!::emu::ptx::mbarrier_try_wait_parity(bar, parity)) {
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
#endif
}
__device__ __forceinline__ void wgmma_wait_1() {
#if defined(DSA_EMULATOR)
  ::emu::ptx::wgmma_wait(1);
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
#endif
}
// bar.sync id, count (PTX 9.7.13.4): a named barrier over `count` threads (whole warps).
__device__ __forceinline__ void named_sync(int id, int count) {
#if defined(DSA_EMULATOR)
  ::emu::bar_sync(id, count);
#else
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
#endif
}
}  // namespace ws

template <int D>
struct WsFwdCfg {
  static constexpr int kHB = kWgmmaHeadBlock;
  static constexpr int kBN = 64;
  static constexpr int kThreads = 256;  // two warpgroups
  static constexpr int kQBytes = kHB * D * 2;
  static constexpr int kKVBytes = kBN * D * 2;
  static constexpr int kPBytes = kHB * kBN * 2;
  static constexpr bool kPInRope = D == 576;  // P over the stage's rope columns 512..575
  static constexpr int kQOff = 0;
  static constexpr int kKVOff = kQOff + kQBytes;  // two stages
  static constexpr int kPOff = kKVOff + 2 * kKVBytes;  // two P tiles (D = 512 only)
  static constexpr int kAlphaOff = kPOff + (kPInRope ? 0 : 2 * kPBytes);  // float [2][64]
  static constexpr int kSumOff = kAlphaOff + 2 * kHB * 4;   // float [64]
  static constexpr int kMaxOff = kSumOff + kHB * 4;         // float [64]
  static constexpr int kValidOff = kMaxOff + kHB * 4;       // float [2][64]
  // uint64 full[2], empty[2], pready[2], peer_free[2] (kPair: the peer may write our stage)
  static constexpr int kBarOff = kValidOff + 2 * kBN * 4;
  static constexpr int kSmemBytes = kBarOff + 8 * 8;        // 222,784 (576), 213,568 (512)
  // kPair: each CTA of the pair gathers rows [32 rank, +32) of a block and forwards them
  static constexpr int kHalfRows = kBN / 2;
  static constexpr int kHalfChunks = kHalfRows * Latent<D>::kChunks;   // 16-byte chunks: 2304 / 2048
  static constexpr uint32_t kHalfBytes = kHalfChunks * 16;
  static_assert(kHalfChunks % 128 == 0, "the producer warpgroup splits a half evenly");
  static_assert(kSmemBytes <= kMaxSmemPerBlock, "ws forward tiles exceed shared memory");
  static_assert(kBarOff % 8 == 0, "mbarriers 8-aligned");
  // P tile of stage s, byte offset in shared memory (16-aligned, a 64 x 64 core-matrix tile)
  static constexpr int p_off(int stage) {
    return kPInRope ? kKVOff + stage * kKVBytes + static_cast<int>(core_byte_offset<kBN>(0, kDv))
                    : kPOff + stage * kPBytes;
  }
};

// Chunk c (0 <= c < kHalfChunks) of CTA `rank`'s half of a block: its row and 16-byte column
// chunk, in copy_core_tile's order (thread pairs take 32 contiguous bytes of one row).
template <int D>
struct HalfChunk {
  int row, chunk;
  __device__ __forceinline__ HalfChunk(int rank, int c)
      : row(WsFwdCfg<D>::kHalfRows * rank + ((c >> 1) & (WsFwdCfg<D>::kHalfRows - 1))),
        chunk(2 * (c / (2 * WsFwdCfg<D>::kHalfRows)) + (c & 1)) {}
  __device__ __forceinline__ uint32_t offset() const { return core_byte_offset<64>(row, chunk * 8); }
};

// kPair (H a multiple of 128, launched as 2-CTA clusters over the two head blocks of a token):
// both CTAs need every gathered row, so each gathers half of each block by cp.async and
// forwards it by st.async into the peer's stage (completing on the peer's full barrier, which
// expects those bytes), halving the L2 -> SM gather traffic of the unpaired kernel (MODEL
// above). A stage is offered to the peer (peer_free) once this CTA's own readers released it.
template <int D, bool kPair>
__global__ void __launch_bounds__(WsFwdCfg<D>::kThreads, 1)
    sparse_mla_fwd_ws_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                             const int32_t* __restrict__ indices, const float* __restrict__ attn_sink,
                             const int32_t* __restrict__ topk_length, __nv_bfloat16* __restrict__ out,
                             float* __restrict__ lse, int64_t S, int H, int K, float sm_scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WsFwdCfg<D>;
  DSA_DYNAMIC_SMEM(smem, 128);
  uint8_t* q_s = smem + C::kQOff;
  uint8_t* kv_s0 = smem + C::kKVOff;
  float* alpha_s = reinterpret_cast<float*>(smem + C::kAlphaOff);
  float* sum_s = reinterpret_cast<float*>(smem + C::kSumOff);
  float* max_s = reinterpret_cast<float*>(smem + C::kMaxOff);
  float* valid_s = reinterpret_cast<float*>(smem + C::kValidOff);
  const uint32_t bars = csync::smem_addr(smem + C::kBarOff);
  const auto full = [&](int st) { return bars + 8 * st; };         // producer -> consumer 0
  const auto empty = [&](int st) { return bars + 16 + 8 * st; };   // consumer 0 -> producer
  const auto pready = [&](int st) { return bars + 32 + 8 * st; };  // consumer 0 -> producer's P V
  const auto peer_free = [&](int st) { return bars + 48 + 8 * st; };  // the peer -> our producer
  const int rank = static_cast<int>(blockIdx.x & 1);  // kPair: cluster (2, 1, 1), H / 64 even

  const int nhb = H / C::kHB;
  const int64_t t = blockIdx.x / nhb;
  const int h0 = static_cast<int>(blockIdx.x % nhb) * C::kHB;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // 0: scores / softmax / left P V; 1: gathers / right P V. Broadcast from lane 0 so that the
  // compiler sees a warp-uniform value: a role branch on threadIdx.x itself is a divergent path
  // to ptxas, which then serialises the wgmma inside it (C7520, "WG.AR in divergent path").
  const int wgi = uniform_warpgroup_index();
  const int row0 = 16 * (warp & 3) + (lane >> 2);  // accumulator rows row0 and row0 + 8
  const int c4 = lane & 3;
  const int32_t* idx_row = indices + t * K;
  const int limit = row_limit(topk_length, t, K);
  const int nblocks = (limit + C::kBN - 1) / C::kBN;

  if (threadIdx.x == 0) {
    for (int st = 0; st < 2; ++st) {
      csync::mbar_init(full(st), kPair ? 129 : 128);  // kPair: + the expect_tx of the peer's half
      csync::mbar_init(empty(st), 128);
      csync::mbar_init(pready(st), 128);
      if constexpr (kPair) csync::mbar_init(peer_free(st), 1);
    }
    if constexpr (kPair) csync::fence_mbar_init();
  }
  // Q [64 x D] by every thread
  copy_core_tile<C::kThreads, C::kHB, Latent<D>::kChunks>(
      threadIdx.x, smem_u32(q_s), q, [&](int r) { return q + (t * H + h0 + r) * D; });
  cp_async_commit();
  cp_async_wait<0>();
  wg::fence_proxy_async_smem();  // Q -> wgmma reads
  if constexpr (kPair) {         // ... and the inits cluster-wide before any remote use
    csync::cluster_arrive_release();
    csync::cluster_wait();
  } else {
    __syncthreads();             // Q and the mbarrier inits visible to all
  }
  // a stage's block has landed: this CTA's copies and (kPair) the peer's forwarded half
  const auto wait_full = [&](int st, uint32_t parity) {
    if constexpr (kPair) {
      csync::wait_cluster(full(st), parity);
      wg::fence_proxy_async_smem();  // the peer's st.async bytes -> this thread's wgmma reads
    } else {
      ws::wait(full(st), parity);
    }
  };

  float o[128];  // O[:, 256 wgi, +256)
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  if (wgi == 0) {  // ---- consumer: S, softmax, left P V
    const float scale2 = sm_scale * kLog2e;
    float m_run[2] = {kMaxInit, kMaxInit}, l_run[2] = {0.f, 0.f};
    float alpha[2] = {1.f, 1.f}, alpha_next[2] = {1.f, 1.f};
    float s[32];
    const auto softmax = [&](int blk, float (&a)[2]) {
      const int st = blk & 1;
      // wgmma.wait_group covers this warp's part of a warpgroup MMA only: before P overwrites
      // the rope columns S just read (D = 576) or the P tile the previous P V of this stage
      // read (D = 512), the warpgroup agrees that every warp's part is done.
      ws::named_sync(1, 128);
      wgmma_online_softmax(s, valid_s + st * C::kBN, scale2, c4, row0, m_run, l_run, a,
                           smem_u32(smem + C::p_off(st)));
      if (c4 == 0) {
        alpha_s[st * C::kHB + row0] = a[0];
        alpha_s[st * C::kHB + row0 + 8] = a[1];
      }
      wg::fence_proxy_async_smem();  // P stores -> wgmma reads (both warpgroups)
      ws::arrive(pready(st));        // the producer's right P V
      ws::named_sync(1, 128);        // this warpgroup's own P V reads every warp's P rows
    };
    if (nblocks > 0) {
      wait_full(0, 0);
      wg::wgmma_fence();
      wgmma_issue_scores<D>(s, q_s, kv_s0);
      wg::wgmma_commit();
      wg::wgmma_wait_all();
      wg::fence_operands(s);
      softmax(0, alpha);
    }
    // Blocks with a successor: S(b + 1) and P(b) V(b) issued back to back, the softmax of
    // b + 1 while P(b) V(b) runs. (Straight-line wgmma issue: a wgmma under a data-dependent
    // branch makes ptxas serialise them, warning C7520.)
    for (int blk = 0; blk + 1 < nblocks; ++blk) {
      const int st = blk & 1;
      wait_full(st ^ 1, ((blk + 1) >> 1) & 1);
      wgmma_rescale_rows(o, alpha[0], alpha[1]);
      wg::wgmma_fence();
      wgmma_issue_scores<D>(s, q_s, kv_s0 + (st ^ 1) * C::kKVBytes);
      wg::wgmma_commit();
      wgmma_issue_pv(o, smem + C::p_off(st), kv_s0 + st * C::kKVBytes, 0);
      wg::wgmma_commit();
      ws::wgmma_wait_1();
      wg::fence_operands(s);
      softmax(blk + 1, alpha_next);
      wg::wgmma_wait_all();
      wg::fence_operands(o);
      ws::arrive(empty(st));
      alpha[0] = alpha_next[0];
      alpha[1] = alpha_next[1];
    }
    if (nblocks > 0) {  // the last block: P V only
      const int st = (nblocks - 1) & 1;
      wgmma_rescale_rows(o, alpha[0], alpha[1]);
      wg::wgmma_fence();
      wgmma_issue_pv(o, smem + C::p_off(st), kv_s0 + st * C::kKVBytes, 0);
      wg::wgmma_commit();
      wg::wgmma_wait_all();
      wg::fence_operands(o);
    }
    wgmma_publish_row_stats(l_run, m_run, sum_s, max_s, row0, c4);
  } else {  // ---- producer: gathers block b + 1 while block b is scored, then right P V of b
    const int ptid = threadIdx.x - 128;
    const uint32_t peer_kv = kPair ? csync::mapa(smem_u32(kv_s0), rank ^ 1) : 0;
    const auto gather = [&](int blk) {
      const uint32_t tile = smem_u32(kv_s0 + (blk & 1) * C::kKVBytes);
      if constexpr (kPair) {  // every row's flag, this CTA's half of the rows
        for (int r = ptid; r < C::kBN; r += 128)
          valid_s[(blk & 1) * C::kBN + r] = entry_row(idx_row, blk * C::kBN + r, limit, S) >= 0 ? 1.f : 0.f;
        for (int c = ptid; c < C::kHalfChunks; c += 128) {
          const HalfChunk<D> h(rank, c);
          const int64_t row = entry_row(idx_row, blk * C::kBN + h.row, limit, S);
          cp_async_16_zfill(tile + h.offset(), row >= 0 ? kv + row * D + h.chunk * 8 : kv, row >= 0);
        }
      } else {
        wgmma_gather_kv_block<128, D>(ptid, tile, valid_s + (blk & 1) * C::kBN, kv, idx_row, blk, limit, S);
      }
      cp_async_commit();
    };
    const auto publish = [&](int blk) {  // this thread's copies of blk have landed
      cp_async_wait<0>();
      if constexpr (kPair) {  // forward them once the peer offered its stage
        const int st = blk & 1;
        csync::wait_cluster(peer_free(st), (blk >> 1) & 1);
        const uint32_t peer_bar = csync::mapa(full(st), rank ^ 1);
        for (int c = ptid; c < C::kHalfChunks; c += 128) {
          const uint32_t off = st * C::kKVBytes + HalfChunk<D>(rank, c).offset();
          csync::st_async_v4(peer_kv + off, *reinterpret_cast<const uint4*>(kv_s0 + off), peer_bar);
        }
      }
      wg::fence_proxy_async_smem();
      ws::arrive(full(blk & 1));
    };
    // kPair: stage st is free here (its readers are done): expect the peer's half of the next
    // block in it, and let the peer send it
    const auto offer = [&](int st) {
      if constexpr (kPair) {
        if (ptid == 0) {
          csync::arrive_expect_tx(full(st), C::kHalfBytes);
          csync::arrive_remote(csync::mapa(peer_free(st), rank ^ 1));
        }
      }
    };
    if (nblocks > 0) {
      offer(0);
      gather(0);
      publish(0);
    }
    for (int blk = 0; blk < nblocks; ++blk) {
      const int st = blk & 1;
      const bool next = blk + 1 < nblocks;
      if (next) {
        // stage st ^ 1 held block b - 1: consumer 0 released it, and every warp of this
        // warpgroup has finished its part of P(b - 1) V(b - 1) (named barrier 2)
        if (blk >= 1) ws::wait(empty(st ^ 1), ((blk - 1) >> 1) & 1);
        ws::named_sync(2, 128);
        offer(st ^ 1);
        gather(blk + 1);
      }
      ws::wait(pready(st), (blk >> 1) & 1);
      if constexpr (kPair) wg::fence_proxy_async_smem();  // the peer's half -> this P V
      const float a_lo = alpha_s[st * C::kHB + row0], a_hi = alpha_s[st * C::kHB + row0 + 8];
      wgmma_rescale_rows(o, a_lo, a_hi);
      wg::wgmma_fence();
      wgmma_issue_pv(o, smem + C::p_off(st), kv_s0 + st * C::kKVBytes, 1);
      wg::wgmma_commit();
      if (next) publish(blk + 1);
      wg::wgmma_wait_all();
      wg::fence_operands(o);
    }
  }
  __syncthreads();  // row sums and maxima (consumer 0) -> both warpgroups
  wgmma_store_rows(o, sum_s, max_s, attn_sink, out, lse, t, H, h0, wgi, row0, c4);
  if constexpr (kPair) {  // no CTA leaves while its peer may still write to it
    csync::cluster_arrive_release();
    csync::cluster_wait();
  }
#else
  __trap();  // sm_90a only; the launcher never selects this kernel elsewhere
#endif
}

}  // namespace dsa::sparse_mla
