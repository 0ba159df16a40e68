// indexer family, the path for images without FP8 tensor cores (sm_80 / sm_86 cubins, or PTX
// of them JIT-compiled): the FP8 tiles arrive in shared memory exactly as on the e4m3 paths
// (cp.async, 128-byte rows, 16-byte chunk c of row r at c ^ (r & 7)); this header turns them
// into bf16 tiles (256-byte rows, the same XOR on the low 3 chunk bits) that the bf16
// mma.sync m16n8k16 reads with ldmatrix, conflict-free.
//
// Exactness: every e4m3 value (|v| <= 448, subnormals down to 2^-9) has at most 4 significant
// bits and an exponent inside bf16's range, so the conversion is exact and the bf16 products,
// accumulated in fp32, are those of the e4m3 MMA. NaN (magnitude 0x7f) stays NaN.
//
// Why a software conversion: cvt.rn.f16x2.e4m3x2 needs sm_89, and CUDA's fallback in
// cuda_fp8.hpp normalises subnormals in a loop. Here, per byte: the 7 magnitude bits placed at
// fp32 bits [26:20] (exponent field 0000eeee, mantissa mmm) and the sign at bit 31 form the
// fp32 number v * 2^-120 (bias 127 instead of 7; an e4m3 subnormal lands on the fp32 subnormal
// with the same mantissa), and one multiply by 2^120 makes it v exactly; its high 16 bits are
// v in bf16. That is a shift, a mask and an FMUL per byte. The multiply must see fp32
// subnormals, hence no flush-to-zero: refuse fast-math builds rather than lose small values.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/mma_sm80.cuh"

#if defined(__USE_FAST_MATH__)
#error "indexer_sm80.cuh: the e4m3 -> bf16 conversion needs fp32 subnormals (no -use_fast_math / -ftz)"
#endif

