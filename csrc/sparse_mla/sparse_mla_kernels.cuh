// Sparse MLA attention kernels (d_qk = 576 or 512, d_v = 512), torch-free. bf16 tensor cores via
// mma.sync m16n8k16 (sm_80+), gathered latent rows staged in shared memory by 16-byte cp.async,
// double-buffered so the next block's gather overlaps this block's math.
//
// Shared tiles of 576- or 512-wide bf16 rows are stored with the 16-byte chunk c of row r at
// chunk c ^ (r & 7): rows are 1152 / 1024 bytes (a multiple of 128), so without the XOR the
// eight rows an ldmatrix reads would hit the same banks.
//
// The latent width D (d_qk) is a template parameter of every kernel: D = 576 is DeepSeek-V3.2 /
// GLM-5 (512 value dims + 64 rope dims that only enter the scores), D = 512 is DeepSeek-V4 (the
// whole row is both K and V, rope included). d_v is 512 in both, so V is always the first 512
// columns of the gathered tile and only the K-side loops (scores, dQ, the dKV key part) and the
// row strides depend on D.
//
// Head blocks: HB = 16, 32 or 64 heads share one gather. H need not be a multiple of HB: the
// last block's rows >= H (H = 8 in a 16-row tile) are zero-filled in shared memory, never read
// from q / dout, never written to out / lse / dq, and give P = dS = 0 in the backward.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/mma_sm80.cuh"

