// v4_compress and v4_compress_step, CPU kernels (SPEC 10.4). Pooling is a two-pass softmax
// (max, then sum) per channel over an entry's pool rows with the channels innermost
// (contiguous loads), done by at::parallel_for over (entry, block of channels) in the bulk op;
// then per entry the bf16 rounding, RMSNorm and rope, which need the whole entry. The step op
// runs the same two functions over its ring-buffer rows, so a sequence's entries come out with
// the same bits either way.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "compress/compress_checks.h"

namespace dsa {
namespace {

constexpr int64_t kChannelBlock = 64;

float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

// One pool row at channel 0 of the channels the pool reads from it: its kv and its gate
// logits, which are score + ape (bulk: ape != nullptr) or already z (the step's stored rows).
struct PoolRow {
  const float* kv;
  const float* score;
  const float* ape;
};

// The pooled value of channels [c0, c0 + nc) over rows[0, n) into out.
void pool_channels(const PoolRow* rows, int64_t n, int64_t c0, int64_t nc, float* out) {
  float m[kChannelBlock], s[kChannelBlock], acc[kChannelBlock];
  std::fill(m, m + nc, -INFINITY);
  std::fill(s, s + nc, 0.f);
  std::fill(acc, acc + nc, 0.f);
  auto z = [&](const PoolRow& row, int64_t i) {
    return row.ape ? row.score[c0 + i] + row.ape[c0 + i] : row.score[c0 + i];
  };
  for (int64_t k = 0; k < n; ++k)
    for (int64_t i = 0; i < nc; ++i) m[i] = std::fmax(m[i], z(rows[k], i));
  for (int64_t k = 0; k < n; ++k)
    for (int64_t i = 0; i < nc; ++i) {
      const float p = std::exp(z(rows[k], i) - m[i]);
      s[i] += p;
      acc[i] += p * rows[k].kv[c0 + i];
    }
  for (int64_t i = 0; i < nc; ++i) out[i] = acc[i] / s[i];
}

struct EntryTail {
  const float* w;
  float eps;
  const float* cos_t;
  const float* sin_t;
  int64_t d, ratio;

  // Rounds the pooled entry of window j to bf16, RMSNorms, ropes at position j * ratio.
  void finish(const float* pooled, int64_t window, float* y, at::BFloat16* out) const {
    const int64_t half = kCompressRopeDims / 2;
    float sq = 0.f;
    for (int64_t ch = 0; ch < d; ++ch) {
      y[ch] = round_bf16(pooled[ch]);
      sq += y[ch] * y[ch];
    }
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + eps);
    for (int64_t ch = 0; ch < d; ++ch) y[ch] = round_bf16(y[ch] * inv * w[ch]);
    const int64_t pos = window * ratio;
    for (int64_t p = 0; p < half; ++p) {
      const int64_t ch = d - kCompressRopeDims + 2 * p;
      const float c = cos_t[pos * half + p], s = sin_t[pos * half + p];
      const float x0 = y[ch], x1 = y[ch + 1];
      y[ch] = x0 * c - x1 * s;
      y[ch + 1] = x0 * s + x1 * c;
    }
    for (int64_t ch = 0; ch < d; ++ch) out[ch] = at::BFloat16(y[ch]);
  }
};

EntryTail entry_tail(const at::Tensor& norm_weight, double eps, const at::Tensor& rope_cos,
                     const at::Tensor& rope_sin, const CompressShape& s) {
  return {norm_weight.data_ptr<float>(), static_cast<float>(eps), rope_cos.data_ptr<float>(),
          rope_sin.data_ptr<float>(), s.d, s.ratio};
}

// The pool rows of window j whose first token is row `first` of kv / score (bulk layout).
int64_t bulk_rows(const float* kv, const float* score, const float* ape, const CompressShape& s,
                  int64_t first, int64_t window, PoolRow* rows) {
  const int64_t width = s.c * s.d, cur = s.c == 2 ? s.d : 0;
  int64_t n = 0;
  if (s.c == 2 && window > 0)
    for (int64_t r = 0; r < s.ratio; ++r) {
      const int64_t t = first - s.ratio + r;
      rows[n++] = {kv + t * width, score + t * width, ape + r * width};
    }
  for (int64_t r = 0; r < s.ratio; ++r) {
    const int64_t t = first + r;
    rows[n++] = {kv + t * width + cur, score + t * width + cur, ape + r * width + cur};
  }
  return n;
}

struct Entry {
  int64_t first_token;  // global index of the window's first token
  int64_t window;       // j, the window's index in its sequence
};

at::Tensor v4_compress_cpu(const at::Tensor& kv, const at::Tensor& score, const at::Tensor& ape,
                           const at::Tensor& norm_weight, double eps, const at::Tensor& rope_cos,
                           const at::Tensor& rope_sin, const c10::optional<at::Tensor>& cu_seqlens) {
  const CompressShape s =
      check_v4_compress(kv, score, ape, norm_weight, eps, rope_cos, rope_sin, cu_seqlens);
  std::vector<int32_t> bounds{0, static_cast<int32_t>(s.tokens)};
  if (cu_seqlens.has_value()) {
    const int32_t* cu = cu_seqlens->data_ptr<int32_t>();
    bounds.assign(cu, cu + cu_seqlens->size(0));
  } else {
    TORCH_CHECK_VALUE(s.tokens <= INT32_MAX, "kv.size(0) must fit int32, got ", s.tokens);
  }
  const int64_t batch = static_cast<int64_t>(bounds.size()) - 1;
  check_compress_rope_rows(check_compress_lengths(bounds.data(), batch, s), s);
  std::vector<Entry> entries;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < (bounds[b + 1] - bounds[b]) / s.ratio; ++j)
      entries.push_back({bounds[b] + j * s.ratio, j});
  const int64_t n = static_cast<int64_t>(entries.size());
  auto out = at::empty({n, s.d}, kv.options().dtype(at::kBFloat16));
  if (n == 0) return out;

