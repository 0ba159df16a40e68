// Emulator entry points of the sparse_mla family (tests/test_emu_sparse_mla.py): the real
// launchers of sparse_mla_launch.cu (rewritten for the host by launch_rewrite.py), called with
// raw pointers exactly as sparse_mla_cuda.cpp calls them once its checks have passed (so the
// caller, like the glue, handles S == 0 or K == 0 without a launch and zeroes dkv_acc). The
// forward kernel is the launcher's choice (the emulator plays an sm_90a device): for 64-head
// blocks DSA_SPARSE_MLA_FWD (emu_set_env) = ws (the default) | wgmma | mma, else mma.sync with
// the largest head block dividing H (16 with a partial last block otherwise). D is d_qk (576 or 512); d_v is 512.
#include "sparse_mla_launch.gen.cu"

extern "C" {

int emu_sparse_mla_fwd(const void* q, const void* kv, const int32_t* indices, const float* attn_sink,
                       const int32_t* topk_length, void* out, float* lse, int64_t T, int64_t S, int64_t H,
                       int64_t K, int64_t D, float sm_scale) {
  dsa::sparse_mla::FwdArgs a{};
  a.q = q;
  a.kv = kv;
  a.indices = indices;
  a.attn_sink = attn_sink;
  a.topk_length = topk_length;
  a.out = out;
  a.lse = lse;
  a.T = T;
  a.S = S;
  a.H = static_cast<int>(H);
  a.K = static_cast<int>(K);
  a.D = static_cast<int>(D);
  a.sm_scale = sm_scale;
  const cudaError_t err = dsa::sparse_mla::fwd_kernel_selected(0, a.H, &a.kernel);
  if (err != cudaSuccess) return err;
  return dsa::sparse_mla::sparse_mla_fwd_launch(a, nullptr);
}

// The deterministic backward's workspace as the glue sizes it (the budget from
// DSA_SPARSE_MLA_DET_SCRATCH_MB, default 64 MiB): sizes[0] = scratch floats ([rows, D], at
// least one row; fixed point: the int64 [S, D] sums), sizes[1] = int32 words (bwd_int_words:
// entry list, row counts, offsets and cursor of S + 1 each, the "list" reduction's row lists,
// the fixed-point maxima), sizes[2] = the entry list's length, sizes[3] = tokens per chunk.
void emu_sparse_mla_bwd_workspace(int64_t T, int64_t S, int64_t H, int64_t K, int64_t D, int64_t* sizes) {
  const auto w = dsa::sparse_mla::sparse_mla_bwd_workspace(
      T, S, static_cast<int>(H), static_cast<int>(K), static_cast<int>(D),
      dsa::sparse_mla::sparse_mla_bwd_scratch_budget());
  sizes[0] = w.scratch_rows * D;
  sizes[1] = dsa::sparse_mla::bwd_int_words(S, w.list_len);
  sizes[2] = w.list_len;
  sizes[3] = w.chunk_tokens;
}

// The workspace helper itself for an explicit budget (bytes; <= 0: none): {chunk_tokens,
// scratch_rows, list_len, scratch bytes, fixed point (0 / 1), dkv rows per fixed-point pass} under the current
// DSA_SPARSE_MLA_DET_REDUCE. Host arithmetic only (tests sweep shapes with it).
void emu_sparse_mla_bwd_workspace_for(int64_t T, int64_t S, int64_t H, int64_t K, int64_t D,
                                      int64_t budget, int64_t* out) {
  const auto w = dsa::sparse_mla::sparse_mla_bwd_workspace(T, S, static_cast<int>(H), static_cast<int>(K),
                                                           static_cast<int>(D), budget);
  out[0] = w.chunk_tokens;
  out[1] = w.scratch_rows;
  out[2] = w.list_len;
  out[3] = w.scratch_bytes(static_cast<int>(D));
  out[4] = w.fixed_point() ? 1 : 0;
  out[5] = w.fixed_rows;
}

// dkv_acc [S, D] fp32 must be zero. scratch / ints: the workspace above (deterministic only).
int emu_sparse_mla_bwd(const void* q, const void* kv, const void* out, const void* dout, const int32_t* indices,
                       const float* lse, const float* attn_sink, const int32_t* topk_length, void* dq,
                       float* dkv_acc, float* scratch, int32_t* ints, int64_t T, int64_t S, int64_t H, int64_t K,
                       int64_t D, float sm_scale, int deterministic) {
  dsa::sparse_mla::BwdArgs a{};
  a.q = q;
  a.kv = kv;
  a.out = out;
  a.dout = dout;
  a.indices = indices;
  a.lse = lse;
  a.attn_sink = attn_sink;
  a.topk_length = topk_length;
  a.dq = dq;
  a.dkv_acc = dkv_acc;
  a.T = T;
  a.S = S;
  a.H = static_cast<int>(H);
  a.K = static_cast<int>(K);
  a.D = static_cast<int>(D);
  a.sm_scale = sm_scale;
  a.deterministic = deterministic != 0;
  const cudaError_t err = dsa::sparse_mla::bwd_kernel_selected(0, a.H, &a.kernel);
  if (err != cudaSuccess) return err;
  if (a.deterministic && T > 0) {
    a.scratch_budget = dsa::sparse_mla::sparse_mla_bwd_scratch_budget();
    int64_t sizes[4];
    emu_sparse_mla_bwd_workspace(T, S, H, K, D, sizes);
    a.scratch = scratch;
    dsa::sparse_mla::bind_bwd_ints(a, ints, S, sizes[2]);
  }
  return dsa::sparse_mla::sparse_mla_bwd_launch(a, nullptr);
}

}  // extern "C"
