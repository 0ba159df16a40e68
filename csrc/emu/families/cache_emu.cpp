// Emulator entry points of the cache family (tests/test_emu_cache.py): the real launchers of
// cache_launch.cu (rewritten for the host by launch_rewrite.py), called with raw pointers exactly
// as cache_cuda.cpp calls them once its checks have passed. Which kernel runs (vectorised or
// scalar quantiser, sub-warp width, 16-byte or byte gather) is the launchers' choice from the
// sizes and the pointers' alignment, as on the device; bf16 inputs are x_bf16 != 0, else fp32.
#include "cache_launch.gen.cu"

namespace {

dsa::cache::InputType input_type(int is_bf16) {
  return is_bf16 ? dsa::cache::InputType::kBFloat16 : dsa::cache::InputType::kFloat32;
}

}  // namespace

extern "C" {

int emu_fp8_quantize(const void* x, int x_bf16, int64_t num_groups, int64_t group_size, int ue8m0, void* x_fp8,
                     float* scale) {
  return dsa::cache::launch_fp8_quantize(x, input_type(x_bf16), num_groups, group_size, ue8m0 != 0, x_fp8,
                                         scale, nullptr);
}

int emu_indexer_k_cache_write(const void* k, int k_bf16, const void* slots, int slots_int64, int64_t n,
                              int64_t head_dim, int ue8m0, void* cache, int64_t num_blocks, int64_t block_size) {
  return dsa::cache::launch_indexer_k_cache_write(k, input_type(k_bf16), slots, slots_int64 != 0, n, head_dim,
                                                  ue8m0 != 0, cache, num_blocks, block_size, nullptr);
}

int emu_indexer_k_cache_gather(const void* cache, int64_t num_blocks, int64_t block_size, int64_t head_dim,
                               const int32_t* block_table, int64_t max_blocks, const int64_t* cu_seqlens,
                               int64_t batch, int64_t total, void* k_fp8, float* k_scale) {
  return dsa::cache::launch_indexer_k_cache_gather(cache, num_blocks, block_size, head_dim, block_table,
                                                   max_blocks, cu_seqlens, batch, total, k_fp8, k_scale, nullptr);
}

// An MLA cache layout from its fields (kind: 0 V3.2 FP8, 1 V4 FP8, 2 bf16); the V3.2 entry
// points below describe a contiguous cache of num_slots tokens as one block.
static dsa::cache::MlaCacheLayout mla_layout(int kind, int dim, int64_t block_size, int64_t page_pitch,
                                             int64_t num_slots) {
  return {static_cast<dsa::cache::MlaCacheKind>(kind), dim, block_size, page_pitch, num_slots};
}

int emu_mla_kv_cache_write_layout(const void* kv, int kv_bf16, const void* slots, int slots_int64, int64_t n,
                                  void* cache, int kind, int dim, int64_t block_size, int64_t page_pitch,
                                  int64_t num_slots) {
  return dsa::cache::launch_mla_kv_cache_write(kv, input_type(kv_bf16), slots, slots_int64 != 0, n, cache,
                                               mla_layout(kind, dim, block_size, page_pitch, num_slots), nullptr);
}

int emu_mla_kv_cache_gather_layout(const void* cache, int kind, int dim, int64_t block_size, int64_t page_pitch,
                                   int64_t num_slots, const void* slots, int slots_int64, int64_t m, void* out) {
  return dsa::cache::launch_mla_kv_cache_gather(cache, mla_layout(kind, dim, block_size, page_pitch, num_slots),
                                                slots, slots_int64 != 0, m, out, nullptr);
}

int emu_mla_kv_cache_write(const void* kv, int kv_bf16, const void* slots, int slots_int64, int64_t n, void* cache,
                           int fp8_cache, int64_t num_slots) {
  const int64_t pitch = num_slots * (fp8_cache ? 656 : 2 * 576);
  return emu_mla_kv_cache_write_layout(kv, kv_bf16, slots, slots_int64, n, cache, fp8_cache ? 0 : 2, 576,
                                       num_slots, pitch, num_slots);
}

int emu_mla_kv_cache_gather(const void* cache, int fp8_cache, int64_t num_slots, const void* slots, int slots_int64,
                            int64_t m, void* out) {
  const int64_t pitch = num_slots * (fp8_cache ? 656 : 2 * 576);
  return emu_mla_kv_cache_gather_layout(cache, fp8_cache ? 0 : 2, 576, num_slots, pitch, num_slots, slots,
                                        slots_int64, m, out);
}

}  // extern "C"