namespace dsa::sparse_mla {

constexpr int kDv = 512;
constexpr int kVChunks = kDv / 8;  // 16-byte chunks per value row
// The two latent widths the kernels are instantiated for (see above).
template <int D>
struct Latent {
  static_assert(D == 576 || D == 512, "sparse_mla CUDA kernels serve d_qk 576 and 512");
  static constexpr int kChunks = D / 8;  // 16-byte chunks per latent row
};
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Running-max start: finite, so exp2(old - new) never sees (-inf) - (-inf).
constexpr float kMaxInit = -1e30f;
constexpr int kMaxSmemPerBlock = 232448;  // sm_90 opt-in limit (227 KB)

__device__ __forceinline__ uint32_t swz(int row, int chunk, int row_chunks) {
  return static_cast<uint32_t>((row * row_chunks + (chunk ^ (row & 7))) * 16);
}

// Row t's usable prefix: topk_length[t] clamped to [0, K], or K.
__device__ __forceinline__ int row_limit(const int32_t* topk_length, int64_t t, int K) {
  if (!topk_length) return K;
  const int l = __ldg(topk_length + t);
  return l < 0 ? 0 : (l > K ? K : l);
}

// Entry j of row t names a kv row (>= 0) or is skipped (-1): j beyond the row's limit, or an
// index outside [0, S).
// The end of a row's online softmax: the factor that normalises its output (the sink joins the
// denominator only) and its natural-log lse; a row with no valid entry (l == 0) gives 0 and -inf,
// a NaN score (l is NaN: fmaxf drops NaN from the max, exp2 of it does not) gives NaN.
struct RowNorm {
  float inv, lse;
};
__device__ __forceinline__ RowNorm finish_row(float l, float m, const float* attn_sink, int h) {
  RowNorm r{0.f, -INFINITY};
  if (l != 0.f) {
    float denom = l;
    if (attn_sink) denom += exp2f(__ldg(attn_sink + h) * kLog2e - m);
    r.inv = 1.f / denom;
    r.lse = (m + log2f(l)) * kLn2;
  }
  return r;
}

__device__ __forceinline__ int64_t entry_row(const int32_t* idx_row, int j, int limit, int64_t S) {
  if (j >= limit) return -1;
  const int64_t r = __ldg(idx_row + j);
  return (r >= 0 && r < S) ? r : -1;
}

// Gather kBN latent rows (block `blk` of row t's indices) into a swizzled [kBN, D] tile.
// Skipped entries are zero-filled without reading and flagged in `valid` / `rows`.
template <int kBN, int kThreads, int D>
__device__ __forceinline__ void gather_kv_block(uint32_t tile, float* valid, int32_t* rows,
                                                const __nv_bfloat16* kv, const int32_t* idx_row,
                                                int blk, int limit, int64_t S) {
  constexpr int kChunks = Latent<D>::kChunks;
  for (int c = threadIdx.x; c < kBN * kChunks; c += kThreads) {
    const int r = c / kChunks, ch = c - r * kChunks;
    const int64_t row = entry_row(idx_row, blk * kBN + r, limit, S);
    const __nv_bfloat16* src = kv + (row >= 0 ? row * D + ch * 8 : 0);
    cp_async_16_zfill(tile + swz(r, ch, kChunks), src, row >= 0);
    if (ch == 0) {
      valid[r] = row >= 0 ? 1.f : 0.f;
      if (rows) rows[r] = static_cast<int32_t>(row);
    }
  }
}

// Copy `nrows` rows of `row_chunks` 16-byte chunks (global row stride `stride` elements) into a
// swizzled tile; rows >= `live` (heads past H in the last head block) are zero-filled without
// reading.
template <int kThreads>
__device__ __forceinline__ void load_rows(uint32_t tile, const __nv_bfloat16* src, int nrows,
                                          int live, int row_chunks, int64_t stride) {
  for (int c = threadIdx.x; c < nrows * row_chunks; c += kThreads) {
    const int r = c / row_chunks, ch = c - r * row_chunks;
    const bool ok = r < live;
    cp_async_16_zfill(tile + swz(r, ch, row_chunks), ok ? src + r * stride + ch * 8 : src, ok);
  }
}

// Head blocks per token: the last one may be partial (H = 8 in a 16-row block).
__host__ __device__ __forceinline__ int head_blocks(int H, int HB) { return (H + HB - 1) / HB; }
// Heads in the block starting at h0. Only a 16-head block can be partial (the launcher picks 32
// or 64 only when they divide H), so for HB >= 32 this is the constant HB and the masking folds
// away (the 64-head backward sits at its 128-register limit).
template <int HB>
__device__ __forceinline__ int block_heads(int H, int h0) {
  return HB > 16 ? HB : (H - h0 < HB ? H - h0 : HB);
}

// ================================ forward ======================================================
// One CTA per (token, block of HB heads): all heads of the block share one gather of the
// token's selected rows. HB/8 warps. Per 64-token block:
//   scores: warp (wm, wn) of an (HB/16) x 2 grid scores rows [16 wm, +16) against tokens
//     [32 wn, +32); the pair agrees on the row max through shared memory, writes its half of P
//     (bf16) and the rows' rescale factor to shared memory.
//   P·V: warp (pm, pn) accumulates rows [kPvRows pm, +kPvRows) x columns [kPvCols pn, +kPvCols)
//     of O over all 64 tokens. Two 16-row tiles per warp (when HB >= 32) let each V fragment
//     read from shared memory feed two MMAs, which cuts the shared-memory traffic of P·V.
template <int HB, int D>
struct FwdCfg {
  static constexpr int kBN = 64;
  static constexpr int kWarps = (HB / 16) * 2;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPvMt = HB >= 32 ? 2 : 1;             // 16-row tiles per P·V warp
  static constexpr int kPvRows = 16 * kPvMt;
  static constexpr int kPvColGroups = kWarps / (HB / kPvRows);
  static constexpr int kPvCols = kDv / kPvColGroups;
  static constexpr int kPvNt = kPvCols / 8;                    // n-tiles per P·V warp
  static_assert(kPvMt * kPvNt == 32, "128 accumulator registers per thread");
  static constexpr int kQBytes = HB * D * 2;
  static constexpr int kKVBytes = kBN * D * 2;
  static constexpr int kPBytes = HB * kBN * 2;
  static constexpr int kQOff = 0;
  static constexpr int kKVOff = kQOff + kQBytes;
  static constexpr int kPOff = kKVOff + 2 * kKVBytes;
  static constexpr int kMaxOff = kPOff + kPBytes;           // float [2][HB]: row max; final m
  static constexpr int kSumOff = kMaxOff + 2 * HB * 4;      // float [2][HB]: rescale; row sums
  static constexpr int kValidOff = kSumOff + 2 * HB * 4;    // float [2][kBN]
  static constexpr int kSmemBytes = kValidOff + 2 * kBN * 4;
  static_assert(kSmemBytes <= kMaxSmemPerBlock, "forward tiles exceed shared memory");
};

template <int HB, int D>
__global__ void __launch_bounds__(FwdCfg<HB, D>::kThreads, 1)
    sparse_mla_fwd_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                          const int32_t* __restrict__ indices, const float* __restrict__ attn_sink,
                          const int32_t* __restrict__ topk_length, __nv_bfloat16* __restrict__ out,
                          float* __restrict__ lse, int64_t S, int H, int K, float sm_scale) {
  using C = FwdCfg<HB, D>;
  constexpr int kQkChunks = Latent<D>::kChunks;
  DSA_DYNAMIC_SMEM(smem, 128);
  const uint32_t sQ = smem_u32(smem + C::kQOff);
  const uint32_t sKV0 = smem_u32(smem + C::kKVOff);
  const uint32_t sP = smem_u32(smem + C::kPOff);
  float* sMax = reinterpret_cast<float*>(smem + C::kMaxOff);
  float* sSum = reinterpret_cast<float*>(smem + C::kSumOff);
  float* sAlpha = sSum;  // during the loop: this block's rescale factor per row
  float* sValid = reinterpret_cast<float*>(smem + C::kValidOff);

  const int nhb = head_blocks(H, HB);
  const int64_t t = blockIdx.x / nhb;
  const int h0 = static_cast<int>(blockIdx.x % nhb) * HB;
  const int live = block_heads<HB>(H, h0);  // rows of this block that are heads
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;                       // scores
  const int pm = warp / C::kPvColGroups, pn = warp % C::kPvColGroups;  // P·V
  const int g = lane >> 2, c4 = lane & 3;
  const int32_t* idx_row = indices + t * K;
  const int limit = row_limit(topk_length, t, K);
  const int nblocks = (limit + C::kBN - 1) / C::kBN;
  const float scale2 = sm_scale * kLog2e;

  load_rows<C::kThreads>(sQ, q + (t * H + h0) * D, HB, live, kQkChunks, D);
  if (nblocks > 0)
    gather_kv_block<C::kBN, C::kThreads, D>(sKV0, sValid, nullptr, kv, idx_row, 0, limit, S);
  cp_async_commit();

  float o[C::kPvMt][C::kPvNt][4];
#pragma unroll
  for (int mt = 0; mt < C::kPvMt; ++mt)
#pragma unroll
    for (int i = 0; i < C::kPvNt; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
  float m_run[2] = {kMaxInit, kMaxInit}, l_run[2] = {0.f, 0.f};

  for (int blk = 0; blk < nblocks; ++blk) {
    const int stage = blk & 1;
    if (blk + 1 < nblocks)
      gather_kv_block<C::kBN, C::kThreads, D>(sKV0 + (stage ^ 1) * C::kKVBytes,
                                              sValid + (stage ^ 1) * C::kBN, nullptr, kv, idx_row,
                                              blk + 1, limit, S);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t sKV = sKV0 + stage * C::kKVBytes;
    const float* valid = sValid + stage * C::kBN;

    // S = Q Kᵀ for 16 rows x 32 tokens (4 n-tiles), k = D.
    float s[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sQ + swz(16 * wm + (lane & 15), 2 * kk + (lane >> 4), kQkChunks));
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        uint32_t b[4];
        const int tok = 32 * wn + 16 * np + (lane & 7) + 8 * (lane >> 4);
        ldmatrix_x4(b, sKV + swz(tok, 2 * kk + ((lane >> 3) & 1), kQkChunks));
        mma_bf16_16816(s[2 * np], a, b[0], b[1]);
        mma_bf16_16816(s[2 * np + 1], a, b[2], b[3]);
      }
    }
    // Mask, scale into the log2 domain, row max over this warp's 32 tokens.
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = 32 * wn + 8 * i + 2 * c4 + (e & 1);
        s[i][e] = valid[tok] != 0.f ? s[i][e] * scale2 : -INFINITY;
        mx[e >> 1] = fmaxf(mx[e >> 1], s[i][e]);
      }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 1));
      mx[hf] = fmaxf(mx[hf], __shfl_xor_sync(0xffffffffu, mx[hf], 2));
      if (c4 == 0) sMax[wn * HB + 16 * wm + g + 8 * hf] = mx[hf];
    }
    __syncthreads();
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = 16 * wm + g + 8 * hf;
      const float m_new = fmaxf(m_run[hf], fmaxf(sMax[r], sMax[HB + r]));
      const float alpha = exp2f(m_run[hf] - m_new);
      m_run[hf] = m_new;
      l_run[hf] *= alpha;
      if (wn == 0 && c4 == 0) sAlpha[r] = alpha;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = exp2f(s[i][e] - m_run[e >> 1]);
        l_run[e >> 1] += p[e];
      }
      const int col = 32 * wn + 8 * i + 2 * c4;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = 16 * wm + g + 8 * hf;
        const uint32_t addr = sP + swz(r, col >> 3, C::kBN / 8) + (col & 7) * 2;
        st_shared_u32(addr, pack_bf16x2(p[2 * hf], p[2 * hf + 1]));
      }
    }
    __syncthreads();

    // O[kPvRows, kPvCols] = O * alpha + P[kPvRows, 64 tokens] V[64 tokens, kPvCols].
