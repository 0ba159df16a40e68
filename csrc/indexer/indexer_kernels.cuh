// indexer family: torch-free CUDA kernels for the lightning-indexer logits (SPEC section 3)
//   I[row, s] = k_scale[s] * sum_h w[row, h] * relu(q[row, h, :] . k[s, :]),   D = 128, FP8.
//
// One kernel template serves both ops; only where a key's bytes come from differs (a dense
// [S, D] tensor, or the paged DeepGEMM cache through the block table, read in place).
//
// GEMM orientation (as DeepGEMM): M = keys (A operand, K-major rows of 128 FP8 bytes),
// N = query-row x head columns (B operand: q rows are K-major too), K = D = 128 (4 k32 steps).
// A CTA (256 threads) owns a block of kCols = 128 columns (128 / H query rows, all their heads;
// the Q block stays in shared memory) and streams 128-key tiles through a 4-stage cp.async
// pipeline (16-byte copies, zero-fill for positions that must not be read). grid.y splits the
// key axis so that few query rows over a long context still fill the GPU.
//
// Two tensor-core paths fill the same per-thread accumulator pattern (m16n8 tiles: lane holds
// rows lane/4 and lane/4 + 8, columns 2 (lane%4) + {0, 1} of each n8 tile):
// - sm_90a (default): wgmma m64n128k32 e4m3 -> QGMMA. Warpgroup wg does keys [64 wg, +64) x all
//   128 columns from shared-memory descriptors (128B swizzle, K-major); 64 accumulators per
//   thread, ~120 registers, 2 CTAs per SM so one CTA's epilogue overlaps the other's MMAs.
// - otherwise (sm_89, or DSA_INDEXER_MMA=sync): mma.sync m16n8k32 e4m3 with ldmatrix fragments;
//   8 warps = 4 (keys, 32 each) x 2 (columns, 64 each). (On sm_90 ptxas lowers it to F2FP
//   unpacks + HMMA.16816: there is no native FP8 mma.sync there.)
// - images without FP8 MMA (sm_80 / sm_86 cubins or their PTX; DSA_INDEXER_MMA=bf16 anywhere):
//   kBf16Mma. The same FP8 tiles, dequantised to bf16 in shared memory (exact, see
//   indexer_sm80.cuh), then mma.sync m16n8k16 bf16 with fp32 accumulation into the same
//   accumulator pattern. The Q block is converted once, in place (32 KB); each key tile in two
//   64-key halves through one 16 KB bf16 buffer (per half, warp (m, n): 16 keys x 64 columns);
//   2 FP8 stages: 85 KB, within the 99 KB a block may have on sm_86 / sm_89.
// Either way a warp's columns hold all heads of whole query rows, so the head reduction never
// leaves the warp: ReLU, per-head weight, sum over the thread's heads, then shfl_xor over the 4
// lanes of a quad (which hold the remaining heads of the same key row). The key scale is
// applied after the head sum (valid: scales are >= 0) when the tile is written out, together
// with the per-row range mask (-inf cleaning), through a shared-memory staging tile so that
// global stores are coalesced. Shared rows are 128 bytes with 16-byte chunk c of row r at
// c ^ (r & 7) in 1024-byte aligned tiles: conflict-free for ldmatrix and exactly the 128B
// swizzle layout wgmma's descriptors describe.
//
// MXFP4 keys (kMx, SPEC 10.5, csrc/indexer/mxfp4.h): there is no FP4 x FP8 MMA on sm_89/sm_90,
// so a stage holds the raw 64 packed bytes and 4 ue8m0 bytes of each key (half the bytes an
// FP8 key reads); once landed, the CTA widens the codes to e4m3 (every E2M1 value is an e4m3
// value) into one swizzled 128-byte-row tile, and the mma.sync path scores it unchanged except
// that each k32 step is exactly one 32-value scale group: its m16n8 product goes to a 4-float
// temporary that is added into the accumulator times the key row's 2^(e - 127). The group
// scales therefore act before the ReLU, as dequantise-then-score requires; the per-key scale of
// the epilogue is 1 (or -inf for a key that must not be read). The wgmma path keeps its
// 64-float accumulator chain whole, so MXFP4 keys always take mma.sync.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/mma_sm80.cuh"
#include "common/wgmma_sm90.cuh"
#include "indexer/indexer_sm80.cuh"
#include "indexer/indexer_rules.h"
#include "indexer/mxfp4.h"

