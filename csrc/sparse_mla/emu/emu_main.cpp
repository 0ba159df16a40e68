// CPU emulation of the sparse_mla CUDA kernels: the real kernel source (sparse_mla_kernels.cuh)
// compiled by g++ against shim/ (CUDA built-ins, PTX primitives with PTX-ISA fragment
// semantics), one OS thread per CUDA thread, one CTA at a time. Checks fragment layouts,
// swizzles, masking and the deterministic reduction without a GPU (not timing, not races:
// cp.async is synchronous here). Driven from Python by run_emu.py through ctypes.
#include <memory>
#include <thread>
#include <vector>

#include "sparse_mla/sparse_mla_kernels.cuh"

namespace dsa::sparse_mla {
alignas(1024) uint8_t smem[256 * 1024];
}

using namespace dsa::sparse_mla;

template <class F>
static void run_grid(int64_t grid, int nthreads, F f) {
  blockDim.x = nthreads;
  gridDim.x = static_cast<unsigned>(grid);
  emu::smem_base = dsa::sparse_mla::smem;
  const int nwarps = (nthreads + 31) / 32;
  std::vector<uint32_t[32][8]> slots(nwarps);
  emu::xchg = slots.data();
  for (int64_t b = 0; b < grid; ++b) {
    std::memset(dsa::sparse_mla::smem, 0xff, sizeof(dsa::sparse_mla::smem));  // NaN bf16s
    std::barrier<> block(nthreads);
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::barrier<>*> wp;
    for (int w = 0; w < nwarps; ++w) {
      warps.emplace_back(new std::barrier<>(std::min(32, nthreads - 32 * w)));
      wp.push_back(warps.back().get());
    }
    emu::block_barrier = &block;
    emu::warp_barriers = wp.data();
    std::vector<std::thread> th;
    for (int i = 0; i < nthreads; ++i)
      th.emplace_back([&, i] {
        threadIdx.x = i;
        blockIdx.x = static_cast<unsigned>(b);
        f();
      });
    for (auto& t : th) t.join();
  }
}

static int head_block(int H) { return H % 64 == 0 ? 64 : (H % 32 == 0 ? 32 : 16); }

template <int HB>
static void fwd(const void* q, const void* kv, const int32_t* idx, const float* sink,
                const int32_t* len, void* out, float* lse, int64_t T, int64_t S, int H, int K,
                float scale) {
  run_grid(T * (H / HB), FwdCfg<HB>::kThreads, [&] {
    sparse_mla_fwd_kernel<HB>(static_cast<const __nv_bfloat16*>(q),
                              static_cast<const __nv_bfloat16*>(kv), idx, sink, len,
                              static_cast<__nv_bfloat16*>(out), lse, S, H, K, scale);
  });
}

template <int HB>
static void bwd_main(const void* q, const void* kv, const void* out, const void* dout,
                     const int32_t* idx, const float* lse, const float* sink, const int32_t* len,
                     void* dq, float* dkv, float* scratch, int64_t t0, int64_t tokens,
                     int64_t chunk, int64_t S, int H, int K, float scale) {
  run_grid(tokens * (H / HB), BwdCfg<HB>::kThreads, [&] {
    sparse_mla_bwd_kernel<HB>(static_cast<const __nv_bfloat16*>(q),
                              static_cast<const __nv_bfloat16*>(kv),
                              static_cast<const __nv_bfloat16*>(out),
                              static_cast<const __nv_bfloat16*>(dout), idx, lse, sink, len,
                              static_cast<__nv_bfloat16*>(dq), dkv, scratch, t0, chunk, S, H, K,
                              scale);
  });
}

extern "C" {

void emu_fwd(const void* q, const void* kv, const int32_t* idx, const float* sink,
             const int32_t* len, void* out, float* lse, int64_t T, int64_t S, int H, int K,
             float scale) {
  switch (head_block(H)) {
    case 64: fwd<64>(q, kv, idx, sink, len, out, lse, T, S, H, K, scale); break;
    case 32: fwd<32>(q, kv, idx, sink, len, out, lse, T, S, H, K, scale); break;
    default: fwd<16>(q, kv, idx, sink, len, out, lse, T, S, H, K, scale); break;
  }
}

// Mirrors sparse_mla_bwd_launch (sparse_mla_launch.cu); chunk = tokens per deterministic chunk.
void emu_bwd(const void* q, const void* kv, const void* out, const void* dout, const int32_t* idx,
             const float* lse, const float* sink, const int32_t* len, void* dq, float* dkv,
             int64_t T, int64_t S, int H, int K, float scale, int deterministic, int64_t chunk,
             float* scratch, int32_t* list, int32_t* counts, int32_t* offsets, int32_t* cursor) {
  auto main = [&](int64_t t0, int64_t tokens, int64_t ch, float* scr) {
    switch (head_block(H)) {
      case 64: bwd_main<64>(q, kv, out, dout, idx, lse, sink, len, dq, dkv, scr, t0, tokens, ch, S, H, K, scale); break;
      case 32: bwd_main<32>(q, kv, out, dout, idx, lse, sink, len, dq, dkv, scr, t0, tokens, ch, S, H, K, scale); break;
      default: bwd_main<16>(q, kv, out, dout, idx, lse, sink, len, dq, dkv, scr, t0, tokens, ch, S, H, K, scale); break;
    }
  };
  if (!deterministic) {
    main(0, T, T, nullptr);
    return;
  }
  const int nhb = H / head_block(H);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t tokens = std::min(chunk, T - t0), n = tokens * K;
    main(t0, tokens, chunk, scratch);
    if (n == 0) continue;
    std::memset(counts, 0, (S + 1) * 4);
    const int64_t blocks = (n + 255) / 256;
    run_grid(blocks, 256, [&] { count_rows_kernel(idx, len, t0, n, K, S, counts); });
    run_grid(1, kScanThreads, [&] { scan_rows_kernel(counts, S, offsets, cursor); });
    run_grid(blocks, 256, [&] { fill_rows_kernel(idx, len, t0, n, K, S, cursor, list); });
    run_grid(S, kReduceThreads, [&] {
      reduce_rows_kernel(scratch, offsets, list, n, chunk * K, nhb, dkv);
    });
  }
}
}
