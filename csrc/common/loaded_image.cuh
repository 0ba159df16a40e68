// What the machine code the driver loaded for this translation unit on the current device can
// execute: the host-side guard of launchers whose kernels need more than the device's compute
// capability says (sparse_mla's and mla_decode's opt-in wgmma kernels need an sm_90a image, the
// indexer's FP8 mma.sync an sm_89+ one). Include it from a *_launch.cu only.
//
// Why: the wgmma primitives (wgmma_sm90.cuh) compile to a bare __trap() without
// __CUDA_ARCH_FEAT_SM90_ALL, the e4m3 mma.sync (mma_sm80.cuh) below __CUDA_ARCH__ 890. Such
// images still run on newer devices: an sm_90 cubin (TORCH_CUDA_ARCH_LIST="9.0" or "8.0;9.0") on
// an H100, which reports compute capability 9.0 for sm_90 and sm_90a code alike; an sm_80 cubin
// on a cc 8.9 GPU; PTX of an older compute capability JIT-compiled by the driver. A dispatch on
// the device's version alone then executes the trap: an illegal instruction.
//
// Why a probe kernel rather than a compile definition from the arch list: nvcc's host pass sees
// no difference between 9.0 and 9.0a (__CUDA_ARCH_LIST__ is 900 for both), and which image of
// the fatbinary the driver loads ("9.0;9.0a" holds two that fit an H100, "8.0+PTX" one it must
// JIT) is only known at run time. So the probe's __launch_bounds__ is set per device pass from
// what that pass compiles (ImageLevel below, times 32 threads), and cudaFuncGetAttributes
// reports the bound of the image the driver loaded for the current device. Each translation
// unit is its own module (no relocatable device code) with its own image choice, hence one
// probe per translation unit (anonymous namespace). No launch and no copy: safe during CUDA
// graph capture, and cheap enough to ask on every call (as the launchers ask
// cudaFuncSetAttribute).
//
// .ci/run (tools/check_loaded_image.py) checks the compiled objects: the probe's bound in every
// cubin, and that no kernel the guarded dispatch can reach in a cubin is a trap.
#pragma once
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace dsa {

// Ordered: each level can execute everything the levels below it can.
enum class ImageLevel : int {
  kBasic = 1,    // neither of the below
  kFp8Mma = 2,   // __CUDA_ARCH__ >= 890: mma.sync e4m3 (mma_sm80.cuh)
  kSm90a = 3,    // __CUDA_ARCH_FEAT_SM90_ALL: wgmma (wgmma_sm90.cuh)
};
constexpr int kImageProbeThreadsPerLevel = 32;

namespace {

#if !defined(DSA_EMULATOR)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSA_IMAGE_PROBE_LEVEL 3
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define DSA_IMAGE_PROBE_LEVEL 2
#else
#define DSA_IMAGE_PROBE_LEVEL 1
#endif
__global__ void __launch_bounds__(DSA_IMAGE_PROBE_LEVEL * kImageProbeThreadsPerLevel) dsa_image_probe_kernel() {}
#undef DSA_IMAGE_PROBE_LEVEL
#endif

// cudaSuccess when the image of this translation unit that the driver loaded for the current
// device (the glue's CUDAGuard makes it the tensors' device) is at least `needed`, else
// cudaErrorNoKernelImageForDevice (or the error of the query). The emulator runs the kernels'
// sm_90a source (wgmma and e4m3 MMA modelled in csrc/emu/ptx.cpp): always cudaSuccess there.
inline cudaError_t require_loaded_image(ImageLevel needed) {
#if defined(DSA_EMULATOR)
  (void)needed;
  return cudaSuccess;
#else
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, dsa_image_probe_kernel);
  if (err != cudaSuccess) return err;
  return attr.maxThreadsPerBlock >= static_cast<int>(needed) * kImageProbeThreadsPerLevel
             ? cudaSuccess
             : cudaErrorNoKernelImageForDevice;
#endif
}

// The decision of an opt-in wgmma kernel (`env_name`=1): *use_wgmma only on a compute
// capability 9 device whose loaded image is sm_90a. Off Hopper the opt-in is ignored, as the
// kernel does not exist there; on Hopper with an image built without sm_90a it is an error
// (cudaErrorNoKernelImageForDevice), not a silent fallback to mma.sync, because whoever opts in
// is validating the wgmma kernel and must not be shown a result of the other one.
inline cudaError_t sm90a_wgmma_opted_in(const char* env_name, int device, bool* use_wgmma) {
  *use_wgmma = false;
  const char* env = std::getenv(env_name);
  if (env == nullptr || std::strcmp(env, "1") != 0) return cudaSuccess;
  int major = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess || major != 9) return err;
  err = require_loaded_image(ImageLevel::kSm90a);
  *use_wgmma = err == cudaSuccess;
  return err;
}

}  // namespace
}  // namespace dsa
