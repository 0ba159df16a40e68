"""Sparse MLA decode over paged MLA caches (V3.2: FP8 656-byte records or bf16 576; DeepSeek-V4:
FP8 584-byte MODEL1 pages or bf16 512), optionally over a second cache in the same softmax."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._accept import byte_view, dense, fp32, int32_index

__all__ = ["sparse_mla_decode"]


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      sm_scale: float, d_v: int = 512,
                      attn_sink: Optional[torch.Tensor] = None,
                      topk_length: Optional[torch.Tensor] = None,
                      extra_kv_cache: Optional[torch.Tensor] = None,
                      extra_indices: Optional[torch.Tensor] = None,
                      extra_topk_length: Optional[torch.Tensor] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA attention of decode queries over the cache slots top-k selected for them.

    Args:
        q: ``[B, s_q, H, d_qk]`` bf16; d_qk 576 (V3.2 / GLM-5: 512 nope + 64 rope) or 512
            (DeepSeek-V4: 448 nope + 64 rope, K == V); a non-contiguous view is copied.
        kv_cache: the MLA cache of q's model. d_qk 576: FP8 ``uint8 [num_blocks, block_size, 1,
            656]`` (FlashMLA V3.2 records: 512 e4m3 values in 4 tiles of 128, 4 fp32 tile scales,
            64 bf16 rope values) or ``bfloat16 [num_blocks, block_size, 1, 576]``. d_qk 512: FP8
            ``uint8 [num_blocks, block_size, 1, 584]`` (FlashMLA MODEL1 pages: 576-byte rows of
            448 e4m3 values and 64 bf16 rope values, then 8-byte groups of 7 ue8m0 scales; the
            page pitch is ``stride(0)``, so FlashMLA's padded allocation is read in place) or
            ``bfloat16 [num_blocks, block_size, 1, 512]``. ``float8_e4m3fn`` caches are viewed as
            uint8; a cache is never copied.
        indices: ``[B, s_q, K]`` int32 (or int64) global slot ids ``blk * block_size + off``; an entry that
            is negative or ``>= num_blocks * block_size`` is skipped (never read).
        sm_scale: scale of the scores ``q . k`` before the softmax.
        d_v: must be 512: V is the first 512 values of each latent row (the whole row at d_qk 512).
        attn_sink: optional ``[H]`` (fp32; other float dtypes are cast); adds
            ``exp(attn_sink[h])`` to the softmax denominator only (lse excludes it). ``+inf``
            makes head h's output 0 (lse unaffected), ``-inf`` is no sink.
        topk_length: optional ``[B]`` (FlashMLA's form) or ``[B, s_q]`` int32 / int64: only the first
            ``topk_length`` entries of a row are used (clamped to ``[0, K]``).
        extra_kv_cache: optional second cache of the same format as ``kv_cache`` (SPEC 10.3; in
            V4 the compressed entries, ``kv_cache`` holding the window rows).
        extra_indices: ``[B, s_q, K2]`` slot ids into ``extra_kv_cache`` (required with it; K2 may
            be 0). Their scores join the same softmax as those of ``indices``.
        extra_topk_length: optional ``[B]`` or ``[B, s_q]``: limits ``extra_indices`` as
            ``topk_length`` limits ``indices``.

    Returns:
        ``out [B, s_q, H, 512]`` bf16 and ``lse [B, s_q, H]`` fp32, the natural-log
        log-sum-exp of the scaled scores (both lists). A row with no valid entry gives out 0 and
        lse ``-inf`` (FlashMLA returns ``+inf`` there; ``-inf`` keeps lse-weighted merging of
        partial results correct). Any s_q is accepted (a chunked prefill can read the paged
        caches directly).

    CUDA-graph safe: no host synchronisation, and the work split depends on shapes only.
    On CUDA, ``DSA_MLA_DECODE_WGMMA=1`` in the environment selects the Hopper wgmma kernel for
    64-head blocks (H >= 64) instead of the default mma.sync kernel; it is opt-in until
    validated on hardware.
    """
    extra = extra_kv_cache if extra_kv_cache is None else byte_view(extra_kv_cache)
    return torch.ops.dsa.sparse_mla_decode(dense(q), byte_view(kv_cache), int32_index(indices),
                                           sm_scale, d_v, fp32(attn_sink),
                                           int32_index(topk_length), extra,
                                           int32_index(extra_indices),
                                           int32_index(extra_topk_length))


@torch.library.register_fake("dsa::sparse_mla_decode")
def _sparse_mla_decode_fake(q, kv_cache, indices, sm_scale, d_v=512, attn_sink=None,
                            topk_length=None, extra_kv_cache=None, extra_indices=None,
                            extra_topk_length=None):
    torch._check(q.dim() == 4, lambda: f"q must be 4-D [B, s_q, H, d_qk], got {tuple(q.shape)}")
    torch._check(indices.dim() == 3, lambda: "indices must be 3-D [B, s_q, K]")
    torch._check((extra_kv_cache is None) == (extra_indices is None),
                 lambda: "extra_kv_cache and extra_indices come together")
    if extra_indices is not None:
        torch._check(extra_indices.dim() == 3, lambda: "extra_indices must be 3-D [B, s_q, K2]")
    B, s_q, H, _ = q.shape
    out = q.new_empty(B, s_q, H, d_v)
    lse = q.new_empty(B, s_q, H, dtype=torch.float32)
    return out, lse
