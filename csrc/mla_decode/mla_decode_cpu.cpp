// sparse_mla_decode on the CPU: one task per (batch, query, block of heads). Any MLA cache layout
// (cache/mla_layout.h: V3.2 656-byte records or bf16 576 for d_qk 576, V4 584-byte pages or bf16
// 512 for d_qk 512) and, with extra_kv_cache, a second list whose scores join the same softmax.
// Where the CPU has fast bf16 GEMMs (common/cpu_gemm.h), the selected records are dequantised to
// bf16 once per task and attended by the bf16-GEMM core shared with sparse_mla_fwd
// (common/cpu_attention.h). Dequantisation to bf16 is exact for a bf16 cache and for FP8
// records whose tile scales are powers of two (what the FlashMLA quantiser writes); a task that
// selects any other record, or a CPU without fast bf16, takes the fp32 path: records
// dequantised to fp32 rows and the same two GEMMs as at::mm (MKL sgemm).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
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

constexpr int64_t kMinHeadsPerTask = 16;   // heads below which a query's heads are not split

inline float bf16_bits_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// One list of selected slots with the cache it indexes (kv_cache, or extra_kv_cache).
struct Source {
  const uint8_t* cache;
  const int32_t* indices;         // [B, s_q, K]
  const int32_t* topk_length;     // [B] or [B, s_q] or null
  DecodeList list;
};

// A selected token: its source and slot (known to be in range).
struct Pick {
  const Source* src;
  int64_t slot;
};

// Scale of nope tile `t` of an FP8 token: an fp32 (V3.2) or a ue8m0 byte (V4).
inline float tile_scale(const cache::MlaCacheLayout& l, const uint8_t* cache, int64_t slot, int t) {
  const uint8_t* s = cache + l.scale_byte(slot);
  if (l.kind == cache::MlaCacheKind::kV4Fp8) return cache::ue8m0_value(s[t]);
  float v;
  std::memcpy(&v, s + 4 * t, 4);
  return v;
}

// The d_qk fp32 values of one cache token (any layout of cache/mla_layout.h).
void load_record(const Pick& pk, float* dst) {
  const auto& l = pk.src->list.layout;
  const uint8_t* cache = pk.src->cache;
  if (!l.fp8()) {
    const uint8_t* row = cache + l.value_byte(pk.slot);
    for (int d = 0; d < l.dim; ++d) {
      uint16_t bits;
      std::memcpy(&bits, row + 2 * d, 2);
      dst[d] = bf16_bits_to_float(bits);
    }
    return;
  }
  const uint8_t* nope = cache + l.value_byte(pk.slot);
  const auto& table = fp8_e4m3_table();
  const int tile = l.tile(), nope_dim = l.nope();
  for (int t = 0; t < l.num_tiles(); ++t) {
    const float sc = tile_scale(l, cache, pk.slot, t);
    for (int d = t * tile; d < (t + 1) * tile; ++d) dst[d] = table[nope[d]] * sc;
  }
  const uint8_t* rope = cache + l.rope_byte(pk.slot);
  for (int d = 0; d < kDRope; ++d) {
    uint16_t bits;
    std::memcpy(&bits, rope + 2 * d, 2);
    dst[nope_dim + d] = bf16_bits_to_float(bits);
  }
}

struct DecodeArgs {
  const c10::BFloat16* q;         // [B, s_q, H, d_qk]
  Source src[2];                  // kv_cache, then extra_kv_cache (num_sources 1 or 2)
  int num_sources;
  const float* attn_sink;         // [H] or null
  c10::BFloat16* out;             // [B, s_q, H, 512]
  float* lse;                     // [B, s_q, H]
  DecodeShape shape;
  float sm_scale;
};

// Power of two in a range where fp8 * scale stays an exact bf16 (normal, not overflowing).
inline bool exact_bf16_scale(float s) {
  int e;
  const float m = std::frexp(s, &e);
  return m == 0.5f && e > -100 && e < 100;
}

