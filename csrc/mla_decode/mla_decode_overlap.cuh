// sparse_mla_decode, FP8 cache (656-byte records), d_qk 576, 64 or 128 heads, sm_90a: the
// "overlap" kernel. Dequantisation of tile t+1 runs while the tensor cores work on tile t.
// Torch-free (raw pointers and sizes; the launcher is mla_decode_launch.cu).
//
// Schedule. One CTA of two warpgroups per (query row, 64-head block, split of the K entries),
// as the wgmma kernel of mla_decode_kernels.cuh. Per 64-entry tile t (KV ring slot t % 2):
//   WG0 issues S = Q K_t^T (36 wgmma m64n64k16, asynchronous)
//   all 256 threads dequantise the first half of their share of tile t+1 into slot (t+1) % 2
//   WG0 waits for S, runs the online softmax in registers, writes P (bf16) and the row rescale
//   both WGs rescale O and issue O += P V_t (m64n256k16 each, 256 output columns per WG)
//   all threads dequantise the second half of their share of tile t+1, then wait for P V.
// wgmma is asynchronous, so the same warps issue the conversion while their MMAs run; no
// warp specialisation is needed, which keeps all 256 threads on the dequantisation (it is the
// larger of the two costs) and avoids a third warpgroup's registers.
//
// Crossover (H = 128): the two head blocks of a row are a 2-CTA cluster and need the same
// dequantised tiles. Each CTA dequantises half of the tile's 64 entries and writes every bf16
// row twice: st.shared into its own ring slot and st.async into the peer's, completing
// transaction bytes on the peer's full[slot] mbarrier (36864 bytes per tile and CTA, a fixed
// count: invalid entries are written as zero rows). A slot is refilled only after the peer
// said it finished reading it: it arms full[slot] for the next tile (arrive.expect_tx) and then
// arrives remotely on this CTA's empty[slot]. H = 64 runs the same code with a cluster of one:
// it dequantises all 64 entries itself (no mbarriers, no DSMEM).
// Why not warp-specialised producers feeding a ring: the ring slots (2 x 72 KB) and Q (72 KB)
// already use 221 of the 227 KB, so there is no room for a raw FP8 staging area, and
// producers + two 128-accumulator consumer warpgroups would need setmaxnreg to fit.
//
// Semantics as mla_decode_kernels.cuh: entries < 0, >= num_slots or past topk_length are never
// read (zero rows, scores -inf); a row with no valid entry gives lse -inf and out 0; NaN
// propagates; the sink is applied here unsplit and by the combine kernel when split; the work
// split is the shape-only SplitPlan (CUDA-graph safe).
//
// MODEL (not a measurement; H100/H800 SXM, 132 SMs, 1.83 GHz, bf16 dense wgmma 2048 MAC/clk/SM,
// shared memory 128 B/clk/SM, HBM 3.35 TB/s). Shape B = 128, s_q = 2, H = 128, K = 2048: 256
// rows x 2 head blocks = 512 CTAs = 256 clusters (no split: 512 > 66), 3.88 waves of 132.
//   FLOP = 2 * B * s_q * H * K * (576 + 512) = 146.0 GFLOP; 989 TFLOP/s peak -> 148 us.
//   Bytes per token: 656 (record) + 4 (index), read once per cluster (each CTA its half):
//   256 rows x 2048 x 660 = 346 MB -> 103 us at 3.35 TB/s: compute-bound, not memory-bound.
//   MMA per 64-head CTA and 64-token tile: S 64x64x576 (1152 clk), P V 64x512x64 (1024 clk):
//   2176 clk = 34 clk/token. S (n = 64, both operands from shared memory) reads 128 B/clk:
//   the whole shared-memory port.
//   Dequant per token (SASS of this kernel: 8 F2FP.F16.E4M3.UNPACK, 16 HADD2.F32, 16 FMUL,
//   8 F2FP.BF16.F32.PACK per 16 values): 512 conversions at an assumed 16/clk = 32 clk, 1024 FP32-pipe
//   ops at 128/clk = 8 clk, the L2 loads and 72 16-byte stores: ~45 clk/token for the whole SM
//   (FlashMLA's deep dive measures ~50). Crossover: 32 tokens per CTA and tile = ~1440 clk,
//   split 720 / 720 over the S and P V windows.
//   Shared-memory port per tile: S 147 KB of operand reads + this CTA's and the peer's
//   conversion stores for the first half (36.9 KB) -> 1440 clk for the S window (not 1152);
//   P V 80 B/clk + the second half's stores -> fits its 1024 clk.
//   Not overlapped: the softmax on WG0 between S and P V (~200 clk), three barriers and the
//   mbarrier wait (~100 clk), the first tile of each CTA, the epilogue.
//   H = 128: ~1440 + 200 + 1024 + 100 = 2764 clk per tile vs 2176 of MMA -> 79% of peak x
//   97% wave efficiency = ~750 TFLOP/s: the SPEC target (500) is reached in the model.
//   H = 64 (one CTA per row, no crossover): 64 tokens x 45 = 2880 clk of dequant per tile,
//   more than the MMA: ~2880 + 300 = 3180 clk -> ~66% = ~650 TFLOP/s at B = 128, s_q = 2.
//   Honest shortfall: FlashMLA measured 410 TFLOP/s with this kind of schedule on H800, so
//   costs the model leaves out (gather latency with one CTA per SM and only an L2 prefetch one
//   tile ahead, wgmma issue stalls at 255 registers, bank conflicts between the conversion
//   stores and the wgmma operand reads, the acquire.cluster waits' L1 invalidation) are worth
//   up to ~1.8x; the target is unverified until a GPU run (dsa-bench decode times this kernel
//   beside mma.sync). Next steps the model points to: e4m3 -> f32 by integer ops (no
//   conversion-pipe instructions: ~2x on the dequant), and the softmax of tile t overlapped
//   with S of tile t+1 (a second S accumulator: registers permitting).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cluster_sync.cuh"
#include "common/cuda_utils.cuh"
#include "common/mma_sm80.cuh"
#include "common/wgmma_sm90.cuh"
#include "mla_decode/mla_decode_kernels.cuh"
#include "mla_decode/mla_decode_launch.h"
#include "mla_decode/mla_decode_layout.h"

