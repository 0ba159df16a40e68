// e4m3 decoding for the CPU kernels: a 256-entry table built once from c10's conversion
// (converting value by value is bit twiddling in the inner loops).
#pragma once
#include <c10/util/Float8_e4m3fn.h>

#include <array>
#include <cstdint>

namespace dsa {

inline const std::array<float, 256>& fp8_e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b)
      t[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table;
}

}  // namespace dsa
