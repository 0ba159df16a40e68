// sparse_mla family: torch-free host launchers (see sparse_mla_launch.h).
#include "common/cuda_utils.cuh"
#include "common/loaded_image.cuh"
#include "sparse_mla/sparse_mla_bwd_wgmma.cuh"
#include "sparse_mla/sparse_mla_kernels.cuh"
#include "sparse_mla/sparse_mla_launch.h"
#include "sparse_mla/sparse_mla_wgmma.cuh"
#include "sparse_mla/sparse_mla_ws.cuh"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>


namespace dsa::sparse_mla {
static_assert(kMaxChunkEntries == kBwdDeterministicMaxK, "bitmap size and the glue's K check");

namespace {

// Largest head block (64, 32 or 16) dividing H, else 16 with the last block partial (H = 8: one
// 16-row block, rows 8..15 masked in the kernels). The glue admits H in {8, 16, 32, 64, 128}.
int head_block(int H) { return H % 64 == 0 ? 64 : (H % 32 == 0 ? 32 : 16); }

template <int V>
using Int = std::integral_constant<int, V>;

// Calls f(Int<HB>, Int<D>) for the head block of H and the latent width D (576 or 512): the one
// place the launchers turn runtime sizes into kernel instantiations.
template <class F>
cudaError_t with_head_block_and_width(int H, int D, F&& f) {
  if (D != 576 && D != 512) return cudaErrorInvalidValue;  // the glue checks d_qk first
  const int hb = head_block(H);
  if (D == 512) {
    if (hb == 64) return f(Int<64>{}, Int<512>{});
    if (hb == 32) return f(Int<32>{}, Int<512>{});
    return f(Int<16>{}, Int<512>{});
  }
  if (hb == 64) return f(Int<64>{}, Int<576>{});
  if (hb == 32) return f(Int<32>{}, Int<576>{});
  return f(Int<16>{}, Int<576>{});
}

template <int HB, int D>
cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  using C = FwdCfg<HB, D>;
  auto kernel = sparse_mla_fwd_kernel<HB, D>;
  cudaError_t err = ensure_max_dynamic_smem<sparse_mla_fwd_kernel<HB, D>>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t grid = a.T * head_blocks(a.H, HB);
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.kv), a.indices,
      a.attn_sink, a.topk_length, static_cast<__nv_bfloat16*>(a.out), a.lse, a.S, a.H, a.K,
      a.sm_scale);
  return last_launch_error();
}

// The sm_90a forward kernels of 64-head blocks (sparse_mla_wgmma.cuh, sparse_mla_ws.cuh): same
// arguments, a CTA per (token, 64 heads); C is the kernel's tile configuration. kPair: 2-CTA
// clusters over the two head blocks of a token (H a multiple of 128; the ws kernel's pair).
template <class C, auto Kernel, bool kPair = false>
cudaError_t launch_fwd_64(const FwdArgs& a, cudaStream_t stream) {
  cudaError_t err = ensure_max_dynamic_smem<Kernel>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(a.T * (a.H / C::kHB)));
  cfg.blockDim = dim3(C::kThreads);
  cfg.dynamicSmemBytes = C::kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = kPair ? 1 : 0;
  err = cudaLaunchKernelEx(&cfg, Kernel, static_cast<const __nv_bfloat16*>(a.q),
                           static_cast<const __nv_bfloat16*>(a.kv), a.indices, a.attn_sink, a.topk_length,
                           static_cast<__nv_bfloat16*>(a.out), a.lse, a.S, a.H, a.K, a.sm_scale);
  if (err != cudaSuccess) return err;
  return last_launch_error();
}

template <int D>
cudaError_t launch_fwd_wgmma(const FwdArgs& a, cudaStream_t stream) {
  return launch_fwd_64<WgmmaFwdCfg<D>, sparse_mla_fwd_wgmma_kernel<D>>(a, stream);
}

