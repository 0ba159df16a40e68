// Kernels that exercise the PTX primitives of csrc/common through the emulator (tests/
// test_emu_ptx.py compares them with torch): ldmatrix (+ .trans) feeding mma.sync bf16 and
// e4m3, wgmma bf16 / e4m3 over every descriptor layout (K- and MN-major, no swizzle / 32B /
// 64B / 128B, a start address inside a swizzled row), scale-d / imm-scale, the register-A
// form, chained wgmmas, and the hazards the primitives must report. Plus the host-side
// conversions of the bf16 / fp16 / fp8 shims. Launched through <<<>>> like the launchers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "common/mma_sm80.cuh"
#include "common/wgmma_sm90.cuh"

namespace {

using emu::ptx::Coord;
using emu::ptx::WgmmaType;

// ---- mma.sync: one warp, D = C + A B from fragments loaded by ldmatrix ------------------------
// bf16 (kFp8 false): A 16x16 row-major, B given as 16 (k) x 8 (n) row-major when `b_kn` (loaded
// with ldmatrix .trans) or as 8 (n) x 16 (k) (plain ldmatrix). e4m3: A 16x32, B 8 (n) x 32 (k).
// `misalign` offsets lane 3's ldmatrix row address by 8 bytes.
template <bool kFp8>
__global__ void mma_sync_kernel(const uint8_t* a, const uint8_t* b, const float* c, float* d, bool b_kn,
                                bool misalign) {
  DSA_DYNAMIC_SMEM(smem, 16);
  const int lane = threadIdx.x;
  constexpr int kRowBytes = 32;  // 16 bf16 or 32 e4m3 of K per row
  uint8_t* a_s = smem;
  uint8_t* b_s = smem + 16 * kRowBytes;
  for (int i = lane; i < 16 * kRowBytes / 4; i += 32) reinterpret_cast<uint32_t*>(a_s)[i] = reinterpret_cast<const uint32_t*>(a)[i];
  for (int i = lane; i < 8 * kRowBytes / 4; i += 32) reinterpret_cast<uint32_t*>(b_s)[i] = reinterpret_cast<const uint32_t*>(b)[i];
  __syncwarp();
  uint32_t af[4], bf[2];
  // Matrices: rows 0-7 / 8-15 of the first 16 bytes, then of the second 16 bytes of K.
  dsa::ldmatrix_x4(af, a_s + (lane & 15) * kRowBytes + 16 * (lane >> 4) + (misalign && lane == 3 ? 8 : 0));
  if (!kFp8 && b_kn) {
    uint32_t r[2];
    dsa::ldmatrix_x2_trans(r, dsa::smem_u32(b_s + (lane & 15) * 16));  // 16 rows of k, 8 n each
    bf[0] = r[0], bf[1] = r[1];
  } else {
    dsa::ldmatrix_x2(bf, b_s + (lane & 7) * kRowBytes + 16 * ((lane >> 3) & 1));
  }
  float acc[4];
  for (int i = 0; i < 4; ++i) {
    const Coord p = emu::ptx::mma_fragment_coord(WgmmaType::kBF16, 'C', lane, i);
    acc[i] = c[p.row * 8 + p.col];
  }
  if constexpr (kFp8) dsa::mma_e4m3_16832(acc, af, bf[0], bf[1]);
  else dsa::mma_bf16_16816(acc, af, bf[0], bf[1]);
  for (int i = 0; i < 4; ++i) {
    const Coord p = emu::ptx::mma_fragment_coord(WgmmaType::kBF16, 'C', lane, i);
    d[p.row * 8 + p.col] = acc[i];
  }
}

// ---- wgmma: one warpgroup -----------------------------------------------------------------------

struct WgmmaCase {
  int type;        // WgmmaType
  int n;           // N
  int swizzle;     // descriptor mode of both operands: 0 none, 1 128B, 2 64B, 3 32B
  int trans_a, trans_b;  // 1: MN-major
  int start_shift;  // bytes added to both start addresses (inside a swizzled row)
  int scale_d, scale_a, scale_b;
  int register_a;   // the register-A form
  int chain;        // a second wgmma onto the same accumulator before the wait (D = C + 2AB)
  int skip_fence;   // no fence.proxy.async after the operand stores (a proxy-fence hazard)
  int early_read;   // read the accumulator before wgmma.wait_group (a pending-wgmma hazard)
  int wrapper;      // 1: through dsa::wgmma_m64n64k16_kmajor_b / _m64n256k16_nmajor_b /
                    //    _m64n128k32_e4m3 (the product's helpers) instead of emu::ptx::wgmma_ss
};

// Canonical descriptor of an MN x K operand (K = 32 bytes) at `start` (PTX 9.7.15.5.1.2).
__device__ uint64_t make_desc(uint32_t start, int mn, int eb, int swizzle, bool mn_major) {
  static constexpr int kWidth[4] = {0, 128, 64, 32};
  const int w = kWidth[swizzle];
  uint32_t lbo, sbo;
  if (!mn_major) {
    lbo = w ? 16 : (mn / 8) * 128;  // none: K chunk stride; swizzled: unused
    sbo = w ? 8 * w : 128;
  } else if (!w) {
    sbo = 128;                       // next 16 bytes of MN
    lbo = (mn * eb / 16) * 128;      // next 8 of K
  } else {
    lbo = 8 * w;                     // next W bytes of MN
    sbo = 8 * w * (mn * eb / w);     // next 8 of K
  }
  return static_cast<uint64_t>((start & 0x3FFFF) >> 4) | static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32 | static_cast<uint64_t>(swizzle) << 62;
}

// An ordinary (generic-proxy) store of one 1- or 2-byte element.
__device__ void store_element(uint8_t* dst, const uint8_t* src, int eb) {
  if (eb == 2) *reinterpret_cast<uint16_t*>(dst) = *reinterpret_cast<const uint16_t*>(src);
  else *dst = *src;
}

// Shared memory: A at 0 (at most 64 rows x 128 B), B at 8 KB (at most 256 rows x 128 B).
// a: A[64][K] raw elements, b: B[n][K] raw elements (row n holds column n of B), c/d: [64][n].
__global__ void wgmma_kernel(const uint8_t* a, const uint8_t* b, const float* c, float* d, WgmmaCase cs) {
  DSA_DYNAMIC_SMEM(smem, 1024);
  const int t = threadIdx.x;
  const WgmmaType type = static_cast<WgmmaType>(cs.type);
  const int eb = type == WgmmaType::kBF16 ? 2 : 1, K = 32 / eb;
  const uint32_t base = dsa::smem_u32(smem);
  const uint32_t a_start = base + cs.start_shift, b_start = base + 8192 + cs.start_shift;
  const uint64_t da = make_desc(a_start, 64, eb, cs.swizzle, cs.trans_a), db = make_desc(b_start, cs.n, eb, cs.swizzle, cs.trans_b);
  // Each element goes where the descriptor says the hardware reads it (the address map itself
  // is checked against CuTe in test_emu_cute_layouts.py).
  for (int e = t; e < 64 * K; e += 128) {
    const uint32_t at = emu::ptx::wgmma_smem_offset(da, e / K, e % K, eb, cs.trans_a);
    store_element(smem + (at - base), a + e * eb, eb);
  }
  for (int e = t; e < cs.n * K; e += 128) {
    const uint32_t at = emu::ptx::wgmma_smem_offset(db, e / K, e % K, eb, cs.trans_b);
    store_element(smem + (at - base), b + e * eb, eb);
  }
  if (!cs.skip_fence) dsa::fence_proxy_async_smem();
  __syncthreads();
  float acc[128];
  for (int i = 0; i < cs.n / 2; ++i) {
    const Coord p = emu::ptx::wgmma_accumulator_coord(t, i);
    acc[i] = c[p.row * cs.n + p.col];
  }
  uint32_t ar[4] = {0, 0, 0, 0};
  if (cs.register_a)
    for (int i = 0; i < 4 * (4 / eb); ++i) {
      const Coord p = emu::ptx::wgmma_a_fragment_coord(type, t, i);
      uint32_t v = 0;
      std::memcpy(&v, a + (p.row * K + p.col) * eb, eb);
      ar[i / (4 / eb)] |= v << (8 * eb * (i % (4 / eb)));
    }
  dsa::wgmma_fence();
  for (int rep = 0; rep < 1 + cs.chain; ++rep) {
    const bool scale_d = cs.scale_d || rep > 0;
    if (cs.wrapper && type == WgmmaType::kE4M3)
      dsa::wgmma_m64n128k32_e4m3(*reinterpret_cast<float(*)[16][4]>(acc), da, db, scale_d);
    else if (cs.wrapper && cs.n == 64)
      dsa::wgmma_m64n64k16_kmajor_b(*reinterpret_cast<float(*)[32]>(acc), da, db, scale_d);
    else if (cs.wrapper)
      dsa::wgmma_m64n256k16_nmajor_b(*reinterpret_cast<float(*)[128]>(acc), da, db, scale_d);
    else if (cs.register_a)
      emu::ptx::wgmma_rs(acc, cs.n, type, ar, db, scale_d, cs.scale_a, cs.scale_b, cs.trans_b);
    else
      emu::ptx::wgmma_ss(acc, cs.n, type, da, db, scale_d, cs.scale_a, cs.scale_b, cs.trans_a, cs.trans_b);
  }
  dsa::wgmma_commit();
  if (cs.early_read) {
    volatile float early = acc[0];
    (void)early;
  }
  dsa::wgmma_wait_all();
  for (int i = 0; i < cs.n / 2; ++i) {
    const Coord p = emu::ptx::wgmma_accumulator_coord(t, i);
    d[p.row * cs.n + p.col] = acc[i];
  }
}

}  // namespace

