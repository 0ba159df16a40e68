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

}  // namespace dsa
