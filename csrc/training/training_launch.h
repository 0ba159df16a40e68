// training family: torch-free host launchers of the CUDA kernels (called by training_cuda.cpp
// and by the emulator's entry points, csrc/emu/families/training_emu.cpp). All pointers are
// device pointers to contiguous tensors; bf16 / fp32 data is passed as void* with its dtype.
// No host synchronisation: only launch configuration is computed here.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa::training {

enum class DType { kBFloat16, kFloat32 };

struct LogitsArgs {
  const void* q;       // [T, H, D]
  const void* k;       // [S, D], q's dtype
  const void* w;       // [T, H], q's dtype or fp32
  const int32_t* ks;   // [T]
  const int32_t* ke;   // [T]
  float* out;          // [T, S]
  int64_t T, S;
  int64_t chunk;       // keys per blockIdx.y: set by the launcher
  int H, D;
};

struct LogitsBwdArgs {
  const float* grad;   // [T, S] fp32; entries outside a row's range are ignored
  const void* q;
  const void* k;
  const void* w;
  const int32_t* ks;
  const int32_t* ke;
  void* dq;            // [T, H, D], q's dtype
  void* dw;            // [T, H], weights' dtype
  float* dk32;         // [S, D] fp32 accumulator, zeroed by the caller (atomic mode only)
  void* dk;            // [S, D], k's dtype
  float* dk_partial;            // deterministic mode: [deterministic_dk_splits, S, D] fp32 when
                                // that is > 1 (no zeroing needed), else unused
  int64_t T, S;
  int H, D;
};

struct TargetArgs {
  const void* q;                // [T, H, D]
  const void* kv;               // [S, 1, D], q's dtype
  const int32_t* indices;       // [T, K]
  const float* lse;             // [T, H]
  const int32_t* topk_length;   // [T] or null
  float* out;                   // [T, K]
  int64_t T, S, K;
  int H, D;
  int head_chunk;               // set by the launcher
  float sm_scale;
};

struct SparseLossArgs {
  const void* q;
  const void* k;
  const void* w;
  const int32_t* indices;       // [T, K]
  const float* target;          // [T, K] fp32
  const int32_t* topk_length;   // [T] or null
  const int32_t* nonempty_rows; // set by the launcher (mean), else null
  float* logits;                // [T, K] fp32 workspace
  float* row_loss;              // [T] fp32 workspace
  void* dq;                     // [T, H, D], q's dtype
  void* dw;                     // [T, H], weights' dtype
  float* dk32;                  // [S, D] fp32 accumulator zeroed by the caller (both modes)
  // Deterministic mode (sparse_loss_workspace): entry_dk [chunk_rows * K, D] fp32 and
  // entry_ints [3 * (S + 1) + chunk_rows * K] int32, neither needing initialisation.
  float* entry_dk;
  int32_t* entry_ints;
  int64_t row_begin;            // set by the launcher (row chunks)
  int64_t T, S, K;
  int H, D;
};

// The deterministic sparse loss processes rows in chunks of chunk_rows (its entries' dk terms
// take at most 64 MiB); sizes[0] = entry_dk floats, sizes[1] = entry_ints words.
int64_t sparse_loss_chunk_rows(int64_t T, int64_t K, int64_t D);
void sparse_loss_workspace(int64_t T, int64_t S, int64_t K, int64_t D, int64_t* sizes);

struct DenseLossArgs {
  const void* q;
  const void* k;
  const void* w;
  const int32_t* ks;            // [T]
  const int32_t* ke;            // [T]
  const void* q_main;           // [T, Hm, Dm]
  const void* kv_main;          // [S, 1, Dm], q_main's dtype
  float* main_lse;              // [T, Hm] fp32 workspace
  float* index_lse;             // [T] fp32 workspace
  float* row_loss;              // [T] fp32 workspace
  const int32_t* nonempty_rows; // set by the launcher (mean), else null
  void* dq;
  void* dw;
  float* dk32;                  // atomic mode: [S, D] fp32 zeroed by the caller; else null
  float* dk_partial;            // deterministic mode: [deterministic_dk_splits, S, D] fp32 when
                                // that is > 1 (no zeroing needed), else unused
  int64_t T, S;
  int H, D, Hm, Dm;
  int head_chunk;               // set by the launcher
  float sm_scale;
};

// Whether the indexer kernels (logits, backward, sparse loss) serve H heads of dim D: q[t] and a
// 128-key tile in fp32 shared memory must fit the 227 KB a CTA may use (H * D <= 8192 at D = 128).
bool indexer_cuda_supports(int64_t H, int64_t D);
// Whether sparse_attention_target serves head dim D (one head of q plus the warps' kv rows).
bool target_cuda_supports(int64_t D);

// Row splits of the deterministic (key-owned) dk kernels: enough CTAs for about two per SM when
// S has few key tiles. The glue sizes the dk_partial workspace with it (splits * S * D fp32 when
// it is > 1); the launchers ask again and get the same answer.
int64_t deterministic_dk_splits(int64_t T, int64_t S);

cudaError_t launch_indexer_train_logits(LogitsArgs a, DType qk, DType w, cudaStream_t stream);

// deterministic == false: one row-owned kernel; dk is added into a.dk32 with fp32 atomics and
// cast into a.dk. deterministic == true: a.dk32 is unused; a key-owned kernel writes a.dk.
cudaError_t launch_indexer_train_logits_bwd(LogitsBwdArgs a, DType qk, DType w, bool deterministic,
                                            cudaStream_t stream);

cudaError_t launch_sparse_attention_target(TargetArgs a, DType qk, cudaStream_t stream);

// Writes *loss (fp32), dq, dw and dk (k's dtype). Workspace: a.logits [T, K], a.row_loss [T],
// `count` one int32 (zeroed by the caller; mean only), a.dk32 [S, D] zeroed by the caller, and
// in the deterministic mode a.entry_dk / a.entry_ints.
cudaError_t launch_indexer_kl_loss_sparse(SparseLossArgs a, DType qk, DType w, bool mean, bool deterministic,
                                          int32_t* count, float* loss, void* dk, cudaStream_t stream);

// Whether indexer_kl_loss_dense serves these shapes (the indexer's tiles plus one head of q_main
// and a kv_main row per warp in shared memory).
bool dense_loss_cuda_supports(int64_t H, int64_t D, int64_t Dm);

// Writes *loss, dq, dw, dk like the sparse loss. Workspace: a.main_lse [T, Hm], a.index_lse [T],
// a.row_loss [T], `count` (mean), a.dk32 (atomic mode), as there. The key axis is streamed in
// the kernels' 128-key tiles whatever the op's block_size (memory O(T * Hm) either way).
cudaError_t launch_indexer_kl_loss_dense(DenseLossArgs a, DType qk, DType w, DType main, bool mean,
                                         bool deterministic, int32_t* count, float* loss, void* dk,
                                         cudaStream_t stream);

}  // namespace dsa::training
