// training family: torch-free device code of the indexer in training precision (SPEC 7).
//
//   I[t,s] = sum_h w[t,h] relu(q[t,h] . k[s])        (ks[t] <= s < ke[t], clamped to [0, S])
//   dw[t,h] = sum_s g relu(z), dq[t,h] = sum_s g w 1[z>0] k[s], dk[s] = sum_t sum_h g w 1[z>0] q[t,h]
//
// Structure. Every kernel works on one query row's q[t] (all heads, fp32 in shared memory,
// heads padded to a multiple of 4 with zeros) against a tile of kTileKeys key rows (fp32 in
// shared memory, row pitch D + 1 so that a thread per key reads its row without bank
// conflicts). In the score phase thread `key` computes z = q[t,h] . k[key] for four heads at a
// time (one k load feeds four FMAs against broadcast q loads).
//
// Performance model (SIMT, fp32 FMA; a correct, coalesced, shared-memory-tiled first version,
// no tensor cores). The forward costs H*D FMAs per (t, s) and 5 shared loads per 4 FMAs (one k
// load, four broadcast q loads), so it is bound by shared-memory bandwidth, not by the FMA
// pipes; global traffic is one read of q[t] per CTA and one read of each key tile per (row,
// tile) pair (from L2 for all but the first row). The backward repeats the score phase and adds
// two products of the same size (dq: coef x k, dk: coef^T x q): ~3x the forward. At H = 64,
// D = 128 a row CTA holds ~163 KB of shared memory, so one CTA (4 warps) per SM: latency is
// hidden poorly. None of this has been measured on a GPU yet (no device in the sessions that
// wrote it); bf16 mma.sync tiles and smaller fp32 staging are the obvious next steps.
//
// Ownership and determinism. The row kernels own their query row: dq[t] and dw[t] are summed by
// one thread each in key order, so they are deterministic. dk is summed over queries: in the
// atomic mode the row kernel adds its tile's contribution with fp32 atomics into a zeroed fp32
// [S, D] buffer; in the deterministic mode a key kernel owns a tile of keys and loops over the
// query rows of its split in order, and the splits' fp32 partials are added in split order (no
// [T, S] scratch in either mode).
//
// Index values are not trusted: ks/ke are clamped to [0, S]; a selected index that is negative,
// >= S, or at j >= topk_length[t] is never dereferenced (its key row is zeros, its gradient 0).
// Offsets that can exceed int32 (t*S, s*D, t*H*D, t*K) are computed in int64.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "training/training_launch.h"

namespace dsa::training {

constexpr int kThreads = 128;    // one thread per key of a tile in the score phase
constexpr int kTileKeys = kThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kHeadGroup = 4;    // heads per score-phase step (register blocking)

__host__ __device__ constexpr int padded_heads(int H) { return (H + kHeadGroup - 1) / kHeadGroup * kHeadGroup; }
__host__ __device__ constexpr int key_pitch(int D) { return D + 1; }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Shared-memory layout (in floats) of the indexer kernels, identical on host (sizing) and
// device (carving). Only the parts a kernel uses are sized for it.
struct Layout {
  int Hp, D, ldk;
  int q, w, k, coef, red, acc, dw, rows;  // offsets in 4-byte words
  int words;
};
enum class Parts { kForward, kRowBackward, kKeyBackward };

__host__ __device__ inline Layout make_layout(int H, int D, Parts parts) {
  Layout L{};
  L.Hp = padded_heads(H);
  L.D = D;
  L.ldk = key_pitch(D);
  int o = 0;
  L.q = o; o += L.Hp * D;
  L.w = o; o += L.Hp;
  L.rows = o; o += kTileKeys;          // gathered key rows (int32), -1 = none
  L.k = o; o += kTileKeys * L.ldk;
  L.coef = L.red = L.acc = L.dw = o;
  if (parts != Parts::kForward) {
    L.coef = o; o += L.Hp * kTileKeys;
    L.red = o; o += kWarps * (L.Hp > kTileKeys ? L.Hp : kTileKeys);
    L.acc = o; o += parts == Parts::kRowBackward ? L.Hp * D : kTileKeys * D;
    L.dw = o; o += L.Hp;
  }
  L.words = o;
  return L;
}
__host__ __device__ inline size_t smem_bytes(const Layout& L) { return static_cast<size_t>(L.words) * 4; }

// ---- small helpers ----------------------------------------------------------------------------

struct RowRange {
  int64_t lo, hi;  // clamped, hi >= lo
};
__device__ __forceinline__ RowRange row_range(const int32_t* ks, const int32_t* ke, int64_t t, int64_t S) {
  int64_t lo = ks[t], hi = ke[t];
  lo = lo < 0 ? 0 : (lo > S ? S : lo);
  hi = hi < 0 ? 0 : (hi > S ? S : hi);
  return {lo, hi < lo ? lo : hi};
}

// Number of leading entries of row t that may be valid (topk_length clamped to [0, K]).
__device__ __forceinline__ int64_t row_entries(const int32_t* topk_length, int64_t t, int64_t K) {
  if (topk_length == nullptr) return K;
  const int64_t n = topk_length[t];
  return n < 0 ? 0 : (n > K ? K : n);
}

struct SumOp {
  static constexpr float kIdentity = 0.f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  static constexpr float kIdentity = -INFINITY;
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, SumOp{}); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, MaxOp{}); }

// Block-wide sum / max in a fixed order (warp butterfly, then warps 0..kWarps-1), the result
// in every thread. `red` holds kWarps words; the caller's next write to it must follow a barrier
// (each call ends with one).
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* red, Op op) {
  v = warp_reduce(v, op);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = Op::kIdentity;
  for (int w = 0; w < kWarps; ++w) r = op(r, red[w]);
  __syncthreads();
  return r;
}
__device__ __forceinline__ float block_sum(float v, float* red) { return block_reduce(v, red, SumOp{}); }
__device__ __forceinline__ float block_max(float v, float* red) { return block_reduce(v, red, MaxOp{}); }

