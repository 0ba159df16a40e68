// Host emulation of the CUDA subset topk_kernels.cuh uses (tests only; see topk_emulate.cpp).
// One std::thread per CUDA thread; barriers and warp exchanges are implemented by the harness.
#pragma once
#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(a, b)
#define __align__(n) alignas(n)

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
extern thread_local EmulatedDim3 threadIdx, blockIdx;
extern EmulatedDim3 blockDim, gridDim;

struct float4 { float x, y, z, w; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
struct alignas(8) uint2 { uint32_t x, y; };
inline uint4 make_uint4(uint32_t a, uint32_t b, uint32_t c, uint32_t d) { return {a, b, c, d}; }
inline uint2 make_uint2(uint32_t a, uint32_t b) { return {a, b}; }
template <class T>
inline T __ldg(const T* p) { return *p; }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }
inline int __popc(uint32_t v) { return std::popcount(v); }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline uint32_t atomicAdd(uint32_t* p, uint32_t v) { return std::atomic_ref<uint32_t>(*p).fetch_add(v); }
void __syncthreads();
uint32_t __shfl_down_sync(unsigned mask, uint32_t v, int off);
uint32_t __ballot_sync(unsigned mask, bool pred);

namespace dsa {
template <typename T>
constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }
}  // namespace dsa
