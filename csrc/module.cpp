// The Python module `dsa_ext._C`. Importing it runs the static TORCH_LIBRARY registrations of
// every translation unit linked in; the module itself only reports how it was built.
#include <pybind11/pybind11.h>

#ifndef DSA_CUDA_ARCHS
#define DSA_CUDA_ARCHS ""
#endif
#ifndef DSA_CUDA_VERSION
#define DSA_CUDA_VERSION ""
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dsa_ext compiled kernels (ops are registered under torch.ops.dsa)";
  m.def("_build_info", [] {
    py::dict info;
    info["torch_version"] = DSA_TORCH_VERSION;
#ifdef DSA_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    info["cuda_version"] = DSA_CUDA_VERSION;
    info["cuda_archs"] = DSA_CUDA_ARCHS;
    return info;
  });
}
