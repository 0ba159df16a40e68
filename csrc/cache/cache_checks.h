// Input validation of the cache op family, shared by the CPU and CUDA entry points. Messages
// name the argument and what was expected (csrc/common/checks.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cache/mla_layout.h"
#include "common/checks.h"

namespace dsa::cache {

constexpr int64_t kMlaNopeDim = 512;
constexpr int64_t kMlaRopeDim = 64;
constexpr int64_t kMlaDim = kMlaNopeDim + kMlaRopeDim;      // 576
constexpr int64_t kMlaTile = 128;
constexpr int64_t kMlaFp8RecordBytes = kMlaNopeDim + 4 * (kMlaNopeDim / kMlaTile) + 2 * kMlaRopeDim;  // 656

inline void check_slot_dtype(const at::Tensor& t, const char* name) {
  check_dtype_in(t, name, {at::kLong, at::kInt});
}

inline void check_input_dtype(const at::Tensor& t, const char* name) {
  check_dtype_in(t, name, {at::kBFloat16, at::kFloat});
}

// fp8_quantize: x [..., D] bf16/fp32, block_size > 0 dividing D.
inline void check_fp8_quantize(const at::Tensor& x, int64_t block_size) {
  check_input_dtype(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least 1 dimension [..., D], got a 0-D tensor");
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", block_size);
  TORCH_CHECK_VALUE(x.size(-1) % block_size == 0, "block_size (", block_size,
                    ") must divide x.size(-1) (", x.size(-1), ")");
}

struct IndexerCacheGeometry {
  int64_t num_blocks, block_size, head_dim;
  int64_t num_slots() const { return num_blocks * block_size; }
};

// Indexer K cache: uint8 [num_blocks, block_size, 1, D + 4], contiguous.
inline IndexerCacheGeometry check_indexer_cache(const at::Tensor& kv_cache) {
  check_dtype(kv_cache, "kv_cache", at::kByte);
  check_dim(kv_cache, "kv_cache", 4, "[num_blocks, block_size, 1, head_dim + 4]");
  check_size(kv_cache, "kv_cache", 2, 1, "one KV head");
  TORCH_CHECK(kv_cache.size(3) > 4, "kv_cache.size(3) must be head_dim + 4 > 4, got ",
              kv_cache.size(3));
  check_contiguous(kv_cache, "kv_cache");
  return {kv_cache.size(0), kv_cache.size(1), kv_cache.size(3) - 4};
}

inline IndexerCacheGeometry check_indexer_k_cache_write(const at::Tensor& k,
                                                        const at::Tensor& slot_mapping,
                                                        const at::Tensor& kv_cache) {
  const auto geo = check_indexer_cache(kv_cache);
  check_input_dtype(k, "k");
  check_dim(k, "k", 2, "[N, head_dim]");
  check_size(k, "k", 1, geo.head_dim, "head_dim = kv_cache.size(3) - 4");
  check_slot_dtype(slot_mapping, "slot_mapping");
  check_dim(slot_mapping, "slot_mapping", 1, "[N]");
  check_size(slot_mapping, "slot_mapping", 0, k.size(0), "N = k.size(0)");
  check_same_device(slot_mapping, "slot_mapping", k, "k");
  check_same_device(kv_cache, "kv_cache", k, "k");
  return geo;
}

inline IndexerCacheGeometry check_indexer_k_cache_gather(const at::Tensor& kv_cache,
                                                         const at::Tensor& block_table,
                                                         const at::Tensor& seq_lens) {
  const auto geo = check_indexer_cache(kv_cache);
  check_dtype(block_table, "block_table", at::kInt);
  check_dim(block_table, "block_table", 2, "[B, max_blocks]");
  check_dtype(seq_lens, "seq_lens", at::kInt);
  check_dim(seq_lens, "seq_lens", 1, "[B]");
  check_size(seq_lens, "seq_lens", 0, block_table.size(0), "B = block_table.size(0)");
  check_same_device(block_table, "block_table", kv_cache, "kv_cache");
  check_same_device(seq_lens, "seq_lens", kv_cache, "kv_cache");
  return geo;
}

// seq_lens[b] must lie in [0, max_blocks * block_size] (values checked by the caller once they
// are on the host).
inline void check_seq_len_range(int64_t min_len, int64_t max_len, int64_t capacity) {
  TORCH_CHECK_VALUE(min_len >= 0, "seq_lens must be non-negative, got ", min_len);
  TORCH_CHECK_VALUE(max_len <= capacity, "seq_lens must be <= block_table.size(1) * block_size = ",
                    capacity, ", got ", max_len);
}

// MLA cache of either model (csrc/cache/mla_layout.h), told apart by dtype and last dim:
// uint8 [nb, bs, 1, 656] V3.2 FP8 records, uint8 [nb, bs, 1, 584] V4 FP8 pages (any page pitch
// stride(0) >= bs * 584, the rest dense: FlashMLA's padded allocation), bfloat16
// [nb, bs, 1, 576 or 512] rows (contiguous).
// `name` is the argument named in messages (sparse_mla_decode also checks its extra_kv_cache).
inline MlaCacheLayout check_mla_cache(const at::Tensor& kv_cache, const char* name = "kv_cache") {
  check_dtype_in(kv_cache, name, {at::kByte, at::kBFloat16});
  check_dim(kv_cache, name, 4,
            "[num_blocks, block_size, 1, 656 or 584 (uint8) or 576 or 512 (bfloat16)]");
  check_size(kv_cache, name, 2, 1, "one KV head");
  const int64_t nb = kv_cache.size(0), bs = kv_cache.size(1), last = kv_cache.size(3);
  MlaCacheLayout l{};
  l.block_size = bs;
  l.num_slots = nb * bs;
  if (kv_cache.scalar_type() == at::kByte) {
    TORCH_CHECK(last == kV32RecordBytes || last == kV4TokenBytes,
                name, ".size(3) must be 656 (V3.2 FP8 records) or 584 (V4 FP8 pages) for a "
                "uint8 cache, got ", last, " (shape ", kv_cache.sizes(), ")");
    l.kind = last == kV32RecordBytes ? MlaCacheKind::kV32Fp8 : MlaCacheKind::kV4Fp8;
    l.dim = last == kV32RecordBytes ? 576 : 512;
  } else {
    TORCH_CHECK(last == 576 || last == 512,
                name, ".size(3) must be 576 (V3.2) or 512 (V4) for a bfloat16 cache, got ", last,
                " (shape ", kv_cache.sizes(), ")");
    l.kind = MlaCacheKind::kBf16;
    l.dim = static_cast<int32_t>(last);
  }
  if (l.kind == MlaCacheKind::kV4Fp8) {
    // Inside a page the bytes are dense; pages may be further apart than bs * 584.
    TORCH_CHECK(kv_cache.stride(3) == 1 && (bs <= 1 || kv_cache.stride(1) == kV4TokenBytes),
                name, " (V4 FP8) must be dense inside a page (strides (pitch, 584, *, 1)), "
                "got strides ", kv_cache.strides());
    l.page_pitch = nb > 1 ? kv_cache.stride(0) : bs * kV4TokenBytes;
    TORCH_CHECK(l.page_pitch >= bs * kV4TokenBytes,
                name, " (V4 FP8) page pitch stride(0) must be >= block_size * 584 = ",
                bs * kV4TokenBytes, ", got ", kv_cache.stride(0));
  } else {
    check_contiguous(kv_cache, name);
    l.page_pitch = bs * (l.fp8() ? kV32RecordBytes : 2 * int64_t(l.dim));
  }
  return l;
}

inline MlaCacheLayout check_mla_kv_cache_write(const at::Tensor& kv,
                                               const at::Tensor& slot_mapping,
                                               const at::Tensor& kv_cache) {
  const auto layout = check_mla_cache(kv_cache);
  check_input_dtype(kv, "kv");
  check_dim(kv, "kv", 2, layout.dim == 576 ? "[N, 576]" : "[N, 512]");
  check_size(kv, "kv", 1, layout.dim,
             layout.dim == 576 ? "512 nope + 64 rope, the V3.2 cache's row"
                               : "448 nope + 64 rope, the V4 cache's row");
  check_slot_dtype(slot_mapping, "slot_mapping");
  check_dim(slot_mapping, "slot_mapping", 1, "[N]");
  check_size(slot_mapping, "slot_mapping", 0, kv.size(0), "N = kv.size(0)");
  check_same_device(slot_mapping, "slot_mapping", kv, "kv");
  check_same_device(kv_cache, "kv_cache", kv, "kv");
  return layout;
}

inline MlaCacheLayout check_mla_kv_cache_gather(const at::Tensor& kv_cache,
                                                const at::Tensor& slots) {
  const auto layout = check_mla_cache(kv_cache);
  check_slot_dtype(slots, "slots");
  check_dim(slots, "slots", 1, "[M]");
  check_same_device(slots, "slots", kv_cache, "kv_cache");
  return layout;
}

}  // namespace dsa::cache
