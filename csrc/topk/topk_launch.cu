// topk family: torch-free launchers.
//
// Cluster synchronisation of topk_radix_kernel (topk_kernels.cuh, SyncMode): the environment
// variable DSA_TOPK_SYNC, read at every launch, selects it —
//   DSA_TOPK_SYNC=mbarrier  point-to-point mbarrier / st.async signalling (the default on
//                           sm_90+, where clusters exist);
//   DSA_TOPK_SYNC=cluster   the previous kernel: a full cluster barrier after every pass.
// Below sm_90 both are the same single-CTA kernel. Results are identical (bit for bit: the
// selection and the tie order do not depend on the synchronisation), so a first GPU run can
// time both (dsa_ext/bench/topk.py --sync).
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common/cuda_utils.cuh"
#include "common/loaded_image.cuh"
#include "topk/topk_kernels.cuh"
#include "topk/topk_launch.h"

namespace dsa {

namespace {

struct DeviceInfo {
  int sms = 1;
  int major = 0;   // clusters' stand-in below: 9 where they exist, 8 where not
  int max_cs = 1;  // largest cluster size used on this device
  int max_cache_keys = topk::kMaxCacheKeys;   // what this device's per-block shared memory holds
  std::atomic<bool> ready{false};
};

using RadixKernel = void (*)(const topk::TopkParams);
constexpr RadixKernel kRadixKernels[2] = {topk::topk_radix_kernel<topk::SyncMode::kCluster>,
                                          topk::topk_radix_kernel<topk::SyncMode::kMbarrier>};

// The synchronisation DSA_TOPK_SYNC asks for ("cluster" or "mbarrier"; anything else, unset
// included, is the default).
topk::SyncMode sync_mode(int major) {
  const char* v = std::getenv("DSA_TOPK_SYNC");
  if (v && !std::strcmp(v, "cluster")) return topk::SyncMode::kCluster;
  if (v && !std::strcmp(v, "mbarrier")) return topk::SyncMode::kMbarrier;
  return major >= 9 ? topk::SyncMode::kMbarrier : topk::SyncMode::kCluster;
}

// CTAs per row: enough that a row's slice fits the shared-memory key cache, and, for few rows,
// enough to spread the rows over the SMs (slices of at least 2048 columns). Cluster sizes above
// the portable 8 are used only where the device reports it can place such a cluster.
int choose_cluster_size(int64_t T, int64_t S, const DeviceInfo& info, int max_cs) {
  if (info.major < 9) return 1;  // clusters are sm_90+
  int cs = 1;
  while (cs < max_cs && ceil_div<int64_t>(S, cs) > info.max_cache_keys) cs *= 2;
  while (cs < max_cs && T * cs < 2 * info.sms && ceil_div<int64_t>(S, 2 * cs) >= 2048) cs *= 2;
  return cs;
}

// Largest cluster size (16, 8, ..., 1) the device can place with topk_radix_kernel at `smem`
// bytes per CTA. The portable 8 is not taken on trust either: a partitioned device (MIG, MPS
// SM limits) may report no room for it, and a launch would then fail with a cluster error.
// Cluster size 1 always works (the kernel is exact for any cs; larger clusters only add SMs
// per row and shared-memory key cache).
// Both synchronisation modes have the same footprint (static TopkShared, dynamic key cache)
// and block size, so the answer for one holds for the other.
int max_cluster_size(size_t smem) {
  int cs = topk::kMaxCluster;
  for (RadixKernel kern : kRadixKernels)
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
      (void)cudaGetLastError();
      cs = topk::kPortableCluster;
    }
  for (; cs > 1; cs /= 2) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(cs);
    cfg.blockDim = dim3(topk::kBlock);
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cs;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kRadixKernels[1], &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      continue;
    }
    if (clusters > 0) break;
  }
  return cs;
}

// Bytes of dynamic shared memory for a slice of `slice` columns: the TopkShared state, then
// the key cache (+3 words of alignment slack), which CTA 0 reuses for the sort of up to
// kMaxSortK selected pairs.
constexpr size_t smem_for(int64_t slice, int k, bool sorted, int64_t max_keys = topk::kMaxCacheKeys) {
  int sort_pairs = 1;
  while (sort_pairs < k) sort_pairs <<= 1;
  const int64_t keys = std::min<int64_t>(slice, max_keys);
  return std::max<size_t>(size_t(keys + 4) * sizeof(uint32_t), sorted ? size_t(sort_pairs) * sizeof(uint64_t) : 0);
}
// __launch_bounds__(kBlock, 2): two CTAs of the largest footprint share an SM (228 KB of
// shared memory per SM on sm_90, 1 KB of it reserved per CTA).
static_assert(2 * (smem_for(topk::kMaxCacheKeys, topk::kMaxSortK, true) + topk::kSharedStateBytes + 1024) <= 228 * 1024,
              "two topk_radix_kernel CTAs per SM");

