// PTX-ISA semantics of the primitives in csrc/emu/ptx.h (see there for the numerics). Compiled
// without instrumentation: the operand traffic of ldmatrix / wgmma / st.shared is made visible
// to the race, pending, bounds and proxy checks explicitly, through emu::smem_read/smem_write on
// behalf of the thread the hardware reads or writes for. Section numbers: PTX ISA 8.x.
#include "emu/ptx.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "emu/emu.h"

namespace emu::ptx {
namespace {

constexpr uint32_t kFullWarp = 0xffffffffu;

uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---- small binary floating-point formats (PTX 5.2.5) -----------------------------------------
// `ieee`: the all-ones exponent is inf/NaN (f16, e5m2); otherwise (e4m3) only all-ones is NaN
// and the all-ones exponent holds finite values.
struct MiniFloat {
  int ebits, mbits;
  bool ieee;
  int bias() const { return (1 << (ebits - 1)) - 1; }
  uint32_t sign_bit() const { return 1u << (ebits + mbits); }
  uint32_t nan_code() const { return sign_bit() - 1; }  // all ones: the canonical NaN
  uint32_t inf_code() const { return ((1u << ebits) - 1) << mbits; }
  uint32_t max_code() const { return ieee ? inf_code() - 1 : nan_code() - 1; }
  double decode(uint32_t c) const {
    const bool neg = c & sign_bit();
    c &= sign_bit() - 1;
    const uint32_t e = c >> mbits, m = c & ((1u << mbits) - 1);
    double v;
    if (!ieee && c == nan_code()) v = std::nan("");
    else if (ieee && e == (1u << ebits) - 1) v = m ? std::nan("") : INFINITY;
    else if (e == 0) v = std::ldexp(static_cast<double>(m), 1 - bias() - mbits);
    else v = std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -mbits), static_cast<int>(e) - bias());
    return neg ? -v : v;
  }
  // Round to nearest even (cvt .rn); an overflow saturates to the largest finite value with
  // `satfinite`, else is inf (ieee) or NaN.
  uint32_t encode(float f, bool satfinite) const {
    const uint32_t sign = std::signbit(f) ? sign_bit() : 0;
    if (std::isnan(f)) return sign | nan_code();
    const uint32_t overflow = satfinite ? max_code() : (ieee ? inf_code() : nan_code());
    const double a = std::fabs(static_cast<double>(f));
    if (std::isinf(a)) return sign | overflow;
    const int min_normal_exp = 1 - bias();
    int quantum_exp = min_normal_exp - mbits;  // subnormal spacing
    if (a >= std::ldexp(1.0, min_normal_exp)) quantum_exp = std::ilogb(a) - mbits;
    const double r = std::ldexp(std::nearbyint(std::ldexp(a, -quantum_exp)), quantum_exp);  // exact, RNE
    if (r > decode(max_code())) return sign | overflow;
    if (r < std::ldexp(1.0, min_normal_exp))  // subnormal (2^mbits quanta = the smallest normal's code)
      return sign | static_cast<uint32_t>(std::ldexp(r, -(min_normal_exp - mbits)));
    const int e = std::ilogb(r);
    const uint32_t m = static_cast<uint32_t>(std::ldexp(std::ldexp(r, -e) - 1.0, mbits));
    return sign | static_cast<uint32_t>(e + bias()) << mbits | m;
  }
};
constexpr MiniFloat kF16{5, 10, true}, kE4M3{4, 3, false}, kE5M2{5, 2, true};

float bf16_lo(uint32_t v) { return bf16_to_float(static_cast<uint16_t>(v & 0xFFFF)); }
float bf16_hi(uint32_t v) { return bf16_to_float(static_cast<uint16_t>(v >> 16)); }
// Element `i` of a packed register: bf16 pairs (low half first) or e4m3 quads (low byte first).
float unpack(WgmmaType type, uint32_t reg, int i) {
  if (type == WgmmaType::kBF16) return i ? bf16_hi(reg) : bf16_lo(reg);
  return fp8_to_float(static_cast<uint8_t>(reg >> (8 * i)), false);
}
int per_reg(WgmmaType type) { return type == WgmmaType::kBF16 ? 2 : 4; }
int elem_bytes(WgmmaType type) { return type == WgmmaType::kBF16 ? 2 : 1; }
int k_of(WgmmaType type) { return type == WgmmaType::kBF16 ? 16 : 32; }