// Per-warp partial results of a block reduction in static shared memory.
struct WarpPartials {
  float v[kWarps];
};

// q[t] (H x D) and w[t] into shared memory as fp32, heads padded with zeros.
template <typename TQ, typename TW>
__device__ __forceinline__ void load_query_row(const TQ* q, const TW* w, int64_t t, int H, int D, const Layout& L,
                                               float* sm) {
  const TQ* qt = q + t * H * D;
  for (int e = threadIdx.x; e < L.Hp * D; e += kThreads) sm[L.q + e] = e < H * D ? to_f32(qt[e]) : 0.f;
  for (int h = threadIdx.x; h < L.Hp; h += kThreads) sm[L.w + h] = h < H ? to_f32(w[t * H + h]) : 0.f;
}

// Key rows into the tile: row `key` is k[rows[key]] (rows in shared memory, -1 = zeros).
// Threads walk (key, d) with d fastest, so a warp reads D-contiguous runs of one key row.
template <typename TQ>
__device__ __forceinline__ void load_key_tile(const TQ* k, int D, const Layout& L, float* sm) {
  const int32_t* rows = reinterpret_cast<const int32_t*>(sm + L.rows);
  for (int e = threadIdx.x; e < kTileKeys * D; e += kThreads) {
    const int key = e / D, d = e - key * D;
    const int32_t r = rows[key];
    sm[L.k + key * L.ldk + d] = r >= 0 ? to_f32(k[static_cast<int64_t>(r) * D + d]) : 0.f;
  }
}

// Key rows s0 .. s0 + n - 1 (n <= kTileKeys) as the tile's rows.
__device__ __forceinline__ void set_contiguous_rows(int64_t s0, int n, const Layout& L, float* sm) {
  int32_t* rows = reinterpret_cast<int32_t*>(sm + L.rows);
  for (int key = threadIdx.x; key < kTileKeys; key += kThreads) rows[key] = key < n ? static_cast<int32_t>(s0 + key) : -1;
}

// Score phase of the calling thread's key: f(h, z) for every padded head h, z = q[t,h] . k[key].
template <typename F>
__device__ __forceinline__ void for_each_head_score(const Layout& L, const float* sm, int key, F&& f) {
  const float* krow = sm + L.k + key * L.ldk;
  const int D = L.D;
  for (int h0 = 0; h0 < L.Hp; h0 += kHeadGroup) {
    const float* qh = sm + L.q + h0 * D;
    float z0 = 0.f, z1 = 0.f, z2 = 0.f, z3 = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kv = krow[d];
      z0 = fmaf(qh[d], kv, z0);
      z1 = fmaf(qh[D + d], kv, z1);
      z2 = fmaf(qh[2 * D + d], kv, z2);
      z3 = fmaf(qh[3 * D + d], kv, z3);
    }
    f(h0, z0);
    f(h0 + 1, z1);
    f(h0 + 2, z2);
    f(h0 + 3, z3);
  }
}

// The indexer logit of the calling thread's key: sum_h w[h] relu(z_h).
__device__ __forceinline__ float key_logit(const Layout& L, const float* sm) {
  float logit = 0.f;
  const float* w = sm + L.w;
  for_each_head_score(L, sm, threadIdx.x, [&](int h, float z) { logit = fmaf(w[h], fmaxf(z, 0.f), logit); });
  return logit;
}

// Backward of one tile of a row-owned kernel, after the tile's keys are loaded. `g` is the
// calling thread's key's dL/dI (0 for no key). Adds the tile's terms to dw (L.dw, per head) and
// dq (L.acc, [Hp, D]); with dk32 != nullptr also adds dk of every tile row with fp32 atomics
// (rows from L.rows, so duplicates within a tile each add their own term); with entry_dk !=
// nullptr instead writes each valid tile row's term to entry_dk[j * D ..] (the deterministic
// sparse loss sums them per key afterwards). Ends with a barrier.
__device__ __forceinline__ void row_backward_tile(const Layout& L, float* sm, float g, int H, float* dk32,
                                                  float* entry_dk = nullptr) {
  const int key = threadIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* coef = sm + L.coef;
  float* red = sm + L.red;
  const float* w = sm + L.w;
  for_each_head_score(L, sm, key, [&](int h, float z) {
    coef[h * kTileKeys + key] = z > 0.f ? g * w[h] : 0.f;
    const float part = warp_sum(g * fmaxf(z, 0.f));
    if (lane == 0) red[warp * L.Hp + h] = part;
  });
  __syncthreads();
  for (int h = threadIdx.x; h < L.Hp; h += kThreads) {
    float s = 0.f;
    for (int wi = 0; wi < kWarps; ++wi) s += red[wi * L.Hp + h];
    sm[L.dw + h] += s;
  }
  const int D = L.D;
  const float* kt = sm + L.k;
  for (int e = threadIdx.x; e < H * D; e += kThreads) {
    const int h = e / D, d = e - h * D;
    const float* c = coef + h * kTileKeys;
    float s = 0.f;
    for (int j = 0; j < kTileKeys; ++j) s = fmaf(c[j], kt[j * L.ldk + d], s);
    sm[L.acc + e] += s;
  }
  if (dk32 != nullptr || entry_dk != nullptr) {
    const int32_t* rows = reinterpret_cast<const int32_t*>(sm + L.rows);
    for (int e = threadIdx.x; e < kTileKeys * D; e += kThreads) {
      const int j = e / D, d = e - j * D;
      if (rows[j] < 0) continue;
      float s = 0.f;
      for (int h = 0; h < H; ++h) s = fmaf(coef[h * kTileKeys + j], sm[L.q + h * D + d], s);
      if (entry_dk != nullptr)
        entry_dk[e] = s;
      else if (s != 0.f)
        atomicAdd(dk32 + static_cast<int64_t>(rows[j]) * D + d, s);
    }
  }
  __syncthreads();
}

__device__ __forceinline__ void zero_words(float* p, int n) {
  for (int e = threadIdx.x; e < n; e += kThreads) p[e] = 0.f;
}

