// training family: CPU kernels (SPEC section 7).
//
// Inputs are widened once to the accumulation type (float for bf16/fp32, double for fp64). The
// indexer logits, their backward and the dense loss run on GEMM tiles (see "GEMM tiles" below);
// the sparse loss and the attention target are loops over independent outputs. Either way every
// output element is summed by one task in one fixed order that does not depend on the thread
// count, so the results are bitwise identical run to run and for any thread count;
// `deterministic` has nothing to switch on the CPU. The dk passes recompute the scores they need
// instead of sharing partial sums across rows: memory stays O(T*H + tiles) for the dense loss
// (never [T, S] or [T, S, H]) and O(T*K) for the sparse one.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "indexer/indexer_rules.h"
#include "training/training_checks.h"

namespace dsa {
namespace {

using indexer::clamped_key_range;
using indexer::KeyRange;

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// a . b with 8 independent partial sums: a fixed order the compiler vectorises.
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += a[i + l] * b[i + l];
  acc_t s = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc_t>
inline void axpy(acc_t* y, acc_t a, const acc_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// The indexer at one (query, key) pair: fills dots[h] = q[h] . k and returns
// sum_h w[h] * relu(dots[h]).
template <typename acc_t>
inline acc_t indexer_logit(const acc_t* q, const acc_t* w, const acc_t* k, int64_t H, int64_t D,
                           acc_t* dots) {
  acc_t logit = 0;
  for (int64_t h = 0; h < H; ++h) {
    dots[h] = dot(q + h * D, k, D);
    logit += w[h] * (dots[h] > 0 ? dots[h] : acc_t(0));
  }
  return logit;
}

// dq[h] += g w[h] 1[dots[h] > 0] k and dw[h] += g relu(dots[h]) for one key.
template <typename acc_t>
inline void accumulate_row_grads(acc_t g, const acc_t* w, const acc_t* dots, const acc_t* k,
                                 int64_t H, int64_t D, acc_t* dq, acc_t* dw) {
  for (int64_t h = 0; h < H; ++h) {
    if (!(dots[h] > 0)) continue;
    dw[h] += g * dots[h];
    axpy(dq + h * D, g * w[h], k, D);
  }
}

// dk += sum_h g w[h] 1[q[h] . k > 0] q[h] for one query (scores recomputed).
template <typename acc_t>
inline void accumulate_key_grad(acc_t g, const acc_t* q, const acc_t* w, const acc_t* k,
                                int64_t H, int64_t D, acc_t* dk) {
  for (int64_t h = 0; h < H; ++h)
    if (dot(q + h * D, k, D) > 0) axpy(dk, g * w[h], q + h * D, D);
}

// The inputs widened to the accumulation type (no copy when they already are).
struct Widened {
  at::Tensor q, k, w;
};
Widened widen_qkw(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w) {
  const auto acc = training_acc_dtype(q);
  return {q.to(acc).contiguous(), k.to(acc).contiguous(), w.to(acc).contiguous()};
}

std::vector<KeyRange> row_ranges(const at::Tensor& ks, const at::Tensor& ke, int64_t S) {
  const int32_t* lo = ks.data_ptr<int32_t>();
  const int32_t* hi = ke.data_ptr<int32_t>();
  std::vector<KeyRange> r(static_cast<size_t>(ks.numel()));
  for (size_t t = 0; t < r.size(); ++t) r[t] = clamped_key_range(lo[t], hi[t], S);
  return r;
}

// Entry j of row t is valid when j < topk_length[t] (clamped to [0, K]) and 0 <= idx < S: the
// rule of sparse_mla_fwd. Returns the row's index of key j or -1.
struct Selection {
  const int32_t* idx;
  const int32_t* topk_length;  // nullptr: every row has K entries
  int64_t K, S;
  int64_t row_length(int64_t t) const {
    return topk_length ? indexer::clamp64(topk_length[t], 0, K) : K;
  }
  int64_t key(int64_t t, int64_t j, int64_t len) const {
    if (j >= len) return -1;
    const int64_t s = idx[t * K + j];
    return (s >= 0 && s < S) ? s : -1;
  }
};
Selection make_selection(const at::Tensor& indices, const c10::optional<at::Tensor>& topk_length,
                         int64_t S) {
  return {indices.data_ptr<int32_t>(),
          topk_length.has_value() ? topk_length->data_ptr<int32_t>() : nullptr,
          indices.size(2), S};
}

// Back to the caller's dtypes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> narrow_grads(const at::Tensor& dq,
                                                             const at::Tensor& dk,
                                                             const at::Tensor& dw,
                                                             const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& w) {
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dw.to(w.scalar_type())};
}

// Row losses summed in row order (fixed, thread-count independent), in double.
double sum_in_order(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s;
}

// ---- GEMM tiles ---------------------------------------------------------------------------------
//
// The logits kernels and the dense loss work on tiles: queries_per_tile(H) queries (all their
// heads, the rows of q viewed as [T * H, D]) against one key block of kKeyBlock keys, the scores
// of a tile one at::mm. Row tiles and key blocks sit at multiples of their sizes, so a tile's
// shapes (and with them BLAS's summation order) depend only on the problem, never on the thread
// count, and the row pass and the key pass compute bitwise the same scores for a pair. Each
// output is owned by one task: dq and dw by the row tile, dk by the key block, accumulated over
// the other axis in ascending order. at::mm runs single-threaded inside at::parallel_for tasks
// (tests/test_training.py checks bitwise equality across thread counts).

// About 64 GEMM rows per tile (small head counts take more queries: fewer, larger at::mm
// calls), at most 16 queries so that short problems still split into several tasks.
inline int64_t queries_per_tile(int64_t H) { return std::clamp<int64_t>(64 / H, 1, 16); }
constexpr int64_t kKeyBlock = 128;

// DSA_BLEND_LOOPS: the elementwise tile loops select between two computed values (x > 0 ? a : 0).
// With -ftrapping-math (the default) gcc keeps a branch per element there, since it may not
// evaluate a possibly trapping multiply unconditionally; these loops do not use FP traps.
#if defined(__GNUC__) && !defined(__clang__)
#define DSA_BLEND_LOOPS __attribute__((optimize("no-trapping-math")))
#else
#define DSA_BLEND_LOOPS
#endif

// Queries [t0, t1) and the union of their key ranges (empty when no row sees a key).
struct RowTile {
  int64_t t0, t1;
  KeyRange keys;
};
inline RowTile row_tile(const std::vector<KeyRange>& ranges, int64_t tile, int64_t T,
                        int64_t rows) {
  RowTile rt{tile * rows, std::min(T, (tile + 1) * rows), {0, 0}};
  bool any = false;
  for (int64_t t = rt.t0; t < rt.t1; ++t) {
    if (ranges[t].hi <= ranges[t].lo) continue;
    rt.keys.lo = any ? std::min(rt.keys.lo, ranges[t].lo) : ranges[t].lo;
    rt.keys.hi = any ? std::max(rt.keys.hi, ranges[t].hi) : ranges[t].hi;
    any = true;
  }
  return rt;
}
// Opened by every task that calls at::mm: worker threads do not inherit the dispatcher state
// of the op's thread, and the tiles are plain buffers (views of the outputs modified in place),
// so autograd and its view checks are skipped.
struct TileTaskScope {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};
inline int64_t tiles_of(int64_t n, int64_t tile) { return (n + tile - 1) / tile; }

// Scores of rows [r0, r0 + rows) of a [R, d] matrix against keys [s0, s0 + n) of a [S, d] one:
// [rows, n], contiguous.
inline at::Tensor tile_scores(const at::Tensor& rows2d, int64_t r0, int64_t rows,
                              const at::Tensor& keys, int64_t s0, int64_t n) {
  return at::mm(rows2d.narrow(0, r0, rows), keys.narrow(0, s0, n).t());
}

// logits[r, j] = sum_h w[t0 + r, h] relu(scores[r * H + h, j]) for scores [nt * H, n] (heads
// added in ascending order).
template <typename acc_t>
DSA_BLEND_LOOPS inline void tile_logits(const acc_t* scores, const acc_t* w, int64_t nt,
                                        int64_t H, int64_t n, acc_t* logits) {
  for (int64_t r = 0; r < nt; ++r) {
    acc_t* lr = logits + r * n;
    std::fill(lr, lr + n, acc_t(0));
    for (int64_t h = 0; h < H; ++h) {
      const acc_t wh = w[r * H + h];
      const acc_t* sr = scores + (r * H + h) * n;
      for (int64_t j = 0; j < n; ++j) lr[j] += wh * (sr[j] > 0 ? sr[j] : acc_t(0));
    }
  }
}

// sum_j g[j] relu(s[j]) with 8 independent partial sums (a fixed order the compiler
// vectorises; one running sum would serialise the loop).
template <typename acc_t>
DSA_BLEND_LOOPS inline acc_t relu_dot(const acc_t* g, const acc_t* s, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) {
      const acc_t prod = g[j + l] * s[j + l];
      part[l] += s[j + l] > 0 ? prod : acc_t(0);
    }
  acc_t sum =
      ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; j < n; ++j) sum += s[j] > 0 ? g[j] * s[j] : acc_t(0);
  return sum;
}

