// v4_compress launcher (torch-free).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsa {

// kv, score: [tokens, c * d] fp32; ape [ratio, c * d]; norm_weight [d]; rope tables [P, 32]
// fp32, all contiguous, 8-byte aligned. With cu_seqlens (int32 [batch + 1], device) the entries
// of sequence b start at entry_offsets[b] (int64 [batch + 1], device, entry_offsets[batch] =
// entries); without, one sequence of `tokens` tokens (entries = tokens / ratio). The caller has
// validated the lengths and the rope rows. d even, >= 64; c in {1, 2}. Writes out [entries, d]
// bf16. No host synchronisation.
cudaError_t launch_v4_compress(const float* kv, const float* score, const float* ape,
                               const float* norm_weight, float eps, const float* rope_cos,
                               const float* rope_sin, const int32_t* cu_seqlens,
                               const int64_t* entry_offsets, int64_t batch, int64_t entries,
                               int d, int c, int ratio, void* out, cudaStream_t stream);

// One decode step: kv, score [batch, c * d] fp32 (each sequence's new token, at positions[b];
// negative = none), the ring state kv_state / score_state [batch, c * ratio, c * d] fp32 (row
// t % (c * ratio) holds token t's kv and score + ape[t % ratio]), updated in place. Writes
// out [batch, d] bf16: the entry of window positions[b] / ratio where positions[b] + 1 is a
// multiple of ratio, zeros elsewhere (NaN where the rope table has no row for the entry). No
// host synchronisation (CUDA-graph safe).
cudaError_t launch_v4_compress_step(const float* kv, const float* score, const float* ape,
                                    const float* norm_weight, float eps, const float* rope_cos,
                                    const float* rope_sin, int64_t rope_rows,
                                    const int32_t* positions, float* kv_state,
                                    float* score_state, int64_t batch, int d, int c, int ratio,
                                    void* out, cudaStream_t stream);

}  // namespace dsa
