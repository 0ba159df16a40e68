// Runs topk_radix_kernel (topk_kernels.cuh, unchanged source) on the host: every CUDA thread is
// a std::thread, a cluster's CTAs run concurrently, __syncthreads / cluster.sync are barriers,
// warp shuffles and ballots exchange through per-warp slots, distributed shared memory maps
// to the peer CTA's copy. Checks each row against an exact stable-sort reference and that no
// write lands outside the output. Used by tests/test_topk.py on machines without a GPU; it
// checks the kernel's logic (indexing, ties, cluster offsets, streaming fallback, sort), not
// GPU memory ordering or performance.
//
//   g++ -std=c++20 -O1 -pthread -DDSA_TOPK_HOST_EMULATION -Icsrc \
//       csrc/topk/emulation/topk_emulate.cpp -o topk_emulate && ./topk_emulate [quick|full|fuzz N]
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "topk/topk_kernels.cuh"

using namespace dsa;

namespace {
constexpr int kMaxCs = topk::kMaxCluster;
unsigned g_cs = 1;
thread_local unsigned t_rank = 0;
alignas(16) uint32_t g_dyn[kMaxCs][(topk::kMaxCacheKeys + 4 > 2 * topk::kMaxSortK ? topk::kMaxCacheKeys + 4 : 2 * topk::kMaxSortK)];
topk::TopkShared g_sh[kMaxCs];
std::unique_ptr<std::barrier<>> g_cluster_bar, g_block_bar[kMaxCs], g_warp_bar[kMaxCs][topk::kWarps];
uint32_t g_slots[kMaxCs][topk::kWarps][32];
}  // namespace

thread_local EmulatedDim3 threadIdx, blockIdx;
EmulatedDim3 blockDim, gridDim;

namespace dsa {
namespace topk {
uint32_t* emulated_dynamic_smem() { return g_dyn[t_rank]; }
TopkShared& emulated_shared() { return g_sh[t_rank]; }
unsigned cluster_rank() { return t_rank; }
unsigned cluster_size() { return g_cs; }
void cluster_sync() { g_cluster_bar->arrive_and_wait(); }
void* emulated_peer(void* p, unsigned r) {
  char* c = static_cast<char*>(p);
  char* mine = reinterpret_cast<char*>(&g_sh[t_rank]);
  if (r >= g_cs || c < mine || c >= mine + sizeof(TopkShared)) {
    std::fprintf(stderr, "bad distributed shared memory access\n");
    std::abort();
  }
  return reinterpret_cast<char*>(&g_sh[r]) + (c - mine);
}
}  // namespace topk
}  // namespace dsa

void __syncthreads() { g_block_bar[t_rank]->arrive_and_wait(); }

uint32_t __shfl_down_sync(unsigned, uint32_t v, int off) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  g_slots[t_rank][w][l] = v;
  g_warp_bar[t_rank][w]->arrive_and_wait();
  const uint32_t r = l + off < 32 ? g_slots[t_rank][w][l + off] : v;
  g_warp_bar[t_rank][w]->arrive_and_wait();
  return r;
}

uint32_t __ballot_sync(unsigned, bool pred) {
  const int w = threadIdx.x / 32, l = threadIdx.x % 32;
  g_slots[t_rank][w][l] = pred ? 1u : 0u;
  g_warp_bar[t_rank][w]->arrive_and_wait();
  uint32_t b = 0;
  for (int i = 0; i < 32; ++i) b |= g_slots[t_rank][w][i] << i;
  g_warp_bar[t_rank][w]->arrive_and_wait();
  return b;
}

namespace {

// One cluster of cs CTAs at a time, over `rows` rows (grid = rows * cs).
void run_grid(const topk::TopkParams& p, int rows, unsigned cs) {
  g_cs = cs;
  g_cluster_bar = std::make_unique<std::barrier<>>(cs * topk::kBlock);
  for (unsigned r = 0; r < cs; ++r) {
    g_block_bar[r] = std::make_unique<std::barrier<>>(topk::kBlock);
    for (int w = 0; w < topk::kWarps; ++w) g_warp_bar[r][w] = std::make_unique<std::barrier<>>(32);
  }
  std::vector<std::thread> threads;
  for (unsigned r = 0; r < cs; ++r)
    for (int t = 0; t < topk::kBlock; ++t)
      threads.emplace_back([&p, rows, cs, r, t] {
        threadIdx.x = t;
        t_rank = r;
        for (int row = 0; row < rows; ++row) {
          blockIdx.x = row * cs + r;
          topk::topk_radix_kernel(p);
          g_cluster_bar->arrive_and_wait();
        }
      });
  for (auto& th : threads) th.join();
}

std::vector<int32_t> reference(const float* row, int64_t lo, int64_t hi, int k) {
  std::vector<int32_t> idx;
  for (int64_t i = lo; i < hi; ++i) idx.push_back(static_cast<int32_t>(i));
  auto key = [&](int32_t i) { return topk_key_from_bits(std::bit_cast<uint32_t>(row[i])); };
  std::stable_sort(idx.begin(), idx.end(), [&](int32_t a, int32_t b) { return key(a) > key(b); });
  idx.resize(std::min<size_t>(idx.size(), k));
  while (static_cast<int>(idx.size()) < k) idx.push_back(-1);
  return idx;
}

struct Case {
  int64_t S;
  int k;
  int kind;  // 0 normal, 1 four values, 2 all equal, 3 low 10 bits, 4 NaN/-inf/-0 mix
  bool sorted;
  int cache_keys;  // < slice: the streaming (no cache) path
  int64_t pad;     // row stride = S + pad
  bool ragged;
  unsigned cs;
};

}  // namespace

