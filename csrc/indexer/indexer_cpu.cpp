// indexer family: CPU kernels.
//   I[t, s] = k_scale[s] * sum_h w[t, h] * relu(q[t, h, :] . k[s, :])
// The q·k products are GEMM tiles: a block of query rows (tokens x heads) against a tile of keys,
// then the ReLU and weighted head sum over the tile in fp32. Where the CPU has fast bf16 GEMMs
// (common/cpu_gemm.h) the FP8 operands are decoded to bf16, which is exact (every e4m3 value is
// a bf16) and so is every product in the fp32 accumulation; elsewhere they are decoded to fp32
// and the tiles are sgemm through at::mm. Outside a row's range the CPU kernels write -inf
// whether or not clean_logits is set (the contract leaves those entries unspecified when it is
// not; -inf is the cheap deterministic choice).
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
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/fp8_cpu.h"
#include "indexer/indexer_checks.h"
#include "indexer/indexer_rules.h"
#include "indexer/mxfp4.h"
#include "indexer/mxfp4_checks.h"

namespace dsa {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query rows per GEMM tile: whole tokens, about 128 rows (tokens x heads).
inline int64_t tokens_per_tile(int64_t H) { return std::max<int64_t>(1, 128 / std::max<int64_t>(H, 1)); }

// FP8 bytes decoded as bf16 (brgemm path) or fp32 (at::mm path), and the key tile GEMM.
struct TileGemm {
  bool bf16;
  int64_t D, key_tile;

  explicit TileGemm(int64_t D_)
      : bf16(D_ % 2 == 0 && cpu::use_bf16_brgemm()), D(D_), key_tile(bf16 ? 64 : 256) {}

  // Elements (of the decoded type) one key tile occupies.
  int64_t tile_elems() const { return key_tile * D; }
  size_t elem_bytes() const { return bf16 ? 2 : 4; }

  // Decode n row-major FP8 rows into A-operand rows (row-major, D per row).
  void decode_rows(const uint8_t* src, int64_t n, void* dst) const {
    if (bf16)
      cpu::fp8_e4m3_to_bf16(src, 1.f, static_cast<c10::BFloat16*>(dst), n * D);
    else
      cpu::fp8_e4m3_to_float(src, 1.f, static_cast<float*>(dst), n * D);
  }

  // Key `col` of a tile (the B operand): bf16 VNNI columns, or fp32 rows [key_tile, D].
  void store_key(const uint8_t* src, void* tile, int64_t col) const {
    if (bf16) {
      const auto& lut = cpu::fp8_e4m3_bf16_table();
      uint32_t* dst = static_cast<uint32_t*>(tile);
      for (int64_t i = 0; i < D / 2; ++i)
        dst[i * key_tile + col] = uint32_t(lut[src[2 * i]].x) | (uint32_t(lut[src[2 * i + 1]].x) << 16);
    } else {
      const auto& lut = fp8_e4m3_table();
      float* dst = static_cast<float*>(tile) + col * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = lut[src[d]];
    }
  }
  // The same from D decoded fp32 values (MXFP4 keys: every value e2m1 * 2^e is exact in bf16).
  void store_key_values(const float* v, void* tile, int64_t col) const {
    if (bf16) {
      uint32_t* dst = static_cast<uint32_t*>(tile);
      for (int64_t i = 0; i < D / 2; ++i)
        dst[i * key_tile + col] = uint32_t(c10::BFloat16(v[2 * i]).x) | (uint32_t(c10::BFloat16(v[2 * i + 1]).x) << 16);
    } else {
      std::memcpy(static_cast<float*>(tile) + col * D, v, static_cast<size_t>(D) * sizeof(float));
    }
  }
  // Row `r` of decoded A-operand rows from D fp32 values.
  void store_row_values(const float* v, void* rows, int64_t r) const {
    if (bf16) {
      c10::BFloat16* dst = static_cast<c10::BFloat16*>(rows) + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = c10::BFloat16(v[d]);
    } else {
      std::memcpy(static_cast<float*>(rows) + r * D, v, static_cast<size_t>(D) * sizeof(float));
    }
  }
  void zero_key(void* tile, int64_t col) const {
    if (bf16) {
      uint32_t* dst = static_cast<uint32_t*>(tile);
      for (int64_t i = 0; i < D / 2; ++i) dst[i * key_tile + col] = 0;
    } else {
      std::fill_n(static_cast<float*>(tile) + col * D, D, 0.f);
    }
  }