#pragma unroll
    for (int mt = 0; mt < C::kPvMt; ++mt) {
      const float a0 = sAlpha[C::kPvRows * pm + 16 * mt + g];
      const float a1 = sAlpha[C::kPvRows * pm + 16 * mt + g + 8];
#pragma unroll
      for (int i = 0; i < C::kPvNt; ++i) {
        o[mt][i][0] *= a0; o[mt][i][1] *= a0;
        o[mt][i][2] *= a1; o[mt][i][3] *= a1;
      }
    }
#pragma unroll 1
    for (int kk = 0; kk < C::kBN / 16; ++kk) {
      uint32_t a[C::kPvMt][4];
#pragma unroll
      for (int mt = 0; mt < C::kPvMt; ++mt)
        ldmatrix_x4(a[mt], sP + swz(C::kPvRows * pm + 16 * mt + (lane & 15), 2 * kk + (lane >> 4),
                                C::kBN / 8));
      const int tok = 16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int np = 0; np < C::kPvNt / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sKV + swz(tok, C::kPvCols / 8 * pn + 2 * np + (lane >> 4), kQkChunks));
#pragma unroll
        for (int mt = 0; mt < C::kPvMt; ++mt) {
          mma_bf16_16816(o[mt][2 * np], a[mt], b[0], b[1]);
          mma_bf16_16816(o[mt][2 * np + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  // Row sums: the 4 lanes of a row, then the two column-half warps; final max per row.
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l_run[hf] += __shfl_xor_sync(0xffffffffu, l_run[hf], 1);
    l_run[hf] += __shfl_xor_sync(0xffffffffu, l_run[hf], 2);
    const int r = 16 * wm + g + 8 * hf;
    if (c4 == 0) sSum[wn * HB + r] = l_run[hf];
    if (c4 == 0 && wn == 0) sMax[r] = m_run[hf];
  }
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < C::kPvMt; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = C::kPvRows * pm + 16 * mt + g + 8 * hf;
      const int h = h0 + r;
      if (r >= live) continue;  // a padding row of the last head block
      const float l = sSum[r] + sSum[HB + r];
      const float m = sMax[r];
      const RowNorm norm = finish_row(l, m, attn_sink, h);
      const float inv = norm.inv, row_lse = norm.lse;
      __nv_bfloat16* orow = out + (t * H + h) * kDv + C::kPvCols * pn + 2 * c4;
#pragma unroll
      for (int i = 0; i < C::kPvNt; ++i)
        *reinterpret_cast<uint32_t*>(orow + 8 * i) =
            pack_bf16x2(o[mt][i][2 * hf] * inv, o[mt][i][2 * hf + 1] * inv);
      if (pn == 0 && c4 == 0) lse[t * H + h] = row_lse;
    }
}

// Per head row r of the block: Delta = rowsum(out * dout) into sDelta[r], and the log2-domain
// normaliser of P (lse, with the sink added when present; +inf for an empty row, so P = 0
// there) into sLse[r]. A warp per row; rows >= live (padding of the last head block) get 0 and
// +inf. Shared by the mma.sync and the wgmma backward.
template <int HB, int kWarps>
__device__ __forceinline__ void bwd_row_stats(const __nv_bfloat16* __restrict__ out,
                                              const __nv_bfloat16* __restrict__ dout,
                                              const float* __restrict__ lse,
                                              const float* __restrict__ attn_sink, int64_t t, int H,
                                              int h0, int live, float* sDelta, float* sLse) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int r = warp; r < HB; r += kWarps) {
    if (r >= live) {
      if (lane == 0) {
        sDelta[r] = 0.f;
        sLse[r] = INFINITY;
      }
      continue;
    }
    const int64_t base = (t * H + h0 + r) * kDv;
    float acc = 0.f;
    for (int d = lane * 2; d < kDv; d += 64) {
      const float2 o2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(out + base + d));
      const float2 g2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(dout + base + d));
      acc += o2.x * g2.x + o2.y * g2.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      sDelta[r] = acc;
      const float l = __ldg(lse + t * H + h0 + r);
      float norm = l;
      if (attn_sink) {
        const float sk = __ldg(attn_sink + h0 + r);
        const float m = fmaxf(l, sk);
        norm = m + log1pf(exp2f((fminf(l, sk) - m) * kLog2e));
      }
      sLse[r] = (l == -INFINITY || l != l) ? INFINITY : norm * kLog2e;
    }
  }
}

// ================================ backward =====================================================
// Where the backward kernels send dKV: fp32 atomics into `acc` (the atomic mode), plain stores
// into the chunked deterministic scratch, or 64-bit integer atomics into `fixed` (the
// fixed-point deterministic mode, "deterministic dKV in fixed point" below).
struct DkvTarget {
  float* acc;                   // [S, D] fp32; in the fixed-point mode only non-finite values
  float* scratch;               // chunked deterministic mode: [nhb x chunk x K, D], or nullptr
  unsigned long long* fixed;    // fixed-point mode: [row_end - row_begin, D] sums, or nullptr
  const uint32_t* fixed_stats;  // fixed_point_bound_kernel's maxima (fixed-point mode)
  int64_t fixed_terms;          // T x H: the (token, head) pairs whose weights bound a sum
  int64_t row_begin, row_end;   // fixed-point mode: this pass's dkv rows (others are skipped)
};

// 2^s of the fixed-point mode: the largest power of two for which no dkv sum can leave
// (-2^61, 2^61). A contribution of head h of token t to row j's column d is
// dS·q[d] (+ P·dout[d] for d < 512) with dS = P (dP - Delta) sm_scale, |dP| <= 512 |dout|max
// |v|max, |Delta| <= 512 |dout|max |out|max, so it is at most P·M with
// M = |dout|max (1 + sm_scale |q|max 512 (|v|max + |out|max)); a (t, h) pair's P over its
// slots sums to <= 1 (softmax, a sink only lowers it), so a column's sum is at most T·H·M.
// Against the bf16 rounding of P / dS and the fp32 rounding of the MMAs the int64 range keeps
// 4x headroom beyond 2^61. The exponent is clamped so that 2^s stays a normal float.
__device__ __forceinline__ int fixed_point_exponent(const uint32_t* stats, float sm_scale,
                                                    int64_t terms) {
  const double q = __uint_as_float(stats[0]), o = __uint_as_float(stats[1]);
  const double g = __uint_as_float(stats[2]), v = __uint_as_float(stats[3]);
  const double per_term = g * (1.0 + static_cast<double>(sm_scale) * q * kDv * (v + o));
  const double bound = per_term * static_cast<double>(terms);
  if (!(bound > 0.0)) return 0;  // every contribution is 0
  const int s = 60 - ilogb(bound);  // bound < 2^(ilogb + 1), so bound 2^s < 2^61
  return s < -126 ? -126 : (s > 126 ? 126 : s);
}

