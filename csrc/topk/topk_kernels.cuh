// topk family: torch-free CUDA kernels.
//
// topk_radix_kernel: exact top-k per row by radix select over the order-preserving uint32 key
// of topk_key.h. A row is split over a thread-block cluster of `cs` CTAs (cs = 1 for many
// rows; up to 16 for few long rows). Each CTA reads its slice of the row from global memory
// once, caching the keys in shared memory when the slice fits (else it re-reads global memory
// every pass: slower, never wrong). Three passes of 11-, 11- and 10-bit digits (an 8-bit top
// digit of an fp32 key puts most real logits into a handful of bins and serialises the
// shared-memory atomics; 11 bits spread them over the mantissa's top bits too): every CTA
// builds a histogram (2048 or 1024 bins) of the keys still matching the prefix, the cluster
// sums the histograms through distributed shared memory, and every CTA picks the same bin by a
// suffix scan; a pass whose bin is taken whole ends the search. There is no candidate buffer,
// so nothing can overflow: the slice itself is the candidate set. Output: elements above the
// threshold prefix go out through a shared atomic counter at a per-CTA offset; elements equal
// to it are taken in index order (block prefix scan, CTA offsets in rank order) until the
// count needed is reached — unless the whole tie class is taken, when order does not matter.
// sorted=true: CTA 0 then sorts the k selected (key, index) pairs with a bitonic sort.
//
// Shared memory: the TopkShared state (static, 33040 B on sm_90a: peers of a cluster address
// its histograms, inboxes and counts at the same offset), and the dynamic key cache, which CTA 0
// reuses as the sort buffer.
//
// ---- MODEL (performance model; tools/topk_model.py prints this table from its parameters) ----
// Case: SPEC's 64 x 131072 fp32, k = 2048, unsorted, H100 SXM (3.35 TB/s, 132 SMs). Computed
// (launcher rules, simulated N(0,1) rows): cs = 8 (16384-key slices fit the 20480-key cache),
// 512 CTAs of 512 threads, 2 per SM; 32 clusters of 8 resident (assumption: 4 per GPC x 8) -> 2
// waves of 32 rows. Bytes per row: pass 0 reads the 512 KiB of logits once from HBM (emulator:
// gmem_bytes_read = 4 S per row, + 8 k sorted); every later pass and the output pass sweep the
// same keys in shared memory; 8 KiB of indices out. Streaming rows (slice > cache: S > 16 x
// 20480 at cs = 16) re-read global memory (L2 where it holds them) in every pass instead.
// Radix passes per row: mean 2.45 (35 rows of 64 take 2, 29 take 3: the early exit fires when
// the threshold bin is taken whole). Shared atomics per element: 1 in pass 0, 0.0165 in pass 1,
// ~1e-5 in pass 2; atomicAdd(.., 1u) compiles to ATOMS.POPC.INC (same-address lanes combine),
// 1.92 wavefronts per warp instruction in pass 0's access order.
// Synchronisation per row (emulator counters, exact: test_emu_topk.py::test_sync_counts_match_
// the_model at cs = 8 and 4, p = 2 and 3 passes):
//   kMbarrier: cluster_barriers = 1 (the split init barrier; its wait overlaps pass 0's sweep),
//              mbarrier_phases = cs (2p + 1) + sorted (cs = 1: 1 + sorted): per CTA two waits
//              per pass and one for the counts (+ CTA 0's done wait when sorted).
//   kCluster:  cluster_barriers = p + 2 (one per pass, counts, exit), mbarrier_phases = 0.
// SASS (cuobjdump -sass of the sm_90a cubin): each kCluster sync is MEMBAR.ALL.GPU + UCGABAR_ARV +
// UCGABAR_WAIT + CCTL.IVALL; kMbarrier has no MEMBAR.GPU on the unsorted path (one in the sorted
// hand-off: mbarrier.arrive.release.cluster), and each acquire.cluster try_wait is
// SYNCS.PHASECHK + CCTL.IVALL (an L1 invalidate: harmless, the keys live in shared memory).
// Latencies (ASSUMPTIONS, not measured; the first GPU run calibrates them): cluster barrier
// 0.45 us (~300 clk barrier + ~500 clk MEMBAR.GPU), mbarrier phase 0.15 us (st.async one-way
// ~200 clk, the order of DSM latency in Luo et al., arXiv 2402.13499), DSMEM 25 GB/s per SM
// (~3.3 TB/s SM-to-SM aggregate, same paper, as recalled), 1.755 GHz, 90% of HBM peak, 3 IPC,
// 9 / 12 instructions per key in the cache / output sweeps, 2 us fixed start and drain.
//   per wave (us)                        mbarrier  cluster
//   pass 0 (HBM 5.56 > atomics 2.24)       5.56     5.56
//   exchange + threshold, pass 0 / 1       1.62     5.45   (push 2 x 7 KiB vs pull 56 KiB per CTA)
//   exchange + threshold, pass 2 (x0.45)   0.47     1.43
//   cache sweeps (1.45 x 1.75) + output    4.87     4.87
//   counts, exit                           0.15     1.02
//   TOTAL = 2 + 2 waves x (pass 0 + tail)  30.6     49.6   vs SPEC 15; floor 10.0 (11.1 at 90%)
// Shortfall: ~2x the target in the default mode. The tail after the stream (8.7 us per wave:
// histogram bytes through DSMEM, the later and output sweeps of 16384 keys per CTA, 2 CTAs per
// SM) is not overlapped with HBM, and paid twice (two waves). The estimate hangs on the DSMEM
// bandwidth assumption (4x faster: 26.8 / 34.3; 2x slower: 35.7 / 70.0). What would close it
// (modelled, tools/topk_model.py): A) a two-level exchange (64 group sums, then the threshold
// group's 32 bins: ~5% of the bytes, +2 phases): 27.2; B) leaner sweeps (LDS.128, 32-bit indices,
// 4 / 6 instructions per key): 25.4; C) a persistent kernel streaming the next row under this
// row's tail: 25.0; A+B 22.0, A+B+C 17.6 -- still 2.6 us over: finer waves (one CTA per SM, more
// rows per cluster) would shrink the exposed first stream and last tail; not modelled.
// The first GPU run (dsa-bench topk: both DSA_TOPK_SYNC modes side by side) gives the cluster -
// mbarrier difference, which by this model is mostly (56 - 14) KiB per CTA and pass over
// DSMEM: it measures the DSMEM bandwidth assumption directly.
// Anchors (read in their sources, numbers as published):
//   FlashInfer fast_topk_clusters_exact (include/flashinfer/fast_topk_clusters_exact.cuh, PR
//   #3009, sm_90+): 1024 threads, <= 8 CTAs per row, four 8-bit rounds for fp32; the logits are
//   read twice from global memory (a histogram sweep, then a filter sweep into a shared
//   candidate cache that overflows to global memory); peer histograms pulled with
//   map_shared_rank; per row 6 full cluster.sync + 3 split arrive/wait pairs. Published (PR
//   #3009; B200 per shared/KERNELS.md): 256 x 262144 fp32 k = 2048: 160.8 us vs 230.4 us for
//   FlashInfer's default top-k and 885.5 us torch.topk; PR #2461 (B200, batch 1, k = 2048):
//   5.3 / 15.1 / 33.8 us at 4K / 16K / 64K.
//   DeepSelect (deepseek-ai/DeepSelect, v1.0.0 2026-09, docs/DeepSelect-deep-dive.md): one read
//   per element against a running threshold in random block order with periodic radix
//   compaction of the candidates; the cluster variant (bf16, 16 CTAs, k <= 1024) has one full
//   cluster barrier (arrive.relaxed + wait.acquire) after every CTA's local top-k, then st.async
//   of each CTA's candidates into CTA 0 on two transaction mbarriers; CTA 0 selects. Published:
//   "2 ~ 20x" torch.topk, and bandwidth plots (README, assets/perf_*.png) without a number
//   for our shape.
#pragma once
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "topk/topk_cluster.cuh"
#include "topk/topk_key.h"