int group_base(int scope) { return self().tid / scope * scope; }

}  // namespace

// ---- conversions (PTX 9.7.9.21 cvt) --------------------------------------------------------------

uint16_t float_to_bf16_rn(float f) {
  const uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7FFF;  // canonical NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  // RNE; overflow -> inf
}
float bf16_to_float(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
uint16_t float_to_f16_rn(float f) { return static_cast<uint16_t>(kF16.encode(f, false)); }
float f16_to_float(uint16_t h) { return static_cast<float>(kF16.decode(h)); }
uint8_t float_to_fp8(float f, bool e5m2, bool satfinite) {
  return static_cast<uint8_t>((e5m2 ? kE5M2 : kE4M3).encode(f, satfinite));
}
float fp8_to_float(uint8_t v, bool e5m2) { return static_cast<float>((e5m2 ? kE5M2 : kE4M3).decode(v)); }
uint16_t fp8_to_f16(uint8_t v, bool e5m2) { return float_to_f16_rn(fp8_to_float(v, e5m2)); }

// ---- fragment layouts ------------------------------------------------------------------------

// PTX 9.7.14.5.8 (m16n8k16, .bf16) and 9.7.14.5.9 (m16n8k32, .e4m3): groupID = lane / 4,
// threadID_in_group = lane % 4; i = element index over the registers (packed low first).
Coord mma_fragment_coord(WgmmaType type, char operand, int lane, int i) {
  const int g = lane >> 2, c = lane & 3;
  if (operand == 'C') return {g + 8 * (i >> 1), 2 * c + (i & 1)};
  if (type == WgmmaType::kBF16) {
    if (operand == 'A') return {g + 8 * ((i >> 1) & 1), 2 * c + (i & 1) + 8 * (i >> 2)};
    return {2 * c + (i & 1) + 8 * (i >> 1), g};  // 'B': (k, n)
  }
  if (operand == 'A') return {g + 8 * ((i >> 2) & 1), 4 * c + (i & 3) + 16 * (i >> 3)};
  return {4 * c + (i & 3) + 16 * (i >> 2), g};
}

// PTX 9.7.14.5.15: lane l holds row l / 4, elements 2 (l % 4) + {0, 1}; .trans transposes.
Coord ldmatrix_coord(int lane, int half, bool trans) {
  const Coord c{lane >> 2, 2 * (lane & 3) + half};
  return trans ? Coord{c.col, c.row} : c;
}

// PTX 9.7.15.5.1.1 "Register Fragments", accumulator D of m64nNk*: warp w of the warpgroup
// owns rows 16w..16w+15 in the m16n8 C layout, repeated over the N/8 column tiles.
Coord wgmma_accumulator_coord(int thread, int i) {
  const int w = thread >> 5, lane = thread & 31;
  const Coord c = mma_fragment_coord(WgmmaType::kBF16, 'C', lane, i & 3);
  return {16 * w + c.row, 8 * (i >> 2) + c.col};
}

// PTX 9.7.15.5.1.1 "Register Fragments", A of m64nNk16 (.bf16) / m64nNk32 (.e4m3): warp w
// holds rows 16w..16w+15 in the mma.sync m16 A layout of the same type.
Coord wgmma_a_fragment_coord(WgmmaType type, int thread, int i) {
  const Coord c = mma_fragment_coord(type, 'A', thread & 31, i);
  return {16 * (thread >> 5) + c.row, c.col};
}

// PTX 9.7.15.5.1.2.2 "Matrix Descriptor Format".
MatrixDescriptor decode_descriptor(uint64_t d) {
  MatrixDescriptor m;
  m.start = static_cast<uint32_t>(d & 0x3FFF) << 4;
  m.lbo = static_cast<uint32_t>((d >> 16) & 0x3FFF) << 4;
  m.sbo = static_cast<uint32_t>((d >> 32) & 0x3FFF) << 4;
  m.base = static_cast<uint32_t>((d >> 49) & 0x7);
  m.swizzle = static_cast<int>((d >> 62) & 0x3);
  return m;
}

// PTX 9.7.15.5.1.2 "Shared Memory Matrix Layout": an operand is built of core matrices of 8
// rows x 16 bytes. K-major: a core matrix row is 16 bytes of K at one M/N index; without
// swizzle its 8 rows are contiguous, LBO steps along K between core matrices and SBO along
// M/N between 8-row groups; with a W-byte swizzle (W = 128/64/32) a row holds W bytes of K
// (the instruction's K always fits), rows are W bytes apart and SBO steps 8-row groups.
// MN-major (bf16 only, the transpose immediates): a core matrix row is 16 bytes of M/N at one
// K; without swizzle SBO steps along M/N between core matrices and LBO along K between groups
// of 8 K; with a swizzle a row holds W bytes of M/N, LBO steps along M/N between W-byte
// columns and SBO along K between groups of 8. The swizzle then permutes the 16-byte chunks of
// each 128-byte line: address bits [4, 4 + log2(W/16)) ^= bits [7, ...) (CuTe Swizzle<3,4,3>,
// <2,4,3>, <1,4,3>), applied to the absolute shared address as TMA writes it.
uint32_t wgmma_smem_offset(uint64_t desc, int mn, int k, int eb, bool mn_major) {
  const MatrixDescriptor d = decode_descriptor(desc);
  const int per16 = 16 / eb;
  static constexpr int kWidth[4] = {0, 128, 64, 32};
  const int w = kWidth[d.swizzle];
  uint32_t a;
  if (!mn_major) {
    if (!w) a = d.start + (mn % 8) * 16 + (mn / 8) * d.sbo + (k / per16) * d.lbo + (k % per16) * eb;
    else a = d.start + (mn % 8) * w + (mn / 8) * d.sbo + k * eb;
  } else {
    if (!w) a = d.start + (mn % per16) * eb + (mn / per16) * d.sbo + (k % 8) * 16 + (k / 8) * d.lbo;
    else {
      const int per_row = w / eb;
      a = d.start + (mn % per_row) * eb + (mn / per_row) * d.lbo + (k % 8) * w + (k / 8) * d.sbo;
    }
  }
  if (w) {
    const uint32_t mask = static_cast<uint32_t>(w / 16 - 1);
    a ^= ((a >> 7) & mask) << 4;
  }
  return a;
}

// ---- ldmatrix (PTX 9.7.14.5.15) ----------------------------------------------------------------

void ldmatrix(uint32_t* r, int num, bool trans, uint32_t addr) {
  const int base = group_base(32);
  uint32_t out[4] = {0, 0, 0, 0};
  emu::collective(trans ? "ldmatrix.trans" : "ldmatrix", 32, kFullWarp, &addr, 1, out, num,
                  [num, trans, base](const uint32_t* in, uint32_t* o, int) {
                    count_instruction("ldmatrix");
                    // rows[j][i]: row i of matrix j, 8 b16 elements, from lane 8 j + i's address.
                    uint16_t rows[4][8][8] = {};
                    for (int j = 0; j < num; ++j)
                      for (int i = 0; i < 8; ++i) {
                        const int lane = ldmatrix_row_lane(j, i);
                        const uint32_t a = in[lane];
                        if (a % 16) {
                          char buf[120];
                          std::snprintf(buf, sizeof buf,
                                        "ldmatrix row address 0x%x of lane %d is not 16-byte aligned", a, lane);
                          emu::report("misaligned", buf);
                          continue;
                        }
                        emu::smem_read(a, rows[j][i], 16, base + lane);
                      }
                    for (int lane = 0; lane < 32; ++lane)
                      for (int j = 0; j < num; ++j) {
                        uint32_t v = 0;
                        for (int h = 0; h < 2; ++h) {
                          const Coord c = ldmatrix_coord(lane, h, trans);
                          v |= static_cast<uint32_t>(rows[j][c.row][c.col]) << (16 * h);
                        }
                        o[lane * num + j] = v;
                      }
                  });
  std::memcpy(r, out, 4 * num);
}

// ---- mma.sync (PTX 9.7.14.5.14) ------------------------------------------------------------------

namespace {
// D = C + A B for one m16n8kK warp MMA from every lane's registers: in[lane] = a0..a3, b0, b1,
// c0..c3 (as bits); out[lane] = d0..d3. Products exact in fp32, summed in k order.
void mma_sync_fn(WgmmaType type, const uint32_t* in, uint32_t* out) {
  const int K = k_of(type), pr = per_reg(type);
  float A[16][32] = {}, B[32][8] = {}, C[16][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* me = in + lane * 10;
    for (int i = 0; i < 4 * pr; ++i) {
      const Coord a = mma_fragment_coord(type, 'A', lane, i);
      A[a.row][a.col] = unpack(type, me[i / pr], i % pr);
    }
    for (int i = 0; i < 2 * pr; ++i) {
      const Coord b = mma_fragment_coord(type, 'B', lane, i);
      B[b.row][b.col] = unpack(type, me[4 + i / pr], i % pr);
    }
    for (int i = 0; i < 4; ++i) {
      const Coord c = mma_fragment_coord(type, 'C', lane, i);
      C[c.row][c.col] = u2f(me[6 + i]);
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const Coord c = mma_fragment_coord(type, 'C', lane, i);
      float acc = C[c.row][c.col];
      for (int k = 0; k < K; ++k) acc += A[c.row][k] * B[k][c.col];
      out[lane * 4 + i] = f2u(acc);
    }
}

void mma_sync(WgmmaType type, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1, f2u(d[0]), f2u(d[1]), f2u(d[2]), f2u(d[3])};
  uint32_t out[4];
  emu::collective(type == WgmmaType::kBF16 ? "mma.m16n8k16.bf16" : "mma.m16n8k32.e4m3", 32, kFullWarp, in, 10, out,
                  4, [type](const uint32_t* i, uint32_t* o, int) {
                    count_instruction("mma");
                    mma_sync_fn(type, i, o);
                  });
  for (int i = 0; i < 4; ++i) d[i] = u2f(out[i]);
}
}  // namespace

void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_sync(WgmmaType::kBF16, d, a, b0, b1);
}
void mma_e4m3_16832(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_sync(WgmmaType::kE4M3, d, a, b0, b1);
}

