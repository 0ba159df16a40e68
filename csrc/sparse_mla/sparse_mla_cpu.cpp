// sparse_mla family: CPU kernels of sparse_mla_fwd / sparse_mla_bwd (SPEC section 3).
//
// Parallel over query tokens. Each token gathers its valid latent rows once and every head
// reuses them: scores as one GEMM of the token's heads against the rows, an exact max-subtracted
// softmax with the optional sink in the denominator (fp32), and P·V as a second GEMM. The GEMMs
// are bf16 brgemm with fp32 accumulation where the CPU has fast bf16 and the inputs are bf16
// (common/cpu_attention.h), else at::mm in the accumulation type (fp32, fp64 for fp64 inputs).
//
// Backward: P is recomputed from lse; Delta = rowsum(out ⊙ dout); dS = P ⊙ (dP − Delta)·scale.
// dq is owned by its token. dkv is atomic-free and bitwise deterministic for any thread count:
// phase 1 (parallel over tokens) writes each selected entry's contribution row
// dSᵀq + Pᵀdout into a scratch buffer (each GEMM single-threaded, its order fixed by its shape);
// phase 2 (parallel over column blocks of dkv) adds the contributions in token-then-slot order,
// so every dkv element is summed in one fixed order. Tokens are processed in chunks to bound the
// scratch memory.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_attention.h"
#include "common/cpu_gemm.h"
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

template <typename acc_t>
at::Tensor view2d(acc_t* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// bf16 brgemm kernels need even d_qk / d_v (VNNI pairs along the reduction dimension).
bool bf16_brgemm_applies(at::ScalarType dtype, int64_t D, int64_t d_v) {
  return dtype == at::kBFloat16 && D % 2 == 0 && d_v % 2 == 0 && cpu::use_bf16_brgemm();
}

// ---- forward -----------------------------------------------------------------------------------

// bf16 operands, bf16 GEMMs with fp32 accumulation (cpu_attention.h).
void fwd_bf16(const c10::BFloat16* q, const c10::BFloat16* kv, const int32_t* indices, float scale,
              int64_t d_v, const float* sink, const int32_t* lens, const SparseMlaSizes& sz,
              c10::BFloat16* out, float* lse) {
  const int64_t H = sz.H, D = sz.D, K = sz.K, S = sz.S;
  at::parallel_for(0, sz.T, 1, [&](int64_t t0, int64_t t1) {
    cpu::BrgemmScope brgemm_scope;
    std::vector<int64_t> slot(K), row(K);
    std::vector<float> o(H * d_v);
    cpu::PackedRows rows;
    cpu::AttendScratch ws;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = collect_valid(indices + t * K, K, S, lens, t, slot.data(), row.data());
      rows.pack(D, n, [&](int64_t i) { return kv + row[i] * D; });
      cpu::attend_bf16(q + t * H * D, H, D, rows, d_v, scale, sink, ws, o.data(), lse + t * H);
      cpu::to_bf16(o.data(), out + t * H * d_v, H * d_v);
    }
  });
}

// Any dtype, GEMMs in the accumulation type (fp32, fp64 for fp64) through at::mm: the path
// where bf16 matmul is emulated, and for fp32 / fp64 inputs.
template <typename scalar_t>
void fwd_mm(const scalar_t* q, const scalar_t* kv, const int32_t* indices, acc_type_t<scalar_t> scale,
            int64_t d_v, const float* sink, const int32_t* lens, const SparseMlaSizes& sz,
            scalar_t* out, float* lse) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t H = sz.H, D = sz.D, K = sz.K, S = sz.S;
  at::parallel_for(0, sz.T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> slot(K), row(K);
    std::vector<acc_t> rows, qt(H * D), score, o(H * d_v);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = collect_valid(indices + t * K, K, S, lens, t, slot.data(), row.data());
      std::fill(o.begin(), o.end(), acc_t(0));
      if (n > 0) {
        rows.resize(n * D);
        gather_rows(kv, row.data(), n, D, rows.data());
        for (int64_t e = 0; e < H * D; ++e) qt[e] = static_cast<acc_t>(q[t * H * D + e]);
        score.resize(H * n);
        at::Tensor R = view2d(rows.data(), n, D, D), P = view2d(score.data(), H, n, n);
        at::mm_out(P, view2d(qt.data(), H, D, D), R.t());
        cpu::softmax_rows<acc_t>(score.data(), H, n, n, scale, sink, lse + t * H);
        at::Tensor O = view2d(o.data(), H, d_v, d_v);
        at::mm_out(O, P, R.narrow(1, 0, d_v));
      } else {
        std::fill(lse + t * H, lse + (t + 1) * H, -std::numeric_limits<float>::infinity());
      }
      scalar_t* dst = out + t * H * d_v;
      for (int64_t e = 0; e < H * d_v; ++e) dst[e] = static_cast<scalar_t>(o[e]);
    }
  });
}