namespace dsa::mla_decode {
namespace overlap {

constexpr int kHB = 64;                 // heads per CTA
constexpr int kTileTokens = kTokensPerTile;   // 64 entries per step (layout.h's kTile is the 128-value scale tile)
constexpr uint32_t kRowBytes = kDQK * 2;

// Shared memory (byte offsets, all 16-aligned): Q, the two-slot bf16 KV ring, P, per-row
// rescale and 1/denominator, per-slot validity, mbarriers full[2] and empty[2].
struct Smem {
  static constexpr size_t kQ = 0;
  static constexpr size_t kKV = kQ + size_t(kHB) * kRowBytes;
  static constexpr size_t kSlotBytes = size_t(kTileTokens) * kRowBytes;
  static constexpr size_t kP = kKV + 2 * kSlotBytes;
  static constexpr size_t kAlpha = kP + size_t(kHB) * kTileTokens * 2;
  static constexpr size_t kFinal = kAlpha + kHB * 4;
  static constexpr size_t kValid = kFinal + kHB * 4;
  static constexpr size_t kBars = kValid + 2 * kTileTokens * 4;
  static constexpr size_t kBytes = kBars + 4 * 8;
};
static_assert(Smem::kBytes <= 227 * 1024, "beyond an H100 SM's 227 KB of dynamic shared memory");

// L2 prefetch of a gather the next step will load (no register, no completion to wait for).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#if !defined(DSA_EMULATOR) && defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

// 16 e4m3 values times their tile scale -> 16 bf16 (two 16-byte words), as the mma.sync and
// wgmma kernels round them: e4m3 -> f16 exact, f16 -> f32, times the scale, RN to bf16.
__device__ __forceinline__ void dequant16(const uint4 v, float scale, uint4& lo, uint4& hi) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  uint32_t packed[8];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const __half2_raw a = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[w] & 0xFFFF), __NV_E4M3);
    const __half2_raw b = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(words[w] >> 16), __NV_E4M3);
    const float2 fa = __half22float2(*reinterpret_cast<const __half2*>(&a));
    const float2 fb = __half22float2(*reinterpret_cast<const __half2*>(&b));
    packed[2 * w] = pack_bf16x2(fa.x * scale, fa.y * scale);
    packed[2 * w + 1] = pack_bf16x2(fb.x * scale, fb.y * scale);
  }
  lo = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  hi = make_uint4(packed[4], packed[5], packed[6], packed[7]);
}