namespace dsa {
namespace indexer {

constexpr int kHeadDim = 128;                   // D: bytes of one FP8 key/query-head row
constexpr int kChunksPerRow = kHeadDim / 16;    // 16-byte chunks per row
constexpr int kWarpMTiles = 2;                  // m16 key tiles per warp (32 keys)
constexpr int kTileKeys = 4 * 16 * kWarpMTiles; // keys per pipeline stage (M of the CTA): 128
constexpr int kCols = 128;                      // query-row x head columns per CTA (N)
constexpr int kStages = 4;
constexpr int kThreads = 256;
constexpr int kMaxQueriesPerCta = kCols / 32;   // H >= 32

constexpr int kSmemQBytes = kCols * kHeadDim;
constexpr int kSmemKBytes = kTileKeys * kHeadDim;
constexpr int kSmemScaleBytes = kTileKeys * 4;
constexpr int kSmemOutBytes = kMaxQueriesPerCta * kTileKeys * 4;
constexpr int kSmemRangeBytes = 2 * kMaxQueriesPerCta * 8;   // range_lo, range_hi (int64)
constexpr int kSmemWeightBytes = kCols * 4;
// + 1024: the tiles are placed at a 1024-byte aligned address (the 128B-swizzle atom that
// wgmma descriptors assume); the dynamic shared window itself is only 16-byte aligned.
constexpr int kSmemBytes = kSmemQBytes + kStages * (kSmemKBytes + kSmemScaleBytes) + kSmemOutBytes +
                           kSmemRangeBytes + kSmemWeightBytes + 1024;
// MXFP4 keys: a stage's K area holds the packed codes (kTileKeys x 64 bytes) then the ue8m0
// bytes (kTileKeys x 4); the widened e4m3 tile is one more kSmemKBytes after the weights.
constexpr int kMxPackedRow = kHeadDim / 2;
constexpr int kMxExpOffset = kTileKeys * kMxPackedRow;
static_assert(kMxExpOffset + kTileKeys * 4 <= kSmemKBytes, "indexer: MXFP4 stage does not fit");
template <bool kMx>
constexpr int smem_bytes() { return kSmemBytes + (kMx ? kSmemKBytes : 0); }
// Two CTAs per SM on the wgmma path (__launch_bounds__ below): 2 x (dynamic + 1 KB reserved)
// must fit the SM's 228 KB.
static_assert(2 * (kSmemBytes + 1024) <= 228 * 1024, "indexer: two CTAs per SM no longer fit");
// The dequantising path (kBf16Mma): Q block twice as wide, 2 FP8 stages, one bf16 half tile.
constexpr int kBf16Stages = 2;
constexpr int kBf16HalfKeys = kTileKeys / 2;
constexpr int kSmemBf16KBytes = kBf16HalfKeys * kHeadDim * 2;
constexpr int kSmemBytesBf16 = 2 * kSmemQBytes + kBf16Stages * (kSmemKBytes + kSmemScaleBytes) +
                               kSmemOutBytes + kSmemRangeBytes + kSmemWeightBytes + kSmemBf16KBytes + 1024;
static_assert(kSmemBytesBf16 <= 99 * 1024, "indexer: the bf16 path no longer fits an sm_86 block");

// Everything both ops need; the fields of the other op are unused.
struct LogitsParams {
  const uint8_t* q;          // [rows, H, 128] FP8 bytes
  const float* weights;      // [rows, H]
  float* out;                // [rows, num_cols]
  int64_t rows;              // T, or B * N
  int64_t num_cols;          // S, or max_context_len
  int64_t chunk_cols;        // keys per blockIdx.y split (multiple of kTileKeys)
  bool clean_logits;
  // dense keys (indexer_logits)
  const uint8_t* k;          // [S, 128] FP8 bytes
  const float* k_scale;      // [S]
  const uint8_t* k_scale_bytes;   // MXFP4 keys: [S, 4] ue8m0 bytes (k is then [S, 64] packed)
  const int32_t* ks;         // [T]
  const int32_t* ke;         // [T]
  // paged keys (paged_indexer_logits)
  const uint8_t* cache;      // [num_blocks, block_size, 1, 132] bytes
  const int32_t* block_table;
  int64_t block_table_stride, max_blocks, num_blocks, block_size;
  int32_t block_shift;       // log2(block_size) when a power of two, else -1
  const int32_t* context_lens;
  bool per_query_lens;
  int64_t n_per_seq;         // N
  int64_t qblocks_per_seq;   // ceil(N / queries per CTA)
};

// The PTX primitives (cp.async, ldmatrix, mma.sync e4m3, wgmma e4m3 with its 128B-swizzle
// descriptor sw128_kmajor_desc) are csrc/common/mma_sm80.cuh and wgmma_sm90.cuh. The XOR
// swizzle of `swizzled()` below is exactly the 128B-swizzle layout, so the cp.async fills
// serve both the ldmatrix and the wgmma paths.

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DSA_INDEXER_HAS_WGMMA 1
#else
#define DSA_INDEXER_HAS_WGMMA 0   // the kernel then takes the mma.sync path
#endif

// Byte offset of 16-byte chunk `chunk` of 128-byte row `row` in a swizzled shared tile.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return static_cast<uint32_t>(row * kHeadDim + ((chunk ^ (row & 7)) << 4));
}

// ---- where a key's bytes live --------------------------------------------------------------

// Sets the addresses of key `pos`'s 128 FP8 bytes and fp32 scale (MXFP4: its 64 packed bytes
// and 4 scale bytes); false when the position must not be read (paged: block-table entry
// missing or out of range).
template <bool kPaged, bool kMx = false>
__device__ __forceinline__ bool locate_key(const LogitsParams& p, const int32_t* bt_row, int64_t pos,
                                           const uint8_t*& row, const void*& scale) {
  if constexpr (kPaged) {
    // pos < max_context_len < 2^31 (the launcher checks): 32-bit arithmetic, and a shift and
    // mask for power-of-two blocks — a 64-bit divide per key is ~70 instructions on the
    // load-bound decode path.
    const uint32_t upos = static_cast<uint32_t>(pos), bs = static_cast<uint32_t>(p.block_size);
    const uint32_t lblk = p.block_shift >= 0 ? upos >> p.block_shift : upos / bs;
    const int64_t blk = physical_block(bt_row, lblk, p.max_blocks, p.num_blocks);
    if (blk < 0) return false;
    const int64_t off = upos - lblk * bs;
    if constexpr (kMx) {
      row = p.cache + mxfp4::value_offset(blk, off, p.block_size, kHeadDim);
      scale = p.cache + mxfp4::scale_offset(blk, off, p.block_size, kHeadDim);
    } else {
      row = p.cache + k_value_offset(blk, off, p.block_size, kHeadDim);
      scale = p.cache + k_scale_offset(blk, off, p.block_size, kHeadDim);
    }
    return true;
  } else if constexpr (kMx) {
    row = p.k + pos * kMxPackedRow;
    scale = p.k_scale_bytes + pos * (kHeadDim / mxfp4::kGroup);
    return true;
  } else {
    row = p.k + pos * kHeadDim;
    scale = p.k_scale + pos;
    return true;
  }
}

// e4m3 byte of an E2M1 code: magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6} are e4m3 bytes
// {00, 30, 38, 3C, 40, 44, 48, 4C}; the sign moves from bit 3 to bit 7.
__device__ __forceinline__ uint32_t e2m1_to_e4m3(uint32_t code) {
  constexpr unsigned long long kLut = 0x4C4844403C383000ull;
  return static_cast<uint32_t>((kLut >> (8u * (code & 7u))) & 0xffu) | ((code & 8u) << 4);
}

// Widens a landed MXFP4 stage (kTileKeys rows of 64 packed bytes) into the e4m3 tile `dst`
// (128-byte rows, swizzled as the FP8 stages). Each thread: 2 packed 16-byte chunks.
__device__ __forceinline__ void widen_mxfp4_tile(const uint8_t* raw, uint8_t* dst, int tid) {
#pragma unroll
  for (int i = 0; i < kTileKeys * (kMxPackedRow / 16) / kThreads; ++i) {
    const int idx = tid + i * kThreads, key = idx / (kMxPackedRow / 16), c = idx % (kMxPackedRow / 16);
    const uint4 in = *reinterpret_cast<const uint4*>(raw + key * kMxPackedRow + c * 16);
    const uint32_t w[4] = {in.x, in.y, in.z, in.w};
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {   // out word j: codes 4j .. 4j + 3 (nibbles of a half word)
      const uint32_t h = (w[j >> 1] >> (16 * (j & 1))) & 0xffffu;
      out[j] = e2m1_to_e4m3(h & 15u) | (e2m1_to_e4m3((h >> 4) & 15u) << 8) |
               (e2m1_to_e4m3((h >> 8) & 15u) << 16) | (e2m1_to_e4m3(h >> 12) << 24);
    }
    // packed chunk c (32 values) = e4m3 chunks 2c, 2c + 1 of the row
    *reinterpret_cast<uint4*>(dst + swizzled(key, 2 * c)) = make_uint4(out[0], out[1], out[2], out[3]);
    *reinterpret_cast<uint4*>(dst + swizzled(key, 2 * c + 1)) = make_uint4(out[4], out[5], out[6], out[7]);
  }
}

// ---- per-tile pieces -----------------------------------------------------------------------

// mma.sync path: warp (warp_m, warp_n) computes keys [32 warp_m, +32) x columns [64 warp_n, +64)
// of the tile into acc (m16n8 accumulator layout).
// kMx: exps[key] holds the key's 4 ue8m0 bytes; k-step kk (= scale group kk) is accumulated
// through a temporary times 2^(byte kk - 127) of the accumulator row's key.
template <bool kMx = false>
__device__ __forceinline__ void tile_mma_sync(float (&acc)[kWarpMTiles][8][4], uint32_t k_base,
                                              uint32_t q_base, int warp_m, int warp_n, int lane,
                                              const uint32_t* exps = nullptr) {
#pragma unroll
  for (int i = 0; i < kWarpMTiles; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // Not unrolled: on sm_90 ptxas unpacks every e4m3 fragment to f16 for HMMA, and unrolling
  // the 4 k-steps keeps several steps' unpacked fragments live (255 registers, spills).
#pragma unroll 1
  for (int kk = 0; kk < kHeadDim / 32; ++kk) {
    uint32_t a[kWarpMTiles][4];
#pragma unroll
    for (int i = 0; i < kWarpMTiles; ++i)
      ldmatrix_x4(a[i], k_base + swizzled(warp_m * 16 * kWarpMTiles + i * 16 + (lane & 15),
                                          2 * kk + (lane >> 4)));
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      uint32_t b[4];
      ldmatrix_x4(b, q_base + swizzled(warp_n * 64 + jp * 16 + (lane & 7) + ((lane >> 4) << 3),
                                       2 * kk + ((lane >> 3) & 1)));
#pragma unroll
      for (int i = 0; i < kWarpMTiles; ++i) {
        if constexpr (kMx) {
          const int r0 = warp_m * 16 * kWarpMTiles + i * 16 + (lane >> 2);
          const float s0 = mxfp4::scale_value((exps[r0] >> (8 * kk)) & 0xffu);
          const float s1 = mxfp4::scale_value((exps[r0 + 8] >> (8 * kk)) & 0xffu);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float t[4] = {0.f, 0.f, 0.f, 0.f};
            mma_e4m3_16832(t, a[i], b[2 * h], b[2 * h + 1]);
            float* c = acc[i][2 * jp + h];
            c[0] = fmaf(t[0], s0, c[0]);
            c[1] = fmaf(t[1], s0, c[1]);
            c[2] = fmaf(t[2], s1, c[2]);
            c[3] = fmaf(t[3], s1, c[3]);
          }
        } else {
          mma_e4m3_16832(acc[i][2 * jp], a[i], b[0], b[1]);
          mma_e4m3_16832(acc[i][2 * jp + 1], a[i], b[2], b[3]);
        }
      }
    }
  }
}

