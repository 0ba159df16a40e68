"""The lightning-indexer logits ops (SPEC section 3):

    I[t, s] = k_scale[s] * sum_h weights[t, h] * relu(q[t, h, :] . k[s, :])

with q and k in FP8 (``torch.float8_e4m3fn``). The caller folds q's dequantisation scale and
``H**-0.5 * D**-0.5`` into ``weights``. CUDA kernels serve H in {32, 64} and D = 128; the CPU
kernels accept any H and D.

Range semantics (both ops): bounds are clamped, never trusted (``ks``/``ke`` to ``[0, S]``,
visible lengths to ``[0, max_context_len]``); a paged position whose block-table entry is out
of ``[0, num_blocks)`` is never read and scores ``-inf``. With ``clean_logits=True`` every
entry outside a row's range is ``-inf``; with ``clean_logits=False`` those entries are
unspecified (the CUDA kernels leave whole skipped tiles unwritten, as DeepGEMM does), so only
read in-range entries then.

Accepted forms (``dsa_ext.ops._accept``): q / k as float8_e4m3fn or their uint8 bytes;
``k_scale`` as ``[S]`` or ``[S, 1]`` (what ``fp8_quantize`` returns); ks / ke / context_lens /
block_table as int32 or int64 (converted, clamped to the int32 range); a float8_e4m3fn cache
viewed as uint8. Non-contiguous q, k, k_scale, weights, ks, ke are copied to contiguous ones
(block_table keeps its row stride); the cache must be contiguous.
"""
from __future__ import annotations

import torch

from ._accept import byte_view, dense, fp8_view, int32_index, scale_vector

__all__ = ["indexer_logits", "paged_indexer_logits"]


def indexer_logits(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                   weights: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                   clean_logits: bool = True) -> torch.Tensor:
    """Indexer logits of a ragged prefill batch (DeepGEMM ``fp8_mqa_logits`` contract).

    Args:
        q: ``[T, H, D]`` float8_e4m3fn queries.
        k: ``[S, D]`` float8_e4m3fn keys (one head, shared by all query heads).
        k_scale: ``[S]`` fp32 dequantisation scale of each key (must be >= 0 for the scale to
            commute with the ReLU, as every FP8 quantiser produces).
        weights: ``[T, H]`` fp32 per-query, per-head weights.
        ks, ke: ``[T]`` int32; row t sees keys ``ks[t] <= s < ke[t]``.
        clean_logits: write ``-inf`` outside each row's range (else those entries are unspecified).

    Returns:
        ``[T, S]`` fp32 logits.
    """
    return torch.ops.dsa.indexer_logits(fp8_view(q), fp8_view(k), scale_vector(k_scale),
                                        dense(weights), int32_index(ks), int32_index(ke),
                                        clean_logits)


def paged_indexer_logits(q: torch.Tensor, kv_cache: torch.Tensor, weights: torch.Tensor,
                         context_lens: torch.Tensor, block_table: torch.Tensor,
                         max_context_len: int, clean_logits: bool = True) -> torch.Tensor:
    """Indexer logits of decode queries over the paged indexer K cache
    (DeepGEMM ``fp8_paged_mqa_logits`` contract).

    Args:
        q: ``[B, N, H, D]`` float8_e4m3fn (N = 1 + draft tokens).
        kv_cache: ``uint8 [num_blocks, block_size, 1, D + 4]`` in the DeepGEMM / vLLM layout
            (per block: ``block_size * D`` FP8 values, then ``block_size`` fp32 scales).
        weights: ``[B * N, H]`` fp32.
        context_lens: ``[B]`` int32 cached tokens including the N new ones (query j of sequence
            b sees positions ``< context_lens[b] - N + 1 + j``), or ``[B, N]`` int32 giving each
            query's visible length directly.
        block_table: ``[B, max_blocks]`` int32 physical block of each logical block (rows must
            have unit stride; a row stride is allowed).
        max_context_len: columns of the output.
        clean_logits: write ``-inf`` outside each query's visible range.

    Returns:
        ``[B * N, max_context_len]`` fp32 logits.
    """
    return torch.ops.dsa.paged_indexer_logits(fp8_view(q), byte_view(kv_cache), dense(weights),
                                              int32_index(context_lens),
                                              int32_index(block_table, keep_strides=True),
                                              max_context_len, clean_logits)


@torch.library.register_fake("dsa::indexer_logits")
def _indexer_logits_fake(q, k, k_scale, weights, ks, ke, clean_logits=True):
    torch._check(q.dim() == 3, lambda: f"q must be 3-D [T, H, D], got {tuple(q.shape)}")
    torch._check(k.dim() == 2, lambda: f"k must be 2-D [S, D], got {tuple(k.shape)}")
    return q.new_empty((q.shape[0], k.shape[0]), dtype=torch.float32)


@torch.library.register_fake("dsa::paged_indexer_logits")
def _paged_indexer_logits_fake(q, kv_cache, weights, context_lens, block_table, max_context_len,
                               clean_logits=True):
    torch._check(q.dim() == 4, lambda: f"q must be 4-D [B, N, H, D], got {tuple(q.shape)}")
    return q.new_empty((q.shape[0] * q.shape[1], max_context_len), dtype=torch.float32)