  std::vector<float> pooled(n * s.d);
  const float *kv_p = kv.data_ptr<float>(), *sc_p = score.data_ptr<float>(), *ape_p = ape.data_ptr<float>();
  const int64_t blocks = (s.d + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, n * blocks, 4, [&](int64_t begin, int64_t end) {
    std::vector<PoolRow> rows(2 * s.ratio);
    for (int64_t task = begin; task < end; ++task) {
      const Entry& e = entries[task / blocks];
      const int64_t c0 = (task % blocks) * kChannelBlock;
      const int64_t nr = bulk_rows(kv_p, sc_p, ape_p, s, e.first_token, e.window, rows.data());
      pool_channels(rows.data(), nr, c0, std::min(kChannelBlock, s.d - c0),
                    pooled.data() + (task / blocks) * s.d + c0);
    }
  });
  const EntryTail tail = entry_tail(norm_weight, eps, rope_cos, rope_sin, s);
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> y(s.d);
    for (int64_t i = begin; i < end; ++i)
      tail.finish(pooled.data() + i * s.d, entries[i].window, y.data(), o + i * s.d);
  });
  return out;
}

at::Tensor v4_compress_step_cpu(const at::Tensor& kv, const at::Tensor& score,
                                const at::Tensor& ape, const at::Tensor& norm_weight, double eps,
                                const at::Tensor& rope_cos, const at::Tensor& rope_sin,
                                const at::Tensor& positions, at::Tensor& kv_state,
                                at::Tensor& score_state) {
  const CompressShape s = check_v4_compress_step(kv, score, ape, norm_weight, eps, rope_cos,
                                                 rope_sin, positions, kv_state, score_state);
  const int64_t batch = s.tokens, width = s.c * s.d, ring = s.c * s.ratio;
  const int32_t* pos = positions.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b)
    if (pos[b] >= 0 && (pos[b] + 1) % s.ratio == 0) check_compress_rope_rows(pos[b] / s.ratio + 1, s);
  auto out = at::zeros({batch, s.d}, kv.options().dtype(at::kBFloat16));
  const float *kv_p = kv.data_ptr<float>(), *sc_p = score.data_ptr<float>(), *ape_p = ape.data_ptr<float>();
  float *kv_st = kv_state.data_ptr<float>(), *z_st = score_state.data_ptr<float>();
  const EntryTail tail = entry_tail(norm_weight, eps, rope_cos, rope_sin, s);
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<PoolRow> rows(2 * s.ratio);
    std::vector<float> pooled(s.d), y(s.d);
    for (int64_t b = begin; b < end; ++b) {
      if (pos[b] < 0) continue;
      const int64_t p = pos[b];
      float* kv_row = kv_st + (b * ring + p % ring) * width;
      float* z_row = z_st + (b * ring + p % ring) * width;
      const float* a = ape_p + (p % s.ratio) * width;
      for (int64_t ch = 0; ch < width; ++ch) {
        kv_row[ch] = kv_p[b * width + ch];
        z_row[ch] = sc_p[b * width + ch] + a[ch];
      }
      if ((p + 1) % s.ratio != 0) continue;
      const int64_t window = p / s.ratio;
      int64_t nr = 0;
      for (int64_t half = (s.c == 2 && window > 0) ? 0 : 1; half < 2; ++half)
        for (int64_t r = 0; r < s.ratio; ++r) {
          const int64_t slot = b * ring + ((window - 1 + half) * s.ratio + r) % ring;
          const int64_t offset = (half == 1 && s.c == 2) ? s.d : 0;
          rows[nr++] = {kv_st + slot * width + offset, z_st + slot * width + offset, nullptr};
        }
      for (int64_t c0 = 0; c0 < s.d; c0 += kChannelBlock)
        pool_channels(rows.data(), nr, c0, std::min(kChannelBlock, s.d - c0), pooled.data() + c0);
      tail.finish(pooled.data(), window, y.data(), o + b * s.d);
    }
  });
  return out;
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("v4_compress", &dsa::v4_compress_cpu);
  m.impl("v4_compress_step", &dsa::v4_compress_step_cpu);
}