  // Queries as the B operand of keys · Qᵀ (paged): bf16 VNNI [D/2][R][2], or fp32 rows [R, D].
  void store_queries_t(const void* rows, int64_t R, void* dst) const {
    if (bf16)
      cpu::vnni_store_transposed(static_cast<const c10::BFloat16*>(rows), R, D, D,
                                 static_cast<c10::BFloat16*>(dst));
    else
      std::memcpy(dst, rows, static_cast<size_t>(R * D) * sizeof(float));
  }

  // C [M, R] (fp32, row-major) = keys [M, D] (decoded rows) · Qᵀ (store_queries_t of R rows).
  void keys_times_queries(const void* keys, int64_t M, const void* q_t, int64_t R, float* C) const {
    if (bf16) {
      cpu::bf16_gemm(M, R, D, static_cast<const c10::BFloat16*>(keys), D,
                     static_cast<const c10::BFloat16*>(q_t), R, C, R, false);
    } else {
      auto f = at::TensorOptions().dtype(at::kFloat);
      at::Tensor c = at::from_blob(C, {M, R}, f);
      at::mm_out(c, at::from_blob(const_cast<void*>(keys), {M, D}, f),
                 at::from_blob(const_cast<void*>(q_t), {R, D}, f).t());
    }
  }

  // C [M, key_tile] (fp32, row-major) = A [M, D] · tileᵀ.
  void scores(const void* A, int64_t M, const void* tile, float* C) const {
    if (bf16) {
      cpu::bf16_gemm(M, key_tile, D, static_cast<const c10::BFloat16*>(A), D,
                     static_cast<const c10::BFloat16*>(tile), key_tile, C, key_tile, false);
    } else {
      auto f = at::TensorOptions().dtype(at::kFloat);
      at::Tensor c = at::from_blob(C, {M, key_tile}, f);
      at::mm_out(c, at::from_blob(const_cast<void*>(A), {M, D}, f),
                 at::from_blob(const_cast<void*>(tile), {key_tile, D}, f).t());
    }
  }
};

// One MXFP4 key (mxfp4.h) dequantised: out[32 g + j] = e2m1(code) * 2^(scale byte g - 127).
inline void mxfp4_decode_key(const uint8_t* packed, const uint8_t* scales, int64_t D, float* out) {
  static const std::array<float, 16> lut = [] {
    std::array<float, 16> t{};
    for (uint32_t c = 0; c < 16; ++c) t[c] = mxfp4::e2m1_value(c);
    return t;
  }();
  for (int64_t g = 0; g < D / mxfp4::kGroup; ++g) {
    const float sc = mxfp4::scale_value(scales[g]);
    for (int64_t i = 0; i < mxfp4::kGroup / 2; ++i) {
      const uint8_t b = packed[g * (mxfp4::kGroup / 2) + i];
      out[g * mxfp4::kGroup + 2 * i] = lut[b & 15] * sc;
      out[g * mxfp4::kGroup + 2 * i + 1] = lut[b >> 4] * sc;
    }
  }
}

// out[s] = sum_h w[h] * relu(C[h, s]) for s in [s0, s1) of a tile whose rows have stride ld.
inline void weighted_relu_rows(const float* C, int64_t ld, const float* w, int64_t H, int64_t s0,
                               int64_t s1, float* out) {
  for (int64_t s = s0; s < s1; ++s) out[s] = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    const float wh = w[h];
    const float* c = C + h * ld;
    for (int64_t s = s0; s < s1; ++s) out[s] += wh * (c[s] > 0.f ? c[s] : 0.f);
  }
}

