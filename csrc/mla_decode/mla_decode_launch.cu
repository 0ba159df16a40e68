// sparse_mla_decode: torch-free host launchers (split plan, kernel choice, combine).
#include "common/cuda_utils.cuh"
#include "common/loaded_image.cuh"
#include "mla_decode/mla_decode_kernels.cuh"
#include "mla_decode/mla_decode_launch.h"
#include "mla_decode/mla_decode_overlap.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace dsa::mla_decode {

namespace {

// Heads per CTA: 64 shares each dequantised tile widely; fewer heads (TP shards) use a
// smaller block rather than padding (rows past H are masked inside the kernel).
int head_block(int64_t heads) { return heads >= 64 ? 64 : (heads > 16 ? 32 : 16); }

template <int HB, class F, bool kWgmma>
cudaError_t launch_main(const DecodeParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = DecodeSmem<HB, F>::kBytes;
  static_assert(kSmem <= 227 * 1024, "dynamic shared memory beyond an H100 SM's 227 KB");
  auto kernel = sparse_mla_decode_kernel<HB, F, kWgmma>;
  cudaError_t err = ensure_max_dynamic_smem<sparse_mla_decode_kernel<HB, F, kWgmma>>(int(kSmem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(p.batch * p.s_q), static_cast<unsigned>(ceil_div<int64_t>(p.heads, HB)),
                  static_cast<unsigned>(p.plan.num_splits));
  kernel<<<grid, kThreads, kSmem, stream>>>(p);
  return cudaGetLastError();
}

// The cache format (layout kind x d_qk) picks the instantiation: V3.2 FP8 / bf16 576 (d_qk 576),
// V4 FP8 / bf16 512 (d_qk 512). Every one also serves the second list (SPEC 10.3).
template <int HB, bool kWgmma = false>
cudaError_t launch_main_for_cache(const DecodeParams& p, cudaStream_t stream) {
  switch (p.layout.kind) {
    case cache::MlaCacheKind::kV32Fp8: return launch_main<HB, FmtV32Fp8, kWgmma>(p, stream);
    case cache::MlaCacheKind::kV4Fp8: return launch_main<HB, FmtV4Fp8, kWgmma>(p, stream);
    default:
      return p.layout.dim == 512 ? launch_main<HB, FmtBf16x512, kWgmma>(p, stream)
                                 : launch_main<HB, FmtBf16x576, kWgmma>(p, stream);
  }
}

// The overlap kernel (mla_decode_overlap.cuh): a 2-CTA cluster per row for H = 128 (the two
// head blocks share the dequantisation), one CTA for H = 64. Grid x = row * CTAs per row.
template <bool kPair>
cudaError_t launch_overlap(const DecodeParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = overlap::Smem::kBytes;
  auto kernel = overlap::sparse_mla_decode_overlap_kernel<kPair>;
  cudaError_t err = ensure_max_dynamic_smem<overlap::sparse_mla_decode_overlap_kernel<kPair>>(int(kSmem));
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(p.batch * p.s_q * (kPair ? 2 : 1)), static_cast<unsigned>(p.plan.num_splits));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = kPair ? 2 : 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = kPair ? 1 : 0;
  err = cudaLaunchKernelEx(&cfg, kernel, p);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// DSA_MLA_DECODE_KERNEL = overlap | wgmma | mma (unset: overlap where it applies, else mma;
// DSA_MLA_DECODE_WGMMA=1 still selects wgmma). The overlap kernel applies to FP8 caches with
// H = 64 or 128 on a cc 9 device running this unit's sm_90a image; other shapes take the
// kernels of mla_decode_kernels.cuh. An explicit "overlap" on Hopper without the sm_90a image
// is cudaErrorNoKernelImageForDevice (as the wgmma opt-in), not a silent fallback.
const char* kernel_env() {
  const char* v = std::getenv("DSA_MLA_DECODE_KERNEL");
  return v != nullptr ? v : "";
}

cudaError_t overlap_selected(const DecodeParams& p, bool* use) {
  *use = false;
  const char* env = kernel_env();
  const bool asked = std::strcmp(env, "overlap") == 0;
  if (!asked && (*env != '\0' || p.use_wgmma)) return cudaSuccess;
  if (!p.fp8_cache || (p.heads != 64 && p.heads != 128)) return cudaSuccess;
  // The overlap kernel reads V3.2 656-byte records over one list; V4 caches (d_qk 512) and a
  // second list (extra_kv_cache) take the templated kernels.
  if (p.layout.kind != cache::MlaCacheKind::kV32Fp8 || p.extra_kv_cache != nullptr) return cudaSuccess;
  int dev = 0;
  const cudaError_t err = cudaGetDevice(&dev);
  return err == cudaSuccess ? sm90a_kernel_usable(dev, asked, use) : err;
}

}  // namespace

SplitPlan plan_splits(int64_t batch, int64_t s_q, int64_t heads, int64_t topk, int num_sms) {
  const int64_t tiles = std::max<int64_t>(ceil_div<int64_t>(topk, kTokensPerTile), 1);
  const int64_t ctas = batch * s_q * ceil_div<int64_t>(heads, head_block(heads));
  int64_t splits = 1;
  if (ctas > 0 && 2 * ctas <= num_sms) {
    // As many splits as fit in one wave (one CTA per SM), but at least 2 tiles per split so the
    // fp32 partials and the combine stay cheap next to the main kernel.
    constexpr int64_t kMinTilesPerSplit = 2, kMaxSplits = 64;
    splits = std::max<int64_t>(1, std::min({num_sms / ctas, tiles / kMinTilesPerSplit, kMaxSplits}));
  }
  const int64_t per_split = ceil_div<int64_t>(tiles, splits);
  return SplitPlan{static_cast<int>(ceil_div<int64_t>(tiles, per_split)), static_cast<int>(per_split)};
}

SplitPlan plan_decode_splits(int64_t batch, int64_t s_q, int64_t heads, int64_t topk, int64_t extra_topk,
                             int num_sms) {
  const int64_t tiles = ceil_div<int64_t>(topk, kTokensPerTile) + ceil_div<int64_t>(extra_topk, kTokensPerTile);
  return plan_splits(batch, s_q, heads, tiles * kTokensPerTile, num_sms);
}

cudaError_t wgmma_opted_in(int device, bool* use_wgmma) {
  if (std::strcmp(kernel_env(), "wgmma") == 0) {   // the same decision under the newer switch
    *use_wgmma = false;
    int major = 0;
    cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (err != cudaSuccess || major != 9) return err;
    err = require_loaded_image(ImageLevel::kSm90a);
    *use_wgmma = err == cudaSuccess;
    return err;
  }
  return sm90a_wgmma_opted_in("DSA_MLA_DECODE_WGMMA", device, use_wgmma);
}

cudaError_t launch_sparse_mla_decode(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch * p.s_q == 0 || p.heads == 0) return cudaSuccess;
  bool use_overlap = false;
  cudaError_t err = overlap_selected(p, &use_overlap);
  if (err != cudaSuccess) return err;
  if (use_overlap) {
    err = p.heads == 128 ? launch_overlap<true>(p, stream) : launch_overlap<false>(p, stream);
  } else switch (head_block(p.heads)) {
    case 64:
      err = p.use_wgmma ? launch_main_for_cache<64, true>(p, stream) : launch_main_for_cache<64>(p, stream);
      break;
    case 32: err = launch_main_for_cache<32>(p, stream); break;
    default: err = launch_main_for_cache<16>(p, stream); break;
  }
  if (err != cudaSuccess || p.plan.num_splits <= 1) return err;
  sparse_mla_decode_combine_kernel<<<static_cast<unsigned>(p.batch * p.s_q * p.heads), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dsa::mla_decode