// Fence making this thread's generic-proxy shared stores (own CTA: st.shared; peer: st.async)
// visible to later wgmma (async proxy) reads.
__device__ __forceinline__ void fence_async_writes() { fence_proxy_async_smem(); }

// The dequantisation work of one thread for one tile. kPair: the CTA converts the 32 entries
// rank*32 .. rank*32+31 (8 threads per entry), otherwise all 64 (4 threads per entry).
// Consecutive threads take consecutive entries so their 16-byte shared stores spread over banks.
template <bool kPair>
struct Share {
  static constexpr int kEntries = kPair ? kTileTokens / 2 : kTileTokens;
  static constexpr int kParts = 256 / kEntries;          // threads per entry: 8 or 4
  static constexpr int kNope = 32 / kParts;              // 16-byte FP8 chunks per thread: 4 or 8
  static constexpr int kRope = 8 / kParts;               // 16-byte bf16 rope chunks: 1 or 2
  static_assert(kNope % 2 == 0 && (kNope * 16) <= kDNope / kNumTiles, "one scale per thread");
};

template <bool kPair>
struct Producer {
  using S = Share<kPair>;
  const DecodeParams& p;
  const int32_t* row_indices;
  int len;
  uint8_t* smem;
  uint32_t peer_kv;      // shared::cluster address of the peer's KV ring (kPair)
  uint32_t peer_full;    // ... and of its full[0] mbarrier
  uint32_t own_empty;    // shared::cta address of this CTA's empty[0]
  int rank;

  __device__ __forceinline__ int entry() const { return (kPair ? rank * S::kEntries : 0) + threadIdx.x % S::kEntries; }
  __device__ __forceinline__ int part() const { return threadIdx.x / S::kEntries; }