// ---- cp.async, st.shared ------------------------------------------------------------------------

void cp_async(uint32_t dst, const void* src, int cp_size, int src_size) {
  if (src_size < 0 || src_size > cp_size) {  // PTX: src-size must not exceed cp-size
    emu::report("misaligned", "cp.async src-size " + std::to_string(src_size) + " outside [0, " +
                                  std::to_string(cp_size) + "]");
    src_size = src_size < 0 ? 0 : cp_size;
  }
  emu::cp_async(dst, src, cp_size, src_size);
}
void cp_async_commit() { emu::cp_async_commit(); }
void cp_async_wait(int n) { emu::cp_async_wait(n); }

void st_shared_u32(uint32_t addr, uint32_t v) {
  if (addr % 4) {  // PTX 9.7.9.9: the address must be naturally aligned
    emu::report("misaligned", "st.shared.b32 to 0x" + std::to_string(addr) + ", not 4-byte aligned");
    return;
  }
  emu::smem_write(addr, &v, 4, self().tid);
}

// ---- wgmma (PTX 9.7.15) ----------------------------------------------------------------------

namespace {
// The warpgroup-uniform operands every thread passes besides its registers.
struct WgmmaArgs {
  uint32_t desc_a_lo, desc_a_hi, desc_b_lo, desc_b_hi, flags;
};
uint32_t pack_flags(WgmmaType type, int n, bool scale_d, int scale_a, int scale_b, int trans_a, int trans_b, bool rs) {
  return static_cast<uint32_t>(type) | (scale_d ? 2u : 0u) | (scale_a < 0 ? 4u : 0u) | (scale_b < 0 ? 8u : 0u) |
         (trans_a ? 16u : 0u) | (trans_b ? 32u : 0u) | (rs ? 64u : 0u) | static_cast<uint32_t>(n) << 8;
}

// Reads operand X (rows mn = 0..rows-1, K columns) through its descriptor into x[mn][k],
// 16-byte chunk by chunk (a chunk stays contiguous under every swizzle), on behalf of thread
// base + mn % 128 of the warpgroup.
void read_operand(std::vector<float>& x, WgmmaType type, uint64_t desc, int rows, bool mn_major, int base) {
  const int K = k_of(type), eb = elem_bytes(type), per16 = 16 / eb;
  x.assign(static_cast<size_t>(rows) * K, 0.f);
  uint8_t chunk[16];
  if (!mn_major) {
    for (int mn = 0; mn < rows; ++mn)
      for (int k0 = 0; k0 < K; k0 += per16) {
        emu::smem_read(wgmma_smem_offset(desc, mn, k0, eb, false), chunk, 16, base + mn % 128, true);
        for (int e = 0; e < per16; ++e) {
          uint32_t v = 0;
          std::memcpy(&v, chunk + e * eb, eb);
          x[static_cast<size_t>(mn) * K + k0 + e] = unpack(type, v, 0);
        }
      }
  } else {
    for (int k = 0; k < K; ++k)
      for (int mn0 = 0; mn0 < rows; mn0 += per16) {
        emu::smem_read(wgmma_smem_offset(desc, mn0, k, eb, true), chunk, 16, base + (mn0 + k) % 128, true);
        for (int e = 0; e < per16; ++e) {
          uint32_t v = 0;
          std::memcpy(&v, chunk + e * eb, eb);
          x[static_cast<size_t>(mn0 + e) * K + k] = unpack(type, v, 0);
        }
      }
  }
}

// One wgmma over the warpgroup. in[t] = WgmmaArgs, then (register-A form) 4 A registers, then
// the n/2 accumulator inputs; out[t] = the n/2 results.
void wgmma_fn(const uint32_t* in, uint32_t* out, int n_in, int base) {
  const WgmmaArgs& w = *reinterpret_cast<const WgmmaArgs*>(in);
  for (int t = 1; t < 128; ++t)
    if (std::memcmp(in + t * n_in, in, sizeof(WgmmaArgs)) != 0) {
      emu::report("divergent-collective", "wgmma operands (descriptors, n, immediates) differ across the warpgroup");
      break;
    }
  const WgmmaType type = static_cast<WgmmaType>(w.flags & 1);
  const bool scale_d = w.flags & 2, neg_a = w.flags & 4, neg_b = w.flags & 8, trans_a = w.flags & 16,
             trans_b = w.flags & 32, rs = w.flags & 64;
  const int N = static_cast<int>(w.flags >> 8), K = k_of(type), regs = N / 2;
  const uint64_t desc_a = w.desc_a_lo | static_cast<uint64_t>(w.desc_a_hi) << 32;
  const uint64_t desc_b = w.desc_b_lo | static_cast<uint64_t>(w.desc_b_hi) << 32;
  count_instruction("wgmma");
  for (int operand = rs ? 1 : 0; operand < 2; ++operand) {
    const MatrixDescriptor d = decode_descriptor(operand ? desc_b : desc_a);
    if (d.base != 0 && d.swizzle != 0)
      emu::report("misaligned", "wgmma descriptor with a nonzero matrix base offset (bits 49-51): not modelled; "
                                "swizzled operands must start on their swizzle pattern's boundary");
  }
  std::vector<float> A, B;  // A[m][k], B[n][k]
  if (rs) {
    A.assign(64 * K, 0.f);
    const int pr = per_reg(type);
    for (int t = 0; t < 128; ++t)
      for (int i = 0; i < 4 * pr; ++i) {
        const Coord c = wgmma_a_fragment_coord(type, t, i);
        A[c.row * K + c.col] = unpack(type, in[t * n_in + 5 + i / pr], i % pr);
      }
  } else {
    read_operand(A, type, desc_a, 64, trans_a, base);
  }
  read_operand(B, type, desc_b, N, trans_b, base);
  const int acc_at = rs ? 9 : 5;
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < regs; ++i) {
      const Coord c = wgmma_accumulator_coord(t, i);
      float acc = scale_d ? u2f(in[t * n_in + acc_at + i]) : 0.f;
      const float* a = &A[c.row * K];
      const float* b = &B[static_cast<size_t>(c.col) * K];
      for (int k = 0; k < K; ++k) acc += (neg_a ? -a[k] : a[k]) * (neg_b ? -b[k] : b[k]);
      out[t * regs + i] = f2u(acc);
    }
}

