// Sparse attention of one query token's heads over its gathered latent rows, on the CPU: the
// shared core of sparse_mla_fwd / sparse_mla_bwd and sparse_mla_decode.
//
// The selected rows are gathered once per token, in blocks of kKeyBlock keys, row-major (the A
// operand of Sᵀ = K·Qᵀ, so the heads' Qᵀ is the only small matrix transposed) and in the VNNI
// layout (cpu_gemm.h) of P·V and dS·K. A last partial block is padded with zero keys so that
// every GEMM has one of a few fixed shapes (brgemm JIT-compiles one kernel per shape). The softmax
// is exact over the valid keys, in fp32; P is rounded to bf16 for P·V (as a bf16 attention does).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_gemm.h"

namespace dsa::cpu {

constexpr int64_t kKeyBlock = 64;

// log of the softmax denominator: lse, or log(exp(lse) + exp(sink)) with a sink.
template <typename acc_t>
inline acc_t denominator_log(acc_t lse, const float* sink, int64_t h) {
  if (!sink) return lse;
  const acc_t s = static_cast<acc_t>(sink[h]);
  const acc_t m = std::max(lse, s);
  // -inf (empty row, no sink) stays -inf; a +inf sink makes the denominator infinite, so every
  // p is 0 and the head's output is 0 (FlashMLA's rule), where exp(s - m) would be NaN.
  if (std::isinf(m)) return m;
  return m + std::log(std::exp(lse - m) + std::exp(s - m));
}

// In place exp over n contiguous values through ATen's vectorised kernel (this file is built
// without ISA flags; ATen dispatches on the running CPU). Single-threaded inside parallel_for.
template <typename acc_t>
inline void exp_inplace(acc_t* x, int64_t n) {
  if (n <= 0) return;
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor t = at::from_blob(x, {n}, opts);
  t.exp_();
}

// Row-wise softmax of scores s [H, n] (row stride lds) scaled by `scale`: on return s holds
// p = exp(scale * s - denominator_log) and lse[h] the natural-log lse of the scaled scores
// (-inf for n == 0). With a sink the denominator has exp(sink[h]) too (lse excludes it).
template <typename acc_t>
inline void softmax_rows(acc_t* s, int64_t H, int64_t n, int64_t lds, acc_t scale, const float* sink,
                         float* lse) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> mx(H);
  for (int64_t h = 0; h < H; ++h) {
    acc_t* row = s + h * lds;
    acc_t m = kNegInf;
    for (int64_t i = 0; i < n; ++i) {
      row[i] *= scale;
      // NaN-propagating max: a NaN score makes the row's out and lse NaN (the reference's
      // answer), never an "empty" row (std::max would drop it).
      m = (row[i] > m || row[i] != row[i]) ? row[i] : m;
    }
    mx[h] = m;
    if (m != kNegInf)
      for (int64_t i = 0; i < n; ++i) row[i] -= m;
  }
  if (lds == n) {
    exp_inplace(s, H * n);
  } else {
    for (int64_t h = 0; h < H; ++h) exp_inplace(s + h * lds, n);
  }
  for (int64_t h = 0; h < H; ++h) {
    acc_t* row = s + h * lds;
    // Padding columns (zero key rows) scored q·0, which is NaN when q holds inf/NaN: P there
    // must be exactly 0, or P·V spreads NaN over the whole head.
    std::fill(row + n, row + lds, acc_t(0));
    if (n == 0 || mx[h] == kNegInf) {
      std::fill(row, row + n, acc_t(0));
      lse[h] = -std::numeric_limits<float>::infinity();
      continue;
    }
    acc_t sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += row[i];
    const acc_t row_lse = mx[h] + std::log(sum);
    const acc_t factor = std::exp(mx[h] - denominator_log(row_lse, sink, h));
    for (int64_t i = 0; i < n; ++i) row[i] *= factor;
    lse[h] = static_cast<float>(row_lse);
  }
}

