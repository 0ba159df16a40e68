#include "compress/compress_kernels.cuh"
#include "compress/compress_launch.h"

namespace dsa {
namespace {

// compress_entry's shared memory: the pooled entry and one partial sum per warp.
size_t entry_smem_bytes(int d) {
  return (static_cast<size_t>(d) + kCompressThreads / 32) * sizeof(float);
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

}  // namespace

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
  const size_t smem = entry_smem_bytes(d);
  const cudaError_t err = allow_smem(v4_compress_kernel, smem);
  if (err != cudaSuccess) return err;
  v4_compress_kernel<<<static_cast<unsigned>(entries), kCompressThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_v4_compress_step(const float* kv, const float* score, const float* ape,
                                    const float* norm_weight, float eps, const float* rope_cos,
                                    const float* rope_sin, int64_t rope_rows,
                                    const int32_t* positions, float* kv_state,
                                    float* score_state, int64_t batch, int d, int c, int ratio,
                                    void* out, cudaStream_t stream) {
  if (d < 2 * kCompressRopePairs || d % 2 != 0 || (c != 1 && c != 2) || ratio < 1 ||
      batch > 0x7fffffffLL)
    return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  CompressStepParams p{kv, score, ape, norm_weight, rope_cos, rope_sin, positions, kv_state,
                       score_state, static_cast<__nv_bfloat16*>(out), rope_rows, d, c, ratio, eps};
  const size_t smem = entry_smem_bytes(d);
  const cudaError_t err = allow_smem(v4_compress_step_kernel, smem);
  if (err != cudaSuccess) return err;
  v4_compress_step_kernel<<<static_cast<unsigned>(batch), kCompressThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dsa
