// Emulator entry points of the topk family (tests/test_emu_topk.py): the real launchers of
// topk_launch.cu (rewritten for the host by launch_rewrite.py), called with raw pointers exactly
// as topk_cuda.cpp calls them once its checks have passed. The cluster size is the launcher's
// choice from T and S on the emulated 132-SM H100 (16-CTA clusters allowed), as on the device.
#include "topk_launch.gen.cu"

// The launcher's once-per-device cache (DeviceInfo::ready, a std::atomic<bool>) compiles, under
// -fsanitize=thread, to __tsan_atomic8_load/store calls, which runtime.cpp does not define yet.
// Weak, uninstrumented host versions (the launcher runs on the one emulator thread, outside
// any kernel): the runtime's own definitions replace them once it has them.
extern "C" {
__attribute__((weak, no_sanitize("thread"))) uint8_t __tsan_atomic8_load(const volatile uint8_t* a, int) {
  return *a;
}
__attribute__((weak, no_sanitize("thread"))) void __tsan_atomic8_store(volatile uint8_t* a, uint8_t v, int) {
  *a = v;
}
}

extern "C" {

int emu_topk_indices(const float* logits, int64_t T, int64_t S, int64_t row_stride, const int32_t* ks,
                     const int32_t* ke, int k, int sorted, int32_t* out) {
  return dsa::topk_indices_launch(logits, T, S, row_stride, ks, ke, k, sorted != 0, out, nullptr);
}

int emu_topk_slot_ids(const int32_t* indices, int64_t R, int64_t K, const int32_t* block_table, int64_t B,
                      int64_t M, int64_t block_size, int32_t* out) {
  return dsa::topk_slot_ids_launch(indices, R, K, block_table, B, M, block_size, out, nullptr);
}

}  // extern "C"