// One token's gathered rows, padded with zero rows to whole blocks of kKeyBlock keys: `dense`
// [n_pad, D] row-major (the A operand of Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ) and `vnni` (block j:
// [kKeyBlock/2][D][2], the B operand of P·V and dS·K).
struct PackedRows {
  int64_t D = 0, n = 0, blocks = 0;
  std::vector<c10::BFloat16> dense, vnni;

  int64_t n_pad() const { return blocks * kKeyBlock; }
  const c10::BFloat16* dense_block(int64_t j) const { return dense.data() + j * D * kKeyBlock; }
  const c10::BFloat16* vnni_block(int64_t j) const { return vnni.data() + j * D * kKeyBlock; }

  // row(i) -> const c10::BFloat16* of D values, for i < count.
  template <typename RowFn>
  void pack(int64_t D_, int64_t count, RowFn&& row) {
    pack_written(D_, count, [&](int64_t i, c10::BFloat16* dst) {
      std::memcpy(dst, row(i), static_cast<size_t>(D_) * sizeof(c10::BFloat16));
    });
  }

  // write_row(i, dst) writes row i's D values to dst, for i < count.
  template <typename WriteFn>
  void pack_written(int64_t D_, int64_t count, WriteFn&& write_row) {
    D = D_;
    n = count;
    blocks = (count + kKeyBlock - 1) / kKeyBlock;
    const size_t elems = static_cast<size_t>(blocks * D * kKeyBlock);
    dense.resize(elems);
    vnni.resize(elems);
    for (int64_t i = 0; i < count; ++i) write_row(i, dense.data() + i * D);
    std::fill(dense.begin() + count * D, dense.end(), c10::BFloat16());
    for (int64_t i = 0; i < n_pad(); i += 2)
      vnni_store_row_pair(dense.data() + i * D, dense.data() + (i + 1) * D, D,
                          vnni.data() + (i / kKeyBlock) * D * kKeyBlock, D, (i % kKeyBlock) / 2);
  }
};

// Per-thread buffers of the token kernels.
struct AttendScratch {
  std::vector<float> scores, scores_t, out;
  std::vector<c10::BFloat16> p, lhs_t;
};

// X [H, n_pad] (row stride n_pad) = (M [H, K] (bf16, ldm) · rowsᵀ) over the packed rows, K = the
// first K dims of each row (K even): one GEMM per block computes Xᵀ with the rows as the A
// operand, then a transpose.
inline void rows_times_lhs_t(const c10::BFloat16* M, int64_t H, int64_t K, int64_t ldm,
                             const PackedRows& kv, AttendScratch& ws, float* X) {
  const int64_t np = kv.n_pad();
  ws.lhs_t.resize(K * H);
  vnni_store_transposed(M, H, K, ldm, ws.lhs_t.data());
  ws.scores_t.resize(np * H);
  for (int64_t j = 0; j < kv.blocks; ++j)
    bf16_gemm(kKeyBlock, H, K, kv.dense_block(j), kv.D, ws.lhs_t.data(), H,
              ws.scores_t.data() + j * kKeyBlock * H, H, /*add=*/false);
  for (int64_t i = 0; i < np; ++i)
    for (int64_t h = 0; h < H; ++h) X[h * np + i] = ws.scores_t[i * H + h];
}

