// training family: CPU kernels (SPEC section 7).
//
// Inputs are widened once to the accumulation type (float for bf16/fp32, double for fp64) and
// every kernel is a loop over independent outputs under at::parallel_for: rows t own dq[t] and
// dw[t] (and their loss term), keys s own dk[s]. Each output element is therefore summed by one
// thread in one fixed order, so the results are bitwise identical run to run and for any thread
// count; `deterministic` has nothing to switch on the CPU. The dk loops recompute the scores
// they need instead of sharing partial sums across rows: memory stays O(T*H + T*block) for the
// dense loss (never [T, S] or [T, S, H]) and O(T*K) for the sparse one.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
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

// out[j * out_stride] = dot(a, rows + j * n) for j < count. Four rows share each load of a;
// every result is bitwise the dot() of its row (the same partial sums in the same order), so
// how keys are grouped into runs never changes a value.
template <typename acc_t>
inline void dot_rows(const acc_t* a, const acc_t* rows, int64_t count, int64_t n, acc_t* out,
                     int64_t out_stride) {
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) {
    const acc_t* r = rows + j * n;
    acc_t part[4][8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int l = 0; l < 8; ++l) {
        const acc_t av = a[i + l];
        for (int c = 0; c < 4; ++c) part[c][l] += av * r[c * n + i + l];
      }
    for (int c = 0; c < 4; ++c) {
      const acc_t* p = part[c];
      acc_t s = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
      for (int64_t e = i; e < n; ++e) s += a[e] * r[c * n + e];
      out[(j + c) * out_stride] = s;
    }
  }
  for (; j < count; ++j) out[j * out_stride] = dot(a, rows + j * n, n);
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

// indexer_logit for `count` consecutive keys k[0..count): dots [count, H], logits [count]
// (bitwise the per-key values).
template <typename acc_t>
inline void indexer_logits_run(const acc_t* q, const acc_t* w, const acc_t* k, int64_t count,
                               int64_t H, int64_t D, acc_t* dots, acc_t* logits) {
  for (int64_t h = 0; h < H; ++h) dot_rows(q + h * D, k, count, D, dots + h, H);
  for (int64_t j = 0; j < count; ++j) {
    const acc_t* dj = dots + j * H;
    acc_t logit = 0;
    for (int64_t h = 0; h < H; ++h) logit += w[h] * (dj[h] > 0 ? dj[h] : acc_t(0));
    logits[j] = logit;
  }
}

// dk[j] += sum_h g[j] w[h] 1[q[h] . k[j] > 0] q[h] for one query and `count` consecutive keys
// (scores recomputed into scratch [count]); per dk[j] the heads are added in ascending order.
template <typename acc_t>
inline void accumulate_key_grads_run(const acc_t* g, const acc_t* q, const acc_t* w,
                                     const acc_t* k, int64_t count, int64_t H, int64_t D,
                                     acc_t* dk, acc_t* scratch) {
  for (int64_t h = 0; h < H; ++h) {
    dot_rows(q + h * D, k, count, D, scratch, 1);
    for (int64_t j = 0; j < count; ++j)
      if (scratch[j] > 0) axpy(dk + j * D, g[j] * w[h], q + h * D, D);
  }
}

// Keys per run of the row loops (the scratch of one run is [kRun, H]).
constexpr int64_t kRun = 64;

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

// ---- indexer_train_logits -----------------------------------------------------------------------