// The GEMM operand of the logits gradient for one tile: coef[r * H + h, j] =
// g[r, j] w[h] 1[scores > 0] for keys in row t0 + r's range, else 0, where g[r, j] = dL/dI at
// (t0 + r, s0 + j) (row stride g_stride). With dw, also dw[t, h] += sum_j g relu(scores).
template <typename acc_t>
DSA_BLEND_LOOPS inline void tile_logit_grads(const acc_t* scores, const acc_t* g, int64_t g_stride,
                             const acc_t* w, const std::vector<KeyRange>& ranges, int64_t t0,
                             int64_t nt, int64_t H, int64_t s0, int64_t n, acc_t* coef,
                             acc_t* dw) {
  for (int64_t r = 0; r < nt; ++r) {
    const KeyRange rg = ranges[t0 + r];
    const int64_t lo = std::clamp<int64_t>(rg.lo - s0, 0, n);
    const int64_t hi = std::clamp<int64_t>(rg.hi - s0, lo, n);
    const acc_t* gr = g + r * g_stride;
    for (int64_t h = 0; h < H; ++h) {
      const acc_t wh = w[(t0 + r) * H + h];
      const acc_t* sr = scores + (r * H + h) * n;
      acc_t* cr = coef + (r * H + h) * n;
      std::fill(cr, cr + lo, acc_t(0));
      // Both sides computed, then selected (a blend: see DSA_BLEND_LOOPS).
      for (int64_t j = lo; j < hi; ++j) {
        const acc_t c = gr[j] * wh;
        cr[j] = sr[j] > 0 ? c : acc_t(0);
      }
      std::fill(cr + hi, cr + n, acc_t(0));
      if (dw) dw[(t0 + r) * H + h] += relu_dot(gr + lo, sr + lo, hi - lo);
    }
  }
}