// Writes the row's dq (L.acc) and dw (L.dw) in the output dtypes.
template <typename TQ, typename TW>
__device__ __forceinline__ void store_row_grads(const Layout& L, const float* sm, int64_t t, int H, TQ* dq, TW* dw) {
  const int D = L.D;
  for (int e = threadIdx.x; e < H * D; e += kThreads) dq[t * H * D + e] = from_f32<TQ>(sm[L.acc + e]);
  for (int h = threadIdx.x; h < H; h += kThreads) dw[t * H + h] = from_f32<TW>(sm[L.dw + h]);
}

// ---- indexer_train_logits forward --------------------------------------------------------------


// grid (T, ceil(S / chunk)): CTA (t, c) writes out[t, c*chunk .. +chunk), -inf outside the row's
// range, and computes only the tiles inside it.
template <typename TQ, typename TW>
__global__ void __launch_bounds__(kThreads) train_logits_kernel(LogitsArgs a) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* sm = reinterpret_cast<float*>(smem_raw);
  const Layout L = make_layout(a.H, a.D, Parts::kForward);
  const int64_t t = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * a.chunk;
  const int64_t c1 = c0 + a.chunk < a.S ? c0 + a.chunk : a.S;
  const RowRange r = row_range(a.ks, a.ke, t, a.S);
  float* out = a.out + t * a.S;
  for (int64_t s = c0 + threadIdx.x; s < c1; s += kThreads)
    if (s < r.lo || s >= r.hi) out[s] = -INFINITY;
  const int64_t lo = r.lo > c0 ? r.lo : c0, hi = r.hi < c1 ? r.hi : c1;
  if (lo >= hi) return;
  load_query_row(static_cast<const TQ*>(a.q), static_cast<const TW*>(a.w), t, a.H, a.D, L, sm);
  for (int64_t s0 = lo; s0 < hi; s0 += kTileKeys) {
    const int n = static_cast<int>(hi - s0 < kTileKeys ? hi - s0 : kTileKeys);
    __syncthreads();  // the previous tile's readers are done
    set_contiguous_rows(s0, n, L, sm);
    __syncthreads();
    load_key_tile(static_cast<const TQ*>(a.k), a.D, L, sm);
    __syncthreads();
    const float logit = key_logit(L, sm);
    if (static_cast<int>(threadIdx.x) < n) out[s0 + threadIdx.x] = logit;
  }
}

// ---- indexer_train_logits backward -------------------------------------------------------------


// grid (T): the CTA owns row t (dq[t], dw[t]) and walks the tiles of its range.
template <typename TQ, typename TW>
__global__ void __launch_bounds__(kThreads) train_logits_bwd_row_kernel(LogitsBwdArgs a) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* sm = reinterpret_cast<float*>(smem_raw);
  const Layout L = make_layout(a.H, a.D, Parts::kRowBackward);
  const int64_t t = blockIdx.x;
  const RowRange r = row_range(a.ks, a.ke, t, a.S);
  load_query_row(static_cast<const TQ*>(a.q), static_cast<const TW*>(a.w), t, a.H, a.D, L, sm);
  zero_words(sm + L.acc, L.Hp * a.D);
  zero_words(sm + L.dw, L.Hp);
  for (int64_t s0 = r.lo; s0 < r.hi; s0 += kTileKeys) {
    const int n = static_cast<int>(r.hi - s0 < kTileKeys ? r.hi - s0 : kTileKeys);
    set_contiguous_rows(s0, n, L, sm);
    __syncthreads();
    load_key_tile(static_cast<const TQ*>(a.k), a.D, L, sm);
    __syncthreads();
    const float g = static_cast<int>(threadIdx.x) < n ? a.grad[t * a.S + s0 + threadIdx.x] : 0.f;
    row_backward_tile(L, sm, g, a.H, a.dk32);
  }
  __syncthreads();
  store_row_grads(L, sm, t, a.H, static_cast<TQ*>(a.dq), static_cast<TW*>(a.dw));
}

// ---- key-owned (deterministic) dk: the rows of a split --------------------------------------------
//
// A key kernel's grid is (key tiles, row splits): CTA (x, y) sums the rows of split y in order
// for its keys. With one split it writes dk itself; with several each writes its fp32 partial
// sums ([split, S, D]) and sum_partials_kernel adds the splits in order, so the result does
// not depend on scheduling either way.
struct KeySplit {
  float* partial;           // [gridDim.y, S, D] fp32 when gridDim.y > 1
  int64_t rows_per_split;
};

__device__ __forceinline__ void split_rows(const KeySplit& sp, int64_t T, int64_t* t0, int64_t* t1) {
  *t0 = static_cast<int64_t>(blockIdx.y) * sp.rows_per_split;
  *t1 = *t0 + sp.rows_per_split < T ? *t0 + sp.rows_per_split : T;
}

// The tile's accumulated dk (L.acc, [kTileKeys, D]) into dk (TQ) or the split's partial.
// dk of the tile's n keys += Σ_h coef[h, key] · q[t, h] for the row staged in shared memory
// (coef = g · w[h] where q·k > 0, else 0), in a fixed head order.
__device__ __forceinline__ void accumulate_key_grads(const Layout& L, float* sm, const float* coef, int n,
                                                     int D, int H) {
  for (int e = threadIdx.x; e < n * D; e += kThreads) {
    const int j = e / D, d = e - j * D;
    float v = 0.f;
    for (int h = 0; h < H; ++h) v = fmaf(coef[h * kTileKeys + j], sm[L.q + h * D + d], v);
    sm[L.acc + e] += v;
  }
}

template <typename TQ>
__device__ __forceinline__ void store_key_grads(const Layout& L, const float* sm, int64_t s0, int n, int64_t S,
                                                void* dk, const KeySplit& sp) {
  const int D = L.D;
  if (gridDim.y == 1) {
    TQ* out = static_cast<TQ*>(dk);
    for (int e = threadIdx.x; e < n * D; e += kThreads) out[s0 * D + e] = from_f32<TQ>(sm[L.acc + e]);
  } else {
    float* out = sp.partial + static_cast<int64_t>(blockIdx.y) * S * D;
    for (int e = threadIdx.x; e < n * D; e += kThreads) out[s0 * D + e] = sm[L.acc + e];
  }
}