// One CTA's view of a DkvTarget's accumulating modes, rows of D columns. It keeps only the
// scale in a register (computed once per CTA, the same in every CTA: a pure function of the
// same four words); the pointers stay in the kernel's parameter space (the 64-head mma.sync
// backward at 576 has no registers to spare at 512 threads).
template <int D>
class DkvAdder {
 public:
  __device__ DkvAdder(const DkvTarget& t, float sm_scale)
      : t_(t), scale_(t.fixed ? ldexpf(1.f, fixed_point_exponent(t.fixed_stats, sm_scale, t.fixed_terms)) : 0.f) {}

  // Fixed point: rows outside this pass are left to another pass, and a non-finite value goes
  // to `acc` (sums of infinities and NaNs are the same in any order; the finish kernel lets
  // them override the integer sum).
  __device__ __forceinline__ void add(int64_t row, int col, float v) const {
    if (t_.fixed == nullptr) {
      atomicAdd(t_.acc + row * D + col, v);
    } else if (in_pass(row)) {
      add_fixed(row, col, v);
    }
  }
  __device__ __forceinline__ void add2(int64_t row, int col, float2 v) const {
    if (t_.fixed == nullptr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      atomicAdd(reinterpret_cast<float2*>(t_.acc + row * D + col), v);
#else
      atomicAdd(t_.acc + row * D + col, v.x);
      atomicAdd(t_.acc + row * D + col + 1, v.y);
#endif
    } else if (in_pass(row)) {
      add_fixed(row, col, v.x);
      add_fixed(row, col + 1, v.y);
    }
  }

 private:
  __device__ __forceinline__ bool in_pass(int64_t row) const {
    return static_cast<uint64_t>(row - t_.row_begin) < static_cast<uint64_t>(t_.row_end - t_.row_begin);
  }
  __device__ __forceinline__ void add_fixed(int64_t row, int col, float v) const {
    if (fabsf(v) <= 3.402823466e38f)
      atomicAdd(t_.fixed + (row - t_.row_begin) * D + col,
                static_cast<unsigned long long>(__float2ll_rn(v * scale_)));
    else
      atomicAdd(t_.acc + row * D + col, v);
  }

  const DkvTarget& t_;
  float scale_;
};

// One CTA per (token, block of HB heads), 32 selected rows per step. Warps form a
// (HB/16) x 4 grid. Per step:
//   A: the first half of the warps computes S and dP in 16-row x 16-token tiles; P is
//      recomputed from lse, dS = P (dP - Delta) scale; P and dS go to shared memory (bf16).
//   B: dQ[16 wm.., D/4 wn..+D/4] += dS Kᵀ-block (registers, whole loop).
//   C: dKV-block [32, D] = dSᵀ Q + Pᵀ dO in groups of 16 tokens x 24 or 48 columns (D = 576) or
//      32 or 64 (D = 512) spread over all warps, then added to the fp32 dkv buffer with atomics (default) or written to the
//      deterministic scratch, one row per (head block, token, slot).
template <int HB, int D>
struct BwdCfg {
  static constexpr int kBN = 32;
  static constexpr int kWarps = (HB / 16) * 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kPStride = kBN + 8;  // bf16 per P / dS row: 80 bytes, conflict-free
  static constexpr int kQBytes = HB * D * 2;
  static constexpr int kDOBytes = HB * kDv * 2;
  static constexpr int kKVBytes = kBN * D * 2;
  static constexpr int kPBytes = HB * kPStride * 2;
  static constexpr int kQOff = 0;
  static constexpr int kDOOff = kQOff + kQBytes;
  static constexpr int kKVOff = kDOOff + kDOBytes;
  static constexpr int kPOff = kKVOff + 2 * kKVBytes;
  static constexpr int kDSOff = kPOff + kPBytes;
  static constexpr int kLseOff = kDSOff + kPBytes;          // float [HB] (log2 domain)
  static constexpr int kDeltaOff = kLseOff + HB * 4;        // float [HB]
  static constexpr int kValidOff = kDeltaOff + HB * 4;      // float [2][kBN]
  static constexpr int kRowsOff = kValidOff + 2 * kBN * 4;  // int32 [2][kBN]
  static constexpr int kSmemBytes = kRowsOff + 2 * kBN * 4;
  // n-tiles per dKV group: 48 (D = 576) or 64 (D = 512) columns where registers allow (fewer
  // reloads of the dSᵀ / Pᵀ fragments), half that at 512 threads (128 registers per thread). A
  // group must divide D: 576 = 12 x 48, 512 = 8 x 64.
  // The 64-head, 576-wide kernel spilled at 24 columns where the dKV adds are scalar (below
  // sm_90: no float2 atomicAdd; everywhere: the fixed-point mode's 64-bit integer adds): 16.
  static constexpr int kGroupTiles = (D == 576 ? 6 : 8) / (HB == 64 ? (D == 576 ? 3 : 2) : 1);
  static constexpr int kGroupsPerM = D / (8 * kGroupTiles);
  static_assert(kGroupsPerM * 8 * kGroupTiles == D, "dKV groups tile the row");
  // dQ n-tiles per warp: the 4 column warps split D.
  static constexpr int kDqNt = D / 32;
  static_assert(kSmemBytes <= kMaxSmemPerBlock, "backward tiles exceed shared memory");
};

