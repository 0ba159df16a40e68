// sparse_mla_decode on the CPU: one task per (batch, query, block of heads).
// Where the CPU has fast bf16 GEMMs (common/cpu_gemm.h), the selected records are dequantised to
// bf16 once per task and attended by the bf16-GEMM core shared with sparse_mla_fwd
// (common/cpu_attention.h). Dequantisation to bf16 is exact for a bf16 cache and for FP8
// records whose tile scales are powers of two (what the FlashMLA quantiser writes); a task that
// selects any other record, or a CPU without fast bf16, takes the fp32 path: records
// dequantised a chunk at a time and attended with an fp32 online softmax.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "common/cpu_attention.h"
#include "common/cpu_gemm.h"
#include "common/fp8_cpu.h"
#include "mla_decode/mla_decode_checks.h"

namespace dsa::mla_decode {
namespace {

constexpr int kHeadsPerTask = 16;   // heads sharing one dequantised chunk of records
constexpr int kTokensPerChunk = 32;

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// The 576 fp32 values of one cache slot (the slot is known to be in range).
void load_record(const uint8_t* cache, bool fp8, int64_t slot, float* dst) {
  if (fp8) {
    const uint8_t* rec = cache + slot * kFp8RecordBytes;
    float scales[kNumTiles];
    std::memcpy(scales, rec + kScaleOffset, sizeof(scales));
    const auto& table = fp8_e4m3_table();
    for (int d = 0; d < kDNope; ++d) dst[d] = table[rec[d]] * scales[d / kTile];
    for (int d = 0; d < kDRope; ++d) {
      uint16_t bits;
      std::memcpy(&bits, rec + kRopeOffset + 2 * d, 2);
      dst[kDNope + d] = bf16_bits_to_float(bits);
    }
  } else {
    const uint8_t* row = cache + slot * kBf16RecordBytes;
    for (int d = 0; d < kDQK; ++d) {
      uint16_t bits;
      std::memcpy(&bits, row + 2 * d, 2);
      dst[d] = bf16_bits_to_float(bits);
    }
  }
}

// q . k over 576 values with 8 independent partial sums, so the compiler can keep them in SIMD
// lanes without reassociating one serial sum.
inline float dot576(const float* q, const float* k) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int d = 0; d < kDQK; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += q[d + j] * k[d + j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

struct DecodeArgs {
  const c10::BFloat16* q;         // [B, s_q, H, 576]
  const uint8_t* cache;
  const int32_t* indices;         // [B, s_q, K]
  const float* attn_sink;         // [H] or null
  const int32_t* topk_length;     // [B] or [B, s_q] or null
  c10::BFloat16* out;             // [B, s_q, H, 512]
  float* lse;                     // [B, s_q, H]
  DecodeShape shape;
  float sm_scale;
};

// Heads [h0, h1) of query (b, s).
void decode_heads(const DecodeArgs& a, int64_t b, int64_t s, int64_t h0, int64_t h1) {
  const auto& sh = a.shape;
  const int nh = static_cast<int>(h1 - h0);
  const int64_t row = b * sh.s_q + s;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  std::vector<float> qf(nh * kDQK), acc(nh * kDV, 0.f), kv(kTokensPerChunk * kDQK),
      scores(nh * kTokensPerChunk), m(nh, neg_inf), l(nh, 0.f);
  for (int h = 0; h < nh; ++h)
    for (int d = 0; d < kDQK; ++d) qf[h * kDQK + d] = static_cast<float>(a.q[(row * sh.heads + h0 + h) * kDQK + d]);

  int64_t len = sh.topk;
  if (a.topk_length) len = std::clamp<int64_t>(a.topk_length[sh.per_query_topk_length ? row : b], 0, sh.topk);
  const int32_t* idx = a.indices + row * sh.topk;
  const int64_t num_slots = sh.num_slots();

  for (int64_t j0 = 0; j0 < len; j0 += kTokensPerChunk) {
    int n = 0;
    for (int64_t j = j0; j < std::min(len, j0 + kTokensPerChunk); ++j) {
      const int64_t slot = idx[j];
      if (slot < 0 || slot >= num_slots) continue;   // invalid entries are skipped, never read
      load_record(a.cache, sh.fp8_cache, slot, kv.data() + n * kDQK);
      ++n;
    }
    if (n == 0) continue;
    for (int h = 0; h < nh; ++h) {
      const float* qh = qf.data() + h * kDQK;
      float* sc = scores.data() + h * kTokensPerChunk;
      float chunk_max = neg_inf;
      for (int t = 0; t < n; ++t) {
        sc[t] = dot576(qh, kv.data() + t * kDQK) * a.sm_scale;
        // NaN-propagating: a NaN score makes out and lse NaN, never an empty row.
        chunk_max = (sc[t] > chunk_max || sc[t] != sc[t]) ? sc[t] : chunk_max;
      }
      const float new_m = chunk_max != chunk_max ? chunk_max : std::max(m[h], chunk_max);
      if (new_m == neg_inf) continue;
      const float alpha = std::exp(m[h] - new_m);   // 0 on the first chunk (m = -inf)
      float* acc_h = acc.data() + h * kDV;
      l[h] *= alpha;
      for (int d = 0; d < kDV; ++d) acc_h[d] *= alpha;
      for (int t = 0; t < n; ++t) {
        const float p = std::exp(sc[t] - new_m);
        l[h] += p;
        const float* vt = kv.data() + t * kDQK;
        for (int d = 0; d < kDV; ++d) acc_h[d] += p * vt[d];
      }
      m[h] = new_m;
    }
  }

  for (int h = 0; h < nh; ++h) {
    const int64_t o = row * sh.heads + h0 + h;
    c10::BFloat16* out_h = a.out + o * kDV;
    if (l[h] == 0.f) {   // no valid entry: out 0, lse -inf (merges correctly by lse weights)
      for (int d = 0; d < kDV; ++d) out_h[d] = c10::BFloat16(0.f);
      a.lse[o] = neg_inf;
      continue;
    }
    // The sink joins the denominator only: exp(sink) relative to the running max.
    const float denom = l[h] + (a.attn_sink ? std::exp(a.attn_sink[h0 + h] - m[h]) : 0.f);
    const float inv = 1.f / denom;
    for (int d = 0; d < kDV; ++d) out_h[d] = c10::BFloat16(acc[h * kDV + d] * inv);
    a.lse[o] = m[h] + std::log(l[h]);
  }
}

// Power of two in a range where fp8 * scale stays an exact bf16 (normal, not overflowing).
inline bool exact_bf16_scale(float s) {
  int e;
  const float m = std::frexp(s, &e);
  return m == 0.5f && e > -100 && e < 100;
}

// The task's valid slots, or false when one of them is an FP8 record whose dequantised values
// are not all exact in bf16.
bool collect_slots(const DecodeArgs& a, int64_t b, int64_t row, std::vector<int64_t>& slots) {
  const auto& sh = a.shape;
  int64_t len = sh.topk;
  if (a.topk_length) len = std::clamp<int64_t>(a.topk_length[sh.per_query_topk_length ? row : b], 0, sh.topk);
  const int32_t* idx = a.indices + row * sh.topk;
  const int64_t num_slots = sh.num_slots();
  slots.clear();
  for (int64_t j = 0; j < len; ++j) {
    const int64_t slot = idx[j];
    if (slot < 0 || slot >= num_slots) continue;   // invalid entries are skipped, never read
    if (sh.fp8_cache) {
      float scales[kNumTiles];
      std::memcpy(scales, a.cache + slot * kFp8RecordBytes + kScaleOffset, sizeof(scales));
      for (float sc : scales)
        if (!exact_bf16_scale(sc)) return false;
    }
    slots.push_back(slot);
  }
  return true;
}

// One cache slot as 576 bf16 values (exact: see collect_slots).
void load_record_bf16(const uint8_t* cache, bool fp8, int64_t slot, c10::BFloat16* dst) {
  if (!fp8) {
    std::memcpy(dst, cache + slot * kBf16RecordBytes, kDQK * sizeof(c10::BFloat16));
    return;
  }
  const uint8_t* rec = cache + slot * kFp8RecordBytes;
  float scales[kNumTiles];
  std::memcpy(scales, rec + kScaleOffset, sizeof(scales));
  for (int tile = 0; tile < kNumTiles; ++tile)
    cpu::fp8_e4m3_to_bf16(rec + tile * kTile, scales[tile], dst + tile * kTile, kTile);
  std::memcpy(dst + kDNope, rec + kRopeOffset, kDRope * sizeof(c10::BFloat16));
}

// Heads [h0, h1) of query (b, s) through the bf16 GEMMs; false (nothing written) when a selected
// record needs the fp32 path.
bool decode_heads_bf16(const DecodeArgs& a, int64_t b, int64_t s, int64_t h0, int64_t h1,
                       std::vector<int64_t>& slots, cpu::PackedRows& rows, cpu::AttendScratch& ws,
                       std::vector<float>& o) {
  const auto& sh = a.shape;
  const int64_t row = b * sh.s_q + s, nh = h1 - h0;
  if (!collect_slots(a, b, row, slots)) return false;
  rows.pack_written(kDQK, static_cast<int64_t>(slots.size()), [&](int64_t i, c10::BFloat16* dst) {
    load_record_bf16(a.cache, sh.fp8_cache, slots[i], dst);
  });
  o.resize(nh * kDV);
  const int64_t first = row * sh.heads + h0;
  cpu::attend_bf16(a.q + first * kDQK, nh, kDQK, rows, kDV, a.sm_scale,
                   a.attn_sink ? a.attn_sink + h0 : nullptr, ws, o.data(), a.lse + first);
  cpu::to_bf16(o.data(), a.out + first * kDV, nh * kDV);
  return true;
}

std::tuple<at::Tensor, at::Tensor> sparse_mla_decode_cpu(
    const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& indices, double sm_scale,
    int64_t d_v, const c10::optional<at::Tensor>& attn_sink,
    const c10::optional<at::Tensor>& topk_length) {
  const DecodeShape sh = check_sparse_mla_decode(q, kv_cache, indices, sm_scale, d_v, attn_sink, topk_length);
  at::Tensor out = at::empty({sh.batch, sh.s_q, sh.heads, kDV}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.s_q, sh.heads}, q.options().dtype(at::kFloat));
  DecodeArgs a{q.const_data_ptr<c10::BFloat16>(),
               static_cast<const uint8_t*>(kv_cache.const_data_ptr()),
               indices.const_data_ptr<int32_t>(),
               attn_sink ? attn_sink->const_data_ptr<float>() : nullptr,
               topk_length ? topk_length->const_data_ptr<int32_t>() : nullptr,
               out.mutable_data_ptr<c10::BFloat16>(), lse.mutable_data_ptr<float>(), sh,
               static_cast<float>(sm_scale)};
  const bool bf16 = cpu::use_bf16_brgemm();
  // bf16 GEMMs serve all heads of a query at once (one gather); split the heads only to give
  // every thread a task. The fp32 path keeps its blocks of kHeadsPerTask.
  const int64_t rows_total = sh.batch * sh.s_q;
  const int64_t threads = at::get_num_threads();
  const int64_t split = bf16 ? std::clamp<int64_t>((threads + rows_total - 1) / std::max<int64_t>(rows_total, 1), 1,
                                                   (sh.heads + 15) / 16)
                             : (sh.heads + kHeadsPerTask - 1) / kHeadsPerTask;
  const int64_t per_task = (sh.heads + split - 1) / split;
  const int64_t head_blocks = (sh.heads + per_task - 1) / per_task;
  const int64_t tasks = rows_total * head_blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::optional<cpu::BrgemmScope> brgemm_scope;
    if (bf16) brgemm_scope.emplace();
    std::vector<int64_t> slots;
    cpu::PackedRows rows;
    cpu::AttendScratch ws;
    std::vector<float> o;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t hb = t % head_blocks, row = t / head_blocks;
      const int64_t h0 = hb * per_task, h1 = std::min(sh.heads, h0 + per_task);
      const int64_t b = row / sh.s_q, s = row % sh.s_q;
      if (bf16 && decode_heads_bf16(a, b, s, h0, h1, slots, rows, ws, o)) continue;
      for (int64_t c0 = h0; c0 < h1; c0 += kHeadsPerTask)
        decode_heads(a, b, s, c0, std::min(h1, c0 + kHeadsPerTask));
    }
  });
  return {out, lse};
}

}  // namespace
}  // namespace dsa::mla_decode

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("sparse_mla_decode", &dsa::mla_decode::sparse_mla_decode_cpu);
}