// dst[i] = sum over splits in order of partial[split, i].
template <typename T>
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* partial, int splits, int64_t n, T* dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * 256) {
    float v = 0.f;
    for (int y = 0; y < splits; ++y) v += partial[y * n + i];
    dst[i] = from_f32<T>(v);
  }
}

// grid (ceil(S / kTileKeys), splits): deterministic dk. The CTA owns keys s0 .. s0 + kTileKeys - 1 and
// loops over every query row in order; rows whose range misses the tile are skipped.
template <typename TQ, typename TW>
__global__ void __launch_bounds__(kThreads) train_logits_bwd_key_kernel(LogitsBwdArgs a, KeySplit sp) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* sm = reinterpret_cast<float*>(smem_raw);
  const Layout L = make_layout(a.H, a.D, Parts::kKeyBackward);
  const int D = a.D;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kTileKeys;
  const int n = static_cast<int>(a.S - s0 < kTileKeys ? a.S - s0 : kTileKeys);
  set_contiguous_rows(s0, n, L, sm);
  zero_words(sm + L.acc, kTileKeys * D);
  __syncthreads();
  load_key_tile(static_cast<const TQ*>(a.k), D, L, sm);
  float* coef = sm + L.coef;
  const int key = threadIdx.x;
  int64_t t_begin, t_end;
  split_rows(sp, a.T, &t_begin, &t_end);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const RowRange r = row_range(a.ks, a.ke, t, a.S);
    if (r.hi <= s0 || r.lo >= s0 + n) continue;  // uniform: every thread reads the same ks/ke
    __syncthreads();  // the previous row's readers of q / coef are done
    load_query_row(static_cast<const TQ*>(a.q), static_cast<const TW*>(a.w), t, a.H, D, L, sm);
    __syncthreads();
    const int64_t s = s0 + key;
    const float g = key < n && s >= r.lo && s < r.hi ? a.grad[t * a.S + s] : 0.f;
    const float* w = sm + L.w;
    for_each_head_score(L, sm, key, [&](int h, float z) { coef[h * kTileKeys + key] = z > 0.f ? g * w[h] : 0.f; });
    __syncthreads();
    accumulate_key_grads(L, sm, coef, n, D, a.H);
  }
  __syncthreads();
  store_key_grads<TQ>(L, sm, s0, n, a.S, a.dk, sp);
}

// fp32 -> output dtype (the atomic mode's dk).
template <typename T>
__global__ void __launch_bounds__(256) cast_f32_kernel(const float* src, T* dst, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x; i < n; i += static_cast<int64_t>(gridDim.x) * 256)
    dst[i] = from_f32<T>(src[i]);
}

// ---- sparse_attention_target --------------------------------------------------------------------


__host__ __device__ inline size_t target_smem_bytes(int D, int head_chunk) {
  return 4 * (static_cast<size_t>(head_chunk) * D + head_chunk + static_cast<size_t>(kWarps) * D);
}

// grid (T): warp w owns entries j = w, w + kWarps, ... of row t (the same ones in every head
// chunk, so its running sum in out[t, j] is read and written by that warp's lane 0 only). Per
// entry the warp stages kv[idx] in its shared row and reduces one dot product per head.
// Cost model: H*D FMAs per (t, j) over 32 lanes plus 5 shuffles per head.
template <typename TQ>
__global__ void __launch_bounds__(kThreads) sparse_attention_target_kernel(TargetArgs a) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* sm = reinterpret_cast<float*>(smem_raw);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int D = a.D, HC = a.head_chunk;
  float* qs = sm;
  float* lse_s = sm + HC * D;
  float* kvrow = lse_s + HC + warp * D;
  const int64_t t = blockIdx.x;
  const int64_t n_entries = row_entries(a.topk_length, t, a.K);
  const TQ* q = static_cast<const TQ*>(a.q) + t * a.H * D;
  const TQ* kv = static_cast<const TQ*>(a.kv);
  float* out = a.out + t * a.K;
  for (int h0 = 0; h0 < a.H; h0 += HC) {
    const int hn = a.H - h0 < HC ? a.H - h0 : HC;
    __syncthreads();
    for (int e = threadIdx.x; e < hn * D; e += kThreads) qs[e] = to_f32(q[h0 * D + e]);
    for (int h = threadIdx.x; h < hn; h += kThreads) lse_s[h] = a.lse[t * a.H + h0 + h];
    __syncthreads();
    for (int64_t j = warp; j < a.K; j += kWarps) {
      const int32_t idx = a.indices[t * a.K + j];
      const bool valid = j < n_entries && idx >= 0 && idx < a.S;
      float acc = 0.f;
      if (valid) {
        __syncwarp();
        for (int d = lane; d < D; d += 32) kvrow[d] = to_f32(kv[static_cast<int64_t>(idx) * D + d]);
        __syncwarp();
        for (int h = 0; h < hn; ++h) {
          float part = 0.f;
          for (int d = lane; d < D; d += 32) part = fmaf(qs[h * D + d], kvrow[d], part);
          const float z = warp_sum(part);
          const float l = lse_s[h];
          if (l != -INFINITY) acc += __expf(a.sm_scale * z - l);
        }
      }
      if (lane == 0) {
        const float sum = (h0 == 0 ? 0.f : out[j]) + acc;
        out[j] = h0 + hn >= a.H ? (valid ? sum / static_cast<float>(a.H) : 0.f) : sum;
      }
    }
  }
}

// ---- indexer_kl_loss_sparse -----------------------------------------------------------------------


__device__ __forceinline__ bool entry_valid(const SparseLossArgs& a, int64_t t, int64_t j, int64_t n_entries,
                                            int32_t* idx_out) {
  if (j >= n_entries) return false;
  const int32_t idx = a.indices[t * a.K + j];
  *idx_out = idx;
  return idx >= 0 && idx < a.S;
}