template <int HB, int D>
__global__ void __launch_bounds__(BwdCfg<HB, D>::kThreads, 1)
    sparse_mla_bwd_kernel(const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                          const __nv_bfloat16* __restrict__ out,
                          const __nv_bfloat16* __restrict__ dout,
                          const int32_t* __restrict__ indices, const float* __restrict__ lse,
                          const float* __restrict__ attn_sink,
                          const int32_t* __restrict__ topk_length, __nv_bfloat16* __restrict__ dq,
                          DkvTarget dkv, int64_t t_begin, int64_t chunk_tokens, int64_t S, int H,
                          int K, float sm_scale) {
  using C = BwdCfg<HB, D>;
  constexpr int kQkChunks = Latent<D>::kChunks;
  DSA_DYNAMIC_SMEM(smem, 128);
  const uint32_t sQ = smem_u32(smem + C::kQOff);
  const uint32_t sDO = smem_u32(smem + C::kDOOff);
  const uint32_t sKV0 = smem_u32(smem + C::kKVOff);
  const uint32_t sP = smem_u32(smem + C::kPOff);
  const uint32_t sDS = smem_u32(smem + C::kDSOff);
  float* sLse = reinterpret_cast<float*>(smem + C::kLseOff);
  float* sDelta = reinterpret_cast<float*>(smem + C::kDeltaOff);
  float* sValid = reinterpret_cast<float*>(smem + C::kValidOff);
  int32_t* sRows = reinterpret_cast<int32_t*>(smem + C::kRowsOff);

  const int nhb = head_blocks(H, HB);
  const int64_t tl = blockIdx.x / nhb;  // token within this launch's chunk
  const int64_t t = t_begin + tl;
  const int hb = static_cast<int>(blockIdx.x % nhb);
  const int h0 = hb * HB;
  const int live = block_heads<HB>(H, h0);  // rows of this block that are heads
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int g = lane >> 2, c4 = lane & 3;
  const int32_t* idx_row = indices + t * K;
  const int limit = row_limit(topk_length, t, K);
  const int nblocks = (limit + C::kBN - 1) / C::kBN;
  const DkvAdder<D> adder(dkv, sm_scale);
  const float scale2 = sm_scale * kLog2e;

  load_rows<C::kThreads>(sQ, q + (t * H + h0) * D, HB, live, kQkChunks, D);
  load_rows<C::kThreads>(sDO, dout + (t * H + h0) * kDv, HB, live, kVChunks, kDv);
  if (nblocks > 0)
    gather_kv_block<C::kBN, C::kThreads, D>(sKV0, sValid, sRows, kv, idx_row, 0, limit, S);
  cp_async_commit();

  bwd_row_stats<HB, C::kWarps>(out, dout, lse, attn_sink, t, H, h0, live, sDelta, sLse);

  float dqa[C::kDqNt][4];
#pragma unroll
  for (int i = 0; i < C::kDqNt; ++i) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0.f;

  for (int blk = 0; blk < nblocks; ++blk) {
    const int stage = blk & 1;
    if (blk + 1 < nblocks)
      gather_kv_block<C::kBN, C::kThreads, D>(sKV0 + (stage ^ 1) * C::kKVBytes,
                                              sValid + (stage ^ 1) * C::kBN,
                                              sRows + (stage ^ 1) * C::kBN, kv, idx_row, blk + 1,
                                              limit, S);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t sKV = sKV0 + stage * C::kKVBytes;
    const float* valid = sValid + stage * C::kBN;
    const int32_t* rows = sRows + stage * C::kBN;

    // ---- A: S and dP, 16 rows x 16 tokens per warp, on the first half of the warps: every
    // Q / dO fragment read from shared memory feeds two MMAs (half the traffic of 8-token tiles).
    if (warp < C::kWarps / 2) {
      const int am = warp >> 1, an = warp & 1;
      float s[2][4] = {}, dp[2][4] = {};
      const int tok = 16 * an + (lane & 7) + 8 * (lane >> 4);
#pragma unroll 4
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4], b[4];
        ldmatrix_x4(a, sQ + swz(16 * am + (lane & 15), 2 * kk + (lane >> 4), kQkChunks));
        ldmatrix_x4(b, sKV + swz(tok, 2 * kk + ((lane >> 3) & 1), kQkChunks));
        mma_bf16_16816(s[0], a, b[0], b[1]);
        mma_bf16_16816(s[1], a, b[2], b[3]);
        if (kk < kDv / 16) {
          ldmatrix_x4(a, sDO + swz(16 * am + (lane & 15), 2 * kk + (lane >> 4), kVChunks));
          mma_bf16_16816(dp[0], a, b[0], b[1]);
          mma_bf16_16816(dp[1], a, b[2], b[3]);
        }
      }
      uint8_t* pbase = smem + C::kPOff;
      uint8_t* dsbase = smem + C::kDSOff;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = 16 * am + g + 8 * hf;
          const int col = 16 * an + 8 * nt + 2 * c4;
          float p[2], ds[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            // a padding row's score is 0 * kv, NaN for a non-finite kv: mask it explicitly
            const float pe = valid[col + e] != 0.f && r < live
                                 ? exp2f(s[nt][2 * hf + e] * scale2 - sLse[r])
                                 : 0.f;
            p[e] = pe;
            ds[e] = r < live ? pe * (dp[nt][2 * hf + e] - sDelta[r]) * sm_scale : 0.f;
          }
          *reinterpret_cast<uint32_t*>(pbase + (r * C::kPStride + col) * 2) = pack_bf16x2(p[0], p[1]);
          *reinterpret_cast<uint32_t*>(dsbase + (r * C::kPStride + col) * 2) = pack_bf16x2(ds[0], ds[1]);
        }
    }
    __syncthreads();

    // ---- B: dQ[16 rows, D/4 cols] += dS[16 rows, 32 tokens] K[32 tokens, D/4 cols].
