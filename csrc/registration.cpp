// The one place that declares every dsa:: op schema (SPEC section 3). The CPU and CUDA kernels
// are registered next to their code (csrc/<family>/<family>_{cpu,cuda}.cpp); fake kernels and
// autograd live in the Python package (dsa_ext/ops/<family>.py).
#include <torch/library.h>

TORCH_LIBRARY(dsa, m) {
  // ---- quantisation and caches (csrc/cache) ----
  m.def("fp8_quantize(Tensor x, int block_size=128, bool ue8m0=True) -> (Tensor x_fp8, Tensor scale)");
  m.def("indexer_k_cache_write(Tensor k, Tensor slot_mapping, Tensor(a!) kv_cache, bool ue8m0=True) -> ()");
  m.def("indexer_k_cache_gather(Tensor kv_cache, Tensor block_table, Tensor seq_lens) -> (Tensor k_fp8, Tensor k_scale)");
  m.def("mla_kv_cache_write(Tensor kv, Tensor slot_mapping, Tensor(a!) kv_cache) -> ()");
  m.def("mla_kv_cache_gather(Tensor kv_cache, Tensor slots) -> Tensor");

  // ---- the indexer's Hadamard rotation fused with FP8 quantisation (csrc/hadamard) ----
  m.def("hadamard_fp8_quantize(Tensor x, int block_size=128, bool ue8m0=True) -> (Tensor x_fp8, Tensor scale)");

  // ---- lightning indexer (csrc/indexer) ----
  m.def("indexer_logits(Tensor q, Tensor k, Tensor k_scale, Tensor weights, Tensor ks, Tensor ke, bool clean_logits=True) -> Tensor");
  // MXFP4 indexer keys (SPEC 10.5; layout in csrc/indexer/mxfp4.h): the quantiser and the paged
  // cache writer; indexer_logits / paged_indexer_logits read MXFP4 keys too (uint8 k_scale, or
  // a cache whose last dim is D/2 + D/32).
  m.def("mxfp4_quantize(Tensor x) -> (Tensor packed, Tensor scale)");
  m.def("mxfp4_indexer_k_cache_write(Tensor k, Tensor slot_mapping, Tensor(a!) kv_cache) -> ()");
  m.def("paged_indexer_logits(Tensor q, Tensor kv_cache, Tensor weights, Tensor context_lens, Tensor block_table, int max_context_len, bool clean_logits=True) -> Tensor");
  m.def("indexer_topk(Tensor q, Tensor k, Tensor k_scale, Tensor weights, Tensor ks, Tensor ke, int topk, bool sorted=False, int max_workspace_bytes=268435456) -> Tensor");

  // ---- top-k (csrc/topk) ----
  m.def("topk_indices(Tensor logits, int k, Tensor? ks=None, Tensor? ke=None, bool sorted=False) -> Tensor");
  m.def("topk_slot_ids(Tensor indices, Tensor block_table, int block_size) -> Tensor");

  // ---- sparse MLA attention, prefill and training (csrc/sparse_mla) ----
  m.def("sparse_mla_fwd(Tensor q, Tensor kv, Tensor indices, float sm_scale, int d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None) -> (Tensor out, Tensor lse)");
  m.def("sparse_mla_bwd(Tensor q, Tensor kv, Tensor out, Tensor dout, Tensor indices, Tensor lse, float sm_scale, int d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None, bool deterministic=False) -> (Tensor dq, Tensor dkv)");

  // ---- sparse MLA decode over a paged cache (csrc/mla_decode) ----
  m.def("sparse_mla_decode(Tensor q, Tensor kv_cache, Tensor indices, float sm_scale, int d_v=512, Tensor? attn_sink=None, Tensor? topk_length=None, Tensor? extra_kv_cache=None, Tensor? extra_indices=None, Tensor? extra_topk_length=None) -> (Tensor out, Tensor lse)");

  // ---- training the indexer (csrc/training, SPEC section 7; dsa_ext/ops/training.py) ----
  // The indexer in training precision (bf16/fp32, fp64 on CPU) with its backward, the main
  // attention's head-averaged target over the selected entries, and the KL alignment losses
  // (sparse stage over the selected entries; dense warm-up streamed by key blocks). The loss ops
  // return the loss with its gradients into q, k, weights (the autograd backward scales them).
  m.def("indexer_train_logits(Tensor q, Tensor k, Tensor weights, Tensor ks, Tensor ke) -> Tensor");
  m.def("indexer_train_logits_bwd(Tensor grad, Tensor q, Tensor k, Tensor weights, Tensor ks, Tensor ke, bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dw)");
  m.def("sparse_attention_target(Tensor q, Tensor kv, Tensor indices, Tensor lse, float sm_scale, Tensor? topk_length=None) -> Tensor");
  m.def("indexer_kl_loss_sparse(Tensor q, Tensor k, Tensor weights, Tensor indices, Tensor target, Tensor? topk_length=None, str reduction=\"sum\", bool deterministic=False) -> (Tensor loss, Tensor dq, Tensor dk, Tensor dw)");
  m.def("indexer_kl_loss_dense(Tensor q, Tensor k, Tensor weights, Tensor ks, Tensor ke, Tensor q_main, Tensor kv_main, float sm_scale, str reduction=\"sum\", int block_size=1024, bool deterministic=False) -> (Tensor loss, Tensor dq, Tensor dk, Tensor dw)");

  // ---- the DeepSeek-V4 compressor (csrc/compress, SPEC 10.4; dsa_ext/ops/compress.py) ----
  // Gated pooling of `ratio` tokens (overlapping windows when kv is [T, 2d]) into one entry,
  // then RMSNorm and GPT-J rope on its last 64 dims; a ragged batch by cu_seqlens.
  m.def("v4_compress(Tensor kv, Tensor score, Tensor ape, Tensor norm_weight, float eps, Tensor rope_cos, Tensor rope_sin, Tensor? cu_seqlens=None) -> Tensor");
  // Its decode form: one token per sequence a step into a ring-buffer state; returns [B, d]
  // with the entry where positions[b] + 1 is a multiple of ratio, zeros elsewhere.
  m.def("v4_compress_step(Tensor kv, Tensor score, Tensor ape, Tensor norm_weight, float eps, Tensor rope_cos, Tensor rope_sin, Tensor positions, Tensor(a!) kv_state, Tensor(b!) score_state) -> Tensor");
}
