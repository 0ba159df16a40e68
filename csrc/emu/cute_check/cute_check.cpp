// Independent oracle for the emulator's PTX layouts (tests/test_emu_cute_layouts.py; test only,
// CuTe is never part of the product): CuTe's atom traits (thread, value) -> coordinate maps for
// mma.sync m16n8k16 bf16 / m16n8k32 e4m3, ldmatrix x1/x2/x4 (.trans), the wgmma accumulator
// and register-A fragments, and CuTe's GMMA shared-memory atoms (K- and MN-major, no swizzle /
// 32B / 64B / 128B) with the descriptors make_gmma_desc builds for them, compared entry by
// entry with emu::ptx (csrc/emu/ptx.cpp). Host-only use of CuTe layouts.
//
//   cute_check [--print]    # exit status: number of mismatching atoms; --print dumps tables
#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm89.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cstdio>
#include <cstring>
#include <string>

#include "emu/ptx.h"

using namespace cute;
using PtxCoord = emu::ptx::Coord;
using emu::ptx::WgmmaType;

namespace {

bool g_print = false;
int g_failed_atoms = 0;

// One atom's comparison: counts entries and mismatches, prints the first few mismatches.
struct Check {
  std::string name;
  long entries = 0, bad = 0;
  explicit Check(std::string n) : name(std::move(n)) {}
  void expect(bool ok, const char* fmt, long a, long b, long c, long d, long e, long f) {
    ++entries;
    if (ok) return;
    if (bad++ < 5) {
      std::printf("  MISMATCH %s: ", name.c_str());
      std::printf(fmt, a, b, c, d, e, f);
      std::printf("\n");
    }
  }
  ~Check() {
    std::printf("%s %s: %ld entries, %ld mismatches\n", bad ? "FAIL" : "ok", name.c_str(), entries, bad);
    if (bad) ++g_failed_atoms;
  }
};

// ---- mma.sync fragments ----------------------------------------------------------------------

template <class Op>
void check_mma(const char* name, WgmmaType type) {
  using T = MMA_Traits<Op>;
  constexpr int M = size<0>(typename T::Shape_MNK{}), N = size<1>(typename T::Shape_MNK{});
  struct Operand {
    char which;
    int rows;  // CuTe's index = row + rows * col over (M,K), (N,K), (M,N)
  };
  for (Operand op : {Operand{'A', M}, Operand{'B', N}, Operand{'C', M}}) {
    Check c(std::string(name) + " " + op.which);
    auto run = [&](auto layout) {
      for (int t = 0; t < 32; ++t)
        for (int v = 0; v < size<1>(layout); ++v) {
          const int idx = layout(t, v), r = idx % op.rows, col = idx / op.rows;
          // CuTe B is (n, k); the emulator's B coordinate is (k, n).
          const PtxCoord want = op.which == 'B' ? PtxCoord{col, r} : PtxCoord{r, col};
          const PtxCoord got = emu::ptx::mma_fragment_coord(type, op.which, t, v);
          if (g_print) std::printf("    %s %c t%d v%d -> (%d, %d)\n", name, op.which, t, v, want.row, want.col);
          c.expect(got.row == want.row && got.col == want.col, "t%ld v%ld cute (%ld,%ld) emu (%ld,%ld)", t, v,
                   want.row, want.col, got.row, got.col);
        }
    };
    if (op.which == 'A') run(typename T::ALayout{});
    if (op.which == 'B') run(typename T::BLayout{});
    if (op.which == 'C') run(typename T::CLayout{});
  }
}

// ---- ldmatrix ---------------------------------------------------------------------------------
// CuTe maps (thread, value) to bits of the `num` 8x8 b16 matrices (1024 bits each, rows of 128
// bits); value index 16 h + 32 j is the first bit of half h of register j.
template <class Op>
void check_ldmatrix(const char* name, int num, bool trans) {
  using T = Copy_Traits<Op>;
  Check c(name);
  for (int t = 0; t < 32; ++t)
    for (int j = 0; j < num; ++j)
      for (int h = 0; h < 2; ++h) {
        const int bit = typename T::DstLayout{}(t, 16 * h + 32 * j);
        const int matrix = bit / 1024, row = bit % 1024 / 128, col = bit % 128 / 16;
        const PtxCoord got = emu::ptx::ldmatrix_coord(t, h, trans);
        if (g_print) std::printf("    %s t%d r%d h%d -> matrix %d (%d, %d)\n", name, t, j, h, matrix, row, col);
        c.expect(matrix == j && got.row == row && got.col == col, "t%ld reg%ld half%ld: cute (%ld,%ld) emu (%ld,?)", t, j, h,
                 row, col, got.row);
      }
  // Row addresses: lane 8 j + i's 128 bits are row i of matrix j.
  for (int j = 0; j < num; ++j)
    for (int i = 0; i < 8; ++i) {
      const int lane = emu::ptx::ldmatrix_row_lane(j, i);
      const int bit = typename T::SrcLayout{}(lane, 0);
      c.expect(bit == 1024 * j + 128 * i, "matrix %ld row %ld: lane %ld supplies bit %ld%ld%ld", j, i, lane, bit, 0, 0);
    }
}

// ---- wgmma register fragments -----------------------------------------------------------------

template <int N>
void check_wgmma_accumulator() {
  Check c("wgmma D m64n" + std::to_string(N));
  using L = SM90::GMMA::CLayout_64xN<N>;
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < N / 2; ++v) {
      const int idx = L{}(t, v), m = idx % 64, n = idx / 64;
      const PtxCoord got = emu::ptx::wgmma_accumulator_coord(t, v);
      if (g_print && N == 64) std::printf("    wgmma D t%d v%d -> (%d, %d)\n", t, v, m, n);
      c.expect(got.row == m && got.col == n, "t%ld v%ld cute (%ld,%ld) emu (%ld,%ld)", t, v, m, n, got.row, got.col);
    }
}