// ---- indexer_train_logits -----------------------------------------------------------------------

template <typename acc_t>
void train_logits_kernel(const at::Tensor& q2, const at::Tensor& k, const acc_t* w,
                         const std::vector<KeyRange>& ranges, int64_t T, int64_t H, int64_t S,
                         acc_t* out) {
  const int64_t rows = queries_per_tile(H);
  std::fill(out, out + T * S, neg_inf<acc_t>());
  at::parallel_for(0, tiles_of(T, rows), 1, [&](int64_t i0, int64_t i1) {
    const TileTaskScope scope;
    std::vector<acc_t> logits(static_cast<size_t>(rows * kKeyBlock));
    for (int64_t tile = i0; tile < i1; ++tile) {
      const RowTile rt = row_tile(ranges, tile, T, rows);
      const int64_t nt = rt.t1 - rt.t0;
      for (int64_t s0 = rt.keys.lo / kKeyBlock * kKeyBlock; s0 < rt.keys.hi; s0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, S - s0);
        const at::Tensor sc = tile_scores(q2, rt.t0 * H, nt * H, k, s0, n);
        tile_logits(sc.data_ptr<acc_t>(), w + rt.t0 * H, nt, H, n, logits.data());
        for (int64_t r = 0; r < nt; ++r) {
          const KeyRange rg = ranges[rt.t0 + r];
          const int64_t lo = std::max(rg.lo, s0), hi = std::min(rg.hi, s0 + n);
          if (lo < hi)
            std::copy(logits.data() + r * n + (lo - s0), logits.data() + r * n + (hi - s0),
                      out + (rt.t0 + r) * S + lo);
        }
      }
    }
  });
}

