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

int emu_sparse_mla_decode(const void* q, const void* kv_cache, const int32_t* indices, const float* attn_sink,
                          const int32_t* topk_length, int per_query_topk_length, void* out, float* lse,
                          float* out_partial, float* lse_partial, int64_t batch, int64_t s_q, int64_t heads,
                          int64_t topk, int64_t num_slots, int fp8_cache, float sm_scale) {
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
  p.fp8_cache = fp8_cache != 0;
  p.per_query_topk_length = per_query_topk_length != 0;
  p.sm_scale = sm_scale;
  p.plan = emulated_plan(batch, s_q, heads, topk);
  p.out_partial = p.plan.num_splits > 1 ? out_partial : nullptr;
  p.lse_partial = p.plan.num_splits > 1 ? lse_partial : nullptr;
  const cudaError_t err = dsa::mla_decode::wgmma_opted_in(0, &p.use_wgmma);
  if (err != cudaSuccess) return err;
  return dsa::mla_decode::launch_sparse_mla_decode(p, nullptr);
}

}  // extern "C"