// Epilogue part 1, shared by both MMA paths. acc[kMT][kNT][4] covers keys
// [key_base, +16 kMT) x columns [col_base, +8 kNT) in the m16n8 accumulator layout (thread
// lane: rows lane/4 and lane/4 + 8 of each m16 tile, columns 2 (lane%4) + {0, 1} of each n8
// tile). Per key and query: sum over its heads of w * relu(acc); the quad's 4 lanes hold the
// remaining heads, combined with two xor-shuffles. Result -> sums[query][key].
template <int kHeads, int kMT, int kNT>
__device__ __forceinline__ void reduce_heads(const float (&acc)[kMT][kNT][4], const float* w_smem,
                                             float* sums, int key_base, int col_base, int lane,
                                             int64_t num_queries) {
  constexpr int kNTilesPerQuery = kHeads / 8;
  constexpr int kQueries = kNT / kNTilesPerQuery;
  const float* w_thread = w_smem + col_base + 2 * (lane & 3);
#pragma unroll
  for (int i = 0; i < kMT; ++i) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int qw = 0; qw < kQueries; ++qw) {
        if (col_base / kHeads + qw >= num_queries) continue;   // padding columns (warp-uniform)
        float v = 0.f;
#pragma unroll
        for (int j = qw * kNTilesPerQuery; j < (qw + 1) * kNTilesPerQuery; ++j) {
          v = fmaf(w_thread[j * 8], fmaxf(acc[i][j][2 * half], 0.f), v);
          v = fmaf(w_thread[j * 8 + 1], fmaxf(acc[i][j][2 * half + 1], 0.f), v);
        }
        v += __shfl_xor_sync(0xffffffffu, v, 1);
        v += __shfl_xor_sync(0xffffffffu, v, 2);
        if ((lane & 3) == 0)
          sums[(col_base / kHeads + qw) * kTileKeys + key_base + i * 16 + half * 8 + (lane >> 2)] = v;
      }
    }
  }
}