  // Half `half` (0, 1) of this thread's share of tile `tile` (the m-th of the split) into ring
  // slot m % 2. Half 0 also records the slot's validity flags, waits for the peer's release of
  // the slot (kPair) and prefetches the next tile's records to L2.
  __device__ __forceinline__ void run(int tile, int m, int half, int tile_end) const {
    const int slot_i = m & 1;
    const int e = entry(), pt = part();
    const int64_t slot = entry_slot(row_indices, tile * kTileTokens + e, len, p.num_slots);
    if (half == 0) {
      if (threadIdx.x < kTileTokens)
        reinterpret_cast<int*>(smem + Smem::kValid)[slot_i * kTileTokens + threadIdx.x] =
            entry_slot(row_indices, tile * kTileTokens + threadIdx.x, len, p.num_slots) >= 0;
      if (tile + 1 < tile_end) {
        const int64_t next = entry_slot(row_indices, (tile + 1) * kTileTokens + e, len, p.num_slots);
        if (next >= 0) {
          const uint8_t* rec = static_cast<const uint8_t*>(p.kv_cache) + next * kFp8RecordBytes;
          for (int k = pt; k < 7; k += S::kParts) prefetch_l2(rec + (k < 6 ? 128 * k : kFp8RecordBytes - 1));
        }
      }
      if constexpr (kPair) csync::wait_cluster(own_empty + 8 * slot_i, (m >> 1) & 1);
    }
    const bool valid = slot >= 0;
    const uint8_t* rec = static_cast<const uint8_t*>(p.kv_cache) + (valid ? slot : 0) * kFp8RecordBytes;
    auto* kv = reinterpret_cast<__nv_bfloat16*>(smem + Smem::kKV + slot_i * Smem::kSlotBytes);
    const uint32_t kv_off0 = static_cast<uint32_t>(slot_i * Smem::kSlotBytes);
    const uint32_t bar = peer_full + 8 * slot_i;
    auto store = [&](int col, uint4 v) {
      const int o = core_offset<kTileTokens>(e, col);
      *reinterpret_cast<uint4*>(kv + o) = v;
      if constexpr (kPair) csync::st_async_v4(peer_kv + kv_off0 + 2 * o, v, bar);
    };
    const int c0 = pt * S::kNope + half * (S::kNope / 2);
    float scale = 0.f;
    uint4 raw[S::kNope / 2];
    if (valid) {
      scale = __ldg(reinterpret_cast<const float*>(rec + kScaleOffset) + c0 * 16 / (kDNope / kNumTiles));
#pragma unroll
      for (int c = 0; c < S::kNope / 2; ++c) raw[c] = __ldg(reinterpret_cast<const uint4*>(rec + 16 * (c0 + c)));
    }
#pragma unroll
    for (int c = 0; c < S::kNope / 2; ++c) {
      uint4 lo = make_uint4(0, 0, 0, 0), hi = lo;
      if (valid) dequant16(raw[c], scale, lo, hi);
      store(16 * (c0 + c), lo);
      store(16 * (c0 + c) + 8, hi);
    }
#pragma unroll
    for (int r = half; r < S::kRope; r += 2) {
      const int rc = pt * S::kRope + r;   // rope chunk: 8 bf16 values
      uint4 v = make_uint4(0, 0, 0, 0);
      if (valid) v = __ldg(reinterpret_cast<const uint4*>(rec + kRopeOffset + 16 * rc));
      store(kDNope + 8 * rc, v);
    }
  }
};