// The tile's rows for entries j0 .. j0 + kTileKeys - 1 of row t (-1 where invalid).
__device__ __forceinline__ void set_selected_rows(const SparseLossArgs& a, int64_t t, int64_t j0, int64_t n_entries,
                                                  const Layout& L, float* sm) {
  int32_t* rows = reinterpret_cast<int32_t*>(sm + L.rows);
  for (int jj = threadIdx.x; jj < kTileKeys; jj += kThreads) {
    int32_t idx = -1;
    rows[jj] = j0 + jj < a.K && entry_valid(a, t, j0 + jj, n_entries, &idx) ? idx : -1;
  }
}

// grid (ceil(T / kThreads)): counts rows with at least one valid entry (integer atomics: exact).
__global__ void __launch_bounds__(kThreads) count_nonempty_rows_kernel(const int32_t* indices, const int32_t* topk_length,
                                                                      int64_t T, int64_t S, int64_t K, int32_t* count) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= T) return;
  const int64_t n = row_entries(topk_length, t, K);
  for (int64_t j = 0; j < n; ++j) {
    const int32_t idx = indices[t * K + j];
    if (idx >= 0 && idx < S) {
      atomicAdd(count, 1);
      return;
    }
  }
}

// grid (rows of the call, from a.row_begin): row t. Pass 1: logits of the valid entries into the workspace; the row's softmax
// (block max / sum in a fixed order), its loss and dL/dI_j = (sum p) r_j - p_j (scaled for
// "mean"), written over the logits. Pass 2: the tiles again, backward into dq, dw (owned) and
// dk (atomic mode; or each entry's term into a.entry_dk, deterministic mode).
template <typename TQ, typename TW>
__global__ void __launch_bounds__(kThreads) sparse_loss_row_kernel(SparseLossArgs a) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* sm = reinterpret_cast<float*>(smem_raw);
  const Layout L = make_layout(a.H, a.D, Parts::kRowBackward);
  const int64_t t = a.row_begin + blockIdx.x;
  const int64_t n_entries = row_entries(a.topk_length, t, a.K);
  const int32_t* rows = reinterpret_cast<const int32_t*>(sm + L.rows);
  float* lg = a.logits + t * a.K;
  // Deterministic mode: this row's entries' dk terms, [K, D] at its place in the chunk.
  float* entry_dk = a.entry_dk == nullptr ? nullptr : a.entry_dk + (t - a.row_begin) * a.K * a.D;
  const float* p = a.target + t * a.K;
  load_query_row(static_cast<const TQ*>(a.q), static_cast<const TW*>(a.w), t, a.H, a.D, L, sm);
  zero_words(sm + L.acc, L.Hp * a.D);
  zero_words(sm + L.dw, L.Hp);
  for (int64_t j0 = 0; j0 < a.K; j0 += kTileKeys) {
    __syncthreads();
    set_selected_rows(a, t, j0, n_entries, L, sm);
    __syncthreads();
    load_key_tile(static_cast<const TQ*>(a.k), a.D, L, sm);
    __syncthreads();
    const float logit = key_logit(L, sm);
    const int64_t j = j0 + threadIdx.x;
    if (j < a.K) lg[j] = rows[threadIdx.x] >= 0 ? logit : -INFINITY;
  }
  __syncthreads();
  // Each thread revisits exactly the entries it wrote (j = j0 + threadIdx.x), so the workspace
  // is read back without a cross-thread dependence; the block reductions combine them.
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < a.K; j += kThreads) m = fmaxf(m, lg[j]);
  float* red = sm + L.red;
  m = block_max(m, red);
  float se = 0.f, ps = 0.f;
  if (m != -INFINITY) {
    for (int64_t j = threadIdx.x; j < a.K; j += kThreads)
      if (lg[j] != -INFINITY) {
        se += __expf(lg[j] - m);
        ps += p[j];
      }
  }
  se = block_sum(se, red);
  ps = block_sum(ps, red);
  const bool empty = m == -INFINITY;
  const float lse = empty ? 0.f : m + __logf(se);
  float scale = 1.f;
  if (a.nonempty_rows != nullptr) {
    const int32_t c = *a.nonempty_rows;
    scale = 1.f / static_cast<float>(c > 0 ? c : 1);
  }
  float loss = 0.f;
  for (int64_t j = threadIdx.x; j < a.K; j += kThreads) {
    const float x = lg[j];
    float g = 0.f;
    if (x != -INFINITY) {
      const float pj = p[j];
      const float log_r = x - lse;
      if (pj > 0.f) loss += pj * (__logf(pj) - log_r);
      g = (ps * __expf(log_r) - pj) * scale;
    }
    lg[j] = g;
  }
  loss = block_sum(loss, red);
  if (threadIdx.x == 0) a.row_loss[t] = empty ? 0.f : loss * scale;
  if (empty) {
    __syncthreads();
    store_row_grads(L, sm, t, a.H, static_cast<TQ*>(a.dq), static_cast<TW*>(a.dw));
    return;
  }
  for (int64_t j0 = 0; j0 < a.K; j0 += kTileKeys) {
    set_selected_rows(a, t, j0, n_entries, L, sm);
    __syncthreads();
    load_key_tile(static_cast<const TQ*>(a.k), a.D, L, sm);
    __syncthreads();
    const int64_t j = j0 + threadIdx.x;
    const float g = j < a.K && rows[threadIdx.x] >= 0 ? lg[j] : 0.f;
    row_backward_tile(L, sm, g, a.H, a.dk32, entry_dk == nullptr ? nullptr : entry_dk + j0 * a.D);
  }
  __syncthreads();
  store_row_grads(L, sm, t, a.H, static_cast<TQ*>(a.dq), static_cast<TW*>(a.dw));
}

