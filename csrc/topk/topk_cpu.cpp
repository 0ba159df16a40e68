// topk family: CPU kernels. Per row: order-preserving uint32 keys (topk_key.h), radix select
// of the k-th largest key over 8-bit digits (candidates compacted after each digit), then one
// pass in index order that takes every key above the threshold and the first `need` keys equal
// to it, which is exactly "ties toward the smaller index". Rows run in parallel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <cstdint>
#include <utility>
#include <vector>

#include "topk/indexer_topk.h"
#include "topk/topk_checks.h"
#include "topk/topk_key.h"

namespace dsa {
namespace {

struct TopkScratch {
  std::vector<uint32_t> keys;    // keys of the row's range, position i = column lo + i
  std::vector<int32_t> cand;     // positions still tied with the threshold prefix
  std::vector<int32_t> picked;   // selected positions
};

// Selects the row's top-k positions into s.picked (relative to lo), in index order.
void select_row(const float* row, int64_t lo, int64_t hi, int64_t k, TopkScratch& s) {
  const int64_t n = hi - lo;
  s.keys.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, row + lo + i, sizeof(bits));
    s.keys[i] = topk_key_from_bits(bits);
  }
  s.picked.clear();
  if (n <= k) {
    for (int64_t i = 0; i < n; ++i) s.picked.push_back(static_cast<int32_t>(i));
    return;
  }
  uint32_t prefix = 0, mask = 0;
  int64_t need = k;  // how many of the keys matching `prefix` under `mask` to take
  bool first = true;
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::array<int64_t, 256> hist{};
    if (first) {
      for (int64_t i = 0; i < n; ++i) ++hist[s.keys[i] >> 24];
    } else {
      for (int32_t c : s.cand) ++hist[(s.keys[c] >> shift) & 0xFF];
    }
    int bin = 255;
    int64_t above = 0;
    while (above + hist[bin] < need) above += hist[bin--];  // terminates: total >= need
    need -= above;
    prefix |= static_cast<uint32_t>(bin) << shift;
    mask |= 0xFFu << shift;
    if (hist[bin] == need) break;  // the whole bin is taken: no further digit matters
    std::vector<int32_t> next;
    next.reserve(hist[bin]);
    if (first) {
      for (int64_t i = 0; i < n; ++i)
        if ((s.keys[i] >> 24) == static_cast<uint32_t>(bin)) next.push_back(static_cast<int32_t>(i));
    } else {
      for (int32_t c : s.cand)
        if (((s.keys[c] >> shift) & 0xFF) == static_cast<uint32_t>(bin)) next.push_back(c);
    }
    s.cand.swap(next);
    first = false;
  }
  int64_t taken_equal = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t m = s.keys[i] & mask;
    if (m > prefix || (m == prefix && taken_equal++ < need)) s.picked.push_back(static_cast<int32_t>(i));
  }
}

at::Tensor topk_indices_cpu(const at::Tensor& logits, int64_t k,
                            const std::optional<at::Tensor>& ks,
                            const std::optional<at::Tensor>& ke, bool sorted) {
  check_topk_indices(logits, k, ks, ke, std::numeric_limits<int32_t>::max());
  const int64_t T = logits.size(0), S = logits.size(1);
  at::Tensor out = at::empty({T, k}, logits.options().dtype(at::kInt));
  if (T == 0) return out;
  const float* base = logits.data_ptr<float>();
  const int64_t row_stride = logits.stride(0);
  const int32_t* ks_p = ks.has_value() ? ks->data_ptr<int32_t>() : nullptr;
  const int32_t* ke_p = ke.has_value() ? ke->data_ptr<int32_t>() : nullptr;
  int32_t* out_p = out.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(S, 1));
  at::parallel_for(0, T, grain, [&](int64_t t_begin, int64_t t_end) {
    TopkScratch s;
    for (int64_t t = t_begin; t < t_end; ++t) {
      int64_t lo, hi;
      topk_row_range(ks_p, ke_p, t, S, lo, hi);
      select_row(base + t * row_stride, lo, hi, k, s);
      if (sorted) {  // descending key, ascending index
        std::sort(s.picked.begin(), s.picked.end(), [&](int32_t a, int32_t b) {
          return s.keys[a] != s.keys[b] ? s.keys[a] > s.keys[b] : a < b;
        });
      }
      int32_t* o = out_p + t * k;
      const int64_t m = static_cast<int64_t>(s.picked.size());
      for (int64_t j = 0; j < m; ++j) o[j] = static_cast<int32_t>(s.picked[j] + lo);
      std::fill(o + m, o + k, -1);
    }
  });
  return out;
}

at::Tensor topk_slot_ids_cpu(const at::Tensor& indices, const at::Tensor& block_table,
                             int64_t block_size) {
  check_topk_slot_ids(indices, block_table, block_size);
  const int64_t R = topk_slot_rows(indices), K = indices.size(-1);
  const int64_t B = block_table.size(0), M = block_table.size(1);
  at::Tensor out = at::empty(indices.sizes(), indices.options());
  if (R == 0 || K == 0) return out;
  const int64_t rows_per_seq = R / B;
  const int32_t* idx = indices.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* trow = table + (r / rows_per_seq) * M;
      for (int64_t j = 0; j < K; ++j)
        o[r * K + j] = topk_slot_id(idx[r * K + j], trow, M, block_size);
    }
  });
  return out;
}

}  // namespace
}  // namespace dsa

TORCH_LIBRARY_IMPL(dsa, CPU, m) {
  m.impl("topk_indices", &dsa::topk_indices_cpu);
  m.impl("topk_slot_ids", &dsa::topk_slot_ids_cpu);
  m.impl("indexer_topk", &dsa::indexer_topk_chunked);
}