template <bool kPair>
__global__ void __launch_bounds__(kThreads, 1) sparse_mla_decode_overlap_kernel(const DecodeParams p) {
  constexpr int kClusterBytesPerTile = Share<kPair>::kEntries * kRowBytes;   // st.async per tile
  DSA_DYNAMIC_SMEM(smem, 128);
  auto* q_s = reinterpret_cast<__nv_bfloat16*>(smem + Smem::kQ);
  auto* p_s = reinterpret_cast<__nv_bfloat16*>(smem + Smem::kP);
  auto* alpha_s = reinterpret_cast<float*>(smem + Smem::kAlpha);
  auto* final_s = reinterpret_cast<float*>(smem + Smem::kFinal);
  const int* valid_s = reinterpret_cast<const int*>(smem + Smem::kValid);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
  const int g = lane / 4, t4 = lane % 4;
  constexpr int kBlocksPerRow = kPair ? 2 : 1;
  const int64_t row = blockIdx.x / kBlocksPerRow;
  const int rank = kPair ? static_cast<int>(blockIdx.x % 2) : 0;   // cluster (2,1,1): rank = x % 2
  const int h0 = rank * kHB;
  const int split = blockIdx.y;
  const int64_t b = row / p.s_q;

  int len = static_cast<int>(p.topk);
  if (p.topk_length != nullptr)
    len = min(max(__ldg(p.topk_length + (p.per_query_topk_length ? row : b)), 0), len);
  const int tile_begin = split * p.plan.tiles_per_split;
  const int tile_end = min(tile_begin + p.plan.tiles_per_split, (len + kTileTokens - 1) / kTileTokens);

  {   // Q of the head block, core-matrix layout; rows past H are zero and never stored.
    const auto* q_g = static_cast<const __nv_bfloat16*>(p.q) + (row * p.heads + h0) * kDQK;
    for (int c = tid; c < kHB * (kDQK / 8); c += kThreads) {
      const int r = c % kHB, col = (c / kHB) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (h0 + r < p.heads) v = __ldg(reinterpret_cast<const uint4*>(q_g + r * kDQK + col));
      *reinterpret_cast<uint4*>(q_s + core_offset<kHB>(r, col)) = v;
    }
  }

  const uint32_t bars = csync::smem_addr(smem + Smem::kBars);   // full[0], full[1], empty[0], empty[1]
  const uint32_t full = bars, empty = bars + 16;
  Producer<kPair> prod{p, p.indices + row * p.topk, len, smem, 0, 0, empty, rank};
  if constexpr (kPair) {
    const int peer = rank ^ 1;
    prod.peer_kv = csync::mapa(csync::smem_addr(smem + Smem::kKV), peer);
    prod.peer_full = csync::mapa(full, peer);
    if (tid == 0) {
      for (int i = 0; i < 4; ++i) csync::mbar_init(bars + 8 * i, 1);
      csync::fence_mbar_init();
    }
    csync::cluster_arrive_release();   // mbarrier inits visible cluster-wide before any use
    csync::cluster_wait();
    if (tid == 0 && tile_begin < tile_end) {   // both CTAs of the pair walk the same tiles
      csync::arrive_expect_tx(full, kClusterBytesPerTile);   // tile 0 from the peer
      csync::arrive_remote(csync::mapa(empty, peer));        // the peer may fill our slot 0
    }
  }

  const float score_scale = p.sm_scale * kLog2e;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};   // WG0: rows 16w+g, +8
  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.f;

  if (tile_begin < tile_end) {
    prod.run(tile_begin, 0, 0, tile_end);
    prod.run(tile_begin, 0, 1, tile_end);
  }
  fence_async_writes();

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int m = tile - tile_begin, cur = m & 1, nxt = cur ^ 1;
    const bool more = tile + 1 < tile_end;
    if constexpr (kPair) {
      csync::wait_cluster(full + 8 * cur, (m >> 1) & 1);   // the peer's half of tile m landed
      fence_async_writes();
    }
    __syncthreads();   // (1) our half of tile m, its flags; every read of slot nxt (tile m-1) done
    if constexpr (kPair) {
      if (tid == 0 && more) {
        csync::arrive_expect_tx(full + 8 * nxt, kClusterBytesPerTile);
        csync::arrive_remote(csync::mapa(empty + 8 * nxt, rank ^ 1));
      }
    }
    const __nv_bfloat16* kv_s = reinterpret_cast<const __nv_bfloat16*>(smem + Smem::kKV + cur * Smem::kSlotBytes);

    float sacc[32];
    if (wg == 0) {   // S = Q K^T, all 36 k-steps in flight
      const uint64_t a0 = wgmma_desc(q_s, core_column_group_bytes<kHB>(), kCoreRowGroupBytes);
      const uint64_t b0 = wgmma_desc(kv_s, core_column_group_bytes<kTileTokens>(), kCoreRowGroupBytes);
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kDQK / 16; ++ks)
        wgmma_m64n64k16_kmajor_b(sacc, a0 + ((ks * 2 * core_column_group_bytes<kHB>()) >> 4),
                                 b0 + ((ks * 2 * core_column_group_bytes<kTileTokens>()) >> 4), ks > 0);
      wgmma_commit();
    }
    if (more) prod.run(tile + 1, m + 1, 0, tile_end);   // overlaps S

    if (wg == 0) {   // online softmax on the S fragments: rows 16 warp + g (+8), 16 columns each
      wgmma_wait_all();
#pragma unroll
      for (int i = 0; i < 32; ++i) fence_operand(sacc[i]);
      const int* valid = valid_s + cur * kTileTokens;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp * 16 + g + 8 * half;
        float sv[16];
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = 8 * n + 2 * t4 + e;
            sv[2 * n + e] = valid[col] ? sacc[4 * n + 2 * half + e] * score_scale : -INFINITY;
            mx = fmaxf(mx, sv[2 * n + e]);
          }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[half], mx);
        const bool none = m_new == -INFINITY;
        const float alpha = none ? 1.f : exp2f(m_run[half] - m_new);
        // As the other kernels: a NaN score keeps p NaN even while m is still -inf.
        auto p_of = [&](float x) { return none ? (x != x ? x : 0.f) : exp2f(x - m_new); };
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          const float p0 = p_of(sv[2 * n]), p1 = p_of(sv[2 * n + 1]);
          sum += p0 + p1;
          *reinterpret_cast<uint32_t*>(p_s + core_offset<kHB>(r, 8 * n + 2 * t4)) = pack_bf16x2(p0, p1);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        l_run[half] = l_run[half] * alpha + sum;
        m_run[half] = m_new;
        if (t4 == 0) alpha_s[r] = alpha;
      }
      fence_proxy_async_smem();   // P -> wgmma
    }
    __syncthreads();   // (2) P and alpha

    {   // O = alpha O + P V_m; warpgroup wg owns output columns [256 wg, 256 wg + 256)
      const int r0 = (warp % 4) * 16;
      const float a_lo = alpha_s[r0 + g], a_hi = alpha_s[r0 + g + 8];
#pragma unroll
      for (int n = 0; n < 32; ++n) {
        acc[4 * n] *= a_lo; acc[4 * n + 1] *= a_lo; acc[4 * n + 2] *= a_hi; acc[4 * n + 3] *= a_hi;
      }
      const uint64_t a0 = wgmma_desc(p_s, core_column_group_bytes<kHB>(), kCoreRowGroupBytes);
      const uint64_t b0 = wgmma_desc(kv_s + core_offset<kTileTokens>(0, wg * (kDV / 2)), kCoreRowGroupBytes,
                                     core_column_group_bytes<kTileTokens>());
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kTileTokens / 16; ++ks)
        wgmma_m64n256k16_nmajor_b(acc, a0 + ((ks * 2 * core_column_group_bytes<kHB>()) >> 4),
                                  b0 + ((ks * 2 * kCoreRowGroupBytes) >> 4), 1);
      wgmma_commit();
    }
    if (more) prod.run(tile + 1, m + 1, 1, tile_end);   // overlaps P V
    wgmma_wait_all();
