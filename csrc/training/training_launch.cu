// training family: torch-free host launchers (see training_launch.h). Plain SIMT kernels
// (training_kernels.cuh): they compile for sm_80 and newer without arch-specific paths.
#include <cstdlib>

#include "training/training_kernels.cuh"
#include "training/training_launch.h"

namespace dsa::training {
namespace {

constexpr size_t kMaxSmem = 227 * 1024;
// Shared memory for sparse_attention_target's q chunk: several CTAs per SM.
constexpr size_t kTargetSmem = 48 * 1024;

size_t indexer_smem(int64_t H, int64_t D, Parts parts) {
  return smem_bytes(make_layout(static_cast<int>(H), static_cast<int>(D), parts));
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Calls f(TQ{}, TW{}) with the element types of q/k and of the weights.
template <typename F>
cudaError_t dispatch_types(DType qk, DType w, F&& f) {
  if (qk == DType::kFloat32 && w == DType::kFloat32) return f(float{}, float{});
  if (qk == DType::kBFloat16 && w == DType::kBFloat16) return f(__nv_bfloat16{}, __nv_bfloat16{});
  if (qk == DType::kBFloat16 && w == DType::kFloat32) return f(__nv_bfloat16{}, float{});
  return cudaErrorInvalidValue;  // fp32 q with bf16 weights: the checks refuse it
}

template <typename T>
cudaError_t cast_into(const float* src, void* dst, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int64_t blocks = ceil_div<int64_t>(n, 256);
  if (blocks > 8 * current_device_sm_count()) blocks = 8 * current_device_sm_count();
  cast_f32_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(src, static_cast<T*>(dst), n);
  return cudaGetLastError();
}

bool grid_fits(int64_t x) { return x > 0 && x <= 0x7fffffffLL; }

// A key-owned kernel over (key tiles, row splits), then the splits' ordered sum (several splits
// only; `partial` null means one split). The kernel's trailing parameter is its KeySplit.
template <typename TQ, typename... P, typename... A>
cudaError_t launch_key_owned(void (*kernel)(P...), size_t smem, int64_t T, int64_t S, int64_t D, float* partial,
                             void* dk, cudaStream_t stream, A... args) {
  const int64_t tiles = ceil_div<int64_t>(S, kTileKeys);
  if (tiles == 0) return cudaSuccess;
  if (!grid_fits(tiles)) return cudaErrorInvalidConfiguration;
  const int64_t wanted = partial == nullptr ? 1 : deterministic_dk_splits(T, S);
  KeySplit sp{partial, wanted > 1 ? ceil_div<int64_t>(T, wanted) : (T > 0 ? T : 1)};
  const int64_t splits = wanted > 1 ? ceil_div<int64_t>(T, sp.rows_per_split) : 1;
  if (const cudaError_t err = allow_smem(kernel, smem); err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, smem, stream>>>(args..., sp);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess || splits == 1) return err;
  int64_t blocks = ceil_div<int64_t>(S * D, 256);
  if (blocks > 8 * current_device_sm_count()) blocks = 8 * current_device_sm_count();
  sum_partials_kernel<TQ><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(partial, static_cast<int>(splits), S * D,
                                                                           static_cast<TQ*>(dk));
  return cudaGetLastError();
}

// Heads of q_main per chunk of the dense loss: as many as fit next to the indexer's tiles (and
// at most 64 KB of them).
int dense_head_chunk(int64_t H, int64_t D, int64_t Hm, int64_t Dm, Parts parts) {
  const Layout L = make_layout(static_cast<int>(H), static_cast<int>(D), parts);
  int chunk = static_cast<int>(Hm);
  while (chunk > 1 && (chunk * Dm * 4 > 64 * 1024 ||
                       static_cast<size_t>(make_main_layout(L, static_cast<int>(Dm), chunk).words) * 4 > kMaxSmem))
    chunk = (chunk + 1) / 2;
  return chunk;
}

size_t dense_smem(int64_t H, int64_t D, int64_t Dm, int chunk, Parts parts) {
  const Layout L = make_layout(static_cast<int>(H), static_cast<int>(D), parts);
  return static_cast<size_t>(make_main_layout(L, static_cast<int>(Dm), chunk).words) * 4;
}

}  // namespace

int64_t deterministic_dk_splits(int64_t T, int64_t S) {
  const int64_t tiles = ceil_div<int64_t>(S, kTileKeys);
  if (tiles == 0 || T <= 1) return 1;
  int64_t splits = ceil_div<int64_t>(2 * current_device_sm_count(), tiles);
  const int64_t cap = T < 32 ? T : 32;
  return splits < 1 ? 1 : (splits > cap ? cap : splits);
}

bool indexer_cuda_supports(int64_t H, int64_t D) {
  if (H <= 0 || D <= 0 || H > 4096 || D > 4096) return false;
  const size_t worst = indexer_smem(H, D, Parts::kRowBackward) > indexer_smem(H, D, Parts::kKeyBackward)
                           ? indexer_smem(H, D, Parts::kRowBackward)
                           : indexer_smem(H, D, Parts::kKeyBackward);
  return worst <= kMaxSmem;
}

bool target_cuda_supports(int64_t D) { return D > 0 && target_smem_bytes(static_cast<int>(D), 1) <= kTargetSmem; }

bool dense_loss_cuda_supports(int64_t H, int64_t D, int64_t Dm) {
  if (!indexer_cuda_supports(H, D) || Dm <= 0 || Dm > 16384) return false;
  return dense_smem(H, D, Dm, 1, Parts::kRowBackward) <= kMaxSmem &&
         dense_smem(H, D, Dm, 1, Parts::kKeyBackward) <= kMaxSmem;
}

cudaError_t launch_indexer_train_logits(LogitsArgs a, DType qk, DType w, cudaStream_t stream) {
  if (!indexer_cuda_supports(a.H, a.D)) return cudaErrorInvalidValue;
  if (a.T == 0 || a.S == 0) return cudaSuccess;
  if (!grid_fits(a.T)) return cudaErrorInvalidConfiguration;
  // Key splits (blockIdx.y, whole tiles): about 8 CTAs per SM in all, so that few rows over
  // long contexts still fill the GPU.
  const int64_t tiles = ceil_div<int64_t>(a.S, kTileKeys);
  int64_t splits = ceil_div<int64_t>(8 * current_device_sm_count(), a.T);
  splits = splits < 1 ? 1 : (splits > tiles ? tiles : splits);
  int64_t chunk_tiles = ceil_div<int64_t>(tiles, splits);
  if (ceil_div<int64_t>(tiles, chunk_tiles) > 65535) chunk_tiles = ceil_div<int64_t>(tiles, 65535);
  a.chunk = chunk_tiles * kTileKeys;
  const size_t smem = indexer_smem(a.H, a.D, Parts::kForward);
  const dim3 grid(static_cast<unsigned>(a.T), static_cast<unsigned>(ceil_div<int64_t>(a.S, a.chunk)));
  return dispatch_types(qk, w, [&](auto tq, auto tw) {
    using TQ = decltype(tq);
    using TW = decltype(tw);
    auto kernel = train_logits_kernel<TQ, TW>;
    if (const cudaError_t err = allow_smem(kernel, smem); err != cudaSuccess) return err;
    train_logits_kernel<TQ, TW><<<grid, kThreads, smem, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t launch_indexer_train_logits_bwd(LogitsBwdArgs a, DType qk, DType w, bool deterministic,
                                            cudaStream_t stream) {
  if (!indexer_cuda_supports(a.H, a.D)) return cudaErrorInvalidValue;
  if (a.T == 0 && a.S == 0) return cudaSuccess;
  if (a.T > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (!deterministic && a.S > 0 && a.dk32 == nullptr) return cudaErrorInvalidValue;
  float* const dk32 = a.dk32;
  if (deterministic) a.dk32 = nullptr;
  const size_t row_smem = indexer_smem(a.H, a.D, Parts::kRowBackward);
  const size_t key_smem = indexer_smem(a.H, a.D, Parts::kKeyBackward);
  const int64_t key_tiles = ceil_div<int64_t>(a.S, kTileKeys);
  return dispatch_types(qk, w, [&](auto tq, auto tw) {
    using TQ = decltype(tq);
    using TW = decltype(tw);
    if (a.T > 0) {
      auto row = train_logits_bwd_row_kernel<TQ, TW>;
      if (const cudaError_t err = allow_smem(row, row_smem); err != cudaSuccess) return err;
      train_logits_bwd_row_kernel<TQ, TW><<<static_cast<unsigned>(a.T), kThreads, row_smem, stream>>>(a);
      if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    if (key_tiles == 0) return cudaSuccess;
    if (!deterministic) return cast_into<TQ>(dk32, a.dk, a.S * a.D, stream);
    return launch_key_owned<TQ>(train_logits_bwd_key_kernel<TQ, TW>, key_smem, a.T, a.S, a.D, a.dk_partial, a.dk,
                                stream, a);
  });
}

cudaError_t launch_sparse_attention_target(TargetArgs a, DType qk, cudaStream_t stream) {
  if (!target_cuda_supports(a.D) || a.H <= 0) return cudaErrorInvalidValue;
  if (a.T == 0 || a.K == 0) return cudaSuccess;
  if (!grid_fits(a.T)) return cudaErrorInvalidConfiguration;
  int chunk = a.H;
  while (chunk > 1 && target_smem_bytes(a.D, chunk) > kTargetSmem) chunk = (chunk + 1) / 2;
  a.head_chunk = chunk;
  const size_t smem = target_smem_bytes(a.D, chunk);
  auto go = [&](auto tq) {
    using TQ = decltype(tq);
    sparse_attention_target_kernel<TQ><<<static_cast<unsigned>(a.T), kThreads, smem, stream>>>(a);
    return cudaGetLastError();
  };
  if (qk == DType::kFloat32) return go(float{});
  if (qk == DType::kBFloat16) return go(__nv_bfloat16{});
  return cudaErrorInvalidValue;
}

int64_t sparse_loss_chunk_rows(int64_t T, int64_t K, int64_t D) {
  constexpr int64_t kEntryBytes = 64LL << 20;
  const int64_t per_row = (K > 0 ? K : 1) * D * 4;
  int64_t rows = kEntryBytes / per_row;
  // entry ids are int32 within a chunk
  if (rows * (K > 0 ? K : 1) > 0x7fffffffLL) rows = 0x7fffffffLL / (K > 0 ? K : 1);
  rows = rows < 1 ? 1 : rows;
  // DSA_TRAINING_CHUNK_ROWS caps the chunk (tests: several chunks on small shapes). Read per
  // call on the host; the glue and the launcher ask in the same call, so they agree.
  if (const char* cap = std::getenv("DSA_TRAINING_CHUNK_ROWS"); cap != nullptr && std::atoll(cap) > 0)
    rows = std::atoll(cap) < rows ? std::atoll(cap) : rows;
  return T < rows ? (T > 0 ? T : 1) : rows;
}

void sparse_loss_workspace(int64_t T, int64_t S, int64_t K, int64_t D, int64_t* sizes) {
  const int64_t entries = sparse_loss_chunk_rows(T, K, D) * K;
  sizes[0] = (entries > 0 ? entries : 1) * D;
  sizes[1] = 3 * (S + 1) + (entries > 0 ? entries : 1);
}

cudaError_t launch_indexer_kl_loss_sparse(SparseLossArgs a, DType qk, DType w, bool mean, bool deterministic,
                                          int32_t* count, float* loss, void* dk, cudaStream_t stream) {
  if (!indexer_cuda_supports(a.H, a.D)) return cudaErrorInvalidValue;
  if (a.T > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (mean && count == nullptr) return cudaErrorInvalidValue;
  if (a.S > 0 && a.dk32 == nullptr) return cudaErrorInvalidValue;
  if (deterministic && (a.entry_dk == nullptr || a.entry_ints == nullptr)) return cudaErrorInvalidValue;
  float* const dk32 = a.dk32;
  float* const entry_dk = a.entry_dk;
  a.nonempty_rows = mean ? count : nullptr;
  a.row_begin = 0;
  const size_t row_smem = indexer_smem(a.H, a.D, Parts::kRowBackward);
  return dispatch_types(qk, w, [&](auto tq, auto tw) {
    using TQ = decltype(tq);
    using TW = decltype(tw);
    if (a.T > 0) {
      if (mean) {
        count_nonempty_rows_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(a.T, kThreads)), kThreads, 0, stream>>>(
            a.indices, a.topk_length, a.T, a.S, a.K, count);
        if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
      }
      auto row = sparse_loss_row_kernel<TQ, TW>;
      if (const cudaError_t err = allow_smem(row, row_smem); err != cudaSuccess) return err;
      if (!deterministic) {
        a.entry_dk = nullptr;
        sparse_loss_row_kernel<TQ, TW><<<static_cast<unsigned>(a.T), kThreads, row_smem, stream>>>(a);
        if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
      } else {
        // Row chunks in order: the row kernel writes the chunk's entry terms (no atomics into
        // dk32), the entries are grouped by key, and each key adds its terms in entry order.
        a.dk32 = nullptr;
        int32_t* key_count = a.entry_ints;
        int32_t* key_offset = key_count + (a.S + 1);
        int32_t* key_cursor = key_offset + (a.S + 1);
        int32_t* entry_list = key_cursor + (a.S + 1);
        const int64_t chunk = sparse_loss_chunk_rows(a.T, a.K, a.D);
        for (int64_t r0 = 0; r0 < a.T; r0 += chunk) {
          const int64_t rows = a.T - r0 < chunk ? a.T - r0 : chunk;
          a.row_begin = r0;
          a.entry_dk = entry_dk;
          sparse_loss_row_kernel<TQ, TW><<<static_cast<unsigned>(rows), kThreads, row_smem, stream>>>(a);
          if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
          if (a.K == 0 || a.S == 0) continue;
          if (const cudaError_t err = cudaMemsetAsync(key_count, 0, sizeof(int32_t) * (a.S + 1), stream);
              err != cudaSuccess)
            return err;
          const unsigned entry_blocks = static_cast<unsigned>(ceil_div<int64_t>(rows * a.K, 256));
          count_entries_per_key_kernel<<<entry_blocks, 256, 0, stream>>>(a.indices, a.topk_length, r0, rows, a.S, a.K,
                                                                        key_count);
          scan_key_counts_kernel<<<1, kThreads, 0, stream>>>(key_count, a.S + 1, key_offset, key_cursor);
          scatter_entries_kernel<<<entry_blocks, 256, 0, stream>>>(a.indices, a.topk_length, r0, rows, a.S, a.K,
                                                                  key_cursor, entry_list);
          reduce_entries_per_key_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(a.S, kWarps)), kThreads, 0, stream>>>(
              key_count, key_offset, entry_list, entry_dk, a.S, a.D, dk32);
          if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
        }
      }
    }
    sum_rows_kernel<<<1, kThreads, 0, stream>>>(a.row_loss, a.T, loss);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    return cast_into<TQ>(dk32, dk, a.S * a.D, stream);
  });
}

cudaError_t launch_indexer_kl_loss_dense(DenseLossArgs a, DType qk, DType w, DType main, bool mean,
                                         bool deterministic, int32_t* count, float* loss, void* dk,
                                         cudaStream_t stream) {
  if (!dense_loss_cuda_supports(a.H, a.D, a.Dm) || a.Hm <= 0) return cudaErrorInvalidValue;
  if (a.T > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (mean && count == nullptr) return cudaErrorInvalidValue;
  if (!deterministic && a.S > 0 && a.dk32 == nullptr) return cudaErrorInvalidValue;
  float* const dk32 = a.dk32;
  if (deterministic) a.dk32 = nullptr;
  a.nonempty_rows = mean ? count : nullptr;
  // One chunk size for both kernels (the key kernel's layout is the larger one).
  a.head_chunk = dense_head_chunk(a.H, a.D, a.Hm, a.Dm, Parts::kKeyBackward);
  const int row_chunk = dense_head_chunk(a.H, a.D, a.Hm, a.Dm, Parts::kRowBackward);
  if (row_chunk < a.head_chunk) a.head_chunk = row_chunk;
  const size_t row_smem = dense_smem(a.H, a.D, a.Dm, a.head_chunk, Parts::kRowBackward);
  const size_t key_smem = dense_smem(a.H, a.D, a.Dm, a.head_chunk, Parts::kKeyBackward);
  const int64_t key_tiles = ceil_div<int64_t>(a.S, kTileKeys);
  auto go = [&](auto tq, auto tw, auto tm) {
    using TQ = decltype(tq);
    using TW = decltype(tw);
    using TM = decltype(tm);
    if (a.T > 0) {
      if (mean) {
        count_nonempty_ranges_kernel<<<static_cast<unsigned>(ceil_div<int64_t>(a.T, kThreads)), kThreads, 0, stream>>>(
            a.ks, a.ke, a.T, a.S, count);
        if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
      }
      auto row = dense_loss_row_kernel<TQ, TW, TM>;
      if (const cudaError_t err = allow_smem(row, row_smem); err != cudaSuccess) return err;
      dense_loss_row_kernel<TQ, TW, TM><<<static_cast<unsigned>(a.T), kThreads, row_smem, stream>>>(a);
      if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    }
    sum_rows_kernel<<<1, kThreads, 0, stream>>>(a.row_loss, a.T, loss);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    if (key_tiles == 0) return cudaSuccess;
    if (!deterministic) return cast_into<TQ>(dk32, dk, a.S * a.D, stream);
    return launch_key_owned<TQ>(dense_loss_key_kernel<TQ, TW, TM>, key_smem, a.T, a.S, a.D, a.dk_partial, dk,
                                stream, a, dk);
  };
  return dispatch_types(qk, w, [&](auto tq, auto tw) {
    if (main == DType::kBFloat16) return go(tq, tw, __nv_bfloat16{});
    return go(tq, tw, float{});
  });
}

}  // namespace dsa::training
