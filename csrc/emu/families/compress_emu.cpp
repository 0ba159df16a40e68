// Emulator entry points of the compress family (tests/test_emu_compress.py): the real launchers
// of compress_launch.cu (rewritten for the host by launch_rewrite.py), called with raw pointers
// as compress_cuda.cpp calls them once its checks have passed (cu_seqlens and entry_offsets null
// for one sequence).
#include "compress_launch.gen.cu"

extern "C" {

int emu_v4_compress(const float* kv, const float* score, const float* ape, const float* norm_weight,
                    float eps, const float* rope_cos, const float* rope_sin, const int32_t* cu_seqlens,
                    const int64_t* entry_offsets, int64_t batch, int64_t entries, int d, int c, int ratio,
                    void* out) {
  return dsa::launch_v4_compress(kv, score, ape, norm_weight, eps, rope_cos, rope_sin, cu_seqlens,
                                 entry_offsets, batch, entries, d, c, ratio, out, nullptr);
}

int emu_v4_compress_step(const float* kv, const float* score, const float* ape, const float* norm_weight,
                         float eps, const float* rope_cos, const float* rope_sin, int64_t rope_rows,
                         const int32_t* positions, float* kv_state, float* score_state, int64_t batch, int d,
                         int c, int ratio, void* out) {
  return dsa::launch_v4_compress_step(kv, score, ape, norm_weight, eps, rope_cos, rope_sin, rope_rows, positions,
                                      kv_state, score_state, batch, d, c, ratio, out, nullptr);
}

}  // extern "C"
