// Input validation of v4_compress (SPEC 10.4), shared by the CPU and CUDA entry points. The
// checks that need cu_seqlens' values (monotone, ending at T, rope rows for the last entry)
// take them from the host copy each entry point makes (check_compress_lengths).
#pragma once
#include "common/checks.h"

#include <c10/util/Optional.h>

namespace dsa {

// The last 64 dims of an entry are roped: 32 GPT-J pairs, one cos/sin column each.
constexpr int64_t kCompressRopeDims = 64;

struct CompressShape {
  int64_t tokens, d, c, ratio, rope_rows;
};

inline CompressShape check_v4_compress(const at::Tensor& kv, const at::Tensor& score,
                                       const at::Tensor& ape, const at::Tensor& norm_weight,
                                       double eps, const at::Tensor& rope_cos,
                                       const at::Tensor& rope_sin,
                                       const c10::optional<at::Tensor>& cu_seqlens) {
  check_dtype(kv, "kv", at::kFloat);
  check_dtype(score, "score", at::kFloat);
  check_dtype(ape, "ape", at::kFloat);
  check_dtype(norm_weight, "norm_weight", at::kFloat);
  check_dtype(rope_cos, "rope_cos", at::kFloat);
  check_dtype(rope_sin, "rope_sin", at::kFloat);
  check_dim(kv, "kv", 2, "[T, c * d]");
  check_dim(norm_weight, "norm_weight", 1, "[d]");
  const int64_t d = norm_weight.size(0);
  TORCH_CHECK_VALUE(d >= kCompressRopeDims && d % 2 == 0,
                    "norm_weight.numel() (the entry size d) must be even and at least 64 (the "
                    "roped dims), got ", d);
  TORCH_CHECK_VALUE(kv.size(1) == d || kv.size(1) == 2 * d,
                    "kv.size(1) must be d or 2 * d (c = 1 or 2, d = norm_weight.numel() = ", d,
                    "), got ", kv.size(1));
  const int64_t c = kv.size(1) / d;
  TORCH_CHECK(score.sizes() == kv.sizes(), "score must have kv's shape ", kv.sizes(), ", got ",
              score.sizes());
  check_dim(ape, "ape", 2, "[ratio, c * d]");
  TORCH_CHECK_VALUE(ape.size(0) >= 1, "ape.size(0) (the compression ratio) must be positive, got ",
                    ape.size(0));
  check_size(ape, "ape", 1, c * d, "c * d, kv.size(1)");
  check_dim(rope_cos, "rope_cos", 2, "[P, 32]");
  check_size(rope_cos, "rope_cos", 1, kCompressRopeDims / 2, "one cos per rope pair");
  TORCH_CHECK(rope_sin.sizes() == rope_cos.sizes(), "rope_sin must have rope_cos's shape ",
              rope_cos.sizes(), ", got ", rope_sin.sizes());
  TORCH_CHECK_VALUE(eps >= 0, "eps must be non-negative, got ", eps);
  const char* names[] = {"kv", "score", "ape", "norm_weight", "rope_cos", "rope_sin"};
  const at::Tensor* ts[] = {&kv, &score, &ape, &norm_weight, &rope_cos, &rope_sin};
  for (int i = 0; i < 6; ++i) {
    check_same_device(*ts[i], names[i], kv, "kv");
    check_contiguous(*ts[i], names[i]);
  }
  if (cu_seqlens.has_value()) {
    const auto& cu = *cu_seqlens;
    check_dtype(cu, "cu_seqlens", at::kInt);
    check_dim(cu, "cu_seqlens", 1, "[B + 1]");
    TORCH_CHECK_VALUE(cu.size(0) >= 2, "cu_seqlens must have B + 1 >= 2 entries, got ", cu.size(0));
    check_same_device(cu, "cu_seqlens", kv, "kv");
    check_contiguous(cu, "cu_seqlens");
  }
  return {kv.size(0), d, c, ape.size(0), rope_cos.size(0)};
}

// Validates cu_seqlens' values (a host copy, int32 [B + 1]) against T and the rope table;
// returns the number of entries of the largest sequence (floor(len / ratio)).
inline int64_t check_compress_lengths(const int32_t* cu, int64_t batch, const CompressShape& s) {
  TORCH_CHECK_VALUE(cu[0] == 0, "cu_seqlens[0] must be 0, got ", cu[0]);
  TORCH_CHECK_VALUE(cu[batch] == s.tokens, "cu_seqlens[-1] must equal kv.size(0) = ", s.tokens,
                    ", got ", cu[batch]);
  int64_t most = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(cu[b + 1] >= cu[b], "cu_seqlens must be non-decreasing, got cu_seqlens[",
                      b, "] = ", cu[b], " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
    most = std::max<int64_t>(most, (cu[b + 1] - cu[b]) / s.ratio);
  }
  return most;
}

// Entry j is roped at position j * ratio: the table needs a row for the last entry's position.
inline void check_compress_rope_rows(int64_t most_entries, const CompressShape& s) {
  if (most_entries == 0) return;
  const int64_t last = (most_entries - 1) * s.ratio;
  TORCH_CHECK_VALUE(last < s.rope_rows, "rope_cos / rope_sin have ", s.rope_rows,
                    " rows, but the last entry of the longest sequence is roped at position ",
                    last, " ((entries - 1) * ratio): need at least ", last + 1, " rows");
}

// v4_compress_step: kv / score [B, c * d] (one new token per sequence), positions [B] int32,
// the ring-buffer state kv_state / score_state [B, c * ratio, c * d] fp32. CompressShape's
// `tokens` is B. The rope rows are checked where the positions are on the host (CPU).
inline CompressShape check_v4_compress_step(const at::Tensor& kv, const at::Tensor& score,
                                            const at::Tensor& ape, const at::Tensor& norm_weight,
                                            double eps, const at::Tensor& rope_cos,
                                            const at::Tensor& rope_sin,
                                            const at::Tensor& positions,
                                            const at::Tensor& kv_state,
                                            const at::Tensor& score_state) {
  const CompressShape s = check_v4_compress(kv, score, ape, norm_weight, eps, rope_cos, rope_sin,
                                            c10::nullopt);
  check_dtype(positions, "positions", at::kInt);
  check_dim(positions, "positions", 1, "[B]");
  check_size(positions, "positions", 0, s.tokens, "B, kv.size(0)");
  check_same_device(positions, "positions", kv, "kv");
  check_contiguous(positions, "positions");
  const char* names[] = {"kv_state", "score_state"};
  const at::Tensor* ts[] = {&kv_state, &score_state};
  for (int i = 0; i < 2; ++i) {
    check_dtype(*ts[i], names[i], at::kFloat);
    check_dim(*ts[i], names[i], 3, "[B, c * ratio, c * d]");
    check_size(*ts[i], names[i], 0, s.tokens, "B, kv.size(0)");
    check_size(*ts[i], names[i], 1, s.c * s.ratio, "c * ratio ring rows");
    check_size(*ts[i], names[i], 2, s.c * s.d, "c * d, kv.size(1)");
    check_same_device(*ts[i], names[i], kv, "kv");
    check_contiguous(*ts[i], names[i]);
  }
  return s;
}

}  // namespace dsa
