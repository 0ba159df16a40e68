// Emulator entry points of the hadamard family (tests/test_emu_hadamard.py): the real launcher of
// hadamard_launch.cu (rewritten for the host by launch_rewrite.py), called with raw pointers
// exactly as hadamard_cuda.cpp calls it once its checks have passed (d a power of two in
// [32, 1024] picks the kernel's values per lane, 1..32).
#include "hadamard_launch.gen.cu"

extern "C" {

int emu_hadamard_fp8_quantize(const void* x, int x_bf16, uint8_t* out, float* scales, int64_t rows, int d,
                              int block, int ue8m0) {
  return dsa::launch_hadamard_fp8_quantize(x, x_bf16 != 0, out, scales, rows, d, block, ue8m0 != 0, nullptr);
}

}  // extern "C"