template <int D, bool kPair>
cudaError_t launch_fwd_ws(const FwdArgs& a, cudaStream_t stream) {
  return launch_fwd_64<WsFwdCfg<D>, sparse_mla_fwd_ws_kernel<D, kPair>, kPair>(a, stream);
}

// A backward main kernel (sparse_mla_bwd_kernel<HB, D> or sparse_mla_bwd_wgmma_kernel<D>, same
// arguments) over `tokens` tokens from t_begin, HB heads a CTA; C is its tile configuration.
template <int HB, class C, auto Kernel>
cudaError_t launch_bwd_kernel(const BwdArgs& a, int64_t t_begin, int64_t tokens,
                              int64_t chunk_tokens, const DkvTarget& dkv, cudaStream_t stream) {
  auto kernel = Kernel;
  cudaError_t err = ensure_max_dynamic_smem<Kernel>(C::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int64_t grid = tokens * head_blocks(a.H, HB);
  kernel<<<static_cast<unsigned>(grid), C::kThreads, C::kSmemBytes, stream>>>(
      static_cast<const __nv_bfloat16*>(a.q), static_cast<const __nv_bfloat16*>(a.kv),
      static_cast<const __nv_bfloat16*>(a.out), static_cast<const __nv_bfloat16*>(a.dout),
      a.indices, a.lse, a.attn_sink, a.topk_length, static_cast<__nv_bfloat16*>(a.dq),
      dkv, t_begin, chunk_tokens, a.S, a.H, a.K, a.sm_scale);
  return last_launch_error();
}

template <int HB, int D>
cudaError_t launch_bwd_main(const BwdArgs& a, int64_t t_begin, int64_t tokens,
                            int64_t chunk_tokens, const DkvTarget& dkv, cudaStream_t stream) {
  return launch_bwd_kernel<HB, BwdCfg<HB, D>, sparse_mla_bwd_kernel<HB, D>>(a, t_begin, tokens,
                                                                          chunk_tokens, dkv, stream);
}

// The sm_90a backward of 64-head blocks (sparse_mla_bwd_wgmma.cuh): the same arguments and
// deterministic entries as sparse_mla_bwd_kernel.
template <int D>
cudaError_t launch_bwd_wgmma(const BwdArgs& a, int64_t t_begin, int64_t tokens,
                             int64_t chunk_tokens, const DkvTarget& dkv, cudaStream_t stream) {
  return launch_bwd_kernel<kWgmmaHeadBlock, WgmmaBwdCfg<D>, sparse_mla_bwd_wgmma_kernel<D>>(
      a, t_begin, tokens, chunk_tokens, dkv, stream);
}

cudaError_t launch_bwd_main_any(const BwdArgs& a, int64_t t_begin, int64_t tokens,
                                int64_t chunk_tokens, const DkvTarget& dkv, cudaStream_t stream) {
  if (a.kernel == BwdKernel::kWgmma && a.H % kWgmmaHeadBlock == 0)
    return a.D == 512 ? launch_bwd_wgmma<512>(a, t_begin, tokens, chunk_tokens, dkv, stream)
                      : launch_bwd_wgmma<576>(a, t_begin, tokens, chunk_tokens, dkv, stream);
  return with_head_block_and_width(a.H, a.D, [&](auto hb, auto d) {
    return launch_bwd_main<decltype(hb)::value, decltype(d)::value>(a, t_begin, tokens,
                                                                     chunk_tokens, dkv, stream);
  });
}

template <int D>
void launch_reduce_rows_bitmap(const BwdArgs& a, int64_t n_entries, int64_t chunk_entries, int nhb,
                               cudaStream_t stream) {
  reduce_rows_bitmap_kernel<D><<<static_cast<unsigned>(a.S), kReduceThreads, kReduceSmemBytes, stream>>>(
      a.scratch, a.row_offsets, a.entry_list, n_entries, chunk_entries, nhb, a.dkv_acc);
}

// Grid caps of the "list" path's grid-stride kernels (the touched / big row counts are only
// known on the device): enough CTAs to fill an H100 (132 SMs), never more than the entries need.
constexpr int64_t kListReduceMaxCtas = 264;
constexpr int64_t kBigReduceMaxCtas = 132;

template <int D>
void launch_reduce_rows_list(const BwdArgs& a, int64_t n_entries, int64_t chunk_entries,
                             int64_t list_len, int nhb, cudaStream_t stream) {
  constexpr int64_t kWarps = kListReduceThreads / 32;
  const int64_t small = std::min(ceil_div<int64_t>(n_entries, kWarps), kListReduceMaxCtas);
  reduce_rows_kernel<D><<<static_cast<unsigned>(small), kListReduceThreads, 0, stream>>>(
      a.scratch, a.row_offsets, a.row_cursor, a.entry_list, a.lists, chunk_entries, nhb, a.dkv_acc);
  const int64_t big = std::min(n_entries / (kSmallRowEntries + 1) + 1, kBigReduceMaxCtas);
  reduce_big_rows_kernel<D><<<static_cast<unsigned>(big), kReduceThreads, kReduceSmemBytes, stream>>>(
      a.scratch, a.row_offsets, a.row_cursor, a.entry_list, a.lists, list_len, n_entries,
      chunk_entries, nhb, a.dkv_acc);
}

}  // namespace

