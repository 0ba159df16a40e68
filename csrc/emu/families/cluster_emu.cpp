// Kernels that exercise the emulator's cluster model (tests/test_emu_cluster.py): mbarriers
// with remote arrives, st.async with transaction counts, the split cluster barrier and race
// detection across a cluster's CTAs (distributed shared memory). Each kernel has one correct
// form (mode 0) and planted hazards (mode > 0), through the same primitives the topk kernels
// use (csrc/topk/topk_cluster.cuh).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "topk/topk_cluster.cuh"

namespace {
namespace cs = dsa::topk::csync;

struct Shared {
  alignas(8) uint64_t bar[3];  // pushes, data ready, done reading
  uint32_t inbox[16][2];  // st.async slots, one per sending rank
  uint32_t data[64];      // read by peers through map_shared_rank
};

// Every CTA pushes (rank, value) to every peer by st.async (8 bytes each, tx on the peer's
// bar[0]) and signals bar[1] of every peer by a remote arrive after writing data[]; each CTA
// waits for both, then sums the pushed values and the peers' data[] (DSMEM reads).
// out[rank] = sum over peers of their value, out[cs + rank] = sum of the peers' data[0].
// mode 1: expect one push fewer (tx-count underflow); 2: one push more (never completes);
// 3: no fence.mbarrier_init / cluster barrier before peers use the barriers;
// 4: read the inbox before the wait (race with the st.async); 5: read peers' data[] with no
// signal at all (race); 6: remote arrive at .cta scope (orders nothing: reported);
// 7: bar[1] expects one arrival more than ever come (wait never completes);
// 8: the cluster barrier arrive is .relaxed and data[] is read after it (race).
__global__ void push_pull(const uint32_t* vals, uint32_t* out, int mode) {
  DSA_STATIC_SMEM(Shared, sh);
  const unsigned n = cooperative_groups::this_cluster().num_blocks();
  const unsigned rank = cooperative_groups::this_cluster().block_rank();
  const int tid = threadIdx.x;
  const uint32_t bar0 = cs::smem_addr(&sh.bar[0]), bar1 = cs::smem_addr(&sh.bar[1]), bar2 = cs::smem_addr(&sh.bar[2]);
  if (tid == 0) {
    cs::mbar_init(bar0, 1);
    cs::mbar_init(bar1, mode == 7 ? n + 1 : n);
    cs::mbar_init(bar2, n);
    if (mode != 3) cs::fence_mbar_init();
  }
  for (int i = tid; i < 64; i += blockDim.x) sh.data[i] = rank * 1000 + i;
  __syncthreads();
  if (mode != 3) {
    if (mode == 8) {
      cs::cluster_arrive_relaxed();
      cs::cluster_wait();
      if (tid == 0 && n > 1) out[2 * n + rank] = *cooperative_groups::this_cluster().map_shared_rank(&sh.data[1], (rank + 1) % n);
    }
    cs::cluster_arrive_relaxed();
    cs::cluster_wait();
  }
  if (mode == 5 && tid == 0 && n > 1) out[2 * n + rank] = *cooperative_groups::this_cluster().map_shared_rank(&sh.data[0], (rank + 1) % n);
  if (tid == 0) {
    const int pushes = static_cast<int>(n) - 1 + (mode == 2 ? 1 : 0) - (mode == 1 ? 1 : 0);
    cs::arrive_expect_tx(bar0, 8u * static_cast<uint32_t>(pushes));
  }
  if (tid < static_cast<int>(n) && tid != static_cast<int>(rank)) {
    const uint32_t r = static_cast<uint32_t>(tid);
    cs::st_async_v2(cs::mapa(cs::smem_addr(&sh.inbox[rank][0]), r), rank, vals[rank], cs::mapa(bar0, r));
    if (mode == 6) emu::ptx::mbarrier_arrive_cluster_cta_scope(cs::mapa(bar1, r));
    else cs::arrive_remote(cs::mapa(bar1, r));
  }
  if (tid == static_cast<int>(rank)) cs::arrive_remote(cs::mapa(bar1, rank));
  if (mode == 4 && tid == 0 && n > 1) out[2 * n + rank] = sh.inbox[(rank + 1) % n][1];
  cs::wait_cluster(bar0, 0);
  cs::wait_cluster(bar1, 0);
  if (tid == 0) {
    uint32_t a = 0, b = 0;
    for (unsigned r = 0; r < n; ++r) {
      if (r == rank) continue;
      a += sh.inbox[r][1];
      b += *cooperative_groups::this_cluster().map_shared_rank(&sh.data[0], r);
    }
    out[rank] = a;
    out[n + rank] = b;
  }
  // Nobody may exit while a peer still reads its data[]: a last round of remote arrives, after
  // the reads, on a barrier of its own (a peer may still be in bar[1]'s first phase).
  __syncthreads();
  if (tid < static_cast<int>(n)) cs::arrive_remote(cs::mapa(bar2, tid));
  cs::wait_cluster(bar2, 0);
}

}  // namespace

extern "C" int emu_cluster_push_pull(const uint32_t* vals, uint32_t* out, int clusters, int n, int threads, int mode) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(clusters * n);
  cfg.blockDim = dim3(threads);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = n;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (n > 8) cudaFuncSetAttribute(push_pull, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  return cudaLaunchKernelEx(&cfg, push_pull, vals, out, mode);
}