// ---- backward ----------------------------------------------------------------------------------

// Tokens per chunk of the deterministic dkv reduction: the contribution scratch stays at about
// 16M accumulators (64 MB in fp32).
int64_t bwd_chunk(int64_t T, int64_t per_token) {
  return std::max<int64_t>(1, std::min<int64_t>(T, (int64_t(1) << 24) / std::max<int64_t>(per_token, 1)));
}

// Phase 2 of the deterministic dkv: each task owns a block of dkv columns and adds the chunk's
// contributions in the fixed (token, slot) order.
template <typename acc_t>
void reduce_contributions(const acc_t* contrib, int64_t token_stride, const int64_t* rows_of,
                          int64_t K, const int64_t* count, int64_t tokens, int64_t D, acc_t* dkv_acc) {
  constexpr int64_t kCols = 64;
  at::parallel_for(0, (D + kCols - 1) / kCols, 1, [&](int64_t b0, int64_t b1) {
    const int64_t d0 = b0 * kCols, d1 = std::min(D, b1 * kCols);
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t* row = rows_of + t * K;
      const acc_t* cont = contrib + t * token_stride;
      for (int64_t i = 0; i < count[t]; ++i) {
        acc_t* dst = dkv_acc + row[i] * D;
        const acc_t* src = cont + i * D;
        for (int64_t d = d0; d < d1; ++d) dst[d] += src[d];
      }
    }
  });
}

