// Inner products of the CPU kernels: which arithmetic the CPU does fast, and the bf16 GEMM.
//
// Where oneDNN's brgemm micro-kernel takes bf16 (AMX / AVX512-BF16 parts: at::native::cpublas
// reports it through could_pack), bf16 x bf16 products accumulate in fp32 at several times the
// fp32 FMA rate; the product of two bf16 values is exact in fp32, so for operands that are
// exactly bf16 (bf16 inputs, decoded FP8) the result is an fp32-accumulated dot product.
// Elsewhere (AVX2-only parts, where torch emulates bf16 matmul) the kernels use fp32 tiles and
// MKL's sgemm through at::mm. DSA_CPU_GEMM=fp32 forces the fp32 path (for testing both).
//
// One brgemm call is single-threaded and its summation order depends only on the shapes, so
// results do not depend on the number of threads. B operands are packed in the VNNI layout
// brgemm reads for bf16: element (k, n) of a [K, N] matrix at ((k / 2) * ldb + n) * 2 + k % 2,
// K padded to even with zeros.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>

#include "common/fp8_cpu.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <cstdlib>
#include <cstring>

namespace dsa::cpu {

// True where the kernels should run their GEMMs as bf16 brgemm (probed once per process).
inline bool use_bf16_brgemm() {
  static const bool fast = [] {
    const char* force = std::getenv("DSA_CPU_GEMM");
    if (force && std::strcmp(force, "fp32") == 0) return false;
    return at::native::cpublas::could_pack(at::kBFloat16);
  }();
  return fast;
}

// Releases the AMX tile state a thread's brgemm calls configured; call once a task is done.
struct BrgemmScope {
  ~BrgemmScope() { at::native::cpublas::brgemm_release(); }
};

// C[M, N] (fp32, ldc) = (add ? C : 0) + A[M, K] (bf16, lda, row-major) @ B (VNNI, ldb).
// K even (callers pad A's rows and B's pair-rows with zeros).
inline void bf16_gemm(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda,
                      const c10::BFloat16* B_vnni, int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B_vnni, C, /*is_vnni=*/true);
}


// Column n of a VNNI B whose columns are vectors (B[k, n] = col[k]): the QK^T operand, one key
// per column. K values of col, K even.
inline void vnni_store_column(const c10::BFloat16* col, int64_t K, c10::BFloat16* B, int64_t ldb,
                              int64_t n) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(B);
  for (int64_t i = 0; i < K / 2; ++i) {
    uint32_t pair;
    std::memcpy(&pair, col + 2 * i, sizeof(pair));
    dst[i * ldb + n] = pair;
  }
}

// Rows k and k+1 of a VNNI B whose rows are vectors (B[k, n] = row_k[n]): the PV operand, one
// key per row. row1 may be null (a zero row: odd K padded). Written as 32-bit words so that the
// compiler vectorises the interleave.
inline void vnni_store_row_pair(const c10::BFloat16* row0, const c10::BFloat16* row1, int64_t N,
                                c10::BFloat16* B, int64_t ldb, int64_t k_pair) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(B) + k_pair * ldb;
  const uint16_t* a = reinterpret_cast<const uint16_t*>(row0);
  const uint16_t* b = reinterpret_cast<const uint16_t*>(row1);
  if (b) {
    for (int64_t n = 0; n < N; ++n) dst[n] = uint32_t(a[n]) | (uint32_t(b[n]) << 16);
  } else {
    for (int64_t n = 0; n < N; ++n) dst[n] = uint32_t(a[n]);
  }
}

// B = Mᵀ in VNNI for M [R, K] row-major bf16 (ldm): B[k, r] = M[r, k], ldb = R, K even. The Qᵀ
// and dOᵀ operands (R = heads).
inline void vnni_store_transposed(const c10::BFloat16* M, int64_t R, int64_t K, int64_t ldm,
                                  c10::BFloat16* B) {
  for (int64_t r = 0; r < R; ++r) vnni_store_column(M + r * ldm, K, B, R, r);
}

// e4m3 bytes times a power-of-two scale (1 for plain decoding) through the fp32 table of
// fp8_cpu.h (one load per byte: faster here than bit arithmetic, which gcc does not vectorise
// without ISA flags). With a power-of-two scale in a safe range (callers check) every product
// has at most 4 significant bits, so its upper half is the exact bf16: no rounding step.
inline void fp8_e4m3_to_float(const uint8_t* src, float scale, float* dst, int64_t n) {
  const auto& lut = fp8_e4m3_table();
  if (scale == 1.f) {
    for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]];
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = lut[src[i]] * scale;
  }
}

inline void fp8_e4m3_to_bf16(const uint8_t* src, float scale, c10::BFloat16* dst, int64_t n) {
  const auto& lut = fp8_e4m3_table();
  uint16_t* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) {
    const float f = lut[src[i]] * scale;
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    out[i] = static_cast<uint16_t>(bits >> 16);
  }
}

// Every e4m3 value as bf16 (exact: e4m3's 3 mantissa bits and exponent range fit in bf16).
inline const std::array<c10::BFloat16, 256>& fp8_e4m3_bf16_table() {
  static const std::array<c10::BFloat16, 256> table = [] {
    std::array<c10::BFloat16, 256> t{};
    for (int b = 0; b < 256; ++b)
      t[b] = c10::BFloat16(static_cast<float>(
          c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits())));
    return t;
  }();
  return table;
}

// dst[i] = bf16(src[i]) (round to nearest even) through ATen's vectorised copy: this file is
// built without ISA flags, and the scalar conversion dominates small GEMMs' epilogues.
inline void to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  if (n <= 0) return;
  at::Tensor d = at::from_blob(dst, {n}, at::TensorOptions().dtype(at::kBFloat16));
  d.copy_(at::from_blob(const_cast<float*>(src), {n}, at::TensorOptions().dtype(at::kFloat)));
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace dsa::cpu
