// Torch-free host launchers of the sparse_mla CUDA kernels (raw pointers, sizes, stream).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa::sparse_mla {

// Pointers are device pointers; bf16 data is passed as void*. Layouts (all contiguous):
// q [T, H, D], kv [S, 1, D] with D = d_qk in {576, 512}, indices [T, K] int32, attn_sink [H]
// fp32 or null, topk_length [T] int32 or null, out [T, H, 512] bf16, lse [T, H] fp32.
// H is any positive count (the glue admits {8, 16, 32, 64, 128}): heads are processed in blocks
// of 64, 32 or 16, the last one partial when 16 does not divide H (masked rows, no padding).
enum class FwdKernel { kMma, kWgmma, kWs, kWsPair };

struct FwdArgs {
  const void* q;
  const void* kv;
  const int32_t* indices;
  const float* attn_sink;
  const int32_t* topk_length;
  void* out;
  float* lse;
  int64_t T, S;
  int H, K;
  int D = 576;  // d_qk: 576 or 512 (d_v is 512 for both)
  float sm_scale;
  // The forward kernel (fwd_kernel_selected); kWgmma / kWs apply to H % 64 == 0 only, kWsPair
  // pairs at H % 128 == 0 (kWs otherwise).
  FwdKernel kernel = FwdKernel::kMma;
};

// The forward kernel for 64-head blocks (H = 64, 128) on sm_90a: DSA_SPARSE_MLA_FWD = ws-pair
// (the warp-specialised wgmma kernel in 2-CTA clusters sharing each gather, H % 128 == 0; H = 64:
// ws) | ws (the same kernel, one CTA gathering for itself, sparse_mla_ws.cuh) | wgmma
// (sparse_mla_wgmma.cuh) | mma (mma.sync, sparse_mla_kernels.cuh); DSA_SPARSE_MLA_WGMMA=1 (the
// earlier opt-in) is "wgmma". Unset: ws-pair where it can run (H % 64 == 0 on a cc 9 device with
// the sm_90a image), mma.sync
// elsewhere, silently. Other H, and every H off Hopper, take mma.sync whatever the switch says. An explicit ws / wgmma on
// Hopper without the sm_90a image (a build without 9.0a in TORCH_CUDA_ARCH_LIST) returns
// cudaErrorNoKernelImageForDevice (common/loaded_image.cuh), not a silent fallback. Read per call
// (host only), torch-free so the emulator's entry points decide exactly as the glue does.
cudaError_t fwd_kernel_selected(int device, int H, FwdKernel* kernel);

cudaError_t sparse_mla_fwd_launch(const FwdArgs& a, cudaStream_t stream);

enum class BwdKernel { kMma, kWgmma };
// The backward kernel for 64-head blocks on sm_90a: DSA_SPARSE_MLA_BWD = wgmma
// (sparse_mla_bwd_wgmma.cuh) | mma (sparse_mla_bwd_kernel, mma.sync). Unset: wgmma where it can
// run, mma.sync elsewhere; the same rules as fwd_kernel_selected (an explicit wgmma on Hopper
// without the sm_90a image: cudaErrorNoKernelImageForDevice).
cudaError_t bwd_kernel_selected(int device, int H, BwdKernel* kernel);

// Backward. dq [T, H, D] bf16 is written; dkv_acc [S, D] fp32 must be zeroed by the caller
// and receives the sum of every contribution (cast to bf16 by the caller).
// deterministic == false: contributions are added with fp32 atomics.
// deterministic == true: the workspace below must be provided (sized by
// sparse_mla_bwd_workspace with the same T, S, H, K, D and scratch_budget). Two designs:
//  * fixed point (the default): `scratch` holds int64 sums of `fixed_rows` dkv rows; one launch
//    over all tokens per pass of that many rows adds round(v 2^s) with integer atomics, so the
//    order of arrival cannot change a bit (sparse_mla_kernels.cuh, "deterministic dKV in fixed
//    point"); then those rows of dkv_acc = sum 2^-s. One pass where S x D x 8 bytes fit the
//    budget; otherwise ceil(S / fixed_rows) passes, each recomputing the backward (dq is
//    rewritten with the same values) and keeping only its rows. The bits do not depend on the
//    number of passes.
//  * chunked (DSA_SPARSE_MLA_DET_REDUCE = list | bitmap): tokens are processed in
//    chunks of `chunk_tokens` tokens, each writing its contributions to `scratch`, then every
//    dkv row sums its contributions in (token, slot, head block) order via an inverse index
//    built on the device. The order does not depend on the chunking (each chunk continues the
//    rows' sums), so the result is bitwise the same for any budget.
// The two designs round differently (each is reproducible; they agree to fp32 rounding).
struct BwdArgs {
  const void* q;
  const void* kv;
  const void* out;
  const void* dout;
  const int32_t* indices;
  const float* lse;
  const float* attn_sink;
  const int32_t* topk_length;
  void* dq;
  float* dkv_acc;
  int64_t T, S;
  int H, K;
  int D = 576;  // d_qk: 576 or 512
  float sm_scale;
  bool deterministic;
  BwdKernel kernel = BwdKernel::kMma;  // bwd_kernel_selected; kWgmma applies to H % 64 == 0 only
  // deterministic workspace
  int64_t scratch_budget = 0;  // bytes of `scratch` the chunking keeps to (<= 0: no budget)
  float* scratch;       // [scratch_rows, D] fp32 (fixed point: [S, D] int64)
  uint32_t* fixed_stats; // [kFixedStatsWords] (fixed point: the bound's maxima)
  int32_t* entry_list;  // [list_len = chunk_tokens * K]
  int32_t* row_counts;  // [S + 1]
  int32_t* row_offsets; // [S + 1]
  int32_t* row_cursor;  // [S + 1]
  int32_t* lists;       // "list" reduction: header, touched rows, big rows (bwd_int_words)
};