#pragma unroll
    for (int kk = 0; kk < C::kBN / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sDS + ((16 * wm + (lane & 15)) * C::kPStride + 16 * kk + 8 * (lane >> 4)) * 2);
      const int tok = 16 * kk + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int np = 0; np < C::kDqNt / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sKV + swz(tok, C::kDqNt * wn + 2 * np + (lane >> 4), kQkChunks));
        mma_bf16_16816(dqa[2 * np], a, b[0], b[1]);
        mma_bf16_16816(dqa[2 * np + 1], a, b[2], b[3]);
      }
    }

    // ---- C: dKV[16 tokens, 8 kGroupTiles cols] groups = dSᵀ Q (+ Pᵀ dO for cols < 512: every
    // column when D = 512, where K == V).
    for (int grp = warp; grp < 2 * C::kGroupsPerM; grp += C::kWarps) {
      const int mt = grp / C::kGroupsPerM;
      const int col0 = (grp % C::kGroupsPerM) * 8 * C::kGroupTiles;
      float acc[C::kGroupTiles][4];
#pragma unroll
      for (int i = 0; i < C::kGroupTiles; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
      // A = (dS or P)ᵀ: matrix q of ldmatrix.trans covers tokens +8 (q & 1), heads +8 (q >> 1).
      const int a_head = (lane & 7) + 8 * (lane >> 4);
      const int a_tok = 16 * mt + 8 * ((lane >> 3) & 1);
      const int b_head = (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
      for (int kh = 0; kh < HB / 16; ++kh) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, sDS + ((16 * kh + a_head) * C::kPStride + a_tok) * 2);
#pragma unroll
        for (int i = 0; i < C::kGroupTiles; ++i) {
          uint32_t b[2];
          ldmatrix_x2_trans(b, sQ + swz(16 * kh + b_head, (col0 >> 3) + i, kQkChunks));
          mma_bf16_16816(acc[i], a, b[0], b[1]);
        }
        if (col0 < kDv) {  // the value part: columns below 512 (checked per n-tile below)
          // (D = 512: always, and the per-n-tile check folds away)
          ldmatrix_x4_trans(a, sP + ((16 * kh + a_head) * C::kPStride + a_tok) * 2);
#pragma unroll
          for (int i = 0; i < C::kGroupTiles; ++i) {
            if (col0 + 8 * i < kDv) {
              uint32_t b[2];
              ldmatrix_x2_trans(b, sDO + swz(16 * kh + b_head, (col0 >> 3) + i, kVChunks));
              mma_bf16_16816(acc[i], a, b[0], b[1]);
            }
          }
        }
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int tok = 16 * mt + g + 8 * hf;
        if (valid[tok] == 0.f) continue;
        if (dkv.scratch) {
          const int64_t entry = (static_cast<int64_t>(hb) * chunk_tokens + tl) * K + blk * C::kBN + tok;
          float* dst = dkv.scratch + entry * D;
#pragma unroll
          for (int i = 0; i < C::kGroupTiles; ++i)
            *reinterpret_cast<float2*>(dst + col0 + 8 * i + 2 * c4) =
                make_float2(acc[i][2 * hf], acc[i][2 * hf + 1]);
        } else {
#pragma unroll
          for (int i = 0; i < C::kGroupTiles; ++i)
            adder.add2(rows[tok], col0 + 8 * i + 2 * c4, make_float2(acc[i][2 * hf], acc[i][2 * hf + 1]));
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = 16 * wm + g + 8 * hf;
    if (r >= live) continue;  // a padding row of the last head block
    __nv_bfloat16* drow = dq + (t * H + h0 + r) * D + (D / 4) * wn + 2 * c4;
#pragma unroll
    for (int i = 0; i < C::kDqNt; ++i)
      *reinterpret_cast<uint32_t*>(drow + 8 * i) = pack_bf16x2(dqa[i][2 * hf], dqa[i][2 * hf + 1]);
  }
}

// ======================= deterministic dKV reduction (inverse index) ===========================
// Entries e = tl * K + j of one token chunk (tl: token within the chunk, j: slot). Every dkv row
// r sums, per column, its previous value and then the scratch rows of its entries in ascending e
// (token, then slot) with the head blocks inner: that order is what the result's bits depend on,
// and it is the same for any chunking, since a chunk continues the sums of the previous ones.
//
// Two ways to build the per-row entry lists, selected by DSA_SPARSE_MLA_DET_REDUCE (launcher):
//  * "list" (default): work proportional to the chunk's entries n, never to S. count_rows_kernel
//    counts with atomics and appends a row to the touched list the first time it is hit;
//    alloc_rows_kernel gives each touched row a segment of entry_list (segment placement is
//    arrival order: it only says where a row's ids live, never the order they are summed in)
//    and zeroes its count for the next chunk; fill_rows_kernel drops each entry id into its
//    row's segment (unordered); reduce_rows_kernel: one warp per touched row of <= 32 entries
//    ranks the ids in registers (32 shuffles), then sums in rank order; rows of more entries
//    (a kv row picked by more than 32 of the chunk's slots) go to reduce_big_rows_kernel, a CTA
//    each, ordering the ids through a bitmap over the chunk's entries (n / 32 words; there are
//    at most n / 33 such rows). Rows never touched cost nothing; the count array is cleared
//    once per call (S words), not per chunk.
//  * "bitmap" (the earlier path, kept so a GPU run can time both): counts, a one-CTA exclusive
//    scan of S counts, the unordered fill, then reduce_rows_bitmap_kernel with one CTA per dkv
//    row (S CTAs per chunk), each clearing and scanning the n / 32-word bitmap.
// Both give bitwise identical results (same per-column addition order).

constexpr int kMaxChunkEntries = 131072;  // bitmap of 4096 words (= kBwdDeterministicMaxK)
constexpr int kReduceThreads = 160;       // 144 (D = 576) or 128 (D = 512) float4 column owners
constexpr int kReduceSmemBytes = (kMaxChunkEntries / 32 + kMaxChunkEntries / 1024) * 4;
constexpr int kScanThreads = 1024;
constexpr int kScanSmemBytes = kScanThreads * 4;
// "list" path: lists = {header [kListHeader] | touched rows [list_len] | big rows [big_len]}.
constexpr int kSmallRowEntries = 32;      // a warp ranks up to one id per lane
constexpr int kListHeader = 4;            // n_touched, entries allocated, n_big, (pad)
constexpr int kListReduceThreads = 256;   // 8 warps, a touched row each per step
__host__ __device__ constexpr int64_t big_rows_capacity(int64_t list_len) {
  return list_len / (kSmallRowEntries + 1) + 1;
}

// Counts the chunk's entries per row; with `lists` (the "list" path) a row's first entry also
// appends it to the touched list.
__global__ void count_rows_kernel(const int32_t* __restrict__ indices,
                                  const int32_t* __restrict__ topk_length, int64_t t_begin,
                                  int64_t n_entries, int K, int64_t S, int32_t* row_counts,
                                  int32_t* lists) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n_entries) return;
  const int64_t t = t_begin + e / K;
  const int64_t r = entry_row(indices + t * K, static_cast<int>(e % K), row_limit(topk_length, t, K), S);
  if (r < 0) return;
  const int32_t before = atomicAdd(row_counts + r, 1);
  if (lists && before == 0) lists[kListHeader + atomicAdd(lists, 1)] = static_cast<int32_t>(r);
}

// "list" path: a segment of entry_list per touched row ([row_offsets[r], +count)), the cursor
// the fill advances, the count reset to 0 for the next chunk, rows of > kSmallRowEntries entries
// listed for the big-row kernel. Grid-stride over the touched rows (the grid is sized by n).
__global__ void alloc_rows_kernel(int32_t* __restrict__ row_counts, int32_t* __restrict__ row_offsets,
                                  int32_t* __restrict__ row_cursor, int32_t* lists,
                                  int64_t list_len) {
  const int n_touched = lists[0];
  int32_t* big = lists + kListHeader + list_len;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_touched; i += gridDim.x * blockDim.x) {
    const int32_t r = lists[kListHeader + i];
    const int32_t c = row_counts[r];
    row_counts[r] = 0;
    const int32_t off = atomicAdd(lists + 1, c);
    row_offsets[r] = off;
    row_cursor[r] = off;
    if (c > kSmallRowEntries) big[atomicAdd(lists + 2, 1)] = r;
  }
}

