// Kernels that exercise the emulator itself: one correct use and one planted hazard per check
// (tests/test_emu_runtime.py asserts each hazard is reported with the right kind and that
// the correct kernels are clean). Launched through <<<>>> like the product's launchers.
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"

namespace {

// Block sum through shared memory; `drop_barrier` removes the barrier between the writes and
// the reads (a race), `skip_last` makes the last thread skip its write (an uninitialised read).
__global__ void block_sum(const float* x, float* out, int n, bool drop_barrier, bool skip_last) {
  DSA_DYNAMIC_SMEM(smem, 16);
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  if (!(skip_last && t == static_cast<int>(blockDim.x) - 1))
    s[t] = t < n ? x[blockIdx.x * blockDim.x + t] : 0.f;
  if (!drop_barrier) __syncthreads();
  if (t == 0) {
    float acc = 0.f;
    for (unsigned i = 0; i < blockDim.x; ++i) acc += s[i];
    out[blockIdx.x] = acc;
  }
}

// Warp sum by butterfly shuffles; `bad_mask` leaves lane 31 out of the member mask it uses.
__global__ void warp_sum(const float* x, float* out, bool bad_mask) {
  float v = x[blockIdx.x * 32 + threadIdx.x];
  const unsigned mask = bad_mask ? 0x7fffffffu : 0xffffffffu;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
  if (threadIdx.x == 0) out[blockIdx.x] = v;
}

// A barrier inside a branch only half the block takes: a deadlock.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Reads one element past the input (global out of bounds) or past the shared allocation.
__global__ void off_by_one(const float* x, float* out, int n, bool shared) {
  DSA_DYNAMIC_SMEM(smem, 16);
  float* s = reinterpret_cast<float*>(smem);
  const int t = threadIdx.x;
  if (shared) {
    s[t] = 1.f;
    __syncthreads();
    out[t] = s[t + 1];  // the last thread reads past the block's floats
  } else {
    out[t] = x[t + 1];  // the last thread reads x[n]
  }
  (void)n;
}

// cp.async of a row into shared memory; `early_read` reads it before the wait.
__global__ void async_copy(const float* x, float* out, bool early_read) {
  DSA_DYNAMIC_SMEM(smem, 16);
  const int t = threadIdx.x;
  emu::cp_async(static_cast<uint32_t>(16 * t), x + 4 * t, 16, 16);
  emu::cp_async_commit();
  float v = 0.f;
  if (early_read) v = reinterpret_cast<float*>(smem)[4 * t];
  emu::cp_async_wait(0);
  __syncthreads();
  out[t] = v + reinterpret_cast<float*>(smem)[4 * ((t + 1) % blockDim.x)];
}

// Atomics from every thread into one counter: never a race.
__global__ void atomic_count(int* counter) { atomicAdd(counter, 1); }

// A thread that returns early does not hang the barrier the others reach.
__global__ void early_exit(float* out) {
  if (threadIdx.x >= 48) return;
  __syncthreads();
  out[threadIdx.x] = 2.f;
}

// The bookkeeping under wgmma (ptx.cpp builds the real instruction on it): a deferred
// accumulator read before its wait (`early_read`), and an async-proxy read of shared memory
// written by ordinary stores with (`fence`) or without a fence.proxy.async.
__global__ void async_proxy(float* out, bool early_read, bool fence) {
  DSA_DYNAMIC_SMEM(smem, 16);
  const int t = threadIdx.x;
  reinterpret_cast<float*>(smem)[t] = static_cast<float>(t);
  if (fence) emu::fence_proxy_async();
  __syncthreads();
  float acc[4] = {1.f, 2.f, 3.f, 4.f};
  float operand = 0.f;
  emu::smem_read(static_cast<uint32_t>(4 * ((t + 1) % blockDim.x)), &operand, 4, t, /*async_proxy=*/true);
  const float value[4] = {operand, operand, operand, operand};
  emu::wgmma_defer(acc, value, 4);
  emu::wgmma_commit();
  float seen = early_read ? acc[0] : 0.f;
  emu::wgmma_wait(0);
  out[t] = acc[3] + seen;
}

}  // namespace

extern "C" {
int emu_selftest_async_proxy(float* out, int threads, int early, int fence) {
  async_proxy<<<1, threads, threads * sizeof(float)>>>(out, early != 0, fence != 0);
  return cudaGetLastError();
}
int emu_selftest_block_sum(const float* x, float* out, int n, int threads, int blocks, int drop, int skip) {
  block_sum<<<blocks, threads, threads * sizeof(float)>>>(x, out, n, drop != 0, skip != 0);
  return cudaGetLastError();
}
int emu_selftest_warp_sum(const float* x, float* out, int blocks, int bad_mask) {
  warp_sum<<<blocks, 32>>>(x, out, bad_mask != 0);
  return cudaGetLastError();
}
int emu_selftest_divergent_barrier(float* out) {
  divergent_barrier<<<1, 64>>>(out);
  return cudaGetLastError();
}
int emu_selftest_off_by_one(const float* x, float* out, int n, int shared) {
  off_by_one<<<1, n, n * sizeof(float)>>>(x, out, n, shared != 0);
  return cudaGetLastError();
}
int emu_selftest_async_copy(const float* x, float* out, int threads, int early) {
  async_copy<<<1, threads, threads * 16>>>(x, out, early != 0);
  return cudaGetLastError();
}
int emu_selftest_atomic_count(int* counter, int threads, int blocks) {
  atomic_count<<<blocks, threads>>>(counter);
  return cudaGetLastError();
}
int emu_selftest_early_exit(float* out) {
  early_exit<<<1, 64>>>(out);
  return cudaGetLastError();
}
int emu_selftest_too_much_smem(float* out) {
  early_exit<<<1, 64, 100 * 1024>>>(out);  // above 48 KB without the attribute
  return cudaGetLastError();
}
}
