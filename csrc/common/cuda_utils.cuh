// Torch-free helpers for kernels and launchers.
#pragma once
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

// The CTA's dynamic shared memory as `uint8_t* name`, aligned to `align` bytes, and a static
// shared object `Type& name`. Plain `__shared__` is not used: the CPU emulator (csrc/emu) must
// give every CTA its own copy (also when a cluster's CTAs run together) and know every shared
// byte a CTA owns; under it both come from the CTA's emulated shared window.
#if defined(DSA_EMULATOR)
#define DSA_DYNAMIC_SMEM(name, align) uint8_t* const name = ::emu::dynamic_smem()
#define DSA_STATIC_SMEM(Type, name)                                                           \
  Type& name = *reinterpret_cast<Type*>(::emu::static_smem(sizeof(Type), alignof(Type), \
                                                             __FILE__ ":" DSA_STRINGIFY(__LINE__)))
#define DSA_STRINGIFY_(x) #x
#define DSA_STRINGIFY(x) DSA_STRINGIFY_(x)
#else
#define DSA_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) uint8_t name[]
#define DSA_STATIC_SMEM(Type, name) __shared__ Type name
#endif

namespace dsa {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

// Launchers return the launch status; the .cpp glue turns it into an exception.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

// SMs of the current device, for sizing grids (132, an H100's, if the query fails).
inline int current_device_sm_count() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
    n = 132;
  return n;
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) before every launch is a driver call on the
// launch path of every op; the attribute belongs to the function on the current device, so it
// is set once per (kernel, device, size) and remembered (a larger size later sets it again).
// Kernel is a template argument so that each kernel has its own record.
template <auto Kernel>
cudaError_t ensure_max_dynamic_smem(int bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> set_bytes[kMaxDevices];   // 0: never set on that device
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && set_bytes[dev].load(std::memory_order_acquire) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cached) {
    int seen = set_bytes[dev].load(std::memory_order_relaxed);
    while (seen < bytes && !set_bytes[dev].compare_exchange_weak(seen, bytes)) {
    }
  }
  return err;
}

}  // namespace dsa