at::Tensor indexer_train_logits_cpu(const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& weights, const at::Tensor& ks,
                                    const at::Tensor& ke) {
  const auto sh = check_indexer_train_logits_inputs(q, k, weights, ks, ke, /*allow_fp64=*/true);
  const auto acc = training_acc_dtype(q);
  at::Tensor out = at::empty({sh.T, sh.S}, q.options().dtype(acc));
  if (sh.T == 0 || sh.S == 0) return out;
  const auto in = widen_qkw(q, k, weights);
  const auto ranges = row_ranges(ks, ke, sh.S);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "indexer_train_logits_cpu", [&] {
    train_logits_kernel<scalar_t>(in.q.view({sh.T * sh.H, sh.D}), in.k,
                                  in.w.data_ptr<scalar_t>(), ranges, sh.T, sh.H, sh.S,
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

// ---- indexer_train_logits_bwd -------------------------------------------------------------------

template <typename acc_t>
void train_logits_bwd_kernel(const acc_t* grad, const at::Tensor& q2, const at::Tensor& k,
                             const acc_t* w, const std::vector<KeyRange>& ranges, int64_t T,
                             int64_t H, int64_t S, const at::Tensor& dq2, const at::Tensor& dk,
                             acc_t* dw) {
  const int64_t rows = queries_per_tile(H);
  const auto opts = q2.options();
  // dq and dw: row tiles, key blocks in ascending order.
  at::parallel_for(0, tiles_of(T, rows), 1, [&](int64_t i0, int64_t i1) {
    const TileTaskScope scope;
    for (int64_t tile = i0; tile < i1; ++tile) {
      const RowTile rt = row_tile(ranges, tile, T, rows);
      const int64_t nt = rt.t1 - rt.t0;
      at::Tensor dq_tile = dq2.narrow(0, rt.t0 * H, nt * H);
      for (int64_t s0 = rt.keys.lo / kKeyBlock * kKeyBlock; s0 < rt.keys.hi; s0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, S - s0);
        const at::Tensor sc = tile_scores(q2, rt.t0 * H, nt * H, k, s0, n);
        at::Tensor coef = at::empty({nt * H, n}, opts);
        tile_logit_grads(sc.data_ptr<acc_t>(), grad + rt.t0 * S + s0, S, w, ranges, rt.t0, nt,
                         H, s0, n, coef.data_ptr<acc_t>(), dw);
        dq_tile.addmm_(coef, k.narrow(0, s0, n));
      }
    }
  });
  // dk: key blocks, row tiles in ascending order (scores recomputed).
  at::parallel_for(0, tiles_of(S, kKeyBlock), 1, [&](int64_t i0, int64_t i1) {
    const TileTaskScope scope;
    for (int64_t block = i0; block < i1; ++block) {
      const int64_t s0 = block * kKeyBlock, n = std::min(kKeyBlock, S - s0);
      at::Tensor dk_block = dk.narrow(0, s0, n);
      for (int64_t tile = 0; tile < tiles_of(T, rows); ++tile) {
        const RowTile rt = row_tile(ranges, tile, T, rows);
        if (rt.keys.hi <= s0 || rt.keys.lo >= s0 + n) continue;
        const int64_t nt = rt.t1 - rt.t0;
        const at::Tensor sc = tile_scores(q2, rt.t0 * H, nt * H, k, s0, n);
        at::Tensor coef = at::empty({nt * H, n}, opts);
        tile_logit_grads<acc_t>(sc.data_ptr<acc_t>(), grad + rt.t0 * S + s0, S, w, ranges,
                                rt.t0, nt, H, s0, n, coef.data_ptr<acc_t>(), nullptr);
        dk_block.addmm_(coef.t(), q2.narrow(0, rt.t0 * H, nt * H));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> indexer_train_logits_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights,
    const at::Tensor& ks, const at::Tensor& ke, bool deterministic) {
  (void)deterministic;  // always deterministic on the CPU (see the file comment)
  const auto sh = check_indexer_train_logits_bwd_inputs(grad, q, k, weights, ks, ke, true);
  const auto acc = training_acc_dtype(q);
  const auto in = widen_qkw(q, k, weights);
  at::Tensor dq = at::zeros({sh.T, sh.H, sh.D}, q.options().dtype(acc));
  at::Tensor dk = at::zeros({sh.S, sh.D}, q.options().dtype(acc));
  at::Tensor dw = at::zeros({sh.T, sh.H}, q.options().dtype(acc));
  if (sh.T > 0 && sh.S > 0) {
    const auto ranges = row_ranges(ks, ke, sh.S);
    AT_DISPATCH_FLOATING_TYPES(acc, "indexer_train_logits_bwd_cpu", [&] {
      train_logits_bwd_kernel<scalar_t>(grad.data_ptr<scalar_t>(), in.q.view({sh.T * sh.H, sh.D}),
                                        in.k, in.w.data_ptr<scalar_t>(), ranges, sh.T, sh.H, sh.S,
                                        dq.view({sh.T * sh.H, sh.D}), dk,
                                        dw.data_ptr<scalar_t>());
    });
  }
  return narrow_grads(dq, dk, dw, q, k, weights);
}

// Keys per dk task of the sparse loss.
constexpr int64_t kKeyTile = 16;

// ---- sparse_attention_target --------------------------------------------------------------------

template <typename acc_t>
void attention_target_kernel(const acc_t* q, const acc_t* kv, const float* lse,
                             const Selection& sel, double sm_scale, int64_t T, int64_t H,
                             int64_t D, float* out) {
  const acc_t scale = static_cast<acc_t>(sm_scale);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t len = sel.row_length(t);
      for (int64_t j = 0; j < sel.K; ++j) {
        const int64_t s = sel.key(t, j, len);
        acc_t p = 0;
        if (s >= 0) {
          for (int64_t h = 0; h < H; ++h) {
            const acc_t l = static_cast<acc_t>(lse[t * H + h]);
            if (std::isinf(l) && l < 0) continue;  // an empty row: no probability
            p += std::exp(scale * dot(q + (t * H + h) * D, kv + s * D, D) - l);
          }
          p /= static_cast<acc_t>(H);
        }
        out[t * sel.K + j] = static_cast<float>(p);
      }
    }
  });
}

at::Tensor sparse_attention_target_cpu(const at::Tensor& q, const at::Tensor& kv,
                                       const at::Tensor& indices, const at::Tensor& lse,
                                       double sm_scale,
                                       const c10::optional<at::Tensor>& topk_length) {
  const auto sh = check_sparse_attention_target_inputs(q, kv, indices, lse, sm_scale,
                                                       topk_length, true);
  at::Tensor out = at::empty({sh.T, sh.K}, q.options().dtype(at::kFloat));
  if (sh.T == 0 || sh.K == 0) return out;
  const auto acc = training_acc_dtype(q);
  const at::Tensor qa = q.to(acc).contiguous(), kva = kv.to(acc).contiguous();
  const Selection sel = make_selection(indices, topk_length, sh.S);
  AT_DISPATCH_FLOATING_TYPES(acc, "sparse_attention_target_cpu", [&] {
    attention_target_kernel<scalar_t>(qa.data_ptr<scalar_t>(), kva.data_ptr<scalar_t>(),
                                      lse.data_ptr<float>(), sel, sm_scale, sh.T, sh.H, sh.D,
                                      out.data_ptr<float>());
  });
  return out;
}

// ---- indexer_kl_loss_sparse ---------------------------------------------------------------------

// p log(p / r) with log r given; 0 log 0 = 0 (and p <= 0 contributes nothing).
template <typename acc_t>
inline acc_t kl_term(acc_t p, acc_t log_r) {
  return p > 0 ? p * (std::log(p) - log_r) : acc_t(0);
}

template <typename acc_t, typename target_t>
double sparse_kl_kernel(const acc_t* q, const acc_t* k, const acc_t* w, const target_t* target,
                        const Selection& sel, bool mean, int64_t T, int64_t H, int64_t D,
                        int64_t S, acc_t* dq, acc_t* dk, acc_t* dw) {
  const int64_t K = sel.K;
  // Rows with >= 1 valid entry (the "mean" divisor) and, per key, the (t, j) entries that
  // selected it in (t, j) order: dk[s] is then summed by one task in a fixed order.
  std::vector<int64_t> key_start(static_cast<size_t>(S + 1), 0);
  int64_t live_rows = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t len = sel.row_length(t);
    bool any = false;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t s = sel.key(t, j, len);
      if (s >= 0) {
        ++key_start[s + 1];
        any = true;
      }
    }
    live_rows += any;
  }
  for (int64_t s = 0; s < S; ++s) key_start[s + 1] += key_start[s];
  std::vector<int64_t> entries(static_cast<size_t>(key_start[S]));
  {
    std::vector<int64_t> fill(key_start.begin(), key_start.end() - 1);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t len = sel.row_length(t);
      for (int64_t j = 0; j < len; ++j) {
        const int64_t s = sel.key(t, j, len);
        if (s >= 0) entries[fill[s]++] = t * K + j;
      }
    }
  }
  const acc_t row_scale = mean && live_rows > 0 ? acc_t(1) / static_cast<acc_t>(live_rows)
                                                : acc_t(1);
  std::vector<acc_t> g(static_cast<size_t>(T * K), acc_t(0));  // dL/dI per selected entry
  std::vector<double> row_loss(static_cast<size_t>(T), 0.0);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> dots(static_cast<size_t>(K * H));
    std::vector<acc_t> logit(static_cast<size_t>(K));
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* qt = q + t * H * D;
      const acc_t* wt = w + t * H;
      const int64_t len = sel.row_length(t);
      acc_t mx = neg_inf<acc_t>();
      for (int64_t j = 0; j < len; ++j) {
        const int64_t s = sel.key(t, j, len);
        if (s < 0) continue;
        logit[j] = indexer_logit(qt, wt, k + s * D, H, D, dots.data() + j * H);
        mx = std::max(mx, logit[j]);
      }
      if (mx == neg_inf<acc_t>()) continue;  // no valid entry (or every logit -inf)
      acc_t sum_exp = 0, sum_p = 0;
      for (int64_t j = 0; j < len; ++j) {
        if (sel.key(t, j, len) < 0) continue;
        sum_exp += std::exp(logit[j] - mx);
        sum_p += static_cast<acc_t>(target[t * K + j]);
      }
      const acc_t lse = mx + std::log(sum_exp);
      acc_t loss = 0;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t s = sel.key(t, j, len);
        if (s < 0) continue;
        const acc_t p = static_cast<acc_t>(target[t * K + j]);
        const acc_t log_r = logit[j] - lse;
        loss += kl_term(p, log_r);
        // d/dI_j of sum_i p_i (log p_i - I_i + lse) = (sum p) r_j - p_j.
        const acc_t gj = (sum_p * std::exp(log_r) - p) * row_scale;
        g[t * K + j] = gj;
        accumulate_row_grads(gj, wt, dots.data() + j * H, k + s * D, H, D, dq + t * H * D,
                             dw + t * H);
      }
      row_loss[t] = static_cast<double>(loss);
    }
  });
  at::parallel_for(0, S, kKeyTile, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s)
      for (int64_t e = key_start[s]; e < key_start[s + 1]; ++e) {
        const int64_t t = entries[e] / K;
        accumulate_key_grad(g[entries[e]], q + t * H * D, w + t * H, k + s * D, H, D,
                            dk + s * D);
      }
  });
  const double total = sum_in_order(row_loss);
  return mean && live_rows > 0 ? total / static_cast<double>(live_rows) : total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_sparse_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights,
    const at::Tensor& indices, const at::Tensor& target,
    const c10::optional<at::Tensor>& topk_length, c10::string_view reduction,
    bool deterministic) {
  (void)deterministic;  // always deterministic on the CPU (see the file comment)
  const std::string red(reduction.data(), reduction.size());
  const auto sh = check_indexer_kl_loss_sparse_inputs(q, k, weights, indices, target,
                                                      topk_length, red, true);
  const bool mean = check_kl_reduction(red);
  const auto acc = training_acc_dtype(q);
  const auto in = widen_qkw(q, k, weights);
  at::Tensor dq = at::zeros({sh.T, sh.H, sh.D}, q.options().dtype(acc));
  at::Tensor dk = at::zeros({sh.S, sh.D}, q.options().dtype(acc));
  at::Tensor dw = at::zeros({sh.T, sh.H}, q.options().dtype(acc));
  double loss = 0;
  if (sh.T > 0 && sh.K > 0 && sh.S > 0) {
    const Selection sel = make_selection(indices, topk_length, sh.S);
    AT_DISPATCH_FLOATING_TYPES(acc, "indexer_kl_loss_sparse_cpu", [&] {
      using acc_t = scalar_t;
      auto run = [&](auto* tgt) {
        loss = sparse_kl_kernel<acc_t>(in.q.data_ptr<acc_t>(), in.k.data_ptr<acc_t>(),
                                       in.w.data_ptr<acc_t>(), tgt, sel, mean, sh.T, sh.H, sh.D,
                                       sh.S, dq.data_ptr<acc_t>(), dk.data_ptr<acc_t>(),
                                       dw.data_ptr<acc_t>());
      };
      if (target.scalar_type() == at::kDouble)
        run(target.data_ptr<double>());
      else
        run(target.data_ptr<float>());
    });
  }
  auto grads = narrow_grads(dq, dk, dw, q, k, weights);
  return {at::full({}, loss, q.options().dtype(acc)), std::get<0>(grads), std::get<1>(grads),
          std::get<2>(grads)};
}

