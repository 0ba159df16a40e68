// Host stand-in for <cuda_fp16.h> under the emulator: the binary16 types and the conversions
// the kernels use, rounding as the device's cvt (PTX 9.7.9.21: .rn = nearest even; f32 -> f16
// overflow gives inf). The bit work is emu::ptx (csrc/emu/ptx.cpp).
#pragma once
#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"
#include "emu/ptx.h"

struct __half_raw {
  unsigned short x;
};
struct __half2_raw {
  unsigned short x, y;
};
struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(__half_raw r) : __x(r.x) {}
  __half(float f) : __x(emu::ptx::float_to_f16_rn(f)) {}
  operator float() const { return emu::ptx::f16_to_float(__x); }
  operator __half_raw() const { return {__x}; }
};
struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  constexpr __half2(__half a, __half b) : x(a), y(b) {}
  constexpr __half2(__half2_raw r) : x(__half_raw{r.x}), y(__half_raw{r.y}) {}
  operator __half2_raw() const { return {x.__x, y.__x}; }
};
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4, "device layout of the half types");

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return emu::ptx::f16_to_float(h.__x); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return {__half(v.x), __half(v.y)}; }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }
inline float __low2float(__half2 v) { return __half2float(v.x); }
inline float __high2float(__half2 v) { return __half2float(v.y); }
