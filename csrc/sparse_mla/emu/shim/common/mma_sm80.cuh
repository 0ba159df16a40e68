// CPU emulation of the PTX primitives of csrc/common/mma_sm80.cuh, with PTX ISA
// semantics for ldmatrix (m8n8 b16, .trans) and mma.sync m16n8k16 fragments.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace dsa {

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const uint8_t*>(p) - emu::smem_base);
}

inline uint16_t emu_ld16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, emu::smem_base + addr, 2);
  return v;
}

// nmat matrices; lane l's address is row (l % 8) of matrix l / 8.
template <int NMAT>
inline void emu_ldsm(uint32_t* r, uint32_t addr, bool trans) {
  emu::warp_sync();
  emu::my_slot()[0] = addr;
  emu::warp_sync();
  const int lane = threadIdx.x % 32;
  for (int m = 0; m < NMAT; ++m) {
    uint16_t e[2];
    for (int k = 0; k < 2; ++k) {
      int row, col;
      if (!trans) { row = lane / 4; col = 2 * (lane % 4) + k; }
      else { row = 2 * (lane % 4) + k; col = lane / 4; }
      const uint32_t a = emu::lane_slot(8 * m + row)[0];
      if (a % 16) std::abort();  // ldmatrix rows must be 16-byte aligned
      e[k] = emu_ld16(a + 2 * col);
    }
    r[m] = e[0] | (static_cast<uint32_t>(e[1]) << 16);
  }
  emu::warp_sync();
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { emu_ldsm<4>(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { emu_ldsm<4>(r, addr, true); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) { emu_ldsm<2>(r, addr, true); }

inline float emu_lo(uint32_t v) { return emu_bf2f(static_cast<uint16_t>(v & 0xffff)); }
inline float emu_hi(uint32_t v) { return emu_bf2f(static_cast<uint16_t>(v >> 16)); }

inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::warp_sync();
  uint32_t* s = emu::my_slot();
  s[0] = a[0]; s[1] = a[1]; s[2] = a[2]; s[3] = a[3]; s[4] = b0; s[5] = b1;
  emu::warp_sync();
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const uint32_t* o = emu::lane_slot(l);
    const int g = l / 4, c = l % 4;
    A[g][2 * c] = emu_lo(o[0]);         A[g][2 * c + 1] = emu_hi(o[0]);
    A[g + 8][2 * c] = emu_lo(o[1]);     A[g + 8][2 * c + 1] = emu_hi(o[1]);
    A[g][2 * c + 8] = emu_lo(o[2]);     A[g][2 * c + 9] = emu_hi(o[2]);
    A[g + 8][2 * c + 8] = emu_lo(o[3]); A[g + 8][2 * c + 9] = emu_hi(o[3]);
    B[2 * c][g] = emu_lo(o[4]);         B[2 * c + 1][g] = emu_hi(o[4]);
    B[2 * c + 8][g] = emu_lo(o[5]);     B[2 * c + 9][g] = emu_hi(o[5]);
  }
  emu::warp_sync();
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * c + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    d[e] += acc;
  }
}

inline void cp_async_16_zfill(uint32_t dst, const void* src, bool valid) {
  if (dst % 16) std::abort();
  if (valid) std::memcpy(emu::smem_base + dst, src, 16);
  else std::memset(emu::smem_base + dst, 0, 16);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}
inline void st_shared_u32(uint32_t addr, uint32_t v) { std::memcpy(emu::smem_base + addr, &v, 4); }

inline uint32_t pack_bf16x2(float lo, float hi) {
  return emu_f2bf(lo) | (static_cast<uint32_t>(emu_f2bf(hi)) << 16);
}

}  // namespace dsa