// Deterministic dk of the sparse loss, per chunk of rows [row_begin, row_end): the row kernel
// writes every valid entry's dk term (entry_dk, [chunk entries, D] fp32); the entries are
// grouped by key (a counting sort on the device: histogram, scan, scatter); then one warp per
// key adds its entries' terms in increasing entry order to dk32[key], chunk after chunk (the
// launches are ordered on the stream), so every dk element is summed in (t, j) order.
// Memory: the chunk's [rows * K, D] fp32 terms (sized by the launcher) plus 3 (S + 1) + rows * K
// int32; no [T, S].

// grid (ceil(chunk entries / 256)): key_count[idx] += 1 per valid entry of the chunk.
__global__ void __launch_bounds__(256) count_entries_per_key_kernel(const int32_t* indices, const int32_t* topk_length,
                                                                   int64_t row_begin, int64_t rows, int64_t S,
                                                                   int64_t K, int32_t* key_count) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (e >= rows * K) return;
  const int64_t t = row_begin + e / K, j = e % K;
  if (j >= row_entries(topk_length, t, K)) return;
  const int32_t idx = indices[t * K + j];
  if (idx >= 0 && idx < S) atomicAdd(key_count + idx, 1);
}

struct WarpCounts {
  int32_t v[kWarps];
};

// One CTA: key_offset = exclusive prefix sum of key_count over S + 1 entries, copied into
// key_cursor (the scatter's insertion points).
__global__ void __launch_bounds__(kThreads) scan_key_counts_kernel(const int32_t* key_count, int64_t n,
                                                                  int32_t* key_offset, int32_t* key_cursor) {
  DSA_STATIC_SMEM(WarpCounts, red);
  const int64_t per = (n + kThreads - 1) / kThreads;
  const int64_t b = threadIdx.x * per, e = b + per < n ? b + per : n;
  int32_t local = 0;
  for (int64_t i = b; i < e; ++i) local += key_count[i];
  // Exclusive scan of the threads' sums (warp shuffles, then warps in order).
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t inc = local;
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t v = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += v;
  }
  if (lane == 31) red.v[warp] = inc;
  __syncthreads();
  int32_t base = 0;
  for (int w = 0; w < warp; ++w) base += red.v[w];
  int32_t run = base + inc - local;
  for (int64_t i = b; i < e; ++i) {
    key_offset[i] = run;
    key_cursor[i] = run;
    run += key_count[i];
  }
}

// grid (ceil(chunk entries / 256)): entry_list[key_cursor[idx]++] = local entry id. The order
// within a key is arbitrary here; the reduction below imposes entry order.
__global__ void __launch_bounds__(256) scatter_entries_kernel(const int32_t* indices, const int32_t* topk_length,
                                                             int64_t row_begin, int64_t rows, int64_t S, int64_t K,
                                                             int32_t* key_cursor, int32_t* entry_list) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (e >= rows * K) return;
  const int64_t t = row_begin + e / K, j = e % K;
  if (j >= row_entries(topk_length, t, K)) return;
  const int32_t idx = indices[t * K + j];
  if (idx >= 0 && idx < S) entry_list[atomicAdd(key_cursor + idx, 1)] = static_cast<int32_t>(e);
}

// grid (ceil(S / kWarps)): warp per key. Its n entries are visited in increasing entry id (a
// selection over the unordered list: n rounds of a warp-wide minimum above the last id, O(n^2 /
// 32) per key; n is the number of chunk rows selecting the key, small for rows of distinct
// indices) and their terms added, lanes over D, to dk32[key].
__global__ void __launch_bounds__(kThreads) reduce_entries_per_key_kernel(const int32_t* key_count,
                                                                         const int32_t* key_offset,
                                                                         const int32_t* entry_list,
                                                                         const float* entry_dk, int64_t S, int D,
                                                                         float* dk32) {
  const int lane = threadIdx.x & 31;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (s >= S) return;
  const int32_t n = key_count[s];
  if (n == 0) return;
  const int32_t* list = entry_list + key_offset[s];
  float* out = dk32 + s * D;
  int32_t last = -1;
  for (int32_t round = 0; round < n; ++round) {
    int32_t next = 0x7fffffff;
    for (int32_t i = lane; i < n; i += 32) {
      const int32_t e = list[i];
      if (e > last && e < next) next = e;
    }
    for (int o = 16; o > 0; o >>= 1) {
      const int32_t other = __shfl_xor_sync(0xffffffffu, next, o);
      next = other < next ? other : next;
    }
    const float* term = entry_dk + static_cast<int64_t>(next) * D;
    for (int d = lane; d < D; d += 32) out[d] += term[d];
    last = next;
  }
}

// ---- indexer_kl_loss_dense ------------------------------------------------------------------------
//
// The dense warm-up over all keys of each row's range, streamed by 128-key tiles: nothing of
// size [T, S] exists. Pass 1 (per row): the indexer's lse (online max / sum over tiles) and the
// main attention's per-head lse (online, per warp, combined in warp order; kept in the [T, Hm]
// workspace). Pass 2: per tile the target p (head-averaged probabilities, q_main in chunks of
// heads), the prediction r, the loss terms and g = r - p, then the indexer backward of the tile.
// The main attention's scores cost Hm * Dm FMAs per (t, s) per pass (a warp per key, shuffled
// dot products), i.e. two recomputations of the main attention's logits, as a fused
// flash-style loss must.

// The main attention's part of shared memory, after the indexer layout (words).
struct MainLayout {
  int qm, lse, kvrow, stats, p;  // offsets in words from the start of shared memory
  int words;                     // total, indexer layout included
};
__host__ __device__ inline MainLayout make_main_layout(const Layout& L, int Dm, int head_chunk) {
  MainLayout M{};
  int o = L.words;
  M.qm = o; o += head_chunk * Dm;
  M.lse = o; o += head_chunk;
  M.kvrow = o; o += kWarps * Dm;
  M.stats = o; o += 2 * kWarps * head_chunk;
  M.p = o; o += kTileKeys;
  M.words = o;
  return M;
}