at::Tensor indexer_logits_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scale,
                              const at::Tensor& weights, const at::Tensor& ks,
                              const at::Tensor& ke, bool clean_logits) {
  (void)clean_logits;  // -inf outside the range either way (see the file comment)
  const auto shape = check_indexer_logits_inputs(q, k, k_scale, weights, ks, ke);
  const int64_t T = shape.T, H = shape.H, D = shape.D, S = shape.S;
  at::Tensor out = at::empty({T, S}, q.options().dtype(at::kFloat));
  if (T == 0 || S == 0) return out;
  const TileGemm g(D);
  const int64_t kt = g.key_tile, tiles = (S + kt - 1) / kt;

  // Keys: decoded once into B-operand tiles, reused by every query block.
  std::vector<uint8_t> key_tiles(static_cast<size_t>(tiles * g.tile_elems()) * g.elem_bytes());
  // MXFP4 keys are dequantised whole (group scales inside the values, no per-key scale).
  const bool mx = shape.format == KeyFormat::kMxfp4;
  const uint8_t* k_bytes = reinterpret_cast<const uint8_t*>(k.data_ptr());
  const uint8_t* k_scale_bytes = mx ? k_scale.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, tiles, 1, [&](int64_t j0, int64_t j1) {
    std::vector<float> vals(mx ? D : 0);
    for (int64_t j = j0; j < j1; ++j) {
      void* tile = key_tiles.data() + j * g.tile_elems() * g.elem_bytes();
      for (int64_t c = 0; c < kt; ++c) {
        const int64_t s = j * kt + c;
        if (s >= S) {
          g.zero_key(tile, c);
        } else if (mx) {
          mxfp4_decode_key(k_bytes + s * (D / 2), k_scale_bytes + s * (D / mxfp4::kGroup), D, vals.data());
          g.store_key_values(vals.data(), tile, c);
        } else {
          g.store_key(k_bytes + s * D, tile, c);
        }
      }
    }
  });
  // Queries: decoded once, row-major [T * H, D].
  std::vector<uint8_t> q_rows(static_cast<size_t>(T * H * D) * g.elem_bytes());
  const uint8_t* q_bytes = reinterpret_cast<const uint8_t*>(q.data_ptr());
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    g.decode_rows(q_bytes + t0 * H * D, (t1 - t0) * H, q_rows.data() + t0 * H * D * g.elem_bytes());
  });

  const float* w_ptr = weights.data_ptr<float>();
  const float* scale_ptr = mx ? nullptr : k_scale.data_ptr<float>();
  const int32_t* ks_ptr = ks.data_ptr<int32_t>();
  const int32_t* ke_ptr = ke.data_ptr<int32_t>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const auto r = indexer::clamped_key_range(ks_ptr[t], ke_ptr[t], S);
      std::fill(out_ptr + t * S, out_ptr + t * S + r.lo, kNegInf);
      std::fill(out_ptr + t * S + r.hi, out_ptr + (t + 1) * S, kNegInf);
    }
  });

  // Work item = (block of query tokens, a run of key tiles) restricted to the block's ranges.
  const int64_t tb = tokens_per_tile(H), row_blocks = (T + tb - 1) / tb;
  const int64_t tiles_per_item = std::max<int64_t>(1, 512 / kt), runs = (tiles + tiles_per_item - 1) / tiles_per_item;
  at::parallel_for(0, row_blocks * runs, 1, [&](int64_t i0, int64_t i1) {
    cpu::BrgemmScope brgemm_scope;
    std::vector<float> C(static_cast<size_t>(tb * H * kt));
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t rb = item / runs, run = item % runs;
      const int64_t t0 = rb * tb, t1 = std::min(T, t0 + tb);
      int64_t lo = S, hi = 0;
      for (int64_t t = t0; t < t1; ++t) {
        const auto r = indexer::clamped_key_range(ks_ptr[t], ke_ptr[t], S);
        if (r.lo < r.hi) lo = std::min(lo, r.lo), hi = std::max(hi, r.hi);
      }
      const int64_t j_begin = std::max(run * tiles_per_item, lo / kt);
      const int64_t j_end = std::min({(run + 1) * tiles_per_item, tiles, (hi + kt - 1) / kt});
      const void* A = q_rows.data() + t0 * H * D * g.elem_bytes();
      for (int64_t j = j_begin; j < j_end; ++j) {
        g.scores(A, (t1 - t0) * H, key_tiles.data() + j * g.tile_elems() * g.elem_bytes(), C.data());
        for (int64_t t = t0; t < t1; ++t) {
          const auto r = indexer::clamped_key_range(ks_ptr[t], ke_ptr[t], S);
          const int64_t s0 = std::max(r.lo, j * kt), s1 = std::min(r.hi, (j + 1) * kt);
          if (s0 >= s1) continue;
          float* row = out_ptr + t * S + j * kt;
          weighted_relu_rows(C.data() + (t - t0) * H * kt, kt, w_ptr + t * H, H, s0 - j * kt,
                             s1 - j * kt, row);
          if (scale_ptr != nullptr)
            for (int64_t s = s0; s < s1; ++s) out_ptr[t * S + s] *= scale_ptr[s];
        }
      }
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
  const bool mx = sh.format == KeyFormat::kMxfp4;
  at::Tensor out = at::empty({B * N, P}, q.options().dtype(at::kFloat));
  if (B == 0 || P == 0) return out;
  const TileGemm g(D);
  // Positions per work item: the keys are the GEMM's M side (decoded row-major, straight from
  // the cache), so one call covers many of them and the decode is a contiguous table lookup.
  constexpr int64_t kt = 256;
  const int64_t R = N * H;   // query rows of one sequence

  std::vector<uint8_t> q_rows(static_cast<size_t>(B * R * D) * g.elem_bytes());
  g.decode_rows(reinterpret_cast<const uint8_t*>(q.data_ptr()), B * R, q_rows.data());
  std::vector<uint8_t> q_t(q_rows.size());
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      g.store_queries_t(q_rows.data() + b * R * D * g.elem_bytes(), R, q_t.data() + b * R * D * g.elem_bytes());
  });
  const uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  const float* w_ptr = weights.data_ptr<float>();
  const int32_t* cl_ptr = context_lens.data_ptr<int32_t>();
  const int32_t* bt_ptr = block_table.data_ptr<int32_t>();
  float* out_ptr = out.data_ptr<float>();

  // Work item = (sequence b, a tile of positions): every cached token is decoded once and
  // scored for all N queries of its sequence (one GEMM: the tile's keys x N * H query rows);
  // tiles keep long single sequences parallel.
  const int64_t tiles_per_seq = (P + kt - 1) / kt;
  at::parallel_for(0, B * tiles_per_seq, 1, [&](int64_t i0, int64_t i1) {
    cpu::BrgemmScope brgemm_scope;
    std::vector<uint8_t> keys(static_cast<size_t>(kt * D) * g.elem_bytes());
    std::vector<float> C(static_cast<size_t>(kt * R)), scale(kt);
    std::vector<char> readable(kt);
    std::vector<int64_t> lens(N);
    std::vector<float> vals(mx ? D : 0);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t b = item / tiles_per_seq;
      const int64_t p0 = (item % tiles_per_seq) * kt, p1 = std::min(P, p0 + kt);
      int64_t longest = 0;
      for (int64_t j = 0; j < N; ++j) {
        lens[j] = indexer::visible_length(cl_ptr, sh.per_query_lens, b, j, N, P);
        longest = std::max(longest, lens[j]);
        float* row = out_ptr + (b * N + j) * P;
        for (int64_t p = std::max(p0, lens[j]); p < p1; ++p) row[p] = kNegInf;
      }
      const int64_t p_end = std::min(p1, longest), n = p_end - p0;
      if (n <= 0) continue;
      const int32_t* bt_row = bt_ptr + b * sh.block_table_stride;
      for (int64_t p = p0; p < p_end;) {   // a run of positions inside one cache block
        const int64_t blk = indexer::physical_block(bt_row, p / bs, sh.max_blocks, sh.num_blocks);
        const int64_t run = std::min(p_end, (p / bs + 1) * bs) - p;
        uint8_t* dst = keys.data() + (p - p0) * D * g.elem_bytes();
        if (blk >= 0 && mx) {
          for (int64_t r = 0; r < run; ++r) {
            mxfp4_decode_key(cache + mxfp4::value_offset(blk, p % bs + r, bs, D),
                             cache + mxfp4::scale_offset(blk, p % bs + r, bs, D), D, vals.data());
            g.store_row_values(vals.data(), dst, r);
          }
          std::fill_n(&scale[p - p0], run, 1.0f);
        } else if (blk >= 0) {
          g.decode_rows(cache + indexer::k_value_offset(blk, p % bs, bs, D), run, dst);
          std::memcpy(&scale[p - p0], cache + indexer::k_scale_offset(blk, p % bs, bs, D), run * sizeof(float));
        } else {
          std::memset(dst, 0, static_cast<size_t>(run * D) * g.elem_bytes());   // scored, then -inf
        }
        std::fill_n(readable.begin() + (p - p0), run, static_cast<char>(blk >= 0));
        p += run;
      }
      g.keys_times_queries(keys.data(), n, q_t.data() + b * R * D * g.elem_bytes(), R, C.data());
      for (int64_t j = 0; j < N; ++j) {
        float* row = out_ptr + (b * N + j) * P + p0;
        const int64_t end = std::min(p_end, lens[j]) - p0;
        const float* w = w_ptr + (b * N + j) * H;
        for (int64_t i = 0; i < end; ++i) {
          if (!readable[i]) {
            row[i] = kNegInf;
            continue;
          }
          const float* c = C.data() + i * R + j * H;
          float acc = 0.f;
          for (int64_t h = 0; h < H; ++h) acc += w[h] * (c[h] > 0.f ? c[h] : 0.f);
          row[i] = acc * scale[i];
        }
      }
    }
  });
  return out;
}

