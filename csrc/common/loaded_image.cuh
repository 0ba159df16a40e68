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

// What a launcher returns when the loaded image has no kernel for the request. The emulator's
// runtime shim names only a few error codes: the same value as CUDA's there.
#if defined(DSA_EMULATOR)
constexpr cudaError_t kNoKernelImage = static_cast<cudaError_t>(209);
#else
constexpr cudaError_t kNoKernelImage = cudaErrorNoKernelImageForDevice;
static_assert(static_cast<int>(cudaErrorNoKernelImageForDevice) == 209, "the emulator's value");
#endif

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
// Thread-block clusters are not an ImageLevel: sm_89 code has FP8 MMA and no clusters, sm_90 /
// sm_100 code both. Their own probe: bound 64 where the pass compiles cluster code, else 32.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DSA_CLUSTER_PROBE_THREADS 64
#else
#define DSA_CLUSTER_PROBE_THREADS 32
#endif
__global__ void __launch_bounds__(DSA_CLUSTER_PROBE_THREADS) dsa_cluster_probe_kernel() {}
#undef DSA_CLUSTER_PROBE_THREADS
#endif

// The level of the image of this translation unit that the driver loaded for the current device
// (the glue's CUDAGuard makes it the tensors' device), for launchers that pick among kernels by
// it (the indexer: wgmma, e4m3 mma.sync, or bf16 mma.sync after dequantisation). The emulator
// compiles the kernels' sm_90a source (wgmma and e4m3 MMA modelled in csrc/emu/ptx.cpp) and
// reports kSm90a, unless DSA_EMU_IMAGE_LEVEL (1, 2 or 3: an ImageLevel) says which image to
// pretend was loaded, so that tests run the dispatch an sm_80 or sm_89 image gets.
inline cudaError_t loaded_image_level(ImageLevel* level) {
#if defined(DSA_EMULATOR)
  const char* env = std::getenv("DSA_EMU_IMAGE_LEVEL");
  const int v = env != nullptr ? std::atoi(env) : 3;
  *level = static_cast<ImageLevel>(v < 1 ? 1 : (v > 3 ? 3 : v));
  return cudaSuccess;
#else
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, dsa_image_probe_kernel);
  if (err != cudaSuccess) return err;
  const int v = attr.maxThreadsPerBlock / kImageProbeThreadsPerLevel;
  *level = static_cast<ImageLevel>(v < 1 ? 1 : (v > 3 ? 3 : v));
  return cudaSuccess;
#endif
}

// cudaSuccess when the loaded image (above) is at least `needed`, else
// cudaErrorNoKernelImageForDevice (or the error of the query).
inline cudaError_t require_loaded_image(ImageLevel needed) {
  ImageLevel level = ImageLevel::kBasic;
  const cudaError_t err = loaded_image_level(&level);
  if (err != cudaSuccess) return err;
  return static_cast<int>(level) >= static_cast<int>(needed) ? cudaSuccess : kNoKernelImage;
}

// Whether the loaded image (above) was compiled with thread-block clusters (sm_90+ device code).
// A cluster launch needs this as well as a cc 9+ device: an "8.0+PTX" build runs compute_80 code
// on an H100 or B200, and there cooperative_groups sees a cluster of one CTA whatever the launch
// asked for. The emulator has clusters unless DSA_EMU_IMAGE_LEVEL pretends an image below sm_90a.
inline cudaError_t loaded_image_has_clusters(bool* has) {
#if defined(DSA_EMULATOR)
  ImageLevel level = ImageLevel::kBasic;
  const cudaError_t err = loaded_image_level(&level);
  *has = level == ImageLevel::kSm90a;
  return err;
#else
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, dsa_cluster_probe_kernel);
  *has = err == cudaSuccess && attr.maxThreadsPerBlock >= 64;
  return err;
#endif
}

// Whether an sm_90a-only kernel can run: *use only on a compute capability 9 device whose
// loaded image is sm_90a. Off Hopper: false, no error (the kernel does not exist there). On
// Hopper with an image built without sm_90a: false, and when the kernel was asked for by name
// (`asked`) the error cudaErrorNoKernelImageForDevice rather than a silent fallback to mma.sync,
// because whoever names a kernel is validating it and must not be shown a result of another;
// a default choice falls back silently.
inline cudaError_t sm90a_kernel_usable(int device, bool asked, bool* use) {
  *use = false;
  int major = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess || major != 9) return err;
  err = require_loaded_image(ImageLevel::kSm90a);
  *use = err == cudaSuccess;
  return asked ? err : cudaSuccess;
}

// The decision of an opt-in wgmma kernel (`env_name`=1): sm90a_kernel_usable, asked by name.
inline cudaError_t sm90a_wgmma_opted_in(const char* env_name, int device, bool* use_wgmma) {
  *use_wgmma = false;
  const char* env = std::getenv(env_name);
  if (env == nullptr || std::strcmp(env, "1") != 0) return cudaSuccess;
  return sm90a_kernel_usable(device, true, use_wgmma);
}

}  // namespace
}  // namespace dsa
