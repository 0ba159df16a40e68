// PTX primitives of csrc/common/*.cuh with PTX-ISA semantics, for the CPU emulator (tests
// only; never in the product). Each csrc/common primitive calls its namesake here under
// DSA_EMULATOR. Implemented in ptx.cpp (compiled without instrumentation) on emu.h: warp and
// warpgroup instructions are emu::collective calls over their 32 / 128 threads, their shared
// memory traffic goes through emu::smem_read / smem_write on behalf of each thread (so races,
// pending cp.async bytes, bounds and proxy fences are checked per thread), asynchrony through
// emu::cp_async* and emu::wgmma_*.
//
// Numerics (documented here once):
//   * mma.sync and wgmma products are exact (bf16 x bf16 and e4m3 x e4m3 products fit in fp32)
//     and are summed in fp32, in k order, onto the accumulator input: d = c + sum_k a_k b_k with
//     one fp32 rounding per addition. Real tensor cores add groups of products with wider
//     internal alignment and a different order; results agree within the tolerances of the
//     CUDA tests, not bitwise.
//   * FP8 (e4m3) wgmma on Hopper keeps only about 14 significant bits in its accumulation
//     (tests/test_indexer.py allows 2^-12 relative per logit). The emulator does NOT model that
//     truncation: it accumulates in full fp32, so it is at least as accurate as the device, and
//     a kernel tolerance calibrated on the device also holds here.
//   * Conversions (cvt, PTX 9.7.9.21): round to nearest even; .satfinite clamps to the largest
//     finite value of the format (e4m3: 448) and maps NaN to NaN (e4m3 0x7F).
#pragma once
#include <cstdint>

#include "emu.h"

namespace emu::ptx {

// ---- ldmatrix (PTX 9.7.14.5.15 "ldmatrix") ------------------------------------------------
// m8n8 .b16: `num` (1, 2, 4) 8x8 matrices; lanes 8j..8j+7 give the 16-byte aligned row
// addresses of matrix j (lanes of the unused rows for x1/x2 are ignored); lane l receives
// row l/4, elements 2(l%4), 2(l%4)+1 of each matrix (with .trans, of the transposed matrix).
void ldmatrix(uint32_t* r, int num, bool trans, uint32_t addr);
inline void ldmatrix_x1(uint32_t (&r)[1], uint32_t addr) { ldmatrix(r, 1, false, addr); }
inline void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) { ldmatrix(r, 2, false, addr); }
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, 4, false, addr); }
inline void ldmatrix_x1_trans(uint32_t (&r)[1], uint32_t addr) { ldmatrix(r, 1, true, addr); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t addr) { ldmatrix(r, 2, true, addr); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix(r, 4, true, addr); }

// ---- mma.sync (PTX 9.7.14.5.14 "mma", fragments 9.7.14.5.8 m16n8k16 / 9.7.14.5.9 m16n8k32) --
// d += a * b over the warp (all 32 lanes must call). A row-major, B column-major.
void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void mma_e4m3_16832(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

// ---- cp.async (PTX 9.7.9.25.3.1 "cp.async"), st.shared (PTX 9.7.9.9 "st") -----------------
// cp_size 16 (.cg) or 4 (.ca); bytes [src_size, cp_size) are zero-filled, src_size 0 reads
// nothing. Completed at the cp.async.wait_group that covers it (PTX 9.7.9.25.3.2/3).
void cp_async(uint32_t dst, const void* src, int cp_size, int src_size);
inline void cp_async_16_zfill(uint32_t dst, const void* src, bool valid) { cp_async(dst, src, 16, valid ? 16 : 0); }
inline void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
  cp_async(dst, src, 16, static_cast<int>(src_bytes));
}
inline void cp_async_4(uint32_t dst, const void* src, uint32_t src_bytes) {
  cp_async(dst, src, 4, static_cast<int>(src_bytes));
}
inline void cp_async_16(uint32_t dst, const void* src) { cp_async(dst, src, 16, 16); }
inline void cp_async_4(uint32_t dst, const void* src) { cp_async(dst, src, 4, 4); }
void cp_async_commit();
void cp_async_wait(int n);
void st_shared_u32(uint32_t addr, uint32_t v);

// ---- wgmma (PTX 9.7.15 "Asynchronous Warpgroup Level Matrix Multiply-Accumulate") ----------
enum class WgmmaType : int { kBF16 = 0, kE4M3 = 1 };

