// sparse_mla family: torch-free host launchers (see sparse_mla_launch.h).
#include "common/cuda_utils.cuh"
#include "common/loaded_image.cuh"
#include "sparse_mla/sparse_mla_kernels.cuh"
#include "sparse_mla/sparse_mla_launch.h"
#include "sparse_mla/sparse_mla_wgmma.cuh"


namespace dsa::sparse_mla {
static_assert(kMaxChunkEntries == kBwdDeterministicMaxK, "bitmap size and the glue's K check");

namespace {

// Largest head block (64, 32 or 16) dividing H; the glue guarantees H % 16 == 0.
int head_block(int H) { return H % 64 == 0 ? 64 : (H % 32 == 0 ? 32 : 16); }

template <int HB>
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  using C = FwdCfg<HB>;
  auto kernel = sparse_mla_fwd_kernel<HB>;
  cudaError_t err = ensure_max_dynamic_smem<sparse_mla_fwd_kernel<HB>>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t grid = a.T * (a.H / HB);
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.kv), a.indices,
      a.attn_sink, a.topk_length, static_cast<__nv_bfloat16*>(a.out), a.lse, a.S, a.H, a.K,
      a.sm_scale);
  return last_launch_error();
}

cudaError_t launch_fwd_wgmma(const FwdArgs& a, cudaStream_t stream) {
  using C = WgmmaFwdCfg;
  auto kernel = sparse_mla_fwd_wgmma_kernel;
  cudaError_t err = ensure_max_dynamic_smem<sparse_mla_fwd_wgmma_kernel>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t grid = a.T * (a.H / C::kHB);
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.kv), a.indices,
      a.attn_sink, a.topk_length, static_cast<__nv_bfloat16*>(a.out), a.lse, a.S, a.H, a.K,
      a.sm_scale);
  return last_launch_error();
}

template <int HB>
cudaError_t launch_bwd_main(const BwdArgs& a, int64_t t_begin, int64_t tokens,
                            int64_t chunk_tokens, float* scratch, cudaStream_t stream) {
  using C = BwdCfg<HB>;
  auto kernel = sparse_mla_bwd_kernel<HB>;
  cudaError_t err = ensure_max_dynamic_smem<sparse_mla_bwd_kernel<HB>>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t grid = tokens * (a.H / HB);
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.kv),
      static_cast<const __nv_bfloat16*>(a.out), static_cast<const __nv_bfloat16*>(a.dout),
      a.indices, a.lse, a.attn_sink, a.topk_length, static_cast<__nv_bfloat16*>(a.dq),
      a.dkv_acc, scratch, t_begin, chunk_tokens, a.S, a.H, a.K, a.sm_scale);
  return last_launch_error();
}

cudaError_t launch_bwd_main_any(const BwdArgs& a, int64_t t_begin, int64_t tokens,
                                int64_t chunk_tokens, float* scratch, cudaStream_t stream) {
  switch (head_block(a.H)) {
    case 64: return launch_bwd_main<64>(a, t_begin, tokens, chunk_tokens, scratch, stream);
    case 32: return launch_bwd_main<32>(a, t_begin, tokens, chunk_tokens, scratch, stream);
    default: return launch_bwd_main<16>(a, t_begin, tokens, chunk_tokens, scratch, stream);
  }
}

}  // namespace

cudaError_t wgmma_opted_in(int device, bool* use_wgmma) {
  return sm90a_wgmma_opted_in("DSA_SPARSE_MLA_WGMMA", device, use_wgmma);
}

cudaError_t sparse_mla_fwd_launch(const FwdArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  if (a.use_wgmma && a.H % WgmmaFwdCfg::kHB == 0) return launch_fwd_wgmma(a, stream);
  switch (head_block(a.H)) {
    case 64: return launch_fwd<64>(a, stream);
    case 32: return launch_fwd<32>(a, stream);
    default: return launch_fwd<16>(a, stream);
  }
}

int64_t sparse_mla_bwd_chunk_tokens(int64_t T, int K) {
  const int64_t per = K > 0 ? kMaxChunkEntries / K : kMaxChunkEntries;
  const int64_t c = per < 1 ? 1 : per;
  return T < c ? (T < 1 ? 1 : T) : c;
}

int64_t sparse_mla_bwd_scratch_rows(int64_t T, int H, int K) {
  return static_cast<int64_t>(H / head_block(H)) * sparse_mla_bwd_chunk_tokens(T, K) * K;
}

cudaError_t sparse_mla_bwd_launch(const BwdArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  if (!a.deterministic) return launch_bwd_main_any(a, 0, a.T, a.T, nullptr, stream);
  const int64_t chunk = sparse_mla_bwd_chunk_tokens(a.T, a.K);
  const int64_t chunk_entries = chunk * a.K;
  const int nhb = a.H / head_block(a.H);
  constexpr int kThreads = 256;
  for (int64_t t0 = 0; t0 < a.T; t0 += chunk) {
    const int64_t tokens = a.T - t0 < chunk ? a.T - t0 : chunk;
    const int64_t n_entries = tokens * a.K;
    cudaError_t err = launch_bwd_main_any(a, t0, tokens, chunk, a.scratch, stream);
    if (err != cudaSuccess) return err;
    if (n_entries == 0) continue;
    err = cudaMemsetAsync(a.row_counts, 0, (a.S + 1) * sizeof(int32_t), stream);
    if (err != cudaSuccess) return err;
    const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(n_entries, kThreads));
    count_rows_kernel<<<blocks, kThreads, 0, stream>>>(a.indices, a.topk_length, t0, n_entries,
                                                       a.K, a.S, a.row_counts);
    scan_rows_kernel<<<1, kScanThreads, kScanSmemBytes, stream>>>(a.row_counts, a.S, a.row_offsets, a.row_cursor);
    fill_rows_kernel<<<blocks, kThreads, 0, stream>>>(a.indices, a.topk_length, t0, n_entries,
                                                      a.K, a.S, a.row_cursor, a.entry_list);
    if (a.S > 0)
      reduce_rows_kernel<<<static_cast<unsigned>(a.S), kReduceThreads, kReduceSmemBytes, stream>>>(
          a.scratch, a.row_offsets, a.entry_list, n_entries, chunk_entries, nhb, a.dkv_acc);
    err = last_launch_error();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace dsa::sparse_mla