// bf16 backward: every product a bf16 GEMM (P and dS rounded to bf16, fp32 accumulation).
void bwd_bf16(const c10::BFloat16* q, const c10::BFloat16* kv, const c10::BFloat16* out,
              const c10::BFloat16* dout, const int32_t* indices, const float* lse, float scale,
              int64_t d_v, const float* sink, const int32_t* lens, const SparseMlaSizes& sz,
              c10::BFloat16* dq, c10::BFloat16* dkv) {
  using cpu::kKeyBlock;
  const int64_t T = sz.T, H = sz.H, D = sz.D, K = sz.K, S = sz.S;
  const int64_t Hp = cpu::round_up(H, 2), Kp = cpu::round_up(std::max<int64_t>(K, 1), kKeyBlock);
  std::vector<float> dkv_acc(static_cast<size_t>(S * D), 0.f);
  const int64_t chunk = bwd_chunk(T, Kp * D);
  std::vector<float> contrib(static_cast<size_t>(chunk * Kp * D));
  std::vector<int64_t> rows_of(static_cast<size_t>(chunk * K + 1));
  std::vector<int64_t> count(chunk);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t c1 = std::min(T, c0 + chunk);
    at::parallel_for(c0, c1, 1, [&](int64_t t0, int64_t t1) {
      cpu::BrgemmScope brgemm_scope;
      std::vector<int64_t> slot(K);
      cpu::PackedRows rows;
      cpu::AttendScratch ws;
      std::vector<float> p, dp, dqf(H * D), denom(H), delta(H);
      std::vector<c10::BFloat16> ds_b, pT, dsT, q_vnni(Hp * D), do_vnni(Hp * d_v);
      for (int64_t t = t0; t < t1; ++t) {
        int64_t* row = rows_of.data() + (t - c0) * K;
        const int64_t n = collect_valid(indices + t * K, K, S, lens, t, slot.data(), row);
        count[t - c0] = n;
        c10::BFloat16* dq_t = dq + t * H * D;
        if (n == 0) {
          std::fill(dq_t, dq_t + H * D, c10::BFloat16(0.f));
          continue;
        }
        rows.pack(D, n, [&](int64_t i) { return kv + row[i] * D; });
        const int64_t np = rows.n_pad();
        const c10::BFloat16* q_t = q + t * H * D;
        const c10::BFloat16* do_t = dout + t * H * d_v;
        p.resize(H * np);
        dp.resize(H * np);
        cpu::rows_times_lhs_t(q_t, H, D, D, rows, ws, p.data());
        // dP = dO·Vᵀ: V is the first d_v dims of the rows
        cpu::rows_times_lhs_t(do_t, H, d_v, d_v, rows, ws, dp.data());
        for (int64_t h = 0; h < H; ++h) {
          const float row_lse = lse[t * H + h];
          denom[h] = std::isfinite(row_lse) ? cpu::denominator_log(row_lse, sink, h) : kNegInf;
          float dl = 0.f;
          for (int64_t d = 0; d < d_v; ++d)
            dl += static_cast<float>(out[(t * H + h) * d_v + d]) * static_cast<float>(do_t[h * d_v + d]);
          delta[h] = dl;
          float* pr = p.data() + h * np;
          if (denom[h] == kNegInf) {       // no softmax at this head: P = 0
            std::fill(pr, pr + np, kNegInf);
            continue;
          }
          for (int64_t i = 0; i < n; ++i) pr[i] = scale * pr[i] - denom[h];
          std::fill(pr + n, pr + np, kNegInf);
        }
        cpu::exp_inplace(p.data(), H * np);
        ds_b.resize(H * np);
        pT.resize(np * Hp);
        dsT.resize(np * Hp);
        for (int64_t h = 0; h < H; ++h) {
          const float* pr = p.data() + h * np;
          const float* dpr = dp.data() + h * np;
          for (int64_t i = 0; i < np; ++i) {
            // padding keys: exactly 0 (dO·0 is NaN for an inf/NaN dout, and 0·NaN would spread)
            const c10::BFloat16 ds(i < n ? pr[i] * (dpr[i] - delta[h]) * scale : 0.f);
            ds_b[h * np + i] = ds;
            dsT[i * Hp + h] = ds;
            pT[i * Hp + h] = c10::BFloat16(pr[i]);
          }
        }
        if (Hp != H)
          for (int64_t i = 0; i < np; ++i) dsT[i * Hp + H] = pT[i * Hp + H] = c10::BFloat16(0.f);
        // dq = dS·K
        for (int64_t j = 0; j < rows.blocks; ++j)
          cpu::bf16_gemm(H, D, kKeyBlock, ds_b.data() + j * kKeyBlock, np, rows.vnni_block(j), D,
                         dqf.data(), D, j > 0);
        cpu::to_bf16(dqf.data(), dq_t, H * D);
        // contribution rows: dSᵀ·Q + Pᵀ·dO (into the first d_v dims)
        for (int64_t h = 0; h < H; h += 2) {
          const c10::BFloat16* h1 = h + 1 < H ? q_t + (h + 1) * D : nullptr;
          cpu::vnni_store_row_pair(q_t + h * D, h1, D, q_vnni.data(), D, h / 2);
          const c10::BFloat16* o1 = h + 1 < H ? do_t + (h + 1) * d_v : nullptr;
          cpu::vnni_store_row_pair(do_t + h * d_v, o1, d_v, do_vnni.data(), d_v, h / 2);
        }
        float* cont = contrib.data() + (t - c0) * Kp * D;
        for (int64_t j = 0; j < rows.blocks; ++j) {
          float* c = cont + j * kKeyBlock * D;
          cpu::bf16_gemm(kKeyBlock, D, Hp, dsT.data() + j * kKeyBlock * Hp, Hp, q_vnni.data(), D, c, D, false);
          cpu::bf16_gemm(kKeyBlock, d_v, Hp, pT.data() + j * kKeyBlock * Hp, Hp, do_vnni.data(), d_v, c, D, true);
        }
      }
    });
    reduce_contributions<float>(contrib.data(), Kp * D, rows_of.data(), K, count.data(), c1 - c0, D,
                                dkv_acc.data());
  }
  cpu::to_bf16(dkv_acc.data(), dkv, S * D);
}

