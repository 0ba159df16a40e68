#include "compress/compress_kernels.cuh"
#include "compress/compress_launch.h"

namespace dsa {

cudaError_t launch_v4_compress(const float* kv, const float* score, const float* ape,
                               const float* norm_weight, float eps, const float* rope_cos,
                               const float* rope_sin, const int32_t* cu_seqlens,
                               const int64_t* entry_offsets, int64_t batch, int64_t entries,
                               int d, int c, int ratio, void* out, cudaStream_t stream) {
  if (d < 2 * kCompressRopePairs || d % 2 != 0 || (c != 1 && c != 2) || ratio < 1 ||
      (cu_seqlens != nullptr && (entry_offsets == nullptr || batch < 1)) ||
      entries > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  if (entries == 0) return cudaSuccess;
  CompressParams p{kv, score, ape, norm_weight, rope_cos, rope_sin, cu_seqlens, entry_offsets,
                   static_cast<__nv_bfloat16*>(out), batch, d, c, ratio, eps};
  const size_t smem = (static_cast<size_t>(d) + kCompressThreads / 32) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        v4_compress_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  v4_compress_kernel<<<static_cast<unsigned>(entries), kCompressThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dsa
