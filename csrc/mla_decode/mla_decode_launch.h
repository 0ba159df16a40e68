// Torch-free host launchers of sparse_mla_decode (CUDA). The glue (mla_decode_cuda.cpp) checks
// the tensors, asks for the split plan, allocates outputs and workspace, then launches.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cache/mla_layout.h"

namespace dsa::mla_decode {

constexpr int kTokensPerTile = 64;   // selected entries gathered per main-loop step

// How the K entries of each row are spread over CTAs. Decided from shapes only (never data),
// so the launch sequence is the same on every call: CUDA-graph safe.
struct SplitPlan {
  int num_splits;        // CTAs per (row, head block); > 1 means partials + combine kernel
  int tiles_per_split;   // 64-entry tiles each split walks
};

SplitPlan plan_splits(int64_t batch, int64_t s_q, int64_t heads, int64_t topk, int num_sms);
// The plan of a call with a second list (SPEC 10.3): the splits cover the 64-entry tiles of
// both lists, the window list's first (extra_topk 0: the same plan as plan_splits).
SplitPlan plan_decode_splits(int64_t batch, int64_t s_q, int64_t heads, int64_t topk, int64_t extra_topk,
                             int num_sms);

struct DecodeParams {
  const void* q;                 // bf16 [B, s_q, H, d_qk]
  const void* kv_cache;          // any layout of cache/mla_layout.h (see `layout`)
  const int32_t* indices;        // [B, s_q, K]
  const float* attn_sink;        // [H] or nullptr
  const int32_t* topk_length;    // [B] or [B, s_q] or nullptr
  void* out;                     // bf16 [B, s_q, H, 512]
  float* lse;                    // [B, s_q, H]
  float* out_partial;            // fp32 [num_splits, B*s_q, H, 512], only when num_splits > 1
  float* lse_partial;            // fp32 [num_splits, B*s_q, H]
  int64_t batch, s_q, heads, topk, num_slots;
  bool fp8_cache;
  bool per_query_topk_length;
  // Where kv_cache's tokens live: kind (V3.2 FP8 656-byte records, V4 FP8 584-byte pages, bf16),
  // d_qk = layout.dim (576 or 512), block size and page pitch (V4: stride(0)), num_slots.
  cache::MlaCacheLayout layout;
  // The second list of SPEC 10.3 (extra_kv_cache == nullptr without it): same layout kind and
  // dim as kv_cache, its own blocks and pitch; its scores join the same softmax.
  const void* extra_kv_cache;
  const int32_t* extra_indices;        // [B, s_q, K2]
  const int32_t* extra_topk_length;    // [B] or [B, s_q] or nullptr
  int64_t extra_topk;
  bool per_query_extra_topk_length;
  cache::MlaCacheLayout extra_layout;
  float sm_scale;
  SplitPlan plan;
  // Head blocks of 64 on sm_90a: S = Q K^T and O += P V with wgmma instead of mma.sync.
  bool use_wgmma;
};

// The wgmma kernel (64-head blocks, sm_90a) is opt-in with DSA_MLA_DECODE_WGMMA=1 until it has
// been validated on hardware; the mma.sync kernel is the default. Read per call (host only, no
// data dependence), so tests can exercise both. Torch-free so the emulator's entry points
// (csrc/emu/families/mla_decode_emu.cpp) decide exactly as the glue does.
// On Hopper with no sm_90a image loaded (a build without 9.0a in TORCH_CUDA_ARCH_LIST) the
// opt-in returns cudaErrorNoKernelImageForDevice: see common/loaded_image.cuh.
cudaError_t wgmma_opted_in(int device, bool* use_wgmma);

cudaError_t launch_sparse_mla_decode(const DecodeParams& p, cudaStream_t stream);

}  // namespace dsa::mla_decode