namespace dsa {
namespace indexer {

// Byte `i` (0..3) of w as fp32 (exact e4m3 value, NaN excepted: see e4m3x4_to_bf16x4).
__device__ __forceinline__ float e4m3_byte_to_float(uint32_t w, int i) {
  const uint32_t b = (w >> (8 * i)) & 0xffu;
  return __uint_as_float(((b & 0x80u) << 24) | ((b & 0x7fu) << 20)) * 0x1p120f;
}

// The high halves of two fp32 values as a bf16x2 (lo in bits 0..15): exact for values with at
// most 8 significant bits.
__device__ __forceinline__ uint32_t high_halves(float lo, float hi) {
  return (__float_as_uint(hi) & 0xffff0000u) | (__float_as_uint(lo) >> 16);
}

// Four e4m3 bytes -> four bf16: lo = bytes 0, 1 and hi = bytes 2, 3 (lower byte in the lower
// half), so that element k of a row keeps position k.
__device__ __forceinline__ void e4m3x4_to_bf16x4(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = high_halves(e4m3_byte_to_float(w, 0), e4m3_byte_to_float(w, 1));
  hi = high_halves(e4m3_byte_to_float(w, 2), e4m3_byte_to_float(w, 3));
  // A byte of magnitude 0x7f (e4m3's only NaN) carries into its bit 7 when 1 is added to the
  // masked magnitudes (no carry crosses bytes): rare, so a branch rather than a select per byte.
  if ((((w & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u) != 0u) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {   // i is a constant once unrolled: lo / hi stay registers
      if (((w >> (8 * i)) & 0x7fu) != 0x7fu) continue;
      uint32_t& pair = i < 2 ? lo : hi;
      const int shift = 16 * (i & 1);
      pair = (pair & ~(0xffffu << shift)) | (0x7fc0u << shift);
    }
  }
}

// Byte offset of 16-byte chunk `chunk` of a `kRowBytes`-byte row in a swizzled shared tile:
// the XOR of the row's low 3 bits keeps any 8 consecutive rows' same chunk in 8 different
// bank groups (ldmatrix reads 8 rows of one chunk per matrix).
template <int kRowBytes>
__device__ __forceinline__ uint32_t swizzled_row(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

// One 16-byte chunk of an FP8 tile (128-byte swizzled rows): fp8 bytes [16 c, +16) of `row`,
// as bf16 chunks 2c (o0) and 2c + 1 (o1).
__device__ __forceinline__ void dequant_chunk(const uint8_t* fp8_tile, int row, int c, uint4& o0, uint4& o1) {
  const uint4 v = *reinterpret_cast<const uint4*>(fp8_tile + swizzled_row<128>(row, c));
  e4m3x4_to_bf16x4(v.x, o0.x, o0.y);
  e4m3x4_to_bf16x4(v.y, o0.z, o0.w);
  e4m3x4_to_bf16x4(v.z, o1.x, o1.y);
  e4m3x4_to_bf16x4(v.w, o1.z, o1.w);
}

// Stores them into row `row` of a bf16 tile (256-byte swizzled rows). Lanes with c >= 4 store
// 2c + 1 first, so that each store instruction of a warp (8 lanes per row) hits the 8 bank
// groups of a row once each (2c alone would cover only the even ones: 2-way conflicts).
__device__ __forceinline__ void store_bf16_chunks(uint8_t* bf16_tile, int row, int c, const uint4& o0,
                                                  const uint4& o1) {
  const bool swap = c >= 4;
  *reinterpret_cast<uint4*>(bf16_tile + swizzled_row<256>(row, 2 * c + (swap ? 1 : 0))) = swap ? o1 : o0;
  *reinterpret_cast<uint4*>(bf16_tile + swizzled_row<256>(row, 2 * c + (swap ? 0 : 1))) = swap ? o0 : o1;
}

// Dequantises rows [row0, row0 + kRows) of an FP8 tile into rows [0, kRows) of a separate bf16
// tile, all kThreads threads together: thread t converts chunk t % 8 of rows
// t / 8 + (kThreads / 8) i. Shared memory only; the caller synchronises before and after.
template <int kRows, int kThreads>
__device__ __forceinline__ void dequant_rows_e4m3_to_bf16(const uint8_t* fp8_tile, int row0,
                                                          uint8_t* bf16_tile, int tid) {
  constexpr int kRowsPerPass = kThreads / 8;
  static_assert(kRows % kRowsPerPass == 0, "whole passes of 8 chunks per row");
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const int row = tid / 8 + i * kRowsPerPass;
    uint4 o0, o1;
    dequant_chunk(fp8_tile, row0 + row, tid & 7, o0, o1);
    store_bf16_chunks(bf16_tile, row, tid & 7, o0, o1);
  }
}

// The same in place: the FP8 rows [0, kRows) occupy the first half of the bf16 tile's bytes.
// Every thread first holds its converted chunks in registers; a barrier; then all store.
template <int kRows, int kThreads>
__device__ __forceinline__ void dequant_rows_e4m3_to_bf16_in_place(uint8_t* tile, int tid) {
  constexpr int kRowsPerPass = kThreads / 8, kPasses = kRows / kRowsPerPass;
  static_assert(kRows % kRowsPerPass == 0, "whole passes of 8 chunks per row");
  uint4 o[kPasses][2];
#pragma unroll
  for (int i = 0; i < kPasses; ++i) dequant_chunk(tile, tid / 8 + i * kRowsPerPass, tid & 7, o[i][0], o[i][1]);
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kPasses; ++i) store_bf16_chunks(tile, tid / 8 + i * kRowsPerPass, tid & 7, o[i][0], o[i][1]);
}

// bf16 mma.sync m16n8k16 (fp32 accumulation) of one warp: 16 keys from row key0 of a bf16 key
// tile x 64 columns from column col0 of the bf16 Q block, both 256-byte swizzled K-major rows,
// into acc (m16n8 layout: lane holds rows lane/4 and lane/4 + 8, columns 2 (lane%4) + {0, 1} of
// each n8 tile) — the accumulator pattern of the e4m3 mma.sync path, so the same epilogue
// follows. The ldmatrix addressing is that path's with 16 chunks a row: a k16 step is two
// 16-byte chunks here as a k32 step is there.
__device__ __forceinline__ void tile_mma_bf16(float (&acc)[8][4], uint32_t k_base, uint32_t q_base, int key0,
                                              int col0, int lane) {
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  // Not unrolled: 8 k-steps of fragments would be live at once otherwise.
#pragma unroll 1
  for (int kk = 0; kk < 256 / 32; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, k_base + swizzled_row<256>(key0 + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      uint32_t b[4];
      ldmatrix_x4(b, q_base + swizzled_row<256>(col0 + jp * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                2 * kk + ((lane >> 3) & 1)));
      mma_bf16_16816(acc[2 * jp], a, b[0], b[1]);
      mma_bf16_16816(acc[2 * jp + 1], a, b[2], b[3]);
    }
  }
}

}  // namespace indexer
}  // namespace dsa