int main(int argc, char** argv) {
  const bool full = argc > 1 && std::string(argv[1]) == "full";
  std::vector<Case> cases = {
      {5000, 64, 0, false, 20480, 0, false, 1},   {5000, 64, 0, true, 20480, 3, true, 1},
      {20000, 2048, 1, true, 20480, 1, false, 1}, {20000, 2048, 2, false, 20480, 2, true, 2},
      {9000, 4096, 3, true, 20480, 0, true, 1},   {9000, 700, 4, true, 20480, 5, false, 2},
      {9000, 700, 1, false, 1000, 1, true, 1},    {20000, 2048, 1, true, 20480, 3, true, 4},
      {30000, 4096, 1, false, 3000, 5, true, 4},  {50, 4, 1, false, 20480, 1, true, 4},
      {100, 1, 1, true, 20480, 1, true, 1},       {6000, 1, 2, false, 20480, 2, false, 2},
  };
  if (full) {
    cases.push_back({40000, 2048, 2, true, 20480, 1, false, 16});
    cases.push_back({12000, 2048, 1, false, 20480, 2, false, 16});
    cases.push_back({30000, 2048, 0, true, 20480, 7, false, 1});
    cases.push_back({6000, 2048, 4, false, 20480, 3, true, 8});
    cases.push_back({3000, 4096, 0, true, 20480, 0, false, 4});
  }
  std::mt19937 rng(123);
  if (argc > 2 && std::string(argv[1]) == "fuzz") {  // N random cases (clusters of 1-4 CTAs)
    const int n = std::atoi(argv[2]);
    cases.clear();
    for (int i = 0; i < n; ++i) {
      Case c;
      c.S = 1 + rng() % 25000;
      c.k = 1 + rng() % 4096;
      c.kind = rng() % 5;
      c.sorted = rng() % 2;
      c.cache_keys = rng() % 3 == 0 ? 1 + rng() % 5000 : topk::kMaxCacheKeys;
      c.pad = rng() % 9;
      c.ragged = rng() % 2;
      c.cs = 1u << (rng() % 3);
      cases.push_back(c);
    }
  }
  const int T = 2;
  int fails = 0, rows = 0;
  for (const Case& c : cases) {
    const int64_t stride = c.S + c.pad;
    std::vector<float> buf(T * stride + 8);
    float* x = buf.data() + 1;  // rows start off 16-byte alignment: the scalar head runs
    std::normal_distribution<float> nd;
    for (int64_t i = 0; i < T * stride; ++i) {
      float v = nd(rng);
      if (c.kind == 1) v = static_cast<float>(rng() % 4);
      if (c.kind == 2) v = 0.25f;
      if (c.kind == 3) v = std::bit_cast<float>(static_cast<uint32_t>(0x3F800000u | (rng() & 1023u)));
      if (c.kind == 4) {
        const uint32_t r = rng() % 10;
        v = r < 3 ? NAN : r < 5 ? -INFINITY : r < 6 ? -0.0f : v;
      }
      x[i] = v;
    }
    std::vector<int32_t> ks(T), ke(T);
    for (int t = 0; t < T; ++t) {
      ks[t] = c.ragged ? static_cast<int32_t>(rng() % (c.S / 2 + 1)) - 3 : 0;
      ke[t] = c.ragged ? ks[t] + static_cast<int32_t>(rng() % c.S) : static_cast<int32_t>(c.S);
    }
    std::vector<int32_t> out(T * c.k + 64, -77);
    topk::TopkParams p{x, stride, c.S, c.ragged ? ks.data() : nullptr, c.ragged ? ke.data() : nullptr,
                       out.data(), c.k, c.cache_keys, c.sorted};
    run_grid(p, T, c.cs);
    for (int j = T * c.k; j < T * c.k + 64; ++j)
      if (out[j] != -77) {
        std::printf("FAIL write past the output (S=%ld k=%d cs=%u)\n", long(c.S), c.k, c.cs);
        ++fails;
        break;
      }
    for (int t = 0; t < T; ++t) {
      int64_t lo, hi;
      topk_row_range(p.ks, p.ke, t, c.S, lo, hi);
      std::vector<int32_t> want = reference(x + t * stride, lo, hi, c.k);
      std::vector<int32_t> got(out.begin() + t * c.k, out.begin() + (t + 1) * c.k);
      if (!c.sorted) {
        std::sort(want.begin(), want.end());
        std::sort(got.begin(), got.end());
      }
      ++rows;
      if (got != want) {
        ++fails;
        int bad = 0;
        for (int j = 0; j < c.k; ++j) bad += got[j] != want[j];
        std::printf("FAIL S=%ld k=%d kind=%d sorted=%d cache=%d cs=%u row=%d [%ld,%ld): %d mismatches\n",
                    long(c.S), c.k, c.kind, int(c.sorted), c.cache_keys, c.cs, t, long(lo), long(hi), bad);
      }
    }
  }
  std::printf("%d/%d rows ok\n", rows - fails, rows);
  return fails != 0;
}
