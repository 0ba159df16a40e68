// cache family: CPU kernels. Plain loops over raw data, parallel over tokens / groups with
// at::parallel_for; the FP8 rounding is c10::Float8_e4m3fn's (round to nearest even, as torch's
// .to(float8_e4m3fn)), the scale rules those of common/quant_rules.h, so the bytes equal the
// reference's (dsa_ext/reference/cache.py) and the CUDA kernels'.
//
// Slots are checked before anything is written: a slot past the cache, or a slot given twice,
// raises ValueError (a cheap sort on the CPU; the CUDA kernels skip slots past the cache and
// leave a twice-written record unspecified instead of synchronising).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "cache/cache_checks.h"
#include "common/quant_rules.h"

namespace dsa::cache {
namespace {

// Call f with a value of the input element type (bf16 or fp32) of t.
template <typename F>
void dispatch_input(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kBFloat16) f(c10::BFloat16{});
  else f(float{});
}

// Call f with a value of the slot index type (int32 or int64) of t.
template <typename F>
void dispatch_index(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kInt) f(int32_t{});
  else f(int64_t{});
}

inline uint8_t fp8_bits(float v) { return c10::Float8_e4m3fn(v).x; }

inline float fp8_value(uint8_t bits) {
  return static_cast<float>(c10::Float8_e4m3fn(bits, c10::Float8_e4m3fn::from_bits()));
}

// max |x|, NaN ignored (fmax returns the non-NaN operand), as the CUDA kernels' reduction.
template <typename T>
float abs_max(const T* x, int64_t n) {
  float m = 0.f;
  for (int64_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs(static_cast<float>(x[i])));
  return m;
}

// pow2: s is a power of two (ue8m0, MLA tiles), so x * (1 / s) gives the bits of x / s
// (fp8_prequant_pow2) without a division per element; the CUDA kernels do the same.
template <typename T>
void quantize_into(const T* x, int64_t n, float s, bool pow2, uint8_t* dst) {
  if (pow2) {
    const float inv_s = 1.0f / s;
    for (int64_t i = 0; i < n; ++i) dst[i] = fp8_bits(fp8_prequant_pow2(static_cast<float>(x[i]), inv_s));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = fp8_bits(fp8_prequant(static_cast<float>(x[i]), s));
  }
}

// bf16 values of x, rounded to nearest even when x is fp32, written as raw bytes.
template <typename T>
void store_bf16(const T* x, int64_t n, uint8_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const c10::BFloat16 v(static_cast<float>(x[i]));
    std::memcpy(dst + 2 * i, &v, 2);
  }
}

// A slot may be written by at most one token of a call: tokens are written in parallel, so two
// writers of one record could leave one token's values beside another's scale. The CPU checks
// it (a sort of the n slots); the CUDA writers do not (it would cost a device sync) and leave
// such a record unspecified. Skipped (negative) slots may repeat.
template <typename Idx>
void check_write_slots(const Idx* slots, int64_t n, int64_t num_slots) {
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

// Aim for ~64 KiB of input per parallel task so small calls stay on one thread.
inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems_per_item));
}

std::tuple<at::Tensor, at::Tensor> fp8_quantize_cpu(const at::Tensor& x_in, int64_t block_size,
                                                    bool ue8m0) {
  check_fp8_quantize(x_in, block_size);
  const at::Tensor x = x_in.contiguous();
  at::Tensor x_fp8 = at::empty(x.sizes(), x.options().dtype(at::ScalarType::Float8_e4m3fn));
  auto scale_sizes = x.sizes().vec();
  scale_sizes.back() /= block_size;
  at::Tensor scale = at::empty(scale_sizes, x.options().dtype(at::kFloat));
  const int64_t groups = scale.numel();
  auto* q = reinterpret_cast<uint8_t*>(x_fp8.data_ptr());
  float* s = scale.data_ptr<float>();
  dispatch_input(x, [&](auto tag) {
    using T = decltype(tag);
    const T* src = x.const_data_ptr<T>();
    at::parallel_for(0, groups, grain_for(block_size), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const T* xg = src + g * block_size;
        const float sg = indexer_scale(abs_max(xg, block_size), ue8m0);
        s[g] = sg;
        quantize_into(xg, block_size, sg, ue8m0, q + g * block_size);
      }
    });
  });
  return {x_fp8, scale};
}