template <class L>
void check_wgmma_a_registers(const char* name, WgmmaType type) {
  Check c(name);
  for (int t = 0; t < 128; ++t)
    for (int v = 0; v < size<1>(L{}); ++v) {
      const int idx = L{}(t, v), m = idx % 64, k = idx / 64;
      const PtxCoord got = emu::ptx::wgmma_a_fragment_coord(type, t, v);
      c.expect(got.row == m && got.col == k, "t%ld v%ld cute (%ld,%ld) emu (%ld,%ld)", t, v, m, k, got.row, got.col);
    }
}

// ---- GMMA shared-memory layouts and descriptors ----------------------------------------------
// The operand tile (MN x K of one instruction) is the kk-th K slice of CuTe's canonical atom
// tiled to MN rows, placed at shared address `base`. make_gmma_desc gives LBO / SBO / layout
// type; its start address (a cvta on the device) is set here from the slice's pointer. Each
// element's address through CuTe's swizzled pointer must equal the emulator's decoding.
template <class Elem, GMMA::Major kMajor, class Atom, int MN>
void check_gmma_smem(const char* name, uint32_t base) {
  constexpr int eb = sizeof(Elem), K = 32 / eb;  // one instruction's K: 32 bytes
  constexpr bool mn_major = kMajor == GMMA::Major::MN;
  constexpr int atom_k = size<1>(Atom{});
  constexpr int tile_k = atom_k > K ? atom_k : K;
  auto layout = tile_to_shape(Atom{}, make_shape(Int<MN>{}, Int<tile_k>{}));
  auto tile = make_tensor(make_smem_ptr(reinterpret_cast<Elem*>(static_cast<uintptr_t>(base))), layout);
  Check c(std::string("gmma smem ") + name + " MN" + std::to_string(MN) + " @0x" + [&] {
    char b[16];
    std::snprintf(b, sizeof b, "%x", base);
    return std::string(b);
  }());
  for (int kk = 0; kk < tile_k / K; ++kk) {
    auto slice = local_tile(tile, make_shape(Int<MN>{}, Int<K>{}), make_coord(0, kk));
    GmmaDescriptor desc = GMMA::make_gmma_desc<kMajor>(slice);
    const uintptr_t start = reinterpret_cast<uintptr_t>(raw_pointer_cast(slice.data()));
    desc.bitfield.start_address_ = static_cast<uint16_t>((start & 0x3FFFF) >> 4);
    if (g_print && kk == 0)
      std::printf("    %s desc lbo %d sbo %d layout %d\n", name, int(desc.bitfield.leading_byte_offset_) << 4,
                  int(desc.bitfield.stride_byte_offset_) << 4, int(desc.bitfield.layout_type_));
    for (int mn = 0; mn < MN; ++mn)
      for (int k = 0; k < K; ++k) {
        const uintptr_t want = reinterpret_cast<uintptr_t>(&slice(mn, k));
        const uint32_t got = emu::ptx::wgmma_smem_offset(desc.desc_, mn, k, eb, mn_major);
        if (g_print && kk == 0 && mn < 16 && k % (16 / eb) == 0)
          std::printf("    %s (mn %d, k %d) -> 0x%lx\n", name, mn, k, static_cast<unsigned long>(want));
        c.expect(got == want, "k-slice %ld (mn %ld, k %ld): cute 0x%lx emu 0x%lx%ld", kk, mn, k, long(want), long(got), 0);
      }
  }
}