namespace dsa {
namespace topk {

constexpr int kBlock = 512;
constexpr int kWarps = kBlock / 32;
constexpr int kMaxBins = 2048;
constexpr int kPasses = 3;            // digits of 11, 11 and 10 bits over the 32-bit key
constexpr int kPortableCluster = 8;
constexpr int kMaxCluster = 16;       // non-portable; used only where the device accepts it
constexpr int kMaxCacheKeys = 20480;  // 80 KiB of keys per CTA (+32 KiB of TopkShared): 2 CTAs/SM
constexpr int kMaxSortK = 4096;

__host__ __device__ constexpr int pass_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr int pass_bins(int pass) { return pass == 2 ? 1024 : 2048; }
static_assert(pass_bins(0) == 4 * kBlock && pass_bins(1) == 4 * kBlock && pass_bins(2) == 2 * kBlock,
              "each thread owns 4 (or 2) contiguous histogram bins");
static_assert(pass_shift(0) + 11 == 32 && pass_shift(1) + 11 == pass_shift(0) && pass_shift(2) + 10 == pass_shift(1),
              "the digits tile the 32-bit key");

// How the CTAs of a row's cluster synchronise (topk_radix_kernel's template parameter; the
// launcher picks it, DSA_TOPK_SYNC=cluster|mbarrier, see topk_launch.cu):
//   kCluster  — a full cluster barrier (barrier.cluster arrive.release + wait.acquire) after
//               every histogram pass, after the count exchange and before exit: up to five
//               per row, each waiting for every thread of every CTA.
//   kMbarrier — point-to-point pushes by st.async (each completes its bytes on the receiver's
//               mbarrier; no fence, no remote read): per pass a reduce-scatter (CTA r owns
//               bins [r q, (r+1) q), q = bins / cs; every CTA pushes each owner its slice of
//               the local histogram, 16 bytes per st.async, into the owner's recv buffer), the
//               owner sums its slice, then an all-gather (each owner pushes its summed slice
//               into every peer's cluster histogram). Each receiver arrives once with
//               expect_tx of the bytes it will receive and waits (acquire.cluster) on its own
//               barrier. The counts go the same way (8 bytes to every peer); with sorted output
//               the peers arrive (release.cluster: their global output) on CTA 0's done
//               mbarrier. The one cluster barrier left (mbarrier inits visible cluster-wide) is
//               split: arrive at kernel start, wait after the first pass's global sweep.
//               DSMEM traffic per CTA and pass: ~2 x 8 KB out (pull: cs x 8 KB in).
//   Why no exit barrier: no CTA reads a peer's shared memory; every push into a CTA is
//   waited for by that CTA before its output pass, so none is in flight when it exits.
//   Why barriers can be reused pass after pass (parity = pass & 1): a push of pass p+1 into
//   a CTA follows its sender's wait for pass p's all-gather, which needs that CTA's own
//   pass-p push, made after its pass-p waits completed (and the same one step earlier for
//   the recv buffer and the cluster histogram: no push overwrites data still being read).
enum class SyncMode : int { kCluster = 0, kMbarrier = 1 };
constexpr int kScatterBar = 0, kGatherBar = 1, kCountsBar = 2, kDoneBar = 3, kNumBars = 4;

struct TopkParams {
  const float* logits;
  int64_t row_stride;  // elements
  int64_t S;
  const int32_t* ks;   // may be null: 0
  const int32_t* ke;   // may be null: S
  int32_t* out;        // [T, k] contiguous
  int k;
  int cache_keys;      // per-CTA key cache capacity (elements); the buffer holds 3 more
  bool sorted;
};

// ---- cluster primitives (a cluster of one CTA where clusters do not exist) ----------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_rank() { return cooperative_groups::this_cluster().block_rank(); }
__device__ __forceinline__ unsigned cluster_size() { return cooperative_groups::this_cluster().num_blocks(); }
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
#else
__device__ __forceinline__ unsigned cluster_rank() { return 0; }
__device__ __forceinline__ unsigned cluster_size() { return 1; }
__device__ __forceinline__ void cluster_sync() { __syncthreads(); }
template <typename T>
__device__ __forceinline__ T* cluster_peer(T* p, unsigned) { return p; }
#endif

__device__ __forceinline__ uint32_t load_key(const float* x, int64_t col) {
  return topk_key_from_bits(__float_as_uint(__ldg(x + col)));
}

struct TopkShared {
  alignas(16) uint32_t local_hist[2][kMaxBins];  // this CTA's histogram (double-buffered: peers read it)
  alignas(16) uint32_t hist[kMaxBins];           // the cluster's histogram
  uint32_t warp_tot[kWarps];
  uint32_t counts[2];                // this CTA's (above, equal) counts, read by peers
  uint32_t above_ctr, equal_ctr, running, my_above;
  uint32_t above_off, equal_off;
  uint32_t sel_above;
  int sel_bin;
  // SyncMode::kMbarrier: the reduce-scatter, all-gather and counts barriers (1 arrival each, plus
  // the transaction bytes the CTA receives) and the done barrier (cs arrivals, CTA 0's is
  // used); counts_in[r] = (above, equal) of rank r, pushed by st.async.
  alignas(8) uint64_t bars[kNumBars];
  uint32_t counts_in[kMaxCluster][2];
  alignas(16) uint32_t recv[kMaxBins];  // reduce-scatter inbox: [source rank][q] of this CTA's slice
};

// Static shared memory of the kernel (the key cache is the dynamic region).
constexpr size_t kSharedStateBytes = sizeof(TopkShared);

// Thread t owns the PER contiguous bins [t*PER, (t+1)*PER) of a pass's histogram.
template <int PER>
struct BinVec;
template <>
struct BinVec<4> {
  using type = uint4;
  __device__ static void add(uint32_t (&h)[4], const uint4 v) { h[0] += v.x; h[1] += v.y; h[2] += v.z; h[3] += v.w; }
  __device__ static uint4 pack(const uint32_t (&h)[4]) { return make_uint4(h[0], h[1], h[2], h[3]); }
};
template <>
struct BinVec<2> {
  using type = uint2;
  __device__ static void add(uint32_t (&h)[4], const uint2 v) { h[0] += v.x; h[1] += v.y; }
  __device__ static uint2 pack(const uint32_t (&h)[4]) { return make_uint2(h[0], h[1]); }
};

// Cluster-wide histogram: this thread's bins summed over the local histograms of every CTA of
// the cluster (distributed shared memory, 16- or 8-byte loads, four ranks in flight), stored
// to sh.hist and returned in h.
template <int PER>
__device__ __forceinline__ void reduce_cluster_hist(TopkShared& sh, uint32_t* lh, unsigned cs,
                                                    uint32_t (&h)[4]) {
  using V = typename BinVec<PER>::type;
  const int off = threadIdx.x * PER;
  h[0] = h[1] = h[2] = h[3] = 0;
  unsigned r = 0;
  for (; r + 4 <= cs; r += 4) {
    V v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = *reinterpret_cast<const V*>(cluster_peer(lh, r + u) + off);
#pragma unroll
    for (int u = 0; u < 4; ++u) BinVec<PER>::add(h, v[u]);
  }
  for (; r < cs; ++r) BinVec<PER>::add(h, *reinterpret_cast<const V*>(cluster_peer(lh, r) + off));
  *reinterpret_cast<V*>(sh.hist + off) = BinVec<PER>::pack(h);
}

// Threshold bin of the cluster histogram (all threads call; thread t holds bins
// [t*per, (t+1)*per) in h): the bin b with sum(hist[b+1..]) < need <= sum(hist[b..]), and the
// count strictly above it, into sh.sel_bin / sh.sel_above. A block suffix scan of the
// per-thread sums locates the one thread whose range holds b.
__device__ __forceinline__ void select_threshold_bin(TopkShared& sh, const uint32_t (&h)[4], int per,
                                                     uint32_t need) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t v = h[0] + h[1] + h[2] + h[3];  // bins a thread does not own are 0
  uint32_t x = v;  // becomes sum of v over lanes >= lane of this warp
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t y = __shfl_down_sync(0xFFFFFFFFu, x, off);
    if (lane + off < 32) x += y;
  }
  if (lane == 0) sh.warp_tot[warp] = x;
  __syncthreads();
  uint32_t s = x;  // sum of hist over bins >= tid * per
  for (int w = warp + 1; w < kWarps; ++w) s += sh.warp_tot[w];
  uint32_t running = s - v;  // sum over bins above this thread's range
  if (running < need && need <= s) {
#pragma unroll
    for (int j = 3; j >= 0; --j) {
      if (j < per && running < need && need <= running + h[j]) {
        sh.sel_bin = tid * per + j;
        sh.sel_above = running;
      }
      if (j < per) running += h[j];
    }
  }
  __syncthreads();
}