// Loads heads h0 .. h0 + hn - 1 of q_main[t] (and, with lse_src, their lse) as fp32.
template <typename TM>
__device__ __forceinline__ void load_main_chunk(const TM* q_main, const float* lse_src, int64_t t, int Hm, int Dm,
                                                int h0, int hn, const MainLayout& M, float* sm) {
  const TM* qt = q_main + (t * Hm + h0) * Dm;
  for (int e = threadIdx.x; e < hn * Dm; e += kThreads) sm[M.qm + e] = to_f32(qt[e]);
  if (lse_src != nullptr)
    for (int h = threadIdx.x; h < hn; h += kThreads) sm[M.lse + h] = lse_src[t * Hm + h0 + h];
}

// The calling warp stages kv_main[s] in its row and calls f(h, z) for the chunk's heads,
// z = sm_scale * q_main[t, h0 + h] . kv_main[s] (in every lane).
template <typename TM, typename F>
__device__ __forceinline__ void for_each_main_score(const TM* kv_main, int64_t s, int Dm, int hn, float sm_scale,
                                                    const MainLayout& M, float* sm, F&& f) {
  const int lane = threadIdx.x & 31;
  float* kvrow = sm + M.kvrow + (threadIdx.x >> 5) * Dm;
  __syncwarp();
  for (int d = lane; d < Dm; d += 32) kvrow[d] = to_f32(kv_main[s * Dm + d]);
  __syncwarp();
  for (int h = 0; h < hn; ++h) {
    const float* qh = sm + M.qm + h * Dm;
    float part = 0.f;
    for (int d = lane; d < Dm; d += 32) part = fmaf(qh[d], kvrow[d], part);
    f(h, sm_scale * warp_sum(part));
  }
}

// p[key] = (1/Hm) sum_h exp(z_h - lse_h) for the tile's keys s0 + j in [lo, hi) (0 elsewhere),
// into M.p. Warp w owns keys j = w, w + kWarps, ... (the same in every chunk).
template <typename TM>
__device__ __forceinline__ void tile_target(const DenseLossArgs& a, int64_t t, int64_t s0, int n, RowRange r,
                                            const MainLayout& M, float* sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int j = threadIdx.x; j < kTileKeys; j += kThreads) sm[M.p + j] = 0.f;
  for (int h0 = 0; h0 < a.Hm; h0 += a.head_chunk) {
    const int hn = a.Hm - h0 < a.head_chunk ? a.Hm - h0 : a.head_chunk;
    __syncthreads();
    load_main_chunk(static_cast<const TM*>(a.q_main), a.main_lse, t, a.Hm, a.Dm, h0, hn, M, sm);
    __syncthreads();
    for (int j = warp; j < n; j += kWarps) {
      const int64_t s = s0 + j;
      if (s < r.lo || s >= r.hi) continue;
      float acc = 0.f;
      for_each_main_score(static_cast<const TM*>(a.kv_main), s, a.Dm, hn, a.sm_scale, M, sm,
                          [&](int h, float z) { acc += __expf(z - sm[M.lse + h]); });
      if (lane == 0) sm[M.p + j] += acc;
    }
  }
  __syncthreads();
}

__device__ __forceinline__ float loss_scale(const int32_t* nonempty_rows) {
  if (nonempty_rows == nullptr) return 1.f;
  const int32_t c = *nonempty_rows;
  return 1.f / static_cast<float>(c > 0 ? c : 1);
}

// grid (ceil(T / kThreads)): rows with a non-empty clamped range (integer atomics: exact).
__global__ void __launch_bounds__(kThreads) count_nonempty_ranges_kernel(const int32_t* ks, const int32_t* ke,
                                                                        int64_t T, int64_t S, int32_t* count) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= T) return;
  const RowRange r = row_range(ks, ke, t, S);
  if (r.hi > r.lo) atomicAdd(count, 1);
}

