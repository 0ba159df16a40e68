// Async-copy primitives of the decode kernel that zero invalid records without reading them
// (the tensor-core primitives are csrc/common/mma_sm80.cuh). Torch-free.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/mma_sm80.cuh"

namespace dsa::mla_decode {

// 16-byte global->shared copy that bypasses L1. Without `read` nothing is read (src may be
// anything, unlike cp_async_16_zfill) and the destination is zeroed by an ordinary store,
// visible to this thread after cp_async_wait<0> and to others after the next barrier, like the copy.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool read) {
  if (read)
    dsa::cp_async_16(smem_u32(dst), src);
  else
    *static_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool read) {
  if (read)
    dsa::cp_async_4(smem_u32(dst), src);
  else
    *static_cast<uint32_t*>(dst) = 0u;
}

}  // namespace dsa::mla_decode
