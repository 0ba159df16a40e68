// Torch-free helpers for kernels and launchers.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

// The CTA's dynamic shared memory as `uint8_t* name`, aligned to `align` bytes. All shared
// memory of this project is dynamic (no static __shared__): the CPU emulator (csrc/emu) then
// knows every shared byte a CTA owns, per CTA, also when a cluster's CTAs run together.
#if defined(DSA_EMULATOR)
#define DSA_DYNAMIC_SMEM(name, align) uint8_t* const name = ::emu::dynamic_smem()
#else
#define DSA_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) uint8_t name[]
#endif

namespace dsa {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// Launchers return the launch status; the .cpp glue turns it into an exception.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

}  // namespace dsa