// grid (T): row t, both passes, backward into dq, dw (owned) and dk (atomic mode).
template <typename TQ, typename TW, typename TM>
__global__ void __launch_bounds__(kThreads) dense_loss_row_kernel(DenseLossArgs a) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* sm = reinterpret_cast<float*>(smem_raw);
  const Layout L = make_layout(a.H, a.D, Parts::kRowBackward);
  const MainLayout M = make_main_layout(L, a.Dm, a.head_chunk);
  const int64_t t = blockIdx.x;
  const RowRange r = row_range(a.ks, a.ke, t, a.S);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* red = sm + L.red;
  load_query_row(static_cast<const TQ*>(a.q), static_cast<const TW*>(a.w), t, a.H, a.D, L, sm);
  zero_words(sm + L.acc, L.Hp * a.D);
  zero_words(sm + L.dw, L.Hp);
  // Pass 1a: the indexer's lse over the row.
  float m_i = -INFINITY, s_i = 0.f;
  for (int64_t s0 = r.lo; s0 < r.hi; s0 += kTileKeys) {
    const int n = static_cast<int>(r.hi - s0 < kTileKeys ? r.hi - s0 : kTileKeys);
    __syncthreads();
    set_contiguous_rows(s0, n, L, sm);
    __syncthreads();
    load_key_tile(static_cast<const TQ*>(a.k), a.D, L, sm);
    __syncthreads();
    const float logit = static_cast<int>(threadIdx.x) < n ? key_logit(L, sm) : -INFINITY;
    const float m_new = fmaxf(m_i, block_max(logit, red));
    const float e = static_cast<int>(threadIdx.x) < n ? __expf(logit - m_new) : 0.f;
    s_i = s_i * __expf(m_i - m_new) + block_sum(e, red);
    m_i = m_new;
  }
  const float lse_i = m_i + __logf(s_i);
  // Pass 1b: the main attention's lse per head (online per warp, warps combined in order).
  float* stats = sm + M.stats;  // [kWarps][chunk] max, then [kWarps][chunk] sum
  for (int h0 = 0; h0 < a.Hm && r.hi > r.lo; h0 += a.head_chunk) {
    const int hn = a.Hm - h0 < a.head_chunk ? a.Hm - h0 : a.head_chunk;
    __syncthreads();
    load_main_chunk(static_cast<const TM*>(a.q_main), nullptr, t, a.Hm, a.Dm, h0, hn, M, sm);
    for (int e = threadIdx.x; e < kWarps * a.head_chunk; e += kThreads) {
      stats[e] = -INFINITY;
      stats[kWarps * a.head_chunk + e] = 0.f;
    }
    __syncthreads();
    for (int64_t s = r.lo + warp; s < r.hi; s += kWarps)
      for_each_main_score(static_cast<const TM*>(a.kv_main), s, a.Dm, hn, a.sm_scale, M, sm, [&](int h, float z) {
        if (lane != 0) return;
        float& mx = stats[warp * a.head_chunk + h];
        float& sum = stats[(kWarps + warp) * a.head_chunk + h];
        const float m_new = fmaxf(mx, z);
        sum = sum * __expf(mx - m_new) + __expf(z - m_new);
        mx = m_new;
      });
    __syncthreads();
    for (int h = threadIdx.x; h < hn; h += kThreads) {
      float mx = -INFINITY;
      for (int wi = 0; wi < kWarps; ++wi) mx = fmaxf(mx, stats[wi * a.head_chunk + h]);
      float sum = 0.f;
      for (int wi = 0; wi < kWarps; ++wi) {
        const float mw = stats[wi * a.head_chunk + h];
        if (mw != -INFINITY) sum += stats[(kWarps + wi) * a.head_chunk + h] * __expf(mw - mx);
      }
      a.main_lse[t * a.Hm + h0 + h] = mx + __logf(sum);
    }
  }
  if (threadIdx.x == 0) a.index_lse[t] = lse_i;
  const float scale = loss_scale(a.nonempty_rows);
  // Pass 2: per tile p, r, loss terms and the backward.
  float loss = 0.f;
  for (int64_t s0 = r.lo; s0 < r.hi; s0 += kTileKeys) {
    const int n = static_cast<int>(r.hi - s0 < kTileKeys ? r.hi - s0 : kTileKeys);
    __syncthreads();
    set_contiguous_rows(s0, n, L, sm);
    __syncthreads();
    load_key_tile(static_cast<const TQ*>(a.k), a.D, L, sm);
    __syncthreads();
    const float logit = key_logit(L, sm);
    tile_target<TM>(a, t, s0, n, r, M, sm);
    float g = 0.f;
    if (static_cast<int>(threadIdx.x) < n) {
      const float p = sm[M.p + threadIdx.x] / static_cast<float>(a.Hm);
      const float log_r = logit - lse_i;
      if (p > 0.f) loss += p * (__logf(p) - log_r);
      g = (__expf(log_r) - p) * scale;
    }
    row_backward_tile(L, sm, g, a.H, a.dk32);
  }
  loss = block_sum(loss, red);
  if (threadIdx.x == 0) a.row_loss[t] = r.hi > r.lo ? loss * scale : 0.f;
  __syncthreads();
  store_row_grads(L, sm, t, a.H, static_cast<TQ*>(a.dq), static_cast<TW*>(a.dw));
}

// grid (ceil(S / kTileKeys), splits): deterministic dk of the dense loss, after dense_loss_row_kernel
// (which leaves both lse workspaces). The CTA owns a tile of keys and loops over the rows in
// order, recomputing p, r and g for its keys (a third evaluation of the main scores: the
// price of a fixed summation order without [T, S] scratch).
template <typename TQ, typename TW, typename TM>
__global__ void __launch_bounds__(kThreads) dense_loss_key_kernel(DenseLossArgs a, void* dk_out, KeySplit sp) {
  DSA_DYNAMIC_SMEM(smem_raw, 16);
  float* sm = reinterpret_cast<float*>(smem_raw);
  const Layout L = make_layout(a.H, a.D, Parts::kKeyBackward);
  const MainLayout M = make_main_layout(L, a.Dm, a.head_chunk);
  const int D = a.D;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * kTileKeys;
  const int n = static_cast<int>(a.S - s0 < kTileKeys ? a.S - s0 : kTileKeys);
  set_contiguous_rows(s0, n, L, sm);
  zero_words(sm + L.acc, kTileKeys * D);
  __syncthreads();
  load_key_tile(static_cast<const TQ*>(a.k), D, L, sm);
  float* coef = sm + L.coef;
  const int key = threadIdx.x;
  const float scale = loss_scale(a.nonempty_rows);
  int64_t t_begin, t_end;
  split_rows(sp, a.T, &t_begin, &t_end);
  for (int64_t t = t_begin; t < t_end; ++t) {
    const RowRange r = row_range(a.ks, a.ke, t, a.S);
    if (r.hi <= s0 || r.lo >= s0 + n) continue;  // uniform
    __syncthreads();
    load_query_row(static_cast<const TQ*>(a.q), static_cast<const TW*>(a.w), t, a.H, D, L, sm);
    __syncthreads();
    const float logit = key_logit(L, sm);
    tile_target<TM>(a, t, s0, n, r, M, sm);
    const int64_t s = s0 + key;
    float g = 0.f;
    if (key < n && s >= r.lo && s < r.hi)
      g = (__expf(logit - a.index_lse[t]) - sm[M.p + key] / static_cast<float>(a.Hm)) * scale;
    const float* w = sm + L.w;
    for_each_head_score(L, sm, key, [&](int h, float z) { coef[h * kTileKeys + key] = z > 0.f ? g * w[h] : 0.f; });
    __syncthreads();
    accumulate_key_grads(L, sm, coef, n, D, a.H);
  }
  __syncthreads();
  store_key_grads<TQ>(L, sm, s0, n, a.S, dk_out, sp);
}

// One CTA: the sum of row_loss[0 .. T) in a fixed order into *loss.
__global__ void __launch_bounds__(kThreads) sum_rows_kernel(const float* row_loss, int64_t T, float* loss) {
  DSA_STATIC_SMEM(WarpPartials, red);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < T; i += kThreads) s += row_loss[i];
  s = block_sum(s, red.v);
  if (threadIdx.x == 0) *loss = s;
}

}  // namespace dsa::training
