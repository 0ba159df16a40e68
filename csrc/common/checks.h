// Input validation shared by the CPU and CUDA glue of every op. Each helper raises a
// RuntimeError (TORCH_CHECK) or ValueError (TORCH_CHECK_VALUE) whose message names the
// argument and what was expected, e.g. "indices must be int32, got int64".
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace dsa {

// torch's Python spelling of a dtype ("int32", not "Int"), so messages read as users write.
inline const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBool: return "bool";
    case at::ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case at::ScalarType::Float8_e5m2: return "float8_e5m2";
    default: return c10::toString(t);
  }
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, name, " must be ", dtype_name(want), ", got ",
              dtype_name(t.scalar_type()));
}

inline void check_dtype_in(const at::Tensor& t, const char* name,
                           std::initializer_list<at::ScalarType> allowed) {
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  std::string list;
  for (auto a : allowed) list += std::string(list.empty() ? "" : " or ") + dtype_name(a);
  TORCH_CHECK(false, name, " must be ", list, ", got ", dtype_name(t.scalar_type()));
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* name, int64_t d, int64_t want,
                       const char* what) {
  TORCH_CHECK(t.size(d) == want, name, ".size(", d, ") must be ", want, " (", what, "), got ",
              t.size(d), " (shape ", t.sizes(), ")");
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Every tensor argument of one call must live on the device of the first.
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

}  // namespace dsa
