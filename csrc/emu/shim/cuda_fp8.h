// Host stand-in for <cuda_fp8.h> under the emulator: the storage types and the conversion
// intrinsics the kernels use, with the device's semantics (PTX 9.7.9.21 cvt with .e4m3x2 /
// .e5m2x2: round to nearest even; __NV_SATFINITE clamps to the largest finite value (448 for
// e4m3, 57344 for e5m2) and keeps NaN; __NV_NOSAT overflows to NaN (e4m3, no inf) or inf (e5m2)).
#pragma once
#include <cstdint>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"
#include "emu/ptx.h"

typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short int __nv_fp8x2_storage_t;
typedef unsigned int __nv_fp8x4_storage_t;
typedef enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE } __nv_saturation_t;
typedef enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 } __nv_fp8_interpretation_t;

inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat, __nv_fp8_interpretation_t t) {
  return emu::ptx::float_to_fp8(x, t == __NV_E5M2, sat == __NV_SATFINITE);
}
// .x -> the low byte, .y -> the high byte (cvt.rn.satfinite.e4m3x2.f32 d, x.y, x.x).
inline __nv_fp8x2_storage_t __nv_cvt_float2_to_fp8x2(float2 x, __nv_saturation_t sat,
                                                     __nv_fp8_interpretation_t t) {
  return static_cast<__nv_fp8x2_storage_t>(__nv_cvt_float_to_fp8(x.x, sat, t) |
                                           __nv_cvt_float_to_fp8(x.y, sat, t) << 8);
}
inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t x, __nv_fp8_interpretation_t t) {
  return {emu::ptx::fp8_to_f16(x, t == __NV_E5M2)};
}
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t x, __nv_fp8_interpretation_t t) {
  return {emu::ptx::fp8_to_f16(static_cast<uint8_t>(x & 0xFF), t == __NV_E5M2),
          emu::ptx::fp8_to_f16(static_cast<uint8_t>(x >> 8), t == __NV_E5M2)};
}
