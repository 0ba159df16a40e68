// topk family: torch-free launchers.
#include <algorithm>

#include "common/cuda_utils.cuh"
#include "topk/topk_kernels.cuh"
#include "topk/topk_launch.h"

namespace dsa {

namespace {

struct DeviceInfo {
  int device = 0;
  int sms = 1;
  int major = 0;
};

cudaError_t device_info(DeviceInfo& info) {
  cudaError_t err = cudaGetDevice(&info.device);
  if (err != cudaSuccess) return err;
  const int dev = info.device;
  err = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, dev);
}

// CTAs per row: enough that a row's slice fits the shared-memory key cache, and, for few rows,
// enough to spread the rows over the SMs (slices of at least 2048 columns). Cluster sizes above
// the portable 8 are used only where the device reports it can place such a cluster.
int choose_cluster_size(int64_t T, int64_t S, const DeviceInfo& info, int max_cs) {
  if (info.major < 9) return 1;  // clusters are sm_90+
  int cs = 1;
  while (cs < max_cs && ceil_div<int64_t>(S, cs) > topk::kMaxCacheKeys) cs *= 2;
  while (cs < max_cs && T * cs < 2 * info.sms && ceil_div<int64_t>(S, 2 * cs) >= 2048) cs *= 2;
  return cs;
}

// Largest cluster size (8 or 16) the device can run topk_radix_kernel with at `smem` bytes.
int max_cluster_size(size_t smem) {
  if (cudaFuncSetAttribute(topk::topk_radix_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) !=
      cudaSuccess) {
    (void)cudaGetLastError();
    return topk::kPortableCluster;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(topk::kMaxCluster);
  cfg.blockDim = dim3(topk::kBlock);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = topk::kMaxCluster;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, topk::topk_radix_kernel, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return topk::kPortableCluster;
  }
  return clusters > 0 ? topk::kMaxCluster : topk::kPortableCluster;
}

}  // namespace

cudaError_t topk_indices_launch(const float* logits, int64_t T, int64_t S, int64_t row_stride,
                                const int32_t* ks, const int32_t* ke, int k, bool sorted,
                                int32_t* out, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (k < 1 || k > topk::kMaxSortK) return cudaErrorInvalidValue;
  DeviceInfo info;
  cudaError_t err = device_info(info);
  if (err != cudaSuccess) return err;
  int sort_pairs = 1;
  while (sort_pairs < k) sort_pairs <<= 1;
  // Shared memory for a slice of `slice` columns: the key cache (+3 words of alignment
  // slack), which CTA 0 reuses for the sort of the selected pairs.
  auto smem_for = [&](int64_t slice) {
    const int64_t keys = std::min<int64_t>(slice, topk::kMaxCacheKeys);
    return std::max<size_t>(size_t(keys + 4) * sizeof(uint32_t),
                            sorted ? size_t(sort_pairs) * sizeof(uint64_t) : 0);
  };
  // Once per device: allow the largest shared-memory footprint, and learn whether 16-CTA
  // clusters fit (kernel attributes persist; a concurrent first call repeats the same work).
  static int max_cs_of_device[64] = {};
  int& max_cs = max_cs_of_device[info.device & 63];
  if (max_cs == 0) {
    err = cudaFuncSetAttribute(topk::topk_radix_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem_for(topk::kMaxCacheKeys)));
    if (err != cudaSuccess) return err;
    max_cs = info.major >= 9 ? max_cluster_size(smem_for(topk::kMaxCacheKeys)) : 1;
  }
  const int cs = choose_cluster_size(T, S, info, max_cs);
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
  p.cache_keys = static_cast<int>(std::min<int64_t>(ceil_div<int64_t>(S, cs), topk::kMaxCacheKeys));
  const size_t smem = smem_for(ceil_div<int64_t>(S, cs));

  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(T * cs));
  cfg.blockDim = dim3(topk::kBlock);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  cfg.numAttrs = 0;
  if (info.major >= 9) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cs);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  err = cudaLaunchKernelEx(&cfg, topk::topk_radix_kernel, p);
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