// ---- the kernel ----------------------------------------------------------------------------

// kAllowWgmma: use wgmma where this is an sm_90a compile (else, and when false, mma.sync).
// kMx: MXFP4 keys (always mma.sync; see the file comment).
// kBf16Mma: the dequantising bf16 path (images without FP8 MMA; see the file comment).
template <int kHeads, bool kPaged, bool kAllowWgmma, bool kMx = false, bool kBf16Mma = false>
__global__ void __launch_bounds__(kThreads, (kAllowWgmma && DSA_INDEXER_HAS_WGMMA && !kMx) ? 2 : 1) indexer_logits_kernel(const LogitsParams p) {
  static_assert(kHeads == 32 || kHeads == 64, "CUDA indexer serves H in {32, 64}");
  constexpr int kQueriesPerCta = kCols / kHeads;
  constexpr bool kWgmmaPath = kAllowWgmma && DSA_INDEXER_HAS_WGMMA && !kMx;
  static_assert(!kBf16Mma || (!kAllowWgmma && !kMx), "the bf16 path is its own mma.sync path, FP8 keys only");
  // The pipeline depth of this path (shadows the FP8 MMA paths' namespace constant).
  constexpr int kStages = kBf16Mma ? kBf16Stages : indexer::kStages;

  DSA_DYNAMIC_SMEM(smem_raw, 16);
  uint8_t* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  uint8_t* q_smem = smem;
  uint8_t* k_smem = smem + kSmemQBytes * (kBf16Mma ? 2 : 1);   // bf16 Q rows are 256 bytes
  float* scale_smem = reinterpret_cast<float*>(k_smem + kStages * kSmemKBytes);
  float* out_smem = scale_smem + kStages * kTileKeys;   // [kQueriesPerCta][kTileKeys] head sums
  int64_t* range_lo = reinterpret_cast<int64_t*>(out_smem + kMaxQueriesPerCta * kTileKeys);
  int64_t* range_hi = range_lo + kMaxQueriesPerCta;
  float* w_smem = reinterpret_cast<float*>(range_hi + kMaxQueriesPerCta);   // [kCols]
  uint8_t* wide_smem = reinterpret_cast<uint8_t*>(w_smem + kCols);          // kMx: e4m3 tile

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 3, warp_n = warp >> 2;

  // Which query rows this CTA owns.
  int64_t row0, nq, seq = 0;
  if constexpr (kPaged) {
    seq = blockIdx.x / p.qblocks_per_seq;
    const int64_t j0 = (blockIdx.x % p.qblocks_per_seq) * kQueriesPerCta;
    row0 = seq * p.n_per_seq + j0;
    nq = min(static_cast<int64_t>(kQueriesPerCta), p.n_per_seq - j0);
  } else {
    row0 = static_cast<int64_t>(blockIdx.x) * kQueriesPerCta;
    nq = min(static_cast<int64_t>(kQueriesPerCta), p.rows - row0);
  }
  const int32_t* bt_row = kPaged ? p.block_table + seq * p.block_table_stride : nullptr;

  if (tid < kMaxQueriesPerCta) {
    int64_t lo = 0, hi = 0;
    if (tid < nq) {
      if constexpr (kPaged) {
        hi = visible_length(p.context_lens, p.per_query_lens, seq, row0 - seq * p.n_per_seq + tid,
                            p.n_per_seq, p.num_cols);
      } else {
        const KeyRange r = clamped_key_range(p.ks[row0 + tid], p.ke[row0 + tid], p.num_cols);
        lo = r.lo;
        hi = r.hi;
      }
    }
    range_lo[tid] = lo;
    range_hi[tid] = hi;
  }
  __syncthreads();

  // The union of the rows' ranges, cut to this CTA's key chunk.
  const int64_t chunk_lo = static_cast<int64_t>(blockIdx.y) * p.chunk_cols;
  const int64_t chunk_hi = min(p.num_cols, chunk_lo + p.chunk_cols);
  int64_t union_lo = p.num_cols, union_hi = 0;
  for (int q = 0; q < nq; ++q) {
    if (range_lo[q] < range_hi[q]) {
      union_lo = min(union_lo, range_lo[q]);
      union_hi = max(union_hi, range_hi[q]);
    }
  }
  const int64_t tiles_lo = max(union_lo, chunk_lo), tiles_hi = min(union_hi, chunk_hi);
  const bool any_tiles = tiles_lo < tiles_hi;

  // Columns of the chunk no tile covers: -inf when cleaning (else left unwritten).
  if (p.clean_logits) {
    const float neg_inf = -__int_as_float(0x7f800000);
    for (int q = 0; q < nq; ++q) {
      float* out_row = p.out + (row0 + q) * p.num_cols;
      const int64_t a = any_tiles ? tiles_lo : chunk_hi;
      for (int64_t c = chunk_lo + tid; c < a; c += kThreads) out_row[c] = neg_inf;
      if (any_tiles)
        for (int64_t c = tiles_hi + tid; c < chunk_hi; c += kThreads) out_row[c] = neg_inf;
    }
  }
  if (!any_tiles) return;
  const int64_t num_tiles = (tiles_hi - tiles_lo + kTileKeys - 1) / kTileKeys;

  // Q block: kCols rows of 128 bytes (column = query * H + head), zero past the last query.
  {
    const uint8_t* q_src = p.q + row0 * kHeads * kHeadDim;
#pragma unroll
    for (int i = 0; i < kCols * kChunksPerRow / kThreads; ++i) {
      const int idx = tid + i * kThreads, col = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
      const bool ok = col < nq * kHeads;
      cp_async_16(smem_u32(q_smem + swizzled(col, chunk)),
                  ok ? q_src + col * kHeadDim + chunk * 16 : p.q, ok ? 16u : 0u);
    }
  }

  auto load_tile = [&](int64_t tile, int stage) {
    const int64_t base = tiles_lo + tile * kTileKeys;
    uint8_t* k_dst = k_smem + stage * kSmemKBytes;
    float* s_dst = scale_smem + stage * kTileKeys;
    if constexpr (kMx) {
      // 4 packed chunks + the 4 scale bytes of each key; the per-key scale is 1 or the -inf mark.
      constexpr int kRawChunks = kMxPackedRow / 16;
      const int chunk = tid % kRawChunks;
#pragma unroll
      for (int i = 0; i < kTileKeys * kRawChunks / kThreads; ++i) {
        const int key = tid / kRawChunks + i * (kThreads / kRawChunks);
        const int64_t pos = base + key;
        const uint8_t* row = nullptr;
        const void* scale = nullptr;
        const bool readable = pos < tiles_hi && locate_key<kPaged, true>(p, bt_row, pos, row, scale);
        cp_async_16(smem_u32(k_dst + key * kMxPackedRow + chunk * 16), readable ? row + chunk * 16 : p.q,
                    readable ? 16u : 0u);
        if (chunk == 0) {
          uint32_t* e_dst = reinterpret_cast<uint32_t*>(k_dst + kMxExpOffset) + key;
          if (readable) cp_async_4(smem_u32(e_dst), scale, 4u);
          else *e_dst = 0x7f7f7f7fu;   // 2^0: the zero-filled codes score 0, then -inf below
          s_dst[key] = readable ? 1.0f : -__int_as_float(0x7f800000);
        }
      }
      return;
    }
    const int chunk = tid % kChunksPerRow;
#pragma unroll
    for (int i = 0; i < kTileKeys * kChunksPerRow / kThreads; ++i) {
      const int key = tid / kChunksPerRow + i * (kThreads / kChunksPerRow);
      const int64_t pos = base + key;
      const uint8_t* row = nullptr;
      const void* scale = nullptr;
      const bool in_tile = pos < tiles_hi;
      const bool readable = in_tile && locate_key<kPaged>(p, bt_row, pos, row, scale);
      cp_async_16(smem_u32(k_dst + swizzled(key, chunk)), readable ? row + chunk * 16 : p.q,
                  readable ? 16u : 0u);
      if (chunk == 0) {
        if (readable) {
          cp_async_4(smem_u32(s_dst + key), scale, 4u);
        } else {
          s_dst[key] = -__int_as_float(0x7f800000);   // marks "never read": logit -inf
        }
      }
    }
  };

  // Weights of the CTA's columns, zero for missing queries (read from shared memory in the
  // epilogue: holding them in registers would push the 128 accumulators into spills).
  if (tid < kCols) {
    const int q = tid / kHeads, h = tid % kHeads;
    w_smem[tid] = q < nq ? p.weights[(row0 + q) * kHeads + h] : 0.f;
  }

  // kBf16Mma: the Q block is a group of its own, converted to bf16 (in place) as soon as it
  // has landed, while the first key tile is still in flight.
  if constexpr (kBf16Mma) cp_async_commit();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    cp_async_commit();   // group 0 also carries the Q block
  }
  if constexpr (kBf16Mma) {
    cp_async_wait<kStages - 1>();
    __syncthreads();
    dequant_rows_e4m3_to_bf16_in_place<kCols, kThreads>(q_smem, tid);   // a barrier inside;
    // the loop's first barrier orders the stores before the MMAs read them.
  }

  const uint32_t q_base = smem_u32(q_smem);
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<kStages - 2>();
    if constexpr (kWgmmaPath) fence_proxy_async_smem();
    __syncthreads();   // tile's bytes visible to all; everyone is done with tile - 1's stage
    {
      const int64_t next = tile + kStages - 1;
      if (next < num_tiles) load_tile(next, static_cast<int>(next % kStages));
      cp_async_commit();
    }
    const int stage = static_cast<int>(tile % kStages);
    uint32_t k_base = smem_u32(k_smem + stage * kSmemKBytes);
    if constexpr (kMx) {
      // Everyone finished the previous tile's MMAs (the barrier before its epilogue), so the
      // single widened tile may be overwritten.
      widen_mxfp4_tile(k_smem + stage * kSmemKBytes, wide_smem, tid);
      __syncthreads();
      k_base = smem_u32(wide_smem);
    }

    if constexpr (kWgmmaPath) {
      // Warpgroup wg: keys [64 wg, +64) x all 128 columns, m64n128k32 x 4 k-steps, chained
      // into fp32 (the first with scale-d = 0, so the accumulators need no zeroing).
      float acc[16][4];
      const uint32_t a_base = k_base + (warp >> 2) * 64 * kHeadDim;
      fence_operands(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 32; ++kk)
        wgmma_m64n128k32_e4m3(acc, sw128_kmajor_desc(a_base + 32 * kk),
                              sw128_kmajor_desc(q_base + 32 * kk), kk > 0 ? 1 : 0);
      wgmma_commit();
      wgmma_wait_all();
      fence_operands(acc);
      // wgmma's accumulator rows: warp w of the CTA holds keys [16 w, +16); same per-thread
      // pattern as one m16 tile of mma.sync over 16 n8 tiles.
      reduce_heads<kHeads, 1, 16>(reinterpret_cast<const float(&)[1][16][4]>(acc), w_smem,
                                  out_smem, warp * 16, 0, lane, nq);
    } else if constexpr (kBf16Mma) {
      // Two 64-key halves of the FP8 stage through the bf16 buffer (wide_smem): per half, warp
      // (warp_m, warp_n) takes keys [16 warp_m, +16) x columns [64 warp_n, +64).
      const uint8_t* k_fp8 = k_smem + stage * kSmemKBytes;
#pragma unroll 1
      for (int half = 0; half < kTileKeys / kBf16HalfKeys; ++half) {
        if (half > 0) __syncthreads();   // everyone is done reading the previous half
        dequant_rows_e4m3_to_bf16<kBf16HalfKeys, kThreads>(k_fp8, half * kBf16HalfKeys, wide_smem, tid);
        __syncthreads();
        float acc[1][8][4];
        tile_mma_bf16(acc[0], smem_u32(wide_smem), q_base, warp_m * 16, warp_n * 64, lane);
        reduce_heads<kHeads, 1, 8>(acc, w_smem, out_smem, half * kBf16HalfKeys + warp_m * 16, warp_n * 64,
                                   lane, nq);
      }
    } else {
      float acc[kWarpMTiles][8][4];
      tile_mma_sync<kMx>(acc, k_base, q_base, warp_m, warp_n, lane,
                         reinterpret_cast<const uint32_t*>(k_smem + stage * kSmemKBytes + kMxExpOffset));
      reduce_heads<kHeads, kWarpMTiles, 8>(acc, w_smem, out_smem, warp_m * 16 * kWarpMTiles,
                                           warp_n * 64, lane, nq);
    }
    __syncthreads();

    // Epilogue part 2: scale, range mask, coalesced stores (64-bit offsets).
    const int64_t base = tiles_lo + tile * kTileKeys;
    const float* scales = scale_smem + stage * kTileKeys;
    const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < kQueriesPerCta * kTileKeys / kThreads; ++i) {
      const int idx = tid + i * kThreads, q = idx / kTileKeys, key = idx % kTileKeys;
      const int64_t pos = base + key;
      if (q >= nq || pos >= tiles_hi) continue;
      float* dst = p.out + (row0 + q) * p.num_cols + pos;
      if (pos >= range_lo[q] && pos < range_hi[q]) {
        const float sc = scales[key];
        *dst = sc == neg_inf ? neg_inf : out_smem[q * kTileKeys + key] * sc;
      } else if (p.clean_logits) {
        *dst = neg_inf;
      }
    }
  }
  cp_async_wait<0>();
}

}  // namespace indexer
}  // namespace dsa