template <typename acc_t>
void train_logits_kernel(const acc_t* q, const acc_t* k, const acc_t* w,
                         const std::vector<KeyRange>& ranges, int64_t T, int64_t H, int64_t D,
                         int64_t S, acc_t* out) {
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> dots(static_cast<size_t>(kRun * H));
    for (int64_t t = t0; t < t1; ++t) {
      acc_t* row = out + t * S;
      const KeyRange r = ranges[t];
      std::fill(row, row + r.lo, neg_inf<acc_t>());
      std::fill(row + r.hi, row + S, neg_inf<acc_t>());
      for (int64_t s0 = r.lo; s0 < r.hi; s0 += kRun)
        indexer_logits_run(q + t * H * D, w + t * H, k + s0 * D, std::min(kRun, r.hi - s0), H,
                           D, dots.data(), row + s0);
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
    train_logits_kernel<scalar_t>(in.q.data_ptr<scalar_t>(), in.k.data_ptr<scalar_t>(),
                                  in.w.data_ptr<scalar_t>(), ranges, sh.T, sh.H, sh.D, sh.S,
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

// ---- indexer_train_logits_bwd -------------------------------------------------------------------

// Keys per dk task: one query's heads are read once for the whole tile.
constexpr int64_t kKeyTile = 16;

template <typename acc_t>
void train_logits_bwd_kernel(const acc_t* grad, const acc_t* q, const acc_t* k, const acc_t* w,
                             const std::vector<KeyRange>& ranges, int64_t T, int64_t H,
                             int64_t D, int64_t S, acc_t* dq, acc_t* dk, acc_t* dw) {
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> dots(static_cast<size_t>(kRun * H)), logits(static_cast<size_t>(kRun));
    for (int64_t t = t0; t < t1; ++t) {
      const acc_t* qt = q + t * H * D;
      const acc_t* wt = w + t * H;
      for (int64_t s0 = ranges[t].lo; s0 < ranges[t].hi; s0 += kRun) {
        const int64_t n = std::min(kRun, ranges[t].hi - s0);
        indexer_logits_run(qt, wt, k + s0 * D, n, H, D, dots.data(), logits.data());
        for (int64_t j = 0; j < n; ++j)
          accumulate_row_grads(grad[t * S + s0 + j], wt, dots.data() + j * H, k + (s0 + j) * D,
                               H, D, dq + t * H * D, dw + t * H);
      }
    }
  });
  const int64_t tiles = (S + kKeyTile - 1) / kKeyTile;
  at::parallel_for(0, tiles, 1, [&](int64_t i0, int64_t i1) {
    acc_t scratch[kKeyTile];
    for (int64_t tile = i0; tile < i1; ++tile) {
      const int64_t s0 = tile * kKeyTile, s1 = std::min(S, s0 + kKeyTile);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t lo = std::max(s0, ranges[t].lo), hi = std::min(s1, ranges[t].hi);
        if (lo < hi)
          accumulate_key_grads_run(grad + t * S + lo, q + t * H * D, w + t * H, k + lo * D,
                                   hi - lo, H, D, dk + lo * D, scratch);
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
      train_logits_bwd_kernel<scalar_t>(grad.data_ptr<scalar_t>(), in.q.data_ptr<scalar_t>(),
                                        in.k.data_ptr<scalar_t>(), in.w.data_ptr<scalar_t>(),
                                        ranges, sh.T, sh.H, sh.D, sh.S, dq.data_ptr<scalar_t>(),
                                        dk.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>());
    });
  }
  return narrow_grads(dq, dk, dw, q, k, weights);
}

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

// One row's view of the dense problem: the indexer and the main attention at (t, s).
template <typename acc_t>
struct DenseRow {
  const acc_t* q;       // [H, D] indexer query
  const acc_t* w;       // [H]
  const acc_t* q_main;  // [Hm, Dm]
  const acc_t* k;       // [S, D]
  const acc_t* kv;      // [S, Dm]
  int64_t H, D, Hm, Dm;
  acc_t sm_scale;
};

// Pass-1 results of one row: the main attention's per-head lse and the indexer's lse.
template <typename acc_t>
struct RowLse {
  const acc_t* main;  // [Hm]
  acc_t indexer;
};

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

// Scratch of one run of n keys: the indexer's dots [n, H] and logits [n], the main
// attention's scaled scores [n, Hm].
template <typename acc_t>
struct RunScratch {
  std::vector<acc_t> dots, logits, main;
  RunScratch(int64_t n, int64_t H, int64_t Hm)
      : dots(static_cast<size_t>(n * H)), logits(static_cast<size_t>(n)),
        main(static_cast<size_t>(n * Hm)) {}
};

// Indexer logits and main-attention scores of one row over keys [s0, s0 + n).
template <typename acc_t>
inline void dense_scores_run(const DenseRow<acc_t>& row, int64_t s0, int64_t n,
                             RunScratch<acc_t>& sc) {
  indexer_logits_run(row.q, row.w, row.k + s0 * row.D, n, row.H, row.D, sc.dots.data(),
                     sc.logits.data());
  for (int64_t h = 0; h < row.Hm; ++h)
    dot_rows(row.q_main + h * row.Dm, row.kv + s0 * row.Dm, n, row.Dm, sc.main.data() + h,
             row.Hm);
  for (int64_t i = 0; i < n * row.Hm; ++i) sc.main[i] *= row.sm_scale;
}

// The loss terms and gradients g[j] = dL/dI at (t, s0 + j) from pass 1's lse, for a run
// whose scores dense_scores_run left in sc.
template <typename acc_t>
inline void dense_grads_run(const DenseRow<acc_t>& row, const RowLse<acc_t>& lse, int64_t n,
                            acc_t row_scale, const RunScratch<acc_t>& sc, acc_t* g,
                            acc_t* loss) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t* mj = sc.main.data() + j * row.Hm;
    acc_t p = 0;
    for (int64_t h = 0; h < row.Hm; ++h) p += std::exp(mj[h] - lse.main[h]);
    p /= static_cast<acc_t>(row.Hm);
    const acc_t log_r = sc.logits[j] - lse.indexer;
    *loss += kl_term(p, log_r);
    g[j] = (std::exp(log_r) - p) * row_scale;
  }
}

