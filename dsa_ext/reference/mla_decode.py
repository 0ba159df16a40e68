"""Reference (oracle) for the mla_decode op family: sparse MLA decode over a paged MLA cache.

Decode is exactly "dequantise the cache, then sparse MLA attention": the cache is read back
with `reference.cache.dequantize_mla_cache` (FP8 656-byte records: nope = fp8 * tile scale,
rope bf16; or the bf16 rows), the (b, s_q) query rows are flattened to T = B * s_q tokens,
and `reference.sparse_mla.sparse_mla_fwd` does the rest (float64 inside).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .cache import dequantize_mla_cache
from .sparse_mla import sparse_mla_fwd

__all__ = ["sparse_mla_decode"]


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      sm_scale: float, d_v: int = 512,
                      attn_sink: Optional[torch.Tensor] = None,
                      topk_length: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Oracle of `dsa_ext.sparse_mla_decode`: out [B, s_q, H, d_v] bf16, lse [B, s_q, H] fp32.

    Row (b, s) attends to the cache slots `indices[b, s, j]` (global ids blk * block_size + off)
    for j < topk_length ([B] or [B, s_q]; all K when not given); a slot that is negative or
    >= num_blocks * block_size is skipped; a repeated slot counts once per occurrence. An empty
    row gives out 0 and lse -inf; attn_sink [H] adds exp(sink) to the denominator only.
    """
    B, s_q, H, D = q.shape
    K = indices.shape[-1]
    kv = dequantize_mla_cache(kv_cache.cpu()).unsqueeze(1)            # [num_slots, 1, 576] fp32
    lengths = None
    if topk_length is not None:
        lengths = topk_length.cpu()
        if lengths.dim() == 1:                                         # FlashMLA's per-request form
            lengths = lengths[:, None].expand(B, s_q)
        lengths = lengths.reshape(B * s_q)
    out, lse = sparse_mla_fwd(q.cpu().reshape(B * s_q, H, D), kv,
                              indices.cpu().reshape(B * s_q, 1, K), sm_scale, d_v,
                              None if attn_sink is None else attn_sink.cpu(), lengths)
    return out.reshape(B, s_q, H, d_v).to(q.device), lse.reshape(B, s_q, H).to(q.device)