// ---- MXFP4 quantiser and cache writer (mxfp4.h) ----------------------------------------------

// Quantise n rows of D values (bf16 or fp32) into packed [n, D/2] and scale [n, D/32] rows;
// `dst_row(i)` gives where row i's packed bytes and scale bytes go.
template <typename T, typename Dst>
void mxfp4_quantize_rows(const T* src, int64_t n, int64_t D, Dst dst_row) {
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / D), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      uint8_t* packed = nullptr;
      uint8_t* scales = nullptr;
      if (!dst_row(r, packed, scales)) continue;
      const T* row = src + r * D;
      for (int64_t g = 0; g < D / mxfp4::kGroup; ++g)
        scales[g] = static_cast<uint8_t>(mxfp4::quantize_group(
            [&](int i) { return static_cast<float>(row[g * mxfp4::kGroup + i]); },
            packed + g * (mxfp4::kGroup / 2)));
    }
  });
}

template <typename F>
void dispatch_float_input(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16) f(c10::BFloat16{});
  else f(float{});
}

std::tuple<at::Tensor, at::Tensor> mxfp4_quantize_cpu(const at::Tensor& x_in) {
  check_mxfp4_quantize(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t D = x.size(-1), n = x.numel() / D;
  auto sizes = x.sizes().vec();
  sizes.back() = D / 2;
  at::Tensor packed = at::empty(sizes, x.options().dtype(at::kByte));
  sizes.back() = D / mxfp4::kGroup;
  at::Tensor scale = at::empty(sizes, x.options().dtype(at::kByte));
  uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* sc = scale.data_ptr<uint8_t>();
  dispatch_float_input(x, [&](auto tag) {
    using T = decltype(tag);
    mxfp4_quantize_rows(x.const_data_ptr<T>(), n, D, [&](int64_t r, uint8_t*& pr, uint8_t*& sr) {
      pr = p + r * (D / 2);
      sr = sc + r * (D / mxfp4::kGroup);
      return true;
    });
  });
  return {packed, scale};
}

// Slots past the cache raise, and a slot written twice in one call raises (tokens are written
// in parallel), as indexer_k_cache_write's CPU kernel; negative slots are skipped.
template <typename Idx>
void check_mxfp4_write_slots(const Idx* slots, int64_t n, int64_t num_slots) {
  std::vector<int64_t> used;
  used.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (slots[i] >= 0) used.push_back(slots[i]);
  std::sort(used.begin(), used.end());
  if (!used.empty())
    TORCH_CHECK_VALUE(used.back() < num_slots, "slot_mapping holds slot ", used.back(),
                      ", past the cache's ", num_slots, " slots (num_blocks * block_size)");
  const auto dup = std::adjacent_find(used.begin(), used.end());
  TORCH_CHECK_VALUE(dup == used.end(), "slot_mapping holds slot ", dup == used.end() ? 0 : *dup,
                    " more than once (each slot may be written by one token per call)");
}

void mxfp4_indexer_k_cache_write_cpu(const at::Tensor& k_in, const at::Tensor& slot_in,
                                     const at::Tensor& kv_cache) {
  const auto geo = check_mxfp4_k_cache_write(k_in, slot_in, kv_cache);
  const at::Tensor k = k_in.contiguous(), slots = slot_in.contiguous().to(at::kLong);
  const int64_t n = k.size(0), D = geo.head_dim, bs = geo.block_size;
  const int64_t* sl = slots.const_data_ptr<int64_t>();
  check_mxfp4_write_slots(sl, n, geo.num_slots());
  uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  dispatch_float_input(k, [&](auto tag) {
    using T = decltype(tag);
    mxfp4_quantize_rows(k.const_data_ptr<T>(), n, D, [&](int64_t r, uint8_t*& pr, uint8_t*& sr) {
      const int64_t slot = sl[r];
      if (slot < 0) return false;
      pr = cache + mxfp4::value_offset(slot / bs, slot % bs, bs, D);
      sr = cache + mxfp4::scale_offset(slot / bs, slot % bs, bs, D);
      return true;
    });
  });
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("mxfp4_quantize", &dsa::mxfp4_quantize_cpu);
  m.impl("mxfp4_indexer_k_cache_write", &dsa::mxfp4_indexer_k_cache_write_cpu);
  m.impl("indexer_logits", &dsa::indexer_logits_cpu);
  m.impl("paged_indexer_logits", &dsa::paged_indexer_logits_cpu);
}
