// MXFP4 indexer keys (SPEC 10.5; issue 23): the byte rules, written once for the CPU kernels,
// the CUDA kernels and (mirrored in Python) dsa_ext.reference.indexer. Torch-free.
//
// A D-dim vector (D % 32 == 0) is D / 32 groups of 32 consecutive values. Per group:
//   amax  = max |x| over the group's non-NaN values (fp32)
//   e     = ceil(log2(amax / 6)) as the fp32 exponent of amax / 6 (rounded up when the
//           mantissa is non-zero), clamped to [-126, 127]: the ue8m0 scale byte is e + 127,
//           in [1, 254]. (amax / 6 below 2^-126, amax = 0 included, gives 2^-126: DeepSeek-V4's
//           fp4_act_quant floor `amax.clamp_min(6 * 2**-126)`; amax = inf gives 2^127.)
//   code  = E2M1 of x * 2^-e (exact: a power-of-two product), round-to-nearest-even onto
//           {0, 0.5, 1, 1.5, 2, 3, 4, 6}, saturating at 6 (inf -> 6); sign in bit 3; a value
//           that rounds to 0 is stored as +0 (code 0x0, so -0 and tiny negatives give 0x0);
//           NaN is stored as 0x0 (E2M1 has no NaN: a NaN key value contributes nothing).
// Packing (torch.float4_e2m1fn_x2, DeepSeek-V4 / SGLang): byte i holds value 2i in its low
// nibble and value 2i + 1 in its high nibble. Dequantised value: e2m1(code) * 2^(byte - 127)
// (a byte 0 reads as 2^-127, 255 as NaN: no writer stores them, a foreign cache may).
//
// Paged cache (SGLang's DeepSeek-V4 FP4 indexer cache, the FP8 cache's region layout):
// uint8 [num_blocks, block_size, 1, D/2 + D/32] (68 bytes a 128-dim key). Inside each block
// the block_size * D/2 packed bytes come first (token-major), then block_size * D/32 scale
// bytes (token-major, group g of a token at byte g). Offsets:
//   values of (blk, off): blk * bs * (D/2 + D/32) + off * D/2
//   scales of (blk, off): blk * bs * (D/2 + D/32) + bs * D/2 + off * D/32
#pragma once
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace dsa {
namespace mxfp4 {

constexpr int kGroup = 32;        // values per ue8m0 scale
constexpr float kE2M1Max = 6.0f;

DSA_HD float bits_to_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, 4);
  return f;
#endif
}
DSA_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
#endif
}

// Bytes per cached key and the row width of a D-dim key's packed values / scales.
DSA_HD int64_t packed_bytes(int64_t D) { return D / 2; }
DSA_HD int64_t scale_bytes(int64_t D) { return D / kGroup; }
DSA_HD int64_t cache_row_bytes(int64_t D) { return D / 2 + D / kGroup; }

// The ue8m0 scale byte of a group whose abs-max (NaN ignored) is amax >= 0.
DSA_HD uint32_t scale_byte(float amax) {
  const uint32_t bits = float_to_bits(amax / kE2M1Max);   // fp32 division, correctly rounded
  uint32_t e = (bits >> 23) & 0xffu;
  e += (bits & 0x7fffffu) != 0u && e != 0xffu;            // ceil to the next power of two
  return e < 1u ? 1u : (e > 254u ? 254u : e);
}

// 2^(byte - 127) and 2^(127 - byte): the dequantisation scale and its exact inverse.
DSA_HD float scale_value(uint32_t byte) {
  if (byte == 0u) return bits_to_float(0x00400000u);       // 2^-127 (subnormal)
  if (byte == 255u) return bits_to_float(0x7fc00000u);     // e8m0 NaN
  return bits_to_float(byte << 23);
}
DSA_HD float inverse_scale(uint32_t byte) {   // byte in [1, 254] (what the writers store)
  return byte >= 254u ? bits_to_float(0x00400000u) : bits_to_float((254u - byte) << 23);
}

// E2M1 code of v = x * 2^-e (see the file comment for ties, saturation, zero and NaN).
DSA_HD uint32_t e2m1_code(float v) {
  const float a = v < 0.f ? -v : v;   // NaN compares false below: every step 0 -> code 0
  uint32_t c = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) +
               (a >= 3.5f) + (a > 5.0f);
  return c | ((v < 0.f && c != 0u) ? 8u : 0u);
}

// Magnitudes of the 8 non-negative codes (the sign is bit 3).
DSA_HD float e2m1_value(uint32_t code) {
  const uint32_t c = code & 7u;   // 0, 0.5, 1, 1.5, 2, 3, 4, 6
  const float mag = c < 2u ? 0.5f * static_cast<float>(c)
                           : 0.5f * static_cast<float>(1u << (c >> 1)) * ((c & 1u) ? 1.5f : 1.0f);
  return (code & 8u) ? -mag : mag;
}

// Quantise one group of 32 fp32 values (any source type via the caller): 16 packed bytes out,
// returns the scale byte.
template <typename Load>
DSA_HD uint32_t quantize_group(Load load, uint8_t* packed) {
  float amax = 0.f;
  for (int i = 0; i < kGroup; ++i) {
    const float v = load(i);
    const float a = v < 0.f ? -v : v;
    amax = a > amax ? a : amax;   // NaN never wins the comparison: ignored
  }
  const uint32_t sb = scale_byte(amax);
  const float inv = inverse_scale(sb);
  for (int i = 0; i < kGroup / 2; ++i)
    packed[i] = static_cast<uint8_t>(e2m1_code(load(2 * i) * inv) | (e2m1_code(load(2 * i + 1) * inv) << 4));
  return sb;
}

// Byte offsets inside the paged cache (int64: num_blocks * block_size * row exceeds 2^31).
DSA_HD int64_t value_offset(int64_t blk, int64_t off, int64_t block_size, int64_t D) {
  return blk * block_size * cache_row_bytes(D) + off * packed_bytes(D);
}
DSA_HD int64_t scale_offset(int64_t blk, int64_t off, int64_t block_size, int64_t D) {
  return blk * block_size * cache_row_bytes(D) + block_size * packed_bytes(D) + off * scale_bytes(D);
}

}  // namespace mxfp4
}  // namespace dsa
