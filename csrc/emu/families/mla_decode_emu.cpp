// Emulator entry points of the mla_decode family (tests/test_emu_mla_decode.py): the real
// launcher of mla_decode_launch.cu (rewritten for the host by launch_rewrite.py), called with raw
// pointers exactly as mla_decode_cuda.cpp calls it once its checks have passed. The split plan
// comes from the emulated SM count (DSA_EMU_NUM_SMS) as the glue's comes from the device's; the
// kernel from the launcher's choice (DSA_MLA_DECODE_WGMMA=1 through emu_set_env opts into wgmma).
#include "mla_decode_launch.gen.cu"

namespace {

dsa::mla_decode::SplitPlan emulated_plan(int64_t batch, int64_t s_q, int64_t heads, int64_t topk) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  return dsa::mla_decode::plan_splits(batch, s_q, heads, topk, sms);
}

}  // namespace

extern "C" {

// The split plan a call with these shapes gets: plan[0] = splits, plan[1] = tiles per split
// (the caller sizes out_partial [splits, B*s_q, H, 512] and lse_partial [splits, B*s_q, H]).
void emu_mla_decode_plan(int64_t batch, int64_t s_q, int64_t heads, int64_t topk, int32_t* plan) {
  const dsa::mla_decode::SplitPlan p = emulated_plan(batch, s_q, heads, topk);
  plan[0] = p.num_splits;
  plan[1] = p.tiles_per_split;
}

// The V3.2 entry (656-byte FP8 records or bf16 576 rows, one list): emu_sparse_mla_decode2 with
// the V3.2 layout the glue's check_mla_cache reads off such a cache.
int emu_sparse_mla_decode(const void* q, const void* kv_cache, const int32_t* indices, const float* attn_sink,
                          const int32_t* topk_length, int per_query_topk_length, void* out, float* lse,
                          float* out_partial, float* lse_partial, int64_t batch, int64_t s_q, int64_t heads,
                          int64_t topk, int64_t num_slots, int fp8_cache, float sm_scale);

// The plan of a call with a second list of extra_topk entries (plan_decode_splits).
void emu_mla_decode_plan2(int64_t batch, int64_t s_q, int64_t heads, int64_t topk, int64_t extra_topk,
                          int32_t* plan) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const dsa::mla_decode::SplitPlan p = dsa::mla_decode::plan_decode_splits(batch, s_q, heads, topk, extra_topk, sms);
  plan[0] = p.num_splits;
  plan[1] = p.tiles_per_split;
}

// Any cache layout and the optional second list (SPEC 10.3), as mla_decode_cuda.cpp fills
// DecodeParams: kind 0 V3.2 FP8, 1 V4 FP8, 2 bf16 (cache/mla_layout.h), d_qk 576 or 512; block
// size, page pitch (bytes, V4: stride(0)) and slot count per cache; extra_kv_cache null without
// the second list.
int emu_sparse_mla_decode2(const void* q, int d_qk, int kind, const void* kv_cache, int64_t block_size,
                           int64_t page_pitch, int64_t num_slots, const int32_t* indices, int64_t topk,
                           const int32_t* topk_length, int per_query_topk_length, const void* extra_kv_cache,
                           int64_t extra_block_size, int64_t extra_page_pitch, int64_t extra_num_slots,
                           const int32_t* extra_indices, int64_t extra_topk, const int32_t* extra_topk_length,
                           int per_query_extra_topk_length, const float* attn_sink, void* out, float* lse,
                           float* out_partial, float* lse_partial, int64_t batch, int64_t s_q, int64_t heads,
                           float sm_scale) {
  using dsa::cache::MlaCacheKind;
  auto layout = [&](int64_t bs, int64_t pitch, int64_t slots) {
    dsa::cache::MlaCacheLayout l{};
    l.kind = static_cast<MlaCacheKind>(kind);
    l.dim = d_qk;
    l.block_size = bs;
    l.page_pitch = pitch;
    l.num_slots = slots;
    return l;
  };
  dsa::mla_decode::DecodeParams p{};
  p.q = q;
  p.kv_cache = kv_cache;
  p.indices = indices;
  p.attn_sink = attn_sink;
  p.topk_length = topk_length;
  p.out = out;
  p.lse = lse;
  p.batch = batch;
  p.s_q = s_q;
  p.heads = heads;
  p.topk = topk;
  p.num_slots = num_slots;
  p.fp8_cache = static_cast<MlaCacheKind>(kind) != MlaCacheKind::kBf16;
  p.per_query_topk_length = per_query_topk_length != 0;
  p.layout = layout(block_size, page_pitch, num_slots);
  if (extra_kv_cache != nullptr) {
    p.extra_kv_cache = extra_kv_cache;
    p.extra_indices = extra_indices;
    p.extra_topk_length = extra_topk_length;
    p.extra_topk = extra_topk;
    p.per_query_extra_topk_length = per_query_extra_topk_length != 0;
    p.extra_layout = layout(extra_block_size, extra_page_pitch, extra_num_slots);
  }
  p.sm_scale = sm_scale;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  p.plan = dsa::mla_decode::plan_decode_splits(batch, s_q, heads, topk, p.extra_topk, sms);
  p.out_partial = p.plan.num_splits > 1 ? out_partial : nullptr;
  p.lse_partial = p.plan.num_splits > 1 ? lse_partial : nullptr;
  const cudaError_t err = dsa::mla_decode::wgmma_opted_in(0, &p.use_wgmma);
  if (err != cudaSuccess) return err;
  return dsa::mla_decode::launch_sparse_mla_decode(p, nullptr);
}

int emu_sparse_mla_decode(const void* q, const void* kv_cache, const int32_t* indices, const float* attn_sink,
                          const int32_t* topk_length, int per_query_topk_length, void* out, float* lse,
                          float* out_partial, float* lse_partial, int64_t batch, int64_t s_q, int64_t heads,
                          int64_t topk, int64_t num_slots, int fp8_cache, float sm_scale) {
  // V3.2 caches are runs of equal records: any block size gives the same addresses.
  const int64_t record = fp8_cache ? dsa::cache::kV32RecordBytes : 2 * 576;
  return emu_sparse_mla_decode2(q, 576, fp8_cache ? 0 : 2, kv_cache, 1, record, num_slots, indices, topk,
                                topk_length, per_query_topk_length, nullptr, 0, 0, 0, nullptr, 0, nullptr, 0,
                                attn_sink, out, lse, out_partial, lse_partial, batch, s_q, heads, sm_scale);
}

}  // extern "C"