// CTA 0 of a row, after the cluster barrier: sort out[0, m) (all valid) by descending key,
// ascending index. buf holds next_pow2(m) <= kMaxSortK 64-bit (key, ~index) pairs.
__device__ __forceinline__ void sort_selected(const float* x, int32_t* out, int m, uint64_t* buf) {
  int P = 1;
  while (P < m) P <<= 1;
  for (int j = threadIdx.x; j < P; j += kBlock) {
    uint64_t v = 0;  // padding sorts last: (key 0, index 0xFFFFFFFF) is below every real pair
    if (j < m) {
      const uint32_t idx = static_cast<uint32_t>(out[j]);
      v = (static_cast<uint64_t>(load_key(x, idx)) << 32) | (0xFFFFFFFFu - idx);
    }
    buf[j] = v;
  }
  __syncthreads();
  for (int size = 2; size <= P; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < P / 2; t += kBlock) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const bool desc = (i & size) == 0;
        const uint64_t a = buf[i], b = buf[j];
        if ((a < b) == desc) {
          buf[i] = b;
          buf[j] = a;
        }
      }
      __syncthreads();
    }
  }
  for (int j = threadIdx.x; j < m; j += kBlock)
    out[j] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(buf[j]));
}

// SyncMode::kMbarrier, cs > 1: the cluster histogram of this pass into sh.hist by st.async
// pushes (see SyncMode), this thread's bins [t*PER, (t+1)*PER) into h. lh: this CTA's
// complete local histogram (after a bar.sync); parity: pass & 1.
template <int PER>
__device__ __forceinline__ void exchange_cluster_hist(TopkShared& sh, const uint32_t* lh, unsigned cs,
                                                      unsigned rank, uint32_t parity, uint32_t (&h)[4]) {
  using V = typename BinVec<PER>::type;
  constexpr int nbins = PER * kBlock;
  const int tid = threadIdx.x;
  // Bins per owner, q = nbins / cs: cs is a power of two <= 16, so q is one and a multiple of 4
  // (shifts, not divisions: this runs at the kernel's 64-register cap).
  const int cs_log = __ffs(static_cast<int>(cs)) - 1;
  const int q_log = __ffs(nbins) - 1 - cs_log;
  const int q = 1 << q_log;
  const uint32_t scatter = csync::smem_addr(&sh.bars[kScatterBar]), gather = csync::smem_addr(&sh.bars[kGatherBar]);
  const uint32_t bytes = 4u * static_cast<uint32_t>(q) * (cs - 1);  // each receives (cs-1) slices per round
  if (tid == 0) {
    csync::arrive_expect_tx(scatter, bytes);
    csync::arrive_expect_tx(gather, bytes);
  }
  // Reduce-scatter: thread t pushes bins [4t, 4t+4) to their owner (unless that is us).
  if (tid < nbins / 4) {
    const unsigned owner = static_cast<unsigned>((4 * tid) >> q_log);
    if (owner != rank) {
      const uint32_t dst = csync::smem_addr(&sh.recv[rank * q + 4 * tid - owner * q]);
      csync::st_async_v4(csync::mapa(dst, owner), *reinterpret_cast<const uint4*>(lh + 4 * tid),
                         csync::mapa(scatter, owner));
    }
  }
  csync::wait_cluster(scatter, parity);
  // The owner's sums of its slice, into its own part of the cluster histogram.
  for (int i = tid; i < q; i += kBlock) {
    uint32_t v = lh[rank * q + i];
    for (unsigned r = 0; r < cs; ++r)
      if (r != rank) v += sh.recv[r * q + i];
    sh.hist[rank * q + i] = v;
  }
  __syncthreads();
  // All-gather: (peer, 16-byte piece of our slice) pairs, at most one per thread.
  const int pieces_log = q_log - 2;  // 16-byte pieces per slice: q / 4
  if (tid < static_cast<int>(cs - 1) << pieces_log) {
    unsigned peer = static_cast<unsigned>(tid >> pieces_log);
    peer += peer >= rank;
    const int b = rank * q + 4 * (tid & ((1 << pieces_log) - 1));
    csync::st_async_v4(csync::mapa(csync::smem_addr(&sh.hist[b]), peer), *reinterpret_cast<const uint4*>(sh.hist + b),
                       csync::mapa(gather, peer));
  }
  csync::wait_cluster(gather, parity);
  const V v = *reinterpret_cast<const V*>(sh.hist + tid * PER);
  h[0] = h[1] = h[2] = h[3] = 0;
  BinVec<PER>::add(h, v);
}