// Exclusive scan of row_counts[0, S) into row_offsets[0, S] (one CTA of 1024 threads) and a
// copy into row_cursor ("bitmap" path).
__global__ void __launch_bounds__(kScanThreads) scan_rows_kernel(const int32_t* __restrict__ row_counts,
                                                         int64_t S, int32_t* row_offsets,
                                                         int32_t* row_cursor) {
  DSA_DYNAMIC_SMEM(smem, 128);  // int32 [1024]
  int32_t* part = reinterpret_cast<int32_t*>(smem);
  const int tid = threadIdx.x;
  const int64_t per = (S + kScanThreads - 1) / kScanThreads;
  const int64_t b = tid * per, e = b + per < S ? b + per : S;
  int32_t sum = 0;
  for (int64_t i = b; i < e; ++i) sum += row_counts[i];
  part[tid] = sum;
  __syncthreads();
  for (int off = 1; off < kScanThreads; off <<= 1) {
    const int32_t v = tid >= off ? part[tid - off] : 0;
    __syncthreads();
    part[tid] += v;
    __syncthreads();
  }
  int32_t run = part[tid] - sum;
  for (int64_t i = b; i < e; ++i) {
    row_offsets[i] = run;
    row_cursor[i] = run;
    run += row_counts[i];
  }
  if (tid == kScanThreads - 1) row_offsets[S] = part[kScanThreads - 1];
}

// Each entry id into its row's segment, in arrival order (both paths; the reductions order).
// Afterwards row_cursor[r] is the segment's end.
__global__ void fill_rows_kernel(const int32_t* __restrict__ indices,
                                 const int32_t* __restrict__ topk_length, int64_t t_begin,
                                 int64_t n_entries, int K, int64_t S, int32_t* row_cursor,
                                 int32_t* entry_list) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n_entries) return;
  const int64_t t = t_begin + e / K;
  const int64_t r = entry_row(indices + t * K, static_cast<int>(e % K), row_limit(topk_length, t, K), S);
  if (r >= 0) entry_list[atomicAdd(row_cursor + r, 1)] = static_cast<int32_t>(e);
}

// One CTA (kReduceThreads) sums dkv row `row` over the entry ids entry_list[begin, end)
// (unordered) in ascending id order, through a bitmap over the chunk's n_entries ids and a
// summary word per 32 bitmap words. Uniform per CTA (it has __syncthreads); the smem is free
// again on return.
template <int D>
__device__ __forceinline__ void bitmap_sorted_sum(uint32_t* bits, const float* __restrict__ scratch,
                                                  const int32_t* __restrict__ entry_list, int begin,
                                                  int end, int64_t row, int64_t n_entries,
                                                  int64_t chunk_entries, int nhb,
                                                  float* __restrict__ dkv_acc) {
  uint32_t* summary = bits + kMaxChunkEntries / 32;  // [kMaxChunkEntries / 1024]
  const int nwords = static_cast<int>((n_entries + 31) / 32);
  const int nsum = (nwords + 31) / 32;
  for (int w = threadIdx.x; w < nwords; w += kReduceThreads) bits[w] = 0u;
  __syncthreads();
  for (int i = begin + threadIdx.x; i < end; i += kReduceThreads) {
    const int e = entry_list[i];
    atomicOr(bits + (e >> 5), 1u << (e & 31));
  }
  __syncthreads();
  for (int sw = threadIdx.x; sw < nsum; sw += kReduceThreads) {
    uint32_t m = 0;
    for (int b = 0; b < 32 && sw * 32 + b < nwords; ++b) m |= (bits[sw * 32 + b] != 0u) << b;
    summary[sw] = m;
  }
  __syncthreads();
  static_assert(D / 4 <= kReduceThreads, "a float4 column owner per thread");
  if (threadIdx.x < D / 4) {
    float4* dst = reinterpret_cast<float4*>(dkv_acc + row * D) + threadIdx.x;
    float4 acc = *dst;
    for (int sw = 0; sw < nsum; ++sw) {
      for (uint32_t m = summary[sw]; m; m &= m - 1) {
        const int w = sw * 32 + __ffs(m) - 1;
        for (uint32_t bw = bits[w]; bw; bw &= bw - 1) {
          const int64_t e = static_cast<int64_t>(w) * 32 + __ffs(bw) - 1;
          for (int h = 0; h < nhb; ++h) {
            const float4 v =
                reinterpret_cast<const float4*>(scratch + (h * chunk_entries + e) * D)[threadIdx.x];
            acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
          }
        }
      }
    }
    *dst = acc;
  }
  __syncthreads();
}

// No __launch_bounds__ on the three reduce kernels: with them ptxas (CUDA 13.0, sm_90a) kept
// them at 32-48 registers and spilled 4-16 bytes; without, 38-56 registers and no spill.
// "bitmap" path: one CTA per dkv row (S CTAs), entries [row_offsets[row], row_offsets[row + 1]).
template <int D>
__global__ void reduce_rows_bitmap_kernel(
    const float* __restrict__ scratch, const int32_t* __restrict__ row_offsets,
    const int32_t* __restrict__ entry_list, int64_t n_entries, int64_t chunk_entries, int nhb,
    float* __restrict__ dkv_acc) {
  DSA_DYNAMIC_SMEM(smem, 128);  // kReduceSmemBytes
  const int64_t row = blockIdx.x;
  const int begin = row_offsets[row], end = row_offsets[row + 1];
  if (begin == end) return;
  bitmap_sorted_sum<D>(reinterpret_cast<uint32_t*>(smem), scratch, entry_list, begin, end, row,
                       n_entries, chunk_entries, nhb, dkv_acc);
}

// "list" path, rows of more than kSmallRowEntries entries: a CTA per row (grid-stride over the
// big list), ordered through the bitmap.
template <int D>
__global__ void reduce_big_rows_kernel(
    const float* __restrict__ scratch, const int32_t* __restrict__ row_offsets,
    const int32_t* __restrict__ row_cursor, const int32_t* __restrict__ entry_list,
    const int32_t* __restrict__ lists, int64_t list_len, int64_t n_entries, int64_t chunk_entries,
    int nhb, float* __restrict__ dkv_acc) {
  DSA_DYNAMIC_SMEM(smem, 128);  // kReduceSmemBytes
  const int n_big = lists[2];
  const int32_t* big = lists + kListHeader + list_len;
  for (int i = blockIdx.x; i < n_big; i += gridDim.x) {
    const int32_t row = big[i];
    bitmap_sorted_sum<D>(reinterpret_cast<uint32_t*>(smem), scratch, entry_list, row_offsets[row],
                         row_cursor[row], row, n_entries, chunk_entries, nhb, dkv_acc);
  }
}