cudaError_t fwd_kernel_selected(int device, int H, FwdKernel* kernel) {
  *kernel = FwdKernel::kMma;
  const char* env = std::getenv("DSA_SPARSE_MLA_FWD");
  const char* legacy = std::getenv("DSA_SPARSE_MLA_WGMMA");
  // Unset: the warp-specialised wgmma kernel where it can run (paired over 2-CTA clusters when
  // H is a multiple of 128), mma.sync elsewhere.
  FwdKernel want = FwdKernel::kWsPair;
  bool asked = false;
  if (env != nullptr && *env != '\0') {
    asked = true;
    if (std::strcmp(env, "ws") == 0) want = FwdKernel::kWs;
    else if (std::strcmp(env, "ws-pair") == 0) want = FwdKernel::kWsPair;
    else if (std::strcmp(env, "wgmma") == 0) want = FwdKernel::kWgmma;
    else return cudaSuccess;  // "mma" (or anything else): mma.sync
  } else if (legacy != nullptr && std::strcmp(legacy, "1") == 0) {
    asked = true;
    want = FwdKernel::kWgmma;
  }
  if (H % kWgmmaHeadBlock != 0) return cudaSuccess;  // not a 64-head block: mma.sync
  bool use = false;
  const cudaError_t err = sm90a_kernel_usable(device, asked, &use);
  if (use) *kernel = want;
  return err;
}

cudaError_t bwd_kernel_selected(int device, int H, BwdKernel* kernel) {
  *kernel = BwdKernel::kMma;
  const char* env = std::getenv("DSA_SPARSE_MLA_BWD");
  const bool asked = env != nullptr && *env != '\0';
  if (asked && std::strcmp(env, "wgmma") != 0) return cudaSuccess;  // "mma": mma.sync
  if (H % kWgmmaHeadBlock != 0) return cudaSuccess;
  bool use = false;
  const cudaError_t err = sm90a_kernel_usable(device, asked, &use);
  if (use) *kernel = BwdKernel::kWgmma;
  return err;
}

cudaError_t sparse_mla_fwd_launch(const FwdArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  if (a.kernel != FwdKernel::kMma && a.H % kWgmmaHeadBlock == 0 && (a.D == 512 || a.D == 576)) {
    if (a.kernel == FwdKernel::kWsPair && a.H % (2 * kWgmmaHeadBlock) == 0)
      return a.D == 512 ? launch_fwd_ws<512, true>(a, stream) : launch_fwd_ws<576, true>(a, stream);
    if (a.kernel == FwdKernel::kWs || a.kernel == FwdKernel::kWsPair)
      return a.D == 512 ? launch_fwd_ws<512, false>(a, stream) : launch_fwd_ws<576, false>(a, stream);
    return a.D == 512 ? launch_fwd_wgmma<512>(a, stream) : launch_fwd_wgmma<576>(a, stream);
  }
  return with_head_block_and_width(a.H, a.D, [&](auto hb, auto d) {
    return launch_fwd<decltype(hb)::value, decltype(d)::value>(a, stream);
  });
}

