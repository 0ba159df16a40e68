// cache family: torch-free host launchers. They pick the vectorised kernels when sizes and
// pointer alignment allow 16-byte accesses, and scalar fallbacks otherwise.
#include <algorithm>

#include "cache/cache_kernels.cuh"
#include "cache/cache_launch.h"
#include "common/cuda_utils.cuh"

namespace dsa::cache {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = int64_t(1) << 16;  // grid-stride loops cover the rest

inline unsigned grid_for(int64_t threads) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(kMaxGrid, ceil_div<int64_t>(threads, kThreads))));
}

inline bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename T>
struct Tag { using type = T; };

template <typename F>
cudaError_t with_input(InputType t, F&& f) {
  return t == InputType::kBFloat16 ? f(Tag<__nv_bfloat16>{}) : f(Tag<float>{});
}

template <typename F>
cudaError_t with_index(bool int64, F&& f) {
  return int64 ? f(Tag<int64_t>{}) : f(Tag<int32_t>{});
}

// Quantise num_groups groups of group_size values of src with rule; dest(g) says where group g
// goes. vec_ok: the caller guarantees the alignment of quantize_groups_vec_kernel's contract
// (16-byte input rows, 8-byte value and 4-byte scale destinations) when group_size % 8 == 0.
template <typename T, typename Dest, typename Rule>
cudaError_t launch_quantize_groups(const T* src, int64_t num_groups, int64_t group_size, Dest dest,
                                   Rule rule, bool vec_ok, cudaStream_t stream) {
  if (num_groups == 0 || group_size == 0) return cudaSuccess;
  const int64_t n_chunks = group_size / kChunk;
  // Kernels are named with every template argument (none deduced from the launch arguments), so
  // that the CPU emulator's <<<>>> rewrite (csrc/emu/launch_rewrite.py) can take their address.
  auto vec = [&](auto tpg, auto cpl) {
    constexpr int TPG = decltype(tpg)::value, CPL = decltype(cpl)::value;
    quantize_groups_vec_kernel<T, TPG, CPL, Dest, Rule><<<grid_for(num_groups * TPG), kThreads, 0, stream>>>(
        src, num_groups, int(group_size), dest, rule);
    return last_launch_error();
  };
  using I1 = std::integral_constant<int, 1>;
  if (vec_ok && group_size % kChunk == 0 && n_chunks <= 8 * kWarpSize) {
    if (n_chunks <= 1) return vec(I1{}, I1{});
    if (n_chunks <= 2) return vec(std::integral_constant<int, 2>{}, I1{});
    if (n_chunks <= 4) return vec(std::integral_constant<int, 4>{}, I1{});
    if (n_chunks <= 8) return vec(std::integral_constant<int, 8>{}, I1{});
    if (n_chunks <= 16) return vec(std::integral_constant<int, 16>{}, I1{});
    if (n_chunks <= 32) return vec(std::integral_constant<int, 32>{}, I1{});
    if (n_chunks <= 64) return vec(std::integral_constant<int, 32>{}, std::integral_constant<int, 2>{});
    if (n_chunks <= 128) return vec(std::integral_constant<int, 32>{}, std::integral_constant<int, 4>{});
    return vec(std::integral_constant<int, 32>{}, std::integral_constant<int, 8>{});
  }
  quantize_groups_scalar_kernel<T, Dest, Rule><<<grid_for(num_groups * kWarpSize), kThreads, 0, stream>>>(
      src, num_groups, group_size, dest, rule);
  return last_launch_error();
}

}  // namespace

cudaError_t launch_fp8_quantize(const void* x, InputType x_type, int64_t num_groups,
                                int64_t group_size, bool ue8m0, void* x_fp8, float* scale,
                                cudaStream_t stream) {
  const bool vec_ok = aligned(x, 16) && aligned(x_fp8, 8) && aligned(scale, 4);
  const DenseGroups dest{static_cast<uint8_t*>(x_fp8), scale, group_size};
  return with_input(x_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_quantize_groups(static_cast<const T*>(x), num_groups, group_size, dest,
                                  IndexerScaleRule{ue8m0}, vec_ok, stream);
  });
}

cudaError_t launch_indexer_k_cache_write(const void* k, InputType k_type, const void* slots,
                                         bool slots_int64, int64_t n, int64_t head_dim,
                                         bool ue8m0, void* cache, int64_t num_blocks,
                                         int64_t block_size, cudaStream_t stream) {
  const bool vec_ok = aligned(k, 16) && aligned(cache, 8) && (block_size * (head_dim + 4)) % 8 == 0;
  return with_index(slots_int64, [&](auto itag) {
    using Idx = typename decltype(itag)::type;
    const IndexerCacheSlots<Idx> dest{static_cast<const Idx*>(slots), static_cast<uint8_t*>(cache),
                                      num_blocks * block_size, block_size, head_dim};
    return with_input(k_type, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return launch_quantize_groups(static_cast<const T*>(k), n, head_dim, dest,
                                    IndexerScaleRule{ue8m0}, vec_ok, stream);
    });
  });
}