#pragma unroll
    for (int i = 0; i < 128; ++i) fence_operand(acc[i]);
    fence_async_writes();   // this thread's stores of tile m+1 -> the next S / P V
  }

  // Epilogue: WG0's t4 == 0 lanes own the row statistics.
  const bool split_mode = p.plan.num_splits > 1;
  if (wg == 0 && t4 == 0) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * 16 + g + 8 * half, h = h0 + r;
      float inv = 0.f, lse = -INFINITY;
      if (l_run[half] != 0.f) {
        lse = (m_run[half] + log2f(l_run[half])) * kLn2;
        float denom = l_run[half];
        if (!split_mode && p.attn_sink != nullptr && h < p.heads)
          denom += exp2f(__ldg(p.attn_sink + h) * kLog2e - m_run[half]);
        inv = 1.f / denom;
      }
      final_s[r] = inv;
      if (h < p.heads) {
        const int64_t o = row * p.heads + h;
        if (split_mode) p.lse_partial[int64_t(split) * p.batch * p.s_q * p.heads + o] = lse;
        else p.lse[o] = lse;
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = (warp % 4) * 16 + g + 8 * half;
    if (h0 + r >= p.heads) continue;
    const float inv = final_s[r];
    const int64_t o = (row * p.heads + h0 + r) * kDV + wg * (kDV / 2) + 2 * t4;
#pragma unroll
    for (int n = 0; n < 32; ++n) {
      const float v0 = acc[4 * n + 2 * half] * inv, v1 = acc[4 * n + 2 * half + 1] * inv;
      if (split_mode) {
        float* dst = p.out_partial + int64_t(split) * p.batch * p.s_q * p.heads * kDV + o + 8 * n;
        *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
      } else {
        *reinterpret_cast<uint32_t*>(static_cast<__nv_bfloat16*>(p.out) + o + 8 * n) = pack_bf16x2(v0, v1);
      }
    }
  }
}

}  // namespace overlap
}  // namespace dsa::mla_decode