// Per device, once: SM count, architecture, the kernel's shared-memory limit raised to the
// largest footprint, and whether 16-CTA clusters fit (kernel attributes persist; concurrent
// first calls repeat the same idempotent work).
cudaError_t device_info(DeviceInfo*& out) {
  static DeviceInfo table[64];
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  DeviceInfo& info = table[dev & 63];
  out = &info;
  if (info.ready.load(std::memory_order_acquire)) return cudaSuccess;
  err = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  // Clusters need cluster code in the image the driver loaded too (an "8.0+PTX" build on an
  // H100 runs compute_80 code: cluster_size() is 1 there, and a cluster launch would give each
  // CTA a row of its own, past the last row).
  bool clusters = false;
  err = loaded_image_has_clusters(&clusters);
  if (err != cudaSuccess) return err;
  if (!clusters && info.major >= 9) info.major = 8;
  // sm_86 / sm_89 blocks get 99 KB of shared memory (sm_80 163 KB, sm_90 227 KB): a smaller key
  // cache there (rows whose slice exceeds it stream from global memory, as they do anyway).
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  const int64_t fit = (static_cast<int64_t>(optin) - static_cast<int64_t>(topk::kSharedStateBytes)) /
                          static_cast<int64_t>(sizeof(uint32_t)) - 4;
  info.max_cache_keys = static_cast<int>(std::min<int64_t>(topk::kMaxCacheKeys, fit));
  if (smem_for(info.max_cache_keys, topk::kMaxSortK, true, info.max_cache_keys) + topk::kSharedStateBytes >
      static_cast<size_t>(optin))
    return cudaErrorInvalidConfiguration;   // not even the sort buffer fits (no such GPU is served)
  const size_t max_smem = smem_for(info.max_cache_keys, topk::kMaxSortK, true, info.max_cache_keys);
  for (RadixKernel kern : kRadixKernels) {
    err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(max_smem));
    if (err != cudaSuccess) return err;
  }
  info.max_cs = info.major >= 9 ? max_cluster_size(max_smem) : 1;
  info.ready.store(true, std::memory_order_release);
  return cudaSuccess;
}

}  // namespace

cudaError_t topk_indices_launch(const float* logits, int64_t T, int64_t S, int64_t row_stride,
                                const int32_t* ks, const int32_t* ke, int k, bool sorted,
                                int32_t* out, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (k < 1 || k > topk::kMaxSortK) return cudaErrorInvalidValue;
  DeviceInfo* info = nullptr;
  cudaError_t err = device_info(info);
  if (err != cudaSuccess) return err;
  const int cs = choose_cluster_size(T, S, *info, info->max_cs);
  if (T > (int64_t(INT32_MAX) / cs)) return cudaErrorInvalidConfiguration;

  topk::TopkParams p;
  p.logits = logits;
  p.row_stride = row_stride;
  p.S = S;
  p.ks = ks;
  p.ke = ke;
  p.out = out;
  p.k = k;
  p.sorted = sorted;
  p.cache_keys = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(S, cs), info->max_cache_keys));
  const size_t smem = smem_for(ceil_div<int64_t>(S, cs), k, sorted, info->max_cache_keys);

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(T * cs));
  cfg.blockDim = dim3(topk::kBlock);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  cfg.numAttrs = 0;
  if (info->major >= 9) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cs);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  err = cudaLaunchKernelEx(&cfg, kRadixKernels[static_cast<int>(sync_mode(info->major))], p);
  if (err != cudaSuccess) return err;
  return last_launch_error();
}

cudaError_t topk_slot_ids_launch(const int32_t* indices, int64_t R, int64_t K,
                                 const int32_t* block_table, int64_t B, int64_t M,
                                 int64_t block_size, int32_t* out, cudaStream_t stream) {
  const int64_t total = R * K;
  if (total == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(total, kThreads), 65536);
  topk::topk_slot_ids_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      indices, R, K, block_table, M, R / B, block_size, out);
  return last_launch_error();
}

}  // namespace dsa
