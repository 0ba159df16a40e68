// indexer family: CPU kernels.
//   I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h, :] . k[s, :])
// FP8 operands are decoded once through a 256-entry table (exact: every e4m3 value is an fp32),
// dot products and the head sum accumulate in fp32. Outside a row's range the CPU kernels write
// -inf whether or not clean_logits is set (the contract leaves those entries unspecified when
// it is not; -inf is the cheap deterministic choice).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <vector>

#include "common/fp8_cpu.h"
#include "indexer/indexer_checks.h"
#include "indexer/indexer_rules.h"

namespace dsa {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline void decode_fp8(const uint8_t* src, float* dst, int64_t n, const std::array<float, 256>& lut) {
  for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
}

// sum_h w[h] * relu(q[h, :] . k), q decoded [H, D] row-major.
inline float weighted_relu_sum(const float* q, const float* w, const float* k, int64_t H,
                               int64_t D) {
  float acc = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * D;
    // 8 independent partial sums: a form the compiler vectorises without reassociating.
    float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int l = 0; l < 8; ++l) part[l] += qh[d + l] * k[d + l];
    float dot = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    for (; d < D; ++d) dot += qh[d] * k[d];
    acc += w[h] * (dot > 0.f ? dot : 0.f);
  }
  return acc;
}

// weighted_relu_sum for 4 consecutive decoded keys k[4][D]: every q element loaded once feeds
// 4 dot products (the loop is load-bound otherwise). Same summation order per key as above.
inline void weighted_relu_sum4(const float* q, const float* w, const float* k, int64_t H,
                               int64_t D, float* out4) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * D;
    float part[4][8] = {};
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
      for (int l = 0; l < 8; ++l) {
        const float qv = qh[d + l];
        for (int j = 0; j < 4; ++j) part[j][l] += qv * k[j * D + d + l];
      }
    for (int j = 0; j < 4; ++j) {
      const float* p = part[j];
      float dot = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
      for (int64_t e = d; e < D; ++e) dot += qh[e] * k[j * D + e];
      acc[j] += w[h] * (dot > 0.f ? dot : 0.f);
    }
  }
  for (int j = 0; j < 4; ++j) out4[j] = acc[j];
}

at::Tensor indexer_logits_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                              const at::Tensor& weights, const at::Tensor& ks,
                              const at::Tensor& ke, bool clean_logits) {
  (void)clean_logits;  // -inf outside the range either way (see the file comment)
  const auto shape = check_indexer_logits_inputs(q, k, k_scale, weights, ks, ke);
  const int64_t T = shape.T, H = shape.H, D = shape.D, S = shape.S;
  at::Tensor out = at::empty({T, S}, q.options().dtype(at::kFloat));
  if (T == 0 || S == 0) return out;
  const auto& lut = fp8_e4m3_table();

  // Decode all keys once: S*D floats, reused by every row.
  std::vector<float> k_dec(static_cast<size_t>(S * D));
  const uint8_t* k_bytes = reinterpret_cast<const uint8_t*>(k.data_ptr());
  at::parallel_for(0, S, 256, [&](int64_t s0, int64_t s1) {
    decode_fp8(k_bytes + s0 * D, k_dec.data() + s0 * D, (s1 - s0) * D, lut);
  });

  const uint8_t* q_bytes = reinterpret_cast<const uint8_t*>(q.data_ptr());
  const float* w_ptr = weights.data_ptr<float>();
  const float* scale_ptr = k_scale.data_ptr<float>();
  const int32_t* ks_ptr = ks.data_ptr<int32_t>();
  const int32_t* ke_ptr = ke.data_ptr<int32_t>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q_dec(static_cast<size_t>(H * D));
    for (int64_t t = t0; t < t1; ++t) {
      float* row = out_ptr + t * S;
      const auto range = indexer::clamped_key_range(ks_ptr[t], ke_ptr[t], S);
      for (int64_t s = 0; s < range.lo; ++s) row[s] = kNegInf;
      for (int64_t s = range.hi; s < S; ++s) row[s] = kNegInf;
      if (range.lo == range.hi) continue;
      decode_fp8(q_bytes + t * H * D, q_dec.data(), H * D, lut);
      const float* w = w_ptr + t * H;
      int64_t s = range.lo;
      for (float sums[4]; s + 4 <= range.hi; s += 4) {
        weighted_relu_sum4(q_dec.data(), w, k_dec.data() + s * D, H, D, sums);
        for (int j = 0; j < 4; ++j) row[s + j] = scale_ptr[s + j] * sums[j];
      }
      for (; s < range.hi; ++s)
        row[s] = scale_ptr[s] * weighted_relu_sum(q_dec.data(), w, k_dec.data() + s * D, H, D);
    }
  });
  return out;
}