// Shared-memory matrix descriptor fields (PTX 9.7.15.5.1.2.2 "Matrix Descriptor Format").
struct MatrixDescriptor {
  uint32_t start;    // byte address in the shared window (bits 0-13, << 4)
  uint32_t lbo;      // leading dimension byte offset (bits 16-29, << 4)
  uint32_t sbo;      // stride dimension byte offset (bits 32-45, << 4)
  uint32_t base;     // matrix base offset (bits 49-51)
  int swizzle;       // bits 62-63: 0 none, 1 128B, 2 64B, 3 32B
};
MatrixDescriptor decode_descriptor(uint64_t desc);

// D[64 x n] = (scale_d ? D : 0) + (scale_a A) (scale_b B), A 64 x K and B K x n from shared
// memory through descriptors (K = 16 bf16 or 32 e4m3); trans_a / trans_b: 0 K-major, 1 MN-major
// (bf16 only). All 128 threads of the warpgroup must call; d is this thread's n/2 accumulator
// registers, NaN and pending until the wgmma.wait_group that retires the group.
void wgmma_ss(float* d, int n, WgmmaType type, uint64_t desc_a, uint64_t desc_b, bool scale_d, int scale_a,
              int scale_b, int trans_a, int trans_b);
// The register-A form: a is this thread's 4 registers of A (the m64 x K fragment layout of
// PTX 9.7.15.5.1.1 "Register Fragments", per warp the mma.sync m16 A layout for rows 16w..16w+15).
void wgmma_rs(float* d, int n, WgmmaType type, const uint32_t (&a)[4], uint64_t desc_b, bool scale_d, int scale_a,
              int scale_b, int trans_b);

inline void wgmma_m64n64k16_kmajor_b(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  wgmma_ss(d, 64, WgmmaType::kBF16, desc_a, desc_b, accumulate != 0, 1, 1, 0, 0);
}
inline void wgmma_m64n256k16_nmajor_b(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  wgmma_ss(d, 256, WgmmaType::kBF16, desc_a, desc_b, accumulate != 0, 1, 1, 0, 1);
}
inline void wgmma_m64n128k32_e4m3(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
  wgmma_ss(&d[0][0], 128, WgmmaType::kE4M3, desc_a, desc_b, accumulate != 0, 1, 1, 0, 0);
}
// wgmma.fence / commit_group / wait_group (PTX 9.7.15.6-8), fence.proxy.async (PTX 9.7.13.18).
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int n);
inline void wgmma_wait_all() { wgmma_wait(0); }
void fence_proxy_async_smem();
// A compiler-ordering hint only (empty asm on the device); touches nothing.
inline void fence_operand(float&) {}

// ---- cluster synchronisation: mbarrier (PTX 9.7.13.15), st.async (9.7.9.12), mapa (9.7.9.23),
// barrier.cluster (9.7.13.4), fence.mbarrier_init (9.7.13.1). State and checks in runtime.cpp
// (emu.h); these are the instruction forms kernel code names.
// mbarrier.init.shared::cta.b64 [addr], count
inline void mbarrier_init(uint32_t addr, uint32_t count) { emu::mbar_init(addr, static_cast<int>(count)); }
// fence.mbarrier_init.release.cluster: makes prior inits visible to the cluster's other CTAs
inline void fence_mbarrier_init_release_cluster() { emu::fence_mbarrier_init(); }
inline void fence_acq_rel_cluster() { emu::fence_mbarrier_init(); }
// mbarrier.arrive.release.cta.shared::cta.b64 state, [addr]
inline uint64_t mbarrier_arrive(uint32_t addr) { return emu::mbar_arrive(addr, 1, 0, true, false); }
// mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 state, [addr], tx
inline uint64_t mbarrier_arrive_expect_tx(uint32_t addr, uint32_t tx) { return emu::mbar_arrive(addr, 1, tx, true, false); }
// mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote] (remote = mapa result)
inline void mbarrier_arrive_cluster(uint32_t remote) { emu::mbar_arrive(remote, 1, 0, true, true); }
// mbarrier.arrive.release.cta.shared::cluster.b64 _, [remote]: orders nothing for another CTA
inline void mbarrier_arrive_cluster_cta_scope(uint32_t remote) { emu::mbar_arrive(remote, 1, 0, true, false); }
// mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [addr], tx
inline void mbarrier_expect_tx(uint32_t addr, uint32_t tx) { emu::mbar_expect_tx(addr, tx); }
// mbarrier.try_wait.parity.acquire.{cta,cluster}.shared::cta.b64 p, [addr], parity
inline bool mbarrier_try_wait_parity(uint32_t addr, uint32_t parity) { return emu::mbar_wait(addr, parity, false, true); }
inline bool mbarrier_try_wait_parity_cluster(uint32_t addr, uint32_t parity) { return emu::mbar_wait(addr, parity, true, true); }
// mbarrier.test_wait.parity.acquire.cluster.shared::cta.b64 p, [addr], parity
inline bool mbarrier_test_wait_parity_cluster(uint32_t addr, uint32_t parity) { return emu::mbar_wait(addr, parity, true, false); }
// mapa.shared::cluster.u32 d, addr, rank
inline uint32_t mapa_shared_cluster(uint32_t addr, uint32_t rank) { return emu::mapa(addr, rank); }
// st.async.shared::cluster.mbarrier::complete_tx::bytes.{b32,v2.b32,v4.b32} [dst], v, [bar]
inline void st_async_b32(uint32_t dst, uint32_t v, uint32_t bar) { emu::st_async(dst, &v, 4, bar); }
inline void st_async_v2_b32(uint32_t dst, uint32_t a, uint32_t b, uint32_t bar) {
  const uint32_t v[2] = {a, b};
  emu::st_async(dst, v, 8, bar);
}
inline void st_async_v4_b32(uint32_t dst, uint32_t a, uint32_t b, uint32_t c, uint32_t d, uint32_t bar) {
  const uint32_t v[4] = {a, b, c, d};
  emu::st_async(dst, v, 16, bar);
}
// barrier.cluster.arrive{.release,.relaxed}.aligned / barrier.cluster.wait{.acquire}.aligned
inline void barrier_cluster_arrive_release() { emu::cluster_arrive(true); }
inline void barrier_cluster_arrive_relaxed() { emu::cluster_arrive(false); }
inline void barrier_cluster_wait() { emu::cluster_wait(true); }