// The valid tokens of query row `row` (batch b) over both lists, window list first (their
// scores join one softmax, so the order only fixes the summation order); with exact_bf16,
// false when one of them is an FP8 token whose dequantised values are not all exact in bf16.
bool collect_slots(const DecodeArgs& a, int64_t b, int64_t row, bool exact_bf16, std::vector<Pick>& picks) {
  picks.clear();
  for (int si = 0; si < a.num_sources; ++si) {
    const Source& src = a.src[si];
    const int64_t K = src.list.topk;
    int64_t len = K;
    if (src.topk_length)
      len = std::clamp<int64_t>(src.topk_length[src.list.per_query_topk_length ? row : b], 0, K);
    const int32_t* idx = src.indices + row * K;
    const auto& l = src.list.layout;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t slot = idx[j];
      if (slot < 0 || slot >= l.num_slots) continue;   // invalid entries are skipped, never read
      if (exact_bf16 && l.fp8()) {
        for (int t = 0; t < l.num_tiles(); ++t)
          if (!exact_bf16_scale(tile_scale(l, src.cache, slot, t))) return false;
      }
      picks.push_back({&src, slot});
    }
  }
  return true;
}

// One cache token as d_qk bf16 values (exact: see collect_slots).
void load_record_bf16(const Pick& pk, c10::BFloat16* dst) {
  const auto& l = pk.src->list.layout;
  const uint8_t* cache = pk.src->cache;
  if (!l.fp8()) {
    std::memcpy(dst, cache + l.value_byte(pk.slot), l.dim * sizeof(c10::BFloat16));
    return;
  }
  const uint8_t* nope = cache + l.value_byte(pk.slot);
  const int tile = l.tile();
  for (int t = 0; t < l.num_tiles(); ++t)
    cpu::fp8_e4m3_to_bf16(nope + t * tile, tile_scale(l, cache, pk.slot, t), dst + t * tile, tile);
  std::memcpy(dst + l.nope(), cache + l.rope_byte(pk.slot), kDRope * sizeof(c10::BFloat16));
}

// Heads [h0, h1) of query (b, s) through the bf16 GEMMs; false (nothing written) when a selected
// record needs the fp32 path.
bool decode_heads_bf16(const DecodeArgs& a, int64_t b, int64_t s, int64_t h0, int64_t h1,
                       std::vector<Pick>& picks, cpu::PackedRows& rows, cpu::AttendScratch& ws,
                       std::vector<float>& o) {
  const auto& sh = a.shape;
  const int64_t row = b * sh.s_q + s, nh = h1 - h0, D = sh.d_qk;
  if (!collect_slots(a, b, row, /*exact_bf16=*/true, picks)) return false;
  rows.pack_written(D, static_cast<int64_t>(picks.size()), [&](int64_t i, c10::BFloat16* dst) {
    load_record_bf16(picks[i], dst);
  });
  o.resize(nh * kDV);
  const int64_t first = row * sh.heads + h0;
  cpu::attend_bf16(a.q + first * D, nh, D, rows, kDV, a.sm_scale,
                   a.attn_sink ? a.attn_sink + h0 : nullptr, ws, o.data(), a.lse + first);
  cpu::to_bf16(o.data(), a.out + first * kDV, nh * kDV);
  return true;
}

// Heads [h0, h1) of query (b, s) in fp32: the selected records dequantised to fp32 rows, the
// scores and P·V as at::mm (MKL sgemm), the exact softmax of cpu_attention.h between them.
void decode_heads_fp32(const DecodeArgs& a, int64_t b, int64_t s, int64_t h0, int64_t h1,
                       std::vector<Pick>& picks, std::vector<float>& rows, std::vector<float>& qf,
                       std::vector<float>& scores, std::vector<float>& o) {
  const auto& sh = a.shape;
  const int64_t row = b * sh.s_q + s, nh = h1 - h0, first = row * sh.heads + h0, D = sh.d_qk;
  collect_slots(a, b, row, /*exact_bf16=*/false, picks);
  const int64_t n = static_cast<int64_t>(picks.size());
  if (n == 0) {   // no valid entry: out 0, lse -inf (merges correctly by lse weights)
    std::fill(a.out + first * kDV, a.out + (first + nh) * kDV, c10::BFloat16(0.f));
    std::fill(a.lse + first, a.lse + first + nh, -std::numeric_limits<float>::infinity());
    return;
  }
  rows.resize(n * D);
  for (int64_t i = 0; i < n; ++i) load_record(picks[i], rows.data() + i * D);
  qf.resize(nh * D);
  for (int64_t e = 0; e < nh * D; ++e) qf[e] = static_cast<float>(a.q[first * D + e]);
  scores.resize(nh * n);
  o.resize(nh * kDV);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor R = at::from_blob(rows.data(), {n, D}, f32);
  at::Tensor S = at::from_blob(scores.data(), {nh, n}, f32);
  at::Tensor O = at::from_blob(o.data(), {nh, kDV}, f32);
  at::mm_out(S, at::from_blob(qf.data(), {nh, D}, f32), R.t());
  cpu::softmax_rows<float>(scores.data(), nh, n, n, a.sm_scale, a.attn_sink ? a.attn_sink + h0 : nullptr,
                           a.lse + first);
  at::mm_out(O, S, R.narrow(1, 0, kDV));   // V: the first 512 values (the whole row at d_qk 512)
  cpu::to_bf16(o.data(), a.out + first * kDV, nh * kDV);
}

