// The MLA cache record layouts of SPEC section 2, shared by the CPU and CUDA kernels (torch-free).
#pragma once
#include <cstdint>

namespace dsa::mla_decode {

constexpr int kDNope = 512;   // "nope" part of a latent row; also V (d_v = 512)
constexpr int kDRope = 64;    // rope part, stored bf16 in both layouts
constexpr int kDQK = kDNope + kDRope;                       // 576
constexpr int kDV = kDNope;
constexpr int kTile = 128;                                  // one fp32 scale per 128 nope values
constexpr int kNumTiles = kDNope / kTile;                   // 4
// FP8 record: [0,512) e4m3 nope, [512,528) 4 fp32 tile scales, [528,656) 64 bf16 rope values.
constexpr int kScaleOffset = kDNope;                        // 512
constexpr int kRopeOffset = kDNope + 4 * kNumTiles;         // 528
constexpr int kFp8RecordBytes = kRopeOffset + 2 * kDRope;   // 656
constexpr int kBf16RecordBytes = 2 * kDQK;                  // 1152

}  // namespace dsa::mla_decode