// The deterministic design, DSA_SPARSE_MLA_DET_REDUCE: "fixed" (or unset: fixed point, in as
// many passes over the dkv rows as the budget needs), "list" (chunked; the inverse index's work
// proportional to each chunk's entries) or "bitmap" (chunked, the earlier S-CTA reduction, kept
// selectable). list and bitmap sum every row in the same order: their bits agree.
enum class DetReduce { kFixed, kList, kBitmap };
DetReduce det_reduce_mode();

// The int32 workspace of the deterministic backward: entry_list [list_len], row_counts,
// row_offsets, row_cursor [S + 1] each, lists [header + list_len + big rows], the fixed-point
// maxima [kFixedStatsWords]. bwd_int_words is its length; bind_bwd_ints points a's int32 fields
// into `ints` (glue and emulator alike).
int64_t bwd_int_words(int64_t S, int64_t list_len);
void bind_bwd_ints(BwdArgs& a, int32_t* ints, int64_t S, int64_t list_len);

// Largest K the deterministic backward serves (one token's entries must fit one chunk).
constexpr int64_t kBwdDeterministicMaxK = 131072;

// The deterministic scratch budget (SPEC section 6: <= 64 MiB), in force unless
// DSA_SPARSE_MLA_DET_SCRATCH_MB says otherwise (MiB; 0 = no budget: the earlier chunks of 131072
// entries, about 600 MB at H = 128, K = 2048, kept selectable so a first GPU run can time both).
constexpr int64_t kBwdScratchBudgetBytes = int64_t{64} << 20;
int64_t sparse_mla_bwd_scratch_budget();

// The deterministic workspace of one shape. Fixed point (det_reduce_mode() kFixed): fixed_rows =
// the dkv rows a pass accumulates, min(S, budget / (D x 8)) (at least 1; S without a budget),
// chunk_tokens = T, scratch_rows = 2 fixed_rows (int64 [fixed_rows, D] as fp32 rows),
// list_len = 1. Otherwise the chunked design (fixed_rows = 0): tokens per chunk, chosen as the most that keep
// chunk_tokens * K <= 131072 entries (one 16 KB bitmap) and scratch_rows * D * 4 <= budget,
// but at least one token (so a single token above the budget, K > budget / (nhb * D * 4),
// e.g. K > 14563 at H = 128, d_qk = 576, 64 MiB, still runs, one token per chunk);
// scratch_rows = ceil(H / head_block) * chunk_tokens * K; list_len = chunk_tokens * K (both at
// least 1). With the 64 MiB budget, scratch_bytes <= 64 MiB for any T and S whenever
// ceil(H / head_block) * K * D * 4 <= 64 MiB: every H <= 128 with K <= 14563 (576) / 16384 (512).
struct BwdWorkspace {
  int64_t chunk_tokens, scratch_rows, list_len;
  int64_t fixed_rows;  // dkv rows per fixed-point pass (0: the chunked design)
  bool fixed_point() const { return fixed_rows > 0; }
  int64_t scratch_bytes(int D) const { return scratch_rows * D * 4; }
};
BwdWorkspace sparse_mla_bwd_workspace(int64_t T, int64_t S, int H, int K, int D,
                                      int64_t budget_bytes);

cudaError_t sparse_mla_bwd_launch(const BwdArgs& a, cudaStream_t stream);

}  // namespace dsa::sparse_mla