void indexer_k_cache_write_cpu(const at::Tensor& k_in, const at::Tensor& slot_in,
                               const at::Tensor& kv_cache, bool ue8m0) {
  const auto geo = check_indexer_k_cache_write(k_in, slot_in, kv_cache);
  const at::Tensor k = k_in.contiguous(), slots = slot_in.contiguous();
  const int64_t n = k.size(0), D = geo.head_dim, bs = geo.block_size;
  const int64_t block_bytes = bs * (D + 4);
  uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  dispatch_index(slots, [&](auto itag) {
    using Idx = decltype(itag);
    const Idx* sl = slots.const_data_ptr<Idx>();
    check_write_slots(sl, n, geo.num_slots());
    dispatch_input(k, [&](auto tag) {
      using T = decltype(tag);
      const T* src = k.const_data_ptr<T>();
      at::parallel_for(0, n, grain_for(D), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t slot = sl[i];
          if (slot < 0) continue;
          uint8_t* block = cache + (slot / bs) * block_bytes;
          const int64_t off = slot % bs;
          const T* row = src + i * D;
          const float s = indexer_scale(abs_max(row, D), ue8m0);
          quantize_into(row, D, s, ue8m0, block + off * D);
          std::memcpy(block + bs * D + 4 * off, &s, 4);
        }
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> indexer_k_cache_gather_cpu(const at::Tensor& kv_cache,
                                                              const at::Tensor& block_table_in,
                                                              const at::Tensor& seq_lens_in) {
  const auto geo = check_indexer_k_cache_gather(kv_cache, block_table_in, seq_lens_in);
  const at::Tensor block_table = block_table_in.contiguous(), seq_lens = seq_lens_in.contiguous();
  const int64_t B = seq_lens.size(0), max_blocks = block_table.size(1);
  const int64_t D = geo.head_dim, bs = geo.block_size, nb = geo.num_blocks;
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  std::vector<int64_t> cu(B + 1, 0);  // output row of each sequence's first token
  int64_t min_len = 0, max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    min_len = std::min<int64_t>(min_len, lens[b]);
    max_len = std::max<int64_t>(max_len, lens[b]);
    cu[b + 1] = cu[b] + lens[b];
  }
  check_seq_len_range(min_len, max_len, max_blocks * bs);
  const int64_t total = cu[B];
  at::Tensor k_fp8 = at::empty({total, D}, kv_cache.options().dtype(at::ScalarType::Float8_e4m3fn));
  at::Tensor k_scale = at::empty({total}, kv_cache.options().dtype(at::kFloat));
  const uint8_t* cache = kv_cache.const_data_ptr<uint8_t>();
  const int32_t* table = block_table.const_data_ptr<int32_t>();
  auto* out = reinterpret_cast<uint8_t*>(k_fp8.data_ptr());
  float* out_scale = k_scale.data_ptr<float>();
  at::parallel_for(0, total, grain_for(D), [&](int64_t begin, int64_t end) {
    int64_t seq = std::upper_bound(cu.begin(), cu.end(), begin) - cu.begin() - 1;
    for (int64_t t = begin; t < end; ++t) {
      while (t >= cu[seq + 1]) ++seq;  // skips empty sequences
      const int64_t pos = t - cu[seq];
      const int64_t blk = table[seq * max_blocks + pos / bs], off = pos % bs;
      uint8_t* dst = out + t * D;
      if (blk < 0 || blk >= nb) {  // untrusted block id: zeros, never read
        std::memset(dst, 0, D);
        out_scale[t] = 0.f;
        continue;
      }
      const uint8_t* block = cache + blk * bs * (D + 4);
      std::memcpy(dst, block + off * D, D);
      std::memcpy(out_scale + t, block + bs * D + 4 * off, 4);
    }
  });
  return {k_fp8, k_scale};
}

// One token of an MLA cache of either layout (mla_layout.h): per tile of the nope values the
// FlashMLA scale 2^ceil(log2(max(amax / 448, 1e-4))), e4m3 values, the scale as fp32 (V3.2) or
// a ue8m0 byte (V4); the rope values in bf16. bf16 caches take the row rounded to bf16.
template <typename T>
void write_mla_token(const T* row, const MlaCacheLayout& l, int64_t slot, uint8_t* cache) {
  uint8_t* values = cache + l.value_byte(slot);
  if (!l.fp8()) {
    store_bf16(row, l.dim, values);
    return;
  }
  uint8_t* scales = cache + l.scale_byte(slot);
  for (int32_t tile = 0; tile < l.num_tiles(); ++tile) {
    const T* x = row + tile * l.tile();
    const float s = mla_tile_scale(abs_max(x, l.tile()));
    quantize_into(x, l.tile(), s, /*pow2=*/true, values + tile * l.tile());
    if (l.kind == MlaCacheKind::kV32Fp8) std::memcpy(scales + 4 * tile, &s, 4);
    else scales[tile] = ue8m0_byte(s);
  }
  if (l.kind == MlaCacheKind::kV4Fp8) scales[l.num_tiles()] = 0;   // the pad byte
  store_bf16(row + l.nope(), kMlaRopeValues, cache + l.rope_byte(slot));
}

// The dequantised row of one token as bf16 bytes (fp8 * scale in fp32, rounded to bf16).
void read_mla_token(const uint8_t* cache, const MlaCacheLayout& l, int64_t slot, uint8_t* dst) {
  const uint8_t* values = cache + l.value_byte(slot);
  if (!l.fp8()) {
    std::memcpy(dst, values, 2 * l.dim);
    return;
  }
  const uint8_t* scales = cache + l.scale_byte(slot);
  float nope[128];
  for (int32_t tile = 0; tile < l.num_tiles(); ++tile) {
    float s;
    if (l.kind == MlaCacheKind::kV32Fp8) std::memcpy(&s, scales + 4 * tile, 4);
    else s = ue8m0_value(scales[tile]);
    for (int32_t j = 0; j < l.tile(); ++j) nope[j] = fp8_value(values[tile * l.tile() + j]) * s;
    store_bf16(nope, l.tile(), dst + 2 * tile * l.tile());
  }
  std::memcpy(dst + 2 * l.nope(), cache + l.rope_byte(slot), 2 * kMlaRopeValues);
}

void mla_kv_cache_write_cpu(const at::Tensor& kv_in, const at::Tensor& slot_in,
                            const at::Tensor& kv_cache) {
  const auto layout = check_mla_kv_cache_write(kv_in, slot_in, kv_cache);
  const at::Tensor kv = kv_in.contiguous(), slots = slot_in.contiguous();
  const int64_t n = kv.size(0);
  auto* cache = static_cast<uint8_t*>(kv_cache.data_ptr());
  dispatch_index(slots, [&](auto itag) {
    using Idx = decltype(itag);
    const Idx* sl = slots.const_data_ptr<Idx>();
    check_write_slots(sl, n, layout.num_slots);
    dispatch_input(kv, [&](auto tag) {
      using T = decltype(tag);
      const T* src = kv.const_data_ptr<T>();
      at::parallel_for(0, n, grain_for(layout.dim), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          if (sl[i] >= 0) write_mla_token(src + i * layout.dim, layout, sl[i], cache);
      });
    });
  });
}

at::Tensor mla_kv_cache_gather_cpu(const at::Tensor& kv_cache, const at::Tensor& slots_in) {
  const auto layout = check_mla_kv_cache_gather(kv_cache, slots_in);
  const at::Tensor slots = slots_in.contiguous();
  const int64_t m = slots.size(0);
  at::Tensor out = at::empty({m, 1, layout.dim}, kv_cache.options().dtype(at::kBFloat16));
  auto* dst_all = reinterpret_cast<uint8_t*>(out.data_ptr());
  const auto* cache = static_cast<const uint8_t*>(kv_cache.const_data_ptr());
  dispatch_index(slots, [&](auto itag) {
    using Idx = decltype(itag);
    const Idx* sl = slots.const_data_ptr<Idx>();
    at::parallel_for(0, m, grain_for(layout.dim), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t slot = sl[i];
        uint8_t* dst = dst_all + i * 2 * layout.dim;
        if (slot < 0 || slot >= layout.num_slots) std::memset(dst, 0, 2 * layout.dim);  // never read
        else read_mla_token(cache, layout, slot, dst);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace dsa::cache

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("fp8_quantize", &dsa::cache::fp8_quantize_cpu);
  m.impl("indexer_k_cache_write", &dsa::cache::indexer_k_cache_write_cpu);
  m.impl("indexer_k_cache_gather", &dsa::cache::indexer_k_cache_gather_cpu);
  m.impl("mla_kv_cache_write", &dsa::cache::mla_kv_cache_write_cpu);
  m.impl("mla_kv_cache_gather", &dsa::cache::mla_kv_cache_gather_cpu);
}
