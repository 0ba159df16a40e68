"""Reference (oracle) for the mla_decode op family: sparse MLA decode over a paged MLA cache.

Decode is "dequantise the cache (`reference.cache.dequantize_mla_cache`), then sparse MLA
attention of every query row (b, s) over its selected slots". Written for clarity and
exactness: fp32 dequantisation, fp64 softmax.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .cache import dequantize_mla_cache

__all__ = ["sparse_mla_decode"]


def _attend(q: torch.Tensor, kv: torch.Tensor, sm_scale: float, d_v: int,
            sink: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [H, 576] over the rows kv [n, 576] (all valid), fp64 inside.
    Returns out [H, d_v] and the natural-log lse [H] of the scaled scores (-inf when n == 0);
    the sink adds exp(sink[h]) to the denominator of out only."""
    H = q.shape[0]
    if kv.shape[0] == 0:
        return q.new_zeros(H, d_v, dtype=torch.float64), \
            torch.full((H,), float("-inf"), dtype=torch.float64)
    scores = (q.double() @ kv.double().T) * sm_scale                 # [H, n]
    lse = torch.logsumexp(scores, dim=1)                              # [H]
    denom_log = lse if sink is None else torch.logaddexp(lse, sink.double())
    p = torch.exp(scores - denom_log[:, None])
    return p @ kv[:, :d_v].double(), lse


def sparse_mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor,
                      sm_scale: float, d_v: int = 512,
                      attn_sink: Optional[torch.Tensor] = None,
                      topk_length: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Oracle of `dsa_ext.sparse_mla_decode`: out [B, s_q, H, d_v] bf16, lse [B, s_q, H] fp32.

    Row (b, s) attends to the cache slots `indices[b, s, j]` for j < topk_length (all K when
    not given); a slot that is negative or >= num_slots is skipped; a repeated slot counts once
    per occurrence. An empty row gives out 0 and lse -inf.
    """
    B, s_q, H, _ = q.shape
    K = indices.shape[-1]
    kv = dequantize_mla_cache(kv_cache.cpu())                         # [num_slots, 576] fp32
    num_slots = kv.shape[0]
    idx = indices.cpu().long()
    if topk_length is not None:
        lengths = topk_length.cpu().long()
        lengths = lengths[:, None].expand(B, s_q) if lengths.dim() == 1 else lengths
    else:
        lengths = torch.full((B, s_q), K, dtype=torch.long)
    sink = None if attn_sink is None else attn_sink.cpu()
    out = torch.zeros(B, s_q, H, d_v, dtype=torch.float64)
    lse = torch.empty(B, s_q, H, dtype=torch.float64)
    for b in range(B):
        for s in range(s_q):
            row = idx[b, s, :max(0, min(K, int(lengths[b, s])))]
            row = row[(row >= 0) & (row < num_slots)]
            out[b, s], lse[b, s] = _attend(q[b, s].cpu().float(), kv[row], sm_scale, d_v, sink)
    return out.to(torch.bfloat16).to(q.device), lse.float().to(q.device)