template <typename acc_t>
double dense_kl_kernel(const acc_t* q, const acc_t* k, const acc_t* w, const acc_t* q_main,
                       const acc_t* kv_main, const std::vector<KeyRange>& ranges, double sm_scale,
                       bool mean, int64_t block, const DenseKLShape& sh, acc_t* dq, acc_t* dk,
                       acc_t* dw) {
  const int64_t T = sh.T, H = sh.H, D = sh.D, S = sh.S, Hm = sh.Hm, Dm = sh.Dm;
  auto row_view = [&](int64_t t) {
    return DenseRow<acc_t>{q + t * H * D, w + t * H, q_main + t * Hm * Dm, k, kv_main,
                           H, D, Hm, Dm, static_cast<acc_t>(sm_scale)};
  };
  int64_t live_rows = 0;
  for (const auto& r : ranges) live_rows += r.hi > r.lo;
  const acc_t row_scale = mean && live_rows > 0 ? acc_t(1) / static_cast<acc_t>(live_rows)
                                                : acc_t(1);
  // Pass 1: per-row lse of every main head and of the indexer, streamed over key blocks.
  std::vector<acc_t> lse_main(static_cast<size_t>(T * Hm), neg_inf<acc_t>());
  std::vector<acc_t> lse_indexer(static_cast<size_t>(T), neg_inf<acc_t>());
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    RunScratch<acc_t> sc(block, H, Hm);
    std::vector<OnlineLse<acc_t>> main(static_cast<size_t>(Hm));
    for (int64_t t = t0; t < t1; ++t) {
      const auto row = row_view(t);
      std::fill(main.begin(), main.end(), OnlineLse<acc_t>{});
      OnlineLse<acc_t> idx;
      for (int64_t b0 = ranges[t].lo; b0 < ranges[t].hi; b0 += block) {
        const int64_t n = std::min(block, ranges[t].hi - b0);
        dense_scores_run(row, b0, n, sc);
        for (int64_t j = 0; j < n; ++j) {
          idx.add(sc.logits[j]);
          for (int64_t h = 0; h < Hm; ++h) main[h].add(sc.main[j * Hm + h]);
        }
      }
      lse_indexer[t] = idx.value();
      for (int64_t h = 0; h < Hm; ++h) lse_main[t * Hm + h] = main[h].value();
    }
  });
  auto row_lse = [&](int64_t t) { return RowLse<acc_t>{lse_main.data() + t * Hm, lse_indexer[t]}; };
  // Pass 2a: per row, the loss and dq, dw, key block by key block.
  std::vector<double> row_loss(static_cast<size_t>(T), 0.0);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    RunScratch<acc_t> sc(block, H, Hm);
    std::vector<acc_t> g(static_cast<size_t>(block));
    // Per-block partial sums added to the row's totals: long rows lose less precision than
    // with one running sum.
    std::vector<acc_t> dq_block(static_cast<size_t>(H * D)), dw_block(static_cast<size_t>(H));
    for (int64_t t = t0; t < t1; ++t) {
      const auto row = row_view(t);
      const auto lse = row_lse(t);
      double loss = 0;
      for (int64_t b0 = ranges[t].lo; b0 < ranges[t].hi; b0 += block) {
        const int64_t b1 = std::min(ranges[t].hi, b0 + block);
        acc_t loss_block = 0;
        dense_scores_run(row, b0, b1 - b0, sc);
        dense_grads_run(row, lse, b1 - b0, row_scale, sc, g.data(), &loss_block);
        std::fill(dq_block.begin(), dq_block.end(), acc_t(0));
        std::fill(dw_block.begin(), dw_block.end(), acc_t(0));
        for (int64_t s = b0; s < b1; ++s)
          accumulate_row_grads(g[s - b0], row.w, sc.dots.data() + (s - b0) * H, k + s * D, H, D,
                               dq_block.data(), dw_block.data());
        axpy(dq + t * H * D, acc_t(1), dq_block.data(), H * D);
        axpy(dw + t * H, acc_t(1), dw_block.data(), H);
        loss += static_cast<double>(loss_block);
      }
      row_loss[t] = loss;
    }
  });
  // Pass 2b: per key tile, dk over every row that sees it (g recomputed the same way).
  const int64_t tiles = (S + kKeyTile - 1) / kKeyTile;
  at::parallel_for(0, tiles, 1, [&](int64_t i0, int64_t i1) {
    RunScratch<acc_t> sc(kKeyTile, H, Hm);
    acc_t g[kKeyTile];
    for (int64_t tile = i0; tile < i1; ++tile) {
      const int64_t s0 = tile * kKeyTile, s1 = std::min(S, s0 + kKeyTile);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t lo = std::max(s0, ranges[t].lo), hi = std::min(s1, ranges[t].hi);
        if (lo >= hi) continue;
        const auto row = row_view(t);
        const auto lse = row_lse(t);
        acc_t unused_loss = 0;
        dense_scores_run(row, lo, hi - lo, sc);
        dense_grads_run(row, lse, hi - lo, row_scale, sc, g, &unused_loss);
        for (int64_t j = 0; j < hi - lo; ++j)
          for (int64_t h = 0; h < H; ++h)
            if (sc.dots[j * H + h] > 0) axpy(dk + (lo + j) * D, g[j] * row.w[h], row.q + h * D, D);
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
      loss = dense_kl_kernel<scalar_t>(in.q.data_ptr<scalar_t>(), in.k.data_ptr<scalar_t>(),
                                       in.w.data_ptr<scalar_t>(), qm.data_ptr<scalar_t>(),
                                       kvm.data_ptr<scalar_t>(), ranges, sm_scale, mean, block,
                                       sh, dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(),
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
