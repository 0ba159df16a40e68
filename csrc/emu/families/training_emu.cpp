// Emulator entry points of the training family (tests/test_emu_training.py): the real launchers
// of training_launch.cu (rewritten for the host by launch_rewrite.py), called with raw pointers
// exactly as training_cuda.cpp calls them once its checks have passed (so the caller, like the
// glue, zeroes the fp32 dk accumulator and the row counter). dtype codes: 0 = bf16, 1 = fp32.
#include "training_launch.gen.cu"

namespace {
dsa::training::DType dtype(int code) {
  return code == 0 ? dsa::training::DType::kBFloat16 : dsa::training::DType::kFloat32;
}
}  // namespace

extern "C" {

int emu_training_indexer_cuda_supports(int64_t H, int64_t D) { return dsa::training::indexer_cuda_supports(H, D); }

// Row splits of the deterministic dk kernels (the glue sizes dk_partial [splits, S, D] with it).
int64_t emu_deterministic_dk_splits(int64_t T, int64_t S) { return dsa::training::deterministic_dk_splits(T, S); }

int emu_indexer_train_logits(const void* q, const void* k, const void* w, const int32_t* ks, const int32_t* ke,
                             float* out, int64_t T, int64_t S, int64_t H, int64_t D, int qk_dtype, int w_dtype) {
  dsa::training::LogitsArgs a{};
  a.q = q;
  a.k = k;
  a.w = w;
  a.ks = ks;
  a.ke = ke;
  a.out = out;
  a.T = T;
  a.S = S;
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  return dsa::training::launch_indexer_train_logits(a, dtype(qk_dtype), dtype(w_dtype), nullptr);
}

int emu_indexer_train_logits_bwd(const float* grad, const void* q, const void* k, const void* w, const int32_t* ks,
                                 const int32_t* ke, void* dq, void* dk, void* dw, float* dk32, float* dk_partial, int64_t T, int64_t S,
                                 int64_t H, int64_t D, int qk_dtype, int w_dtype, int deterministic) {
  dsa::training::LogitsBwdArgs a{};
  a.grad = grad;
  a.q = q;
  a.k = k;
  a.w = w;
  a.ks = ks;
  a.ke = ke;
  a.dq = dq;
  a.dw = dw;
  a.dk = dk;
  a.dk32 = dk32;
  a.dk_partial = dk_partial;
  a.T = T;
  a.S = S;
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  return dsa::training::launch_indexer_train_logits_bwd(a, dtype(qk_dtype), dtype(w_dtype), deterministic != 0,
                                                        nullptr);
}

int emu_sparse_attention_target(const void* q, const void* kv, const int32_t* indices, const float* lse,
                                const int32_t* topk_length, float* out, int64_t T, int64_t S, int64_t H, int64_t D,
                                int64_t K, float sm_scale, int qk_dtype) {
  dsa::training::TargetArgs a{};
  a.q = q;
  a.kv = kv;
  a.indices = indices;
  a.lse = lse;
  a.topk_length = topk_length;
  a.out = out;
  a.T = T;
  a.S = S;
  a.K = K;
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  a.sm_scale = sm_scale;
  return dsa::training::launch_sparse_attention_target(a, dtype(qk_dtype), nullptr);
}

// The deterministic sparse loss's workspace as the glue sizes it: sizes[0] = entry_dk floats,
// sizes[1] = entry_ints words.
void emu_sparse_loss_workspace(int64_t T, int64_t S, int64_t K, int64_t D, int64_t* sizes) {
  dsa::training::sparse_loss_workspace(T, S, K, D, sizes);
}
int64_t emu_sparse_loss_chunk_rows(int64_t T, int64_t K, int64_t D) {
  return dsa::training::sparse_loss_chunk_rows(T, K, D);
}

// logits [T, K], row_loss [T]: workspace; count: one int32, zero; dk32 [S, D] zero; entry_dk,
// entry_ints: the deterministic workspace above (else null).
int emu_indexer_kl_loss_sparse(const void* q, const void* k, const void* w, const int32_t* indices,
                               const float* target, const int32_t* topk_length, float* logits, float* row_loss,
                               int32_t* count, float* loss, void* dq, void* dk, void* dw, float* dk32, float* entry_dk,
                               int32_t* entry_ints, int64_t T, int64_t S, int64_t H, int64_t D, int64_t K,
                               int qk_dtype, int w_dtype, int mean, int deterministic) {
  dsa::training::SparseLossArgs a{};
  a.q = q;
  a.k = k;
  a.w = w;
  a.indices = indices;
  a.target = target;
  a.topk_length = topk_length;
  a.logits = logits;
  a.row_loss = row_loss;
  a.dq = dq;
  a.dw = dw;
  a.dk32 = dk32;
  a.entry_dk = entry_dk;
  a.entry_ints = entry_ints;
  a.T = T;
  a.S = S;
  a.K = K;
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  return dsa::training::launch_indexer_kl_loss_sparse(a, dtype(qk_dtype), dtype(w_dtype), mean != 0,
                                                      deterministic != 0, count, loss, dk, nullptr);
}

// main_lse [T, Hm], index_lse [T], row_loss [T]: workspace; count, dk32 as for the sparse loss.
int emu_indexer_kl_loss_dense(const void* q, const void* k, const void* w, const int32_t* ks, const int32_t* ke,
                              const void* q_main, const void* kv_main, float* main_lse, float* index_lse,
                              float* row_loss, int32_t* count, float* loss, void* dq, void* dk, void* dw, float* dk32,
                              float* dk_partial, int64_t T, int64_t S, int64_t H, int64_t D, int64_t Hm, int64_t Dm, float sm_scale,
                              int qk_dtype, int w_dtype, int main_dtype, int mean, int deterministic) {
  dsa::training::DenseLossArgs a{};
  a.q = q;
  a.k = k;
  a.w = w;
  a.ks = ks;
  a.ke = ke;
  a.q_main = q_main;
  a.kv_main = kv_main;
  a.main_lse = main_lse;
  a.index_lse = index_lse;
  a.row_loss = row_loss;
  a.dq = dq;
  a.dw = dw;
  a.dk32 = dk32;
  a.dk_partial = dk_partial;
  a.T = T;
  a.S = S;
  a.H = static_cast<int>(H);
  a.D = static_cast<int>(D);
  a.Hm = static_cast<int>(Hm);
  a.Dm = static_cast<int>(Dm);
  a.sm_scale = sm_scale;
  return dsa::training::launch_indexer_kl_loss_dense(a, dtype(qk_dtype), dtype(w_dtype), dtype(main_dtype), mean != 0,
                                                     deterministic != 0, count, loss, dk, nullptr);
}

}  // extern "C"
