// sparse_mla family: CPU kernels of sparse_mla_fwd / sparse_mla_bwd (SPEC section 3).
//
// Forward: parallel over query tokens. Each token gathers its valid latent rows once (converted
// to the accumulation type), and every head reuses them: scores, a max-subtracted softmax with
// the optional sink in the denominator, and the P·V sum, all in fp32 (fp64 for fp64 inputs).
//
// Backward: P is recomputed from lse; Delta = rowsum(out ⊙ dout); dS = P ⊙ (dP − Delta)·scale.
// dq is owned by its token. dkv is atomic-free and bitwise deterministic for any thread count:
// phase 1 (parallel over tokens) writes each selected entry's contribution row
// dSᵀq + Pᵀdout into a scratch buffer; phase 2 (parallel over column blocks of dkv) adds the
// contributions in token-then-slot order, so every dkv element is summed in one fixed order.
// Tokens are processed in chunks to bound the scratch memory.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "sparse_mla/sparse_mla_checks.h"

namespace dsa {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Row t's valid positions: entries j < topk_length[t] (clamped to [0, K]) whose index is in
// [0, S). Returns how many; fills slot (position j) and row (kv row) for each.
inline int64_t collect_valid(const int32_t* idx_row, int64_t K, int64_t S, const int32_t* lens,
                             int64_t t, int64_t* slot, int64_t* row) {
  int64_t limit = K;
  if (lens) limit = std::min<int64_t>(std::max<int64_t>(lens[t], 0), K);
  int64_t n = 0;
  for (int64_t j = 0; j < limit; ++j) {
    const int64_t r = idx_row[j];
    if (r >= 0 && r < S) {
      slot[n] = j;
      row[n] = r;
      ++n;
    }
  }
  return n;
}

// Convert the n selected kv rows of width D into acc (row-major [n, D]).
template <typename scalar_t, typename acc_t>
inline void gather_rows(const scalar_t* kv, const int64_t* row, int64_t n, int64_t D, acc_t* acc) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* src = kv + row[i] * D;
    acc_t* dst = acc + i * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]);
  }
}

// Eight independent partial sums: a fixed summation order the compiler can vectorise (a plain
// running sum may not be reordered without -ffast-math).
template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) part[k] += a[i + k] * b[i + k];
  acc_t tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) +
         tail;
}

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

template <typename scalar_t>
void fwd_kernel(const scalar_t* q, const scalar_t* kv, const int32_t* indices, acc_type_t<scalar_t> scale,
                int64_t d_v, const float* sink, const int32_t* lens, const SparseMlaSizes& sz,
                scalar_t* out, float* lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t H = sz.H, D = sz.D, K = sz.K, S = sz.S;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, sz.T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> slot(K), row(K);
    std::vector<acc_t> rows, qh(D), score(K), o(d_v);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = collect_valid(indices + t * K, K, S, lens, t, slot.data(), row.data());
      rows.resize(n * D);
      gather_rows(kv, row.data(), n, D, rows.data());
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* qsrc = q + (t * H + h) * D;
        for (int64_t d = 0; d < D; ++d) qh[d] = static_cast<acc_t>(qsrc[d]);
        acc_t m = kNegInf;
        for (int64_t i = 0; i < n; ++i) {
          score[i] = scale * dot(qh.data(), rows.data() + i * D, D);
          m = std::max(m, score[i]);
        }
        std::fill(o.begin(), o.end(), acc_t(0));
        acc_t row_lse = kNegInf;
        if (n > 0 && m != kNegInf) {
          acc_t sum = 0;
          for (int64_t i = 0; i < n; ++i) sum += std::exp(score[i] - m);
          row_lse = m + std::log(sum);
          const acc_t denom = denominator_log(row_lse, sink, h);
          for (int64_t i = 0; i < n; ++i) {
            const acc_t p = std::exp(score[i] - denom);
            const acc_t* v = rows.data() + i * D;
            for (int64_t d = 0; d < d_v; ++d) o[d] += p * v[d];
          }
        }
        scalar_t* odst = out + (t * H + h) * d_v;
        for (int64_t d = 0; d < d_v; ++d) odst[d] = static_cast<scalar_t>(o[d]);
        lse[t * H + h] = static_cast<float>(row_lse);
      }
    }
  });
}

