// indexer family: torch-free host launchers. Grid: x = query blocks (128 / H query rows each),
// y = splits of the key axis, so that short batches with long contexts still fill the GPU.
// No host synchronisation (CUDA-graph safe): only launch configuration is computed here.
#include <cstdlib>
#include <cstring>

#include "common/cuda_utils.cuh"
#include "common/loaded_image.cuh"
#include "indexer/indexer_kernels.cuh"
#include "indexer/indexer_launch.h"
#include "indexer/mxfp4_kernels.cuh"

namespace dsa {
namespace {

// Keys per blockIdx.y split, in whole tiles, at most 65535 splits: enough CTAs for ~4 waves of
// 2 resident CTAs per SM, so that few query blocks over long contexts (decode) still fill the
// GPU and the last wave's tail stays short.
int64_t split_cols(int64_t query_blocks, int64_t num_cols) {
  using indexer::kTileKeys;
  const int64_t tiles = ceil_div<int64_t>(num_cols, kTileKeys);
  int64_t splits = ceil_div<int64_t>(8 * current_device_sm_count(), query_blocks);
  splits = splits < 1 ? 1 : (splits > tiles ? tiles : splits);
  int64_t chunk_tiles = ceil_div<int64_t>(tiles, splits);
  if (ceil_div<int64_t>(tiles, chunk_tiles) > 65535) chunk_tiles = ceil_div<int64_t>(tiles, 65535);
  return chunk_tiles * kTileKeys;
}

template <int kHeads, bool kPaged, bool kAllowWgmma, bool kMx = false, bool kBf16 = false>
cudaError_t launch(const indexer::LogitsParams& p, int64_t query_blocks, cudaStream_t stream) {
  auto kernel = indexer::indexer_logits_kernel<kHeads, kPaged, kAllowWgmma, kMx, kBf16>;
  constexpr int smem = kBf16 ? indexer::kSmemBytesBf16 : indexer::smem_bytes<kMx>();
  cudaError_t err =
      ensure_max_dynamic_smem<indexer::indexer_logits_kernel<kHeads, kPaged, kAllowWgmma, kMx, kBf16>>(smem);
  if (err != cudaSuccess) return err;
  const int64_t splits = ceil_div<int64_t>(p.num_cols, p.chunk_cols);
  if (query_blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>(query_blocks), static_cast<unsigned>(splits));
  kernel<<<grid, indexer::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// DSA_INDEXER_MMA=sync forces the mma.sync path on sm_90a (a fallback and a cross-check of the
// wgmma path); the default uses wgmma wherever the build has sm_90a code. DSA_INDEXER_MMA=bf16
// takes the dequantising bf16 path on any image (the sm_80 kernel, timed or cross-checked on
// newer GPUs). Read on every call (a getenv costs far less than a launch) so tests can switch.
bool mma_env_is(const char* value) {
  const char* v = std::getenv("DSA_INDEXER_MMA");
  return v != nullptr && std::strcmp(v, value) == 0;
}
bool allow_wgmma() { return !mma_env_is("sync"); }

template <bool kPaged, bool kMx = false>
cudaError_t dispatch_heads(const indexer::LogitsParams& p, int64_t heads, int64_t query_blocks,
                           cudaStream_t stream) {
  // Which image the driver loaded decides, not the device: an image compiled below sm_89 (an
  // sm_80 / sm_86 cubin, also on a cc 8.9 GPU; compute_80 PTX JIT-compiled on an H100 or B200)
  // has only a trap for e4m3 MMA, so it takes the kernel that dequantises to bf16.
  ImageLevel level = ImageLevel::kBasic;
  if (const cudaError_t err = loaded_image_level(&level); err != cudaSuccess) return err;
  const bool fp8_mma = static_cast<int>(level) >= static_cast<int>(ImageLevel::kFp8Mma);
  if (kMx && !fp8_mma) return kNoKernelImage;   // MXFP4 keys: e4m3 MMA only
  if (!kMx && (!fp8_mma || mma_env_is("bf16"))) {
    if (heads == 64) return launch<64, kPaged, false, false, true>(p, query_blocks, stream);
    if (heads == 32) return launch<32, kPaged, false, false, true>(p, query_blocks, stream);
    return cudaErrorInvalidValue;
  }
  if constexpr (kMx) {   // MXFP4 keys: the mma.sync path only (indexer_kernels.cuh)
    if (heads == 64) return launch<64, kPaged, false, true>(p, query_blocks, stream);
    if (heads == 32) return launch<32, kPaged, false, true>(p, query_blocks, stream);
    return cudaErrorInvalidValue;
  }
  const bool wgmma = allow_wgmma();
  if (heads == 64)
    return wgmma ? launch<64, kPaged, true>(p, query_blocks, stream)
                 : launch<64, kPaged, false>(p, query_blocks, stream);
  if (heads == 32)
    return wgmma ? launch<32, kPaged, true>(p, query_blocks, stream)
                 : launch<32, kPaged, false>(p, query_blocks, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

bool indexer_cuda_supports(int64_t heads, int64_t head_dim) {
  return (heads == 32 || heads == 64) && head_dim == indexer::kHeadDim;
}

namespace {

template <bool kMx>
cudaError_t launch_dense(const uint8_t* q, const uint8_t* k, const float* k_scale,
                         const uint8_t* k_scale_bytes, const float* weights, const int32_t* ks,
                         const int32_t* ke, float* out, int64_t T, int64_t S, int64_t heads,
                         bool clean_logits, cudaStream_t stream) {
  if (!indexer_cuda_supports(heads, indexer::kHeadDim)) return cudaErrorInvalidValue;
  if (T == 0 || S == 0) return cudaSuccess;
  indexer::LogitsParams p{};
  p.q = q;
  p.weights = weights;
  p.out = out;
  p.rows = T;
  p.num_cols = S;
  p.clean_logits = clean_logits;
  p.k = k;
  p.k_scale = k_scale;
  p.k_scale_bytes = k_scale_bytes;
  p.ks = ks;
  p.ke = ke;
  const int64_t query_blocks = ceil_div<int64_t>(T, indexer::kCols / heads);
  p.chunk_cols = split_cols(query_blocks, S);
  return dispatch_heads<false, kMx>(p, heads, query_blocks, stream);
}

template <bool kMx>
cudaError_t launch_paged(const uint8_t* q, const uint8_t* kv_cache, const float* weights,
                         const int32_t* context_lens, bool per_query_lens, const int32_t* block_table,
                         int64_t block_table_stride, float* out, int64_t B, int64_t N, int64_t heads,
                         int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                         int64_t max_context_len, bool clean_logits, cudaStream_t stream) {
  if (!indexer_cuda_supports(heads, indexer::kHeadDim) || block_size <= 0 || block_size % 4 != 0 ||
      block_size > 0x7fffffffLL || max_context_len > 0x7fffffffLL)
    return cudaErrorInvalidValue;   // the kernel's key addressing is 32-bit
  if (B == 0 || N == 0 || max_context_len == 0) return cudaSuccess;
  indexer::LogitsParams p{};
  p.q = q;
  p.weights = weights;
  p.out = out;
  p.rows = B * N;
  p.num_cols = max_context_len;
  p.clean_logits = clean_logits;
  p.cache = kv_cache;
  p.block_table = block_table;
  p.block_table_stride = block_table_stride;
  p.max_blocks = max_blocks;
  p.num_blocks = num_blocks;
  p.block_size = block_size;
  p.block_shift = (block_size & (block_size - 1)) == 0 ? __builtin_ctzll(block_size) : -1;
  p.context_lens = context_lens;
  p.per_query_lens = per_query_lens;
  p.n_per_seq = N;
  p.qblocks_per_seq = ceil_div<int64_t>(N, indexer::kCols / heads);
  const int64_t query_blocks = B * p.qblocks_per_seq;
  p.chunk_cols = split_cols(query_blocks, max_context_len);
  return dispatch_heads<true, kMx>(p, heads, query_blocks, stream);
}

}  // namespace

cudaError_t launch_indexer_logits(const uint8_t* q, const uint8_t* k, const float* k_scale,
                                  const float* weights, const int32_t* ks, const int32_t* ke,
                                  float* out, int64_t T, int64_t S, int64_t heads,
                                  bool clean_logits, cudaStream_t stream) {
  return launch_dense<false>(q, k, k_scale, nullptr, weights, ks, ke, out, T, S, heads, clean_logits, stream);
}

cudaError_t launch_indexer_logits_mxfp4(const uint8_t* q, const uint8_t* k_packed,
                                        const uint8_t* k_scale, const float* weights,
                                        const int32_t* ks, const int32_t* ke, float* out, int64_t T,
                                        int64_t S, int64_t heads, bool clean_logits,
                                        cudaStream_t stream) {
  return launch_dense<true>(q, k_packed, nullptr, k_scale, weights, ks, ke, out, T, S, heads, clean_logits,
                            stream);
}

cudaError_t launch_paged_indexer_logits(const uint8_t* q, const uint8_t* kv_cache,
                                        const float* weights, const int32_t* context_lens,
                                        bool per_query_lens, const int32_t* block_table,
                                        int64_t block_table_stride, float* out, int64_t B,
                                        int64_t N, int64_t heads, int64_t num_blocks,
                                        int64_t block_size, int64_t max_blocks,
                                        int64_t max_context_len, bool clean_logits,
                                        cudaStream_t stream) {
  return launch_paged<false>(q, kv_cache, weights, context_lens, per_query_lens, block_table,
                             block_table_stride, out, B, N, heads, num_blocks, block_size, max_blocks,
                             max_context_len, clean_logits, stream);
}

cudaError_t launch_paged_indexer_logits_mxfp4(const uint8_t* q, const uint8_t* kv_cache,
                                              const float* weights, const int32_t* context_lens,
                                              bool per_query_lens, const int32_t* block_table,
                                              int64_t block_table_stride, float* out, int64_t B,
                                              int64_t N, int64_t heads, int64_t num_blocks,
                                              int64_t block_size, int64_t max_blocks,
                                              int64_t max_context_len, bool clean_logits,
                                              cudaStream_t stream) {
  return launch_paged<true>(q, kv_cache, weights, context_lens, per_query_lens, block_table,
                            block_table_stride, out, B, N, heads, num_blocks, block_size, max_blocks,
                            max_context_len, clean_logits, stream);
}

cudaError_t launch_mxfp4_quantize(const void* x, bool x_bf16, int64_t rows, int64_t D, uint8_t* packed,
                                  uint8_t* scale, const int64_t* slots, int64_t num_slots,
                                  int64_t block_size, cudaStream_t stream) {
  if (D <= 0 || D % mxfp4::kGroup != 0 || (slots != nullptr && block_size <= 0)) return cudaErrorInvalidValue;
  const int64_t groups = rows * (D / mxfp4::kGroup);
  if (groups == 0) return cudaSuccess;
  mxfp4::QuantParams p{x, x_bf16, rows, D, packed, scale, slots, num_slots, block_size};
  const int64_t blocks = ceil_div<int64_t>(groups, 256);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  mxfp4::quantize_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dsa
