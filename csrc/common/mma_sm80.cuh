// Warp-level tensor-core and async-copy primitives (sm_80+ PTX: ldmatrix, mma.sync m16n8k16
// bf16 and, sm_89+, m16n8k32 e4m3, cp.async, st.shared), shared by the kernels. Torch-free.
// Under DSA_EMULATOR (csrc/emu) each primitive runs its PTX-ISA semantics in csrc/emu/ptx.cpp
// instead of the asm; the kernels calling them are unchanged.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#if defined(DSA_EMULATOR)
#include "emu/ptx.h"
#endif

namespace dsa {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix: N 8x8 b16 matrices; lane l gives the (16-byte aligned) row address of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::ldmatrix_x4(r, addr);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::ldmatrix_x2(r, addr);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#endif
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::ldmatrix_x4_trans(r, addr);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#endif
}
// Two matrices: lanes 0-15 give the row addresses (the others must still be valid addresses).
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::ldmatrix_x2_trans(r, addr);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
#endif
}
// The same, addressed by generic pointers into shared memory.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_x4(r, smem_u32(p)); }
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) { ldmatrix_x2(r, smem_u32(p)); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  ldmatrix_x4_trans(r, smem_u32(p));
}

// D += A (16x16 bf16, row-major) * B (16x8 bf16, column-major), fp32 accumulation.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::mma_bf16_16816(d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// D += A (16x32 e4m3, row-major) * B (32x8 e4m3, column-major), fp32 accumulation (sm_89+).
__device__ __forceinline__ void mma_e4m3_16832(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                               uint32_t b1) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::mma_e4m3_16832(d, a, b0, b1);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  // FP8 MMA needs sm_89+; the host glue refuses older devices, so this is never reached.
  __trap();
#endif
}

// 16-byte global->shared copy bypassing L1. With valid == false the source is not read
// (src-size 0) and the 16 destination bytes are zero-filled; src must still be a legal address.
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, bool valid) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::cp_async_16_zfill(dst, src, valid);
#else
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
               : "memory");
#endif
}
// The same with an explicit src-size: bytes [src_bytes, 16) of the destination are zero-filled
// (src_bytes = 0 zero-fills all 16 without reading src).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::cp_async_16(dst, src, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}
// 4-byte global->shared copy through L1 (.ca; .cg only takes 16 bytes), src-size as above.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, uint32_t src_bytes) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::cp_async_4(dst, src, src_bytes);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}
// Full copies without a src-size operand (src is always read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::cp_async_16(dst, src);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::cp_async_4(dst, src);
#else
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(DSA_EMULATOR)
  ::emu::ptx::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(DSA_EMULATOR)
  ::emu::ptx::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
#if defined(DSA_EMULATOR)
  ::emu::ptx::st_shared_u32(addr, v);
#else
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace dsa