// First pass: read the CTA's slice [0, len) of xr from global memory once (16-byte loads on
// the aligned body), build the histogram of the top digit, and cache the keys in ck if cached.
// ck is offset so that ck + head is 16-byte aligned, head = elements before xr's first
// 16-byte boundary.
__device__ __forceinline__ void first_pass(const float* xr, int64_t len, bool cached, uint32_t* ck,
                                           int head, uint32_t* lh) {
  constexpr int shift = pass_shift(0);
  const int tid = threadIdx.x;
  if (tid < head) {
    const uint32_t key = load_key(xr, tid);
    if (cached) ck[tid] = key;
    atomicAdd(&lh[key >> shift], 1u);
  }
  const int64_t nvec = (len - head) >> 2;
  const float4* xv = reinterpret_cast<const float4*>(xr + head);
  uint4* cv = reinterpret_cast<uint4*>(ck + head);
  constexpr int kUnroll = 2;
  for (int64_t j0 = tid; j0 < nvec; j0 += kUnroll * kBlock) {
    float4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kBlock;
      if (j < nvec) v[u] = __ldg(xv + j);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = j0 + u * kBlock;
      if (j < nvec) {
        const uint4 key = make_uint4(topk_key_from_bits(__float_as_uint(v[u].x)),
                                     topk_key_from_bits(__float_as_uint(v[u].y)),
                                     topk_key_from_bits(__float_as_uint(v[u].z)),
                                     topk_key_from_bits(__float_as_uint(v[u].w)));
        if (cached) cv[j] = key;
        atomicAdd(&lh[key.x >> shift], 1u);
        atomicAdd(&lh[key.y >> shift], 1u);
        atomicAdd(&lh[key.z >> shift], 1u);
        atomicAdd(&lh[key.w >> shift], 1u);
      }
    }
  }
  for (int64_t i = head + 4 * nvec + tid; i < len; i += kBlock) {
    const uint32_t key = load_key(xr, i);
    if (cached) ck[i] = key;
    atomicAdd(&lh[key >> shift], 1u);
  }
}