// Backward in the accumulation type through at::mm (see fwd_mm).
template <typename scalar_t>
void bwd_mm(const scalar_t* q, const scalar_t* kv, const scalar_t* out, const scalar_t* dout,
            const int32_t* indices, const float* lse, acc_type_t<scalar_t> scale, int64_t d_v,
            const float* sink, const int32_t* lens, const SparseMlaSizes& sz, scalar_t* dq,
            scalar_t* dkv) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t T = sz.T, H = sz.H, D = sz.D, K = sz.K, S = sz.S;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> dkv_acc(static_cast<size_t>(S * D), acc_t(0));
  const int64_t chunk = bwd_chunk(T, K * D);
  std::vector<acc_t> contrib(static_cast<size_t>(std::max<int64_t>(chunk * K * D, 1)));
  std::vector<int64_t> rows_of(static_cast<size_t>(chunk * K + 1));
  std::vector<int64_t> count(chunk);
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t c1 = std::min(T, c0 + chunk);
    at::parallel_for(c0, c1, 1, [&](int64_t t0, int64_t t1) {
      std::vector<int64_t> slot(K);
      std::vector<acc_t> rows, qt(H * D), dot_(H * d_v), p, dp, dqh(H * D);
      for (int64_t t = t0; t < t1; ++t) {
        int64_t* row = rows_of.data() + (t - c0) * K;
        const int64_t n = collect_valid(indices + t * K, K, S, lens, t, slot.data(), row);
        count[t - c0] = n;
        std::fill(dqh.begin(), dqh.end(), acc_t(0));
        if (n > 0) {
          rows.resize(n * D);
          gather_rows(kv, row, n, D, rows.data());
          for (int64_t e = 0; e < H * D; ++e) qt[e] = static_cast<acc_t>(q[t * H * D + e]);
          for (int64_t e = 0; e < H * d_v; ++e) dot_[e] = static_cast<acc_t>(dout[t * H * d_v + e]);
          p.resize(H * n);
          dp.resize(H * n);
          at::Tensor R = view2d(rows.data(), n, D, D), Q = view2d(qt.data(), H, D, D);
          at::Tensor dO = view2d(dot_.data(), H, d_v, d_v);
          at::Tensor P = view2d(p.data(), H, n, n), dP = view2d(dp.data(), H, n, n);
          at::mm_out(P, Q, R.t());
          at::mm_out(dP, dO, R.narrow(1, 0, d_v).t());
          for (int64_t h = 0; h < H; ++h) {
            const int64_t th = t * H + h;
            const acc_t row_lse = static_cast<acc_t>(lse[th]);
            acc_t* pr = p.data() + h * n;
            acc_t* dpr = dp.data() + h * n;
            if (!std::isfinite(row_lse)) {
              std::fill(pr, pr + n, acc_t(0));
              std::fill(dpr, dpr + n, acc_t(0));
              continue;
            }
            const acc_t denom = cpu::denominator_log(row_lse, sink, h);
            acc_t delta = 0;
            for (int64_t d = 0; d < d_v; ++d)
              delta += static_cast<acc_t>(out[th * d_v + d]) * dot_[h * d_v + d];
            for (int64_t i = 0; i < n; ++i) pr[i] = denom == -kNegInf ? kNegInf : scale * pr[i] - denom;
            cpu::exp_inplace(pr, n);
            for (int64_t i = 0; i < n; ++i) dpr[i] = pr[i] * (dpr[i] - delta) * scale;  // dS
          }
          at::Tensor dQ = view2d(dqh.data(), H, D, D);
          at::mm_out(dQ, dP, R);
          at::Tensor C = view2d(contrib.data() + (t - c0) * K * D, n, D, D);
          at::mm_out(C, dP.t(), Q);
          C.narrow(1, 0, d_v).addmm_(P.t(), dO);
        }
        for (int64_t e = 0; e < H * D; ++e) dq[t * H * D + e] = static_cast<scalar_t>(dqh[e]);
      }
    });
    reduce_contributions<acc_t>(contrib.data(), K * D, rows_of.data(), K, count.data(), c1 - c0, D,
                                dkv_acc.data());
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
  if (bf16_brgemm_applies(q.scalar_type(), sz.D, d_v)) {
    fwd_bf16(q.data_ptr<c10::BFloat16>(), kv.data_ptr<c10::BFloat16>(), indices.data_ptr<int32_t>(),
             static_cast<float>(sm_scale), d_v, opt_float_ptr(attn_sink), opt_int_ptr(topk_length), sz,
             out.data_ptr<c10::BFloat16>(), lse.data_ptr<float>());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "sparse_mla_fwd_cpu", [&] {
    fwd_mm<scalar_t>(q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(),
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
  if (bf16_brgemm_applies(q.scalar_type(), sz.D, d_v)) {
    bwd_bf16(q.data_ptr<c10::BFloat16>(), kv.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(),
             dout.data_ptr<c10::BFloat16>(), indices.data_ptr<int32_t>(), lse.data_ptr<float>(),
             static_cast<float>(sm_scale), d_v, opt_float_ptr(attn_sink), opt_int_ptr(topk_length), sz,
             dq.data_ptr<c10::BFloat16>(), dkv.data_ptr<c10::BFloat16>());
    return {dq, dkv};
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "sparse_mla_bwd_cpu", [&] {
    bwd_mm<scalar_t>(q.data_ptr<scalar_t>(), kv.data_ptr<scalar_t>(),
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