template <typename scalar_t>
void bwd_kernel(const scalar_t* q, const scalar_t* kv, const scalar_t* out, const scalar_t* dout,
                const int32_t* indices, const float* lse, acc_type_t<scalar_t> scale, int64_t d_v,
                const float* sink, const int32_t* lens, const SparseMlaSizes& sz, scalar_t* dq,
                scalar_t* dkv) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t T = sz.T, H = sz.H, D = sz.D, K = sz.K, S = sz.S;
  std::vector<acc_t> dkv_acc(static_cast<size_t>(S * D), acc_t(0));
  // Scratch of at most ~16M accumulators (64 MB in fp32) per chunk of tokens.
  const int64_t per_token = std::max<int64_t>(K * D, 1);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(T, (int64_t(1) << 24) / per_token));
  std::vector<acc_t> contrib(static_cast<size_t>(std::max<int64_t>(chunk * K * D, 1)));
  std::vector<int64_t> rows_of(static_cast<size_t>(std::max<int64_t>(chunk * K, 1)));
  std::vector<int64_t> count(chunk);
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t c1 = std::min(T, c0 + chunk);
    // Phase 1: per token, dq and the contribution row of every valid entry.
    at::parallel_for(c0, c1, 1, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> slot(K);
      std::vector<acc_t> rows, qh(D), doh(d_v), p(K), ds(K), dqh(D);
      for (int64_t t = t0; t < t1; ++t) {
        int64_t* row = rows_of.data() + (t - c0) * K;
        const int64_t n = collect_valid(indices + t * K, K, S, lens, t, slot.data(), row);
        count[t - c0] = n;
        rows.resize(n * D);
        gather_rows(kv, row, n, D, rows.data());
        acc_t* cont = contrib.data() + (t - c0) * K * D;
        std::fill(cont, cont + n * D, acc_t(0));
        for (int64_t h = 0; h < H; ++h) {
          const int64_t th = t * H + h;
          std::fill(dqh.begin(), dqh.end(), acc_t(0));
          const acc_t row_lse = static_cast<acc_t>(lse[th]);
          if (n > 0 && std::isfinite(row_lse)) {
            const acc_t denom = denominator_log(row_lse, sink, h);
            for (int64_t d = 0; d < D; ++d) qh[d] = static_cast<acc_t>(q[th * D + d]);
            acc_t delta = 0;
            for (int64_t d = 0; d < d_v; ++d) {
              doh[d] = static_cast<acc_t>(dout[th * d_v + d]);
              delta += static_cast<acc_t>(out[th * d_v + d]) * doh[d];
            }
            for (int64_t i = 0; i < n; ++i) {
              const acc_t* kr = rows.data() + i * D;
              p[i] = std::exp(scale * dot(qh.data(), kr, D) - denom);
              const acc_t dp = dot(doh.data(), kr, d_v);
              ds[i] = p[i] * (dp - delta) * scale;
              for (int64_t d = 0; d < D; ++d) dqh[d] += ds[i] * kr[d];
            }
            for (int64_t i = 0; i < n; ++i) {
              acc_t* cr = cont + i * D;
              for (int64_t d = 0; d < D; ++d) cr[d] += ds[i] * qh[d];
              for (int64_t d = 0; d < d_v; ++d) cr[d] += p[i] * doh[d];
            }
          }
          for (int64_t d = 0; d < D; ++d) dq[th * D + d] = static_cast<scalar_t>(dqh[d]);
        }
      }
    });
    // Phase 2: each task owns a block of dkv columns and adds every contribution in the fixed
    // (token, slot) order.
    constexpr int64_t kCols = 64;
    at::parallel_for(0, (D + kCols - 1) / kCols, 1, [&](int64_t b0, int64_t b1) {
      const int64_t d0 = b0 * kCols, d1 = std::min(D, b1 * kCols);
      for (int64_t t = c0; t < c1; ++t) {
        const int64_t* row = rows_of.data() + (t - c0) * K;
        const acc_t* cont = contrib.data() + (t - c0) * K * D;
        for (int64_t i = 0; i < count[t - c0]; ++i) {
          acc_t* dst = dkv_acc.data() + row[i] * D;
          const acc_t* src = cont + i * D;
          for (int64_t d = d0; d < d1; ++d) dst[d] += src[d];
        }
      }
    });
  }
  at::parallel_for(0, S, 256, [&](int64_t s0, int64_t s1) {
    for (int64_t i = s0 * D; i < s1 * D; ++i) dkv[i] = static_cast<scalar_t>(dkv_acc[i]);
  });
}

const float* opt_float_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}
const int32_t* opt_int_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int32_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_fwd_cpu(const at::Tensor& q, const at::Tensor& kv,
                                                      const at::Tensor& indices, double sm_scale,
                                                      int64_t d_v,
                                                      const std::optional<at::Tensor>& attn_sink,
                                                      const std::optional<at::Tensor>& topk_length) {
  const auto sz = check_sparse_mla_inputs(q, kv, indices, sm_scale, d_v, attn_sink, topk_length);
  auto out = at::empty({sz.T, sz.H, d_v}, q.options());
  auto lse = at::empty({sz.T, sz.H}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "sparse_mla_fwd_cpu", [&] {
    fwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(),
                         indices.data_ptr<int32_t>(), static_cast<acc_type_t<scalar_t>>(sm_scale),
                         d_v, opt_float_ptr(attn_sink), opt_int_ptr(topk_length), sz,
                         out.data_ptr<scalar_t>(), lse.data_ptr<float>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_bwd_cpu(
    const at::Tensor& q, const at::Tensor& kv, const at::Tensor& out, const at::Tensor& dout,
    const at::Tensor& indices, const at::Tensor& lse, double sm_scale, int64_t d_v,
    const std::optional<at::Tensor>& attn_sink, const std::optional<at::Tensor>& topk_length,
    bool deterministic) {
  (void)deterministic;  // the CPU backward is always deterministic (see the file comment)
  const auto sz = check_sparse_mla_bwd_inputs(q, kv, out, dout, indices, lse, sm_scale, d_v,
                                               attn_sink, topk_length);
  auto dq = at::empty_like(q);
  auto dkv = at::empty_like(kv);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "sparse_mla_bwd_cpu", [&] {
    bwd_kernel<scalar_t>(q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
                         indices.data_ptr<int32_t>(), lse.data_ptr<float>(),
                         static_cast<acc_type_t<scalar_t>>(sm_scale), d_v,
                         opt_float_ptr(attn_sink), opt_int_ptr(topk_length), sz,
                         dq.data_ptr<scalar_t>(), dkv.data_ptr<scalar_t>());
  });
  return {dq, dkv};
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("sparse_mla_fwd", &dsa::sparse_mla_fwd_cpu);
  m.impl("sparse_mla_bwd", &dsa::sparse_mla_bwd_cpu);
}