extern "C" {

int emu_ptx_mma_sync(const uint8_t* a, const uint8_t* b, const float* c, float* d, int fp8, int b_kn, int misalign) {
  if (fp8) mma_sync_kernel<true><<<1, 32, 1024>>>(a, b, c, d, b_kn != 0, misalign != 0);
  else mma_sync_kernel<false><<<1, 32, 1024>>>(a, b, c, d, b_kn != 0, misalign != 0);
  return cudaGetLastError();
}

// cs: the WgmmaCase fields in order.
int emu_ptx_wgmma(const uint8_t* a, const uint8_t* b, const float* c, float* d, const int* cs) {
  WgmmaCase w;
  std::memcpy(&w, cs, sizeof w);
  wgmma_kernel<<<1, 128, 41 * 1024>>>(a, b, c, d, w);
  return cudaGetLastError();
}

// The shims' conversions of x[0, n), as the kernels call them.
void emu_ptx_convert(const float* x, int n, uint16_t* bf16, uint16_t* f16, uint8_t* e4m3_sat, uint8_t* e4m3_nosat,
                     uint8_t* e5m2_sat, uint8_t* e5m2_nosat, uint32_t* e4m3x2_sat) {
  for (int i = 0; i < n; ++i) {
    bf16[i] = __float2bfloat16_rn(x[i]).__x;
    f16[i] = __float2half_rn(x[i]).__x;
    e4m3_sat[i] = __nv_cvt_float_to_fp8(x[i], __NV_SATFINITE, __NV_E4M3);
    e4m3_nosat[i] = __nv_cvt_float_to_fp8(x[i], __NV_NOSAT, __NV_E4M3);
    e5m2_sat[i] = __nv_cvt_float_to_fp8(x[i], __NV_SATFINITE, __NV_E5M2);
    e5m2_nosat[i] = __nv_cvt_float_to_fp8(x[i], __NV_NOSAT, __NV_E5M2);
    e4m3x2_sat[i] = __nv_cvt_float2_to_fp8x2(make_float2(x[i], -x[i]), __NV_SATFINITE, __NV_E4M3);
  }
}

// Every code of a format back to float (bf16/f16: 65536 codes, fp8: 256), as the shims do.
void emu_ptx_decode(float* bf16, float* f16, float* e4m3, float* e5m2) {
  for (int c = 0; c < 65536; ++c) {
    bf16[c] = __bfloat162float(__nv_bfloat16(__nv_bfloat16_raw{static_cast<unsigned short>(c)}));
    f16[c] = __half2float(__half(__half_raw{static_cast<unsigned short>(c)}));
  }
  for (int c = 0; c < 256; ++c) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(c | c << 8), __NV_E4M3);
    e4m3[c] = __half2float(__half(__half_raw{h.x}));
    e5m2[c] = __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), __NV_E5M2)));
  }
}

}  // extern "C"