at::Tensor paged_indexer_logits_cpu(const at::Tensor& q, const at::Tensor& kv_cache,
                                    const at::Tensor& weights, const at::Tensor& context_lens,
                                    const at::Tensor& block_table, int64_t max_context_len,
                                    bool clean_logits) {
  (void)clean_logits;  // -inf outside the visible range either way (see the file comment)
  const auto sh = check_paged_indexer_logits_inputs(q, kv_cache, weights, context_lens,
                                                    block_table, max_context_len);
  const int64_t B = sh.B, N = sh.N, H = sh.H, D = sh.D, P = sh.max_context_len;
  const int64_t bs = sh.block_size;
  at::Tensor out = at::empty({B * N, P}, q.options().dtype(at::kFloat));
  if (B == 0 || P == 0) return out;
  const auto& lut = fp8_e4m3_table();

  std::vector<float> q_dec(static_cast<size_t>(B * N * H * D));
  decode_fp8(reinterpret_cast<const uint8_t*>(q.data_ptr()), q_dec.data(), B * N * H * D, lut);
  const uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  const float* w_ptr = weights.data_ptr<float>();
  const int32_t* cl_ptr = context_lens.data_ptr<int32_t>();
  const int32_t* bt_ptr = block_table.data_ptr<int32_t>();
  float* out_ptr = out.data_ptr<float>();

  // Work item = (sequence b, a tile of positions): every cached token is decoded once and
  // scored for all N queries of its sequence; tiles keep long single sequences parallel.
  constexpr int64_t kTile = 64;
  const int64_t tiles_per_seq = (P + kTile - 1) / kTile;
  at::parallel_for(0, B * tiles_per_seq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> k_tile(static_cast<size_t>(kTile * D));   // decoded keys of the tile
    std::vector<float> scale(static_cast<size_t>(kTile));
    std::vector<char> readable(static_cast<size_t>(kTile));
    std::vector<int64_t> lens(static_cast<size_t>(N));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / tiles_per_seq;
      const int64_t p0 = (item % tiles_per_seq) * kTile, p1 = std::min(P, p0 + kTile);
      int64_t longest = 0;
      for (int64_t j = 0; j < N; ++j) {
        lens[j] = indexer::visible_length(cl_ptr, sh.per_query_lens, b, j, N, P);
        longest = std::max(longest, lens[j]);
        float* row = out_ptr + (b * N + j) * P;
        for (int64_t p = std::max(p0, lens[j]); p < p1; ++p) row[p] = kNegInf;
      }
      const int64_t p_end = std::min(p1, longest);
      const int32_t* bt_row = bt_ptr + b * sh.block_table_stride;
      for (int64_t p = p0; p < p_end; ++p) {
        const int64_t i = p - p0;
        const int64_t blk = indexer::physical_block(bt_row, p / bs, sh.max_blocks, sh.num_blocks);
        readable[i] = blk >= 0;
        if (blk >= 0) {
          decode_fp8(cache + indexer::k_value_offset(blk, p % bs, bs, D), k_tile.data() + i * D, D, lut);
          std::memcpy(&scale[i], cache + indexer::k_scale_offset(blk, p % bs, bs, D), sizeof(float));
        } else {
          std::fill_n(k_tile.data() + i * D, D, 0.f);   // scored, then overwritten with -inf
        }
      }
      for (int64_t j = 0; j < N; ++j) {
        const int64_t r = b * N + j;
        const float* qr = q_dec.data() + r * H * D;
        const float* wr = w_ptr + r * H;
        float* row = out_ptr + r * P;
        const int64_t end = std::min(p_end, lens[j]);
        int64_t p = p0;
        for (float sums[4]; p + 4 <= end; p += 4) {
          weighted_relu_sum4(qr, wr, k_tile.data() + (p - p0) * D, H, D, sums);
          for (int e = 0; e < 4; ++e) row[p + e] = sums[e];
        }
        for (; p < end; ++p) row[p] = weighted_relu_sum(qr, wr, k_tile.data() + (p - p0) * D, H, D);
        for (p = p0; p < end; ++p) row[p] = readable[p - p0] ? row[p] * scale[p - p0] : kNegInf;
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("indexer_logits", &dsa::indexer_logits_cpu);
  m.impl("paged_indexer_logits", &dsa::paged_indexer_logits_cpu);
}