// ---- indexer_kl_loss_dense ----------------------------------------------------------------------

// Online log-sum-exp: running max m and sum of exp(x - m).
template <typename acc_t>
struct OnlineLse {
  acc_t m = neg_inf<acc_t>();
  double sum = 0;  // tens of thousands of terms: summed in double
  void add(acc_t x) {
    if (x == neg_inf<acc_t>()) return;  // adds nothing (and -inf - -inf would be NaN)
    if (x > m) {
      sum = sum * std::exp(m - x) + 1;  // exp(-inf) = 0 on the first value
      m = x;
    } else {
      sum += std::exp(x - m);
    }
  }
  acc_t value() const {
    return m == neg_inf<acc_t>() ? m : m + static_cast<acc_t>(std::log(sum));
  }
};

// Scores of one dense tile (row tile x key block): the indexer's per-head scores [nt * H, n]
// and logits [nt, n], the main attention's unscaled scores [nt * Hm, n].
template <typename acc_t>
struct DenseTile {
  at::Tensor indexer, main;
  std::vector<acc_t> logits;
};

template <typename acc_t>
struct DenseProblem {
  at::Tensor q2, k, qm2, kv;  // [T * H, D], [S, D], [T * Hm, Dm], [S, Dm]
  const acc_t* w;
  const std::vector<KeyRange>& ranges;
  int64_t T, H, S, Hm, kb;
  acc_t scale;

