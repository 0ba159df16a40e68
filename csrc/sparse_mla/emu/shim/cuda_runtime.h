// CPU emulation shim (see ../README): the CUDA built-ins the sparse_mla kernels use.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n)

struct EmuDim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint4 { uint32_t x, y, z, w; };
inline float2 make_float2(float a, float b) { return {a, b}; }

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>** warp_barriers = nullptr;
inline uint8_t* smem_base = nullptr;
// Per-warp exchange slots for collectives: [warp][lane][8 words].
inline uint32_t (*xchg)[32][8] = nullptr;
inline void warp_sync() { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }
inline uint32_t* my_slot() { return xchg[threadIdx.x / 32][threadIdx.x % 32]; }
inline uint32_t* lane_slot(int lane) { return xchg[threadIdx.x / 32][lane]; }
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int off) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  emu::warp_sync();
  emu::my_slot()[0] = bits;
  emu::warp_sync();
  uint32_t o = emu::lane_slot((threadIdx.x % 32) ^ off)[0];
  emu::warp_sync();
  float r;
  std::memcpy(&r, &o, 4);
  return r;
}

template <typename T> inline T __ldg(const T* p) { return *p; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }

enum cudaError_t { cudaSuccess = 0 };
typedef void* cudaStream_t;
