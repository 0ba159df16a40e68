// Input validation of the topk family, shared by the CPU and CUDA entry points (SPEC section 4).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <limits>

#include "common/checks.h"

namespace dsa {

// Largest k the CUDA top-k serves (the sort of the selected set lives in shared memory).
constexpr int64_t kTopkMaxKCuda = 4096;

inline void check_topk_range_tensor(const std::optional<at::Tensor>& t, const char* name,
                                    const at::Tensor& logits) {
  if (!t.has_value()) return;
  check_same_device(*t, name, logits, "logits");
  check_dtype(*t, name, at::kInt);
  check_dim(*t, name, 1, "[T]");
  check_size(*t, name, 0, logits.size(0), "T, the rows of logits");
  check_contiguous(*t, name);
}

// logits [T, S] fp32 with unit column stride; any non-negative row stride (a row-sliced view
// of a wider matrix is accepted as is).
inline void check_topk_indices(const at::Tensor& logits, int64_t k,
                               const std::optional<at::Tensor>& ks,
                               const std::optional<at::Tensor>& ke, int64_t max_k) {
  check_dim(logits, "logits", 2, "[T, S]");
  check_dtype(logits, "logits", at::kFloat);
  // An empty matrix is read nowhere: its strides do not matter (torch keeps any strides on
  // contiguous() of a tensor with no elements).
  TORCH_CHECK(logits.numel() == 0 || logits.size(1) <= 1 || logits.stride(1) == 1,
              "logits must have unit stride along S (stride(1) == 1), got strides ",
              logits.strides());
  TORCH_CHECK(logits.size(0) <= 1 || logits.stride(0) >= 0,
              "logits must have a non-negative row stride, got strides ", logits.strides());
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(),
              "logits.size(1) must fit int32 (indices are int32), got ", logits.size(1));
  TORCH_CHECK_VALUE(k >= 1, "k must be >= 1, got ", k);
  TORCH_CHECK_VALUE(k <= max_k, "k must be <= ", max_k, " on this device, got ", k);
  check_topk_range_tensor(ks, "ks", logits);
  check_topk_range_tensor(ke, "ke", logits);
}

// Rows of the [R, K] view of indices ([R, K] or [B, N, K]).
inline int64_t topk_slot_rows(const at::Tensor& indices) {
  return indices.dim() == 3 ? indices.size(0) * indices.size(1) : indices.size(0);
}

// indices [R, K] (or [B, N, K], R = B * N) int32, block_table [B, M] int32, R % B == 0:
// row r of the flattened [R, K] view belongs to sequence r / (R / B).
inline void check_topk_slot_ids(const at::Tensor& indices, const at::Tensor& block_table,
                                int64_t block_size) {
  TORCH_CHECK(indices.dim() == 2 || indices.dim() == 3,
              "indices must be 2-D [R, K] or 3-D [B, N, K], got shape ", indices.sizes());
  check_dtype(indices, "indices", at::kInt);
  check_contiguous(indices, "indices");
  check_same_device(block_table, "block_table", indices, "indices");
  check_dim(block_table, "block_table", 2, "[B, max_blocks]");
  check_dtype(block_table, "block_table", at::kInt);
  check_contiguous(block_table, "block_table");
  TORCH_CHECK_VALUE(block_size >= 1, "block_size must be >= 1, got ", block_size);
  const int64_t B = block_table.size(0);
  if (indices.dim() == 3)
    check_size(indices, "indices", 0, B, "B, the rows of block_table, for [B, N, K] indices");
  const int64_t R = topk_slot_rows(indices);
  TORCH_CHECK(B >= 1 || R == 0, "block_table must have at least one row (B >= 1), got shape ",
              block_table.sizes());
  TORCH_CHECK(B == 0 || R % B == 0, "indices rows (", R,
              ") must be a multiple of block_table.size(0) (", B,
              "): row r of indices belongs to sequence r / (R / B)");
}

}  // namespace dsa