int64_t sparse_mla_bwd_scratch_budget() {
  const char* env = std::getenv("DSA_SPARSE_MLA_DET_SCRATCH_MB");
  if (env == nullptr || *env == '\0') return kBwdScratchBudgetBytes;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  if (end == env || *end != '\0' || mb < 0) return kBwdScratchBudgetBytes;  // not a count: default
  return mb == 0 ? 0 : static_cast<int64_t>(mb) << 20;
}

BwdWorkspace sparse_mla_bwd_workspace(int64_t T, int64_t S, int H, int K, int D,
                                      int64_t budget_bytes) {
  if (det_reduce_mode() == DetReduce::kFixed) {
    int64_t rows = S;
    if (budget_bytes > 0 && budget_bytes / (int64_t{D} * 8) < rows) rows = budget_bytes / (int64_t{D} * 8);
    if (rows < 1) rows = 1;
    return BwdWorkspace{T < 1 ? 1 : T, 2 * rows, 1, rows};  // int64 [rows, D] as fp32 rows of D
  }
  const int64_t nhb = head_blocks(H, head_block(H));
  int64_t c = K > 0 ? kMaxChunkEntries / K : kMaxChunkEntries;
  if (budget_bytes > 0 && K > 0) {
    const int64_t per_token = nhb * K * D * 4;  // scratch bytes of one token's contributions
    const int64_t fit = budget_bytes / per_token;
    if (fit < c) c = fit;
  }
  if (c < 1) c = 1;
  if (T < c) c = T < 1 ? 1 : T;
  BwdWorkspace w{};
  w.chunk_tokens = c;
  w.scratch_rows = nhb * c * K > 0 ? nhb * c * K : 1;
  w.list_len = c * K > 0 ? c * K : 1;
  w.fixed_rows = 0;
  return w;
}

DetReduce det_reduce_mode() {
  const char* env = std::getenv("DSA_SPARSE_MLA_DET_REDUCE");
  if (env != nullptr && std::strcmp(env, "bitmap") == 0) return DetReduce::kBitmap;
  if (env != nullptr && std::strcmp(env, "list") == 0) return DetReduce::kList;
  return DetReduce::kFixed;
}

int64_t bwd_int_words(int64_t S, int64_t list_len) {
  return list_len + 3 * (S + 1) + kListHeader + list_len + big_rows_capacity(list_len) +
         kFixedStatsWords;
}

void bind_bwd_ints(BwdArgs& a, int32_t* ints, int64_t S, int64_t list_len) {
  a.entry_list = ints;
  a.row_counts = ints + list_len;
  a.row_offsets = a.row_counts + (S + 1);
  a.row_cursor = a.row_offsets + (S + 1);
  a.lists = a.row_cursor + (S + 1);
  a.fixed_stats = reinterpret_cast<uint32_t*>(a.lists + kListHeader + list_len + big_rows_capacity(list_len));
}