  void scores(const RowTile& rt, int64_t s0, int64_t n, DenseTile<acc_t>& out) const {
    const int64_t nt = rt.t1 - rt.t0;
    out.indexer = tile_scores(q2, rt.t0 * H, nt * H, k, s0, n);
    out.main = tile_scores(qm2, rt.t0 * Hm, nt * Hm, kv, s0, n);
    out.logits.resize(static_cast<size_t>(nt * n));
    tile_logits(out.indexer.template data_ptr<acc_t>(), w + rt.t0 * H, nt, H, n,
                out.logits.data());
  }
  // The key range of row t inside block [s0, s0 + n), relative to s0.
  std::pair<int64_t, int64_t> local_range(int64_t t, int64_t s0, int64_t n) const {
    const int64_t lo = std::clamp<int64_t>(ranges[t].lo - s0, 0, n);
    return {lo, std::clamp<int64_t>(ranges[t].hi - s0, lo, n)};
  }
};

// g[r, j] = dL/dI at (t0 + r, s0 + j) from pass 1's lse (0 outside the row's range) and, with
// row_loss, each row's loss terms of the block added to row_loss[t] (one add per block: long
// rows lose less precision than with one running sum).
template <typename acc_t>
void dense_tile_grads(const DenseProblem<acc_t>& pb, const DenseTile<acc_t>& tile,
                      const RowTile& rt, int64_t s0, int64_t n, const acc_t* lse_main,
                      const acc_t* lse_indexer, acc_t row_scale, acc_t* g, double* row_loss) {
  const acc_t* sm = tile.main.template data_ptr<acc_t>();
  for (int64_t r = 0; r < rt.t1 - rt.t0; ++r) {
    const int64_t t = rt.t0 + r;
    const auto [lo, hi] = pb.local_range(t, s0, n);
    acc_t* gr = g + r * n;
    std::fill(gr, gr + n, acc_t(0));
    acc_t loss = 0;
    for (int64_t j = lo; j < hi; ++j) {
      acc_t p = 0;
      for (int64_t h = 0; h < pb.Hm; ++h)
        p += std::exp(pb.scale * sm[(r * pb.Hm + h) * n + j] - lse_main[t * pb.Hm + h]);
      p /= static_cast<acc_t>(pb.Hm);
      const acc_t log_r = tile.logits[r * n + j] - lse_indexer[t];
      loss += kl_term(p, log_r);
      gr[j] = (std::exp(log_r) - p) * row_scale;
    }
    if (row_loss) row_loss[t] += static_cast<double>(loss);
  }
}

