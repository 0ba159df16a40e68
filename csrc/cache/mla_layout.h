// Where a token's bytes live in each MLA cache layout (SPEC sections 2 and 10.2), shared by the
// CPU kernels and the CUDA kernels (host + device, torch-free).
//
//   V3.2 FP8 (FlashMLA V32_FP8Sparse): one 656-byte record per token — 512 e4m3 "nope" values in
//     4 tiles of 128, 4 fp32 tile scales, 64 bf16 rope values. Pages are contiguous.
//   V4 FP8 (FlashMLA MODEL1): a page of block_size tokens is not a run of records: first
//     block_size rows of 576 bytes (448 e4m3 values in 7 tiles of 64, then 64 bf16 rope values),
//     then block_size groups of 8 bytes (7 ue8m0 tile scales = exponent + 127, one pad byte,
//     written 0). The page pitch is the tensor's stride(0): FlashMLA rounds a page up to a
//     multiple of 576 bytes and views the first block_size * 584.
//   bf16 (either model): rows of 576 (V3.2) or 512 (V4) bf16 values, contiguous.
// Slot id of (block, offset) is block * block_size + offset.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace dsa::cache {

enum class MlaCacheKind : int32_t { kV32Fp8 = 0, kV4Fp8 = 1, kBf16 = 2 };

constexpr int64_t kV32RecordBytes = 656, kV4RowBytes = 576, kV4ScaleBytes = 8;
constexpr int64_t kV4TokenBytes = kV4RowBytes + kV4ScaleBytes;   // 584, the last dim of its view
constexpr int64_t kMlaRopeValues = 64;

struct MlaCacheLayout {
  MlaCacheKind kind;
  int32_t dim;              // values per token: 576 (V3.2) or 512 (V4)
  int64_t block_size;
  int64_t page_pitch;       // bytes from one block to the next
  int64_t num_slots;

  DSA_HD bool fp8() const { return kind != MlaCacheKind::kBf16; }
  DSA_HD int32_t nope() const { return dim - static_cast<int32_t>(kMlaRopeValues); }  // 512 / 448
  DSA_HD int32_t tile() const { return kind == MlaCacheKind::kV4Fp8 ? 64 : 128; }
  DSA_HD int32_t num_tiles() const { return nope() / tile(); }                         // 4 / 7
  DSA_HD int64_t page(int64_t slot) const { return (slot / block_size) * page_pitch; }
  DSA_HD int64_t offset(int64_t slot) const { return slot % block_size; }

  // First byte of the token's values (e4m3 nope for FP8 caches, the bf16 row otherwise). Only
  // V4 pages need the block / offset split (64-bit divides): the other layouts are contiguous
  // runs of equal records (page_pitch == block_size * record, checked by the glue).
  DSA_HD int64_t value_byte(int64_t slot) const {
    if (kind == MlaCacheKind::kV4Fp8) return page(slot) + offset(slot) * kV4RowBytes;
    return slot * (kind == MlaCacheKind::kV32Fp8 ? kV32RecordBytes : 2 * int64_t(dim));
  }
  // The 64 bf16 rope values of an FP8 cache.
  DSA_HD int64_t rope_byte(int64_t slot) const {
    return value_byte(slot) + (kind == MlaCacheKind::kV32Fp8 ? 512 + 16 : 448);
  }
  // The tile scales of an FP8 cache: 4 fp32 (V3.2) or 7 ue8m0 bytes and a pad byte (V4).
  DSA_HD int64_t scale_byte(int64_t slot) const {
    return kind == MlaCacheKind::kV32Fp8
               ? value_byte(slot) + 512
               : page(slot) + block_size * kV4RowBytes + offset(slot) * kV4ScaleBytes;
  }
};

// ue8m0 byte of a power-of-two scale (the biased fp32 exponent; inf gives 0xFF, the e8m0 NaN).
DSA_HD uint8_t ue8m0_byte(float pow2_scale) {
  uint32_t bits;
  __builtin_memcpy(&bits, &pow2_scale, 4);
  return static_cast<uint8_t>((bits >> 23) & 0xffu);
}

// The scale a ue8m0 byte stands for: 2^(byte - 127), NaN for 0xFF.
DSA_HD float ue8m0_value(uint8_t byte) {
  const uint32_t bits = byte == 0xffu ? 0x7fc00000u                     // NaN
                      : byte == 0     ? 0x00400000u                     // 2^-127 is subnormal
                                      : uint32_t(byte) << 23;
  float v;
  __builtin_memcpy(&v, &bits, 4);
  return v;
}

}  // namespace dsa::cache