template <class Elem, int MN>
void check_gmma_smem_all(const char* type, uint32_t base) {
  const std::string t = type;
  check_gmma_smem<Elem, GMMA::Major::K, GMMA::Layout_K_INTER_Atom<Elem>, MN>((t + " K INTER").c_str(), base);
  check_gmma_smem<Elem, GMMA::Major::K, GMMA::Layout_K_SW32_Atom<Elem>, MN>((t + " K SW32").c_str(), base);
  check_gmma_smem<Elem, GMMA::Major::K, GMMA::Layout_K_SW64_Atom<Elem>, MN>((t + " K SW64").c_str(), base);
  check_gmma_smem<Elem, GMMA::Major::K, GMMA::Layout_K_SW128_Atom<Elem>, MN>((t + " K SW128").c_str(), base);
  if constexpr (sizeof(Elem) == 2) {  // transposed (MN-major) operands: 16-bit types only
    check_gmma_smem<Elem, GMMA::Major::MN, GMMA::Layout_MN_INTER_Atom<Elem>, MN>((t + " MN INTER").c_str(), base);
    check_gmma_smem<Elem, GMMA::Major::MN, GMMA::Layout_MN_SW32_Atom<Elem>, MN>((t + " MN SW32").c_str(), base);
    check_gmma_smem<Elem, GMMA::Major::MN, GMMA::Layout_MN_SW64_Atom<Elem>, MN>((t + " MN SW64").c_str(), base);
    check_gmma_smem<Elem, GMMA::Major::MN, GMMA::Layout_MN_SW128_Atom<Elem>, MN>((t + " MN SW128").c_str(), base);
  }
}

}  // namespace

int main(int argc, char** argv) {
  g_print = argc > 1 && !std::strcmp(argv[1], "--print");
  check_mma<SM80_16x8x16_F32BF16BF16F32_TN>("mma m16n8k16 bf16", WgmmaType::kBF16);
  check_mma<SM89_16x8x32_F32E4M3E4M3F32_TN>("mma m16n8k32 e4m3", WgmmaType::kE4M3);
  check_ldmatrix<SM75_U32x1_LDSM_N>("ldmatrix x1", 1, false);
  check_ldmatrix<SM75_U32x2_LDSM_N>("ldmatrix x2", 2, false);
  check_ldmatrix<SM75_U32x4_LDSM_N>("ldmatrix x4", 4, false);
  check_ldmatrix<SM75_U16x2_LDSM_T>("ldmatrix x1.trans", 1, true);
  check_ldmatrix<SM75_U16x4_LDSM_T>("ldmatrix x2.trans", 2, true);
  check_ldmatrix<SM75_U16x8_LDSM_T>("ldmatrix x4.trans", 4, true);
  check_wgmma_accumulator<8>();
  check_wgmma_accumulator<64>();
  check_wgmma_accumulator<128>();
  check_wgmma_accumulator<256>();
  check_wgmma_a_registers<SM90::GMMA::ALayout_64x16>("wgmma A registers bf16", WgmmaType::kBF16);
  check_wgmma_a_registers<SM90::GMMA::ALayout_64x32>("wgmma A registers e4m3", WgmmaType::kE4M3);
  // A tiles (64 rows) and B tiles up to 256 rows, at 1024-aligned bases (swizzle atoms'
  // alignment; the k-slices move the start address inside the atom).
  for (uint32_t base : {0x0u, 0x2400u, 0x1C000u}) {
    check_gmma_smem_all<bfloat16_t, 64>("bf16", base);
    check_gmma_smem_all<float_e4m3_t, 64>("e4m3", base);
  }
  check_gmma_smem_all<bfloat16_t, 256>("bf16", 0x8000u);
  check_gmma_smem_all<float_e4m3_t, 128>("e4m3", 0x8000u);
  std::printf("%d atoms failed\n", g_failed_atoms);
  return g_failed_atoms;
}
