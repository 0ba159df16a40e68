// Cluster point-to-point synchronisation shared by the topk and mla_decode kernels (sm_90): mbarriers in shared
// memory, remote arrives on a peer CTA's mbarrier, st.async pushes that complete transaction
// bytes on the peer's mbarrier, and the split barrier.cluster arrive / wait. Each primitive is
// one PTX instruction on the device; under DSA_EMULATOR it is the emulator's model of that
// instruction (csrc/emu/ptx.h), whose hazard checks (init visibility, arrival counts, tx-count
// range, cross-CTA races through distributed shared memory) the emulator tests rely on.
//
// Addresses are 32-bit shared-window addresses: shared::cta (__cvta_generic_to_shared) for
// the calling CTA's own objects, shared::cluster (mapa) for a peer's.
//
// PTX ISA references: mbarrier 9.7.13.15 (init .15.9, arrive .15.13, expect_tx .15.11,
// try_wait .15.16), st.async 9.7.9.12, mapa 9.7.9.23, barrier.cluster 9.7.13.4,
// fence.mbarrier_init 9.7.13.1 (membar/fence).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#if defined(DSA_EMULATOR)
#include "emu/ptx.h"
#endif

namespace dsa {
namespace csync {

#if defined(DSA_EMULATOR)

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return __cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) { emu::ptx::mbarrier_init(bar, count); }
__device__ __forceinline__ void fence_mbar_init() { emu::ptx::fence_mbarrier_init_release_cluster(); }
__device__ __forceinline__ uint32_t mapa(uint32_t addr, uint32_t rank) { return emu::ptx::mapa_shared_cluster(addr, rank); }
__device__ __forceinline__ void arrive_remote(uint32_t remote_bar) { emu::ptx::mbarrier_arrive_cluster(remote_bar); }
__device__ __forceinline__ void arrive_expect_tx(uint32_t bar, uint32_t tx) { emu::ptx::mbarrier_arrive_expect_tx(bar, tx); }
__device__ __forceinline__ void wait_cluster(uint32_t bar, uint32_t parity) {
  while (!emu::ptx::mbarrier_try_wait_parity_cluster(bar, parity)) {
  }
}
__device__ __forceinline__ void st_async_v2(uint32_t remote_dst, uint32_t a, uint32_t b, uint32_t remote_bar) {
  emu::ptx::st_async_v2_b32(remote_dst, a, b, remote_bar);
}
__device__ __forceinline__ void st_async_v4(uint32_t remote_dst, uint4 v, uint32_t remote_bar) {
  emu::ptx::st_async_v4_b32(remote_dst, v.x, v.y, v.z, v.w, remote_bar);
}
__device__ __forceinline__ void cluster_arrive_relaxed() { emu::ptx::barrier_cluster_arrive_relaxed(); }
__device__ __forceinline__ void cluster_arrive_release() { emu::ptx::barrier_cluster_arrive_release(); }
__device__ __forceinline__ void cluster_wait() { emu::ptx::barrier_cluster_wait(); }

#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// Makes this thread's mbarrier.init visible to the other CTAs of the cluster (they arrive on
// it remotely); a cluster barrier after it orders the init before their first use.
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ uint32_t mapa(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
// Release at cluster scope: the caller's prior writes (and, through the bar.sync before it,
// its CTA's) are visible to a peer thread that acquires the phase this arrive completes.
__device__ __forceinline__ void arrive_remote(uint32_t remote_bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" ::"r"(remote_bar) : "memory");
}
__device__ __forceinline__ void arrive_expect_tx(uint32_t bar, uint32_t tx) {
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(tx) : "memory");
}
__device__ __forceinline__ void wait_cluster(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}
// Two words to a peer's shared memory; completes 8 transaction bytes on the peer's mbarrier.
__device__ __forceinline__ void st_async_v2(uint32_t remote_dst, uint32_t a, uint32_t b, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.u32 [%0], {%1, %2}, [%3];" ::"r"(remote_dst),
               "r"(a), "r"(b), "r"(remote_bar)
               : "memory");
}
// Four words (16-byte aligned) to a peer; completes 16 transaction bytes on its mbarrier.
__device__ __forceinline__ void st_async_v4(uint32_t remote_dst, uint4 v, uint32_t remote_bar) {
  asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.u32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(remote_dst),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(remote_bar)
               : "memory");
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

#else
// Before sm_90 (and in nvcc's host pass) there are no clusters: kernels select their
// non-cluster code at compile time (kHasClusters); these only keep that code well-formed.
__device__ __forceinline__ uint32_t smem_addr(const void*) { return 0; }
__device__ __forceinline__ void mbar_init(uint32_t, uint32_t) {}
__device__ __forceinline__ void fence_mbar_init() {}
__device__ __forceinline__ uint32_t mapa(uint32_t addr, uint32_t) { return addr; }
__device__ __forceinline__ void arrive_remote(uint32_t) {}
__device__ __forceinline__ void arrive_expect_tx(uint32_t, uint32_t) {}
__device__ __forceinline__ void wait_cluster(uint32_t, uint32_t) {}
__device__ __forceinline__ void st_async_v2(uint32_t, uint32_t, uint32_t, uint32_t) {}
__device__ __forceinline__ void st_async_v4(uint32_t, uint4, uint32_t) {}
__device__ __forceinline__ void cluster_arrive_relaxed() {}
__device__ __forceinline__ void cluster_arrive_release() {}
__device__ __forceinline__ void cluster_wait() {}
#endif

// Whether this compilation pass has thread-block clusters (sm_90 device code or the emulator).
#if defined(DSA_EMULATOR) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
constexpr bool kHasClusters = true;
#else
constexpr bool kHasClusters = false;
#endif

}  // namespace csync
}  // namespace dsa
