// Host stand-in for <cuda_runtime.h> under the emulator (csrc/emu/emu.h): the CUDA C++
// built-ins our kernels and launchers use, each routed through the emulator runtime so that
// thread identity, barriers, warp collectives, atomics and launches behave as on the device.
// The emulator plays an H100 SXM (sm_90a, 132 SMs, 227 KB opt-in shared memory per CTA).
#pragma once
#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstdlib>
#include <string>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu/emu.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict
#define __constant__
// Shared memory is declared with DSA_DYNAMIC_SMEM / DSA_STATIC_SMEM (common/cuda_utils.cuh):
// a plain __shared__ variable would be one object for every CTA on the host, so it is refused.
#define __shared__ static_assert(false, "plain __shared__ is not emulated: use DSA_DYNAMIC_SMEM / DSA_STATIC_SMEM");

// ---- vector types ----------------------------------------------------------------------------
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(emu::Dim3 d) : x(d.x), y(d.y), z(d.z) {}
  constexpr operator emu::Dim3() const { return {x, y, z}; }
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) ulonglong2 { unsigned long long x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline int2 make_int2(int a, int b) { return {a, b}; }
inline int4 make_int4(int a, int b, int c, int d) { return {a, b, c, d}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

// ---- thread identity: plain globals that the scheduler sets before it resumes a thread
// (runtime.cpp), so kernel code reads them as on the device, including `cfg.blockDim` members.
extern const emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;
constexpr int warpSize = 32;

// ---- barriers and warp collectives (CUDA C++ guide, "Warp Shuffle Functions"; PTX 9.7.8.6
// shfl.sync, 9.7.13.4 bar.sync, 9.7.13.9 vote.sync) -----------------------------------------
inline void __syncthreads() { emu::bar_sync(0, 0); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  // A warp barrier over `mask` that also orders memory between its lanes.
  uint32_t none = 0;
  emu::collective("syncwarp", 32, mask, &none, 1, &none, 1, [](const uint32_t*, uint32_t*, int) {});
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __nanosleep(unsigned) { emu::yield(); }
[[noreturn]] inline void __trap() { emu::trap("kernel called __trap"); }

namespace emu_detail {
enum class Shfl { kIdx, kUp, kDown, kXor };
template <typename T>
T shfl(const char* op, Shfl kind, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "shuffle of 4- or 8-byte values");
  constexpr int W = sizeof(T) / 4;
  uint32_t in[W + 2], out[W];
  std::memcpy(in, &v, sizeof(T));
  in[W] = static_cast<uint32_t>(arg);
  in[W + 1] = static_cast<uint32_t>(width);
  emu::collective(op, 32, mask, in, W + 2, out, W, [kind, mask](const uint32_t* i, uint32_t* o, int) {
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      const uint32_t* me = i + l * (W + 2);
      const int a = static_cast<int>(me[W]), w = static_cast<int>(me[W + 1]);
      const int seg = l & ~(w - 1), pos = l & (w - 1);
      int src = l;
      switch (kind) {
        case Shfl::kIdx: src = seg + (a & (w - 1)); break;
        case Shfl::kUp: src = pos - a >= 0 ? l - a : l; break;
        case Shfl::kDown: src = pos + a < w ? l + a : l; break;
        case Shfl::kXor: src = (l ^ a) < seg + w && (l ^ a) >= seg ? (l ^ a) : l; break;
      }
      if (!(mask >> src & 1u)) {
        emu::report("divergent-collective", "shuffle reads a lane outside its member mask");
        src = l;
      }
      std::memcpy(o + l * W, i + src * (W + 2), 4 * W);
    }
  });
  T r;
  std::memcpy(&r, out, sizeof(T));
  return r;
}
inline uint32_t vote(const char* op, unsigned mask, bool pred) {
  uint32_t in = pred, out = 0;
  emu::collective(op, 32, mask, &in, 1, &out, 1, [mask](const uint32_t* i, uint32_t* o, int) {
    uint32_t b = 0;
    for (int l = 0; l < 32; ++l)
      if ((mask >> l & 1u) && i[l]) b |= 1u << l;
    for (int l = 0; l < 32; ++l) o[l] = b;
  });
  return out;
}
}  // namespace emu_detail

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return emu_detail::shfl("shfl.idx", emu_detail::Shfl::kIdx, mask, v, src, width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu_detail::shfl("shfl.up", emu_detail::Shfl::kUp, mask, v, static_cast<int>(d), width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
  return emu_detail::shfl("shfl.down", emu_detail::Shfl::kDown, mask, v, static_cast<int>(d), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu_detail::shfl("shfl.bfly", emu_detail::Shfl::kXor, mask, v, lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu_detail::vote("vote.ballot", mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return emu_detail::vote("vote.any", mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  return emu_detail::vote("vote.all", mask, pred != 0) == (mask & emu_detail::vote("vote.all.m", mask, true));
}
inline unsigned __activemask() { return 0xffffffffu; }

// ---- atomics (PTX 9.7.12.5): in the runtime, so they are exempt from race checks among
// themselves and bounds-checked -------------------------------------------------------------
namespace emu_detail {
template <typename T>
T atom(T* p, const char* op, T v, T cmp = T{}) {
  if constexpr (sizeof(T) == 4) {
    uint32_t vb, cb;
    std::memcpy(&vb, &v, 4);
    std::memcpy(&cb, &cmp, 4);
    const uint32_t r = emu::atomic32(p, op, vb, cb, std::is_floating_point_v<T>, std::is_signed_v<T>);
    T out;
    std::memcpy(&out, &r, 4);
    return out;
  } else {
    static_assert(sizeof(T) == 8, "4- or 8-byte atomics");
    uint64_t vb, cb;
    std::memcpy(&vb, &v, 8);
    std::memcpy(&cb, &cmp, 8);
    const uint64_t r = emu::atomic64(p, op, vb, cb, std::is_floating_point_v<T>);
    T out;
    std::memcpy(&out, &r, 8);
    return out;
  }
}
}  // namespace emu_detail
template <typename T> T atomicAdd(T* p, T v) { return emu_detail::atom(p, "add", v); }
inline float2 atomicAdd(float2* p, float2 v) {  // sm_90 vector atomic: two independent adds
  return {emu_detail::atom(&p->x, "add", v.x), emu_detail::atom(&p->y, "add", v.y)};
}
template <typename T> T atomicMax(T* p, T v) { return emu_detail::atom(p, "max", v); }
template <typename T> T atomicMin(T* p, T v) { return emu_detail::atom(p, "min", v); }
template <typename T> T atomicOr(T* p, T v) { return emu_detail::atom(p, "or", v); }
template <typename T> T atomicAnd(T* p, T v) { return emu_detail::atom(p, "and", v); }
template <typename T> T atomicXor(T* p, T v) { return emu_detail::atom(p, "xor", v); }
template <typename T> T atomicExch(T* p, T v) { return emu_detail::atom(p, "exch", v); }
template <typename T> T atomicCAS(T* p, T cmp, T v) { return emu_detail::atom(p, "cas", v, cmp); }

// ---- loads, bit casts, integer and float intrinsics -----------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(unsigned v) { return v ? __builtin_clz(v) : 32; }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }
inline unsigned __brev(unsigned v) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= (v >> i & 1u) << (31 - i);
  return r;
}
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
// cvt.rni.s64.f32: round to nearest even, clamped to the int64 range, NaN -> 0 (PTX 9.7.9.21)
inline long long __float2ll_rn(float a) {
  if (a != a) return 0;
  if (a >= 9.2233720368547758e18f) return INT64_MAX;
  if (a <= -9.2233720368547758e18f) return INT64_MIN;
  return static_cast<long long>(std::nearbyint(a));
}
inline float __ll2float_rn(long long a) { return static_cast<float>(a); }  // round to nearest
inline float __saturatef(float a) { return std::isnan(a) ? 0.f : std::min(1.f, std::max(0.f, a)); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Device min/max are overloaded for mixed integer types; the host's std versions are not.
template <typename A, typename B>
constexpr auto min(A a, B b) -> std::common_type_t<A, B> { return a < b ? a : b; }
template <typename A, typename B>
constexpr auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }

inline unsigned __cvta_generic_to_shared(const void* p) { return emu::shared_addr(p); }
inline long long clock64() { return 0; }

// ---- the runtime API the launchers use -------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 12,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaLaunchAttributeID { cudaLaunchAttributeClusterDimension = 4 };
struct cudaLaunchAttributeValue {
  struct { unsigned x, y, z; } clusterDim;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
struct cudaLaunchConfig_t {
  dim3 gridDim, blockDim;
  size_t dynamicSmemBytes = 0;
  cudaStream_t stream = nullptr;
  cudaLaunchAttribute* attrs = nullptr;
  unsigned numAttrs = 0;
};

namespace emu_detail {
// The emulated SM count: 132 (H100 SXM), or DSA_EMU_NUM_SMS to make grid-stride and
// persistent loops wrap on small shapes.
inline int num_sms() {
  const char* v = std::getenv("DSA_EMU_NUM_SMS");
  const int n = v ? std::atoi(v) : 0;
  return n > 0 ? n : emu::kNumSms;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
template <typename R, typename... A>
const void* kernel_key(R (*f)(A...)) { return reinterpret_cast<const void*>(f); }
inline cudaError_t launch(const char* name, const void* key, void (*body)(void*), void* ctx, dim3 grid, dim3 block,
                          size_t smem, dim3 cluster) {
  const int allowed = emu::kernel_attribute(key, cudaFuncAttributeMaxDynamicSharedMemorySize);
  const int portable = emu::kernel_attribute(key, cudaFuncAttributeNonPortableClusterSizeAllowed);
  const unsigned cs = cluster.x * cluster.y * cluster.z;
  if (smem > 48 * 1024 && static_cast<int>(smem) > allowed) {
    emu::report("bad-launch", std::string(name) + ": dynamic shared memory " + std::to_string(smem) +
                                  " B above 48 KB without cudaFuncAttributeMaxDynamicSharedMemorySize");
    return last_error() = cudaErrorInvalidValue;
  }
  if (cs > 8 && portable != 1) {
    emu::report("bad-launch", std::string(name) + ": cluster of " + std::to_string(cs) +
                                  " CTAs without cudaFuncAttributeNonPortableClusterSizeAllowed");
    return last_error() = cudaErrorInvalidValue;
  }
  emu::LaunchSpec spec;
  spec.kernel = emu::kernel_name(key, name);
  spec.grid = grid;
  spec.block = block;
  spec.cluster = cluster;
  spec.dynamic_smem = smem;
  const int r = emu::launch(spec, body, ctx);
  return last_error() = static_cast<cudaError_t>(r);
}
}  // namespace emu_detail

namespace emu {
// What launch_rewrite.py puts in place of `name<<<grid, block, smem, stream>>>(args);`.
template <typename F>
cudaError_t launch_kernel(const char* name, const void* key, F&& body, dim3 grid, dim3 block, size_t smem = 0,
                          cudaStream_t = nullptr) {
  using B = std::remove_reference_t<F>;
  return emu_detail::launch(name, key, [](void* c) { (*static_cast<B*>(c))(); },
                            const_cast<void*>(static_cast<const void*>(&body)), grid, block, smem, dim3(1, 1, 1));
}
using emu_detail::kernel_key;
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu_detail::last_error();
  emu_detail::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return emu_detail::last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrMultiProcessorCount: *v = emu_detail::num_sms(); break;
    case cudaDevAttrL2CacheSize: *v = 50 * 1024 * 1024; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 228 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(emu::kMaxDynamicSmem); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <typename R, typename... A>
cudaError_t cudaFuncSetAttribute(R (*f)(A...), cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize && (v < 0 || v > static_cast<int>(emu::kMaxDynamicSmem)))
    return emu_detail::last_error() = cudaErrorInvalidValue;
  emu::set_kernel_attribute(emu::kernel_key(f), a, v);
  return cudaSuccess;
}
template <typename R, typename... A>
cudaError_t cudaOccupancyMaxActiveClusters(int* n, R (*f)(A...), const cudaLaunchConfig_t* cfg) {
  // One CTA per SM of a cluster; clusters above 8 need the non-portable attribute; the
  // emulated H100 fits 16-CTA clusters (DSA_EMU_MAX_CLUSTER caps it, to exercise fallbacks).
  unsigned cs = 1;
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension)
      cs = cfg->attrs[i].val.clusterDim.x * cfg->attrs[i].val.clusterDim.y * cfg->attrs[i].val.clusterDim.z;
  const char* cap = std::getenv("DSA_EMU_MAX_CLUSTER");
  const unsigned max_cs = cap ? static_cast<unsigned>(std::atoi(cap)) : 16u;
  const bool nonportable = emu::kernel_attribute(emu::kernel_key(f), cudaFuncAttributeNonPortableClusterSizeAllowed) == 1;
  if (cs > max_cs || (cs > 8 && !nonportable) || cfg->dynamicSmemBytes > emu::kMaxDynamicSmem) {
    *n = 0;
    return cs > 16 ? cudaErrorInvalidValue : cudaSuccess;
  }
  *n = static_cast<int>(emu_detail::num_sms() / cs);
  return cudaSuccess;
}
template <typename... P, typename... A>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* cfg, void (*kernel)(P...), A&&... args) {
  dim3 cluster(1, 1, 1);
  for (unsigned i = 0; i < cfg->numAttrs; ++i)
    if (cfg->attrs[i].id == cudaLaunchAttributeClusterDimension)
      cluster = dim3(cfg->attrs[i].val.clusterDim.x, cfg->attrs[i].val.clusterDim.y, cfg->attrs[i].val.clusterDim.z);
  auto body = [&] { kernel(static_cast<P>(args)...); };
  using B = decltype(body);
  return emu_detail::launch("cudaLaunchKernelEx", emu::kernel_key(kernel), [](void* c) { (*static_cast<B*>(c))(); },
                            &body, cfg->gridDim, cfg->blockDim, cfg->dynamicSmemBytes, cluster);
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, int = 0, cudaStream_t = nullptr) {
  std::memcpy(d, s, n);
  return cudaSuccess;
}
