// The FP8 quantisation rules of SPEC section 2, written once for the CPU and CUDA kernels so
// that every writer produces the same bytes as the ecosystem's writers (DeepSeek act_quant,
// vLLM's indexer cache, FlashMLA's MLA cache quantiser). All arithmetic is fp32, as theirs.
#pragma once
#include <cmath>

#include "common/host_device.h"

namespace dsa {

constexpr float kFp8Max = 448.0f;   // largest finite float8_e4m3fn

// Round a positive scale up to a power of two ("ue8m0": the scale is a pure exponent).
DSA_HD float pow2_ceil(float s) { return exp2f(ceilf(log2f(s))); }

// Indexer K cache and fp8_quantize: s = max(amax, 1e-4) / 448, optionally rounded up to 2^n.
DSA_HD float indexer_scale(float amax, bool ue8m0) {
  float s = fmaxf(amax, 1e-4f) / kFp8Max;
  return ue8m0 ? pow2_ceil(s) : s;
}

// MLA FP8 cache (per 128-value tile): s = 2^ceil(log2(max(amax / 448, 1e-4))).
DSA_HD float mla_tile_scale(float amax) { return pow2_ceil(fmaxf(amax / kFp8Max, 1e-4f)); }

// The value stored before rounding to e4m3: clamp(x / s, -448, 448) in fp32. A NaN quotient
// stays NaN (fmaxf alone would turn it into -448, a silently wrong value), with its sign
// cleared so that every writer (c10's conversion, cuda_fp8.h, torch) stores the same 0x7F.
DSA_HD float fp8_saturate(float v) { return v != v ? fabsf(v) : fminf(fmaxf(v, -kFp8Max), kFp8Max); }
DSA_HD float fp8_prequant(float x, float s) { return fp8_saturate(x / s); }

// The same value for a power-of-two scale s (ue8m0, MLA tiles), without a division per
// element: inv_s = 1 / s is exact there (s in [2^-22, 2^127]), so x * inv_s == x / s bit for
// bit, including 0 * inf, inf * 0 and NaN cases (s = inf gives inv_s = 0).
DSA_HD float fp8_prequant_pow2(float x, float inv_s) { return fp8_saturate(x * inv_s); }

}  // namespace dsa
