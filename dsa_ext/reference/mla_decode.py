"""Reference (oracle) for the mla_decode op family: sparse MLA decode over paged MLA caches.

Decode is exactly "dequantise the caches, then sparse MLA attention": each cache is read back
with `reference.cache.dequantize_mla_cache` (any layout: V3.2 656-byte records, V4 584-byte
pages, bf16 576 / 512 rows), the entries of each list past its length become -1, the second
list (SPEC 10.3) is re-based onto the second cache's rows placed after the first's, the two
lists are concatenated per query, the (b, s_q) query rows are flattened to T = B * s_q tokens,
and `reference.sparse_mla.sparse_mla_fwd` does the rest (float64 inside, one softmax).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .cache import dequantize_mla_cache
from .sparse_mla import sparse_mla_fwd

__all__ = ["sparse_mla_decode"]


def _limited(indices: torch.Tensor, lengths: Optional[torch.Tensor], num_slots: int,
             base: int) -> torch.Tensor:
    """indices [B, s_q, K] as int64 row ids `base + slot` of the joined rows; -1 for an entry
    past its row's length or outside its cache."""
    B, s_q, K = indices.shape
    idx = indices.cpu().long()
    keep = (idx >= 0) & (idx < num_slots)
    if lengths is not None:
        lengths = lengths.cpu().long()
        if lengths.dim() == 1:                                         # FlashMLA's per-request form
            lengths = lengths[:, None].expand(B, s_q)
        keep &= torch.arange(K)[None, None, :] < lengths[..., None]
    return torch.where(keep, idx + base, torch.full_like(idx, -1))


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      sm_scale: float, d_v: int = 512,
                      attn_sink: Optional[torch.Tensor] = None,
                      topk_length: Optional[torch.Tensor] = None,
                      extra_kv_cache: Optional[torch.Tensor] = None,
                      extra_indices: Optional[torch.Tensor] = None,
                      extra_topk_length: Optional[torch.Tensor] = None,
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Oracle of `dsa_ext.sparse_mla_decode`: out [B, s_q, H, d_v] bf16, lse [B, s_q, H] fp32.

    Row (b, s) attends to the cache slots `indices[b, s, j]` (global ids blk * block_size + off)
    for j < topk_length ([B] or [B, s_q]; all K when not given) and, with a second cache, to
    the slots `extra_indices[b, s, j]` of `extra_kv_cache` for j < extra_topk_length, all in one
    softmax. A slot that is negative or >= its cache's num_blocks * block_size is skipped; a
    repeated slot counts once per occurrence. An empty row gives out 0 and lse -inf;
    attn_sink [H] adds exp(sink) to the denominator only. d_qk (576 or 512) is q's last dim.
    """
    if (extra_kv_cache is None) != (extra_indices is None):
        raise ValueError("extra_kv_cache and extra_indices come together")
    B, s_q, H, D = q.shape
    rows = dequantize_mla_cache(kv_cache.cpu())                        # [num_slots, d_qk] fp32
    if rows.shape[1] != D:
        raise ValueError(f"kv_cache holds rows of {rows.shape[1]} values, q has d_qk {D}")
    idx = _limited(indices, topk_length, rows.shape[0], 0)
    if extra_kv_cache is not None:
        extra_rows = dequantize_mla_cache(extra_kv_cache.cpu())
        if extra_rows.shape[1] != D:
            raise ValueError(f"extra_kv_cache holds rows of {extra_rows.shape[1]} values, q has d_qk {D}")
        idx = torch.cat([idx, _limited(extra_indices, extra_topk_length, extra_rows.shape[0],
                                       rows.shape[0])], dim=2)
        rows = torch.cat([rows, extra_rows])
    K = idx.shape[-1]
    out, lse = sparse_mla_fwd(q.cpu().reshape(B * s_q, H, D), rows.unsqueeze(1),
                              idx.reshape(B * s_q, 1, K), sm_scale, d_v,
                              None if attn_sink is None else attn_sink.cpu(), None)
    return out.reshape(B, s_q, H, d_v).to(q.device), lse.reshape(B, s_q, H).to(q.device)