// "list" path, rows of at most kSmallRowEntries entries: one warp per touched row (grid-stride
// over the touched list). Lane i holds the segment's i-th id; its rank is the number of smaller
// ids (ids are distinct), so step k sums the id of rank k: the ascending order. Each lane owns
// D / 64 float2 columns (coalesced 256-byte row reads).
template <int D>
__global__ void reduce_rows_kernel(
    const float* __restrict__ scratch, const int32_t* __restrict__ row_offsets,
    const int32_t* __restrict__ row_cursor, const int32_t* __restrict__ entry_list,
    const int32_t* __restrict__ lists, int64_t chunk_entries, int nhb,
    float* __restrict__ dkv_acc) {
  constexpr int kWarps = kListReduceThreads / 32;
  constexpr int kCols2 = D / 64;  // float2 per lane
  static_assert(kCols2 * 64 == D, "a row is a whole number of warp-wide float2 strips");
  const int n_touched = lists[0];
  const int lane = threadIdx.x & 31;
  for (int i = blockIdx.x * kWarps + (threadIdx.x >> 5); i < n_touched; i += gridDim.x * kWarps) {
    const int32_t row = lists[kListHeader + i];
    const int begin = row_offsets[row];
    const int c = row_cursor[row] - begin;
    if (c > kSmallRowEntries) continue;  // reduce_big_rows_kernel's (warp-uniform)
    const int32_t id = lane < c ? entry_list[begin + lane] : INT32_MAX;
    int rank = 0;
#pragma unroll
    for (int k = 0; k < 32; ++k) rank += __shfl_sync(0xffffffffu, id, k) < id;
    float2* dst = reinterpret_cast<float2*>(dkv_acc + static_cast<int64_t>(row) * D) + lane;
    float2 acc[kCols2];
#pragma unroll
    for (int j = 0; j < kCols2; ++j) acc[j] = dst[32 * j];
    for (int k = 0; k < c; ++k) {
      const int src = __ffs(__ballot_sync(0xffffffffu, rank == k)) - 1;
      const int64_t e = __shfl_sync(0xffffffffu, id, src);
      for (int h = 0; h < nhb; ++h) {
        const float2* v = reinterpret_cast<const float2*>(scratch + (h * chunk_entries + e) * D) + lane;
#pragma unroll
        for (int j = 0; j < kCols2; ++j) {
          const float2 x = v[32 * j];
          acc[j].x += x.x;
          acc[j].y += x.y;
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kCols2; ++j) dst[32 * j] = acc[j];
  }
}

// ======================= deterministic dKV in fixed point ======================================
// The default deterministic mode (DSA_SPARSE_MLA_DET_REDUCE, launcher): one pass where its
// accumulator fits the scratch budget (S x D x 8 bytes <= 64 MiB: S <= 14563 at d_qk 576, 16384
// at 512), else passes over ranges of dkv rows, each keeping only its rows' sums. Every
// contribution v (one head block's sum for a (token, slot, column)) is added as the integer
// round(v 2^s) by a 64-bit integer atomic. Integer addition is associative, so the sums, and
// dkv = sum 2^-s, do not depend on the order in which CTAs arrive: bitwise the same run to run,
// in one launch over all tokens with the atomic mode's red.global count (8 bytes each, not 4),
// where the chunked modes below hold only budget / (nhb K D 4) tokens in flight (7 at the SPEC
// shape: 14 CTAs on 132 SMs). 2^s comes from a bound on every sum (fixed_point_exponent), so no
// sum overflows; each addition rounds to 2^-(s+1), at most T nhb of them a column: an absolute
// error <= T nhb 2^-(s+1) <= 2^-61 T nhb (T H M) (M: fixed_point_exponent), e.g. 2^-29 M at
// T = 4096, H = 128. Non-finite contributions go to the fp32 buffer (DkvAdder::add) and win in
// the finish kernel, so NaN / inf land where the atomic mode puts them.
//
// stats[0..3] = max |x| over the finite elements of q [rows x D], out, dout [rows x 512] and the
// value columns kv[:, :512] ([S x D] rows), as float bits (non-negative floats order as their
// bits, so atomicMax on uint32 is a float max). 16-byte loads of 8 bf16, grid-stride.
__device__ __forceinline__ float finite_abs_max8(const __nv_bfloat16* p, float m) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    const float a = fabsf(f.x), b = fabsf(f.y);
    if (a <= 3.402823466e38f) m = fmaxf(m, a);  // NaN and inf fail the test
    if (b <= 3.402823466e38f) m = fmaxf(m, b);
  }
  return m;
}

constexpr int kFixedStatsWords = 4;
constexpr int kFixedThreads = 256;

template <int D>
__global__ void fixed_point_bound_kernel(const __nv_bfloat16* __restrict__ q,
                                         const __nv_bfloat16* __restrict__ out,
                                         const __nv_bfloat16* __restrict__ dout,
                                         const __nv_bfloat16* __restrict__ kv, int64_t rows, int64_t S,
                                         uint32_t* stats) {
  float m[kFixedStatsWords] = {0.f, 0.f, 0.f, 0.f};
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  for (int64_t i = first; i < rows * (D / 8); i += stride) m[0] = finite_abs_max8(q + 8 * i, m[0]);
  for (int64_t i = first; i < rows * kVChunks; i += stride) {
    m[1] = finite_abs_max8(out + 8 * i, m[1]);
    m[2] = finite_abs_max8(dout + 8 * i, m[2]);
  }
  for (int64_t i = first; i < S * kVChunks; i += stride)
    m[3] = finite_abs_max8(kv + (i / kVChunks) * D + 8 * (i % kVChunks), m[3]);
#pragma unroll
  for (int k = 0; k < kFixedStatsWords; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m[k] = fmaxf(m[k], __shfl_xor_sync(0xffffffffu, m[k], o));
    if ((threadIdx.x & 31) == 0) atomicMax(stats + k, __float_as_uint(m[k]));
  }
}

// dkv_acc[i] = its non-finite sum if a non-finite value reached it (the buffer starts at 0 and
// receives nothing else), else fixed[i] 2^-s.
__global__ void fixed_point_finish_kernel(const unsigned long long* __restrict__ fixed,
                                          const uint32_t* __restrict__ stats, float sm_scale,
                                          int64_t terms, int64_t n, float* __restrict__ dkv_acc) {
  const float unit = ldexpf(1.f, -fixed_point_exponent(stats, sm_scale, terms));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n; i += stride) {
    if (dkv_acc[i] == 0.f) dkv_acc[i] = __ll2float_rn(static_cast<long long>(fixed[i])) * unit;
  }
}

}  // namespace dsa::sparse_mla