template <typename acc_t>
double dense_kl_kernel(const DenseProblem<acc_t>& pb, bool mean, const at::Tensor& dq2,
                       const at::Tensor& dk, acc_t* dw) {
  const int64_t T = pb.T, H = pb.H, S = pb.S, Hm = pb.Hm, kb = pb.kb;
  const auto& ranges = pb.ranges;
  const int64_t rows = queries_per_tile(H);
  const int64_t row_tiles = tiles_of(T, rows);
  int64_t live_rows = 0;
  for (const auto& r : ranges) live_rows += r.hi > r.lo;
  const acc_t row_scale = mean && live_rows > 0 ? acc_t(1) / static_cast<acc_t>(live_rows)
                                                : acc_t(1);
  auto first_block = [&](const RowTile& rt) { return rt.keys.lo / kb * kb; };
  // Pass 1: per-row lse of every main head and of the indexer, streamed over key blocks.
  std::vector<acc_t> lse_main(static_cast<size_t>(T * Hm), neg_inf<acc_t>());
  std::vector<acc_t> lse_indexer(static_cast<size_t>(T), neg_inf<acc_t>());
  at::parallel_for(0, row_tiles, 1, [&](int64_t i0, int64_t i1) {
    const TileTaskScope scope;
    DenseTile<acc_t> tile;
    for (int64_t ti = i0; ti < i1; ++ti) {
      const RowTile rt = row_tile(ranges, ti, T, rows);
      const int64_t nt = rt.t1 - rt.t0;
      std::vector<OnlineLse<acc_t>> idx(static_cast<size_t>(nt)),
          main(static_cast<size_t>(nt * Hm));
      for (int64_t s0 = first_block(rt); s0 < rt.keys.hi; s0 += kb) {
        const int64_t n = std::min(kb, S - s0);
        pb.scores(rt, s0, n, tile);
        const acc_t* sm = tile.main.template data_ptr<acc_t>();
        for (int64_t r = 0; r < nt; ++r) {
          const auto [lo, hi] = pb.local_range(rt.t0 + r, s0, n);
          for (int64_t j = lo; j < hi; ++j) idx[r].add(tile.logits[r * n + j]);
          for (int64_t h = 0; h < Hm; ++h)
            for (int64_t j = lo; j < hi; ++j)
              main[r * Hm + h].add(pb.scale * sm[(r * Hm + h) * n + j]);
        }
      }
      for (int64_t r = 0; r < nt; ++r) {
        lse_indexer[rt.t0 + r] = idx[r].value();
        for (int64_t h = 0; h < Hm; ++h) lse_main[(rt.t0 + r) * Hm + h] = main[r * Hm + h].value();
      }
    }
  });
  const auto opts = pb.q2.options();
  // Pass 2a: per row tile, the loss and dq, dw, key block by key block.
  std::vector<double> row_loss(static_cast<size_t>(T), 0.0);
  at::parallel_for(0, row_tiles, 1, [&](int64_t i0, int64_t i1) {
    const TileTaskScope scope;
    DenseTile<acc_t> tile;
    std::vector<acc_t> g(static_cast<size_t>(rows * kb));
    for (int64_t ti = i0; ti < i1; ++ti) {
      const RowTile rt = row_tile(ranges, ti, T, rows);
      const int64_t nt = rt.t1 - rt.t0;
      at::Tensor dq_tile = dq2.narrow(0, rt.t0 * H, nt * H);
      for (int64_t s0 = first_block(rt); s0 < rt.keys.hi; s0 += kb) {
        const int64_t n = std::min(kb, S - s0);
        pb.scores(rt, s0, n, tile);
        dense_tile_grads(pb, tile, rt, s0, n, lse_main.data(), lse_indexer.data(), row_scale,
                         g.data(), row_loss.data());
        at::Tensor coef = at::empty({nt * H, n}, opts);
        tile_logit_grads(tile.indexer.template data_ptr<acc_t>(), g.data(), n, pb.w, ranges,
                         rt.t0, nt, H, s0, n, coef.template data_ptr<acc_t>(), dw);
        dq_tile.addmm_(coef, pb.k.narrow(0, s0, n));
      }
    }
  });
  // Pass 2b: per key block, dk over the row tiles that see it (g recomputed the same way).
  at::parallel_for(0, tiles_of(S, kb), 1, [&](int64_t i0, int64_t i1) {
    const TileTaskScope scope;
    DenseTile<acc_t> tile;
    std::vector<acc_t> g(static_cast<size_t>(rows * kb));
    for (int64_t block = i0; block < i1; ++block) {
      const int64_t s0 = block * kb, n = std::min(kb, S - s0);
      at::Tensor dk_block = dk.narrow(0, s0, n);
      for (int64_t ti = 0; ti < row_tiles; ++ti) {
        const RowTile rt = row_tile(ranges, ti, T, rows);
        if (rt.keys.hi <= s0 || rt.keys.lo >= s0 + n) continue;
        const int64_t nt = rt.t1 - rt.t0;
        pb.scores(rt, s0, n, tile);
        dense_tile_grads<acc_t>(pb, tile, rt, s0, n, lse_main.data(), lse_indexer.data(),
                                row_scale, g.data(), nullptr);
        at::Tensor coef = at::empty({nt * H, n}, opts);
        tile_logit_grads<acc_t>(tile.indexer.template data_ptr<acc_t>(), g.data(), n, pb.w,
                                ranges, rt.t0, nt, H, s0, n, coef.template data_ptr<acc_t>(),
                                nullptr);
        dk_block.addmm_(coef.t(), pb.q2.narrow(0, rt.t0 * H, nt * H));
      }
    }
  });
  const double total = sum_in_order(row_loss);
  return mean && live_rows > 0 ? total / static_cast<double>(live_rows) : total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> indexer_kl_loss_dense_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& weights, const at::Tensor& ks,
    const at::Tensor& ke, const at::Tensor& q_main, const at::Tensor& kv_main, double sm_scale,
    c10::string_view reduction, int64_t block_size, bool deterministic) {
  (void)deterministic;  // always deterministic on the CPU (see the file comment)
  const std::string red(reduction.data(), reduction.size());
  const auto sh = check_indexer_kl_loss_dense_inputs(q, k, weights, ks, ke, q_main, kv_main,
                                                     sm_scale, red, block_size, true);
  const bool mean = check_kl_reduction(red);
  const auto acc = training_acc_dtype(q);
  const auto in = widen_qkw(q, k, weights);
  at::Tensor dq = at::zeros({sh.T, sh.H, sh.D}, q.options().dtype(acc));
  at::Tensor dk = at::zeros({sh.S, sh.D}, q.options().dtype(acc));
  at::Tensor dw = at::zeros({sh.T, sh.H}, q.options().dtype(acc));
  double loss = 0;
  if (sh.T > 0 && sh.S > 0) {
    const at::Tensor qm = q_main.to(acc).contiguous(), kvm = kv_main.to(acc).contiguous();
    const auto ranges = row_ranges(ks, ke, sh.S);
    const int64_t block = std::min<int64_t>(block_size, std::max<int64_t>(sh.S, 1));
    AT_DISPATCH_FLOATING_TYPES(acc, "indexer_kl_loss_dense_cpu", [&] {
      const DenseProblem<scalar_t> pb{in.q.view({sh.T * sh.H, sh.D}), in.k,
                                      qm.view({sh.T * sh.Hm, sh.Dm}), kvm.view({sh.S, sh.Dm}),
                                      in.w.data_ptr<scalar_t>(), ranges, sh.T, sh.H, sh.S, sh.Hm,
                                      std::min(block, kKeyBlock),
                                      static_cast<scalar_t>(sm_scale)};
      loss = dense_kl_kernel<scalar_t>(pb, mean, dq.view({sh.T * sh.H, sh.D}), dk,
                                       dw.data_ptr<scalar_t>());
    });
  }
  auto grads = narrow_grads(dq, dk, dw, q, k, weights);
  return {at::full({}, loss, q.options().dtype(acc)), std::get<0>(grads), std::get<1>(grads),
          std::get<2>(grads)};
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("indexer_train_logits", &dsa::indexer_train_logits_cpu);
  m.impl("indexer_train_logits_bwd", &dsa::indexer_train_logits_bwd_cpu);
  m.impl("sparse_attention_target", &dsa::sparse_attention_target_cpu);
  m.impl("indexer_kl_loss_sparse", &dsa::indexer_kl_loss_sparse_cpu);
  m.impl("indexer_kl_loss_dense", &dsa::indexer_kl_loss_dense_cpu);
}