template <SyncMode kMode>
__global__ void __launch_bounds__(kBlock, 2) topk_radix_kernel(const TopkParams p) {
  // Point-to-point synchronisation only where clusters exist (sm_90, the emulator); elsewhere
  // both modes are the same single-CTA code.
  constexpr bool kMb = kMode == SyncMode::kMbarrier && csync::kHasClusters;
  DSA_DYNAMIC_SMEM(topk_smem, 16);
  // A static object: at fixed addresses its fields cost no base register (at the state's place
  // in the dynamic region, ptxas spilled 12 B at the 64-register cap of 2 CTAs per SM).
  DSA_STATIC_SMEM(TopkShared, sh);
  uint32_t* cache = reinterpret_cast<uint32_t*>(topk_smem);

  const int tid = threadIdx.x;
  const unsigned cs = cluster_size(), rank = cluster_rank();
  const int64_t row = blockIdx.x / cs;
  int64_t lo, hi;
  topk_row_range(p.ks, p.ke, row, p.S, lo, hi);
  const int64_t n = hi - lo;
  const int64_t chunk = ceil_div<int64_t>(n, cs);
  const int64_t c0 = min(hi, lo + static_cast<int64_t>(rank) * chunk);
  const int64_t len = min(hi, c0 + chunk) - c0;
  const float* x = p.logits + row * p.row_stride;
  int32_t* out = p.out + row * static_cast<int64_t>(p.k);
  const int k = p.k;
  // sh.bars[i]'s shared::cta address: a constant (static shared memory), no register held.
  const auto bar = [&](int i) { return csync::smem_addr(&sh.bars[i]); };
  if constexpr (kMb) {
    if (tid == 0) {
      csync::mbar_init(bar(kScatterBar), 1);
      csync::mbar_init(bar(kGatherBar), 1);
      csync::mbar_init(bar(kCountsBar), 1);
      csync::mbar_init(bar(kDoneBar), cs);
      csync::fence_mbar_init();
    }
    __syncthreads();                   // the inits, for this CTA's waiters
    csync::cluster_arrive_relaxed();   // ... and for the peers, at the matching cluster_wait
  }

  if (n <= k) {  // every column in range is selected (same branch for the whole cluster)
    if constexpr (kMb) csync::cluster_wait();  // no CTA arrives on CTA 0's barrier before its init
    for (int64_t i = tid; i < len; i += kBlock) out[c0 - lo + i] = static_cast<int32_t>(c0 + i);
    for (int64_t j = n + static_cast<int64_t>(rank) * kBlock + tid; j < k; j += int64_t(cs) * kBlock)
      out[j] = -1;
    if (p.sorted) {
      if constexpr (kMb) {
        __syncthreads();  // this CTA's output written; released to CTA 0 at cluster scope
        if (tid == 0) csync::arrive_remote(csync::mapa(bar(kDoneBar), 0));
        if (rank == 0) csync::wait_cluster(bar(kDoneBar), 0);
      } else {
        cluster_sync();  // release/acquire at cluster scope: CTA 0 sees the peers' output
      }
      if (rank == 0 && n > 1) sort_selected(x, out, static_cast<int>(n), reinterpret_cast<uint64_t*>(cache));
    }
    return;
  }

  // Key i of the slice lives at ck[i]; the offset makes the 16-byte-aligned body of the
  // slice land on 16-byte-aligned cache words.
  const float* xr = x + c0;
  const int64_t to_aligned = (4 - ((reinterpret_cast<uintptr_t>(xr) >> 2) & 3)) & 3;
  const int head = static_cast<int>(len < to_aligned ? len : to_aligned);
  uint32_t* ck = cache + ((4 - head) & 3);
  const bool cached = len <= p.cache_keys;
  uint32_t prefix = 0, mask = 0, need = static_cast<uint32_t>(k);
  uint32_t above_acc = 0;  // this thread's share of the CTA's count above the threshold
  int bin = 0, last_pass = 0;
  if (tid == 0) sh.my_above = 0;
  for (int pass = 0; pass < kPasses; ++pass) {
    const int shift = pass_shift(pass), nbins = pass_bins(pass);
    uint32_t* lh = sh.local_hist[pass & 1];
    for (int b = tid; b < nbins; b += kBlock) lh[b] = 0;
    __syncthreads();
    if (pass == 0) {
      first_pass(xr, len, cached, ck, head, lh);
    } else {
      for (int64_t i = tid; i < len; i += kBlock) {
        const uint32_t key = cached ? ck[i] : load_key(xr, i);
        if ((key & mask) == prefix) atomicAdd(&lh[(key >> shift) & (nbins - 1)], 1u);
      }
    }
    uint32_t h[4];
    if (kMb && cs > 1) {
      if (pass == 0) csync::cluster_wait();  // the peers' barrier inits (arrived at kernel start)
      __syncthreads();                       // this CTA's histogram is complete
      if (nbins == 4 * kBlock) exchange_cluster_hist<4>(sh, lh, cs, rank, pass & 1, h);
      else exchange_cluster_hist<2>(sh, lh, cs, rank, pass & 1, h);
    } else {
      if (kMb) {
        if (pass == 0) csync::cluster_wait();  // (a cluster of one: matches the arrive)
        __syncthreads();
      } else {
        cluster_sync();  // every CTA's histogram of this pass is complete
      }
      if (nbins == 4 * kBlock) reduce_cluster_hist<4>(sh, lh, cs, h);
      else reduce_cluster_hist<2>(sh, lh, cs, h);
    }
    select_threshold_bin(sh, h, nbins == 4 * kBlock ? 4 : 2, need);
    bin = sh.sel_bin;
    need -= sh.sel_above;
    prefix |= static_cast<uint32_t>(bin) << shift;
    mask |= static_cast<uint32_t>(nbins - 1) << shift;
    for (int b = bin + 1 + tid; b < nbins; b += kBlock) above_acc += lh[b];
    last_pass = pass;
    if (sh.hist[bin] == need) break;  // the whole tie class at this prefix is taken
  }
  const uint32_t total_equal = sh.hist[bin];
  if (above_acc) atomicAdd(&sh.my_above, above_acc);
  __syncthreads();
  if constexpr (kMb) {
    // Push (above, equal) into every peer's counts_in[rank]; the counts barrier completes when
    // the cs - 1 pushes (8 bytes each) have landed here.
    const uint32_t b = bar(kCountsBar);
    if (tid == 0) csync::arrive_expect_tx(b, 8u * (cs - 1));
    if (tid < static_cast<int>(cs) && tid != static_cast<int>(rank))
      csync::st_async_v2(csync::mapa(csync::smem_addr(&sh.counts_in[rank][0]), tid), sh.my_above,
                         sh.local_hist[last_pass & 1][bin], csync::mapa(b, tid));
    csync::wait_cluster(b, 0);
  } else {
    if (tid == 0) {
      sh.counts[0] = sh.my_above;
      sh.counts[1] = sh.local_hist[last_pass & 1][bin];
    }
    cluster_sync();  // every CTA's counts are published
  }
  if (tid == 0) {
    uint32_t a = 0, e = 0;
    for (unsigned r = 0; r < rank; ++r) {
      const uint32_t* c = kMb ? sh.counts_in[r] : cluster_peer(sh.counts, r);
      a += c[0];
      e += c[1];
    }
    sh.above_off = a;
    sh.equal_off = e;
    sh.running = e;
    sh.above_ctr = 0;
    sh.equal_ctr = 0;
  }
  __syncthreads();
  const uint32_t k_above = static_cast<uint32_t>(k) - need;  // cluster-wide count above
  const uint32_t above_off = sh.above_off, equal_off = sh.equal_off;

  if (total_equal == need || equal_off >= need) {
    // No partial tie class in this CTA: every equal element is taken, or none is.
    const bool take_equal = total_equal == need;
    for (int64_t i = tid; i < len; i += kBlock) {
      const uint32_t m = (cached ? ck[i] : load_key(xr, i)) & mask;
      if (m > prefix) {
        out[above_off + atomicAdd(&sh.above_ctr, 1u)] = static_cast<int32_t>(c0 + i);
      } else if (m == prefix && take_equal) {
        out[k_above + equal_off + atomicAdd(&sh.equal_ctr, 1u)] = static_cast<int32_t>(c0 + i);
      }
    }
  } else {
    // Ties at the threshold: take the first (need - equal_off) equal elements of this CTA in
    // index order, one tile of kBlock consecutive columns at a time.
    const int lane = tid & 31, warp = tid >> 5;
    for (int64_t base = 0; base < len; base += kBlock) {
      const int64_t i = base + tid;
      const bool valid = i < len;
      const uint32_t m = valid ? ((cached ? ck[i] : load_key(xr, i)) & mask) : 0u;
      if (valid && m > prefix)
        out[above_off + atomicAdd(&sh.above_ctr, 1u)] = static_cast<int32_t>(c0 + i);
      const bool eq = valid && m == prefix;
      const uint32_t ballot = __ballot_sync(0xFFFFFFFFu, eq);
      if (lane == 0) sh.warp_tot[warp] = __popc(ballot);
      __syncthreads();
      uint32_t before = sh.running + __popc(ballot & ((1u << lane) - 1u));
      uint32_t tile_total = 0;
      for (int w = 0; w < kWarps; ++w) {
        const uint32_t c = sh.warp_tot[w];
        if (w < warp) before += c;
        tile_total += c;
      }
      if (eq && before < need) out[k_above + before] = static_cast<int32_t>(c0 + i);
      __syncthreads();
      if (tid == 0) sh.running += tile_total;
      __syncthreads();
    }
  }
  if constexpr (kMb) {
    // No exit barrier (see SyncMode); with sorted output CTA 0 waits for every CTA's part.
    if (p.sorted) {
      __syncthreads();
      if (tid == 0) csync::arrive_remote(csync::mapa(bar(kDoneBar), 0));
      if (rank == 0) csync::wait_cluster(bar(kDoneBar), 0);
    }
  } else {
    cluster_sync();  // peers are done reading our counts; CTA 0 sees the whole output row
  }
  if (p.sorted && rank == 0) sort_selected(x, out, k, reinterpret_cast<uint64_t*>(cache));
}

__global__ void topk_slot_ids_kernel(const int32_t* __restrict__ indices, int64_t R, int64_t K,
                                     const int32_t* __restrict__ block_table, int64_t M,
                                     int64_t rows_per_seq, int64_t block_size,
                                     int32_t* __restrict__ out) {
  const int64_t total = R * K;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = e / K;
    out[e] = topk_slot_id(__ldg(indices + e), block_table + (r / rows_per_seq) * M, M, block_size);
  }
}

}  // namespace topk
}  // namespace dsa
