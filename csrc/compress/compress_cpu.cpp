// v4_compress, CPU kernel (SPEC 10.4). Two passes: the pooled entries [E, d] in fp32 by
// at::parallel_for over (entry, block of channels), each block a two-pass softmax (max, then
// sum) over the pool rows with the channels innermost (contiguous loads); then per entry the
// bf16 rounding, RMSNorm and rope, which need the whole entry.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

struct Entry {
  int64_t first_token;  // global index of the window's first token
  int64_t window;       // j, the window's index in its sequence
};

// One pool row: the token's kv and score at the row's channel offset, and its ape row.
struct PoolRows {
  const float* kv;
  const float* score;
  const float* ape;
  int64_t width, d, c, ratio;

  // Calls fn(kv_row, score_row, ape_row) for every row of entry e's pool, each pointer at
  // channel 0 of the channels this pool reads for it.
  template <typename Fn>
  void for_each(const Entry& e, Fn&& fn) const {
    const int64_t cur_offset = c == 2 ? d : 0;
    if (c == 2 && e.window > 0)
      for (int64_t r = 0; r < ratio; ++r) {
        const int64_t t = e.first_token - ratio + r;
        fn(kv + t * width, score + t * width, ape + r * width);
      }
    for (int64_t r = 0; r < ratio; ++r) {
      const int64_t t = e.first_token + r;
      fn(kv + t * width + cur_offset, score + t * width + cur_offset, ape + r * width + cur_offset);
    }
  }
};

void pool_entries(const PoolRows& pool, const std::vector<Entry>& entries, float* pooled) {
  const int64_t d = pool.d, blocks = (d + kChannelBlock - 1) / kChannelBlock;
  const int64_t n = static_cast<int64_t>(entries.size());
  at::parallel_for(0, n * blocks, 4, [&](int64_t begin, int64_t end) {
    float m[kChannelBlock], s[kChannelBlock], acc[kChannelBlock];
    for (int64_t task = begin; task < end; ++task) {
      const Entry& e = entries[task / blocks];
      const int64_t c0 = (task % blocks) * kChannelBlock, nc = std::min(kChannelBlock, d - c0);
      std::fill(m, m + nc, -INFINITY);
      std::fill(s, s + nc, 0.f);
      std::fill(acc, acc + nc, 0.f);
      pool.for_each(e, [&](const float*, const float* sc, const float* ap) {
        for (int64_t i = 0; i < nc; ++i) m[i] = std::fmax(m[i], sc[c0 + i] + ap[c0 + i]);
      });
      pool.for_each(e, [&](const float* kv, const float* sc, const float* ap) {
        for (int64_t i = 0; i < nc; ++i) {
          const float p = std::exp(sc[c0 + i] + ap[c0 + i] - m[i]);
          s[i] += p;
          acc[i] += p * kv[c0 + i];
        }
      });
      float* out = pooled + (task / blocks) * d + c0;
      for (int64_t i = 0; i < nc; ++i) out[i] = acc[i] / s[i];
    }
  });
}

void norm_and_rope(const float* pooled, const std::vector<Entry>& entries, const float* w,
                   float eps, const float* cos_t, const float* sin_t, int64_t d, int64_t ratio,
                   at::BFloat16* out) {
  const int64_t n = static_cast<int64_t>(entries.size()), half = kCompressRopeDims / 2;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> y(d);
    for (int64_t i = begin; i < end; ++i) {
      const float* e = pooled + i * d;
      float sq = 0.f;
      for (int64_t ch = 0; ch < d; ++ch) {
        y[ch] = round_bf16(e[ch]);
        sq += y[ch] * y[ch];
      }
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + eps);
      for (int64_t ch = 0; ch < d; ++ch) y[ch] = round_bf16(y[ch] * inv * w[ch]);
      const int64_t pos = entries[i].window * ratio;
      for (int64_t p = 0; p < half; ++p) {
        const int64_t ch = d - kCompressRopeDims + 2 * p;
        const float c = cos_t[pos * half + p], s = sin_t[pos * half + p];
        const float x0 = y[ch], x1 = y[ch + 1];
        y[ch] = x0 * c - x1 * s;
        y[ch + 1] = x0 * s + x1 * c;
      }
      for (int64_t ch = 0; ch < d; ++ch) out[i * d + ch] = at::BFloat16(y[ch]);
    }
  });
}

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
  const PoolRows pool{kv.data_ptr<float>(), score.data_ptr<float>(), ape.data_ptr<float>(),
                      s.c * s.d, s.d, s.c, s.ratio};
  pool_entries(pool, entries, pooled.data());
  norm_and_rope(pooled.data(), entries, norm_weight.data_ptr<float>(), static_cast<float>(eps),
                rope_cos.data_ptr<float>(), rope_sin.data_ptr<float>(), s.d, s.ratio,
                out.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) { m.impl("v4_compress", &dsa::v4_compress_cpu); }