// Time models of the deterministic designs (MODEL, not measured; H100 SXM, SPEC shape T = 4096,
// S = 8192, H = 128, K = 2048, d_qk = 576; the atomic mode ~10 ms, sparse_mla_bwd_wgmma.cuh).
// Fixed point (the default; one pass here: its [S, D] int64 accumulator is 37.7 MB <= 64 MiB): the bound
// pass reads q, out and dout once (T H (576 + 512 + 512) x 2 = 1.68 GB, ~0.56 ms at ~3 TB/s) and
// kv's value columns (8 MB); the main kernel is the atomic one with the same red.global count,
// 8-byte integer instead of 4-byte float (the wgmma kernel's 18,432 reds a step: ~1,150 of its
// ~4,500 clocks if L2 takes ~16 B/clk per SM slice; even fully serialised after each wait,
// +~580 clocks a step, ~13%); memset and finish touch 38 + 38 + 19 MB (~0.03 ms). Model:
// 10.6-11.9 ms, 84-94% of the atomic mode (SPEC: >= 80%). Risk: integer red throughput in L2 on
// hot rows, unmeasured. Its cost grows with T K (the reds) and S D (the accumulator), never
// with the chunking.
// Above the budget the fixed-point design runs ceil(S D 8 / budget) passes over the dkv rows,
// each the whole backward keeping its rows' contributions: ~passes x the atomic time (the
// d_qk 512 SPEC shape, S = 32K: 2 passes, ~45%; S = 128K at 576: 10 passes, ~10%).
// Chunked (DSA_SPARSE_MLA_DET_REDUCE = list | bitmap; e.g. S = 128K): a token's contributions are
// nhb x K x D x 4 = 9.4 MB of scratch, so a chunk holds 7 tokens (66 MB) and there are 586
// chunks; each main launch runs 7 x 2 = 14 CTAs on 132 SMs, so the chunks serialise: ~586 x
// 64 steps x 2.46 us = 92 ms, plus the scratch round trip through HBM (~28 MB a token, 38 ms)
// and 586 x 5 launches: ~10x the atomic mode. Levers not built: split a token's slots over
// CTAs (dQ then needs a second reduction), a budget that keeps the chunk in L2.
namespace {

// The fixed-point deterministic backward: the bound pass, then per pass of `pass_rows` dkv rows
// one main launch over all tokens and the finish of those rows.
cudaError_t launch_bwd_fixed_point(const BwdArgs& a, int64_t pass_rows, cudaStream_t stream) {
  auto* fixed = reinterpret_cast<unsigned long long*>(a.scratch);
  cudaError_t err = cudaMemsetAsync(a.fixed_stats, 0, kFixedStatsWords * sizeof(uint32_t), stream);
  if (err != cudaSuccess) return err;
  const int64_t rows = a.T * a.H;
  const int64_t groups = std::max(rows * (a.D / 8), a.S * int64_t{kVChunks});
  const auto ctas = [](int64_t n) {
    return static_cast<unsigned>(std::min<int64_t>(ceil_div<int64_t>(n, kFixedThreads), 1024));
  };
  const auto* q = static_cast<const __nv_bfloat16*>(a.q);
  const auto* out = static_cast<const __nv_bfloat16*>(a.out);
  const auto* dout = static_cast<const __nv_bfloat16*>(a.dout);
  const auto* kv = static_cast<const __nv_bfloat16*>(a.kv);
  if (a.D == 512)
    fixed_point_bound_kernel<512><<<ctas(groups), kFixedThreads, 0, stream>>>(q, out, dout, kv, rows, a.S, a.fixed_stats);
  else
    fixed_point_bound_kernel<576><<<ctas(groups), kFixedThreads, 0, stream>>>(q, out, dout, kv, rows, a.S, a.fixed_stats);
  err = last_launch_error();
  if (err != cudaSuccess) return err;
  for (int64_t r0 = 0; r0 < a.S; r0 += pass_rows) {
    const int64_t r1 = std::min(a.S, r0 + pass_rows);
    err = cudaMemsetAsync(fixed, 0, (r1 - r0) * a.D * sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return err;
    const DkvTarget dkv{a.dkv_acc, nullptr, fixed, a.fixed_stats, rows, r0, r1};
    err = launch_bwd_main_any(a, 0, a.T, a.T, dkv, stream);
    if (err != cudaSuccess) return err;
    fixed_point_finish_kernel<<<ctas((r1 - r0) * a.D), kFixedThreads, 0, stream>>>(
        fixed, a.fixed_stats, a.sm_scale, rows, (r1 - r0) * a.D, a.dkv_acc + r0 * a.D);
    err = last_launch_error();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t sparse_mla_bwd_launch(const BwdArgs& a, cudaStream_t stream) {
  if (a.T == 0) return cudaSuccess;
  if (!a.deterministic)
    return launch_bwd_main_any(a, 0, a.T, a.T, DkvTarget{a.dkv_acc, nullptr, nullptr, nullptr, 0, 0, 0}, stream);
  const BwdWorkspace w = sparse_mla_bwd_workspace(a.T, a.S, a.H, a.K, a.D, a.scratch_budget);
  if (w.fixed_point()) return launch_bwd_fixed_point(a, w.fixed_rows, stream);
  const int64_t chunk = w.chunk_tokens;
  const int64_t chunk_entries = chunk * a.K;
  const int nhb = head_blocks(a.H, head_block(a.H));
  const bool bitmap = det_reduce_mode() == DetReduce::kBitmap;
  constexpr int kThreads = 256;
  cudaError_t err = cudaSuccess;
  if (!bitmap) {  // once per call: counts (each chunk's alloc re-zeroes the rows it touched)
    err = cudaMemsetAsync(a.row_counts, 0, (a.S + 1) * sizeof(int32_t), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(a.lists, 0, kListHeader * sizeof(int32_t), stream);
    if (err != cudaSuccess) return err;
  }
  for (int64_t t0 = 0; t0 < a.T; t0 += chunk) {
    const int64_t tokens = a.T - t0 < chunk ? a.T - t0 : chunk;
    const int64_t n_entries = tokens * a.K;
    err = launch_bwd_main_any(a, t0, tokens, chunk, DkvTarget{a.dkv_acc, a.scratch, nullptr, nullptr, 0, 0, 0},
                              stream);
    if (err != cudaSuccess) return err;
    if (n_entries == 0) continue;
    const unsigned blocks = static_cast<unsigned>(ceil_div<int64_t>(n_entries, kThreads));
    if (bitmap) {
      err = cudaMemsetAsync(a.row_counts, 0, (a.S + 1) * sizeof(int32_t), stream);
      if (err != cudaSuccess) return err;
      count_rows_kernel<<<blocks, kThreads, 0, stream>>>(a.indices, a.topk_length, t0, n_entries,
                                                         a.K, a.S, a.row_counts, nullptr);
      scan_rows_kernel<<<1, kScanThreads, kScanSmemBytes, stream>>>(a.row_counts, a.S,
                                                                    a.row_offsets, a.row_cursor);
    } else {
      count_rows_kernel<<<blocks, kThreads, 0, stream>>>(a.indices, a.topk_length, t0, n_entries,
                                                         a.K, a.S, a.row_counts, a.lists);
      alloc_rows_kernel<<<blocks, kThreads, 0, stream>>>(a.row_counts, a.row_offsets, a.row_cursor,
                                                         a.lists, w.list_len);
    }
    fill_rows_kernel<<<blocks, kThreads, 0, stream>>>(a.indices, a.topk_length, t0, n_entries,
                                                      a.K, a.S, a.row_cursor, a.entry_list);
    if (bitmap) {
      if (a.D == 512) launch_reduce_rows_bitmap<512>(a, n_entries, chunk_entries, nhb, stream);
      else launch_reduce_rows_bitmap<576>(a, n_entries, chunk_entries, nhb, stream);
    } else {
      if (a.D == 512) launch_reduce_rows_list<512>(a, n_entries, chunk_entries, w.list_len, nhb, stream);
      else launch_reduce_rows_list<576>(a, n_entries, chunk_entries, w.list_len, nhb, stream);
      // the next chunk's touched list starts empty (counts were re-zeroed by alloc_rows_kernel)
      err = cudaMemsetAsync(a.lists, 0, kListHeader * sizeof(int32_t), stream);
      if (err != cudaSuccess) return err;
    }
    err = last_launch_error();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace dsa::sparse_mla