// bf16 of an fp32 value, round to nearest even, as integer arithmetic the compiler vectorises
// (NaN stays NaN: its quiet bit survives the carry).
inline uint16_t bf16_bits_rne(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Heads [H, D] of one token (bf16 q, row stride ldq, D even) over the packed rows: out [H, d_v]
// in fp32 (row stride d_v) and lse [H]. Empty (n == 0): out 0, lse -inf.
//
// The scores are computed transposed, Sᵀ [n_pad, H] (keys as the GEMM's M side), and the
// softmax runs down its columns, so every pass is contiguous over the heads; P is written
// block-major ([block][H][kKeyBlock] bf16) and P·V accumulates in a row-padded buffer: rows
// 2^k bytes apart would share L1 sets.
inline void attend_bf16(const c10::BFloat16* q, int64_t H, int64_t ldq, const PackedRows& kv,
                        int64_t d_v, float scale, const float* sink, AttendScratch& ws, float* out,
                        float* lse) {
  const int64_t D = kv.D, n = kv.n, np = kv.n_pad();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (n == 0) {
    std::fill(out, out + H * d_v, 0.f);
    std::fill(lse, lse + H, kNegInf);
    return;
  }
  ws.lhs_t.resize(D * H);
  vnni_store_transposed(q, H, D, ldq, ws.lhs_t.data());
  ws.scores_t.resize(np * H);
  float* st = ws.scores_t.data();
  for (int64_t j = 0; j < kv.blocks; ++j)
    bf16_gemm(kKeyBlock, H, D, kv.dense_block(j), D, ws.lhs_t.data(), H, st + j * kKeyBlock * H, H,
              /*add=*/false);
  // column softmax over the n valid keys: max, exp(x - max), sum, per-head normaliser
  ws.scores.resize(3 * H);
  float* mx = ws.scores.data();
  float* sum = mx + H;
  float* factor = sum + H;
  std::fill(mx, mx + H, kNegInf);
  for (int64_t i = 0; i < n; ++i) {
    float* r = st + i * H;
    for (int64_t h = 0; h < H; ++h) {
      r[h] *= scale;
      mx[h] = (r[h] > mx[h] || r[h] != r[h]) ? r[h] : mx[h];   // a NaN score makes the row NaN
    }
  }
  for (int64_t h = 0; h < H; ++h) factor[h] = mx[h] == kNegInf ? 0.f : mx[h];   // the shift
  for (int64_t i = 0; i < n; ++i) {
    float* r = st + i * H;
    for (int64_t h = 0; h < H; ++h) r[h] -= factor[h];
  }
  exp_inplace(st, n * H);
  std::fill(sum, sum + H, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const float* r = st + i * H;
    for (int64_t h = 0; h < H; ++h) sum[h] += r[h];
  }
  for (int64_t h = 0; h < H; ++h) {
    if (mx[h] == kNegInf) {
      factor[h] = 0.f;
      lse[h] = kNegInf;
      continue;
    }
    const float row_lse = mx[h] + std::log(sum[h]);
    factor[h] = std::exp(mx[h] - denominator_log(row_lse, sink, h));
    lse[h] = row_lse;
  }
  ws.p.resize(H * np);
  uint16_t* p = reinterpret_cast<uint16_t*>(ws.p.data());
  for (int64_t j = 0; j < kv.blocks; ++j) {
    uint16_t* pb = p + j * H * kKeyBlock;
    const int64_t valid = std::min(kKeyBlock, n - j * kKeyBlock);
    for (int64_t ii = 0; ii < valid; ++ii) {
      const float* r = st + (j * kKeyBlock + ii) * H;
      for (int64_t h = 0; h < H; ++h) pb[h * kKeyBlock + ii] = bf16_bits_rne(r[h] * factor[h]);
    }
    for (int64_t h = 0; h < H; ++h)
      for (int64_t ii = valid; ii < kKeyBlock; ++ii) pb[h * kKeyBlock + ii] = 0;
  }
  const int64_t ldo = d_v + 16;
  ws.out.resize(H * ldo);
  for (int64_t j = 0; j < kv.blocks; ++j)
    bf16_gemm(H, d_v, kKeyBlock, ws.p.data() + j * H * kKeyBlock, kKeyBlock, kv.vnni_block(j), D,
              ws.out.data(), ldo, /*add=*/j > 0);
  for (int64_t h = 0; h < H; ++h) std::memcpy(out + h * d_v, ws.out.data() + h * ldo, d_v * sizeof(float));
}

}  // namespace dsa::cpu