void wgmma(float* d, int n, WgmmaType type, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, bool scale_d,
           int scale_a, int scale_b, int trans_a, int trans_b) {
  if (n % 8 || n < 8 || n > 256) emu::trap("wgmma with N outside 8..256 (step 8)");
  if (type == WgmmaType::kE4M3 && (trans_a || trans_b))
    emu::trap("wgmma .e4m3 takes K-major operands only (no transpose immediates)");
  const int regs = n / 2, n_a = a_regs ? 4 : 0, n_in = 5 + n_a + regs;
  std::vector<uint32_t> in(n_in), out(regs);
  const WgmmaArgs args{static_cast<uint32_t>(desc_a), static_cast<uint32_t>(desc_a >> 32),
                       static_cast<uint32_t>(desc_b), static_cast<uint32_t>(desc_b >> 32),
                       pack_flags(type, n, scale_d, scale_a, scale_b, trans_a, trans_b, a_regs != nullptr)};
  std::memcpy(in.data(), &args, sizeof args);
  if (a_regs) std::memcpy(in.data() + 5, a_regs, 16);
  // The accumulator input: chaining onto an in-flight wgmma of this thread is legal (PTX
  // 9.7.15.5.2); emu::wgmma_accumulator_in resolves it without a pending-read report.
  std::vector<float> acc_in(regs);
  emu::wgmma_accumulator_in(d, acc_in.data(), regs);
  std::memcpy(in.data() + 5 + n_a, acc_in.data(), 4 * regs);
  const int base = group_base(128);
  emu::collective("wgmma.mma_async", 128, kFullWarp, in.data(), n_in, out.data(), regs,
                  [n_in, base](const uint32_t* i, uint32_t* o, int) { wgmma_fn(i, o, n_in, base); });
  std::vector<float> result(regs);
  std::memcpy(result.data(), out.data(), 4 * regs);
  emu::wgmma_defer(d, result.data(), regs);  // d reads NaN and is pending until the wait
}
}  // namespace

void wgmma_ss(float* d, int n, WgmmaType type, uint64_t desc_a, uint64_t desc_b, bool scale_d, int scale_a,
              int scale_b, int trans_a, int trans_b) {
  wgmma(d, n, type, nullptr, desc_a, desc_b, scale_d, scale_a, scale_b, trans_a, trans_b);
}
void wgmma_rs(float* d, int n, WgmmaType type, const uint32_t (&a)[4], uint64_t desc_b, bool scale_d, int scale_a,
              int scale_b, int trans_b) {
  wgmma(d, n, type, a, 0, desc_b, scale_d, scale_a, scale_b, 0, trans_b);
}

void wgmma_fence() { emu::wgmma_fence(); }
void wgmma_commit() { emu::wgmma_commit(); }
void wgmma_wait(int n) { emu::wgmma_wait(n); }
void fence_proxy_async_smem() { emu::fence_proxy_async(); }

}  // namespace emu::ptx