// ---- conversions (PTX 9.7.9.21 "cvt"; formats 5.2.5 "Alternate Floating-Point Data Formats") -
uint16_t float_to_bf16_rn(float f);   // cvt.rn.bf16.f32
float bf16_to_float(uint16_t b);
uint16_t float_to_f16_rn(float f);    // cvt.rn.f16.f32 (overflow -> inf)
float f16_to_float(uint16_t h);
// cvt.rn{.satfinite}.{e4m3x2,e5m2x2}.f32, one half. Without satfinite an overflow is NaN for
// e4m3 (it has no inf) and inf for e5m2.
uint8_t float_to_fp8(float f, bool e5m2, bool satfinite);
uint16_t fp8_to_f16(uint8_t v, bool e5m2);   // cvt.rn.f16x2.{e4m3x2,e5m2x2}, exact
float fp8_to_float(uint8_t v, bool e5m2);
// cvt.rn.satfinite.e4m3x2.f32 d, a, b: a -> the upper byte, b -> the lower byte.
inline uint16_t cvt_rn_satfinite_e4m3x2_f32(float a, float b) {
  return static_cast<uint16_t>(float_to_fp8(a, false, true) << 8 | float_to_fp8(b, false, true));
}

// ---- the layouts above as plain functions (tests/test_emu_cute_layouts.py compares them
// with CuTe's atoms) ---------------------------------------------------------------------------
struct Coord {
  int row, col;
};
// mma.sync fragment element -> matrix coordinate. operand 'A' (row m, col k), 'B' (row k,
// col n), 'C' (row m, col n); elem = register * (elements per register) + position in it.
Coord mma_fragment_coord(WgmmaType type, char operand, int lane, int elem);
// ldmatrix (not .trans): lane, register, half -> (row, col) within the matrix `register`;
// with trans the roles of row and col swap.
Coord ldmatrix_coord(int lane, int half, bool trans);
// The lane whose address gives row `row` of matrix `matrix` of an ldmatrix.
inline int ldmatrix_row_lane(int matrix, int row) { return 8 * matrix + row; }
// wgmma accumulator register i of thread t (0-127) -> (m, n) of D.
Coord wgmma_accumulator_coord(int thread, int i);
// Register-A wgmma: element i (over the 4 registers, packed low first) of thread t -> (m, k).
Coord wgmma_a_fragment_coord(WgmmaType type, int thread, int i);
// Shared-window byte address of element (mn, k) of a wgmma operand with `elem_bytes` per
// element (2 bf16, 1 e4m3), K-major (mn_major false) or MN-major, read through descriptor
// `desc`: the canonical layouts of PTX 9.7.15.5.1.2 "Shared Memory Matrix Layout", the swizzle
// applied to the address bits (so the start address and base offset enter the XOR phase).
uint32_t wgmma_smem_offset(uint64_t desc, int mn, int k, int elem_bytes, bool mn_major);

}  // namespace emu::ptx