const uint8_t* cache_bytes(const at::Tensor& c) { return static_cast<const uint8_t*>(c.const_data_ptr()); }

std::tuple<at::Tensor, at::Tensor> sparse_mla_decode_cpu(
    const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& indices, double sm_scale,
    int64_t d_v, const c10::optional<at::Tensor>& attn_sink,
    const c10::optional<at::Tensor>& topk_length, const c10::optional<at::Tensor>& extra_kv_cache,
    const c10::optional<at::Tensor>& extra_indices, const c10::optional<at::Tensor>& extra_topk_length) {
  const DecodeShape sh = check_sparse_mla_decode(q, kv_cache, indices, sm_scale, d_v, attn_sink, topk_length,
                                                 extra_kv_cache, extra_indices, extra_topk_length);
  at::Tensor out = at::empty({sh.batch, sh.s_q, sh.heads, kDV}, q.options());
  at::Tensor lse = at::empty({sh.batch, sh.s_q, sh.heads}, q.options().dtype(at::kFloat));
  DecodeArgs a{};
  a.q = q.const_data_ptr<c10::BFloat16>();
  a.src[0] = {cache_bytes(kv_cache), indices.const_data_ptr<int32_t>(),
              topk_length ? topk_length->const_data_ptr<int32_t>() : nullptr, sh.main};
  a.num_sources = 1;
  if (sh.has_extra) {
    a.src[1] = {cache_bytes(*extra_kv_cache), extra_indices->const_data_ptr<int32_t>(),
                extra_topk_length ? extra_topk_length->const_data_ptr<int32_t>() : nullptr, sh.extra};
    a.num_sources = 2;
  }
  a.attn_sink = attn_sink ? attn_sink->const_data_ptr<float>() : nullptr;
  a.out = out.mutable_data_ptr<c10::BFloat16>();
  a.lse = lse.mutable_data_ptr<float>();
  a.shape = sh;
  a.sm_scale = static_cast<float>(sm_scale);
  const bool bf16 = cpu::use_bf16_brgemm();
  // The GEMMs serve all heads of a query at once (one gather); split the heads only to give
  // every thread a task.
  const int64_t rows_total = sh.batch * sh.s_q;
  const int64_t threads = at::get_num_threads();
  const int64_t split = std::clamp<int64_t>((threads + rows_total - 1) / std::max<int64_t>(rows_total, 1), 1,
                                            (sh.heads + kMinHeadsPerTask - 1) / kMinHeadsPerTask);
  const int64_t per_task = (sh.heads + split - 1) / split;
  const int64_t head_blocks = per_task > 0 ? (sh.heads + per_task - 1) / per_task : 0;
  const int64_t tasks = rows_total * head_blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::optional<cpu::BrgemmScope> brgemm_scope;
    if (bf16) brgemm_scope.emplace();
    std::vector<Pick> picks;
    cpu::PackedRows rows;
    cpu::AttendScratch ws;
    std::vector<float> o, rows32, qf, scores;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t hb = t % head_blocks, row = t / head_blocks;
      const int64_t h0 = hb * per_task, h1 = std::min(sh.heads, h0 + per_task);
      const int64_t b = row / sh.s_q, s = row % sh.s_q;
      if (bf16 && decode_heads_bf16(a, b, s, h0, h1, picks, rows, ws, o)) continue;
      decode_heads_fp32(a, b, s, h0, h1, picks, rows32, qf, scores, o);
    }
  });
  return {out, lse};
}

}  // namespace
}  // namespace dsa::mla_decode

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("sparse_mla_decode", &dsa::mla_decode::sparse_mla_decode_cpu);
}
