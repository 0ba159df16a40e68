// Emulator entry points of the topk family (tests/test_emu_topk.py): the real launchers of
// topk_launch.cu (rewritten for the host by launch_rewrite.py), called with raw pointers exactly
// as topk_cuda.cpp calls them once its checks have passed. The cluster size is the launcher's
// choice from T and S on the emulated 132-SM H100 (16-CTA clusters allowed), as on the device.
#include "topk_launch.gen.cu"

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