cudaError_t launch_indexer_k_cache_gather(const void* cache, int64_t num_blocks,
                                          int64_t block_size, int64_t head_dim,
                                          const int32_t* block_table, int64_t max_blocks,
                                          const int64_t* cu_seqlens, int64_t batch, int64_t total,
                                          void* k_fp8, float* k_scale, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  const auto* src = static_cast<const uint8_t*>(cache);
  auto* dst = static_cast<uint8_t*>(k_fp8);
  const bool vec16 = head_dim % 16 == 0 && (block_size * (head_dim + 4)) % 16 == 0 &&
                     aligned(cache, 16) && aligned(k_fp8, 16);
  const int64_t chunks = vec16 ? head_dim / 16 : head_dim;
  int log2_tpg = 0;  // lanes per token: the chunk count rounded up to a power of two, <= 32
  while ((int64_t(1) << log2_tpg) < std::min<int64_t>(chunks, kWarpSize)) ++log2_tpg;
  const unsigned grid = grid_for(total << log2_tpg);
  if (vec16)
    indexer_gather_kernel<16><<<grid, kThreads, 0, stream>>>(
        src, num_blocks, int(block_size), int(head_dim), block_table, max_blocks, cu_seqlens,
        batch, total, log2_tpg, dst, k_scale);
  else
    indexer_gather_kernel<1><<<grid, kThreads, 0, stream>>>(
        src, num_blocks, int(block_size), int(head_dim), block_table, max_blocks, cu_seqlens,
        batch, total, log2_tpg, dst, k_scale);
  return last_launch_error();
}

// Calls f with the layout's kind as a compile-time constant.
template <typename F>
cudaError_t with_mla_kind(MlaCacheKind kind, F&& f) {
  switch (kind) {
    case MlaCacheKind::kV32Fp8: return f(std::integral_constant<MlaCacheKind, MlaCacheKind::kV32Fp8>{});
    case MlaCacheKind::kV4Fp8: return f(std::integral_constant<MlaCacheKind, MlaCacheKind::kV4Fp8>{});
    case MlaCacheKind::kBf16: return f(std::integral_constant<MlaCacheKind, MlaCacheKind::kBf16>{});
  }
  return cudaErrorInvalidValue;
}

// Every 16-byte access of the kernels is aligned when the base, the page pitch and (bf16) the
// row are multiples of 16 bytes.
bool mla_layout_aligned(const void* cache, const MlaCacheLayout& l) {
  return aligned(cache, 16) && l.page_pitch % 16 == 0 && (l.dim * 2) % 16 == 0;
}

cudaError_t launch_mla_kv_cache_write(const void* kv, InputType kv_type, const void* slots,
                                      bool slots_int64, int64_t n, void* cache,
                                      const MlaCacheLayout& layout, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (!aligned(kv, 16) || !mla_layout_aligned(cache, layout)) return cudaErrorMisalignedAddress;
  return with_index(slots_int64, [&](auto itag) {
    using Idx = typename decltype(itag)::type;
    return with_input(kv_type, [&](auto tag) {
      using T = typename decltype(tag)::type;
      return with_mla_kind(layout.kind, [&](auto ktag) {
        const auto* src = static_cast<const T*>(kv);
        const auto* sl = static_cast<const Idx*>(slots);
        mla_write_kernel<T, Idx, decltype(ktag)::value><<<grid_for(n * kWarpSize), kThreads, 0, stream>>>(
            src, sl, n, static_cast<uint8_t*>(cache), layout);
        return last_launch_error();
      });
    });
  });
}

cudaError_t launch_mla_kv_cache_gather(const void* cache, const MlaCacheLayout& layout,
                                       const void* slots, bool slots_int64, int64_t m, void* out,
                                       cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  if (!aligned(out, 16) || !mla_layout_aligned(cache, layout)) return cudaErrorMisalignedAddress;
  return with_index(slots_int64, [&](auto itag) {
    using Idx = typename decltype(itag)::type;
    return with_mla_kind(layout.kind, [&](auto ktag) {
      mla_gather_kernel<Idx, decltype(ktag)::value><<<grid_for(m * kWarpSize), kThreads, 0, stream>>>(
          static_cast<const uint8_t*>(cache), layout, static_cast<const Idx*>(slots), m,
          static_cast<uint8_t*>(out));
      return last_launch_error();
    });
  });
}

}  // namespace dsa::cache
